"""``caltech predict`` against a plain forward pass over the same image files, side by side.

(a) plain: the checkpoint's network (backbone + head) in plain PyTorch, channels-last, inference
    mode, on the same device and in the same precision (``--accelerator gpu``: bf16 autocast by
    default), over the same files with the same decoding, batch size and workers; timed as its
    loop alone (after an untimed pass that warms the page cache and the device) and as a whole program
    (interpreter, imports, loading the checkpoint);
(b) ``caltech predict --ckpt_path ...`` writing predictions.csv, one view of each image like (a)
    (``--data.tta_flip false``), timed as a whole command, and also less its start-up (a run over
    a single image), which a longer job pays once;
(c) the same as ``configs/transfer.yaml`` runs it, with test-time augmentation: each image and
    its mirror image go through the network, twice (a)'s work for the backbone.

Ratios compare like with like: whole program against whole program, loop against loop.

    python benchmarks/predict.py --ckpt runs/transfer/best.ckpt --folder data/101_ObjectCategories --limit 2000
    python benchmarks/predict.py --ckpt runs/transfer/best.ckpt --folder /tmp/caltech34 --accelerator gpu
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml
from common import REPO, add_device_options, autocast, caltech, device_of, device_options, precision_of, synchronize
from torch.utils.data import DataLoader

from caltech_cli.images import UnlabelledImages, find_images
from caltech_cli.loading import default_num_workers
from caltech_cli.model import load_trained
from caltech_cli.transforms import eval_transform

CONFIG = REPO / "configs" / "transfer.yaml"
# What `caltech predict --config configs/transfer.yaml` batches by.
BATCH_SIZE = yaml.safe_load(CONFIG.read_text())["data"]["init_args"]["batch_size"]


def predict(ckpt: Path, folder: Path, work: Path, args, tta: bool = False) -> float:
    return caltech(
        "predict",
        "--config",
        str(CONFIG),
        "--ckpt_path",
        str(ckpt),
        "--data.predict_dir",
        str(folder),
        "--data.tta_flip",
        str(tta).lower(),
        "--trainer.logger",
        "false",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.default_root_dir",
        str(work),
        *device_options(args),
        cwd=work.parent,
    ).seconds


def plain(ckpt: Path, files: list[Path], args) -> float:
    device, precision = device_of(args.accelerator), precision_of(args)
    # Not LightningModule.load_from_checkpoint: it honours a checkpoint's `_instantiator` (CVE-2026-58659).
    model, pre = load_trained(ckpt)
    model.to(device, memory_format=torch.channels_last)
    dataset = UnlabelledImages(files, eval_transform(pre), pre.crop_size, pre.resize_size)
    loader = DataLoader(
        dataset, batch_size=BATCH_SIZE, num_workers=default_num_workers(), pin_memory=device.type == "cuda"
    )
    with torch.inference_mode(), autocast(device, precision):
        for _ in range(2):  # the first warms the page cache and the device; the second is timed
            start = time.perf_counter()
            for images, _, _ in loader:
                images = images.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
                model.head(model.backbone(images)).softmax(dim=1).cpu()
            synchronize(device)
    return time.perf_counter() - start


def plain_program(ckpt: Path, folder: Path, args) -> float:
    """Seconds for the plain pass as a program of its own, start-up included."""
    start = time.perf_counter()
    subprocess.run(
        [
            sys.executable,
            __file__,
            "--plain-only",
            "--ckpt",
            str(ckpt),
            "--folder",
            str(folder),
            "--accelerator",
            args.accelerator,
            "--precision",
            precision_of(args),
        ],
        check=True,
    )
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--plain-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--ckpt", type=Path, required=True)
    parser.add_argument("--folder", type=Path, required=True, help="images to predict (searched recursively)")
    parser.add_argument("--limit", type=int, default=2000, help="use the first N images")
    add_device_options(parser)
    args = parser.parse_args()
    if args.plain_only:
        plain(args.ckpt, find_images(args.folder), args)
        return
    work = Path(tempfile.mkdtemp(prefix="caltech-predict-bench-"))
    files = find_images(args.folder)[: args.limit]
    images = work / "images"
    for i, path in enumerate(files):
        (images / f"{i // 500:03d}").mkdir(parents=True, exist_ok=True)
        shutil.copy(path, images / f"{i // 500:03d}" / f"{i:05d}{path.suffix}")
    copied = find_images(images)
    one = work / "one"
    one.mkdir()
    shutil.copy(copied[0], one)

    plain_s = plain(args.ckpt, copied, args)
    plain_whole_s = plain_program(args.ckpt, images, args)
    startup_s = predict(args.ckpt, one, work / "startup", args)
    predict_s = predict(args.ckpt, images, work / "run", args)
    steady_s = predict_s - startup_s
    tta_s = predict(args.ckpt, images, work / "tta", args, tta=True) - startup_s
    n = len(copied)
    print(
        f"images: {n}, {len(os.sched_getaffinity(0))} CPU cores, {args.accelerator}, {precision_of(args)}, "
        f"batch {BATCH_SIZE}, {default_num_workers()} workers, torch {torch.__version__}"
    )
    print(f"(a) plain forward pass, loop:        {plain_s:7.1f} s  {n / plain_s:6.1f} img/s")
    print(f"    plain, whole program:            {plain_whole_s:7.1f} s  {n / plain_whole_s:6.1f} img/s")
    print(
        f"(b) caltech predict, whole command:  {predict_s:7.1f} s  {n / predict_s:6.1f} img/s"
        f"  throughput vs whole plain program {plain_whole_s / predict_s:.2f}"
    )
    print(
        f"    less its start-up ({startup_s:.1f} s, one image): {steady_s:7.1f} s  {n / steady_s:6.1f} img/s"
        f"  throughput vs plain loop {plain_s / steady_s:.2f}"
    )
    print(
        f"(c) with TTA (image + mirror), less start-up: {tta_s:7.1f} s  {n / tta_s:6.1f} img/s"
        f"  throughput vs plain loop {plain_s / tta_s:.2f}, vs (b) {steady_s / tta_s:.2f}"
    )
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
