"""How close a transfer fit comes to its floor: one forward pass of the backbone over the images.

Measured side by side in one run, on the real archive or a subset of its classes:

  (a) floor: a plain PyTorch forward pass of the frozen backbone over the train and val images,
      with the same decoding, batch size and workers as ``caltech fit``;
  (b) ``caltech fit --config configs/transfer.yaml`` with the feature cache (cold, then warm);
  (c) the same without the cache: the backbone runs on every image in every epoch.

Prints images/s and the ratios of wall times b/a and c/a, and test/acc of (b) and (c).

    python benchmarks/fit.py --source ../shared/data/caltech101/101_ObjectCategories.tar.gz \\
        --classes airplanes Motorbikes Faces_easy watch Leopards --epochs 10
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from caltech_cli.backbones import resolve_backbone  # noqa: E402
from caltech_cli.data import Caltech101DataModule  # noqa: E402

CONFIG = REPO / "configs" / "transfer.yaml"


def caltech(*args: str, cwd: Path) -> tuple[float, str]:
    """Run the real ``caltech`` command; return its wall time and output."""
    env = dict(os.environ, WANDB_MODE=os.environ.get("WANDB_MODE", "offline"), WANDB_SILENT="true")
    start = time.perf_counter()
    result = subprocess.run(
        [str(Path(sys.executable).with_name("caltech")), *args], cwd=cwd, env=env, capture_output=True, text=True
    )
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        sys.exit(f"caltech {args[0]} failed:\n{result.stderr[-3000:]}")
    return elapsed, result.stdout + result.stderr


def test_acc(output: str) -> float:
    return float(re.search(r"test/acc\s+([0-9.]+)", output).group(1))


def floor(data: Caltech101DataModule, backbone: str, weights: str) -> tuple[float, int]:
    """Seconds for one inference pass over train+val images, channels-last, as fast as plain PyTorch goes."""
    network = resolve_backbone(backbone, weights).module.eval().to(memory_format=torch.channels_last)
    images = 0
    start = time.perf_counter()
    with torch.inference_mode():
        for loader in (data.train_dataloader(), data.val_dataloader()):
            for batch, _ in loader:
                network(batch.contiguous(memory_format=torch.channels_last))
                images += len(batch)
    return time.perf_counter() - start, images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", required=True, help="the Caltech-101 archive or extracted folder")
    parser.add_argument("--classes", nargs="*", help="a subset of classes (default: all 102)")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--workdir", type=Path, help="keeps data and runs (default: a temporary folder)")
    parser.add_argument("--skip-uncached", action="store_true",
                        help="leave out (c), which costs about epochs x the floor")
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="caltech-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    source = str(Path(args.source).resolve())
    common = ["--config", str(CONFIG), "--data.source", source, "--data.data_dir", str(work / "data"),
              "--trainer.max_epochs", str(args.epochs), "--lr_scheduler.T_max", str(args.epochs),
              "--trainer.enable_progress_bar", "false"]
    if args.classes:
        common += ["--data.classes", "[" + ", ".join(args.classes) + "]"]

    data = Caltech101DataModule(source, str(work / "data"), classes=args.classes, batch_size=16)
    data.prepare_data()
    data.setup("fit")
    data.train_set.transform = data.val_set.transform  # the floor runs the eval transform, as the cache does
    floor_s, images = floor(data, "mobilenet_v2", "IMAGENET1K_V1")
    print(f"images: {images} (train+val), {args.epochs} epochs, {os.cpu_count()} CPUs, torch {torch.__version__}")
    print(f"(a) floor, one forward pass:   {floor_s:8.1f} s  {images / floor_s:7.1f} img/s")

    shutil.rmtree(work / "data" / "feature-cache", ignore_errors=True)  # (b) must start cold
    runs = {}
    variants = [("(b) fit, cache cold", ["--data.cache_features", "true"]),
                ("(b') fit, cache warm", ["--data.cache_features", "true"]),
                ("(c) fit, no cache", ["--data.cache_features", "false"])]
    for label, extra in variants[:2] if args.skip_uncached else variants:
        root = work / "runs" / re.sub(r"\W+", "-", label).strip("-")
        options = [*common, *extra, "--trainer.default_root_dir", str(root), "--trainer.logger.save_dir", str(root)]
        seconds, _ = caltech("fit", *options, cwd=work)
        _, tested = caltech("test", *options, "--ckpt_path", str(root / "best.ckpt"), cwd=work)
        runs[label] = (seconds, test_acc(tested))
        print(f"{label + ':':31s}{seconds:8.1f} s  {images * args.epochs / seconds:7.1f} img/s (epochs x images)"
              f"  {seconds / floor_s:5.2f}x floor  test/acc {runs[label][1]:.4f}")
    cold, warm = runs["(b) fit, cache cold"][0], runs["(b') fit, cache warm"][0]
    print(f"ratios: b/a {cold / floor_s:.2f}   warm b'/b {warm / cold:.2f}", end="")
    if "(c) fit, no cache" in runs:
        uncached, uncached_acc = runs["(c) fit, no cache"]
        print(f"   c/a {uncached / floor_s:.2f}   test/acc cached {runs['(b) fit, cache cold'][1]:.4f}"
              f" vs uncached {uncached_acc:.4f}", end="")
    print()


if __name__ == "__main__":
    main()
