"""A backbone's blocks, and its forward pass cut between two of them (partial fine-tuning's trunk)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from caltech_cli.backbones import resolve_backbone
from caltech_cli.blocks import backbone_blocks, cut_backbone
from caltech_cli.errors import CaltechError


@pytest.mark.parametrize(
    ("network", "count"),
    # 19 stages; conv1, bn1, 8 basic blocks; timm's own groups: a ViT's embeddings and its 6
    # blocks, a ConvNeXt's stem, its 9 blocks (downsampling with the stage's first) and head norm.
    [("mobilenet_v2", 19), ("resnet18", 10), ("timm/test_vit.r160_in1k", 7), ("timm/test_convnext.r160_in1k", 11)],
)
def test_blocks_cover_every_parameter_once(network, count):
    module = resolve_backbone(network, None).module
    blocks = backbone_blocks(module)
    assert len(blocks) == count
    flat = [id(p) for block in blocks for p in block]
    assert sorted(flat) == sorted(id(p) for p in module.parameters())
    assert blocks[0][0] is next(module.parameters()), "input side first"


@pytest.mark.parametrize(
    ("network", "size", "depth", "shape"),
    [
        ("mobilenet_v2", 64, 14, (96, 4, 4)),  # the input of the last five blocks, 96 maps at 1/16
        ("mobilenet_v2", 64, 1, (32, 32, 32)),
        ("mobilenet_v2", 64, 18, (320, 2, 2)),
        ("resnet18", 64, 6, (128, 8, 8)),  # the input of layer3
        ("timm/test_convnext.r160_in1k", 64, 5, (48, 4, 4)),
        ("timm/test_vit.r160_in1k", 160, 4, (101, 64)),  # tokens
    ],
)
def test_trunk_then_top_is_the_backbone(network, size, depth, shape):
    """The top's output on the trunk's is the backbone's output, to the bit; both run the
    backbone's own modules, so they train and move with it."""
    backbone = resolve_backbone(network, None).module.eval()
    cut = cut_backbone(backbone, depth)
    images = torch.randn(3, 3, size, size)
    with torch.no_grad():
        middle = cut.trunk(images)
        assert middle.shape == (3, *shape)
        assert torch.equal(cut.top(middle), backbone(images))
    own = {id(p) for p in backbone.parameters()}
    trunk, top = ({id(p) for p in part.parameters()} for part in (cut.trunk, cut.top))
    assert trunk | top == own and not trunk & top, "each parameter is the backbone's, in one part"
    assert trunk == {id(p) for block in backbone_blocks(backbone)[:depth] for p in block}


@pytest.mark.parametrize("depth", [0, 19, -1])
def test_a_cut_outside_the_blocks_is_refused(depth):
    with pytest.raises(CaltechError, match=r"has 19 blocks, so it cannot be cut after .* Fix: train between 1 and 18"):
        cut_backbone(resolve_backbone("mobilenet_v2", None).module, depth)


def test_a_network_whose_later_layers_reach_back_past_the_cut_is_refused():
    """Cut after its class token, torchvision's ViT takes the batch size and the patches from before it."""
    backbone = resolve_backbone("vit_b_16", None).module
    with pytest.raises(CaltechError) as refused:
        cut_backbone(backbone, 1, "model.backbone vit_b_16")
    message = str(refused.value)
    assert message.startswith("model.backbone vit_b_16 (VisionTransformer) cannot be cut after block 1")
    assert "\n" not in message and "Fix: " in message


class Wilful(nn.Module):
    """A network whose forward pass branches on its data, which symbolic tracing cannot follow."""

    def __init__(self) -> None:
        super().__init__()
        self.first, self.second = nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        middle = self.first(images)
        return self.second(middle) if middle.mean() > 0 else middle


def test_a_network_that_cannot_be_traced_is_one_line():
    with pytest.raises(CaltechError, match=r"^the backbone \(Wilful\) cannot be traced .*Fix: ") as refused:
        cut_backbone(Wilful(), 1)
    assert "\n" not in str(refused.value)
