"""What runs leave behind for people: test reports, predictions on messy folders, W&B, comparisons."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
from conftest import CLASSES, SCRATCH, TRANSFER, draw, printed_metrics, run_caltech, small_run
from PIL import Image, ImageOps

REPORT_FILES = {"metrics.json", "per_class.csv", "confusion_matrix.png", "pr_curves.png", "predictions.png",
                "top_losses.png", "top_losses.csv", "most_confused.png", "most_confused.csv"}


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
    with open(report / "per_class.csv") as f:
        rows = list(csv.DictReader(f))
    assert [row["class"] for row in rows] == sorted(CLASSES)
    assert sum(int(row["support"]) for row in rows) == 9
    mean_accuracy = sum(float(row["accuracy"]) for row in rows) / len(rows)
    assert abs(mean_accuracy - saved["test/acc_macro"]) < 1e-4, "per-class accuracy averages to acc_macro"


def write_messy_folder(folder, rng) -> dict[str, bool]:
    """Good and bad files of every kind a photo folder holds; the value says if it is readable."""
    (folder / "a" / "b").mkdir(parents=True)
    draw("circles", rng).save(folder / "circle.jpg")
    draw("squares", rng).save(folder / "a" / "square.png")
    draw("stripes", rng).convert("L").save(folder / "a" / "b" / "grey_stripes.jpg")
    draw("squares", rng).convert("CMYK").save(folder / "cmyk_square.jpg")
    draw("circles", rng).convert("P").save(folder / "palette_circle.png", transparency=0)
    rgba = draw("stripes", rng).convert("RGBA")
    rgba.putalpha(200)
    rgba.save(folder / "rgba_stripes.png")
    rotated = draw("circles", rng)
    exif = rotated.getexif()
    exif[0x0112] = 6
    rotated.save(folder / "exif_rotated.jpg", exif=exif)
    whole = (folder / "circle.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(whole[: len(whole) // 3])
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "text.jpg").write_text("this is not a photo")
    (folder / "notes.txt").write_text("not an image extension: not listed")
    return {
        "circle.jpg": True, "a/square.png": True, "a/b/grey_stripes.jpg": True, "cmyk_square.jpg": True,
        "palette_circle.png": True, "rgba_stripes.png": True, "exif_rotated.jpg": True,
        "truncated.jpg": False, "empty.jpg": False, "text.jpg": False,
    }


def test_predict_on_a_messy_folder(trained_run, tmp_path):
    expected = write_messy_folder(tmp_path / "photos", np.random.default_rng(7))
    output = tmp_path / "out" / "preds.csv"
    result = run_caltech(
        "predict", *small_run(trained_run.root, trained_run.source), "--ckpt_path", str(trained_run.best),
        "--data.predict_dir", str(tmp_path / "photos"), "--predictions.output", str(output), "--trainer.logger", "false",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    with open(output) as f:
        rows = {row["path"]: row for row in csv.DictReader(f)}
    assert set(rows) == set(expected)
    for path, readable in expected.items():
        row = rows[path]
        if readable:
            assert row["class"] in CLASSES and not row["error"], row
            assert float(row["probability"]) >= float(row["probability_2"])
        else:
            assert row["class"] == "" and row["error"], row
    assert "3 could not be read" in result.stderr
    assert rows["circle.jpg"]["class"] == "circles"


def test_one_image_as_predict_dir(trained_run, tmp_path):
    image = tmp_path / "one.jpg"
    draw("stripes", np.random.default_rng(3)).save(image)
    result = run_caltech(
        "predict", *small_run(trained_run.root, trained_run.source), "--ckpt_path", str(trained_run.best),
        "--data.predict_dir", str(image), "--predictions.output", str(tmp_path / "p.csv"), "--trainer.logger", "false",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = list(csv.DictReader(open(tmp_path / "p.csv")))
    assert [(r["path"], r["class"]) for r in rows] == [("one.jpg", "stripes")]


def test_wandb_offline_run_holds_tables_curves_and_config(trained_run):
    fit_run, test_run = sorted(trained_run.runs.glob("wandb/offline-run-*"))[:2]
    fit_media = {p.name for p in (fit_run / "files" / "media" / "table").rglob("*.table.json")}
    assert any(name.startswith("samples_") for name in fit_media), fit_media
    table = json.loads(next((fit_run / "files" / "media" / "table").rglob("samples_*.table.json")).read_text())
    assert table["columns"] == ["image", "prediction", "truth", "probability", "epoch"]
    assert {row[2] for row in table["data"]} <= set(CLASSES)
    test_tables = {p.name for p in (test_run / "files" / "media" / "table").rglob("*.table.json")}
    assert any(name.startswith("pr_curve_table") for name in test_tables), test_tables
    assert any(name.startswith("confusion_matrix_table") for name in test_tables), test_tables
    images = {p.name for p in (test_run / "files" / "media" / "images").rglob("*.png")}
    assert any(name.startswith("confusion_matrix") for name in images), images
    records = next(fit_run.glob("run-*.wandb")).read_bytes()  # offline runs keep their config here
    assert b"Caltech101DataModule" in records and b"feature_batch_size" in records, "the whole config"


def test_compare_two_runs(trained_run, tmp_path):
    scratch = tmp_path / "scratch"
    options = [*small_run(scratch, trained_run.source, config=SCRATCH), "--model.image_size", "32",
               "--model.backbone", "resnet18", "--trainer.max_epochs", "2", "--lr_scheduler.T_max", "2"]
    assert run_caltech("fit", *options, cwd=scratch.parent).returncode == 0
    assert run_caltech("test", *options, "--ckpt_path", str(scratch / "runs" / "best.ckpt"), cwd=scratch.parent).returncode == 0
    result = run_caltech("compare", str(trained_run.runs), str(scratch / "runs"), "--output", str(tmp_path / "cmp"),
                         cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    with Image.open(tmp_path / "cmp" / "comparison.png") as image:
        assert image.format == "PNG"
    rows = list(csv.DictReader(open(tmp_path / "cmp" / "comparison.csv")))
    assert len(rows) == 2 and rows[0]["epochs"] == "4" and rows[1]["epochs"] == "2"
    transfer_acc = json.loads((trained_run.runs / "report" / "metrics.json").read_text())["test/acc"]
    assert rows[0]["test/acc"] == f"{transfer_acc:.4f}"
    history = list(csv.DictReader(open(trained_run.runs / "history.csv")))
    assert rows[0]["best val/acc_macro"] == f"{max(float(r['val/acc_macro']) for r in history):.4f}"
    markdown = (tmp_path / "cmp" / "comparison.md").read_text()
    assert markdown.count("\n") == 4 and "test/acc_macro" in markdown


def test_compare_names_a_run_without_history(tmp_path):
    result = run_caltech("compare", str(tmp_path / "nothing"), cwd=tmp_path)
    assert result.returncode == 2 and "history.csv does not exist" in result.stderr


def test_prediction_rows_are_on_disk_before_the_run_ends(tmp_path):
    """A run stopped after a batch keeps that batch's rows: the writer flushes each batch."""
    from types import SimpleNamespace

    import torch

    from caltech_cli.callbacks import PredictionWriter

    files = [tmp_path / f"{i}.jpg" for i in range(4)]
    trainer = SimpleNamespace(default_root_dir=str(tmp_path),
                              datamodule=SimpleNamespace(predict_dir=str(tmp_path), predict_files=files))
    module = SimpleNamespace(class_names=["a", "b"])
    writer = PredictionWriter()
    writer.on_predict_start(trainer, module)
    batch = {"index": torch.tensor([0, 1]), "probs": torch.tensor([[0.9, 0.1], [0.2, 0.8]]), "error": ["", ""]}
    writer.write_on_batch_end(trainer, module, batch, None, None, 0, 0)
    rows = list(csv.DictReader(open(tmp_path / "predictions.csv")))
    assert [(r["path"], r["class"]) for r in rows] == [("0.jpg", "a"), ("1.jpg", "b")]
    writer.on_exception(trainer, module, KeyboardInterrupt())
    assert len(list(csv.DictReader(open(tmp_path / "predictions.csv")))) == 2


