"""Where a small job's time goes before and around its work: interpreter and imports, parsing the
configuration, building the model, scanning the data, W&B, the fit itself, the checkpoint writes;
and how long ``caltech predict`` takes to answer for one image.

The imports are timed twice, side by side: as any program makes them, and as ``caltech``'s entry
point does (``caltech_cli.__main__``: the garbage collector paused while importing, then
``gc.freeze``), each including the interpreter's exit, where the collector's passes cost too.

Each line is a whole program timed from outside; the phases of ``caltech fit`` are the moments
its own messages appear (read as they are printed), so they add up to the whole command.

    python benchmarks/startup.py --source /tmp/caltech34            # or any folder of class folders
    python benchmarks/startup.py --source /tmp/caltech34 --accelerator gpu
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import REPO, add_device_options, caltech, device_options

CONFIG = REPO / "configs" / "transfer.yaml"
# (label, text that first appears in the output when the phase is over)
MILESTONES = [
    ("parse config, build model and data module", "Seed set to"),
    ("trainer and loggers", "GPU available"),
    ("scan and split the images", " images in "),
    ("feature pass (val and train, one loader)", "Cached val and train features"),
    ("head epochs", "`Trainer.fit` stopped"),
    ("final checkpoint, links", "Last checkpoint:"),
]


# The imports as caltech_cli.__main__.main makes them before it runs the command.
ENTRY_IMPORT = "from caltech_cli.__main__ import import_cli; import_cli()"


def program(code: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", required=True, help="a folder of class folders (two are used, 12 images each)")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each program; the fastest counts")
    add_device_options(parser)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="caltech-startup-bench-"))
    classes = sorted(p for p in Path(args.source).iterdir() if p.is_dir())[:2]
    for folder in classes:
        (work / "images" / folder.name).mkdir(parents=True)
        for image in sorted(folder.iterdir())[:12]:
            shutil.copy(image, work / "images" / folder.name)
    (work / "one").mkdir()
    shutil.copy(next((work / "images" / classes[0].name).iterdir()), work / "one")

    def fastest(measure) -> float:
        return min(measure() for _ in range(args.repeat))

    plain_import = fastest(lambda: program("import caltech_cli.cli"))
    entry_import = fastest(lambda: program(ENTRY_IMPORT))
    rows = [
        ("python -c pass", fastest(lambda: program("pass"))),
        ("import torch", fastest(lambda: program("import torch"))),
        ("import torchvision.models", fastest(lambda: program("import torchvision.models"))),
        ("import pytorch_lightning", fastest(lambda: program("import pytorch_lightning"))),
        ("import caltech_cli.cli", plain_import),
        ("  the same as caltech's entry point does it", entry_import),
        ("caltech fit --help", fastest(lambda: caltech("fit", "--help", cwd=work).seconds)),
    ]
    common = [
        "--config",
        str(CONFIG),
        "--data.source",
        str(work / "images"),
        "--data.data_dir",
        str(work / "data"),
        "--data.split",
        "[50, 25, 25]",
        "--trainer.max_epochs",
        "2",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.default_root_dir",
        str(work / "runs"),
        *device_options(args),
    ]
    runs = {}
    variants = [("caltech fit, 24 images, no logger", ["--trainer.logger", "false"])]
    if importlib.util.find_spec("wandb") is not None:
        variants.append(("caltech fit, 24 images, W&B offline", ["--trainer.logger.save_dir", str(work / "runs")]))
    for label, logger in variants:
        env = os.environ.get("WANDB_MODE")
        os.environ["WANDB_MODE"] = "offline" if "W&B" in label else "disabled"
        runs[label] = caltech("fit", *common, *logger, cwd=work)
        os.environ.pop("WANDB_MODE") if env is None else os.environ.__setitem__("WANDB_MODE", env)
        rows.append((label, runs[label].seconds))
    predict = [
        caltech(
            "predict",
            "--config",
            str(CONFIG),
            "--ckpt_path",
            str(work / "runs" / "best.ckpt"),
            "--data.predict_dir",
            str(work / "one"),
            "--trainer.logger",
            "false",
            "--trainer.default_root_dir",
            str(work / "predict"),
            *device_options(args),
            cwd=work,
        ).seconds
        for _ in range(args.repeat)
    ]
    rows.append(("caltech predict, one image", min(predict)))

    for label, seconds in rows:
        print(f"{label:44s} {seconds:6.2f} s")
    print(f"ratio: imports as caltech's entry point makes them / as any program does {entry_import / plain_import:.2f}")
    for label, run in runs.items():
        print(f"phases of {label} (seconds since start, as printed):")
        previous = 0.0
        for name, text in MILESTONES:
            at = next((t - run.start for t, line in run.lines if text in line), None)
            if at is not None:
                print(f"  {name:44s} until {at:6.2f} s  (+{at - previous:5.2f})")
                previous = at
        print(f"  {'exit':44s} until {run.seconds:6.2f} s  (+{run.seconds - previous:5.2f})")
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
