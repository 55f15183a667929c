"""The package: its dependencies, its start-up, and the names saved configs and checkpoints use."""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import shutil
import subprocess
import sys

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from conftest import FIXTURE, TRANSFER, caltech, csv_rows


def test_package_does_not_pin_torch():
    """`pip install caltech-cli` on a GPU machine must keep its CUDA build of torch: ranges whose
    floors lie above the known security holes, no exact versions."""
    requirements = {r.name: r for r in map(Requirement, importlib.metadata.requires("caltech-cli")) if not r.marker}
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


@pytest.mark.e2e
def test_command_start_up_keeps_the_collector_off_the_imports(tmp_path):
    """`caltech`'s entry point imports torch and Lightning with the garbage collector paused and
    then freezes what they made (``gc.freeze``): its passes over those objects cost about 2 s of a
    one-image predict on a 2-core CPU (benchmarks/startup.py). Parsing the options of a torchvision
    backbone must not import timm either (jsonargparse runs a module's TYPE_CHECKING imports)."""
    missing = tmp_path / "not-here"
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            ENTRY_PROBE,
            "fit",
            "--config",
            TRANSFER,
            "--data.source",
            str(missing),
            "--trainer.logger",
            "false",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert f"caltech: error: data.source {missing} does not exist" in result.stderr, "the options were parsed"
    probe = json.loads(result.stdout.strip().splitlines()[-1])
    assert probe["package_alone"] == [], "importing the package loads torch or Lightning before the entry point"
    assert probe["frozen"][0] > 100_000, "the imports' objects are left to the collector"
    assert probe["frozen"][1] <= probe["frozen"][0], "a second run froze the first run's leftovers"
    assert probe["submodule"] == "caltech_cli.features", "submodules are attributes of the package, as before"
    assert probe["collecting"], "the collector stays off for the run"
    assert not probe["timm"], "parsing a torchvision backbone's options imported timm"


# Class paths that saved configs and checkpoints of earlier versions name.
SAVED_CLASS_PATHS = [
    "caltech_cli.Caltech101DataModule",
    "caltech_cli.ImageFolderDataModule",
    "caltech_cli.data.Caltech101DataModule",
    "caltech_cli.data.ImageFolderDataModule",
    "caltech_cli.data.ImageClassificationDataModule",
    "caltech_cli.TransferClassifier",
    "caltech_cli.model.TransferClassifier",
    "caltech_cli.loggers.WandbLogger",
    "caltech_cli.BackboneUnfreeze",
    "caltech_cli.finetuning.BackboneUnfreeze",
    "caltech_cli.callbacks.BestAndLastCheckpoint",
    "caltech_cli.callbacks.PredictionWriter",
    "caltech_cli.callbacks.TestReport",
    "caltech_cli.callbacks.WandbValidationSamples",
    "caltech_cli.callbacks.WandbSaveConfig",
    "caltech_cli.callbacks.EpochHistory",
]


@pytest.mark.parametrize("path", SAVED_CLASS_PATHS)
def test_class_paths_of_earlier_versions_still_import(path):
    module, _, name = path.rpartition(".")
    assert isinstance(getattr(importlib.import_module(module), name), type)


def test_config_and_checkpoint_of_an_earlier_version_score_as_they_did(image_folder, tmp_path, capsys):
    """``config.yaml`` and ``best.ckpt`` written by 0.1.0 (``fixtures/v0.1.0/README.md``): ``test`` scores
    the same images as it did then, ``predict`` and ``export`` take the checkpoint, and a fit resumes from it."""
    where = ["--data.source", str(image_folder), "--data.data_dir", str(tmp_path / "data")]
    run = ["--config", str(FIXTURE / "config.yaml"), *where, "--trainer.default_root_dir", str(tmp_path / "runs")]
    checkpoint = ["--ckpt_path", str(FIXTURE / "best.ckpt")]
    status, stderr = caltech("test", *run, *checkpoint, capsys=capsys)
    assert status == 0, stderr[-3000:]
    then = json.loads((FIXTURE / "metrics.json").read_text())
    now = json.loads((tmp_path / "runs" / "report" / "metrics.json").read_text())
    assert now == pytest.approx(then, rel=1e-4)
    status, stderr = caltech(
        "predict", *run, *checkpoint, "--data.predict_dir", str(image_folder / "circles"), capsys=capsys
    )
    assert status == 0 and len(csv_rows(tmp_path / "runs" / "predictions.csv")) == 13, stderr[-3000:]
    status, stderr = caltech(
        "export", *checkpoint, "--format", "torchscript", "--output", str(tmp_path / "m.pt"), capsys=capsys
    )
    assert status == 0 and (tmp_path / "m.pt").is_file(), stderr[-3000:]
    resumed = str(shutil.copy(FIXTURE / "best.ckpt", tmp_path / "best.ckpt"))
    status, stderr = caltech("fit", *run, "--ckpt_path", resumed, "--trainer.max_epochs", "3", capsys=capsys)
    assert status == 0, stderr[-3000:]
    assert [row["epoch"] for row in csv_rows(tmp_path / "runs" / "history.csv")] == ["2"], "only the epoch after it"
