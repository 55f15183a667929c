"""Callbacks: everything a run writes or tells besides training itself."""

from __future__ import annotations

import csv
import os
import random
import time
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import pytorch_lightning as pl
import torch
import yaml
from PIL import Image
from pytorch_lightning.callbacks import BasePredictionWriter, Callback, ModelCheckpoint
from pytorch_lightning.cli import SaveConfigCallback
from pytorch_lightning.loggers import WandbLogger
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn

from caltech_cli import report
from caltech_cli.errors import CaltechError, writable_file, writable_folder

TOP_K = 5
HISTORY = "history.csv"


def rng_states() -> dict[str, Any]:
    """The random generators' states (torch, CUDA, NumPy, Python) in types a ``weights_only``
    checkpoint load accepts."""
    numpy_state = np.random.get_state(legacy=False)
    numpy_state["state"]["key"] = numpy_state["state"]["key"].tolist()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": numpy_state,
        "python": random.getstate(),
    }


def set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    numpy_state = dict(states["numpy"], state=dict(states["numpy"]["state"]))
    numpy_state["state"]["key"] = np.asarray(numpy_state["state"]["key"], dtype=np.uint32)
    np.random.set_state(numpy_state)
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))


class BestAndLastCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` that says where the best and the last checkpoint are when fit ends.

    Each run keeps its checkpoints in its own folder; ``<trainer.default_root_dir>/best.ckpt``
    is a link to the best one of the latest run, so ``caltech test --ckpt_path
    runs/transfer/best.ckpt`` works without looking up a run id.

    Checkpoints also hold the random generators' states at the moment they are written (the end
    of an epoch), and ``fit --ckpt_path`` puts them back, so a resumed run draws the same
    shuffles, crops and dropout masks as a run that was never stopped, and ends with the same
    weights (with ``--trainer.deterministic true`` where kernels are not deterministic).

    Lightning 2.6 writes ``last.ckpt`` only in epochs that improve the best one (the pvnet
    project ran into it too: openclimatefix/pvnet#544), which would make it a copy of the best
    and a resume would repeat epochs; here it is written at the end of every epoch.

    A fit stopped by Ctrl-C, SIGTERM or an error saves where it stopped as ``last.ckpt``, the
    file that ``fit --ckpt_path`` resumes from. Lightning's own ``save_on_exception`` names it
    like a best checkpoint (``best-epoch01-...``, which could even replace the real best), and
    writes nothing when the signal comes after the epoch's best checkpoint but before its last.
    """

    _last_saved_at_step = -1

    def _save_last_checkpoint(self, trainer: pl.Trainer, monitor_candidates: dict[str, torch.Tensor]) -> None:
        super()._save_last_checkpoint(trainer, monitor_candidates)
        self._last_saved_at_step = trainer.global_step

    def _save_last_each_epoch(self, trainer: pl.Trainer) -> None:
        fitting = trainer.state.fn == "fit" and not trainer.sanity_checking and not trainer.fast_dev_run
        if self.save_last and fitting and self._last_saved_at_step != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if not self._should_save_on_train_epoch_end(trainer):
            self._save_last_each_epoch(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self._should_save_on_train_epoch_end(trainer):
            self._save_last_each_epoch(trainer)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "rng_states": rng_states()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        if "rng_states" in state_dict:
            set_rng_states(state_dict["rng_states"])

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        fitting = trainer.state.fn == "fit" and not trainer.sanity_checking and not trainer.fast_dev_run
        started = trainer.global_step > 0
        if not (self.save_on_exception and self.save_last and fitting and started):
            return
        if self._last_saved_at_step != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        reason = "SIGTERM" if trainer.received_sigterm else "Ctrl-C" if isinstance(exception, KeyboardInterrupt) else (
            type(exception).__name__)
        rank_zero_info(
            f"Stopped by {reason} in epoch {trainer.current_epoch} at step {trainer.global_step}: saved in "
            f"{self.last_model_path}; `caltech fit --ckpt_path {self.last_model_path}` resumes from it"
        )

    @staticmethod
    def best_link(trainer: pl.Trainer) -> Path:
        """``<trainer.default_root_dir>/best.ckpt``, refused while something this tool did not make
        is there: only a link to a checkpoint (the one an earlier fit made) is replaced."""
        link = Path(trainer.default_root_dir) / "best.ckpt"
        ours = link.is_symlink() and os.readlink(link).endswith(".ckpt")
        if (link.exists() or link.is_symlink()) and not ours:
            kind = "link to something else" if link.is_symlink() else "folder" if link.is_dir() else "file"
            raise CaltechError(
                f"{link} is in the way: fit links best.ckpt there, and this {kind} was not made by caltech, so it is "
                "left as it is. Fix: move or rename it, or pass another --trainer.default_root_dir."
            )
        return link

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Refuse before training, not after it, when best.ckpt could not be linked."""
        super().on_fit_start(trainer, pl_module)
        self.best_link(trainer)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        if self.best_model_path:
            score = "" if self.best_model_score is None else f" ({self.monitor}={self.best_model_score:.4f})"
            rank_zero_info(f"Best checkpoint{score}: {self.best_model_path}")
            link = self.best_link(trainer)
            link.unlink(missing_ok=True)
            link.symlink_to(os.path.relpath(Path(self.best_model_path).resolve(), link.parent.resolve()))
            rank_zero_info(f"Linked {link} to it")
        if self.last_model_path:
            rank_zero_info(f"Last checkpoint: {self.last_model_path}")


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
            self._file = open(self.path, "w", newline="", encoding="utf-8")
        except OSError as error:
            raise CaltechError(f"predictions.output {self.path} cannot be written ({error.strerror}). "
                               "Fix: pass --predictions.output a file you can write.") from error
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
                    cells += [report.text_cell(names[c]), f"{p:.6f}"]
            cells += [""] * (2 * TOP_K - len(cells))
            self._writer.writerow([report.text_cell(relative), *cells, report.text_cell(error)])
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


def _wandb_loggers(trainer: pl.Trainer) -> list[WandbLogger]:
    return [logger for logger in trainer.loggers if isinstance(logger, WandbLogger)]


def _fixed_sample(size: int, count: int, seed: int) -> list[int]:
    """The same ``count`` indices of ``size`` items on every call, so epochs and runs compare."""
    generator = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(size, generator=generator)[:count].tolist())


class TestReport(Callback):
    """Write a report of every ``test`` run, and send it to W&B when a W&B logger is attached.

    Files in ``output``: ``metrics.json`` (the printed test metrics), ``per_class.csv``
    (support, accuracy, precision, recall, average precision), ``confusion_matrix.png``,
    ``pr_curves.png``, ``predictions.png`` (a fixed sample of test images with predicted and
    true labels), and the mistakes in view, as fastai's ``plot_top_losses`` and ``most_confused``
    show them: ``top_losses.png`` and ``.csv`` (the test images with the highest loss, with
    prediction, truth, their probabilities and the loss) and ``most_confused.png`` and ``.csv``
    (the most frequent true -> predicted pairs among the mistakes, with examples). To W&B:
    ``wandb.plot.pr_curve``, ``wandb.plot.confusion_matrix``, the PNGs, and the top-loss images
    one by one with their captions (``test/top_losses``).

    Args:
        output: Folder of the report; null means ``<trainer.default_root_dir>/report``.
        samples: Test images shown in ``predictions.png``.
        seed: Chooses those images.
        top_losses: Test images in ``top_losses.png`` (and W&B's ``test/top_losses``).
        confused_pairs: Class pairs in ``most_confused.png``.
        confused_examples: Example images of each pair.
    """

    def __init__(
        self, output: str | None = None, samples: int = 24, seed: int = 0, top_losses: int = 18,
        confused_pairs: int = 8, confused_examples: int = 5,
    ) -> None:
        self.output = output
        self.samples = samples
        self.seed = seed
        self.top_losses = top_losses
        self.confused_pairs = confused_pairs
        self.confused_examples = confused_examples
        self._probs: list[torch.Tensor] = []
        self._labels: list[torch.Tensor] = []

    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._probs, self._labels = [], []

    def on_test_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._probs.append(outputs["logits"].float().softmax(dim=1).cpu())
        self._labels.append(batch[1].cpu())

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero or not self._probs:
            return
        folder = writable_folder(Path(self.output) if self.output else Path(trainer.default_root_dir) / "report",
                                 "report.output")
        probs, labels, names = torch.cat(self._probs), torch.cat(self._labels), pl_module.class_names
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/")}
        report.write_metrics(metrics, folder / "metrics.json")
        rows = report.per_class(probs, labels, names)
        report.write_per_class(rows, folder / "per_class.csv")
        pictures = [folder / "confusion_matrix.png", folder / "pr_curves.png"]
        report.draw_confusion_matrix(probs, labels, names, pictures[0])
        report.draw_pr_curves(probs, labels, names, pictures[1], rows)
        files = getattr(getattr(trainer.datamodule, "test_set", None), "files", None)
        worst: list[int] = []
        if files is not None and len(files) == len(labels):
            chosen = _fixed_sample(len(files), self.samples, self.seed)
            pictures.append(folder / "predictions.png")
            report.draw_prediction_grid([files[i] for i in chosen], probs[chosen], labels[chosen], names, pictures[-1])
            worst = report.top_losses(probs, labels, self.top_losses)
            report.write_top_losses(files, probs, labels, names, worst, folder / "top_losses.csv")
            pictures.append(folder / "top_losses.png")
            report.draw_top_losses(files, probs, labels, names, worst, pictures[-1])
            pairs = report.confused_pairs(probs, labels, self.confused_pairs)
            report.write_confused_pairs(files, labels, names, pairs, folder / "most_confused.csv")
            pictures.append(folder / "most_confused.png")
            report.draw_confused_pairs(files, probs, labels, names, pairs, pictures[-1], self.confused_examples)
        for logger in _wandb_loggers(trainer):
            import wandb

            mistakes = [
                wandb.Image(report.thumbnail(files[i], 256, square=True),
                            caption=report.mistake_caption(probs[i], int(labels[i]), names))
                for i in worst
            ]
            logger.experiment.log(
                {
                    "test/pr_curve": wandb.plot.pr_curve(labels.tolist(), probs.tolist(), labels=list(names)),
                    "test/confusion_matrix": wandb.plot.confusion_matrix(
                        y_true=labels.tolist(), preds=probs.argmax(dim=1).tolist(), class_names=list(names)
                    ),
                    **{f"test/report/{p.stem}": wandb.Image(str(p)) for p in pictures},
                    **({"test/top_losses": mistakes} if mistakes else {}),
                }
            )
        rank_zero_info(f"Wrote the test report to {folder}: {', '.join(p.name for p in sorted(folder.iterdir()))}")


class WandbValidationSamples(Callback):
    """At the end of each validation, log to W&B a fixed sample of validation images with their
    predicted and true labels (the tutorial's prediction-image callback): as a table
    (``val/samples``), and as the images themselves, captioned with prediction, probability and
    truth (``val/sample_images``). An offline run keeps only the second as image files (wandb
    leaves images inside tables out of offline runs, wandb/wandb#4611), so the pictures are
    there after ``wandb sync`` too.

    Args:
        samples: Validation images logged.
        seed: Chooses those images; the same ones in every epoch, so epochs compare.
    """

    def __init__(self, samples: int = 16, seed: int = 0) -> None:
        self.samples = samples
        self.seed = seed
        self._thumbnails: list[Image.Image] = []
        self._cells: list[Any] = []  # the table's wandb.Image of each, made once

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        loggers = _wandb_loggers(trainer)
        images = getattr(trainer.datamodule, "val_set", None)
        if not loggers or images is None or trainer.sanity_checking or not trainer.is_global_zero:
            return
        import wandb

        chosen = _fixed_sample(len(images), self.samples, self.seed)
        if not self._thumbnails:
            self._thumbnails = [report.thumbnail(images.files[i], 128, square=True) for i in chosen]
            self._cells = [wandb.Image(thumb) for thumb in self._thumbnails]
        # The validation loader's own items: cached features when the backbone is cached, else images.
        source = trainer.val_dataloaders.dataset
        inputs = torch.stack([source[i][0] for i in chosen]).to(pl_module.device)
        with torch.no_grad():
            probs = pl_module(inputs).softmax(dim=1).cpu()
        names = pl_module.class_names
        rows = [
            [names[int(p.argmax())], names[images.labels[i]], float(p.max()), trainer.current_epoch]
            for i, p in zip(chosen, probs)
        ]
        captions = [f"{pred} ({probability:.0%}), truth: {truth}" for pred, truth, probability, _ in rows]
        for logger in loggers:
            logger.log_table("val/samples", columns=["image", "prediction", "truth", "probability", "epoch"],
                             data=[[cell, *row] for cell, row in zip(self._cells, rows)])
            logger.log_image("val/sample_images", list(self._thumbnails), caption=captions)


class WandbSaveConfig(SaveConfigCallback):
    """LightningCLI's config.yaml, and the whole resolved config as the W&B run's config."""

    def save_config(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        loggers = _wandb_loggers(trainer)
        if loggers:
            config = yaml.safe_load(self.parser.dump(self.config, skip_none=False))
            for logger in loggers:
                logger.experiment.config.update(config, allow_val_change=True)


def read_history(path: Path) -> list[dict[str, float]]:
    """The rows of a ``history.csv``, epochs as ints; one clear error when it is damaged."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(f)]
        return [{**row, "epoch": int(row["epoch"])} for row in rows]
    except (ValueError, TypeError, KeyError, csv.Error, UnicodeDecodeError) as error:
        detail = f"no {error} column" if isinstance(error, KeyError) else str(error).splitlines()[0][:120]
        raise CaltechError(
            f"{path} is damaged ({detail}): it is not the metrics table `caltech fit` writes. "
            "Fix: delete it (the next `caltech fit` there writes it again), or leave that run out."
        ) from error


class EpochHistory(Callback):
    """Keep ``<trainer.default_root_dir>/history.csv``: one row of train and val metrics per
    epoch of the latest fit, rewritten as each epoch ends (``caltech compare`` reads it). A
    resumed fit keeps the rows of the epochs before its checkpoint.

    Each row also says how fast the epoch trained (``train/seconds``, ``train/images_per_s``:
    its training batches, loading included, validation not), the figure to compare with a
    plain PyTorch loop (``benchmarks/finetune.py``).

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

    def _start_clock(self) -> None:
        self._epoch_start = self._last_batch_end = time.perf_counter()
        self._images = 0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """After a checkpoint is restored, when ``current_epoch`` is the epoch to resume at (a
        resume within an epoch starts no new epoch, so the clock starts here too)."""
        self._rows, self._ended = [], None
        self._start_clock()
        path = Path(trainer.default_root_dir) / HISTORY
        if trainer.ckpt_path and path.is_file():
            try:
                self._rows = [row for row in read_history(path) if row["epoch"] < trainer.current_epoch]
            except CaltechError as error:
                rank_zero_warn(f"{str(error).split(' Fix:')[0]} It starts again from this epoch.")

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
        self._rows.append({**metrics, **ended})
        columns = ["epoch", *sorted({k for row in self._rows for k in row} - {"epoch"})]
        path = Path(trainer.default_root_dir) / HISTORY
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(self._rows)
