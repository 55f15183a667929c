"""LightningCLI's config callback, which also gives a W&B run the whole resolved config."""

from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl
import yaml
from pytorch_lightning.cli import SaveConfigCallback

from caltech_cli.callbacks.wandb_runs import wandb_loggers
from caltech_cli.files import check_target


class WandbSaveConfig(SaveConfigCallback):
    """LightningCLI's config.yaml, and the whole resolved config as the W&B run's config."""

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Save config.yaml, never through a link or into a FIFO that is in its place."""
        if self.save_to_log_dir and not self.already_saved:
            check_target(Path(trainer.log_dir) / self.config_filename, "trainer.default_root_dir")
        super().setup(trainer, pl_module, stage)

    def save_config(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        loggers = wandb_loggers(trainer)
        if loggers:
            config = yaml.safe_load(self.parser.dump(self.config, skip_none=False))
            for logger in loggers:
                logger.experiment.config.update(config, allow_val_change=True)
