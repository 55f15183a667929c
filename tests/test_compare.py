"""caltech compare: runs side by side, and one line for a run folder it cannot read."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from PIL import Image

from conftest import SCRATCH, caltech, csv_rows, one_error, run_caltech, small_run


@pytest.mark.e2e
def test_compare_two_runs(trained_run, tmp_path):
    scratch = tmp_path / "scratch"
    options = [
        *small_run(scratch, trained_run.source, config=SCRATCH),
        "--model.image_size",
        "32",
        "--model.backbone",
        "resnet18",
        "--trainer.max_epochs",
        "2",
        "--lr_scheduler.T_max",
        "2",
    ]
    assert run_caltech("fit", *options, cwd=scratch.parent).returncode == 0
    assert (
        run_caltech("test", *options, "--ckpt_path", str(scratch / "runs" / "best.ckpt"), cwd=scratch.parent).returncode
        == 0
    )
    result = run_caltech(
        "compare", str(trained_run.runs), str(scratch / "runs"), "--output", str(tmp_path / "cmp"), cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    with Image.open(tmp_path / "cmp" / "comparison.png") as image:
        assert image.format == "PNG"
    rows = csv_rows(tmp_path / "cmp" / "comparison.csv")
    assert len(rows) == 2 and rows[0]["epochs"] == "4" and rows[1]["epochs"] == "2"
    transfer_acc = json.loads((trained_run.runs / "report" / "metrics.json").read_text())["test/acc"]
    assert rows[0]["test/acc"] == f"{transfer_acc:.4f}"
    history = csv_rows(trained_run.runs / "history.csv")
    assert rows[0]["best val/acc_macro"] == f"{max(float(r['val/acc_macro']) for r in history):.4f}"
    assert rows[0]["fit minutes"] == f"{float(history[-1]['fit/seconds']) / 60:.1f}"
    assert float(history[-1]["fit/seconds"]) > float(history[0]["fit/seconds"]) > 0
    scratch_acc = json.loads((scratch / "runs" / "report" / "metrics.json").read_text())["test/acc"]
    assert rows[0]["test/acc points over runs"] == "+0.00", "the first run against itself"
    assert rows[1]["test/acc points over runs"] == f"{100 * (scratch_acc - transfer_acc):+.2f}"
    markdown = (tmp_path / "cmp" / "comparison.md").read_text()
    assert markdown.count("\n") == 4 and "test/acc_macro points over runs" in markdown


@pytest.mark.e2e
def test_compare_names_a_run_without_history(tmp_path):
    result = run_caltech("compare", str(tmp_path / "nothing"), cwd=tmp_path)
    assert result.returncode == 2 and "history.csv does not exist" in result.stderr


def write_history(run: Path, text: str | bytes) -> Path:
    run.mkdir(parents=True)
    (run / "history.csv").write_bytes(text if isinstance(text, bytes) else text.encode())
    return run


@pytest.mark.hostile
def test_compare_table_cells_cannot_be_formulas(tmp_path, capsys):
    first = write_history(tmp_path / "=1+2", "epoch,val/acc,val/loss\n0,0.5,1.0\n1,0.75,0.5\n")
    second = write_history(tmp_path / "plain", "epoch,val/acc,val/loss\n0,0.6,0.9\n")
    status, stderr = caltech("compare", str(first), str(second), "--output", str(tmp_path / "cmp"), capsys=capsys)
    assert status == 0, stderr
    with open(tmp_path / "cmp" / "comparison.csv", newline="", encoding="utf-8") as f:
        assert [row["run"] for row in csv.DictReader(f)] == ["'=1+2", "plain"]


@pytest.mark.hostile
@pytest.mark.parametrize(
    ("content", "says"),
    [
        ("epoch,val/acc\n0,0.5\n1,lots\n", "could not convert string to float"),
        ("val/acc\n0.5\n", "no 'epoch' column"),
        (b"\x89PNG\r\n\x1a\n\x00\xff\xfe", "damaged"),
        ("epoch,val/acc\n0,0.5,extra,cells\n", "damaged"),
        ("epoch,val/acc\ninf,0.5\n", "cannot convert float infinity to integer"),
        ("epoch,val/acc\n" + "9" * 400 + ",0.5\n", "cannot convert float infinity to integer"),
        ("epoch,fit/seconds\n0,nan\n", "fit/seconds nan is no time a fit took"),
        ("epoch,fit/seconds\n0,1e400\n", "fit/seconds inf is no time a fit took"),
        ("epoch,fit/seconds\n0,-60\n", "fit/seconds -60.0 is no time a fit took"),
    ],
    ids=[
        "not-a-number",
        "no-epoch",
        "binary",
        "extra-cells",
        "inf-epoch",
        "400-digit-epoch",
        "nan-time",
        "inf-time",
        "negative-time",
    ],  # fmt: skip
)
def test_compare_on_a_damaged_history_is_one_line(tmp_path, capsys, content, says):
    run = write_history(tmp_path / "run", content)
    line = one_error(*caltech("compare", str(run), "--output", str(tmp_path / "cmp"), capsys=capsys))
    assert f"{run / 'history.csv'} is damaged" in line and says in line


@pytest.mark.hostile
@pytest.mark.parametrize(
    "content", ['{"test/acc": 0.9', '{"test/acc": ' + "[" * 100_000 + "]" * 100_000 + "}", '{"test/acc": {"a": 1}}']
)
def test_compare_on_damaged_test_metrics_is_one_line(tmp_path, capsys, content):
    run = write_history(tmp_path / "run", "epoch,val/acc\n0,0.5\n")
    (run / "report").mkdir()
    (run / "report" / "metrics.json").write_text(content)
    line = one_error(*caltech("compare", str(run), "--output", str(tmp_path / "cmp"), capsys=capsys))
    assert f"{run / 'report' / 'metrics.json'} is damaged" in line


def with_a_test(run: Path, accuracy: float, images: str | None) -> Path:
    """A run's test metrics, and the key of the images its test scored (no provenance with None)."""
    (run / "report").mkdir()
    (run / "report" / "metrics.json").write_text(json.dumps({"test/acc": accuracy, "test/acc_macro": accuracy}))
    if images is not None:
        (run / "report" / "provenance.json").write_text(json.dumps({"test images key": images}))
    return run


