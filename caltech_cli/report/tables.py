"""The test report's numbers: per-class table, the worst images, the most confused pairs, PR
curves' data, written as CSV and JSON.

Every function takes class probabilities (N, C), true labels (N,) and class names, so the
same code serves the files on disk and what goes to W&B.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path

import torch
from torchmetrics.functional.classification import (
    binary_average_precision,
    multiclass_average_precision,
    multiclass_precision,
    multiclass_precision_recall_curve,
    multiclass_recall,
)

from caltech_cli.files import text_written, write_text
from caltech_cli.text import text_cell

# The option that names the report's folder, for messages about writing into it.
OPTION = "report.output"


def per_class(probs: torch.Tensor, labels: torch.Tensor, names: Sequence[str]) -> list[dict]:
    """Support, accuracy, precision, recall and average precision of each class; a class without
    images in the set has no accuracy, recall or average precision (None), not 0, and no precision
    either when nothing was predicted as it."""
    n = len(names)
    preds = probs.argmax(dim=1)
    precision = multiclass_precision(preds, labels, n, average=None)
    recall = multiclass_recall(preds, labels, n, average=None)
    ap = multiclass_average_precision(probs, labels, n, average=None)
    support = torch.bincount(labels, minlength=n)
    claimed = torch.bincount(preds, minlength=n)

    def present(value: torch.Tensor, i: int) -> float | None:
        return float(value[i]) if support[i] else None

    return [
        {
            "class": name,
            "support": int(support[i]),
            "accuracy": present(recall, i),  # per-class accuracy is the recall of that class
            "precision": float(precision[i]) if support[i] or claimed[i] else None,
            "recall": present(recall, i),
            "average_precision": present(ap, i),
        }
        for i, name in enumerate(names)
    ]


def write_per_class(rows: list[dict], path: Path) -> None:
    with text_written(path, OPTION) as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        for row in rows:
            writer.writerow(
                {
                    k: f"{v:.6f}"
                    if isinstance(v, float)
                    else text_cell(v)
                    if isinstance(v, str)
                    else ""
                    if v is None
                    else v
                    for k, v in row.items()
                }
            )


def write_metrics(metrics: dict[str, float], path: Path) -> None:
    write_text(path, json.dumps(metrics, indent=2, sort_keys=True) + "\n", OPTION)


# The provenance entry that says which images a test scored (``folders.files_key``).
TEST_IMAGES_KEY = "test images key"


def write_provenance(provenance: dict[str, str], path: Path) -> None:
    """Where a test's numbers come from, as the report's first table shows it, for programs
    (``caltech compare`` reads its ``TEST_IMAGES_KEY``)."""
    write_text(path, json.dumps(provenance, indent=2) + "\n", OPTION)


def most_confused(matrix: torch.Tensor, counts: torch.Tensor, names: Sequence[str], top: int) -> list[str]:
    """The largest off-diagonal rates of a row-normalized confusion matrix, as lines of text."""
    off = matrix.clone()
    off.fill_diagonal_(0)
    values, flat = off.flatten().topk(min(top, off.numel()))
    lines = []
    for value, index in zip(values.tolist(), flat.tolist()):
        if value <= 0:
            break
        true, pred = divmod(index, len(names))
        lines.append(f"{names[true]} → {names[pred]}: {value:.0%} ({int(counts[true, pred])})")
    return lines


def average_precision(probs: torch.Tensor, labels: torch.Tensor, average: str) -> float:
    """Micro (every class decision pooled, one-vs-rest) or macro (mean over classes) average precision."""
    if average == "micro":
        onehot = torch.nn.functional.one_hot(labels, probs.shape[1])
        return float(binary_average_precision(probs.flatten(), onehot.flatten()))
    return float(multiclass_average_precision(probs, labels, probs.shape[1], average=average))


def macro_curve(probs: torch.Tensor, labels: torch.Tensor, points: int = 101) -> tuple[torch.Tensor, torch.Tensor]:
    """Macro-average precision-recall curve: each class's interpolated precision (the best
    precision at any recall at least r) on a common recall grid, averaged over the classes."""
    grid = torch.linspace(0, 1, points)
    per_class = []
    for precision, recall in zip(*multiclass_precision_recall_curve(probs, labels, probs.shape[1])[:2]):
        reachable = recall[None, :] >= grid[:, None]  # (points, curve)
        per_class.append(torch.where(reachable, precision[None, :], torch.zeros(())).max(dim=1).values)
    return grid, torch.stack(per_class).mean(dim=0)


def losses(probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each item's cross-entropy: minus the log of the probability given to its true class."""
    truth = probs.gather(1, labels[:, None]).squeeze(1)
    return -truth.clamp_min(torch.finfo(probs.dtype).tiny).log()


def top_losses(probs: torch.Tensor, labels: torch.Tensor, count: int) -> list[int]:
    """The ``count`` items with the highest loss, highest first (fastai's ``top_losses``): the
    test images the model got most wrong, or was least sure of when it got them right."""
    order = torch.sort(losses(probs, labels), descending=True, stable=True).indices
    return order[:count].tolist()


# (true class, predicted class, the items so confused)
Pairs = list[tuple[int, int, list[int]]]


def confused_pairs(probs: torch.Tensor, labels: torch.Tensor, count: int) -> Pairs:
    """The ``count`` (true class, predicted class) pairs that occur most often among the mistakes
    (fastai's ``most_confused``), each with its items, highest loss first."""
    preds = probs.argmax(dim=1)
    by_pair: dict[tuple[int, int], list[int]] = {}
    for index in top_losses(probs, labels, len(labels)):
        true, pred = int(labels[index]), int(preds[index])
        if true != pred:
            by_pair.setdefault((true, pred), []).append(index)
    ranked = sorted(by_pair.items(), key=lambda item: (-len(item[1]), item[0]))
    return [(true, pred, items) for (true, pred), items in ranked[:count]]


def write_top_losses(
    files: Sequence[Path], probs: torch.Tensor, labels: torch.Tensor, names: Sequence[str], items: list[int], path: Path
) -> None:
    """The top-loss items as a table: rank, file, truth, prediction and their probabilities, loss."""
    item_losses = losses(probs, labels)
    with text_written(path, OPTION) as f:
        writer = csv.writer(f)
        writer.writerow(["rank", "path", "truth", "prediction", "probability", "probability_of_truth", "loss"])
        for rank, i in enumerate(items, 1):
            pred, true = int(probs[i].argmax()), int(labels[i])
            # Significant digits: a confident mistake's probability of the truth can be 1e-12.
            numbers = (probs[i, pred], probs[i, true], item_losses[i] + 0.0)  # + 0.0: no "-0" for a loss of 0
            cells = [text_cell(str(files[i])), text_cell(names[true]), text_cell(names[pred])]
            writer.writerow([rank, *cells, *(f"{float(x):.6g}" for x in numbers)])


def write_confused_pairs(
    files: Sequence[Path], labels: torch.Tensor, names: Sequence[str], pairs: Pairs, path: Path
) -> None:
    """The most confused pairs as a table: truth, prediction, how many, their share of the true
    class, and the files (highest loss first)."""
    support = torch.bincount(labels, minlength=len(names))
    with text_written(path, OPTION) as f:
        writer = csv.writer(f)
        writer.writerow(["truth", "prediction", "count", "share_of_truth", "paths"])
        for true, pred, items in pairs:
            writer.writerow(
                [
                    text_cell(names[true]),
                    text_cell(names[pred]),
                    len(items),
                    f"{len(items) / int(support[true]):.6f}",
                    text_cell(";".join(str(files[i]) for i in items)),
                ]
            )
