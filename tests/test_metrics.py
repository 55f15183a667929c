"""metrics: class weights that make every class count."""

from __future__ import annotations

import pytest
import torch

from caltech_cli.metrics import LEFT_OUT, MeanPerClassAccuracy, inverse_frequency


def test_inverse_frequency_weights():
    counts = torch.tensor([2, 6, 0])
    assert torch.allclose(inverse_frequency(counts, 1.0), torch.tensor([8 / 6, 8 / 18, 0.0]))
    assert torch.allclose(inverse_frequency(counts, 0.5), torch.tensor([(8 / 6) ** 0.5, (8 / 18) ** 0.5, 0.0]))


def test_mean_per_class_accuracy_is_over_the_classes_with_images():
    """torchmetrics' macro average counts a class without images as 0 once an image is predicted
    as it; the mean per-class accuracy is over the classes that have images."""
    metric = MeanPerClassAccuracy(3)
    logits = torch.tensor([[5.0, 0, 0], [0, 0, 5.0], [0, 5.0, 0], [0, 5.0, 0]])
    metric.update(logits, torch.tensor([0, 0, 1, LEFT_OUT]))  # class 0: 1 of 2, class 1: 1 of 1, class 2: none
    assert metric.compute().item() == pytest.approx((0.5 + 1.0) / 2)
    assert torch.isnan(MeanPerClassAccuracy(3).compute())
