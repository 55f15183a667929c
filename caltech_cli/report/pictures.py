"""The test report's pictures, drawn with matplotlib into files (never on a display)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: never needs a display

import matplotlib.pyplot as plt
import torch
from PIL import Image, ImageOps
from torchmetrics.functional.classification import (
    multiclass_confusion_matrix,
    multiclass_precision_recall_curve,
)

from caltech_cli.files import written_whole
from caltech_cli.images import load_rgb
from caltech_cli.report.tables import OPTION, Pairs, average_precision, losses, macro_curve, most_confused

# Class and file names are text: a "$" in one must not start matplotlib's math mode (which fails on
# some and renders others as formulas).
matplotlib.rcParams["text.parse_math"] = False
WRONG = "#c62828"
RIGHT = "#2e7d32"


def save(fig: plt.Figure, path: Path, dpi: int, option: str = OPTION) -> None:
    """Write the figure to ``path`` as a PNG, whole (aside, then renamed), and close it."""
    try:
        with written_whole(path, option) as scratch:
            fig.savefig(scratch, dpi=dpi, format="png")
    finally:
        plt.close(fig)


def draw_confusion_matrix(probs: torch.Tensor, labels: torch.Tensor, names: Sequence[str], path: Path) -> None:
    """Row-normalized confusion matrix (rows: true class), labelled, with the most confused pairs listed."""
    n = len(names)
    preds = probs.argmax(dim=1)
    counts = multiclass_confusion_matrix(preds, labels, n)
    rates = multiclass_confusion_matrix(preds, labels, n, normalize="true")
    side = max(6.0, 0.16 * n + 3)
    font = max(4.0, min(9.0, 220 / max(n, 1)))  # 9 pt up to ~25 classes, 4 pt at 102 (zoomable at 110 dpi)
    fig, (ax, text) = plt.subplots(1, 2, figsize=(side + 4, side), width_ratios=[side, 4])
    image = ax.imshow(rates.numpy(), cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
    ax.set_xticks(range(n), names, rotation=90, fontsize=font)
    ax.set_yticks(range(n), names, fontsize=font)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(f"Confusion matrix (share of each true class), accuracy {float((preds == labels).float().mean()):.1%}")
    if n <= 20:
        for i in range(n):
            for j in range(n):
                if counts[i, j]:
                    ax.text(
                        j,
                        i,
                        int(counts[i, j]),
                        ha="center",
                        va="center",
                        fontsize=8,
                        color="white" if rates[i, j] > 0.5 else "black",
                    )
    fig.colorbar(image, ax=ax, fraction=0.03, pad=0.01)
    text.axis("off")
    pairs = most_confused(rates, counts, names, top=25)
    text.text(
        0,
        1,
        "Most confused (true → predicted)\n\n" + ("\n".join(pairs) or "none"),
        va="top",
        ha="left",
        fontsize=9,
        family="monospace",
        transform=text.transAxes,
    )
    fig.tight_layout()
    save(fig, path, 110)


def draw_pr_curves(
    probs: torch.Tensor, labels: torch.Tensor, names: Sequence[str], path: Path, rows: list[dict], worst: int = 6
) -> None:
    """Micro- and macro-average precision-recall curves, and the classes with the lowest AP."""
    n = len(names)
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5.5))
    precision, recall, _ = multiclass_precision_recall_curve(probs, labels, n, average="micro")
    left.plot(
        recall.numpy(), precision.numpy(), label=f"micro average (AP {average_precision(probs, labels, 'micro'):.3f})"
    )
    grid, mean_precision = macro_curve(probs, labels)
    left.plot(
        grid.numpy(),
        mean_precision.numpy(),
        "--",
        label=f"macro average (AP {average_precision(probs, labels, 'macro'):.3f})",
    )
    left.set_title("All classes")
    scored = [i for i in range(n) if rows[i]["average_precision"] is not None]
    weakest = sorted(scored, key=lambda i: rows[i]["average_precision"])[:worst]
    precision, recall, _ = multiclass_precision_recall_curve(probs, labels, n)
    for i in weakest:
        right.plot(
            recall[i].numpy(),
            precision[i].numpy(),
            label=f"{names[i]} (AP {rows[i]['average_precision']:.3f}, n={rows[i]['support']})",
        )
    right.set_title(f"The {len(weakest)} classes with the lowest average precision")
    for ax in (left, right):
        unit_axes(ax, "recall", "precision", "lower left")
    fig.suptitle("Precision-recall on the test set")
    fig.tight_layout()
    save(fig, path, 110)


def unit_axes(ax: plt.Axes, xlabel: str, ylabel: str, legend: str) -> None:
    """Axes of two rates in [0, 1], labelled, gridded, with their legend."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_xlim(0, 1.01)
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(loc=legend, fontsize=8)


def draw_reliability(points: Sequence[tuple[float, float, int]], ece: float, path: Path) -> None:
    """The reliability diagram: accuracy against confidence per confidence bin (``stats.reliability``);
    a calibrated model lies on the diagonal."""
    fig, ax = plt.subplots(figsize=(5.5, 5))
    ax.plot([0, 1], [0, 1], ":", color="grey", label="calibrated")
    if points:
        confidence, accuracy, counts = zip(*points)
        ax.plot(confidence, accuracy, "o-", color=RIGHT, label="test images")
        for x, y, n in points:
            ax.annotate(str(n), (x, y), textcoords="offset points", xytext=(4, -10), fontsize=7, color="grey")
    unit_axes(ax, "confidence (top-1 probability)", "accuracy", "upper left")
    ax.set_title(f"Reliability (expected calibration error {ece:.3f}); numbers: images per bin", fontsize=9)
    fig.tight_layout()
    save(fig, path, 110)


