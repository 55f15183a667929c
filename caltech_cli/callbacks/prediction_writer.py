"""The prediction writer: ``predict``'s CSV, a row per image as each batch finishes."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, TextIO

import pytorch_lightning as pl
from pytorch_lightning.callbacks import BasePredictionWriter
from pytorch_lightning.utilities import rank_zero_info

from caltech_cli.errors import CaltechError
from caltech_cli.files import writable_file
from caltech_cli.text import text_cell

TOP_K = 5


class PredictionWriter(BasePredictionWriter):
    """Write one CSV row per image as each batch finishes, so a stopped run keeps its rows.

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
        self._file: TextIO | None = None
        self._writer: Any = None
        self.rows = 0
        self.errors = 0

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.path = Path(self.output) if self.output else Path(trainer.default_root_dir) / "predictions.csv"
        writable_file(self.path, "predictions.output")
        try:
            # Open from the first batch to the last (or an exception): each batch's rows are flushed.
            self._file = open(self.path, "w", newline="", encoding="utf-8")  # noqa: SIM115
        except OSError as error:
            raise CaltechError(
                f"predictions.output {self.path} cannot be written ({error.strerror}). "
                "Fix: pass --predictions.output a file you can write."
            ) from error
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

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._close()
        note = f", {self.errors} could not be read (see the error column)" if self.errors else ""
        rank_zero_info(f"Wrote {self.rows} predictions to {self.path}{note}")

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._close()

    def _close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
