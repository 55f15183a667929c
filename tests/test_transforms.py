"""transforms: the weights' preprocessing made into pixels."""

from __future__ import annotations

import torch
from PIL import Image

from caltech_cli.transforms import Preprocessing, eval_transform, train_transform


def test_normalization_comes_from_preprocessing():
    image = Image.new("RGB", (40, 40), (255, 255, 255))
    pre = Preprocessing(crop_size=32, resize_size=36, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    assert torch.allclose(eval_transform(pre)(image), torch.ones(3, 32, 32))
    assert train_transform(pre, (0.5, 1.0))(image).shape == (3, 32, 32)
