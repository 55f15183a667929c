"""LightningCLI's config callback, which also gives a W&B run the whole resolved config."""

from __future__ import annotations

import pytorch_lightning as pl
import yaml
from pytorch_lightning.cli import SaveConfigCallback

from caltech_cli.callbacks.wandb_runs import wandb_loggers


class WandbSaveConfig(SaveConfigCallback):
    """LightningCLI's config.yaml, and the whole resolved config as the W&B run's config."""

    def save_config(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        loggers = wandb_loggers(trainer)
        if loggers:
            config = yaml.safe_load(self.parser.dump(self.config, skip_none=False))
            for logger in loggers:
                logger.experiment.config.update(config, allow_val_change=True)
