"""What the head's epochs over cached features cost, and how much of it is fetching the batches.

Once the features are cached, a transfer fit is the head's epochs: a linear layer over a few
thousand stored feature vectors. Fetching them item by item (a random view per item, then
stacking) used to cost more than the head's steps. Measured side by side in one run, on random
features of the size of Caltech-101's train split (MobileNetV2's width):

  (a) a loader that fetches and stacks item by item (what DataLoader does by default);
  (b) the loader ``caltech`` uses: ``CachedFeatures.__getitems__`` takes each batch in one go;
  (c) a plain PyTorch loop over (b)'s batches: forward, cross-entropy, backward, SGD step;
  (d) Lightning epochs of the same head with (a)'s loader, and (e) with (b)'s, logging the loss
      the usual way (``self.log`` every step, averaged over the epoch);
  (f) Lightning epochs of ``caltech``'s own model (``TransferClassifier``, its metrics, its
      logging once per epoch) over (b)'s loader, with the same SGD.

    python benchmarks/head_epochs.py                    # CPU
    python benchmarks/head_epochs.py --accelerator gpu
"""

from __future__ import annotations

import argparse
import time

import pytorch_lightning as pl
import torch
from common import add_device_options, device_of, synchronize
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset

from caltech_cli.features import CachedFeatures, keep_batch
from caltech_cli.model import TransferClassifier


class ItemByItem(Dataset):
    """The cached features without ``__getitems__``: the loader fetches each item and stacks them."""

    def __init__(self, cached: CachedFeatures) -> None:
        self.cached = cached

    def __len__(self) -> int:
        return len(self.cached)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.cached[index]


class Head(pl.LightningModule):
    def __init__(self, width: int, classes: int) -> None:
        super().__init__()
        self.head = nn.Linear(width, classes)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        features, labels = batch
        loss = F.cross_entropy(self.head(features), labels)
        self.log("loss", loss, on_step=False, on_epoch=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)


class CaltechHead(TransferClassifier):
    """``caltech``'s model as a transfer fit trains it over cached features, with (c)'s optimizer."""

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.head.parameters(), lr=0.01, momentum=0.9)


def epochs_per_s(loader: DataLoader, epochs: int, step=None, device: torch.device | None = None) -> float:
    start = time.perf_counter()
    for _ in range(epochs):
        for features, labels in loader:
            if step is not None:
                step(features.to(device, non_blocking=True), labels.to(device, non_blocking=True))
    if device is not None:
        synchronize(device)
    return epochs / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=6400, help="training images (Caltech-101's train split: ~6,400)")
    parser.add_argument("--views", type=int, default=1, help="cached views per image (data.cache_views)")
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--classes", type=int, default=102)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=10)
    add_device_options(parser)
    args = parser.parse_args()
    device = device_of(args.accelerator)
    torch.manual_seed(0)
    cached = CachedFeatures(
        torch.randn(args.views, args.images, args.width), torch.randint(args.classes, (args.images,))
    )
    pin = device.type == "cuda"
    items = DataLoader(ItemByItem(cached), batch_size=args.batch, shuffle=True, pin_memory=pin)
    batches = DataLoader(cached, batch_size=args.batch, shuffle=True, pin_memory=pin, collate_fn=keep_batch)
    head = nn.Linear(args.width, args.classes).to(device)
    optimizer = torch.optim.SGD(head.parameters(), lr=0.01, momentum=0.9)

    def step(features: torch.Tensor, labels: torch.Tensor) -> None:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(head(features), labels).backward()
        optimizer.step()

    def lightning(loader: DataLoader, module: pl.LightningModule) -> float:
        trainer = pl.Trainer(
            max_epochs=args.epochs,
            accelerator=args.accelerator,
            devices=1,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        start = time.perf_counter()
        trainer.fit(module, loader)
        return args.epochs / (time.perf_counter() - start)

    epochs_per_s(batches, 1, step, device)  # warm-up: allocator, kernels
    a = epochs_per_s(items, args.epochs)
    b = epochs_per_s(batches, args.epochs)
    c = epochs_per_s(batches, args.epochs, step, device)
    d = lightning(items, Head(args.width, args.classes))
    e = lightning(batches, Head(args.width, args.classes))
    caltech_head = CaltechHead(backbone="mobilenet_v2", weights=None, class_names=[str(i) for i in range(args.classes)])
    assert caltech_head.num_features == args.width, "(f) is MobileNetV2's head: pass --width 1280"
    f = lightning(batches, caltech_head)
    print(
        f"{args.images} features x {args.views} views, width {args.width}, batch {args.batch}, {args.epochs} epochs, "
        f"{device}; epochs/s (images/s)"
    )
    for name, rate in [
        ("(a) fetch item by item", a),
        ("(b) fetch whole batches", b),
        ("(c) plain head loop", c),
        ("(d) Lightning, item by item", d),
        ("(e) Lightning, whole batches", e),
        ("(f) caltech's model", f),
    ]:
        print(f"{name:32} {rate:8.2f}  ({rate * args.images:9.0f})")
    print(
        f"ratios: fetch b/a {b / a:.1f}x   Lightning e/d {e / d:.2f}x   e vs plain loop c {e / c:.2f}   "
        f"caltech's model f vs e {f / e:.2f}x, vs plain loop c {f / c:.2f}"
    )


if __name__ == "__main__":
    main()
