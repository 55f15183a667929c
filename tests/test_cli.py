"""The caltech command end to end: fit, test, predict, options, where a run's files go."""

from __future__ import annotations

import csv
import os
import re
import shutil
import subprocess
import sys
import warnings

import pytest
import torch
from PIL import Image

from caltech_cli import cli
from caltech_cli.cli import make_cli

from conftest import (
    CLASSES,
    FINETUNE,
    REAL_ARCHIVE,
    SCRATCH,
    TRANSFER,
    caltech,
    damaged_png,
    one_error,
    options,
    predicting,
    run_caltech,
    small_run,
)


def metric(output: str, name: str) -> float:
    match = re.search(rf"^\s*{re.escape(name)}\s+([0-9.]+)\s*$", output, re.MULTILINE)
    assert match, f"{name} not printed:\n{output[-3000:]}"
    return float(match.group(1))


@pytest.mark.e2e
def test_fit_then_test(trained_run):
    fit, test = trained_run.fit, trained_run.test
    assert trained_run.best.is_symlink() and trained_run.best.resolve().is_file()
    assert "Best checkpoint (val/acc=" in fit.stderr
    assert "Last checkpoint:" in fit.stderr
    assert list(trained_run.runs.glob("wandb/offline-run-*")), "W&B logs offline into the run folder"
    assert "already extracted" in test.stderr
    with open(trained_run.runs / "history.csv", newline="") as f:
        epochs = list(csv.DictReader(f))
    assert len(epochs) == 4 and all(float(e["train/images_per_s"]) > 0 < float(e["train/seconds"]) for e in epochs)
    assert metric(test.stdout, "test/acc") >= 0.8
    for name in ("test/acc_top5", "test/acc_macro", "test/loss"):
        metric(test.stdout, name)


@pytest.mark.e2e
def test_predict_needs_only_the_checkpoint(trained_run, tmp_path):
    photos = tmp_path / "photos"
    (photos / "nested").mkdir(parents=True)
    folder = trained_run.root / "data" / "101_ObjectCategories"
    for kind in CLASSES:
        shutil.copy(folder / kind / "image_0001.jpg", photos / f"{kind}.jpg")
    Image.open(folder / "stripes" / "image_0002.jpg").save(photos / "nested" / "stripes.png")
    predict = run_caltech(
        "predict",
        "--config",
        TRANSFER,
        "--ckpt_path",
        str(trained_run.best),
        "--data.predict_dir",
        str(photos),
        "--data.source",
        str(tmp_path / "no-training-data-here"),
        "--trainer.default_root_dir",
        str(tmp_path / "out"),
        "--trainer.logger",
        "false",
        cwd=tmp_path,
    )
    assert predict.returncode == 0, predict.stderr[-3000:]
    with open(tmp_path / "out" / "predictions.csv") as f:
        rows = {row["path"]: row for row in csv.DictReader(f)}
    assert set(rows) == {"circles.jpg", "squares.jpg", "stripes.jpg", "nested/stripes.png"}
    assert sum(rows[f"{kind}.jpg"]["class"] == kind for kind in CLASSES) >= 2, rows
    assert 0 < float(rows["circles.jpg"]["probability"]) <= 1
    assert not (tmp_path / "no-training-data-here").exists()


def test_head_is_in_the_optimizer_when_data_is_fetched_at_start(tar_archive, tmp_path):
    """The CLI makes the optimizer as it builds the model: the head must exist by then."""
    cli = make_cli(small_run(tmp_path, str(tar_archive)), run=False)
    assert cli.model.class_names == sorted(CLASSES)
    assert cli.datamodule.preprocessing.crop_size == 64, "preprocessing is linked from the model"
    optimizer = cli.model.configure_optimizers()
    optimizer = optimizer[0][0] if isinstance(optimizer, tuple) else optimizer
    params = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert id(cli.model.head.weight) in params


