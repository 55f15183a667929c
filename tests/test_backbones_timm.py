"""backbones: timm's models, their weights from the Hugging Face cache, the whole cycle on timm's test models."""

from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path

import onnxruntime
import pytest
import timm
import torch
from safetensors.torch import save_file
from test_export import resized

from caltech_cli.backbones import preprocessing_for, resolve_backbone
from caltech_cli.errors import CaltechError
from caltech_cli.export import export
from caltech_cli.images import load_rgb
from caltech_cli.model import load_trained
from caltech_cli.transforms import eval_transform

from conftest import CLASSES, FINETUNE, run_caltech, small_run

VIT = "test_vit.r160_in1k"


CONVNEXT = "test_convnext.r160_in1k"


def timm_state(name: str, seed: int, num_classes: int = 1000) -> dict[str, torch.Tensor]:
    """A state dict of timm's ``name`` as its pretrained file holds it (seeded random values)."""
    torch.manual_seed(seed)
    return {k: v.contiguous() for k, v in timm.create_model(name, num_classes=num_classes).state_dict().items()}


def fake_hub_cache(hub: Path, name: str, state: dict[str, torch.Tensor]) -> Path:
    """``state`` as ``model.safetensors`` of the Hub repo ``timm/<name>``, laid out as
    huggingface_hub keeps downloads: a blob, a snapshot link to it, and refs/main naming the snapshot."""
    repo = hub / f"models--timm--{name}"
    blob = repo / "blobs" / "9f8919b1b5adef55f4fd0123456789abcdef0123456789abcdef0123456789ab"
    blob.parent.mkdir(parents=True)
    save_file(state, blob)
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (snapshot / "model.safetensors").symlink_to(os.path.relpath(blob, snapshot))
    return snapshot / "model.safetensors"


def test_preprocessing_comes_from_the_pretrained_config():
    dinov2 = preprocessing_for("timm/vit_small_patch14_dinov2.lvd142m", "pretrained")
    assert (dinov2.crop_size, dinov2.resize_size, dinov2.interpolation) == (518, 518, "bicubic")  # crop_pct 1.0
    assert dinov2.mean == (0.485, 0.456, 0.406) and dinov2.std == (0.229, 0.224, 0.225)
    assert preprocessing_for("timm/vit_small_patch14_dinov2.lvd142m", "pretrained", image_size=224).resize_size == 224
    convnext = preprocessing_for("timm/convnext_tiny.fb_in22k", "pretrained")
    assert (convnext.crop_size, convnext.resize_size, convnext.interpolation) == (224, 256, "bicubic")  # 0.875
    test_vit = preprocessing_for(f"timm/{VIT}", None)
    assert (test_vit.crop_size, test_vit.resize_size) == (160, 168) and test_vit.mean == (0.5, 0.5, 0.5)


