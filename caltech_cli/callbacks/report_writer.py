"""The test report callback: collects ``test``'s probabilities and has the report written."""

from __future__ import annotations

import os
import platform
from collections.abc import Sequence
from datetime import datetime, timezone
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.utilities import rank_zero_info

from caltech_cli.callbacks.wandb_runs import wandb_loggers
from caltech_cli.errors import CaltechError
from caltech_cli.files import no_link_below, writable_folder
from caltech_cli.folders import files_key
from caltech_cli.metrics import LEFT_OUT
from caltech_cli.report import write_test_report
from caltech_cli.report.pictures import mistake_caption, thumbnail
from caltech_cli.report.stats import class_counts
from caltech_cli.report.tables import OPTION, TEST_IMAGES_KEY

# The packages whose versions a report names.
VERSIONED = ("caltech-cli", "torch", "torchvision", "pytorch-lightning", "torchmetrics")


def provenance(
    trainer: pl.Trainer, model: pl.LightningModule, scored: int, files: Sequence[Path] | None
) -> dict[str, str]:
    """Where a test's numbers come from: the data and its split, the test images ``scored`` (all of
    them, or fewer: ``trainer.limit_test_batches``, images left out as unreadable) and a key of
    exactly those ``files`` (their paths under the data folder and sizes: ``caltech compare`` sets
    two runs' numbers against each other only where it is the same), the network, the versions
    and the machine, as the report's first table shows them."""
    data = trainer.datamodule
    hparams = model.hparams
    splits = getattr(data, "splits", {})
    sizes = {name: len(part) for name, part in splits.items()}
    train = sorted(class_counts(splits["train"].labels, len(model.class_names or []))) if "train" in splits else []
    return {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "checkpoint": str(trainer.ckpt_path or "(the model in memory)"),
        "data": str(getattr(data, "root", "")),
        "classes": str(len(model.class_names or [])),
        "images": ", ".join(f"{count} {name}" for name, count in sizes.items()),
        "train images per class": f"{train[0]} to {train[-1]}, median {train[len(train) // 2]}" if train else "",
        "test images scored": f"{scored} of {sizes.get('test', scored)}",
        TEST_IMAGES_KEY: files_key(Path(data.root), files) if files is not None and hasattr(data, "root") else "",
        "split fingerprint": str(getattr(data, "fingerprint", "") or ""),
        "split seed, global seed": f"{getattr(data, 'seed', '')}, {os.environ.get('PL_GLOBAL_SEED', 'not set')}",
        "test-time augmentation": "image and mirror image" if getattr(data, "tta_flip", False) else "none",
        "backbone, weights": f"{hparams.get('backbone')}, {hparams.get('weights')}",
        "preprocessing": str(getattr(model, "preprocessing", "")),
        "device, precision": f"{trainer.strategy.root_device}, {trainer.precision}",
        "versions": ", ".join(f"{name} {version(name)}" for name in VERSIONED)
        + f", Python {platform.python_version()}",
    }


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
        self,
        output: str | None = None,
        samples: int = 24,
        seed: int = 0,
        top_losses: int = 18,
        confused_pairs: int = 8,
        confused_examples: int = 5,
    ) -> None:
        for option, value, most in (
            ("samples", samples, 256),
            ("top_losses", top_losses, 256),
            ("confused_pairs", confused_pairs, 64),
            ("confused_examples", confused_examples, 32),
        ):
            if not 0 <= value <= most:
                raise CaltechError(
                    f"report.{option} {value} cannot work: the report shows 0 to {most} of them. "
                    f"Fix: pass --report.{option} in that range."
                )
        self.output = output
        self.samples = samples
        self.seed = seed
        self.top_losses = top_losses
        self.confused_pairs = confused_pairs
        self.confused_examples = confused_examples
        self._probs: list[torch.Tensor] = []
        self._labels: list[torch.Tensor] = []

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Refuse a report folder that cannot be written before any image is scored."""
        self.folder(trainer)

    def folder(self, trainer: pl.Trainer) -> Path:
        folder = Path(self.output) if self.output else Path(trainer.default_root_dir) / "report"
        no_link_below(Path(trainer.default_root_dir), folder, OPTION)
        return writable_folder(folder, OPTION)

    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._probs, self._labels = [], []

    def on_test_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._probs.append(outputs["logits"].float().softmax(dim=1).cpu())
        self._labels.append(batch[1].cpu())

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero or not self._probs:
            return
        folder = self.folder(trainer)
        probs, labels, names = torch.cat(self._probs), torch.cat(self._labels), pl_module.class_names
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/")}
        files = getattr(getattr(trainer.datamodule, "test_set", None), "files", None)
        # Images left out because they could not be read (data.skip_bad_images) are in no number.
        counted = labels != LEFT_OUT
        if files is not None and len(files) > len(labels):  # trainer.limit_test_batches: the first, in order
            files = list(files[: len(labels)])
        if files is not None and len(files) == len(labels):
            files = [file for file, kept in zip(files, counted.tolist()) if kept]
        probs, labels = probs[counted], labels[counted]
        if not len(labels):
            return
        written = write_test_report(
            folder,
            probs,
            labels,
            names,
            metrics,
            files,
            self.samples,
            self.seed,
            self.top_losses,
            self.confused_pairs,
            self.confused_examples,
            provenance(
                trainer, pl_module, len(labels), files if files is not None and len(files) == len(labels) else None
            ),
        )
        for logger in wandb_loggers(trainer):
            import wandb

            mistakes = [
                wandb.Image(
                    thumbnail(files[i], 256, square=True), caption=mistake_caption(probs[i], int(labels[i]), names)
                )
                for i in written.worst
            ]
            logger.experiment.log(
                {
                    "test/pr_curve": wandb.plot.pr_curve(labels.tolist(), probs.tolist(), labels=list(names)),
                    "test/confusion_matrix": wandb.plot.confusion_matrix(
                        y_true=labels.tolist(), preds=probs.argmax(dim=1).tolist(), class_names=list(names)
                    ),
                    **{f"test/report/{p.stem}": wandb.Image(str(p)) for p in written.pictures},
                    **({"test/top_losses": mistakes} if mistakes else {}),
                    "test/report": wandb.Html((folder / "index.html").read_text(encoding="utf-8"), inject=False),
                }
            )
        rank_zero_info(f"Wrote the test report to {folder}: {', '.join(p.name for p in sorted(folder.iterdir()))}")
