"""How close a transfer fit (and the test that follows it) comes to its floor: one forward pass of
the backbone over the images.

Measured side by side in one run, on the real archive, a folder of class folders, or a subset of
its classes, on the CPU or a GPU (``--accelerator gpu``, bf16 autocast by default there):

  (a) floor: a plain PyTorch forward pass of the frozen backbone over the train and val images,
      on the device, in the precision, with the decoding, batch size and loader workers that
      ``caltech fit`` uses for its feature pass (after an untimed pass that warms the page cache);
  (b) ``caltech fit --config configs/transfer.yaml`` with the feature cache, cold: its own
      feature pass (printed by ``caltech``) against (a), GPU utilisation during that pass, and
      the whole command; (b') the same fit again, warm (the cache is there): start-up plus the
      head's epochs, so b - b' is what the feature pass cost the fit;
  (t) ``caltech test`` of (b)'s checkpoint, which computes the test split's features;
  (c) optionally, the same fit without the cache: the backbone runs on every image each epoch.

    python benchmarks/fit.py --source ../shared/data/caltech101/101_ObjectCategories.tar.gz \\
        --classes airplanes Motorbikes Faces_easy watch Leopards --epochs 10
    python benchmarks/fit.py --source /tmp/caltech34 --accelerator gpu      # on a GPU machine
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

import torch
from common import (
    REPO,
    GpuSampler,
    add_device_options,
    autocast,
    caltech,
    device_of,
    feature_pass,
    fit_options,
    precision_of,
    synchronize,
)

from caltech_cli.backbones import resolve_backbone
from caltech_cli.data import Caltech101DataModule
from caltech_cli.loading import FEATURE_BATCH_SIZE
from caltech_cli.transforms import eval_transform

CONFIG = REPO / "configs" / "transfer.yaml"


def test_acc(output: str) -> float:
    return float(re.search(r"test/acc[\s│|]+([0-9.]+)", output).group(1))  # plain or rich table


def floor(data: Caltech101DataModule, device: torch.device, precision: str, batch_size: int) -> tuple[float, int]:
    """Seconds for one inference pass over train+val images, channels-last, as fast as plain PyTorch
    goes: one loader, files in the page cache, the network already warm on its device."""
    network = (
        resolve_backbone("mobilenet_v2", "IMAGENET1K_V1").module.eval().to(device, memory_format=torch.channels_last)
    )
    loader = torch.utils.data.DataLoader(
        torch.utils.data.ConcatDataset([data.train_set, data.val_set]),
        batch_size=batch_size,
        num_workers=data.num_workers,
        pin_memory=device.type == "cuda",
    )
    with torch.inference_mode(), autocast(device, precision):
        for batch, _ in loader:  # warms the page cache (caltech fit below reads the files warm too) and the device
            network(batch.to(device).contiguous(memory_format=torch.channels_last))
        synchronize(device)
        images = 0
        start = time.perf_counter()
        for batch, _ in loader:
            network(batch.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last))
            images += len(batch)
        synchronize(device)
    return time.perf_counter() - start, images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", required=True, help="the Caltech-101 archive, or a folder of class folders")
    parser.add_argument("--classes", nargs="*", help="a subset of classes (default: all)")
    parser.add_argument("--epochs", type=int, default=30, help="head epochs (the config's 30 by default)")
    parser.add_argument("--workdir", type=Path, help="keeps data and runs (default: a temporary folder)")
    parser.add_argument("--uncached", action="store_true", help="also run (c), which costs about epochs x the floor")
    parser.add_argument("--floor-batch", type=int, help="the floor's batch size (default: caltech's feature batch)")
    add_device_options(parser)
    args = parser.parse_args()
    device, precision = device_of(args.accelerator), precision_of(args)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="caltech-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    source = str(Path(args.source).resolve())
    common = fit_options(CONFIG, source, work, args)

    data = Caltech101DataModule(source, str(work / "data"), classes=args.classes)
    data.prepare_data()
    data.setup("fit")
    # The floor runs the eval transform, as the cache does.
    data.train_set.transform = eval_transform(data.preprocessing)
    batch = args.floor_batch or FEATURE_BATCH_SIZE[device.type]
    floor_s, images = floor(data, device, precision, batch)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{len(os.sched_getaffinity(0))} CPU cores"
    print(
        f"images: {images} (train+val), {args.epochs} epochs, {name}, {precision}, batch {batch}, "
        f"{data.num_workers} workers, torch {torch.__version__}"
    )
    print(f"(a) floor, one forward pass:   {floor_s:8.1f} s  {images / floor_s:7.1f} img/s")

    shutil.rmtree(work / "data" / "feature-cache", ignore_errors=True)  # (b) must start cold
    root = work / "runs" / "cached"
    options = [*common, "--data.cache_features", "true", "--trainer.default_root_dir", str(root)]
    sampler = GpuSampler()
    with sampler.sampling():
        cold = caltech("fit", *options, cwd=work)
    at, pass_s, _, _ = feature_pass(cold, "val and train")
    utilisation = sampler.mean(at - pass_s, at)
    shown = "n/a (no nvidia-smi)" if utilisation is None else f"{utilisation:.0f}% (mean of 100 ms samples)"
    print(
        f"(b) fit's feature pass:        {pass_s:8.1f} s  {images / pass_s:7.1f} img/s  "
        f"{images / pass_s / (images / floor_s):5.2f}x floor's img/s  GPU utilisation {shown}"
    )
    print(f"(b) fit, cache cold:           {cold.seconds:8.1f} s  (whole command)")
    warm = caltech("fit", *options, cwd=work)
    print(f"(b') fit, cache warm:          {warm.seconds:8.1f} s  (start-up + {args.epochs} head epochs)")
    print(
        f"    cold - warm:               {cold.seconds - warm.seconds:8.1f} s  "
        f"{(cold.seconds - warm.seconds) / floor_s:5.2f}x floor"
    )
    tested = caltech("test", *options, "--ckpt_path", str(root / "best.ckpt"), cwd=work)
    at, test_s, test_rate, test_images = feature_pass(tested, r"test(?: and test_flip)?")  # TTA: mirror view too
    print(
        f"(t) test's feature pass:       {test_s:8.1f} s  {test_rate:7.1f} img/s  "
        f"{test_rate / (images / floor_s):5.2f}x floor's img/s; whole command {tested.seconds:.1f} s, "
        f"test/acc {test_acc(tested.output):.4f}"
    )
    if args.uncached:
        root = work / "runs" / "uncached"
        uncached = caltech(
            "fit", *common, "--data.cache_features", "false", "--trainer.default_root_dir", str(root), cwd=work
        )
        tested = caltech(
            "test",
            *common,
            "--data.cache_features",
            "false",
            "--trainer.default_root_dir",
            str(root),
            "--ckpt_path",
            str(root / "best.ckpt"),
            cwd=work,
        )
        print(
            f"(c) fit, no cache:             {uncached.seconds:8.1f} s  {uncached.seconds / floor_s:5.2f}x floor  "
            f"test/acc {test_acc(tested.output):.4f}"
        )
    print(
        f"ratios: feature pass b/a {pass_s / floor_s:.2f}"
        f"   fit cold-warm / a {(cold.seconds - warm.seconds) / floor_s:.2f}"
        f"   warm b'/b {warm.seconds / cold.seconds:.2f}   test pass img/s vs a {test_rate / (images / floor_s):.2f}"
    )


if __name__ == "__main__":
    main()
