"""The W&B validation samples callback: the tutorial's prediction images, after every validation."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
from PIL import Image
from pytorch_lightning.callbacks import Callback

from caltech_cli.callbacks.wandb_runs import wandb_loggers
from caltech_cli.errors import CaltechError
from caltech_cli.report import fixed_sample
from caltech_cli.report.pictures import thumbnail


class WandbValidationSamples(Callback):
    """At the end of each validation, log to W&B a fixed sample of validation images with their
    predicted and true labels (the tutorial's prediction-image callback): as a table
    (``val/samples``), and as the images themselves, captioned with prediction, probability and
    truth (``val/sample_images``). An offline run keeps only the second as image files (wandb
    leaves images inside tables out of offline runs, wandb/wandb#4611), so the pictures are
    there after ``wandb sync`` too.

    Args:
        samples: Validation images logged (0 to 256; 0 logs none).
        seed: Chooses those images; the same ones in every epoch, so epochs compare.
    """

    def __init__(self, samples: int = 16, seed: int = 0) -> None:
        if not 0 <= samples <= 256:
            raise CaltechError(
                f"wandb_samples.samples {samples} cannot work: 0 to 256 images are logged. "
                "Fix: pass --wandb_samples.samples in that range."
            )
        self.samples = samples
        self.seed = seed
        self._chosen: list[int] = []  # the validation images shown, the same in every epoch
        self._thumbnails: list[Image.Image] = []
        self._cells: list[Any] = []  # the table's wandb.Image of each, made once

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        loggers = wandb_loggers(trainer)
        images = getattr(trainer.datamodule, "val_set", None)
        if not loggers or not self.samples or images is None or trainer.sanity_checking or not trainer.is_global_zero:
            return
        import wandb

        if not self._chosen:
            # Among the images the validation could read (data.skip_bad_images leaves the others out).
            readable = [i for i in range(len(images)) if not images.failed[i]]
            self._chosen = [readable[i] for i in fixed_sample(len(readable), self.samples, self.seed)]
            if not self._chosen:
                return
            self._thumbnails = [thumbnail(images.files[i], 128, square=True) for i in self._chosen]
            self._cells = [wandb.Image(thumb) for thumb in self._thumbnails]
        chosen = self._chosen
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
            logger.log_table(
                "val/samples",
                columns=["image", "prediction", "truth", "probability", "epoch"],
                data=[[cell, *row] for cell, row in zip(self._cells, rows)],
            )
            logger.log_image("val/sample_images", list(self._thumbnails), caption=captions)
