"""The test report's statistics beyond the per-class table: bootstrap intervals for the headline
metrics, calibration, and the test images whose labels the model doubts.

Every function takes class probabilities (N, C) and true labels (N,), as ``tables`` does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

# Resamples of the test set behind each interval; with the seed fixed, a report is the same on
# every run of the same checkpoint and data.
RESAMPLES = 1000
# Confidence bins of the expected calibration error and the reliability diagram (torchmetrics' default).
CALIBRATION_BINS = 15


@dataclass(frozen=True)
class Estimate:
    """A metric on the test set, with the 95% percentile interval of its bootstrap resamples."""

    value: float
    low: float
    high: float


@dataclass(frozen=True)
class Predictions:
    """What every metric here is computed from, one entry per test image."""

    labels: torch.Tensor  # (N,) true classes
    predicted: torch.Tensor  # (N,) top-1 classes
    in_top5: torch.Tensor  # (N,) bool: the true class among the top 5
    confidence: torch.Tensor  # (N,) the top-1 probability
    classes: int

    @classmethod
    def of(cls, probs: torch.Tensor, labels: torch.Tensor) -> Predictions:
        confidence, predicted = probs.max(dim=1)
        top = probs.topk(min(5, probs.shape[1]), dim=1).indices
        return cls(labels, predicted, (top == labels[:, None]).any(dim=1), confidence, probs.shape[1])


def _per_class_counts(values: torch.Tensor, weights: torch.Tensor, classes: int) -> torch.Tensor:
    """(rows, classes) sums of ``weights`` by class, for (rows, N) class indices ``values``."""
    rows = values.shape[0]
    offsets = values + classes * torch.arange(rows)[:, None]
    return torch.bincount(offsets.flatten(), weights.flatten().float(), minlength=rows * classes).view(rows, classes)


def _metrics(p: Predictions, index: torch.Tensor) -> dict[str, torch.Tensor]:
    """The headline metrics of each row of ``index`` (rows, N): a resample of the test images."""
    labels, predicted = p.labels[index], p.predicted[index]
    correct = (labels == predicted).float()
    support = _per_class_counts(labels, torch.ones_like(correct), p.classes)
    hits = _per_class_counts(labels, correct, p.classes)
    claimed = _per_class_counts(predicted, torch.ones_like(correct), p.classes)
    present = support > 0
    recall = torch.where(present, hits / support.clamp_min(1), torch.zeros(()))
    errors = support + claimed - 2 * hits  # false negatives + false positives
    # F1 is over the classes that have images or are predicted (scikit-learn's macro average): a
    # class predicted without images of its own has F1 0, one neither has no F1.
    scored = present | (claimed > 0)
    f1 = torch.where(scored, 2 * hits / (2 * hits + errors).clamp_min(1), torch.zeros(()))
    bins = (p.confidence[index] * CALIBRATION_BINS).long().clamp(max=CALIBRATION_BINS - 1)
    in_bin = _per_class_counts(bins, torch.ones_like(correct), CALIBRATION_BINS)
    gap = (
        _per_class_counts(bins, correct, CALIBRATION_BINS)
        - _per_class_counts(bins, p.confidence[index], CALIBRATION_BINS)
    ).abs()
    return {
        "acc": correct.mean(dim=1),
        "acc_top5": p.in_top5[index].float().mean(dim=1),
        "acc_macro": recall.sum(dim=1) / present.sum(dim=1),
        "f1_macro": f1.sum(dim=1) / scored.sum(dim=1),
        "ece": gap.sum(dim=1) / in_bin.sum(dim=1),
    }


def headline(
    probs: torch.Tensor, labels: torch.Tensor, resamples: int = RESAMPLES, seed: int = 0
) -> dict[str, Estimate]:
    """Top-1, top-5, mean per-class accuracy, macro-F1 and the expected calibration error (15
    bins, L1), each with the 95% interval of ``resamples`` bootstrap resamples of the test images
    (classes absent from a resample count in none of its means)."""
    p = Predictions.of(probs, labels)
    count = len(labels)
    point = _metrics(p, torch.arange(count)[None])
    generator = torch.Generator().manual_seed(seed)
    drawn = _metrics(p, torch.randint(count, (resamples, count), generator=generator))
    estimates = {}
    for name, values in drawn.items():
        low, high = torch.quantile(values.double(), torch.tensor([0.025, 0.975], dtype=torch.double)).tolist()
        estimates[name] = Estimate(float(point[name][0]), low, high)
    return estimates


def reliability(probs: torch.Tensor, labels: torch.Tensor) -> list[tuple[float, float, int]]:
    """(mean confidence, accuracy, images) of each non-empty confidence bin: the reliability
    diagram's points."""
    p = Predictions.of(probs, labels)
    bins = (p.confidence * CALIBRATION_BINS).long().clamp(max=CALIBRATION_BINS - 1)
    correct = (p.labels == p.predicted).float()
    points = []
    for b in range(CALIBRATION_BINS):
        members = bins == b
        if members.any():
            points.append((float(p.confidence[members].mean()), float(correct[members].mean()), int(members.sum())))
    return points


