"""The inference engines of a backbone that does not train, on this machine, side by side in one run.

(a) compute only: images/s of MobileNetV2 (ImageNet weights, 224 pixels) on each engine
    installed (PyTorch eager channels-last as ``caltech`` runs it, PyTorch with bf16 autocast,
    ONNX Runtime, OpenVINO in float32 and in bfloat16), at each batch size, the engines
    alternated round by round; with ``--busy``, again beside a competing process that keeps every
    core busy (a PyTorch matrix product loop), as on a shared machine;
(b) the feature pass of ``caltech fit`` (``--model.engine ENGINE``, cold cache) against its engine
    floor: a plain loop with the same decoding and transform in the same loader workers feeding
    the same engine session, over the same train and val images;
(c) ``caltech predict`` (one view, less its start-up) against the same floor over the same files.

    python benchmarks/engines.py --source ../shared/data/caltech101/101_ObjectCategories.tar.gz \\
        --classes airplanes Motorbikes Faces_easy watch Leopards --busy
    python benchmarks/engines.py --compute-only --accelerator gpu      # on a GPU machine: torch there
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from common import REPO, caltech, feature_pass, fit_options

from caltech_cli import engines
from caltech_cli.backbones import resolve_backbone
from caltech_cli.data import Caltech101DataModule
from caltech_cli.devices import CPU_BATCH
from caltech_cli.engines import backbone_runner, weights_fingerprint
from caltech_cli.images import UnlabelledImages, find_images
from caltech_cli.loading import FEATURE_BATCH_SIZE
from caltech_cli.transforms import eval_transform

CONFIG = REPO / "configs" / "transfer.yaml"


def backbone(device: torch.device) -> torch.nn.Module:
    network = resolve_backbone("mobilenet_v2", "IMAGENET1K_V1").module
    return network.eval().requires_grad_(False).to(device, memory_format=torch.channels_last)


def torch_runner(network: torch.nn.Module, bf16: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    def run(images: torch.Tensor) -> torch.Tensor:
        context = torch.autocast(images.device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
        with torch.inference_mode(), context:
            chunks = images.split(CPU_BATCH) if images.device.type == "cpu" else [images]
            return torch.cat([network(chunk.contiguous(memory_format=torch.channels_last)) for chunk in chunks])

    return run


def runners(device: torch.device, folder: Path) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """Every engine this machine has, as a function of an image batch."""
    network = backbone(device)
    found = {"torch": torch_runner(network, False), "torch bf16": torch_runner(network, True)}
    if device.type != "cpu":
        return found
    fingerprint = weights_fingerprint(network)
    for name in ("onnxruntime", "openvino"):
        for bf16 in (False, True) if name == "openvino" else (False,):
            if engines.installed(name):
                runner = backbone_runner(network, fingerprint, 224, name, found["torch"], 10**6, folder, bf16)
                found[runner.name] = runner.extract
    return found


def busy_loop() -> None:  # pragma: no cover - the competing process
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    a = torch.randn(1024, 1024)
    while True:
        a = (a @ a).clamp_(-1, 1)


@contextlib.contextmanager
def competing(busy: bool) -> Iterator[None]:
    """Another process that keeps every core busy while the block runs (nothing without ``busy``)."""
    if not busy:
        yield
        return
    process = multiprocessing.get_context("spawn").Process(target=busy_loop, daemon=True)
    process.start()
    time.sleep(2)
    try:
        yield
    finally:
        process.terminate()
        process.join()


def compute_only(device: torch.device, folder: Path, batches: list[int], seconds: float, busy: bool) -> None:
    found = runners(device, folder)
    for label, load in (("quiet", False), ("beside a busy process", True)) if busy else (("quiet", False),):
        rates: dict[tuple[str, int], list[float]] = {}
        with competing(load):
            for _ in range(2):  # rounds, the engines alternated
                for batch in batches:
                    images = torch.randn(batch, 3, 224, 224, device=device)
                    for name, run in found.items():
                        run(images)
                        count, start = 0, time.perf_counter()
                        while time.perf_counter() - start < seconds:
                            run(images)
                            count += batch
                        if device.type == "cuda":
                            torch.cuda.synchronize(device)
                        rates.setdefault((name, batch), []).append(count / (time.perf_counter() - start))
        print(f"(a) compute only, {label}, images/s (each round), {torch.get_num_threads()} threads:")
        for batch in batches:
            base = max(rates["torch", batch])
            for name in found:
                shown = " / ".join(f"{rate:6.0f}" for rate in rates[name, batch])
                print(f"    batch {batch:3d}  {name:28s} {shown}   {max(rates[name, batch]) / base:5.2f}x torch")


def floor(run: Callable[[torch.Tensor], torch.Tensor], datasets: list, batch_size: int, workers: int) -> float:
    """images/s of a plain loop: the datasets' decoding and transform in ``workers`` loader workers
    feeding ``run`` (after an untimed pass that warms the page cache)."""
    loader = torch.utils.data.DataLoader(
        torch.utils.data.ConcatDataset(datasets), batch_size=batch_size, num_workers=workers
    )
    for batch in loader:
        run(batch[0])
    images, start = 0, time.perf_counter()
    for batch in loader:
        run(batch[0])
        images += len(batch[0])
    return images / (time.perf_counter() - start)


def passes(args: argparse.Namespace, work: Path) -> None:
    source = str(Path(args.source).resolve())
    data = Caltech101DataModule(source, str(work / "data"), classes=args.classes)
    data.prepare_data()
    data.setup("fit")
    data.train_set.transform = eval_transform(data.preprocessing)  # as the cache's pass
    network = backbone(torch.device("cpu"))
    runner = backbone_runner(
        network, weights_fingerprint(network), 224, args.engine, torch_runner(network, False), 10**6, work / "graphs"
    )
    batch = FEATURE_BATCH_SIZE["cpu"]
    images = len(data.train_set) + len(data.val_set)
    rate = floor(runner.extract, [data.train_set, data.val_set], batch, data.num_workers)
    print(f"(b) {images} train+val images on {runner.name}, batch {batch}, {data.num_workers} workers")
    print(f"    floor (plain loop)            {rate:7.1f} img/s")
    shutil.rmtree(work / "data" / "feature-cache", ignore_errors=True)
    args.epochs = 1
    options = [*fit_options(CONFIG, source, work, args), "--model.engine", args.engine]
    cold = caltech("fit", *options, "--trainer.default_root_dir", str(work / "runs"), cwd=work)
    _, seconds, _, counted = feature_pass(cold, "val and train")
    print(f"    caltech fit's feature pass    {counted / seconds:7.1f} img/s  {counted / seconds / rate:5.2f}x floor")

    files = find_images(data.root)[: args.limit]
    pre = data.preprocessing
    unlabelled = UnlabelledImages(files, eval_transform(pre), pre.crop_size, pre.resize_size)
    predict_rate = floor(lambda x: runner.extract(x), [unlabelled], 64, data.num_workers)
    folder = work / "predict"
    folder.mkdir()
    for i, path in enumerate(files):
        os.symlink(path, folder / f"{i:05d}{path.suffix}")
    one = work / "one"
    one.mkdir()
    os.symlink(files[0], one / files[0].name)

    def predict(photos: Path, name: str) -> float:
        return caltech(
            "predict", "--config", str(CONFIG), "--ckpt_path", str(work / "runs" / "best.ckpt"),
            "--data.predict_dir", str(photos), "--data.tta_flip", "false", "--model.engine", args.engine,
            "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
            "--trainer.default_root_dir", str(work / name), cwd=work,
        ).seconds  # fmt: skip

    startup = predict(one, "startup")
    whole = predict(folder, "all")
    rate_of_predict = len(files) / (whole - startup)
    print(f"(c) predict over {len(files)} images, one view: floor (batch 64) {predict_rate:7.1f} img/s")
    print(
        f"    caltech predict, less start-up {rate_of_predict:7.1f} img/s  {rate_of_predict / predict_rate:5.2f}x floor"
        f"   (start-up: {startup:.1f} s, the whole command over one image)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", help="the Caltech-101 archive, or a folder of class folders, for (b) and (c)")
    parser.add_argument("--classes", nargs="*", help="a subset of classes for (b) and (c) (default: all)")
    parser.add_argument("--engine", default="auto", help="the engine of (b) and (c) (default: auto)")
    parser.add_argument("--limit", type=int, default=2000, help="images of (c) (default: 2000)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16], help="batch sizes of (a)")
    parser.add_argument("--seconds", type=float, default=2.0, help="seconds of each measurement of (a)")
    parser.add_argument("--busy", action="store_true", help="(a) again beside a process that keeps the cores busy")
    parser.add_argument("--compute-only", action="store_true", help="(a) alone")
    parser.add_argument("--accelerator", default="cpu", choices=["cpu", "gpu"], help="where (a) runs")
    args = parser.parse_args()
    args.accelerator_device = torch.device("cuda" if args.accelerator == "gpu" else "cpu")
    work = Path(tempfile.mkdtemp(prefix="caltech-engines-"))
    try:
        print(f"torch {torch.__version__}, {len(os.sched_getaffinity(0))} CPU cores")
        # (a) in a process of its own: the engines it loads (OpenVINO's thread pool) are gone before (b)
        # forks its loader workers and commands.
        measure = multiprocessing.get_context("spawn").Process(
            target=compute_only, args=(args.accelerator_device, work / "graphs", args.batches, args.seconds, args.busy)
        )
        measure.start()
        measure.join()
        if not args.compute_only and args.source:
            args.precision = None
            passes(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
