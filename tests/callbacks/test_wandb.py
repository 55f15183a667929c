"""The W&B callbacks: validation samples, the test report and the config in an offline run."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from conftest import CLASSES, run_caltech, small_run


@pytest.mark.e2e
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


@pytest.mark.e2e
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


@pytest.mark.e2e
def test_no_validation_samples_is_a_choice(image_folder, tmp_path):
    """--wandb_samples.samples 0 logs none (it used to stop the fit after its first epoch)."""
    fit = run_caltech("fit", *small_run(tmp_path, str(image_folder)), "--trainer.max_epochs", "1",
                      "--wandb_samples.samples", "0", cwd=tmp_path)  # fmt: skip
    assert fit.returncode == 0, fit.stderr[-3000:]
    (run,) = tmp_path.glob("runs/wandb/offline-run-*")
    assert not list(run.rglob("samples_*")) and not list(run.rglob("sample_images_*")), "no samples logged"
