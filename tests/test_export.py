"""caltech export: ONNX and TorchScript files that score like PyTorch and carry the class names and preprocessing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import onnx
import onnxruntime
import pytest
import torch
from torchvision.transforms import v2

from caltech_cli.images import load_rgb
from caltech_cli.model import TransferClassifier
from caltech_cli.transforms import Preprocessing, eval_transform

from conftest import CLASSES, FIXTURE, caltech, one_error, run_caltech, within


def resized(paths, pre: Preprocessing) -> torch.Tensor:
    """Images as the exported model takes them: resized, centre-cropped, in [0, 1], not normalised."""
    steps = v2.Compose(
        [
            v2.Resize(pre.resize_size, interpolation=pre.interpolation_mode),
            v2.CenterCrop(pre.crop_size),
            v2.PILToTensor(),
            v2.ToDtype(torch.float32, scale=True),
        ]
    )
    return torch.stack([steps(load_rgb(p)) for p in paths])


@pytest.fixture(scope="module")
def pytorch_reference(trained_run):
    """The checkpoint's probabilities on 6 real images through the training code's own transform."""
    model = TransferClassifier.load_from_checkpoint(trained_run.best, map_location="cpu", weights_only=True).eval()
    pre = model.preprocessing
    paths = sorted((trained_run.root / "data" / "101_ObjectCategories").rglob("image_000[1-2].jpg"))
    with torch.no_grad():
        expected = model(torch.stack([eval_transform(pre)(load_rgb(p)) for p in paths])).softmax(dim=1)
    return paths, pre, expected


@pytest.mark.e2e
def test_onnx_matches_pytorch_and_carries_classes_and_preprocessing(trained_run, pytorch_reference, tmp_path):
    paths, pre, expected = pytorch_reference
    output = tmp_path / "served" / "caltech.onnx"
    result = run_caltech("export", "--ckpt_path", str(trained_run.best), "--output", str(output), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "largest difference from PyTorch" in result.stdout

    session = onnxruntime.InferenceSession(str(output), providers=["CPUExecutionProvider"])
    inputs = resized(paths, pre).numpy()
    assert inputs.shape[0] == 6, "a batch size other than the one exported with"
    probabilities = torch.from_numpy(session.run(None, {"images": inputs})[0])
    torch.testing.assert_close(probabilities, expected, atol=1e-5, rtol=1e-4)
    assert probabilities.sum(dim=1).sub(1).abs().max() < 1e-5

    meta = {p.key: json.loads(p.value) for p in onnx.load(str(output)).metadata_props}
    beside = json.loads(output.with_name(output.name + ".json").read_text())
    for info in (meta, beside):
        assert info["class_names"] == sorted(CLASSES)
        assert info["preprocessing"]["crop_size"] == 64 and info["preprocessing"]["mean"] == list(pre.mean)
        assert info["preprocessing"]["resize_size"] == pre.resize_size


@pytest.mark.e2e
def test_torchscript_matches_pytorch(trained_run, pytorch_reference, tmp_path):
    paths, pre, expected = pytorch_reference
    output = tmp_path / "model.pt"
    result = run_caltech(
        "export", "--ckpt_path", str(trained_run.best), "--format", "torchscript", "--output", str(output), cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    extra = {"caltech.json": ""}
    scripted = torch.jit.load(str(output), _extra_files=extra)
    with torch.no_grad():
        torch.testing.assert_close(scripted(resized(paths, pre)), expected, atol=1e-5, rtol=1e-4)
    assert json.loads(extra["caltech.json"])["class_names"] == sorted(CLASSES)


@pytest.mark.e2e
def test_export_of_something_else_says_so(tmp_path):
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.ckpt")
    result = run_caltech("export", "--ckpt_path", str(tmp_path / "other.ckpt"), cwd=tmp_path)
    assert result.returncode == 2
    assert "is not a checkpoint of a caltech model" in result.stderr


@pytest.mark.hostile
def test_export_writes_the_file_it_is_told_and_its_own_side_file_only(tmp_path, capsys):
    """The user's package.json beside package.pt stays; the metadata goes to package.pt.json."""
    checkpoint = shutil.copy(FIXTURE / "best.ckpt", tmp_path / "best.ckpt")
    (tmp_path / "package.json").write_text('{"name": "the user\'s own"}')
    status, stderr = caltech("export", "--ckpt_path", str(checkpoint), "--format", "torchscript", "--output",
                             str(tmp_path / "package.pt"), capsys=capsys)  # fmt: skip
    assert status == 0, stderr[-3000:]
    assert (tmp_path / "package.json").read_text() == '{"name": "the user\'s own"}'
    assert json.loads((tmp_path / "package.pt.json").read_text())["class_names"] == ["circles", "squares", "stripes"]
    again = caltech("export", "--ckpt_path", str(checkpoint), "--format", "torchscript", "--output",
                    str(tmp_path / "package.pt"), capsys=capsys)  # fmt: skip
    assert again[0] == 0, "an earlier export's side file is replaced"
    (tmp_path / "other.onnx.json").write_text("my notes")
    line = one_error(*caltech("export", "--ckpt_path", str(checkpoint), "--output", str(tmp_path / "other.onnx"),
                              capsys=capsys))  # fmt: skip
    assert "other.onnx.json, where export writes the metadata of other.onnx, is a file of someone else's" in line
    assert (tmp_path / "other.onnx.json").read_text() == "my notes" and not (tmp_path / "other.onnx").exists()


@pytest.mark.hostile
@pytest.mark.parametrize("case", ["link", "the-checkpoint", "suffix"])
def test_export_refuses_an_output_that_is_not_its_to_write(tmp_path, capsys, case):
    checkpoint = Path(shutil.copy(FIXTURE / "best.ckpt", tmp_path / "model.pt"))
    notes = tmp_path / "notes.txt"
    notes.write_text("the user's notes")
    if case == "link":
        (tmp_path / "model.onnx").symlink_to(notes)
        args, says = ["--output", str(tmp_path / "model.onnx")], "model.onnx is a symbolic link, where caltech writes"
    elif case == "the-checkpoint":
        args, says = ["--format", "torchscript"], "model.pt is the checkpoint itself"
    else:
        args, says = ["--format", "torchscript", "--output", str(tmp_path / "m.onnx")], "does not end in .pt"
    line = one_error(*caltech("export", "--ckpt_path", str(checkpoint), *args, capsys=capsys))
    assert says in line
    assert notes.read_text() == "the user's notes"
    assert torch.load(checkpoint, weights_only=True)["hyper_parameters"]["class_names"], "the checkpoint is intact"


@pytest.mark.hostile
def test_a_checkpoint_asking_for_an_absurd_image_size_is_one_line(tmp_path, capsys):
    """An export runs the network on example images of the checkpoint's size: 10**6 pixels a
    side would ask for terabytes."""
    checkpoint = torch.load(FIXTURE / "best.ckpt", weights_only=True)
    checkpoint["hyper_parameters"]["image_size"] = 10**6
    torch.save(checkpoint, tmp_path / "huge.ckpt")
    with within(60):
        line = one_error(*caltech("export", "--ckpt_path", str(tmp_path / "huge.ckpt"), capsys=capsys))
    assert "model.image_size 1000000 is too large" in line