def test_weights_files_load_bit_for_bit(tmp_path):
    with_classifier = timm_state(VIT, seed=1)
    save_file(with_classifier, tmp_path / "vit.safetensors")
    vit = resolve_backbone(f"timm/{VIT}", str(tmp_path / "vit.safetensors"))
    assert torch.equal(vit.module.blocks[0].attn.qkv.weight, with_classifier["blocks.0.attn.qkv.weight"])
    assert vit.num_features == 64 and vit.module(torch.rand(2, 3, 160, 160)).shape == (2, 64), "classifier removed"
    assert "state_dict" not in vit.module.pretrained_cfg, "no second copy of the weights"

    without_classifier = timm_state(CONVNEXT, seed=2, num_classes=0)
    torch.save({"state_dict": without_classifier}, tmp_path / "convnext.pth")
    convnext = resolve_backbone(f"timm/{CONVNEXT}", str(tmp_path / "convnext.pth"), image_size=64)
    assert torch.equal(convnext.module.stem[0].weight, without_classifier["stem.0.weight"])
    assert convnext.module(torch.rand(1, 3, 64, 64)).shape == (1, convnext.num_features)

    with pytest.raises(CaltechError, match=f"do not fit backbone timm/{VIT}"):
        resolve_backbone(f"timm/{VIT}", str(tmp_path / "convnext.pth"))
    (tmp_path / "broken.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(CaltechError, match="cannot read weights file .*broken.safetensors"):
        resolve_backbone(f"timm/{VIT}", str(tmp_path / "broken.safetensors"))


def test_image_size_resamples_a_vits_position_embeddings():
    vit = resolve_backbone(f"timm/{VIT}", None, image_size=64)
    assert vit.module.pos_embed.shape[1] == 1 + (64 // 16) ** 2
    assert vit.module(torch.rand(2, 3, 64, 64)).shape == (2, 64)


def test_names_are_explained():
    with pytest.raises(CaltechError, match="timm/test_vit"):
        resolve_backbone("timm/test_vitt", None)
    with pytest.raises(CaltechError, match=f"timm/{VIT}"):
        resolve_backbone("timm/test_vit.in22k", None)
    with pytest.raises(CaltechError, match="--model.weights pretrained"):
        preprocessing_for(f"timm/{VIT}", "IMAGENET1K_V1")
    with pytest.raises(CaltechError, match=r"only at https://\S+gcvit_xxtiny\S+\.pth.*--model.weights"):
        resolve_backbone("timm/gcvit_xxtiny.in1k", "pretrained")


@pytest.mark.e2e
def test_missing_weights_say_what_to_download_and_where(tar_archive, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = run_caltech(
        "fit",
        *small_run(tmp_path, str(tar_archive)),
        "--trainer.logger",
        "false",
        "--model.backbone",
        f"timm/{VIT}",
        "--model.weights",
        "pretrained",
        cwd=tmp_path,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("caltech: error: cannot get the weights of timm/test_vit.r160_in1k")
    assert str(tmp_path / "hf" / "hub" / f"models--timm--{VIT}") in message
    assert "HF_HUB_OFFLINE is set" in message
    assert f"hf download timm/{VIT} model.safetensors" in message
    assert f"https://huggingface.co/timm/{VIT}/resolve/main/model.safetensors" in message


@pytest.mark.e2e
def test_fit_test_predict_export_with_weights_from_the_hub_cache(tar_archive, tmp_path, monkeypatch):
    """The whole life of a timm model, offline: weights from a Hugging Face cache (and no request
    to the Hub although HF_HUB_OFFLINE is unset: its address is a closed port here), its
    preprocessing in the data module and the feature cache, a checkpoint, the report, predictions,
    and ONNX and TorchScript files that give PyTorch's probabilities."""
    hub_state = timm_state(VIT, seed=3)
    fake_hub_cache(tmp_path / "hf" / "hub", VIT, hub_state)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    options = [
        *small_run(tmp_path, str(tar_archive)),
        "--trainer.logger",
        "false",
        "--model.backbone",
        f"timm/{VIT}",
        "--model.weights",
        "pretrained",
    ]
    fit = run_caltech(
        "fit",
        *options,
        "--trainer.max_epochs",
        "3",
        "--lr_scheduler.T_max",
        "3",
        "--optimizer.lr",
        "0.01",
        cwd=tmp_path,
    )
    assert fit.returncode == 0, fit.stderr[-3000:]
    assert "127.0.0.1:9" not in fit.stderr, "the cache is read without asking the Hub"
    assert "Cached val and train features" in fit.stderr

    caches = {
        p.name.split("-")[0]: torch.load(p, weights_only=True)
        for p in (tmp_path / "data" / "feature-cache").glob("*.pt")
    }
    assert set(caches) == {"train", "val"}
    key = json.loads(caches["train"]["key"])
    assert key["preprocessing"] == {
        "crop_size": 64,
        "resize_size": 67,
        "mean": [0.5, 0.5, 0.5],
        "std": [0.5, 0.5, 0.5],
        "interpolation": "bicubic",
    }, "timm's config, scaled to 64"
    best = tmp_path / "runs" / "best.ckpt"
    saved = torch.load(best, weights_only=True)
    assert saved["hyper_parameters"]["backbone"] == f"timm/{VIT}"
    assert torch.equal(saved["state_dict"]["backbone.blocks.2.mlp.fc1.weight"], hub_state["blocks.2.mlp.fc1.weight"]), (
        "the frozen backbone holds the Hub file's weights"
    )

    test = run_caltech("test", *options, "--ckpt_path", str(best), cwd=tmp_path)
    assert test.returncode == 0, test.stderr[-3000:]
    assert re.search(r"test/acc\s+[0-9.]+", test.stdout)
    assert {"top_losses.png", "most_confused.png"} <= {p.name for p in (tmp_path / "runs" / "report").iterdir()}

    predict = run_caltech(
        "predict",
        *options,
        "--ckpt_path",
        str(best),
        "--data.predict_dir",
        str(tmp_path / "data" / "101_ObjectCategories" / "stripes"),
        cwd=tmp_path,
    )
    assert predict.returncode == 0, predict.stderr[-3000:]
    rows = (tmp_path / "runs" / "predictions.csv").read_text().splitlines()
    assert len(rows) == 1 + 12 and all(row.split(",")[1] in CLASSES for row in rows[1:])

    model, pre = load_trained(best)
    assert (pre.crop_size, pre.mean, pre.interpolation) == (64, (0.5, 0.5, 0.5), "bicubic")
    paths = sorted((tmp_path / "data" / "101_ObjectCategories").rglob("image_000[1-2].jpg"))
    with torch.no_grad():
        expected = model(torch.stack([eval_transform(pre)(load_rgb(p)) for p in paths])).softmax(dim=1)
    onnx = tmp_path / "export" / "model.onnx"
    result = run_caltech("export", "--ckpt_path", str(best), "--output", str(onnx), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert float(re.search(r"random images: (\S+)", result.stdout).group(1)) < 1e-5, result.stdout
    session = onnxruntime.InferenceSession(str(onnx), providers=["CPUExecutionProvider"])
    exported = torch.from_numpy(session.run(None, {"images": resized(paths, pre).numpy()})[0])
    torch.testing.assert_close(exported, expected, atol=1e-5, rtol=1e-4)
    assert json.loads(onnx.with_name(onnx.name + ".json").read_text())["backbone"] == f"timm/{VIT}"

    scripted, difference = export(best, "torchscript", tmp_path / "export" / "model.pt")  # the command's own code
    assert difference < 1e-5
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # TorchScript is deprecated
        torch.testing.assert_close(torch.jit.load(str(scripted))(resized(paths, pre)), expected, atol=1e-5, rtol=1e-4)


@pytest.mark.e2e
def test_finetune_unfreezes_timms_blocks(tar_archive, tmp_path):
    """Fine-tuning a ConvNeXt from a weights file: its blocks (timm's own grouping) join the
    optimizer at the unfreeze epoch and move, and the checkpoint tests."""
    torch.save(timm_state(CONVNEXT, seed=4), tmp_path / "convnext.pth")
    options = [
        *small_run(tmp_path, str(tar_archive), FINETUNE),
        "--trainer.logger",
        "false",
        "--model.backbone",
        f"timm/{CONVNEXT}",
        "--model.weights",
        str(tmp_path / "convnext.pth"),
    ]
    fit = run_caltech(
        "fit",
        *options,
        "--trainer.max_epochs",
        "2",
        "--lr_scheduler.T_max",
        "2",
        "--trainer.callbacks.unfreeze_at_epoch",
        "1",
        cwd=tmp_path,
    )
    assert fit.returncode == 0, fit.stderr[-3000:]
    assert "Epoch 1: 11 of 11 backbone blocks train" in fit.stderr
    last = torch.load(tmp_path / "runs" / "checkpoints" / "last.ckpt", weights_only=True)
    assert len(last["optimizer_states"][0]["param_groups"]) == 1 + 11
    start = timm_state(CONVNEXT, seed=4)
    assert not torch.equal(last["state_dict"]["backbone.stem.0.weight"], start["stem.0.weight"]), "the stem trained"
    test = run_caltech("test", *options, "--ckpt_path", str(tmp_path / "runs" / "best.ckpt"), cwd=tmp_path)
    assert test.returncode == 0, test.stderr[-3000:]


@pytest.mark.hostile
@pytest.mark.parametrize("leads_out", ["snapshot", "file"])
def test_a_hub_cache_whose_snapshot_leads_out_of_it_is_one_line(tmp_path, monkeypatch, leads_out):
    """refs/main names the snapshot to read; a snapshot (or its file) that is a link out of the
    cache would have weights read from anywhere on the machine."""
    from huggingface_hub import constants

    outside = tmp_path / "elsewhere" / "model.safetensors"
    outside.parent.mkdir()
    save_file(timm_state(CONVNEXT, 0), outside)
    repo = tmp_path / "hub" / f"models--timm--{CONVNEXT}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots").mkdir()
    if leads_out == "snapshot":
        (repo / "snapshots" / commit).symlink_to(outside.parent)
    else:
        (repo / "snapshots" / commit).mkdir()
        (repo / "snapshots" / commit / "model.safetensors").symlink_to(outside)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(CaltechError, match=f"leads outside {repo}, to {outside}: it was altered. Fix: delete"):
        resolve_backbone(f"timm/{CONVNEXT}", "pretrained")