@pytest.mark.e2e
def test_scratch_config_is_valid(tmp_path):
    result = run_caltech("fit", "--config", SCRATCH, "--print_config", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "weights: null" in result.stdout and "freeze_backbone: false" in result.stdout


@pytest.mark.e2e
def test_missing_data_is_one_clear_error(tmp_path):
    result = run_caltech(
        "fit",
        "--config",
        TRANSFER,
        "--data.source",
        str(tmp_path / "nothing.tar.gz"),
        "--trainer.logger",
        "false",
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert "caltech: error: data.source" in result.stderr and "nothing.tar.gz does not exist" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.e2e
def test_python_dash_m_works(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "caltech_cli", "--help"], capture_output=True, text=True, cwd=tmp_path
    )
    assert result.returncode == 0 and "fit" in result.stdout and "predict" in result.stdout


@pytest.mark.e2e
@pytest.mark.real_data
@pytest.mark.skipif(not REAL_ARCHIVE.is_file(), reason="the real Caltech-101 archive is not here")
def test_real_archive_few_classes(tmp_path):
    """Transfer learning on three real Caltech-101 classes, from the real archive."""
    classes = "[airplanes, Motorbikes, Faces_easy]"
    options = [
        "--config",
        TRANSFER,
        "--data.source",
        str(REAL_ARCHIVE),
        "--data.data_dir",
        str(tmp_path / "data"),
        "--data.classes",
        classes,
        "--data.split",
        "[60, 20, 20]",
        "--model.image_size",
        "128",
        "--trainer.default_root_dir",
        str(tmp_path / "runs"),
        "--trainer.logger",
        "false",
        "--trainer.limit_train_batches",
        "10",
    ]
    fit = run_caltech("fit", *options, "--trainer.max_epochs", "1", cwd=tmp_path, timeout=900)
    assert fit.returncode == 0, fit.stderr[-3000:]
    test = run_caltech("test", *options, "--ckpt_path", str(tmp_path / "runs" / "best.ckpt"), cwd=tmp_path, timeout=900)
    assert test.returncode == 0, test.stderr[-3000:]
    assert metric(test.stdout, "test/acc") >= 0.9


def test_no_advice_that_is_wrong_for_this_tool(image_folder, tmp_path, monkeypatch, caplog):
    """On a machine with many cores Lightning advises more workers for every loader with fewer
    than two, also for cached features that are already in memory; and it advertises other
    products. A fit with the cache says neither."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.chdir(tmp_path)
    args = [
        "fit",
        "--config",
        cli.__file__.replace("caltech_cli/cli.py", "configs/transfer.yaml"),
        "--data.source",
        str(image_folder),
        "--data.data_dir",
        str(tmp_path / "data"),
        "--data.split",
        "[50, 25, 25]",
        "--data.num_workers",
        "2",
        "--model.image_size",
        "64",
        "--trainer.max_epochs",
        "1",
        "--trainer.default_root_dir",
        str(tmp_path / "runs"),
        "--trainer.logger",
        "false",
        "--trainer.enable_progress_bar",
        "false",
    ]
    with warnings.catch_warnings(record=True) as caught, caplog.at_level("INFO"):
        warnings.simplefilter("always")
        cli.main(args)
    said = [str(w.message) for w in caught] + [caplog.text]
    assert "GPU available" in caplog.text, "Lightning's messages are captured"
    assert not [s for s in said if "does not have many workers" in s]
    assert not [s for s in said if "💡" in s or "litlogger" in s or "litmodels" in s]
    assert (tmp_path / "runs" / "best.ckpt").exists(), "the fit ran"


@pytest.mark.e2e
@pytest.mark.hostile
def test_checkpoint_options_that_win_are_named(trained_run, tmp_path, capsys):
    checkpoint = torch.load(trained_run.best, weights_only=True)
    checkpoint["hyper_parameters"]["image_size"] = 32
    torch.save(checkpoint, tmp_path / "small.ckpt")
    status, stderr = caltech(
        *predicting(trained_run, tmp_path, tmp_path / "small.ckpt"), "--model.image_size", "64", capsys=capsys
    )
    assert status == 0, stderr[-3000:]
    said = [line for line in stderr.splitlines() if line.startswith("Using the checkpoint's")]
    assert len(said) == 1 and "model.image_size 32 (not 64)" in said[0], stderr[-3000:]


@pytest.mark.e2e
@pytest.mark.hostile
def test_checkpoint_of_other_classes_is_refused_before_any_image_is_read(trained_run, tmp_path, capsys):
    data_dir = tmp_path / "data"
    status, stderr = caltech(
        "test",
        *options(tmp_path, trained_run.source),
        "--data.data_dir",
        str(data_dir),
        "--data.classes",
        "[circles, squares]",
        "--ckpt_path",
        str(trained_run.best),
        capsys=capsys,
    )
    assert "trained on 3 classes" in one_error(status, stderr)
    assert not (data_dir / "feature-cache").exists(), "refused before the test images were read"


@pytest.mark.hostile
def test_predict_without_predict_dir_says_so_at_once(tmp_path, capsys):
    line = one_error(
        *caltech(
            "predict",
            "--config",
            TRANSFER,
            "--data.data_dir",
            str(tmp_path / "data"),
            "--trainer.logger",
            "false",
            capsys=capsys,
        )
    )
    assert "predict needs images" in line and "--data.predict_dir" in line
    assert not (tmp_path / "data").exists(), "no download was tried"


@pytest.mark.e2e
@pytest.mark.hostile
def test_a_runs_files_are_all_in_its_folder(trained_run):
    """The configs name no logger folder: W&B, config.yaml and checkpoints follow default_root_dir."""
    runs = trained_run.runs
    assert (runs / "config.yaml").is_file() and (runs / "wandb").is_dir() and (runs / "history.csv").is_file()
    run_ids = [p.name for p in (runs / "caltech").iterdir()]
    assert len(run_ids) == 1 and (runs / "caltech" / run_ids[0] / "checkpoints" / "last.ckpt").is_file()
    assert trained_run.best.resolve().parent == runs / "caltech" / run_ids[0] / "checkpoints"
    assert {p.name for p in trained_run.root.iterdir()} == {"data", "runs"}, "nothing in the current folder"


@pytest.mark.e2e
def test_a_logger_by_its_short_name(image_folder, tmp_path):
    """``--trainer.logger WandbLogger`` names Lightning's: the tool's own loggers module is loaded
    only when a config names it, so the short name stays unambiguous (in a process of its own:
    a test that ran the transfer config here has loaded it)."""
    result = run_caltech("fit", "--data.source", str(image_folder), "--trainer.logger", "WandbLogger",
                         "--print_config", cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "class_path: pytorch_lightning.loggers.WandbLogger" in result.stdout


@pytest.mark.e2e
@pytest.mark.hostile
def test_an_error_in_one_process_of_a_ddp_fit_is_one_line_in_each(image_folder, tmp_path):
    """The process that meets an unreadable image says so; the other, whose partner is gone,
    says that and points at it, with no traceback, and the run exits 2."""
    photos = tmp_path / "photos"
    shutil.copytree(image_folder, photos)
    damaged_png(photos / "squares" / "bad.png", checksum_intact=True)
    ddp = ["--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu"]
    fit = run_caltech("fit", *small_run(tmp_path, str(photos)), "--trainer.logger", "false", "--trainer.max_epochs",
                      "1", "--data.cache_features", "false", *ddp, cwd=tmp_path, timeout=240)  # fmt: skip
    assert fit.returncode == 2, fit.stderr[-3000:]
    errors = [line for line in fit.stderr.splitlines() if "caltech: error:" in line]
    assert any("cannot read image" in line for line in errors), fit.stderr[-3000:]
    assert any("another process of this run stopped" in line for line in errors), fit.stderr[-3000:]
    assert len(errors) == 2 and "Traceback" not in fit.stderr, fit.stderr[-3000:]


@pytest.mark.parametrize(
    ("computes", "more", "precision"),
    [
        (True, [], "bf16-mixed"),  # a backbone that trains, on a CPU that computes bfloat16
        (False, [], "null"),  # emulated bfloat16 would be slower than float32 (null: Lightning's 32-true)
        (True, ["--trainer.precision", "32-true"], "32-true"),  # what the user says wins
        (True, ["--model.freeze_backbone", "true", "--trainer.callbacks", "[]"], "null"),  # a head alone
    ],
)
def test_a_backbone_trains_in_bf16_where_the_cpu_computes_it(
    image_folder, tmp_path, capsys, monkeypatch, computes, more, precision
):
    monkeypatch.setattr(cli, "cpu_computes_bf16", lambda: computes)
    run = [*small_run(tmp_path, str(image_folder), FINETUNE), "--trainer.logger", "false", "--trainer.max_epochs", "1"]
    run += ["--trainer.limit_train_batches", "1", *more]
    status, stderr = caltech("fit", *run, capsys=capsys)
    assert status == 0, stderr[-3000:]
    saved = (tmp_path / "runs" / "config.yaml").read_text()
    assert f"precision: {precision}" in saved
    assert ("Training in bf16-mixed" in stderr) == (precision == "bf16-mixed")


def test_a_resumed_fit_goes_on_in_the_precision_it_trained_in(image_folder, tmp_path, capsys, monkeypatch):
    """Its checkpoint says which: the bf16 default does not switch a float32 fit half-way."""
    monkeypatch.setattr(cli, "cpu_computes_bf16", lambda: True)
    run = [*small_run(tmp_path, str(image_folder), FINETUNE), "--trainer.logger", "false"]
    run += ["--trainer.limit_train_batches", "1", "--trainer.limit_val_batches", "1"]
    status, stderr = caltech("fit", *run, "--trainer.max_epochs", "1", "--trainer.precision", "32-true", capsys=capsys)
    assert status == 0, stderr[-3000:]
    last = str(tmp_path / "runs" / "checkpoints" / "last.ckpt")
    status, stderr = caltech("fit", *run, "--trainer.max_epochs", "2", "--ckpt_path", last, capsys=capsys)
    assert status == 0, stderr[-3000:]
    assert "Resuming in 32-true, the precision the checkpoint trained in." in stderr
    assert "precision: 32-true" in (tmp_path / "runs" / "config.yaml").read_text()


@pytest.mark.parametrize(
    ("trained_in", "computes", "says", "precision"),
    [
        (None, True, "Resuming in 32-true", "32-true"),  # written before caltech recorded it: its day's default
        ("bf16-mixed", False, "which this CPU does not compute itself: the fit goes on in 32-true", "null"),
        ("16-mixed", True, "which this CPU does not compute itself: the fit goes on in bf16-mixed", "bf16-mixed"),
    ],
)
def test_a_resumed_fit_takes_its_checkpoints_precision_only_where_the_machine_computes_it(
    image_folder, tmp_path, capsys, monkeypatch, trained_in, computes, says, precision
):
    """A checkpoint that does not say, or trained where this machine cannot compute alike (a GPU's
    float16, bfloat16 on a CPU without its instructions): one line says what the fit goes on in."""
    run = [*small_run(tmp_path, str(image_folder), FINETUNE), "--trainer.logger", "false"]
    run += ["--trainer.limit_train_batches", "1", "--trainer.limit_val_batches", "1"]
    status, stderr = caltech("fit", *run, "--trainer.max_epochs", "1", "--trainer.precision", "32-true", capsys=capsys)
    assert status == 0, stderr[-3000:]
    last = tmp_path / "runs" / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(last, weights_only=True)
    checkpoint.pop("trainer_precision")
    if trained_in is not None:
        checkpoint["trainer_precision"] = trained_in
    torch.save(checkpoint, last)
    monkeypatch.setattr(cli, "cpu_computes_bf16", lambda: computes)
    status, stderr = caltech("fit", *run, "--trainer.max_epochs", "2", "--ckpt_path", str(last), capsys=capsys)
    assert status == 0, stderr[-3000:]
    assert says in stderr
    assert f"precision: {precision}" in (tmp_path / "runs" / "config.yaml").read_text()


MIXED_BF16 = ["--trainer.plugins", "pytorch_lightning.plugins.precision.MixedPrecision"]
MIXED_BF16 += ["--trainer.plugins.precision", "bf16-mixed", "--trainer.plugins.device", "cpu"]
HALF_BF16 = ["--trainer.plugins", "pytorch_lightning.plugins.precision.HalfPrecision"]
HALF_BF16 += ["--trainer.plugins.precision", "bf16-true"]


@pytest.mark.parametrize(
    ("plugins", "says"),
    [
        (HALF_BF16, "trainer.plugins HalfPrecision converts"),
        ([*MIXED_BF16, "--trainer.precision", "bf16-mixed"], "and so does trainer.precision bf16-mixed"),
    ],
)
def test_a_precision_plugin_that_cannot_work_is_refused(image_folder, tmp_path, capsys, plugins, says):
    run = [*small_run(tmp_path, str(image_folder), FINETUNE), "--trainer.logger", "false"]
    status, stderr = caltech("fit", *run, *plugins, capsys=capsys)
    assert status == 2 and says in stderr and "Traceback" not in stderr, stderr[-3000:]


def test_a_precision_plugin_is_the_users_choice(image_folder, tmp_path, capsys, monkeypatch):
    """Named as a plugin, autocast is the user's precision: the bf16 default stays out of it."""
    monkeypatch.setattr(cli, "cpu_computes_bf16", lambda: True)
    run = [*small_run(tmp_path, str(image_folder), FINETUNE), "--trainer.logger", "false", "--trainer.max_epochs", "1"]
    run += ["--trainer.limit_train_batches", "1", *MIXED_BF16]
    status, stderr = caltech("fit", *run, capsys=capsys)
    assert status == 0, stderr[-3000:]
    assert "Training in bf16-mixed" not in stderr
