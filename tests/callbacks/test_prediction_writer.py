"""predict's CSV: a row per image as each batch finishes, bad files as error rows, cells that stay text."""

from __future__ import annotations

import csv
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from caltech_cli.callbacks import PredictionWriter

from conftest import CLASSES, as_from_a_terminal, csv_rows, draw, old_checkpoint, run_caltech, small_run


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
        "circle.jpg": True,
        "a/square.png": True,
        "a/b/grey_stripes.jpg": True,
        "cmyk_square.jpg": True,
        "palette_circle.png": True,
        "rgba_stripes.png": True,
        "exif_rotated.jpg": True,
        "truncated.jpg": False,
        "empty.jpg": False,
        "text.jpg": False,
    }


@pytest.mark.e2e
def test_predict_on_a_messy_folder(trained_run, tmp_path):
    expected = write_messy_folder(tmp_path / "photos", np.random.default_rng(7))
    output = tmp_path / "out" / "preds.csv"
    result = run_caltech(
        "predict",
        *small_run(trained_run.root, trained_run.source),
        "--ckpt_path",
        str(trained_run.best),
        "--data.predict_dir",
        str(tmp_path / "photos"),
        "--predictions.output",
        str(output),
        "--trainer.logger",
        "false",
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


@pytest.mark.e2e
def test_one_image_as_predict_dir(trained_run, tmp_path):
    image = tmp_path / "one.jpg"
    draw("stripes", np.random.default_rng(3)).save(image)
    result = run_caltech(
        "predict",
        *small_run(trained_run.root, trained_run.source),
        "--ckpt_path",
        str(trained_run.best),
        "--data.predict_dir",
        str(image),
        "--predictions.output",
        str(tmp_path / "p.csv"),
        "--trainer.logger",
        "false",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = csv_rows(tmp_path / "p.csv")
    assert [(r["path"], r["class"]) for r in rows] == [("one.jpg", "stripes")]


def predicting_in(tmp_path: Path) -> tuple[SimpleNamespace, SimpleNamespace]:
    """A trainer predicting four files in ``tmp_path`` and a model of two classes, as the writer sees them."""
    files = [tmp_path / f"{i}.jpg" for i in range(4)]
    trainer = SimpleNamespace(
        default_root_dir=str(tmp_path),
        datamodule=SimpleNamespace(predict_dir=str(tmp_path), predict_files=files),
        received_sigterm=False,
    )
    return trainer, SimpleNamespace(class_names=["a", "b"])


def test_prediction_rows_are_on_disk_before_the_run_ends_and_kept_as_partial(tmp_path):
    """Each batch's rows are flushed to a file of the run's own; a run stopped after a batch keeps
    them as ``predictions.partial.csv`` and never leaves a ``predictions.csv`` that is not whole,
    while one that ends renames its file to ``predictions.csv``."""
    trainer, module = predicting_in(tmp_path)
    writer = PredictionWriter()
    batch = {"index": torch.tensor([0, 1]), "probs": torch.tensor([[0.9, 0.1], [0.2, 0.8]]), "error": ["", ""]}
    writer.on_predict_start(trainer, module)
    writer.write_on_batch_end(trainer, module, batch, None, None, 0, 0)
    (scratch,) = tmp_path.glob(".predictions.csv.*.part")
    assert [(r["path"], r["class"]) for r in csv_rows(scratch)] == [("0.jpg", "a"), ("1.jpg", "b")]
    assert not (tmp_path / "predictions.csv").exists(), "no file under the output's name before it is whole"
    writer.on_exception(trainer, module, KeyboardInterrupt())
    assert len(csv_rows(tmp_path / "predictions.partial.csv")) == 2 and not (tmp_path / "predictions.csv").exists()
    writer.on_predict_start(trainer, module)
    writer.write_on_batch_end(trainer, module, batch, None, None, 0, 0)
    writer.on_predict_end(trainer, module)
    assert len(csv_rows(tmp_path / "predictions.csv")) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["predictions.csv", "predictions.partial.csv"]


FORMULAS = ['=HYPERLINK("x")', "+1+2", "-1+2", "@SUM(1)", "\tTAB", "\rCR"]


@pytest.mark.hostile
def test_prediction_cells_cannot_be_formulas_and_odd_names_are_written(tmp_path):
    names = [f"{f}.jpg" for f in FORMULAS] + ["caf\udce9.jpg", "after.jpg"]  # \udce9: the byte 0xE9 of a name
    files = [tmp_path / name for name in names]
    trainer = SimpleNamespace(
        default_root_dir=str(tmp_path),
        datamodule=SimpleNamespace(predict_dir=str(tmp_path), predict_files=files),
        received_sigterm=False,
    )
    module = SimpleNamespace(class_names=["=cmd", "plain"])
    writer = PredictionWriter()
    writer.on_predict_start(trainer, module)
    batch = {
        "index": torch.arange(len(files)),
        "probs": torch.tensor([[0.9, 0.1]] * len(files)),
        "error": [""] * (len(files) - 1) + ["-bad image"],
    }
    writer.write_on_batch_end(trainer, module, batch, None, None, 0, 0)
    writer.on_predict_end(trainer, module)
    with open(tmp_path / "predictions.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert [row["path"] for row in rows] == [f"'{f}.jpg" for f in FORMULAS] + ["caf\\xe9.jpg", "after.jpg"]
    assert {row["class"] for row in rows[:-1]} == {"'=cmd"} and rows[-1]["error"] == "'-bad image"


@pytest.mark.hostile
def test_two_runs_into_one_folder_never_mix_their_rows(tmp_path):
    """Each run writes a file of its own and renames it when done: predictions.csv is one run's
    whole file, never the other's rows interleaved with NUL bytes."""
    trainer, module = predicting_in(tmp_path)
    first, second = PredictionWriter(), PredictionWriter()
    first.on_predict_start(trainer, module)
    second.on_predict_start(trainer, module)
    for writer, rows in ((first, [0, 1, 2, 3]), (second, [1]), (first, [0, 1]), (second, [2])):
        batch = {
            "index": torch.tensor(rows),
            "probs": torch.tensor([[0.9, 0.1]] * len(rows)),
            "error": [""] * len(rows),
        }
        writer.write_on_batch_end(trainer, module, batch, None, None, 0, 0)
    first.on_predict_end(trainer, module)
    assert [row["path"] for row in csv_rows(tmp_path / "predictions.csv")] == [
        "0.jpg",
        "1.jpg",
        "2.jpg",
        "3.jpg",
    ] * 1 + [
        "0.jpg",
        "1.jpg",
    ]
    second.on_predict_end(trainer, module)
    assert [row["path"] for row in csv_rows(tmp_path / "predictions.csv")] == ["1.jpg", "2.jpg"]
    assert b"\0" not in (tmp_path / "predictions.csv").read_bytes()


@pytest.mark.e2e
@pytest.mark.hostile
def test_sigterm_stops_predict_and_keeps_its_rows_as_partial(image_folder, tmp_path):
    """SIGTERM during predict stops it (143, as fit and test), with the rows it wrote kept in
    predictions.partial.csv, and no predictions.csv that is not whole."""
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(400):
        shutil.copy(image_folder / "circles" / f"image_{i % 12 + 1:04d}.jpg", photos / f"{i:03d}.jpg")
    runs = tmp_path / "runs"
    process = subprocess.Popen(
        [str(Path(sys.executable).with_name("caltech")), *old_checkpoint(tmp_path, "predict", "--data.predict_dir",
         str(photos), "--data.batch_size", "1", "--data.num_workers", "0", "--model.image_size", "160")],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, preexec_fn=as_from_a_terminal,
        env=dict(os.environ, WANDB_MODE="disabled"),
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not any(p.stat().st_size > 200 for p in runs.glob(".predictions.csv.*")):
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    output = process.communicate(timeout=120)[0]
    assert process.returncode == 128 + signal.SIGTERM, output[-3000:]
    kept = csv_rows(runs / "predictions.partial.csv")
    assert 0 < len(kept) < 400 and not (runs / "predictions.csv").exists(), output[-3000:]
    assert "(partial)" in output and "Traceback" not in output
