"""How images become a backbone's input: the weights' preprocessing and the transforms built from it.

``Preprocessing`` is decided with the weights (``backbones.preprocessing_for``) and travels with
them into the data module, the feature cache's key and exported files; the transforms here are
the only place that turns it into pixels.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from PIL import Image
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms.v2 import functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocessing:
    """How images must be prepared for a backbone: the statistics its weights were trained with.

    ``resize_size`` is the shorter side before the centre crop of ``crop_size`` (evaluation);
    training crops ``crop_size`` directly at random scales.
    """

    crop_size: int = 224
    resize_size: int = 256
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bilinear"

    @property
    def interpolation_mode(self) -> InterpolationMode:
        return InterpolationMode(self.interpolation)


def train_transform(pre: Preprocessing, crop_scale: tuple[float, float]) -> Callable:
    """Augmenting transform: random resized crop and horizontal flip, then the weights' normalization."""
    return v2.Compose(
        [
            v2.RandomResizedCrop(pre.crop_size, scale=crop_scale, interpolation=pre.interpolation_mode),
            v2.RandomHorizontalFlip(),
            v2.PILToTensor(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(pre.mean, pre.std),
        ]
    )


def eval_transform(pre: Preprocessing, normalize: bool = True) -> Callable:
    """Deterministic transform: resize the shorter side, centre crop, normalize (or, with
    ``normalize`` false, pixels in [0, 1] for a network that normalizes them itself)."""
    return v2.Compose(
        [
            v2.Resize(pre.resize_size, interpolation=pre.interpolation_mode),
            v2.CenterCrop(pre.crop_size),
            v2.PILToTensor(),
            v2.ToDtype(torch.float32, scale=True),
            *([v2.Normalize(pre.mean, pre.std)] if normalize else []),
        ]
    )


def flipped_eval_transform(pre: Preprocessing) -> Callable:
    """The evaluation transform of the mirror image: the second view of test-time augmentation."""
    return v2.Compose([v2.RandomHorizontalFlip(p=1.0), eval_transform(pre)])


# The interpolations whose resize commutes with mirroring, to the last bit (their filters are
# symmetric; nearest and box round positions towards one side). tests/test_transforms.py checks it.
MIRROR_SYMMETRIC = ("bilinear", "bicubic", "hamming", "lanczos")


@dataclass(frozen=True)
class FlipViews:
    """Test-time augmentation's two views of an image, stacked (2, 3, H, W): the evaluation
    transform's and its mirror image's, from one decoding. With an interpolation whose resize
    commutes with mirroring (``MIRROR_SYMMETRIC``) from one resize too: the centre crop of the
    resized image mirrored holds the pixels ``flipped_eval_transform`` gives. The model averages
    its probabilities over the views."""

    pre: Preprocessing
    normalize: bool = True

    def __call__(self, image: Image.Image) -> torch.Tensor:
        pre = self.pre

        def resized(image: Image.Image) -> torch.Tensor:
            return F.pil_to_tensor(F.resize(image, pre.resize_size, interpolation=pre.interpolation_mode))

        plain = resized(image)
        if pre.interpolation in MIRROR_SYMMETRIC:
            mirror = plain.flip(-1)
        else:
            mirror = resized(image.transpose(Image.Transpose.FLIP_LEFT_RIGHT))
        views = torch.stack([F.center_crop(view, pre.crop_size) for view in (plain, mirror)])
        views = F.to_dtype(views, torch.float32, scale=True)
        return F.normalize(views, pre.mean, pre.std) if self.normalize else views


def flip_views(pre: Preprocessing, normalize: bool = True) -> FlipViews:
    """Test-time augmentation's two views: the image and its mirror image (``FlipViews``)."""
    return FlipViews(pre, normalize)
