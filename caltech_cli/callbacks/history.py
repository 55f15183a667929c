"""The epoch history callback: ``history.csv``, a row per epoch, as the fit goes."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.utilities import rank_zero_warn

from caltech_cli.errors import CaltechError
from caltech_cli.files import check_target
from caltech_cli.history import FIT_SECONDS, HISTORY, read_history, write_history


class EpochHistory(Callback):
    """Keep ``<trainer.default_root_dir>/history.csv``: one row of train and val metrics per
    epoch of the latest fit, rewritten as each epoch ends (``caltech compare`` reads it). A
    resumed fit keeps the rows of the epochs before its checkpoint.

    Each row also says how fast the epoch trained (``train/seconds``, ``train/images_per_s``:
    its training batches, loading included, validation not), the figure to compare with a
    plain PyTorch loop (``benchmarks/finetune.py``), and what the fit has cost so far
    (``fit/seconds``: the wall-clock time since it started, cache passes, validation and
    checkpoints included; a resumed fit goes on from the time of the row it resumes after),
    which ``caltech compare`` sets beside each run's accuracy.

    A row is written once every hook of its epoch's end has run: the model logs an epoch's
    training figures at its last batch, but the figures of an epoch that something stopped
    early (early stopping at a validation within the epoch, ``trainer.max_time``) only in its own
    ``on_train_epoch_end``, which Lightning calls after the callbacks' (so before the next
    epoch starts, or the fit ends, or stops on an exception).
    """

    def __init__(self) -> None:
        super().__init__()
        self._rows: list[dict[str, float]] = []
        self._ended: dict[str, float] | None = None  # the epoch that ended, until its metrics are final
        self._start_clock()
        self._fit_start = time.perf_counter()
        self._fit_before = 0.0  # the seconds of the fit a resumed one goes on from

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Before the loaders are made, so the fit's time holds the passes that fill the caches."""
        self._fit_start, self._fit_before = time.perf_counter(), 0.0

    def _start_clock(self) -> None:
        self._epoch_start = self._last_batch_end = time.perf_counter()
        self._images = 0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """After a checkpoint is restored, when ``current_epoch`` is the epoch to resume at (a
        resume within an epoch starts no new epoch, so the clock starts here too)."""
        self._rows, self._ended = [], None
        self._start_clock()
        path = check_target(Path(trainer.default_root_dir) / HISTORY, "trainer.default_root_dir")
        if trainer.ckpt_path and path.is_file():
            try:
                self._rows = [row for row in read_history(path) if row["epoch"] < trainer.current_epoch]
            except CaltechError as error:
                rank_zero_warn(f"{str(error).split(' Fix:')[0]} It starts again from this epoch.")
            self._fit_before = self._rows[-1].get(FIT_SECONDS, 0.0) if self._rows else 0.0

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._write_ended(trainer)
        self._start_clock()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._images += len(batch[1])
        self._last_batch_end = time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Note how fast the epoch trained; its row, with the epoch's validation too, is written
        once its metrics are final (``_write_ended``)."""
        seconds = self._last_batch_end - self._epoch_start
        self._ended = {"epoch": trainer.current_epoch}
        if seconds > 0:
            self._ended["train/seconds"] = round(seconds, 3)
            self._ended["train/images_per_s"] = round(self._images / seconds, 1)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._write_ended(trainer)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._write_ended(trainer)

    def _write_ended(self, trainer: pl.Trainer) -> None:
        """Add the row of the epoch that ended, with its final metrics, and rewrite the file."""
        ended, self._ended = self._ended, None
        if ended is None or not trainer.is_global_zero:
            return
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(("train/", "val/"))}
        ended[FIT_SECONDS] = round(self._fit_before + time.perf_counter() - self._fit_start, 1)
        self._rows.append({**metrics, **ended})
        write_history(Path(trainer.default_root_dir) / HISTORY, self._rows)