def test_top_losses_and_most_confused_pairs():
    """fastai's top_losses and most_confused: checked against a brute-force count."""
    from itertools import product

    import torch

    from caltech_cli import report

    generator = torch.Generator().manual_seed(0)
    probs = torch.randn(60, 4, generator=generator).mul(2).softmax(dim=1)
    labels = torch.randint(0, 4, (60,), generator=generator)
    losses = [-float(probs[i, labels[i]].log()) for i in range(60)]
    worst = report.top_losses(probs, labels, 7)
    assert worst == sorted(range(60), key=lambda i: -losses[i])[:7]
    assert torch.allclose(report.losses(probs, labels), torch.nn.functional.nll_loss(
        probs.log(), labels, reduction="none"))

    preds = probs.argmax(dim=1).tolist()
    counts = {(t, p): sum(labels[i] == t and preds[i] == p for i in range(60)) for t, p in product(range(4), repeat=2)}
    pairs = report.confused_pairs(probs, labels, 3)
    assert [len(items) for _, _, items in pairs] == sorted((c for (t, p), c in counts.items() if t != p), reverse=True)[:3]
    for true, pred, items in pairs:
        assert len(items) == counts[true, pred] and true != pred
        assert all(labels[i] == true and preds[i] == pred for i in items)
        assert [losses[i] for i in items] == sorted((losses[i] for i in items), reverse=True), "highest loss first"
    no_mistakes = torch.eye(4)[labels] * 0.9 + 0.025
    assert report.confused_pairs(no_mistakes, labels, 3) == []


