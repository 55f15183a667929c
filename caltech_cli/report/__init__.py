"""The report of a ``test`` run: its numbers (``tables``, ``stats``), its pictures (``pictures``)
and the page that holds them all (``page``, ``index.html``), written into one folder by
:func:`write_test_report`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from caltech_cli.files import write_text
from caltech_cli.report import page, pictures, stats, tables
from caltech_cli.report.pictures import mistake_caption
from caltech_cli.text import shown


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
    provenance: dict[str, str] | None = None,
) -> WrittenReport:
    """Write ``metrics.json``, ``provenance.json``, ``per_class.csv``, the confusion matrix, PR curves and reliability
    diagram; where the test images' ``files`` are known (one per label), the prediction grid, the
    top losses and the most confused pairs with example images; and ``index.html``, all of it on
    one page with the bootstrap intervals, the per-class table and the labels the model doubts."""
    tables.write_metrics(metrics, folder / "metrics.json")
    if provenance:
        tables.write_provenance(provenance, folder / "provenance.json")
    rows = tables.per_class(probs, labels, names)
    tables.write_per_class(rows, folder / "per_class.csv")
    written = WrittenReport([folder / "confusion_matrix.png", folder / "pr_curves.png", folder / "reliability.png"])
    # Drawn with their control characters escaped: matplotlib prints a glyph it lacks in a warning.
    drawn = [shown(name) for name in names]
    pictures.draw_confusion_matrix(probs, labels, drawn, written.pictures[0])
    pictures.draw_pr_curves(probs, labels, drawn, written.pictures[1], rows)
    estimates = stats.headline(probs, labels, seed=seed)
    pictures.draw_reliability(stats.reliability(probs, labels), estimates["ece"].value, written.pictures[2])
    known = files is not None and len(files) == len(labels)
    pairs = tables.confused_pairs(probs, labels, confused_pairs)
    if known:
        chosen = fixed_sample(len(files), samples, seed)
        written.pictures.append(folder / "predictions.png")
        pictures.draw_prediction_grid(
            [files[i] for i in chosen], probs[chosen], labels[chosen], drawn, written.pictures[-1]
        )
        written.worst = tables.top_losses(probs, labels, top_losses)
        tables.write_top_losses(files, probs, labels, names, written.worst, folder / "top_losses.csv")
        written.pictures.append(folder / "top_losses.png")
        pictures.draw_top_losses(files, probs, labels, drawn, written.worst, written.pictures[-1])
        tables.write_confused_pairs(files, labels, names, pairs, folder / "most_confused.csv")
        written.pictures.append(folder / "most_confused.png")
        pictures.draw_confused_pairs(files, probs, labels, drawn, pairs, written.pictures[-1], confused_examples)
    write_text(
        folder / "index.html",
        _page(
            probs,
            labels,
            names,
            files if known else None,
            rows,
            estimates,
            pairs,
            written,
            provenance or {},
            confused_examples,
        ),  # fmt: skip
        tables.OPTION,
    )
    return written


def _page(
    probs: torch.Tensor,
    labels: torch.Tensor,
    names: Sequence[str],
    files: Sequence[Path] | None,
    rows: list[dict],
    estimates: dict[str, stats.Estimate],
    pairs: tables.Pairs,
    written: WrittenReport,
    provenance: dict[str, str],
    examples: int,
) -> str:
    confused = stats.most_confused_with(probs, labels, len(names))
    f1 = stats.f1_per_class(probs, labels, len(names))
    table_rows = [
        {
            **row,
            "f1": f1[i],
            "confused_with": "" if confused[i] is None else f"{names[confused[i][0]]} ({confused[i][1]})",
        }
        for i, row in enumerate(rows)
    ]

    def thumbs(items: Sequence[int]) -> list[tuple[Path, str, bool]]:
        if files is None:
            return []
        captions = [mistake_caption(probs[i], int(labels[i]), names) for i in items]
        return [(files[i], c, int(probs[i].argmax()) != int(labels[i])) for i, c in zip(items, captions)]

    return page.test_report_page(
        provenance,
        estimates,
        table_rows,
        [(names[t], names[p], len(items), rows[t]["support"], thumbs(items[:examples])) for t, p, items in pairs],
        thumbs(written.worst),
        thumbs(stats.label_doubts(probs, labels, 12)),
        {"Precision and recall": written.pictures[1], "Calibration": written.pictures[2]},
    )
