"""What the benchmarks share: running the real ``caltech`` command with its output timed line by
line, the device and precision of a plain PyTorch loop, and GPU utilisation samples."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def add_device_options(parser) -> None:
    parser.add_argument("--accelerator", default="cpu", choices=["cpu", "gpu"], help="where to run (default: cpu)")
    parser.add_argument(
        "--precision", default=None, help="Lightning precision (default: 32-true on a CPU, bf16-mixed on a GPU)"
    )


def device_of(accelerator: str) -> torch.device:
    return torch.device("cuda" if accelerator == "gpu" else "cpu")


def precision_of(args) -> str:
    return args.precision or ("bf16-mixed" if args.accelerator == "gpu" else "32-true")


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """What Lightning's mixed-precision plugin does around a forward pass."""
    if precision.startswith("bf16"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if precision.startswith("16"):
        return torch.autocast(device.type, dtype=torch.float16)
    return contextlib.nullcontext()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_options(args) -> list[str]:
    """The ``caltech`` options that put a run where the plain loop runs."""
    return [
        "--trainer.accelerator",
        args.accelerator,
        "--trainer.devices",
        "1",
        "--trainer.precision",
        precision_of(args),
    ]


@dataclass
class Run:
    start: float  # time.perf_counter() when the command started
    seconds: float
    lines: list[tuple[float, str]]  # (time.perf_counter() when printed, line) of stdout and stderr together
    returncode: int

    @property
    def output(self) -> str:
        return "\n".join(line for _, line in self.lines)

    def find(self, pattern: str) -> re.Match | None:
        return re.search(pattern, self.output)


def fit_options(config: Path, source: str, work: Path, args) -> list[str]:
    """``caltech fit``'s options for a benchmark: the config on ``source``, data under ``work``,
    ``args.epochs`` epochs on a cosine schedule of that length, ``args.classes`` if given, nothing
    logged or drawn, on the benchmark's device."""
    options = [
        "--config", str(config), "--data.source", source, "--data.data_dir", str(work / "data"),
        "--trainer.max_epochs", str(args.epochs), "--lr_scheduler.T_max", str(args.epochs),
        "--trainer.enable_progress_bar", "false", "--trainer.logger", "false", *device_options(args),
    ]  # fmt: skip
    if args.classes:
        options += ["--data.classes", "[" + ", ".join(args.classes) + "]"]
    return options


def caltech(*args: str, cwd: Path, check: bool = True) -> Run:
    """Run the real ``caltech`` command, W&B off unless WANDB_MODE says otherwise; every output line
    comes with the moment it was printed (tqdm's carriage returns split lines too)."""
    env = dict(
        os.environ, WANDB_MODE=os.environ.get("WANDB_MODE", "disabled"), WANDB_SILENT="true", PYTHONUNBUFFERED="1"
    )
    command = [sys.executable, "-m", "caltech_cli", *args]  # the `caltech` script, also where only PYTHONPATH has it
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    lines: list[tuple[float, str]] = []
    buffer = b""
    while chunk := process.stdout.read1(65536):
        now = time.perf_counter()
        buffer += chunk
        *complete, buffer = re.split(rb"[\r\n]", buffer)
        lines += [(now, line.decode(errors="replace")) for line in complete if line.strip()]
    process.wait()
    run = Run(
        start,
        time.perf_counter() - start,
        lines + [(time.perf_counter(), buffer.decode(errors="replace"))],
        process.returncode,
    )
    if check and run.returncode != 0:
        sys.exit(f"caltech {args[0]} failed:\n{run.output[-3000:]}")
    return run


@dataclass
class GpuSampler:
    """``nvidia-smi``'s GPU utilisation every 100 ms while the ``with`` block runs (nothing where
    there is no nvidia-smi)."""

    samples: list[tuple[float, int]] = field(default_factory=list)  # (time.perf_counter(), percent)

    @contextlib.contextmanager
    def sampling(self) -> Iterator[GpuSampler]:
        tool = shutil.which("nvidia-smi")
        if tool is None:
            yield self
            return
        process = subprocess.Popen(
            [tool, "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-lms", "100"],
            stdout=subprocess.PIPE,
            text=True,
        )

        def read() -> None:
            for line in process.stdout:
                if line.strip().isdigit():
                    self.samples.append((time.perf_counter(), int(line)))

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        try:
            yield self
        finally:
            process.terminate()
            reader.join(timeout=2)

    def mean(self, since: float, until: float) -> float | None:
        window = [u for t, u in self.samples if since <= t <= until]
        return sum(window) / len(window) if window else None


def feature_pass(run: Run, split: str) -> tuple[float, float, float, int] | None:
    """(printed at, seconds, images/s, images) of a split's cache pass in ``caltech``'s output;
    ``split`` is a regular expression for the names the line gives ("val and train")."""
    for at, line in run.lines:
        found = re.search(
            rf"Cached {split} features of (\d+) images .*\(([0-9.]+) s on \S+, (?:[^,]+, )?([0-9.]+) images/s\)", line
        )
        if found:
            return at, float(found.group(2)), float(found.group(3)), int(found.group(1))
    return None
