"""checkpoints: files of tensors from strangers are read without running anything in them."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
import torchvision

from caltech_cli.backbones import resolve_backbone
from caltech_cli.checkpoints import read_checkpoint
from caltech_cli.errors import CaltechError
from caltech_cli.model import MODEL_OPTIONS

from conftest import FIXTURE, CreatesFile, caltech, one_error, options, predicting, run_caltech, within


@pytest.mark.hostile
def test_weights_file_that_runs_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    torch.save({"conv1.weight": CreatesFile(marker)}, evil)
    with pytest.raises(CaltechError, match="evil.pth"):
        resolve_backbone("resnet18", str(evil))
    assert not marker.exists(), "the pickle's code must not run"


@pytest.mark.e2e
@pytest.mark.hostile
def test_checkpoint_that_runs_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"backbone": CreatesFile(marker)}}, evil)
    result = run_caltech(
        "test", "--ckpt_path", str(evil), "--data.source", str(tmp_path), "--trainer.logger", "false", cwd=tmp_path
    )
    assert result.returncode == 2
    assert "evil.ckpt" in result.stderr and "Traceback" not in result.stderr
    assert not marker.exists(), "the pickle's code must not run"


NOT_OURS = {
    "state-dict": {"features.0.0.weight": torch.zeros(2)},
    "list": [torch.zeros(2)],
    "other-program": {
        "state_dict": {"encoder.weight": torch.zeros(2)},
        "pytorch-lightning_version": "2.6.6",
        "hyper_parameters": {"hidden": 64, "lr": 0.1},
    },
    "text": "name,score\nx,1\n",
}


@pytest.mark.hostile
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


@pytest.mark.e2e
@pytest.mark.hostile
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


@pytest.mark.e2e
@pytest.mark.hostile
def test_instantiator_in_a_checkpoint_is_never_called(trained_run, tmp_path, capsys, monkeypatch):
    """CVE-2026-58659: Lightning's load_from_checkpoint called a checkpoint's ``_instantiator``.
    caltech never uses that loader; the CLI reads the options itself and drops the key."""
    marker = evil_module(tmp_path, monkeypatch)
    checkpoint = torch.load(trained_run.best, weights_only=True)
    checkpoint["hyper_parameters"]["_instantiator"] = "evilmod.make"
    torch.save(checkpoint, tmp_path / "evil.ckpt")
    status, stderr = caltech(*predicting(trained_run, tmp_path, tmp_path / "evil.ckpt"), capsys=capsys)
    assert status == 0, stderr[-3000:]
    status, stderr = caltech(
        "export",
        "--ckpt_path",
        str(tmp_path / "evil.ckpt"),
        "--format",
        "torchscript",
        "--output",
        str(tmp_path / "model.pt"),
        capsys=capsys,
    )
    assert status == 0, stderr[-3000:]
    assert not marker.exists() and "evilmod" not in sys.modules


@pytest.mark.hostile
@pytest.mark.parametrize(
    ("state", "says"),
    [
        ({0: torch.zeros(2)}, "its entry 0 is not a name with a tensor"),
        ({"features.0.0.weight": "x"}, "is not a name with a tensor"),
        ({"features.0.0.weight": torch.zeros(2, dtype=torch.bool)}, "as torch.bool, not as floating-point"),
        ({"features.0.0.weight": torch.zeros(2, dtype=torch.int8)}, "as torch.int8, not as floating-point"),
    ],
    ids=["int-key", "not-a-tensor", "bool", "int8"],
)
def test_weights_that_are_not_float_tensors_by_name_are_refused(tmp_path, state, says):
    """Loading casts whatever number type a file holds into the network's floats, silently."""
    torch.save(state, tmp_path / "odd.pth")
    with pytest.raises(CaltechError, match=says):
        resolve_backbone("mobilenet_v2", str(tmp_path / "odd.pth"))


@pytest.mark.hostile
def test_an_int64_kernel_of_the_right_shape_is_refused(tmp_path):
    network = torchvision.models.mobilenet_v2()
    state = network.state_dict()
    state["features.0.0.weight"] = state["features.0.0.weight"].long()
    torch.save(state, tmp_path / "ints.pth")
    with pytest.raises(CaltechError, match="holds features.0.0.weight as torch.int64, where the network has floats"):
        resolve_backbone("mobilenet_v2", str(tmp_path / "ints.pth"))


