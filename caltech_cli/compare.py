"""``caltech compare``: runs side by side, as one picture and one table.

A run folder is a ``trainer.default_root_dir`` (``runs/transfer``, ``runs/scratch``): its
``history.csv`` holds the latest fit's epochs and ``report/metrics.json`` its latest test.

The table tells the tutorial's story in the order the runs are named: each run's test accuracy
(top-1 and mean per-class) and what its fit cost, with each run's gain over the first, so that
``caltech compare runs/transfer runs/scratch runs/partial runs/finetune`` shows what pretrained
features are worth against none, and what training the backbone adds to them, for what time. A
gain is shown only where both tests scored the same images (``report/provenance.json``'s key
of them); otherwise a note under the table says why it is not.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt

from caltech_cli.errors import CaltechError
from caltech_cli.files import text_written, writable_folder, write_text
from caltech_cli.history import FIT_SECONDS, HISTORY, read_history
from caltech_cli.report.page import comparison_page
from caltech_cli.report.pictures import save
from caltech_cli.report.tables import TEST_IMAGES_KEY
from caltech_cli.text import from_cell, printable, shown, text_cell

# Top-1 and mean per-class accuracy side by side: Caltech-101 is imbalanced, and papers report the latter.
VAL_COLUMNS = ["val/acc", "val/acc_macro"]
TEST_COLUMNS = ["test/acc", "test/acc_top5", "test/acc_macro", "test/loss"]
# Each run against the first one named, in points of accuracy.
GAIN_COLUMNS = ["test/acc", "test/acc_macro"]


def run_history(run: Path) -> list[dict[str, float]]:
    """The epochs of a run's latest fit."""
    path = run / HISTORY
    if not path.is_file():
        raise CaltechError(
            f"{path} does not exist. Fix: pass the trainer.default_root_dir of a finished `caltech fit`."
        )
    return read_history(path)


def read_test_metrics(run: Path) -> dict[str, float]:
    path = run / "report" / "metrics.json"
    if not path.is_file():
        return {}
    try:
        metrics = json.loads(path.read_text(encoding="utf-8"))
        return {str(k): float(v) for k, v in metrics.items()}
    # JSON and UTF-8 errors are ValueErrors; RecursionError: nested too deep to be ours.
    except (ValueError, TypeError, AttributeError, RecursionError) as error:
        raise CaltechError(
            f"{path} is damaged ({str(error).splitlines()[0][:120]}): it is not the metrics `caltech test` writes. "
            "Fix: run `caltech test` for that run again, or delete it."
        ) from error


def read_test_images(run: Path) -> str:
    """The key of the images a run's latest test scored (``report/provenance.json``); "" where its
    report has none (a report of an earlier version)."""
    path = run / "report" / "provenance.json"
    if not path.is_file():
        return ""
    try:
        key = json.loads(path.read_text(encoding="utf-8")).get(TEST_IMAGES_KEY, "")
    except (ValueError, AttributeError, RecursionError) as error:
        raise CaltechError(
            f"{path} is damaged ({str(error).splitlines()[0][:120]}): it is not the provenance `caltech test` writes. "
            "Fix: run `caltech test` for that run again, or delete it."
        ) from error
    return key if isinstance(key, str) else ""


def fit_minutes(run: Path, history: list[dict[str, float]]) -> float | None:
    """The whole fit's minutes (its last epoch's ``fit/seconds``); None where history.csv has none."""
    seconds = history[-1].get(FIT_SECONDS) if history else None
    if seconds is None:
        return None
    if not math.isfinite(seconds) or seconds < 0:
        raise CaltechError(
            f"{run / HISTORY} is damaged ({FIT_SECONDS} {seconds} is no time a fit took): it is not the metrics "
            "table `caltech fit` writes. Fix: delete it (the next `caltech fit` there writes it again), or leave that "
            "run out."
        )
    return seconds / 60


def read_class_accuracy(run: Path) -> dict[str, float]:
    """Each class's test accuracy in a run's latest test (``report/per_class.csv``); {} without one."""
    path = run / "report" / "per_class.csv"
    if not path.is_file():
        return {}
    try:
        with open(path, newline="", encoding="utf-8") as file:
            # A class without test images has no accuracy (an empty cell).
            rows = csv.DictReader(file)
            return {from_cell(printable(row["class"])): float(row["accuracy"]) for row in rows if row["accuracy"] != ""}
    except (ValueError, TypeError, KeyError, csv.Error) as error:
        raise CaltechError(
            f"{path} is damaged ({str(error).splitlines()[0][:120]}): it is not the table `caltech test` writes. "
            "Fix: run `caltech test` for that run again, or delete it."
        ) from error


