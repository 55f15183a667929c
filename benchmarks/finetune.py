"""Fine-tuning epochs against a plain PyTorch training loop with the same decoding, side by side.

  (d) decode only: the training loader alone (random resized crop + flip, the config's batch
      size, the data module's workers, pinned memory on a GPU), no model;
  (a) plain: the same loader feeding MobileNetV2 + a linear head, all of it trained (AdamW,
      cross-entropy, channels-last, bf16 autocast on a GPU); fresh loader workers each epoch, as
      ``caltech fit`` starts them (for exact resume);
  (b) ``caltech fit --config configs/finetune.yaml``: its epochs after ``unfreeze_at_epoch``
      train the whole network; their training throughput comes from history.csv
      (``train/images_per_s``: the epoch's training batches, loading included);
  (c) plain partial: MobileNetV2's last ``train_blocks`` blocks and a linear head trained on
      their input, computed once for the training images and held in memory (a tensor), batches
      drawn from it as ``configs/partial.yaml`` draws its views;
  (e) ``caltech fit --config configs/partial.yaml``: its unfrozen epochs, from history.csv.

Prints images/s of each and the ratios b/a and e/c of the unfrozen epochs (the last epoch of
each, where the page cache is warm).

    python benchmarks/finetune.py --source /tmp/caltech34 --accelerator gpu
    python benchmarks/finetune.py --source ../shared/data/caltech101/101_ObjectCategories.tar.gz \\
        --classes airplanes Motorbikes Faces_easy    # on a CPU: small, it trains the whole network
"""

from __future__ import annotations

import argparse
import csv
import os
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from common import REPO, add_device_options, autocast, caltech, device_of, fit_options, precision_of, synchronize

from caltech_cli.blocks import backbone_blocks, cut_backbone
from caltech_cli.data import Caltech101DataModule
from caltech_cli.model import TransferClassifier

CONFIG = REPO / "configs" / "finetune.yaml"
SETTINGS = yaml.safe_load(CONFIG.read_text())
BATCH_SIZE = SETTINGS["data"]["init_args"]["batch_size"]
UNFREEZE_AT = SETTINGS["trainer"]["callbacks"][0]["init_args"]["unfreeze_at_epoch"]
PARTIAL = REPO / "configs" / "partial.yaml"
PARTIAL_SETTINGS = yaml.safe_load(PARTIAL.read_text())
PARTIAL_UNFREEZE_AT = PARTIAL_SETTINGS["trainer"]["callbacks"][0]["init_args"]["unfreeze_at_epoch"]
TRAIN_BLOCKS = PARTIAL_SETTINGS["trainer"]["callbacks"][0]["init_args"]["train_blocks"]
PARTIAL_BATCH = PARTIAL_SETTINGS["data"]["init_args"]["batch_size"]


def loader(data: Caltech101DataModule, device: torch.device) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(
        data.train_set,
        batch_size=BATCH_SIZE,
        shuffle=True,
        num_workers=data.num_workers,
        pin_memory=device.type == "cuda",
    )


def decode_only(data: Caltech101DataModule, device: torch.device, epochs: int) -> list[float]:
    rates = []
    for _ in range(epochs):
        start, images = time.perf_counter(), 0
        for batch, _ in loader(data, device):
            batch.to(device, non_blocking=True)
            images += len(batch)
        synchronize(device)
        rates.append(images / (time.perf_counter() - start))
    return rates