def mislabelled_folder(root, rng) -> dict[str, str]:
    """A folder with train/, val/ and test/ whose test/ files are partly filed under the wrong
    class: a model that knows the shapes makes known mistakes. Returns test file -> drawn shape."""
    drawn = {}
    for split, count in (("train", 2), ("val", 2)):
        for kind in CLASSES:
            (root / split / kind).mkdir(parents=True)
            for i in range(count):
                draw(kind, rng).save(root / split / kind / f"{i}.jpg")
    filed = {"circles": ["stripes", "stripes", "stripes"], "squares": ["squares"] * 3,
             "stripes": ["circles", "circles", "stripes"]}
    for folder, kinds in filed.items():
        (root / "test" / folder).mkdir(parents=True)
        for i, kind in enumerate(kinds):
            path = root / "test" / folder / f"{i}.jpg"
            draw(kind, rng).save(path)
            drawn[str(path)] = kind
    return drawn


def test_report_shows_the_truly_worst_test_images(trained_run, tmp_path):
    """The listed top-loss images are the ones with the highest loss, recomputed here from the
    checkpoint, in that order; the confused pairs are the mistakes counted here."""
    import torch

    from caltech_cli.images import eval_transform, load_rgb
    from caltech_cli.model import TransferClassifier

    drawn = mislabelled_folder(tmp_path / "photos", np.random.default_rng(11))
    result = run_caltech(
        "test", "--config", TRANSFER, "--data", "ImageFolderDataModule", "--data.root", str(tmp_path / "photos"),
        "--data.data_dir", str(tmp_path / "data"), "--data.num_workers", "0", "--model.image_size", "64",
        "--trainer.default_root_dir", str(tmp_path / "runs"), "--trainer.logger", "false",
        "--ckpt_path", str(trained_run.best), "--report.top_losses", "4", "--report.output", str(tmp_path / "report"),
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]

    model = TransferClassifier.load_from_checkpoint(trained_run.best, map_location="cpu", weights_only=True).eval()
    files = sorted(drawn)
    truth = [model.class_names.index(Path(f).parent.name) for f in files]
    images = [load_rgb(Path(f)) for f in files]
    with torch.no_grad():
        # The transfer config tests with flip TTA: each image's probabilities averaged with its mirror image's.
        probs = sum(model(torch.stack([eval_transform(model.preprocessing)(view(i)) for i in images])).softmax(1)
                    for view in (lambda i: i, ImageOps.mirror)) / 2
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


def test_wandb_offline_runs_keep_the_pictures_as_files(trained_run):
    """In an offline run, wandb leaves the images in a table out (wandb/wandb#4611); the
    validation samples and the test's top losses are logged as images too, so their files are in
    the run folder, which is what `wandb sync` uploads."""
    fit_run, test_run = sorted(trained_run.runs.glob("wandb/offline-run-*"))[:2]
    samples = sorted((fit_run / "files" / "media" / "images" / "val").glob("sample_images_*.png"))
    steps = [path.name.split("_")[2] for path in samples]
    table = json.loads(next((fit_run / "files" / "media" / "table").rglob("samples_*.table.json")).read_text())
    assert len(set(steps)) == 4, "one set per validation of the 4 epochs"
    assert all(steps.count(step) == len(table["data"]) for step in steps), "every image of the table, as a file"
    for path in samples[:3]:
        with Image.open(path) as image:
            assert image.format == "PNG" and image.size == (128, 128)
    records = next(fit_run.glob("run-*.wandb")).read_bytes()
    assert b"truth: " in records and b"val/sample_images" in records, "captioned"

    worst = sorted((test_run / "files" / "media" / "images" / "test").glob("top_losses_*.png"))
    assert len(worst) == 9, "every test image (9 < 18) as a captioned image"
    assert any((test_run / "files" / "media" / "images" / "test" / "report").glob("most_confused_*.png"))
    assert b"loss " in next(test_run.glob("run-*.wandb")).read_bytes()
