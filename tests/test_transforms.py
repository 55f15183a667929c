"""transforms: the weights' preprocessing made into pixels."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode

from caltech_cli.transforms import Preprocessing, eval_transform, flip_views, flipped_eval_transform, train_transform


def test_normalization_comes_from_preprocessing():
    image = Image.new("RGB", (40, 40), (255, 255, 255))
    pre = Preprocessing(crop_size=32, resize_size=36, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    assert torch.allclose(eval_transform(pre)(image), torch.ones(3, 32, 32))
    assert train_transform(pre, (0.5, 1.0))(image).shape == (3, 32, 32)


@pytest.mark.parametrize("size", [(300, 200), (301, 200), (200, 333), (97, 131)])
@pytest.mark.parametrize("resize", [72, 60])  # 60: the resized image is padded to the crop of 64
@pytest.mark.parametrize("interpolation", [mode.value for mode in InterpolationMode])
def test_both_flip_views_from_one_resize_are_the_two_transforms_to_the_last_bit(size, resize, interpolation):
    """The mirror view made from the resized image holds the pixels of the mirror image resized
    and cropped, for crops of odd and even margins and for a crop larger than the resized image."""
    pixels = torch.randint(0, 256, (size[1], size[0], 3), generator=torch.Generator().manual_seed(sum(size)))
    image = Image.fromarray(pixels.to(torch.uint8).numpy())
    pre = Preprocessing(crop_size=64, resize_size=resize, interpolation=interpolation)
    expected = torch.stack([eval_transform(pre)(image), flipped_eval_transform(pre)(image)])
    assert torch.equal(flip_views(pre)(image), expected)
    unnormalized = flip_views(pre, normalize=False)(image)
    assert torch.equal(unnormalized[0], eval_transform(pre, normalize=False)(image))
    assert unnormalized.min() >= 0 and unnormalized.max() <= 1