def plain_training(data: Caltech101DataModule, device: torch.device, precision: str, epochs: int) -> list[float]:
    model = TransferClassifier(freeze_backbone=False, class_names=data.class_names).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    rates = []
    for _ in range(epochs):
        start, images = time.perf_counter(), 0
        for batch, labels in loader(data, device):
            batch, labels = batch.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            with autocast(device, precision):
                loss = F.cross_entropy(model(batch), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            images += len(batch)
        synchronize(device)
        rates.append(images / (time.perf_counter() - start))
    return rates


def plain_partial(data: Caltech101DataModule, device: torch.device, precision: str, epochs: int) -> list[float]:
    """The top blocks and a head trained on their input for the training images (one augmented
    view each, computed once, kept in the precision the top computes in), in random batches."""
    model = TransferClassifier(freeze_backbone=False, class_names=data.class_names).to(device)
    cut = cut_backbone(model.backbone, len(backbone_blocks(model.backbone)) - TRAIN_BLOCKS)
    dtype = torch.bfloat16 if precision.startswith("bf16") else torch.float32
    with torch.inference_mode(), autocast(device, precision):
        kept = [
            (cut.trunk(batch.to(device).contiguous(memory_format=torch.channels_last)).to(dtype), labels.to(device))
            for batch, labels in loader(data, device)
        ]
    inputs, targets = torch.cat([x for x, _ in kept]), torch.cat([y for _, y in kept])
    cut.trunk.requires_grad_(False)
    optimizer = torch.optim.AdamW([*cut.top.parameters(), *model.head.parameters()], lr=1e-4)
    model.train_bn = PARTIAL_SETTINGS["trainer"]["callbacks"][0]["init_args"].get("train_bn", False)
    model.train()  # the frozen trunk, and BatchNorm unless train_bn, in eval mode, as in the fit
    rates = []
    for _ in range(epochs):
        start, images = time.perf_counter(), 0
        for rows in torch.randperm(len(targets), device=device).split(PARTIAL_BATCH):
            batch = inputs[rows].contiguous(memory_format=torch.channels_last)
            with autocast(device, precision):
                loss = F.cross_entropy(model.head(cut.top(batch)), targets[rows])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            images += len(rows)
        synchronize(device)
        rates.append(images / (time.perf_counter() - start))
    return rates


def unfrozen_rates(runs: Path, unfreeze_at: int) -> tuple[list[float], list[float]]:
    """history.csv's training images/s of the frozen epochs and of those after ``unfreeze_at``."""
    with open(runs / "history.csv", newline="") as f:
        history = [{k: float(v) for k, v in row.items() if v} for row in csv.DictReader(f)]
    frozen = [row["train/images_per_s"] for row in history if row["epoch"] < unfreeze_at]
    return frozen, [row["train/images_per_s"] for row in history if row["epoch"] >= unfreeze_at]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", required=True, help="the Caltech-101 archive, or a folder of class folders")
    parser.add_argument("--classes", nargs="*", help="a subset of classes (default: all)")
    parser.add_argument("--epochs", type=int, default=UNFREEZE_AT + 2, help="caltech's epochs (2 after the unfreeze)")
    parser.add_argument("--workdir", type=Path, help="keeps data and runs (default: a temporary folder)")
    add_device_options(parser)
    args = parser.parse_args()
    device, precision = device_of(args.accelerator), precision_of(args)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="caltech-finetune-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    source = str(Path(args.source).resolve())
    data = Caltech101DataModule(source, str(work / "data"), classes=args.classes)
    data.prepare_data()
    data.setup("fit")
    unfrozen = args.epochs - UNFREEZE_AT

    decoded = decode_only(data, device, 2)
    trained = plain_training(data, device, precision, max(unfrozen, 2))
    options = [*fit_options(CONFIG, source, work, args), "--trainer.default_root_dir", str(work / "runs")]
    run = caltech("fit", *options, cwd=work)
    frozen, ours = unfrozen_rates(work / "runs", UNFREEZE_AT)
    partial_epochs = max(args.epochs, PARTIAL_UNFREEZE_AT + 2)
    plain_top = plain_partial(data, device, precision, max(partial_epochs - PARTIAL_UNFREEZE_AT, 2))
    options = [*fit_options(PARTIAL, source, work, args), "--trainer.default_root_dir", str(work / "partial")]
    options += ["--trainer.max_epochs", str(partial_epochs), "--lr_scheduler.T_max", str(partial_epochs)]
    partial = caltech("fit", *options, cwd=work)
    _, ours_partial = unfrozen_rates(work / "partial", PARTIAL_UNFREEZE_AT)

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{len(os.sched_getaffinity(0))} CPU cores"
    print(
        f"train images: {len(data.train_set)}, {name}, {precision}, batch {BATCH_SIZE}, {data.num_workers} workers, "
        f"torch {torch.__version__}"
    )
    print(f"(d) decode only, img/s per epoch:        {' '.join(f'{r:7.1f}' for r in decoded)}")
    print(f"(a) plain train loop, img/s per epoch:   {' '.join(f'{r:7.1f}' for r in trained)}")
    print(f"(b) caltech fit, frozen epochs:          {' '.join(f'{r:7.1f}' for r in frozen)}")
    print(
        f"    caltech fit, unfrozen epochs:        {' '.join(f'{r:7.1f}' for r in ours)}   "
        f"(whole command {run.seconds:.1f} s)"
    )
    print(f"(c) plain partial loop, img/s per epoch: {' '.join(f'{r:7.1f}' for r in plain_top)}")
    print(
        f"(e) caltech fit partial, unfrozen:      {' '.join(f'{r:7.1f}' for r in ours_partial)}   "
        f"(whole command {partial.seconds:.1f} s)"
    )
    print(
        f"ratios: b/a (last unfrozen epoch vs last plain epoch) {ours[-1] / trained[-1]:.2f}   "
        f"a/d {trained[-1] / decoded[-1]:.2f}   b/d {ours[-1] / decoded[-1]:.2f}   "
        f"e/c {ours_partial[-1] / plain_top[-1]:.2f}   c/a {plain_top[-1] / trained[-1]:.1f}"
    )


if __name__ == "__main__":
    main()