def draw_prediction_grid(
    files: Sequence[Path], probs: torch.Tensor, labels: torch.Tensor, names: Sequence[str], path: Path, columns: int = 6
) -> None:
    """Test images with predicted and true labels; wrong predictions framed and titled in red."""
    count = len(files)
    rows = max(1, -(-count // columns))
    fig, axes = plt.subplots(rows, columns, figsize=(columns * 2.4, rows * 2.7), squeeze=False)
    confidence, preds = probs.max(dim=1)
    for ax in axes.flat:
        ax.axis("off")
    for ax, file, pred, p, true in zip(axes.flat, files, preds.tolist(), confidence.tolist(), labels.tolist()):
        image = load_rgb(file, min_size=256)
        image.thumbnail((256, 256), Image.Resampling.BILINEAR)
        ok = pred == true
        title = f"{names[pred]} ({p:.0%})" + ("" if ok else f"\ntrue: {names[true]}")
        _framed(ax, image, title, RIGHT if ok else WRONG)
    wrong = int((preds != labels).sum())
    fig.suptitle(f"Test predictions: {count - wrong} right, {wrong} wrong (red)")
    fig.tight_layout()
    save(fig, path, 100)


def thumbnail(path: Path, size: int, square: bool = False) -> Image.Image:
    """An image file as upright RGB, at most ``size`` pixels on its longer side; with ``square``
    padded with white to ``size`` x ``size`` (W&B shows a list of images right only when they
    are all the same size)."""
    image = load_rgb(path, min_size=size)
    if square:
        return ImageOps.pad(image, (size, size), Image.Resampling.BILINEAR, color="white")
    image.thumbnail((size, size), Image.Resampling.BILINEAR)
    return image


def mistake_caption(probs: torch.Tensor, label: int, names: Sequence[str]) -> str:
    """``prediction (probability) / truth (its probability) / loss`` of one item."""
    pred = int(probs.argmax())
    loss = float(losses(probs[None], torch.tensor([label]))[0])
    truth = f"true: {names[label]} ({float(probs[label]):.0%})"
    return f"{names[pred]} ({float(probs[pred]):.0%})\n{truth}\nloss {loss:.2f}"


def _framed(ax: plt.Axes, image: Image.Image, title: str, colour: str) -> None:
    ax.imshow(image)
    ax.set_title(title, fontsize=8, color=colour)
    ax.axis("on")
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_edgecolor(colour)
        spine.set_linewidth(3 if colour == WRONG else 1)


def draw_top_losses(
    files: Sequence[Path],
    probs: torch.Tensor,
    labels: torch.Tensor,
    names: Sequence[str],
    items: list[int],
    path: Path,
    columns: int = 6,
) -> None:
    """The top-loss test images, highest first, titled with prediction, truth, probabilities and loss."""
    columns = max(1, min(columns, len(items)))
    rows = max(1, -(-len(items) // columns))
    fig, axes = plt.subplots(rows, columns, figsize=(columns * 2.4, rows * 3.0), squeeze=False, layout="constrained")
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, items):
        colour = WRONG if int(probs[i].argmax()) != int(labels[i]) else RIGHT
        _framed(ax, thumbnail(files[i], 256), mistake_caption(probs[i], int(labels[i]), names), colour)
    wrong = int((probs.argmax(dim=1) != labels).sum())
    fig.suptitle(
        f"The {len(items)} test images with the highest loss, highest first "
        f"({wrong} of {len(labels)} test images are wrong): prediction, truth, loss"
    )
    save(fig, path, 100)


def draw_confused_pairs(
    files: Sequence[Path],
    probs: torch.Tensor,
    labels: torch.Tensor,
    names: Sequence[str],
    pairs: Pairs,
    path: Path,
    examples: int = 5,
) -> None:
    """One row per confused pair (most frequent first): the pair and its count, then examples."""
    support = torch.bincount(labels, minlength=len(names))
    rows = max(1, len(pairs))
    fig, axes = plt.subplots(
        rows, examples + 1, figsize=((examples + 1) * 2.4, rows * 2.6 + 0.6), squeeze=False, layout="constrained"
    )
    for ax in axes.flat:
        ax.axis("off")
    if not pairs:
        axes[0, 0].text(0, 0.5, "No mistakes on the test set.", fontsize=12, va="center")
    for row, (true, pred, items) in zip(axes, pairs):
        row[0].text(
            0,
            0.5,
            f"true: {names[true]}\npredicted: {names[pred]}\n{len(items)} of the {int(support[true])} "
            f"{names[true]}\nimages ({len(items) / int(support[true]):.0%})",
            fontsize=10,
            va="center",
            ha="left",
        )
        for ax, i in zip(row[1:], items[:examples]):
            _framed(ax, thumbnail(files[i], 256), f"{names[pred]} ({float(probs[i, pred]):.0%})", WRONG)
    fig.suptitle("Most confused classes (true → predicted), most frequent first, examples with the highest loss")
    save(fig, path, 100)
