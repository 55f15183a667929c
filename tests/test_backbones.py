"""backbones: torchvision backbones, their weights found offline first, the preprocessing that goes with them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision

from caltech_cli import backbones
from caltech_cli.backbones import preprocessing_for, resolve_backbone
from caltech_cli.errors import CaltechError
from caltech_cli.files import file_digest
from caltech_cli.model import TransferClassifier

from conftest import TRANSFER, caltech, one_error

MOBILENET_FILE = "mobilenet_v2-b0353104.pth"


@pytest.fixture
def empty_hub(tmp_path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A torch hub cache with nothing in it."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path / "torch" / "hub" / "checkpoints"


@pytest.mark.parametrize(("name", "width"), [("resnet18", 512), ("mobilenet_v2", 1280), ("efficientnet_b0", 1280)])
def test_head_width_comes_from_the_backbone(name, width):
    model = TransferClassifier(backbone=name, weights=None, class_names=["a", "b", "c"])
    assert model.head.in_features == width
    assert model.head.out_features == 3
    assert not any(isinstance(m, torch.nn.Linear) for m in model.backbone.modules()), "ImageNet classifier removed"
    model.eval()
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 3)


def test_offline_package_provides_mobilenet_weights(empty_hub):
    packaged = backbones._offline_package_file(MOBILENET_FILE)
    assert packaged is not None and packaged.name == MOBILENET_FILE
    assert file_digest(packaged) == backbones.OFFLINE_PACKAGES[MOBILENET_FILE][2]
    model = TransferClassifier(backbone="mobilenet_v2", weights="IMAGENET1K_V1", num_classes=2)
    expected = torch.load(packaged, weights_only=True)
    assert torch.equal(model.backbone.features[0][0].weight, expected["features.0.0.weight"])


def imagenet_like_state(backbone: str, value: float) -> dict[str, torch.Tensor]:
    """A full state dict for ``backbone`` (ImageNet classifier included) with every float set to ``value``."""
    network = torchvision.models.get_model(backbone)
    return {k: torch.full_like(v, value) if v.is_floating_point() else v for k, v in network.state_dict().items()}


def test_hub_cache_comes_before_the_package(empty_hub):
    empty_hub.mkdir(parents=True)
    torch.save(imagenet_like_state("mobilenet_v2", 0.5), empty_hub / MOBILENET_FILE)
    model = resolve_backbone("mobilenet_v2", "IMAGENET1K_V1").module
    assert torch.all(model.features[0][0].weight == 0.5)


def test_missing_weights_say_what_to_put_where(empty_hub):
    with pytest.raises(CaltechError) as error:
        resolve_backbone("resnet18", "IMAGENET1K_V1")
    message = str(error.value)
    assert str(empty_hub / "resnet18-f37072fd.pth") in message
    assert "https://download.pytorch.org/models/resnet18-f37072fd.pth" in message
    assert "--model.weights" in message


def test_weights_file_path(tmp_path):
    path = tmp_path / "r18.pth"
    torch.save({"state_dict": imagenet_like_state("resnet18", 1.0)}, path)
    loaded = resolve_backbone("resnet18", str(path)).module
    assert torch.all(loaded.conv1.weight == 1)


def test_weights_that_do_not_fit(tmp_path):
    path = tmp_path / "wrong.pth"
    torch.save({"conv1.weight": torch.zeros(1)}, path)
    with pytest.raises(CaltechError, match="do not fit backbone resnet18"):
        resolve_backbone("resnet18", str(path))


def test_unknown_names_are_explained():
    with pytest.raises(CaltechError, match="resnet18"):
        resolve_backbone("resnett18", None)
    with pytest.raises(CaltechError, match="IMAGENET1K_V1"):
        preprocessing_for("mobilenet_v2", "IMAGENET9K")


def test_preprocessing_travels_with_the_weights():
    assert preprocessing_for("mobilenet_v2", "IMAGENET1K_V1").crop_size == 224
    v2 = preprocessing_for("resnet50", "IMAGENET1K_V2")
    assert (v2.crop_size, v2.resize_size) == (224, 232)
    small = preprocessing_for("mobilenet_v2", "IMAGENET1K_V1", image_size=112)
    assert (small.crop_size, small.resize_size) == (112, 128)


@pytest.mark.hostile
@pytest.mark.parametrize("weights", ["IMAGENET1K_V1", "null", "/no/such/file.pth"])
def test_unknown_backbone_gets_close_names_whatever_the_weights(tmp_path, capsys, weights):
    line = one_error(
        *caltech(
            "fit", "--config", TRANSFER, "--model.backbone", "resnet181", "--model.weights", weights, capsys=capsys
        )
    )
    assert "'resnet181' is not a torchvision classification model" in line and "resnet18," in line


@pytest.mark.hostile
@pytest.mark.parametrize("backbone", ["vit_b_16", "maxvit_t"])
def test_an_image_size_the_network_cannot_take_is_one_line(backbone):
    with pytest.raises(CaltechError, match=rf"^model.backbone {backbone} does not take 64-pixel images") as refused:
        resolve_backbone(backbone, None, image_size=64)
    assert "\n" not in str(refused.value) and "Fix: leave model.image_size out" in str(refused.value)
