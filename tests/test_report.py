"""report: the test report's numbers, and cells a spreadsheet shows as text."""

from __future__ import annotations

import csv
import re

import pytest
import torch

from caltech_cli.report import pictures, stats, tables, write_test_report

from conftest import CLASSES, caltech, csv_rows, old_checkpoint, watched


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


def test_a_class_without_images_has_no_accuracy_rather_than_zero(tmp_path):
    probs = torch.tensor([[0.8, 0.1, 0.1], [0.1, 0.1, 0.8], [0.1, 0.8, 0.1]])
    rows = tables.per_class(probs, torch.tensor([0, 0, 1]), ["a", "b", "c"])
    assert [row["accuracy"] for row in rows] == [0.5, 1.0, None] and rows[2]["average_precision"] is None
    tables.write_per_class(rows, tmp_path / "per_class.csv")
    written = csv_rows(tmp_path / "per_class.csv")
    assert written[2]["support"] == "0" and written[2]["accuracy"] == "" and written[2]["precision"] == "0.000000"
    pictures.draw_pr_curves(probs, torch.tensor([0, 0, 1]), ["a", "b", "c"], tmp_path / "pr.png", rows)


@pytest.mark.hostile
def test_per_class_cells_cannot_be_formulas(tmp_path):
    probs = torch.tensor([[0.8, 0.2], [0.3, 0.7]])
    rows = tables.per_class(probs, torch.tensor([0, 1]), ["=1+1", "@cmd"])
    tables.write_per_class(rows, tmp_path / "per_class.csv")
    with open(tmp_path / "per_class.csv", newline="", encoding="utf-8") as f:
        assert [row["class"] for row in csv.DictReader(f)] == ["'=1+1", "'@cmd"]


@pytest.mark.hostile
def test_every_cell_of_the_mistake_tables_is_text(tmp_path):
    """top_losses.csv and most_confused.csv hold class and file names: formulas stay text, and a
    file name that is not valid UTF-8 is written, not a traceback that loses the report."""
    names = ["=SUM(1+1)", "@cmd", "＝x"]
    files = [tmp_path / "caf\udce9.jpg", tmp_path / "=HYPERLINK(1).jpg", tmp_path / "plain.jpg"]
    probs = torch.tensor([[0.1, 0.8, 0.1], [0.1, 0.1, 0.8], [0.8, 0.1, 0.1]])
    labels = torch.tensor([0, 1, 2])
    tables.write_top_losses(files, probs, labels, names, [0, 1, 2], tmp_path / "top_losses.csv")
    tables.write_confused_pairs(files, labels, names, tables.confused_pairs(probs, labels, 3), tmp_path / "mc.csv")
    rows = csv_rows(tmp_path / "top_losses.csv")
    assert {row["truth"] for row in rows} == {"'=SUM(1+1)", "'@cmd", "'＝x"}
    assert f"{tmp_path}/caf\\xe9.jpg" in {row["path"] for row in rows}
    for row in csv_rows(tmp_path / "mc.csv"):
        assert all(row[key].startswith("'") for key in ("truth", "prediction"))


@pytest.mark.hostile
def test_class_names_with_dollars_are_drawn_as_text(tmp_path):
    """matplotlib reads "$...$" as math, and fails on some (a class named "a$^$b")."""
    names = ["a$^$b", "$x", "plain"]
    probs = torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.1, 0.2, 0.7]])
    labels = torch.tensor([0, 1, 2])
    pictures.draw_confusion_matrix(probs, labels, names, tmp_path / "cm.png")
    pictures.draw_pr_curves(probs, labels, names, tmp_path / "pr.png", tables.per_class(probs, labels, names))
    assert (tmp_path / "cm.png").stat().st_size > 1000 and (tmp_path / "pr.png").stat().st_size > 1000


