"""What a run is scored by: top-1 beside mean per-class accuracy (Caltech-101 is imbalanced, and
papers report the latter), and the class weights that make every class count in the loss."""

from __future__ import annotations

from typing import Any

import torch
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy

# The label of an image left out because it could not be read (``data.skip_bad_images``): PyTorch's
# ``ignore_index``, which cross-entropy ignores by default and every metric here is told to.
LEFT_OUT = -100


class MeanPerClassAccuracy(MulticlassAccuracy):
    """The mean of per-class accuracies over the classes that have images in the set scored.

    torchmetrics' macro average counts a class without images as accuracy 0 as soon as some image
    is predicted as it (a class missing from a small test split, or whose every image was left
    out), which is not the accuracy of any image there."""

    def __init__(self, num_classes: int, **kwargs: Any) -> None:
        super().__init__(num_classes=num_classes, average="none", ignore_index=LEFT_OUT, **kwargs)

    def compute(self) -> torch.Tensor:
        tp, _, _, fn = self._final_state()
        support = tp + fn
        present = support > 0
        if not present.any():
            return torch.tensor(float("nan"))
        return (tp[present].float() / support[present]).mean()


def stage_metrics(num_classes: int) -> dict[str, MetricCollection]:
    """The metrics of each stage, logged as ``<stage>/<name>``: train ``acc``; val ``acc`` and
    ``acc_macro``; test ``acc``, ``acc_top5`` and ``acc_macro`` (over the classes with images in
    the set); images labelled ``LEFT_OUT`` count in none."""

    def accuracy(**kwargs: object) -> MulticlassAccuracy:
        return MulticlassAccuracy(num_classes=num_classes, ignore_index=LEFT_OUT, **kwargs)

    return {
        "train": MetricCollection({"acc": accuracy(average="micro")}, prefix="train/"),
        "val": MetricCollection(
            {"acc": accuracy(average="micro"), "acc_macro": MeanPerClassAccuracy(num_classes)}, prefix="val/"
        ),
        "test": MetricCollection(
            {
                "acc": accuracy(average="micro"),
                "acc_top5": accuracy(average="micro", top_k=min(5, num_classes)),
                "acc_macro": MeanPerClassAccuracy(num_classes),
            },
            prefix="test/",
        ),
    }


def inverse_frequency(counts: torch.Tensor, power: float) -> torch.Tensor:
    """Per-class loss weights ``(images / (classes * count)) ** power``: 1 for every class of a
    balanced set; a class without training images gets weight 0 (it has no loss to weigh)."""
    counts = counts.float()
    weights = (counts.sum() / (len(counts) * counts.clamp(min=1))) ** power
    return torch.where(counts > 0, weights, torch.zeros_like(weights))
