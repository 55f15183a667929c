"""``history.csv``: one row of train and val metrics per epoch of a run's latest fit, which
``caltech fit`` writes (``callbacks.history.EpochHistory``) and ``caltech compare`` reads."""

from __future__ import annotations

import csv
from pathlib import Path

from caltech_cli.errors import CaltechError
from caltech_cli.files import text_written

HISTORY = "history.csv"
# The wall-clock seconds of the fit up to the end of a row's epoch.
FIT_SECONDS = "fit/seconds"


def read_history(path: Path) -> list[dict[str, float]]:
    """The rows of a ``history.csv``, epochs as ints; one clear error when it is damaged."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(f)]
        return [{**row, "epoch": int(row["epoch"])} for row in rows]
    except (ValueError, TypeError, KeyError, csv.Error, UnicodeDecodeError, OverflowError) as error:
        detail = f"no {error} column" if isinstance(error, KeyError) else str(error).splitlines()[0][:120]
        raise CaltechError(
            f"{path} is damaged ({detail}): it is not the metrics table `caltech fit` writes. "
            "Fix: delete it (the next `caltech fit` there writes it again), or leave that run out."
        ) from error


def write_history(path: Path, rows: list[dict[str, float]]) -> None:
    """Write the rows, ``epoch`` first and the metrics in sorted order (a metric missing from a row
    is an empty cell), whole: aside, then renamed."""
    columns = ["epoch", *sorted({k for row in rows for k in row} - {"epoch"})]
    path.parent.mkdir(parents=True, exist_ok=True)
    with text_written(path, "trainer.default_root_dir") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