def confident_model(count: int = 200, classes: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Probabilities of a model right about 70% of the time, with the labels."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(classes, (count,), generator=generator)
    logits = torch.randn(count, classes, generator=generator)
    logits[torch.arange(count), labels] += 1.5
    return logits.softmax(dim=1), labels


def test_headline_figures_are_torchmetrics_own_with_intervals_around_them():
    from torchmetrics.functional.classification import multiclass_calibration_error, multiclass_f1_score

    probs, labels = confident_model()
    estimates = stats.headline(probs, labels, resamples=300)
    predicted = probs.argmax(dim=1)
    assert estimates["acc"].value == pytest.approx(float((predicted == labels).float().mean()))
    assert estimates["acc_macro"].value == pytest.approx(
        float(sum((predicted[labels == c] == c).float().mean() for c in range(4)) / 4)
    )
    assert estimates["f1_macro"].value == pytest.approx(float(multiclass_f1_score(probs, labels, 4, average="macro")))
    assert estimates["ece"].value == pytest.approx(
        float(multiclass_calibration_error(probs, labels, 4, n_bins=15, norm="l1")), abs=1e-6
    )
    for estimate in estimates.values():
        assert estimate.low <= estimate.value <= estimate.high and estimate.high - estimate.low < 0.3
    assert stats.headline(probs, labels, resamples=300) == estimates, "the same report on every run"


def test_macro_f1_counts_a_class_predicted_without_images_and_not_one_neither():
    """scikit-learn's macro average: over the classes with images or predictions."""
    from torchmetrics.functional.classification import multiclass_f1_score

    probs, labels = confident_model(classes=5)
    labels = labels.clamp(max=3)  # class 4 has no test images, but the model predicts it now and then
    absent = torch.cat([probs, torch.zeros(len(probs), 1)], dim=1)  # class 5: no images, never predicted
    assert int((probs.argmax(dim=1) == 4).sum()) > 0
    expected = float(multiclass_f1_score(absent, labels, 6, average="macro"))
    assert stats.headline(absent, labels, resamples=10)["f1_macro"].value == pytest.approx(expected)
    rows = tables.per_class(absent, labels, [str(i) for i in range(6)])
    assert rows[4]["precision"] == 0.0 and rows[5]["precision"] is None
    assert stats.f1_per_class(absent, labels, 6)[4] == 0.0 and stats.f1_per_class(absent, labels, 6)[5] is None


def test_a_label_the_model_contradicts_with_confidence_is_a_doubt():
    probs, labels = confident_model()
    flipped = int((probs.argmax(dim=1) == labels).nonzero()[0])  # an image the model gets right...
    labels = labels.clone()
    labels[flipped] = (labels[flipped] + 1) % 4  # ...labelled wrongly
    probs[flipped] = torch.tensor([0.0, 0.0, 0.0, 0.0]).index_fill_(0, probs[flipped].argmax(), 1.0) * 0.97 + 0.0075
    assert flipped in stats.label_doubts(probs, labels, 12)


@pytest.mark.hostile
def test_the_html_report_is_one_file_that_loads_nothing_and_escapes_every_name(tmp_path, image_folder):
    names = ["<img src=x onerror=alert(1)>", "a&b", '"quoted"']
    files = [image_folder / kind / f"image_{i:04d}.jpg" for kind in CLASSES for i in range(1, 5)]
    labels = torch.tensor([i // 4 for i in range(12)])
    probs = torch.full((12, 3), 0.1).index_fill_(1, torch.tensor([0]), 0.8)
    write_test_report(tmp_path, probs, labels, names, {"test/acc": 1 / 3}, files, provenance={"data": "<b>x</b>"})
    text = (tmp_path / "index.html").read_text()
    assert "<img src=x" not in text and "&lt;img src=x onerror=alert(1)&gt;" in text and "&lt;b&gt;x&lt;/b&gt;" in text
    assert "default-src 'none'" in text
    sources = re.findall(r"""src=["']([^"']*)""", text)
    assert sources and all(source.startswith("data:image/") for source in sources)
    assert not re.search(r"(?:href|src)=[\"']?(?:https?:)?//", text), "nothing from elsewhere"


@pytest.mark.e2e
def test_the_report_opens_from_its_file_and_its_table_sorts(chromium, image_folder, tmp_path, capsys):
    args = old_checkpoint(tmp_path, "test", "--data.source", str(image_folder), "--trainer.logger", "false")
    status, stderr = caltech(*args, capsys=capsys)
    assert status == 0, stderr[-3000:]
    report = tmp_path / "runs" / "report" / "index.html"
    page, requested = watched(chromium)
    page.goto(report.as_uri())
    assert "mean per-class accuracy" in page.locator("table.metrics").inner_text()
    header = page.locator("#per-class th", has_text="recall")
    column = [h.inner_text() for h in page.locator("#per-class th").all()].index("recall")

    def recalls() -> list[float]:
        cells = page.locator(f"#per-class tbody tr td:nth-child({column + 1})").all()
        return [float(cell.get_attribute("data-value")) for cell in cells]

    header.click()
    assert recalls() == sorted(recalls()) and header.get_attribute("aria-sort") == "ascending"
    header.click()
    assert recalls() == sorted(recalls(), reverse=True) and header.get_attribute("aria-sort") == "descending"
    assert page.locator(".gallery img").count() > 0, "thumbnails shown"
    page.close()
    assert requested and all(url.startswith(("file://", "data:")) for url in requested), requested
