"""The second round of hostile and clumsy inputs (issue 10): options, checkpoints, data sets,
file names, output paths, CSV cells, interruptions and where a run's files go.

Errors that come before training run ``caltech`` in this process (``main``), the rest in a
subprocess; either way the user sees one ``caltech: error:`` line and exit status 2.
"""

from __future__ import annotations

import csv
import logging
import os
import shutil
import signal
import sys
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import pytest
import torch
from conftest import CLASSES, FOLDER, TRANSFER, run_caltech, small_run

from caltech_cli import report
from caltech_cli.callbacks import BestAndLastCheckpoint, PredictionWriter
from caltech_cli.cli import main


def caltech(*args: str, capsys: pytest.CaptureFixture) -> tuple[int, str]:
    """Run ``caltech`` in this process; its exit status and what it printed to stderr."""
    package = logging.getLogger("caltech_cli")
    handlers = list(package.handlers)
    try:
        with mock.patch.object(sys, "argv", ["caltech"]):  # not pytest's arguments
            main(list(args))
        status = 0
    except SystemExit as stop:
        status = stop.code
    finally:
        package.handlers[:] = handlers  # main adds one for each call, bound to this test's stderr
    return status, capsys.readouterr().err


def one_error(status: int, stderr: str) -> str:
    """The one ``caltech: error:`` line, asserting it is the only one, with exit status 2 and no
    traceback or usage text."""
    errors = [line for line in stderr.splitlines() if line.startswith("caltech: error:")]
    assert status == 2 and len(errors) == 1, stderr[-3000:]
    assert "Traceback" not in stderr and "usage:" not in stderr, stderr[-3000:]
    assert "Fix:" in errors[0], errors[0]
    return errors[0]


def options(tmp_path: Path, source: Path | str, *more: str) -> list[str]:
    return [*small_run(tmp_path, str(source)), "--trainer.logger", "false", "--trainer.max_epochs", "1", *more]


# -- option values --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("bad", "says"),
    [
        (["--data.batch_size", "0"], "data.batch_size 0"),
        (["--data.feature_batch_size", "0"], "data.feature_batch_size 0"),
        (["--data.num_workers", "-1"], "data.num_workers -1"),
        (["--data.split", "[70, -10, 40]"], "data.split [70.0, -10.0, 40.0]"),
        (["--model.image_size", "0"], "model.image_size 0"),
        (["--data.crop_scale", "[1.0, 0.5]"], "data.crop_scale [1.0, 0.5]"),
        (["--optimizer.lr", "-0.001"], "optimizer.lr -0.001"),
        (["--data.cache_views", "-1"], "data.cache_views -1"),
        (["--data.batch_size", "many"], "--data.batch_size many: expected int"),
        (["--trainer.max_epochs", "x"], "--trainer.max_epochs x: expected int"),
        (["--data.batch_sise", "8"], "--data.batch_sise is not an option"),
    ],
    ids=["batch_size", "feature_batch_size", "num_workers", "split", "image_size", "crop_scale", "lr", "cache_views",
         "not-a-number", "trainer-type", "typo"],
)
def test_a_bad_value_is_one_line(image_folder, tmp_path, capsys, bad, says):
    line = one_error(*caltech("fit", *options(tmp_path, image_folder, *bad), capsys=capsys))
    assert says in line
    assert not (tmp_path / "runs" / "checkpoints").exists(), "nothing was trained"


@pytest.mark.parametrize("weights", ["IMAGENET1K_V1", "null", "/no/such/file.pth"])
def test_unknown_backbone_gets_close_names_whatever_the_weights(tmp_path, capsys, weights):
    line = one_error(*caltech("fit", "--config", TRANSFER, "--model.backbone", "resnet181", "--model.weights",
                              weights, capsys=capsys))
    assert "'resnet181' is not a torchvision classification model" in line and "resnet18," in line


# -- data sets ------------------------------------------------------------------------------------


