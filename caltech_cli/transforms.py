"""How images become a backbone's input: the weights' preprocessing and the transforms built from it.

``Preprocessing`` is decided with the weights (``backbones.preprocessing_for``) and travels with
them into the data module, the feature cache's key and exported files; the transforms here are
the only place that turns it into pixels.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from PIL import Image
from torchvision.transforms import InterpolationMode, v2

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


def eval_transform(pre: Preprocessing) -> Callable:
    """Deterministic transform: resize the shorter side, centre crop, normalize."""
    return v2.Compose(
        [
            v2.Resize(pre.resize_size, interpolation=pre.interpolation_mode),
            v2.CenterCrop(pre.crop_size),
            v2.PILToTensor(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(pre.mean, pre.std),
        ]
    )


def flipped_eval_transform(pre: Preprocessing) -> Callable:
    """The evaluation transform of the mirror image: the second view of test-time augmentation."""
    return v2.Compose([v2.RandomHorizontalFlip(p=1.0), eval_transform(pre)])


@dataclass
class Views:
    """Several transforms of one image, stacked (views, 3, H, W); the model averages its
    probabilities over the views (test-time augmentation)."""

    transforms: Sequence[Callable]

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return torch.stack([transform(image) for transform in self.transforms])


def flip_views(pre: Preprocessing) -> Views:
    """Test-time augmentation's two views: the image and its mirror image."""
    return Views([eval_transform(pre), flipped_eval_transform(pre)])