def most_confused_with(probs: torch.Tensor, labels: torch.Tensor, classes: int) -> list[tuple[int, int] | None]:
    """For each class, the class its images are most often taken for and how many (None: never wrong)."""
    predicted = probs.argmax(dim=1)
    wrong = predicted != labels
    counts = torch.zeros(classes, classes, dtype=torch.long)
    counts.index_put_(
        (labels[wrong], predicted[wrong]), torch.ones(int(wrong.sum()), dtype=torch.long), accumulate=True
    )
    best, target = counts.max(dim=1)
    return [(int(t), int(b)) if b > 0 else None for t, b in zip(target, best)]


def f1_per_class(probs: torch.Tensor, labels: torch.Tensor, classes: int) -> list[float | None]:
    """Each class's F1; None for a class with no images in the set and never predicted."""
    p = Predictions.of(probs, labels)
    row = torch.arange(len(labels))[None]
    correct = (p.labels == p.predicted).float()[None]
    support = _per_class_counts(p.labels[row], torch.ones_like(correct), classes)[0]
    hits = _per_class_counts(p.labels[row], correct, classes)[0]
    claimed = _per_class_counts(p.predicted[row], torch.ones_like(correct), classes)[0]
    f1 = (2 * hits / (support + claimed).clamp_min(1)).tolist()
    return [None if support[i] + claimed[i] == 0 else value for i, value in enumerate(f1)]


def label_doubts(probs: torch.Tensor, labels: torch.Tensor, count: int) -> list[int]:
    """Test images whose label the model contradicts with confidence, most contradicted first:
    confident learning's rule (Northcutt et al., 2021) on the test set. A class's threshold is the
    mean probability the model gives it on the images labelled with it; an image is a candidate
    when another class's probability reaches that class's threshold and is its top-1."""
    classes = probs.shape[1]
    own = probs.gather(1, labels[:, None]).squeeze(1)
    sums = torch.zeros(classes).index_add_(0, labels, own)
    support = torch.bincount(labels, minlength=classes).float()
    thresholds = torch.where(support > 0, sums / support.clamp_min(1), torch.ones(()))
    confidence, predicted = probs.max(dim=1)
    candidates = (predicted != labels) & (confidence >= thresholds[predicted])
    margin = torch.where(candidates, confidence - own, torch.full_like(own, -2.0))
    order = torch.sort(margin, descending=True, stable=True).indices
    return [int(i) for i in order[: int(candidates.sum())][:count]]


def class_counts(labels: Sequence[int], classes: int) -> list[int]:
    return torch.bincount(torch.as_tensor(list(labels), dtype=torch.long), minlength=classes).tolist()