def copy_of(image_folder: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "images" / FOLDER
    shutil.copytree(image_folder, folder)
    return folder


def test_one_class_is_refused(image_folder, tmp_path, capsys):
    folder = tmp_path / "one"
    shutil.copytree(image_folder / "circles", folder / "circles")
    assert "has one class (circles)" in one_error(*caltech("fit", *options(tmp_path, folder), capsys=capsys))
    subset = options(tmp_path, image_folder, "--data.classes", "[squares]")
    assert "data.classes keeps one class (squares)" in one_error(*caltech("fit", *subset, capsys=capsys))


def test_class_folder_without_images_is_refused_by_name(image_folder, tmp_path, capsys):
    folder = copy_of(image_folder, tmp_path)
    (folder / "triangles").mkdir()
    (folder / "triangles" / "notes.txt").write_text("to do: draw triangles\n")
    line = one_error(*caltech("fit", *options(tmp_path, folder), capsys=capsys))
    assert "hold no usable images: triangles" in line and "head for classes that never occur" in line


def test_gitkeep_readme_and_names_that_are_not_utf8_do_not_stop_fit(image_folder, tmp_path):
    folder = copy_of(image_folder, tmp_path)
    (folder / "circles" / ".gitkeep").touch()
    (folder / "squares" / "README").touch()
    circles = os.fsencode(folder / "circles")
    shutil.copy(circles + b"/image_0001.jpg", circles + b"/caf\xe9.jpg")
    result = run_caltech("fit", *options(tmp_path, folder), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "circles/.gitkeep" in result.stderr and "squares/README" in result.stderr, "listed as not images"
    assert f"{3 * 12 + 3} images in 3 classes" in result.stderr, "the file with the odd name is trained on"


def test_class_folder_name_that_is_not_utf8_is_refused(image_folder, tmp_path, capsys):
    folder = copy_of(image_folder, tmp_path)
    os.rename(os.fsencode(folder / "stripes"), os.fsencode(folder) + b"/str\xffipes")
    line = one_error(*caltech("fit", *options(tmp_path, folder), capsys=capsys))
    assert "str\\xffipes" in line and "not valid UTF-8" in line


@pytest.mark.parametrize("where", ["file", "under-a-file"])
def test_data_dir_that_is_a_file_is_refused(tar_archive, tmp_path, capsys, where):
    blocker = tmp_path / "blocker"
    blocker.write_text("the user's file\n")
    data_dir = blocker if where == "file" else blocker / "data"
    line = one_error(*caltech("fit", *options(tmp_path, tar_archive), "--data.data_dir", str(data_dir),
                              capsys=capsys))
    assert f"data.data_dir: {data_dir} cannot be made a folder" in line
    assert blocker.read_text() == "the user's file\n"


# -- checkpoints ----------------------------------------------------------------------------------


NOT_OURS = {
    "state-dict": {"features.0.0.weight": torch.zeros(2)},
    "list": [torch.zeros(2)],
    "other-program": {"state_dict": {"encoder.weight": torch.zeros(2)}, "pytorch-lightning_version": "2.6.6",
                      "hyper_parameters": {"hidden": 64, "lr": 0.1}},
    "text": "name,score\nx,1\n",
}


@pytest.mark.parametrize(
    ("kind", "says"),
    [
        ("state-dict", "a plain state dict"),
        ("list", "it holds a list"),
        ("other-program", "without caltech's model options"),
        ("text", "not a file torch.save wrote"),
    ],
)
@pytest.mark.parametrize("command", ["test", "export"])
def test_checkpoint_that_is_not_ours_is_one_line(image_folder, tmp_path, capsys, kind, says, command):
    path = tmp_path / "other.ckpt"
    if isinstance(NOT_OURS[kind], str):
        path.write_text(NOT_OURS[kind])
    else:
        torch.save(NOT_OURS[kind], path)
    args = ["--ckpt_path", str(path)]
    if command == "test":
        args = [*options(tmp_path, image_folder), *args]
    assert says in one_error(*caltech(command, *args, capsys=capsys))


EVIL_MODULE = """import pathlib
pathlib.Path({marker!r}).write_text("imported")


class Evil:
    pass


def make(cls, hparams):
    pathlib.Path({marker!r}).write_text("called")
"""


def evil_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An importable module whose import or call leaves a marker file: what a checkpoint's
    ``_class_path`` or ``_instantiator`` would run if anything honoured them."""
    marker = tmp_path / "pwned"
    (tmp_path / "evilmod.py").write_text(EVIL_MODULE.format(marker=str(marker)))
    monkeypatch.syspath_prepend(str(tmp_path))
    return marker


def test_checkpoint_asking_to_import_a_class_is_refused(trained_run, tmp_path, capsys, monkeypatch):
    marker = evil_module(tmp_path, monkeypatch)
    checkpoint = torch.load(trained_run.best, weights_only=True)
    checkpoint["hyper_parameters"].update(_class_path="evilmod.Evil", _instantiator="evilmod.make")
    torch.save(checkpoint, tmp_path / "evil.ckpt")
    for command in ("test", "export"):
        args = ["--ckpt_path", str(tmp_path / "evil.ckpt")]
        if command == "test":
            args = [*options(tmp_path, trained_run.source), *args]
        assert "_class_path" in one_error(*caltech(command, *args, capsys=capsys))
    assert not marker.exists() and "evilmod" not in sys.modules


def test_instantiator_in_a_checkpoint_is_never_called(trained_run, tmp_path, capsys, monkeypatch):
    """CVE-2026-58659: Lightning's load_from_checkpoint called a checkpoint's ``_instantiator``.
    caltech never uses that loader; the CLI reads the options itself and drops the key."""
    marker = evil_module(tmp_path, monkeypatch)
    checkpoint = torch.load(trained_run.best, weights_only=True)
    checkpoint["hyper_parameters"]["_instantiator"] = "evilmod.make"
    torch.save(checkpoint, tmp_path / "evil.ckpt")
    photos = tmp_path / "photos"
    photos.mkdir()
    shutil.copy(trained_run.root / "data" / FOLDER / "circles" / "image_0001.jpg", photos / "one.jpg")
    status, stderr = caltech("predict", "--config", TRANSFER, "--ckpt_path", str(tmp_path / "evil.ckpt"),
                             "--data.predict_dir", str(photos), "--trainer.logger", "false",
                             "--trainer.default_root_dir", str(tmp_path / "out"), capsys=capsys)
    assert status == 0, stderr[-3000:]
    status, stderr = caltech("export", "--ckpt_path", str(tmp_path / "evil.ckpt"), "--format", "torchscript",
                             "--output", str(tmp_path / "model.pt"), capsys=capsys)
    assert status == 0, stderr[-3000:]
    assert not marker.exists() and "evilmod" not in sys.modules


def test_checkpoint_options_that_win_are_named(trained_run, tmp_path, capsys):
    checkpoint = torch.load(trained_run.best, weights_only=True)
    checkpoint["hyper_parameters"]["image_size"] = 32
    torch.save(checkpoint, tmp_path / "small.ckpt")
    photos = tmp_path / "photos"
    photos.mkdir()
    shutil.copy(trained_run.root / "data" / FOLDER / "circles" / "image_0001.jpg", photos / "one.jpg")
    status, stderr = caltech("predict", "--config", TRANSFER, "--ckpt_path", str(tmp_path / "small.ckpt"),
                             "--model.image_size", "64", "--data.predict_dir", str(photos), "--trainer.logger",
                             "false", "--trainer.default_root_dir", str(tmp_path / "out"), capsys=capsys)
    assert status == 0, stderr[-3000:]
    said = [line for line in stderr.splitlines() if line.startswith("Using the checkpoint's")]
    assert len(said) == 1 and "model.image_size 32 (not 64)" in said[0], stderr[-3000:]


def test_checkpoint_of_other_classes_is_refused_before_any_image_is_read(trained_run, tmp_path, capsys):
    data_dir = tmp_path / "data"
    status, stderr = caltech("test", *options(tmp_path, trained_run.source), "--data.data_dir", str(data_dir),
                             "--data.classes", "[circles, squares]", "--ckpt_path", str(trained_run.best),
                             capsys=capsys)
    assert "trained on 3 classes" in one_error(status, stderr)
    assert not (data_dir / "feature-cache").exists(), "refused before the test images were read"


def test_predict_without_predict_dir_says_so_at_once(tmp_path, capsys):
    line = one_error(*caltech("predict", "--config", TRANSFER, "--data.data_dir", str(tmp_path / "data"),
                              "--trainer.logger", "false", capsys=capsys))
    assert "predict needs images" in line and "--data.predict_dir" in line
    assert not (tmp_path / "data").exists(), "no download was tried"


# -- outputs --------------------------------------------------------------------------------------


def test_output_paths_that_cannot_be_written(trained_run, tmp_path, capsys):
    blocker = tmp_path / "blocker"
    blocker.write_text("the user's file\n")
    photos = tmp_path / "photos"
    photos.mkdir()
    shutil.copy(trained_run.root / "data" / FOLDER / "circles" / "image_0001.jpg", photos / "one.jpg")
    predict = ["predict", "--config", TRANSFER, "--ckpt_path", str(trained_run.best), "--data.predict_dir",
               str(photos), "--trainer.logger", "false", "--trainer.default_root_dir", str(tmp_path / "out")]
    line = one_error(*caltech(*predict, "--predictions.output", str(photos), capsys=capsys))
    assert f"predictions.output: {photos} is a folder" in line
    line = one_error(*caltech(*predict, "--predictions.output", str(blocker / "p.csv"), capsys=capsys))
    assert f"predictions.output: {blocker} cannot be made a folder" in line
    line = one_error(*caltech("export", "--ckpt_path", str(trained_run.best), "--output", str(blocker / "m.onnx"),
                              capsys=capsys))
    assert f"output: {blocker} cannot be made a folder" in line
    assert "is a folder" in one_error(*caltech("export", "--ckpt_path", str(trained_run.best), "--output",
                                               str(tmp_path), capsys=capsys))
    assert blocker.read_text() == "the user's file\n"


@pytest.mark.parametrize("option", ["trainer.default_root_dir", "data.cache_dir", "report.output", "compare"])
def test_output_folder_that_is_a_file_is_refused(trained_run, tmp_path, capsys, option):
    blocker = tmp_path / "blocker"
    blocker.write_text("the user's file\n")
    if option == "compare":
        args = ["compare", str(trained_run.runs), "--output", str(blocker)]
        option = "output"
    else:
        command = "test" if option == "report.output" else "fit"
        args = [command, *options(tmp_path, trained_run.source), f"--{option}", str(blocker)]
        args += ["--ckpt_path", str(trained_run.best)] if command == "test" else []
    line = one_error(*caltech(*args, capsys=capsys))
    assert f"{option}: {blocker} cannot be made a folder (a file is in its way)" in line
    assert blocker.read_text() == "the user's file\n"


def test_a_runs_files_are_all_in_its_folder(trained_run):
    """The configs name no logger folder: W&B, config.yaml and checkpoints follow default_root_dir."""
    runs = trained_run.runs
    assert (runs / "config.yaml").is_file() and (runs / "wandb").is_dir() and (runs / "history.csv").is_file()
    run_ids = [p.name for p in (runs / "caltech").iterdir()]
    assert len(run_ids) == 1 and (runs / "caltech" / run_ids[0] / "checkpoints" / "last.ckpt").is_file()
    assert trained_run.best.resolve().parent == runs / "caltech" / run_ids[0] / "checkpoints"
    assert {p.name for p in trained_run.root.iterdir()} == {"data", "runs"}, "nothing in the current folder"


def test_a_file_named_best_ckpt_is_never_replaced(image_folder, tmp_path, capsys):
    runs = tmp_path / "runs"
    runs.mkdir()
    (runs / "best.ckpt").write_text("the user's own file\n")
    line = one_error(*caltech("fit", *options(tmp_path, image_folder), capsys=capsys))
    assert f"{runs / 'best.ckpt'} is in the way" in line and "move or rename it" in line
    assert (runs / "best.ckpt").read_text() == "the user's own file\n"
    assert not list(runs.glob("checkpoints/*.ckpt")), "refused before training"


def test_best_ckpt_link_of_an_earlier_fit_is_replaced(tmp_path):
    checkpoint = BestAndLastCheckpoint()
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "best.ckpt").symlink_to("checkpoints/best-epoch00-val_acc0.5000.ckpt")
    trainer = SimpleNamespace(default_root_dir=str(tmp_path))
    assert checkpoint.best_link(trainer) == tmp_path / "best.ckpt"


# -- CSV files ------------------------------------------------------------------------------------

FORMULAS = ["=HYPERLINK(\"x\")", "+1+2", "-1+2", "@SUM(1)", "\tTAB", "\rCR"]


def test_prediction_cells_cannot_be_formulas_and_odd_names_are_written(tmp_path):
    names = [f"{f}.jpg" for f in FORMULAS] + ["caf\udce9.jpg", "after.jpg"]  # \udce9: the byte 0xE9 of a name
    files = [tmp_path / name for name in names]
    trainer = SimpleNamespace(default_root_dir=str(tmp_path),
                              datamodule=SimpleNamespace(predict_dir=str(tmp_path), predict_files=files))
    module = SimpleNamespace(class_names=["=cmd", "plain"])
    writer = PredictionWriter()
    writer.on_predict_start(trainer, module)
    batch = {"index": torch.arange(len(files)), "probs": torch.tensor([[0.9, 0.1]] * len(files)),
             "error": [""] * (len(files) - 1) + ["-bad image"]}
    writer.write_on_batch_end(trainer, module, batch, None, None, 0, 0)
    writer.on_predict_end(trainer, module)
    with open(tmp_path / "predictions.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert [row["path"] for row in rows] == [f"'{f}.jpg" for f in FORMULAS] + ["caf\\xe9.jpg", "after.jpg"]
    assert {row["class"] for row in rows[:-1]} == {"'=cmd"} and rows[-1]["error"] == "'-bad image"


def test_per_class_cells_cannot_be_formulas(tmp_path):
    probs = torch.tensor([[0.8, 0.2], [0.3, 0.7]])
    rows = report.per_class(probs, torch.tensor([0, 1]), ["=1+1", "@cmd"])
    report.write_per_class(rows, tmp_path / "per_class.csv")
    with open(tmp_path / "per_class.csv", newline="", encoding="utf-8") as f:
        assert [row["class"] for row in csv.DictReader(f)] == ["'=1+1", "'@cmd"]


def write_history(run: Path, text: str | bytes) -> Path:
    run.mkdir(parents=True)
    (run / "history.csv").write_bytes(text if isinstance(text, bytes) else text.encode())
    return run


def test_compare_table_cells_cannot_be_formulas(tmp_path, capsys):
    first = write_history(tmp_path / "=1+2", "epoch,val/acc,val/loss\n0,0.5,1.0\n1,0.75,0.5\n")
    second = write_history(tmp_path / "plain", "epoch,val/acc,val/loss\n0,0.6,0.9\n")
    status, stderr = caltech("compare", str(first), str(second), "--output", str(tmp_path / "cmp"), capsys=capsys)
    assert status == 0, stderr
    with open(tmp_path / "cmp" / "comparison.csv", newline="", encoding="utf-8") as f:
        assert [row["run"] for row in csv.DictReader(f)] == ["'=1+2", "plain"]


@pytest.mark.parametrize(
    ("content", "says"),
    [
        ("epoch,val/acc\n0,0.5\n1,lots\n", "could not convert string to float"),
        ("val/acc\n0.5\n", "no 'epoch' column"),
        (b"\x89PNG\r\n\x1a\n\x00\xff\xfe", "damaged"),
        ("epoch,val/acc\n0,0.5,extra,cells\n", "damaged"),
    ],
    ids=["not-a-number", "no-epoch", "binary", "extra-cells"],
)
def test_compare_on_a_damaged_history_is_one_line(tmp_path, capsys, content, says):
    run = write_history(tmp_path / "run", content)
    line = one_error(*caltech("compare", str(run), "--output", str(tmp_path / "cmp"), capsys=capsys))
    assert f"{run / 'history.csv'} is damaged" in line and says in line


def test_compare_on_damaged_test_metrics_is_one_line(tmp_path, capsys):
    run = write_history(tmp_path / "run", "epoch,val/acc\n0,0.5\n")
    (run / "report").mkdir()
    (run / "report" / "metrics.json").write_text('{"test/acc": 0.9')
    line = one_error(*caltech("compare", str(run), "--output", str(tmp_path / "cmp"), capsys=capsys))
    assert f"{run / 'report' / 'metrics.json'} is damaged" in line


# -- interruptions --------------------------------------------------------------------------------


def test_ctrl_c_between_the_best_and_the_last_write_still_leaves_last_ckpt(image_folder, tmp_path, capsys,
                                                                          monkeypatch):
    """The signal lands after epoch 0's best checkpoint is written and before its last.ckpt."""
    real = BestAndLastCheckpoint._save_last_checkpoint
    calls = []

    def interrupted_once(self, trainer, monitor_candidates):
        calls.append(trainer.global_step)
        if len(calls) == 1:
            raise KeyboardInterrupt
        real(self, trainer, monitor_candidates)

    monkeypatch.setattr(BestAndLastCheckpoint, "_save_last_checkpoint", interrupted_once)
    try:
        status, stderr = caltech("fit", *options(tmp_path, image_folder, "--trainer.max_epochs", "3"), capsys=capsys)
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)  # Lightning ignores Ctrl-C after the first
    folder = tmp_path / "runs" / "checkpoints"
    assert status == 128 + signal.SIGINT, stderr[-3000:]
    bests = [p.name for p in folder.glob("best-epoch00-*.ckpt")]
    assert len(bests) == 1 and {p.name for p in folder.iterdir()} == {*bests, "last.ckpt"}, list(folder.iterdir())
    assert torch.load(folder / "last.ckpt", weights_only=True)["global_step"] == calls[0]
