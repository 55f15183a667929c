"""Fine-tuning epochs against a plain PyTorch training loop with the same decoding, side by side.

  (d) decode only: the training loader alone (random resized crop + flip, the config's batch
      size, the data module's workers, pinned memory on a GPU), no model;
  (a) plain: the same loader feeding MobileNetV2 + a linear head, all of it trained (AdamW,
      cross-entropy, channels-last, bf16 autocast on a GPU); fresh loader workers each epoch, as
      ``caltech fit`` starts them (for exact resume);
  (b) ``caltech fit --config configs/finetune.yaml``: its epochs after ``unfreeze_at_epoch``
      train the whole network; their training throughput comes from history.csv
      (``train/images_per_s``: the epoch's training batches, loading included).

Prints images/s of each and the ratio b/a of the unfrozen epochs (the last epoch of each, where
the page cache is warm).

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

from caltech_cli.data import Caltech101DataModule
from caltech_cli.model import TransferClassifier

CONFIG = REPO / "configs" / "finetune.yaml"
SETTINGS = yaml.safe_load(CONFIG.read_text())
BATCH_SIZE = SETTINGS["data"]["init_args"]["batch_size"]
UNFREEZE_AT = SETTINGS["trainer"]["callbacks"][0]["init_args"]["unfreeze_at_epoch"]


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
    with open(work / "runs" / "history.csv", newline="") as f:
        history = [{k: float(v) for k, v in row.items() if v} for row in csv.DictReader(f)]
    ours = [row["train/images_per_s"] for row in history if row["epoch"] >= UNFREEZE_AT]
    frozen = [row["train/images_per_s"] for row in history if row["epoch"] < UNFREEZE_AT]

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
    print(
        f"ratios: b/a (last unfrozen epoch vs last plain epoch) {ours[-1] / trained[-1]:.2f}   "
        f"a/d {trained[-1] / decoded[-1]:.2f}   b/d {ours[-1] / decoded[-1]:.2f}"
    )


if __name__ == "__main__":
    main()
