"""The report of a ``test`` run: its numbers (``tables``) and its pictures (``pictures``), written
into one folder by :func:`write_test_report`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from caltech_cli.report import pictures, tables


def fixed_sample(size: int, count: int, seed: int) -> list[int]:
    """The same ``count`` indices of ``size`` items on every call, so epochs and runs compare."""
    generator = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(size, generator=generator)[:count].tolist())


@dataclass
class WrittenReport:
    """What :func:`write_test_report` wrote: its pictures, and the top-loss items it shows."""

    pictures: list[Path] = field(default_factory=list)
    worst: list[int] = field(default_factory=list)


def write_test_report(
    folder: Path,
    probs: torch.Tensor,
    labels: torch.Tensor,
    names: Sequence[str],
    metrics: dict[str, float],
    files: Sequence[Path] | None,
    samples: int = 24,
    seed: int = 0,
    top_losses: int = 18,
    confused_pairs: int = 8,
    confused_examples: int = 5,
) -> WrittenReport:
    """Write ``metrics.json``, ``per_class.csv``, the confusion matrix and PR curves; and, where the
    test images' ``files`` are known (one per label), the prediction grid, the top losses and the
    most confused pairs with example images."""
    tables.write_metrics(metrics, folder / "metrics.json")
    rows = tables.per_class(probs, labels, names)
    tables.write_per_class(rows, folder / "per_class.csv")
    written = WrittenReport([folder / "confusion_matrix.png", folder / "pr_curves.png"])
    pictures.draw_confusion_matrix(probs, labels, names, written.pictures[0])
    pictures.draw_pr_curves(probs, labels, names, written.pictures[1], rows)
    if files is None or len(files) != len(labels):
        return written
    chosen = fixed_sample(len(files), samples, seed)
    written.pictures.append(folder / "predictions.png")
    pictures.draw_prediction_grid(
        [files[i] for i in chosen], probs[chosen], labels[chosen], names, written.pictures[-1]
    )
    written.worst = tables.top_losses(probs, labels, top_losses)
    tables.write_top_losses(files, probs, labels, names, written.worst, folder / "top_losses.csv")
    written.pictures.append(folder / "top_losses.png")
    pictures.draw_top_losses(files, probs, labels, names, written.worst, written.pictures[-1])
    pairs = tables.confused_pairs(probs, labels, confused_pairs)
    tables.write_confused_pairs(files, labels, names, pairs, folder / "most_confused.csv")
    written.pictures.append(folder / "most_confused.png")
    pictures.draw_confused_pairs(files, probs, labels, names, pairs, written.pictures[-1], confused_examples)
    return written