def compare(runs: list[Path], output: Path) -> list[Path]:
    """Draw val/acc and val/loss per epoch of each run, and tabulate their test metrics: as a
    picture, CSV, Markdown, and one HTML page with each class's accuracy in each run."""
    histories = {run: run_history(run) for run in runs}
    names = {run: printable(run.name or str(run)) for run in runs}
    writable_folder(output, "output")
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, key in zip(axes, ("val/acc", "val/loss")):
        for run, history in histories.items():
            points = [(row["epoch"], row[key]) for row in history if key in row]
            if points:
                ax.plot(*zip(*points), marker="o", markersize=3, label=names[run])
        ax.set_xlabel("epoch")
        ax.set_title(key)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("Runs compared: " + " vs ".join(names.values()))
    fig.tight_layout()
    picture = output / "comparison.png"
    save(fig, picture, 110, "output")

    first = names[runs[0]]
    header = [
        "run",
        "epochs",
        "fit minutes",
        *(f"best {key}" for key in VAL_COLUMNS),
        *TEST_COLUMNS,
        *(f"{key} points over {first}" for key in GAIN_COLUMNS),
    ]
    rows, values, notes = [], [], []
    tests = {run: read_test_metrics(run) for run in runs}
    images = {run: read_test_images(run) for run in runs}
    for run, history in histories.items():
        test = tests[run]
        minutes = fit_minutes(run, history)
        best = [max((row[key] for row in history if key in row), default=None) for key in VAL_COLUMNS]
        same = bool(images[run]) and images[run] == images[runs[0]]
        gains = [
            100 * (test[key] - tests[runs[0]][key]) if same and key in test and key in tests[runs[0]] else None
            for key in GAIN_COLUMNS
        ]
        if test and tests[runs[0]] and not same:
            notes.append(
                f"{names[run]}: no gain over {first}, whose test scored "
                + ("other images." if images[run] and images[runs[0]] else "images its report does not name.")
            )
        numbers = [*best, *(test.get(c) for c in TEST_COLUMNS)]
        values.append([names[run], len(history), *("" if v is None else v for v in (minutes, *numbers, *gains))])
        rows.append(
            [
                names[run],
                str(len(history)),
                "" if minutes is None else f"{minutes:.1f}",
                *("" if value is None else f"{value:.4f}" for value in numbers),
                *("" if gain is None else f"{gain:+.2f}" for gain in gains),
            ]
        )
    table_csv = output / "comparison.csv"
    with text_written(table_csv, "output") as f:
        csv.writer(f).writerows([header, *([text_cell(row[0]), *row[1:]] for row in rows)])
    table_md = output / "comparison.md"
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    # A "|" in a run's name would end its cell.
    lines += ["| " + " | ".join((cell or "–").replace("|", "\\|") for cell in row) + " |" for row in rows]
    lines += ["", *notes] if notes else []
    write_text(table_md, "\n".join(lines) + "\n", "output")
    classes = {run: read_class_accuracy(run) for run in runs}
    per_class = {
        name: [classes[run].get(name) for run in runs] for name in dict.fromkeys(c for r in classes.values() for c in r)
    }
    table_html = output / "comparison.html"
    write_text(table_html, comparison_page(list(names.values()), values, header, per_class, picture, notes), "output")
    return [picture, table_md, table_csv, table_html]


def main(args: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="caltech compare", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("runs", nargs="+", type=Path, help="run folders (trainer.default_root_dir of each run)")
    parser.add_argument(
        "--output",
        type=Path,
        default=Path("comparison"),
        help="folder for comparison.png, .md, .csv and .html (default: comparison)",
    )
    options = parser.parse_args(args)
    resolved = [run.resolve() for run in options.runs]
    twice = sorted({shown(run) for run, real in zip(options.runs, resolved) if resolved.count(real) > 1})
    if twice:
        raise CaltechError(f"compare names {', '.join(twice)} more than once. Fix: name each run once.")
    written = compare(options.runs, options.output)
    print(shown("Wrote " + ", ".join(str(p) for p in written)) + "\n")
    print("\n".join(shown(line) for line in written[1].read_text().splitlines()))
