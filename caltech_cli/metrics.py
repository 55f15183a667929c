"""What a run is scored by: top-1 beside mean per-class accuracy (Caltech-101 is imbalanced, and
papers report the latter), and the class weights that make every class count in the loss."""

from __future__ import annotations

import torch
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy

# The label of an image left out because it could not be read (``data.skip_bad_images``): PyTorch's
# ``ignore_index``, which cross-entropy ignores by default and every metric here is told to.
LEFT_OUT = -100


def stage_metrics(num_classes: int) -> dict[str, MetricCollection]:
    """The metrics of each stage, logged as ``<stage>/<name>``: train ``acc``; val ``acc`` and
    ``acc_macro``; test ``acc``, ``acc_top5`` and ``acc_macro``; images labelled ``LEFT_OUT``
    count in none."""

    def accuracy(**kwargs: object) -> MulticlassAccuracy:
        return MulticlassAccuracy(num_classes=num_classes, ignore_index=LEFT_OUT, **kwargs)

    return {
        "train": MetricCollection({"acc": accuracy(average="micro")}, prefix="train/"),
        "val": MetricCollection(
            {"acc": accuracy(average="micro"), "acc_macro": accuracy(average="macro")}, prefix="val/"
        ),
        "test": MetricCollection(
            {
                "acc": accuracy(average="micro"),
                "acc_top5": accuracy(average="micro", top_k=min(5, num_classes)),
                "acc_macro": accuracy(average="macro"),
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
