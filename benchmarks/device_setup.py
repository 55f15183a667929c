"""What a new batch shape costs the device the first time it is seen, and which settings make it cheaper.

On an H200 (torch 2.11, cuDNN 9) the first forward pass of MobileNetV2 in bf16 with a batch
shape not seen before took 1.7-2.0 s, where the same batch warm took 5 ms. A command that
caches the features of a 2,000-image slice pays this once or more inside a pass that a warm
plain loop finishes in about 1 s, so it decides how close that pass can come to the loop.

Each setting runs in a fresh process (most take effect once per process), on the backbone that
``caltech`` uses, channels-last and under autocast as Lightning runs it:

  default      the tool's settings
  v7-api       TORCH_CUDNN_V8_API_DISABLED=1: cuDNN's older API, whose algorithm choice PyTorch
               keeps for the whole process (the newer API's plans are kept per thread)
  benchmark    torch.backends.cudnn.benchmark = True (times every algorithm per new shape)
  cudnn-off    torch.backends.cudnn.enabled = False: PyTorch's own kernels (depthwise convolutions
               have their own; 1x1 convolutions become matrix products)
  nchw         contiguous (NCHW) images and weights instead of channels-last
  float32      no autocast
  thread       the shape warmed in another thread first: whether that warms the main thread

For each: the first batch of shape B (``cold``), the same shape again (``warm``), a short batch
(a split's last, ``new shape``) and ``again``; then what the two set-ups cost together, in
seconds and as a multiple of a warm batch. Runs on any machine (``--accelerator gpu`` on one with CUDA):

    python benchmarks/device_setup.py --accelerator gpu
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time

from common import REPO, add_device_options, autocast, device_of, precision_of, synchronize

SETTINGS = ("default", "v7-api", "benchmark", "cudnn-off", "nchw", "float32", "thread")


def child(setting: str, accelerator: str, precision: str, batch: int, short: int, crop: int) -> dict:
    """Time the batches in this process, under one setting; returns seconds by name."""
    start = time.perf_counter()
    import torch

    from caltech_cli.backbones import resolve_backbone

    times = {"import torch": time.perf_counter() - start}
    device = device_of(accelerator)
    if setting == "benchmark":
        torch.backends.cudnn.benchmark = True
    if setting == "cudnn-off":
        torch.backends.cudnn.enabled = False
    if setting == "float32":
        precision = "32-true"
    layout = torch.contiguous_format if setting == "nchw" else torch.channels_last
    start = time.perf_counter()
    torch.zeros(1, device=device)
    synchronize(device)
    times["device init"] = time.perf_counter() - start
    start = time.perf_counter()
    network = resolve_backbone("mobilenet_v2", "IMAGENET1K_V1").module.eval().to(device, memory_format=layout)
    synchronize(device)
    times["model to device"] = time.perf_counter() - start

    def forward(size: int) -> float:
        images = torch.zeros(size, 3, crop, crop, device=device).contiguous(memory_format=layout)
        synchronize(device)
        began = time.perf_counter()
        with torch.inference_mode(), autocast(device, precision):
            network(images)
        synchronize(device)
        return time.perf_counter() - began

    if setting == "thread":
        warmer = threading.Thread(target=lambda: times.__setitem__("cold in another thread", forward(batch)))
        warmer.start()
        warmer.join()
    times["cold"] = forward(batch)
    times["warm"] = min(forward(batch) for _ in range(3))
    times["new shape"] = forward(short)
    times["again"] = forward(short)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32, help="the pass's batch size (caltech's on a GPU: 32)")
    parser.add_argument("--short", type=int, default=7, help="a short last batch")
    parser.add_argument("--crop", type=int, default=224)
    parser.add_argument("--settings", nargs="*", default=list(SETTINGS), choices=SETTINGS)
    parser.add_argument("--child", choices=SETTINGS, help=argparse.SUPPRESS)
    add_device_options(parser)
    args = parser.parse_args()
    precision = precision_of(args)
    if args.child:
        print(json.dumps(child(args.child, args.accelerator, precision, args.batch, args.short, args.crop)))
        return
    print(
        f"{args.accelerator}, {precision}, mobilenet_v2 at {args.crop} px, batch {args.batch}, short batch "
        f"{args.short}; seconds, each setting in a fresh process"
    )
    columns = ["device init", "model to device", "cold in another thread", "cold", "warm", "new shape", "again"]
    print(f"{'setting':10} " + " ".join(f"{c:>14}" for c in columns) + f" {'set-ups (s)':>12} {'x warm':>7}")
    for setting in args.settings:
        env = dict(os.environ, **({"TORCH_CUDNN_V8_API_DISABLED": "1"} if setting == "v7-api" else {}))
        command = [
            sys.executable,
            __file__,
            "--child",
            setting,
            "--accelerator",
            args.accelerator,
            "--precision",
            precision,
            "--batch",
            str(args.batch),
            "--short",
            str(args.short),
            "--crop",
            str(args.crop),
        ]
        done = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True)
        if done.returncode != 0:
            print(f"{setting:10} failed: {done.stderr.strip().splitlines()[-1:]}")
            continue
        times = json.loads(done.stdout.strip().splitlines()[-1])
        cells = " ".join(f"{times[c]:14.3f}" if c in times else f"{'':>14}" for c in columns)
        setups = times["cold"] - times["warm"] + times["new shape"] - times["again"]
        print(f"{setting:10} {cells} {setups:12.3f} {setups / times['warm']:6.0f}x")


if __name__ == "__main__":
    main()
