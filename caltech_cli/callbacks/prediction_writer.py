"""The prediction writer: ``predict``'s CSV, a row per image as each batch finishes."""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any, TextIO

import pytorch_lightning as pl
from pytorch_lightning.callbacks import BasePredictionWriter
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
from pytorch_lightning.utilities.exceptions import SIGTERMException

from caltech_cli.files import cannot_write, check_target, kind_of, scratch_beside, writable_file
from caltech_cli.text import text_cell

TOP_K = 5


def partial_path(path: Path) -> Path:
    """Where a stopped run keeps the rows it wrote: ``predictions.csv`` -> ``predictions.partial.csv``."""
    return path.with_name(f"{path.stem}.partial{path.suffix}")


class PredictionWriter(BasePredictionWriter):
    """Write one CSV row per image as each batch finishes, so a stopped run keeps its rows.

    The rows go to a file of this run's own beside the output, renamed to the output when the run
    is done: the file under its name is always whole, and two runs into one folder never mix their
    rows. A run that is stopped (Ctrl-C, SIGTERM, an error) keeps what it wrote as
    ``<name>.partial.csv`` and says so.

    Columns: the image path relative to ``data.predict_dir``, the predicted class and its
    probability, the next classes of the top 5 with theirs, and an error for files that could
    not be read (which then have no prediction).

    Args:
        output: The CSV file; null means ``<trainer.default_root_dir>/predictions.csv``.
    """

    def __init__(self, output: str | None = None) -> None:
        super().__init__(write_interval="batch")
        self.output = output
        self.path: Path | None = None
        self._scratch: Path | None = None
        self._file: TextIO | None = None
        self._writer: Any = None
        self.rows = 0
        self.errors = 0

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.path = Path(self.output) if self.output else Path(trainer.default_root_dir) / "predictions.csv"
        self._scratch = None
        writable_file(self.path, "predictions.output")
        check_target(self.path, "predictions.output")
        try:
            self._scratch = scratch_beside(self.path)
            # Open from the first batch to the last (or an exception): each batch's rows are flushed.
            self._file = open(self._scratch, "w", newline="", encoding="utf-8")  # noqa: SIM115
        except OSError as error:
            raise cannot_write(self.path, "predictions.output", error) from error
        self._writer = csv.writer(self._file)
        ranks = [f"{name}_{k}" for k in range(2, TOP_K + 1) for name in ("class", "probability")]
        self._writer.writerow(["path", "class", "probability", *ranks, "error"])
        self.rows = self.errors = 0

    def write_on_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        prediction: dict[str, Any],
        batch_indices: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        datamodule = trainer.datamodule
        folder = Path(datamodule.predict_dir)
        names = pl_module.class_names
        k = min(TOP_K, len(names))
        probs, ranked = prediction["probs"].float().topk(k, dim=1)
        try:
            for row, (index, error) in enumerate(zip(prediction["index"].tolist(), prediction["error"])):
                path = datamodule.predict_files[index]
                relative = path.name if folder.is_file() else path.relative_to(folder).as_posix()
                cells: list[str] = []
                if not error:
                    for p, c in zip(probs[row].tolist(), ranked[row].tolist()):
                        cells += [text_cell(names[c]), f"{p:.6f}"]
                cells += [""] * (2 * TOP_K - len(cells))
                self._writer.writerow([text_cell(relative), *cells, text_cell(error)])
                self.rows += 1
                self.errors += bool(error)
            self._file.flush()
        except OSError as error:  # a full disk
            raise cannot_write(self.path, "predictions.output", error) from error
        # Lightning notes SIGTERM, and stops a fit at the next step; predict it lets run on.
        if trainer.received_sigterm:
            raise SIGTERMException

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._close()
        os.replace(self._scratch, self.path)
        note = f", {self.errors} could not be read (see the error column)" if self.errors else ""
        rank_zero_info(f"Wrote {self.rows} predictions to {self.path}{note}")

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        """Keep the rows written so far as a partial file, never under the output's own name."""
        self._close()
        if self._scratch is None or not self._scratch.exists():
            return
        partial = partial_path(self.path)
        if kind_of(partial) is None:
            os.replace(self._scratch, partial)
        else:
            partial = self._scratch
        rank_zero_warn(f"Stopped after {self.rows} predictions: they are in {partial} (partial)")

    def _close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
