"""The test report callback: every file of the report, computed on the test images it shows."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from conftest import (
    CLASSES,
    TRANSFER,
    caltech,
    csv_rows,
    damaged_png,
    draw,
    old_checkpoint,
    one_error,
    printed_metrics,
    run_caltech,
)

REPORT_FILES = {
    "metrics.json",
    "provenance.json",
    "per_class.csv",
    "confusion_matrix.png",
    "pr_curves.png",
    "predictions.png",
    "top_losses.png",
    "top_losses.csv",
    "most_confused.png",
    "most_confused.csv",
    "reliability.png",
    "index.html",
}


@pytest.mark.e2e
def test_test_writes_a_report(trained_run):
    report = trained_run.runs / "report"
    assert {p.name for p in report.iterdir()} == REPORT_FILES
    for picture in (name for name in REPORT_FILES if name.endswith(".png")):
        with Image.open(report / picture) as image:
            assert image.format == "PNG" and min(image.size) > 300
    saved = json.loads((report / "metrics.json").read_text())
    printed = printed_metrics(trained_run.test.stdout)
    assert set(saved) == set(printed) == {"test/acc", "test/acc_top5", "test/acc_macro", "test/loss"}
    for name, value in printed.items():
        assert abs(saved[name] - value) < 1e-6, name
    provenance = json.loads((report / "provenance.json").read_text())
    assert provenance["test images scored"] == "9 of 9" and len(provenance["test images key"]) == 12
    with open(report / "per_class.csv") as f:
        rows = list(csv.DictReader(f))
    assert [row["class"] for row in rows] == sorted(CLASSES)
    assert sum(int(row["support"]) for row in rows) == 9
    mean_accuracy = sum(float(row["accuracy"]) for row in rows) / len(rows)
    assert abs(mean_accuracy - saved["test/acc_macro"]) < 1e-4, "per-class accuracy averages to acc_macro"


def mislabelled_folder(root, rng) -> dict[str, str]:
    """A folder with train/, val/ and test/ whose test/ files are partly filed under the wrong
    class: a model that knows the shapes makes known mistakes. Returns test file -> drawn shape."""
    drawn = {}
    for split, count in (("train", 2), ("val", 2)):
        for kind in CLASSES:
            (root / split / kind).mkdir(parents=True)
            for i in range(count):
                draw(kind, rng).save(root / split / kind / f"{i}.jpg")
    filed = {
        "circles": ["stripes", "stripes", "stripes"],
        "squares": ["squares"] * 3,
        "stripes": ["circles", "circles", "stripes"],
    }
    for folder, kinds in filed.items():
        (root / "test" / folder).mkdir(parents=True)
        for i, kind in enumerate(kinds):
            path = root / "test" / folder / f"{i}.jpg"
            draw(kind, rng).save(path)
            drawn[str(path)] = kind
    return drawn


@pytest.mark.e2e
def test_report_shows_the_truly_worst_test_images(trained_run, tmp_path):
    """The listed top-loss images are the ones with the highest loss, recomputed here from the
    checkpoint, in that order; the confused pairs are the mistakes counted here."""
    import torch

    from caltech_cli.images import load_rgb
    from caltech_cli.model import TransferClassifier
    from caltech_cli.transforms import eval_transform

    drawn = mislabelled_folder(tmp_path / "photos", np.random.default_rng(11))
    result = run_caltech(
        "test",
        "--config",
        TRANSFER,
        "--data",
        "ImageFolderDataModule",
        "--data.root",
        str(tmp_path / "photos"),
        "--data.data_dir",
        str(tmp_path / "data"),
        "--data.num_workers",
        "0",
        "--model.image_size",
        "64",
        "--trainer.default_root_dir",
        str(tmp_path / "runs"),
        "--trainer.logger",
        "false",
        "--ckpt_path",
        str(trained_run.best),
        "--report.top_losses",
        "4",
        "--report.output",
        str(tmp_path / "report"),
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]

    model = TransferClassifier.load_from_checkpoint(trained_run.best, map_location="cpu", weights_only=True).eval()
    files = sorted(drawn)
    truth = [model.class_names.index(Path(f).parent.name) for f in files]
    images = [load_rgb(Path(f)) for f in files]
    with torch.no_grad():
        # The transfer config tests with flip TTA: each image's probabilities averaged with its mirror image's.
        probs = (
            sum(
                model(torch.stack([eval_transform(model.preprocessing)(view(i)) for i in images])).softmax(1)
                for view in (lambda i: i, ImageOps.mirror)
            )
            / 2
        )
    losses = {f: -float(probs[i, truth[i]].log()) for i, f in enumerate(files)}
    with open(tmp_path / "report" / "top_losses.csv") as f:
        rows = list(csv.DictReader(f))
    assert [row["path"] for row in rows] == sorted(files, key=lambda f: -losses[f])[:4]
    for row in rows:
        assert abs(float(row["loss"]) - losses[row["path"]]) < 1e-3
        assert abs(float(row["loss"]) + np.log(float(row["probability_of_truth"]))) < 1e-4
        assert row["truth"] == Path(row["path"]).parent.name

    predicted = {f: model.class_names[int(probs[i].argmax())] for i, f in enumerate(files)}
    assert sum(predicted[f] == drawn[f] for f in files) >= 7, "the checkpoint knows the shapes"
    mistakes: dict[tuple[str, str], int] = {}
    for f in files:
        if predicted[f] != Path(f).parent.name:
            mistakes[Path(f).parent.name, predicted[f]] = mistakes.get((Path(f).parent.name, predicted[f]), 0) + 1
    with open(tmp_path / "report" / "most_confused.csv") as f:
        pairs = list(csv.DictReader(f))
    assert {(row["truth"], row["prediction"]): int(row["count"]) for row in pairs} == mistakes
    assert [int(row["count"]) for row in pairs] == sorted(mistakes.values(), reverse=True)
    assert ("circles", "stripes") in mistakes and ("stripes", "circles") in mistakes
    with Image.open(tmp_path / "report" / "most_confused.png") as image:
        assert image.size[1] >= 2 * 240, "a row for each confused pair"


def split_copy(image_folder: Path, root: Path, test_classes: tuple[str, ...]) -> Path:
    """``root/{train,val,test}/<class>/`` from the generated images; test/ holds only ``test_classes``."""
    for split, numbers, classes in (
        ("train", range(1, 7), CLASSES),
        ("val", range(7, 10), CLASSES),
        ("test", range(10, 13), test_classes),
    ):
        for kind in classes:
            (root / split / kind).mkdir(parents=True)
            for i in numbers:
                shutil.copy(image_folder / kind / f"image_{i:04d}.jpg", root / split / kind)
    return root


def scored_on(root: Path, tmp_path: Path, *more: str) -> list[str]:
    return old_checkpoint(
        tmp_path, "test", "--data", "ImageFolderDataModule", "--data.root", str(root), "--data.num_workers", "0",
        "--trainer.logger", "false", *more,
    )  # fmt: skip


@pytest.mark.hostile
def test_mean_per_class_accuracy_leaves_out_a_class_without_test_images(image_folder, tmp_path, capsys):
    """A test set without one class: its row has no accuracy, and acc_macro is the mean over the
    classes that have test images (torchmetrics' macro average would count it as 0)."""
    root = split_copy(image_folder, tmp_path / "photos", ("circles", "stripes"))
    status, stderr = caltech(*scored_on(root, tmp_path), capsys=capsys)
    assert status == 0, stderr[-3000:]
    report = tmp_path / "runs" / "report"
    rows = {row["class"]: row for row in csv_rows(report / "per_class.csv")}
    assert rows["squares"]["support"] == "0" and rows["squares"]["accuracy"] == ""
    present = [float(rows[name]["accuracy"]) for name in ("circles", "stripes")]
    metrics = json.loads((report / "metrics.json").read_text())
    assert metrics["test/acc_macro"] == pytest.approx(sum(present) / 2, abs=1e-6)


@pytest.mark.hostile
def test_a_test_set_of_only_unreadable_images_scores_nothing(image_folder, tmp_path, capsys):
    root = split_copy(image_folder, tmp_path / "photos", ())
    for kind in CLASSES:
        (root / "test" / kind).mkdir(parents=True)
        damaged_png(root / "test" / kind / "bad.png", checksum_intact=True)
    line = one_error(*caltech(*scored_on(root, tmp_path, "--data.skip_bad_images", "true"), capsys=capsys))
    assert "no test image could be read, so there is nothing to score" in line
    assert not (tmp_path / "runs" / "report" / "metrics.json").exists()


@pytest.mark.hostile
def test_a_report_folder_that_links_elsewhere_is_refused(image_folder, tmp_path, capsys):
    root = split_copy(image_folder, tmp_path / "photos", tuple(CLASSES))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "report").symlink_to(elsewhere)
    line = one_error(*caltech(*scored_on(root, tmp_path), capsys=capsys))
    assert "report.output" in line and "is a symbolic link" in line
    assert not list(elsewhere.iterdir())


@pytest.mark.hostile
@pytest.mark.parametrize("command", ["test", "validate", "predict"])
def test_scoring_runs_on_one_device(image_folder, tmp_path, capsys, command):
    """On several processes each would score its own padded share of the images."""
    more = ["--data.predict_dir", str(image_folder / "circles")] if command == "predict" else []
    args = old_checkpoint(tmp_path, command, "--data.source", str(image_folder), "--trainer.logger", "false", *more)
    ddp = ["--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu"]
    line = one_error(*caltech(*args, *ddp, capsys=capsys))
    assert f"{command} runs on one device" in line and "--trainer.devices 1" in line
