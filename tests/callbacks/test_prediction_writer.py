"""predict's CSV: a row per image as each batch finishes, bad files as error rows, cells that stay text."""

from __future__ import annotations

import csv
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from caltech_cli.callbacks import PredictionWriter

from conftest import CLASSES, csv_rows, draw, run_caltech, small_run


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


def test_prediction_rows_are_on_disk_before_the_run_ends(tmp_path):
    """A run stopped after a batch keeps that batch's rows: the writer flushes each batch."""
    from types import SimpleNamespace

    import torch

    from caltech_cli.callbacks import PredictionWriter

    files = [tmp_path / f"{i}.jpg" for i in range(4)]
    trainer = SimpleNamespace(
        default_root_dir=str(tmp_path), datamodule=SimpleNamespace(predict_dir=str(tmp_path), predict_files=files)
    )
    module = SimpleNamespace(class_names=["a", "b"])
    writer = PredictionWriter()
    writer.on_predict_start(trainer, module)
    batch = {"index": torch.tensor([0, 1]), "probs": torch.tensor([[0.9, 0.1], [0.2, 0.8]]), "error": ["", ""]}
    writer.write_on_batch_end(trainer, module, batch, None, None, 0, 0)
    rows = csv_rows(tmp_path / "predictions.csv")
    assert [(r["path"], r["class"]) for r in rows] == [("0.jpg", "a"), ("1.jpg", "b")]
    writer.on_exception(trainer, module, KeyboardInterrupt())
    assert len(csv_rows(tmp_path / "predictions.csv")) == 2


FORMULAS = ['=HYPERLINK("x")', "+1+2", "-1+2", "@SUM(1)", "\tTAB", "\rCR"]


@pytest.mark.hostile
def test_prediction_cells_cannot_be_formulas_and_odd_names_are_written(tmp_path):
    names = [f"{f}.jpg" for f in FORMULAS] + ["caf\udce9.jpg", "after.jpg"]  # \udce9: the byte 0xE9 of a name
    files = [tmp_path / name for name in names]
    trainer = SimpleNamespace(
        default_root_dir=str(tmp_path), datamodule=SimpleNamespace(predict_dir=str(tmp_path), predict_files=files)
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
