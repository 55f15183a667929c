"""report: the test report's numbers, and cells a spreadsheet shows as text."""

from __future__ import annotations

import csv

import pytest
import torch

from caltech_cli.report import tables


def test_top_losses_and_most_confused_pairs():
    """fastai's top_losses and most_confused: checked against a brute-force count."""
    from itertools import product

    import torch

    generator = torch.Generator().manual_seed(0)
    probs = torch.randn(60, 4, generator=generator).mul(2).softmax(dim=1)
    labels = torch.randint(0, 4, (60,), generator=generator)
    losses = [-float(probs[i, labels[i]].log()) for i in range(60)]
    worst = tables.top_losses(probs, labels, 7)
    assert worst == sorted(range(60), key=lambda i: -losses[i])[:7]
    assert torch.allclose(
        tables.losses(probs, labels), torch.nn.functional.nll_loss(probs.log(), labels, reduction="none")
    )

    preds = probs.argmax(dim=1).tolist()
    counts = {(t, p): sum(labels[i] == t and preds[i] == p for i in range(60)) for t, p in product(range(4), repeat=2)}
    pairs = tables.confused_pairs(probs, labels, 3)
    assert [len(items) for _, _, items in pairs] == sorted((c for (t, p), c in counts.items() if t != p), reverse=True)[
        :3
    ]
    for true, pred, items in pairs:
        assert len(items) == counts[true, pred] and true != pred
        assert all(labels[i] == true and preds[i] == pred for i in items)
        assert [losses[i] for i in items] == sorted((losses[i] for i in items), reverse=True), "highest loss first"
    no_mistakes = torch.eye(4)[labels] * 0.9 + 0.025
    assert tables.confused_pairs(no_mistakes, labels, 3) == []


@pytest.mark.hostile
def test_per_class_cells_cannot_be_formulas(tmp_path):
    probs = torch.tensor([[0.8, 0.2], [0.3, 0.7]])
    rows = tables.per_class(probs, torch.tensor([0, 1]), ["=1+1", "@cmd"])
    tables.write_per_class(rows, tmp_path / "per_class.csv")
    with open(tmp_path / "per_class.csv", newline="", encoding="utf-8") as f:
        assert [row["class"] for row in csv.DictReader(f)] == ["'=1+1", "'@cmd"]
