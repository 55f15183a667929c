"""What makes a GPU machine fast and quiet, checked where CI runs (no GPU): loader defaults that
follow the machine and the trainer's device, no advice that is wrong for this tool, and package
metadata that leaves a machine's own CUDA build of torch in place."""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
import warnings

import pytest
import pytorch_lightning as pl
import torch
from conftest import TRANSFER
from packaging.requirements import Requirement
from packaging.version import Version

from caltech_cli import cli
from caltech_cli.backbones import preprocessing_for
from caltech_cli.data import Caltech101DataModule
from caltech_cli.model import TransferClassifier

PRE = preprocessing_for("mobilenet_v2", "IMAGENET1K_V1", image_size=64)


def test_loader_workers_default_to_every_available_core(image_folder, tmp_path, monkeypatch):
    """One worker per core (not capped), but no more than there are batches, and none for a
    single batch, which loads sooner in the main process than a worker starts."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    data = Caltech101DataModule(str(image_folder), str(tmp_path / "data"), split=(25, 50, 25), batch_size=1,
                                preprocessing=PRE)
    assert data.num_workers == 16, "not capped below the machine's cores"
    data.setup("fit")
    assert len(data.val_set) > 16
    loader = data.val_dataloader()
    assert loader.num_workers == 16 and loader.persistent_workers
    data.batch_size = len(data.val_set)
    assert data.val_dataloader().num_workers == 0


def test_memory_is_pinned_only_for_a_cuda_trainer(image_folder, tmp_path, monkeypatch):
    """A CPU run on a machine that has a GPU gains nothing from pinned pages, and pays for them."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    data = Caltech101DataModule(str(image_folder), str(tmp_path / "data"), split=(50, 25, 25), num_workers=0,
                                preprocessing=PRE)
    data.trainer = pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False)
    data.setup("fit")
    assert not data.train_dataloader().pin_memory and not data.val_dataloader().pin_memory


def test_no_advice_that_is_wrong_for_this_tool(image_folder, tmp_path, monkeypatch, caplog):
    """On a machine with many cores Lightning advises more workers for every loader with fewer
    than two, also for cached features that are already in memory; and it advertises other
    products. A fit with the cache says neither."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.chdir(tmp_path)
    args = [
        "fit", "--config", cli.__file__.replace("caltech_cli/cli.py", "configs/transfer.yaml"),
        "--data.source", str(image_folder), "--data.data_dir", str(tmp_path / "data"), "--data.split", "[50, 25, 25]",
        "--data.num_workers", "2", "--model.image_size", "64", "--trainer.max_epochs", "1",
        "--trainer.default_root_dir", str(tmp_path / "runs"), "--trainer.logger", "false",
        "--trainer.enable_progress_bar", "false",
    ]
    with warnings.catch_warnings(record=True) as caught, caplog.at_level("INFO"):
        warnings.simplefilter("always")
        cli.main(args)
    said = [str(w.message) for w in caught] + [caplog.text]
    assert "GPU available" in caplog.text, "Lightning's messages are captured"
    assert not [s for s in said if "does not have many workers" in s]
    assert not [s for s in said if "💡" in s or "litlogger" in s or "litmodels" in s]
    assert (tmp_path / "runs" / "best.ckpt").exists(), "the fit ran"


def test_package_does_not_pin_torch():
    """`pip install caltech-cli` on a GPU machine must keep its CUDA build of torch: ranges whose
    floors lie above the known security holes, no exact versions."""
    requirements = {
        r.name: r for r in map(Requirement, importlib.metadata.requires("caltech-cli")) if not r.marker
    }
    for name, floor in (("torch", "2.10"), ("torchvision", "0.25"), ("pytorch-lightning", "2.6.6")):
        specifiers = list(requirements[name].specifier)
        assert not [s for s in specifiers if s.operator in ("==", "===", "~=")], f"{name} is pinned"
        lower = [Version(s.version) for s in specifiers if s.operator == ">="]
        assert lower and min(lower) >= Version(floor), f"{name} allows releases with known holes"
    assert Version("2.11") in requirements["torch"].specifier, "the checked lower bound is allowed"


# Runs the command's own entry point in a fresh interpreter and reports what it left loaded.
ENTRY_PROBE = """
import gc, json, sys
sys.argv = ["caltech", *sys.argv[1:]]
import caltech_cli
import caltech_cli.__main__ as entry
package_alone = sorted(m for m in ("torch", "pytorch_lightning") if m in sys.modules)
frozen = []
for _ in range(2):  # a second run in the same process, as in a notebook
    try:
        entry.main()
    except SystemExit:
        pass
    frozen.append(gc.get_freeze_count())
print(json.dumps({"package_alone": package_alone, "frozen": frozen, "collecting": gc.isenabled(),
                  "timm": "timm" in sys.modules, "submodule": caltech_cli.features.__name__}))
"""


def test_command_start_up_keeps_the_collector_off_the_imports(tmp_path):
    """`caltech`'s entry point imports torch and Lightning with the garbage collector paused and
    then freezes what they made (``gc.freeze``): its passes over those objects cost about 2 s of a
    one-image predict on a 2-core CPU (benchmarks/startup.py). Parsing the options of a torchvision
    backbone must not import timm either (jsonargparse runs a module's TYPE_CHECKING imports)."""
    missing = tmp_path / "not-here"
    result = subprocess.run([sys.executable, "-c", ENTRY_PROBE, "fit", "--config", TRANSFER, "--data.source",
                             str(missing), "--trainer.logger", "false"],
                            capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert f"caltech: error: data.source {missing} does not exist" in result.stderr, "the options were parsed"
    probe = json.loads(result.stdout.strip().splitlines()[-1])
    assert probe["package_alone"] == [], "importing the package loads torch or Lightning before the entry point"
    assert probe["frozen"][0] > 100_000, "the imports' objects are left to the collector"
    assert probe["frozen"][1] <= probe["frozen"][0], "a second run froze the first run's leftovers"
    assert probe["submodule"] == "caltech_cli.features", "submodules are attributes of the package, as before"
    assert probe["collecting"], "the collector stays off for the run"
    assert not probe["timm"], "parsing a torchvision backbone's options imported timm"