@pytest.mark.hostile
@pytest.mark.parametrize("kind", ["device", "FIFO", "folder"])
def test_weights_that_are_not_a_file_say_what_they_are(tmp_path, kind):
    path = {"device": Path("/dev/zero"), "FIFO": tmp_path / "fifo.pth", "folder": tmp_path / "folder.pth"}[kind]
    if kind == "FIFO":
        os.mkfifo(path)
    if kind == "folder":
        path.mkdir()
    with within(20), pytest.raises(CaltechError, match=f"weights file {path} is a {kind}, not a file"):
        resolve_backbone("mobilenet_v2", str(path))


@pytest.mark.hostile
@pytest.mark.parametrize("names", [[], ["only"], ["a", "a"], [1, 2]], ids=["none", "one", "twice", "numbers"])
def test_a_checkpoint_without_two_class_names_is_refused(tmp_path, names):
    checkpoint = torch.load(FIXTURE / "best.ckpt", weights_only=True)
    checkpoint["hyper_parameters"]["class_names"] = names
    torch.save(checkpoint, tmp_path / "odd.ckpt")
    with pytest.raises(CaltechError, match="not two or more distinct names"):
        read_checkpoint(tmp_path / "odd.ckpt", MODEL_OPTIONS)


def test_a_checkpoint_needs_not_the_weights_it_started_from(image_folder, tmp_path, capsys):
    """The checkpoint holds every weight: test and predict run after the weights file that fit
    started from is gone (and a timm ``pretrained`` run needs no Hub cache)."""
    import timm

    weights = tmp_path / "convnext.pth"
    torch.save(timm.create_model("test_convnext.r160_in1k").state_dict(), weights)
    network = ["--model.backbone", "timm/test_convnext.r160_in1k", "--model.weights", str(weights)]
    status, stderr = caltech("fit", *options(tmp_path, image_folder, *network), capsys=capsys)
    assert status == 0, stderr[-3000:]
    weights.unlink()
    checkpoint = ["--ckpt_path", str(tmp_path / "runs" / "best.ckpt")]
    status, stderr = caltech("test", *options(tmp_path, image_folder, *network, *checkpoint), capsys=capsys)
    assert status == 0, stderr[-3000:]
    predict = [*checkpoint, "--data.predict_dir", str(image_folder / "circles")]
    status, stderr = caltech("predict", *options(tmp_path, image_folder, *network, *predict), capsys=capsys)
    assert status == 0, stderr[-3000:]


@pytest.mark.hostile
def test_a_saved_option_that_does_not_parse_is_the_checkpoints_fault(tmp_path, capsys):
    checkpoint = torch.load(FIXTURE / "best.ckpt", weights_only=True)
    checkpoint["hyper_parameters"]["image_size"] = "large"
    torch.save(checkpoint, tmp_path / "altered.ckpt")
    args = ["test", "--config", str(FIXTURE / "config.yaml"), "--ckpt_path", str(tmp_path / "altered.ckpt")]
    status, stderr = caltech(*args, "--trainer.default_root_dir", str(tmp_path / "runs"), capsys=capsys)
    line = one_error(status, stderr)
    assert f"the checkpoint {tmp_path / 'altered.ckpt'} saved a model option that cannot be used" in line
    assert "model.image_size large" in line and "Parsing of ckpt_path" not in stderr


@pytest.mark.e2e
@pytest.mark.hostile
def test_a_checkpoint_that_says_another_precision_is_refused(trained_run, tmp_path, capsys):
    checkpoint = torch.load(trained_run.best, weights_only=True)
    checkpoint["trainer_precision"] = "\x1b[2J64-true"
    torch.save(checkpoint, tmp_path / "edited.ckpt")
    args = [*options(tmp_path, trained_run.source), "--ckpt_path", str(tmp_path / "edited.ckpt")]
    error = one_error(*caltech("test", *args, capsys=capsys))
    assert "says it trained in precision" in error and "altered or damaged" in error and "\x1b" not in error
