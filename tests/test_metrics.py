"""metrics: class weights that make every class count."""

from __future__ import annotations

import torch

from caltech_cli.metrics import inverse_frequency


def test_inverse_frequency_weights():
    counts = torch.tensor([2, 6, 0])
    assert torch.allclose(inverse_frequency(counts, 1.0), torch.tensor([8 / 6, 8 / 18, 0.0]))
    assert torch.allclose(inverse_frequency(counts, 0.5), torch.tensor([(8 / 6) ** 0.5, (8 / 18) ** 0.5, 0.0]))