def test_a_gain_is_shown_only_between_tests_of_the_same_images(tmp_path, capsys):
    history = "epoch,val/acc,fit/seconds\n0,0.5,30\n1,0.6,90\n"
    first = with_a_test(write_history(tmp_path / "first", history), 0.5, "0123456789ab")
    same = with_a_test(write_history(tmp_path / "same", history), 0.75, "0123456789ab")
    other = with_a_test(write_history(tmp_path / "other", history), 0.25, "ba9876543210")
    unnamed = with_a_test(write_history(tmp_path / "unnamed", history), 0.5, None)
    runs = [str(run) for run in (first, same, other, unnamed)]
    status, stderr = caltech("compare", *runs, "--output", str(tmp_path / "cmp"), capsys=capsys)
    assert status == 0, stderr
    rows = {row["run"]: row for row in csv_rows(tmp_path / "cmp" / "comparison.csv")}
    gain = "test/acc points over first"
    assert rows["first"][gain] == "+0.00" and rows["same"][gain] == "+25.00"
    assert rows["other"][gain] == rows["unnamed"][gain] == "", "no number on other images, or on unnamed ones"
    assert rows["same"]["fit minutes"] == "1.5"
    markdown = (tmp_path / "cmp" / "comparison.md").read_text()
    assert "other: no gain over first, whose test scored other images." in markdown
    assert "unnamed: no gain over first, whose test scored images its report does not name." in markdown
    assert "other: no gain over first" in (tmp_path / "cmp" / "comparison.html").read_text()


@pytest.mark.hostile
def test_run_names_are_text_in_every_output(tmp_path, capsys):
    """A "$" pair starts matplotlib's math mode, which fails on "x$^$y"; a "|" ends a Markdown cell."""
    first = write_history(tmp_path / "x$^$y", "epoch,val/acc,val/loss\n0,0.5,1.0\n")
    second = write_history(tmp_path / "a|b", "epoch,val/acc,val/loss\n0,0.5,2.0\n1,400.0,inf\n")
    status, stderr = caltech("compare", str(first), str(second), "--output", str(tmp_path / "cmp"), capsys=capsys)
    assert status == 0, stderr[-3000:]
    assert "| a\\|b |" in (tmp_path / "cmp" / "comparison.md").read_text()


@pytest.mark.hostile
def test_a_run_named_twice_is_one_line(tmp_path, capsys):
    run = write_history(tmp_path / "run", "epoch,val/acc\n0,0.5\n")
    line = one_error(*caltech("compare", str(run), str(tmp_path / "." / "run"), capsys=capsys))
    assert "more than once" in line and "name each run once" in line


def test_class_names_come_back_from_their_cells(tmp_path, capsys):
    """per_class.csv quotes a name that looks like a formula; the HTML table shows the class's
    own name, one row per class, and a class without test images has no number."""
    runs = []
    for name, cells in (("a", ["'=cls,0.5", "plain,"]), ("b", ["'=cls,0.25", "plain,1.0"])):
        run = write_history(tmp_path / name, "epoch,val/acc\n0,0.5\n")
        (run / "report").mkdir()
        (run / "report" / "per_class.csv").write_text("class,accuracy\n" + "\n".join(cells) + "\n")
        runs.append(str(run))
    status, stderr = caltech("compare", *runs, "--output", str(tmp_path / "cmp"), capsys=capsys)
    assert status == 0, stderr
    page = (tmp_path / "cmp" / "comparison.html").read_text()
    assert "&#x27;=cls" not in page and "'=cls" not in page and page.count(">=cls<") == 1
    assert page.count(">plain<") == 1
