"""Choose the linear head's training on the validation split, from the feature cache.

With a frozen backbone the head trains on cached features, so each setting of its training
(class weights, weight decay, label smoothing, epochs, batch size) costs seconds. This trains a
head like ``caltech fit`` does (a Linear layer, AdamW, a cosine schedule stepped per epoch, the
checkpoint of the best validation epoch) for each setting of a grid and prints val top-1 and
mean per-class accuracy at the chosen epoch, best first; with test-time augmentation the
validation split's mirror-image view is averaged in as ``validate``/``test`` average it.
Test numbers are printed beside, never used to choose.

    caltech fit --config configs/transfer.yaml --data.source <archive>   # fills the cache
    python benchmarks/head_sweep.py data/feature-cache
"""

from __future__ import annotations

import argparse
import itertools
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from common import REPO  # noqa: F401  (puts the repository on sys.path)
from torchmetrics.functional.classification import multiclass_accuracy

from caltech_cli.metrics import inverse_frequency


def load(folder: Path, name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The one cached file of split ``name`` in ``folder`` (features (views, N, W), labels)."""
    found = sorted(folder.glob(f"{name}-*.pt"))
    if len(found) > 1:
        raise SystemExit(f"{folder} holds {len(found)} caches of {name}; give a folder with one of each")
    if not found:
        return None
    stored = torch.load(found[0], map_location="cpu", weights_only=True)
    return stored["features"], stored["labels"]


def scores(head: torch.nn.Linear, views: list[torch.Tensor], labels: torch.Tensor, classes: int) -> tuple[float, float]:
    """Top-1 and mean per-class accuracy of the probabilities averaged over the views."""
    with torch.no_grad():
        probs = torch.stack([head(v).softmax(dim=1) for v in views]).mean(0)
    return (
        float(multiclass_accuracy(probs, labels, classes, average="micro")),
        float(multiclass_accuracy(probs, labels, classes, average="macro")),
    )


def train(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    evals: dict[str, tuple[list[torch.Tensor], torch.Tensor]],
    classes: int,
    epochs: int,
    lr: float,
    weight_decay: float,
    smoothing: float,
    power: float,
    batch: int,
    monitor: str,
    seed: int = 42,
) -> dict[str, float]:
    torch.manual_seed(seed)
    head = torch.nn.Linear(train_x.shape[1], classes)
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    weights = inverse_frequency(torch.bincount(train_y, minlength=classes), power) if power else None
    best: dict[str, float] = {}
    for epoch in range(epochs):
        for index in torch.randperm(len(train_y)).split(batch):
            loss = F.cross_entropy(head(train_x[index]), train_y[index], weight=weights, label_smoothing=smoothing)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        schedule.step()
        result = {"epoch": epoch + 1}
        for name, (views, labels) in evals.items():
            result[f"{name}/acc"], result[f"{name}/acc_macro"] = scores(head, views, labels, classes)
        if not best or result[monitor] > best[monitor]:
            best = result
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("cache", type=Path, help="the feature-cache folder of one backbone")
    parser.add_argument("--epochs", type=int, nargs="+", default=[30])
    parser.add_argument("--lr", type=float, nargs="+", default=[1e-3])
    parser.add_argument("--weight-decay", type=float, nargs="+", default=[0.01])
    parser.add_argument("--label-smoothing", type=float, nargs="+", default=[0.0])
    parser.add_argument(
        "--class-weights",
        type=float,
        nargs="+",
        default=[0.0, 0.5, 1.0],
        help="powers of inverse frequency: 0 none, 0.5 sqrt_inverse, 1 inverse",
    )
    parser.add_argument("--batch-size", type=int, nargs="+", default=[64])
    parser.add_argument("--monitor", default="val/acc", choices=["val/acc", "val/acc_macro"])
    parser.add_argument("--tta", action="store_true", help="average val (and test) over the mirror view too")
    parser.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=[42],
        help="train each setting once per seed and print the mean (val has 1000 images: "
        "one image is 0.1 point of val/acc)",
    )
    options = parser.parse_args()
    torch.set_num_threads(1)
    train_x, train_y = load(options.cache, "train")
    train_x = train_x[0]
    classes = int(train_y.max()) + 1
    evals = {}
    for name in ("val", "test"):
        found = load(options.cache, name)
        if found is None:
            continue
        views = [found[0][0]]
        flipped = load(options.cache, f"{name}_flip") if options.tta else None
        if options.tta and flipped is None:
            raise SystemExit(
                f"--tta: {options.cache} holds no {name}_flip cache (run `caltech validate/test` "
                "with --data.tta_flip true once)"
            )
        views += [flipped[0][0]] if flipped is not None else []
        evals[name] = (views, found[1])
    rows = []
    grid = itertools.product(
        options.epochs,
        options.lr,
        options.weight_decay,
        options.label_smoothing,
        options.class_weights,
        options.batch_size,
    )
    for epochs, lr, wd, smoothing, power, batch in grid:
        start = time.perf_counter()
        runs = [
            train(train_x, train_y, evals, classes, epochs, lr, wd, smoothing, power, batch, options.monitor, seed)
            for seed in options.seeds
        ]
        best = {key: sum(run[key] for run in runs) / len(runs) for key in runs[0]}
        seconds = time.perf_counter() - start
        rows.append((best, f"epochs={epochs} lr={lr:g} wd={wd:g} ls={smoothing:g} cw={power:g} bs={batch}", seconds))
        print(
            f"{rows[-1][1]:<60} "
            + " ".join(f"{k}={v:.4f}" for k, v in best.items() if k != "epoch")
            + f" epoch={best['epoch']:.1f} {seconds:.1f}s",
            flush=True,
        )
    print(f"\nBest first by {options.monitor} (ties: val/acc_macro):")
    rows.sort(key=lambda r: (r[0][options.monitor], r[0]["val/acc_macro"]), reverse=True)
    for best, setting, _ in rows[:10]:
        print(f"{setting:<60} " + " ".join(f"{k}={v:.4f}" for k, v in best.items() if k != "epoch"))


if __name__ == "__main__":
    main()
