"""The trainer's W&B loggers, which the callbacks send their pictures, tables and config to.

Apart from ``caltech_cli.loggers`` on purpose: importing that module defines a second class named
``WandbLogger``, and jsonargparse would no longer know which one ``--trainer.logger WandbLogger``
means; callbacks load with the command, loggers only when a config names them.
"""

from __future__ import annotations

import pytorch_lightning as pl
from pytorch_lightning.loggers import WandbLogger


def wandb_loggers(trainer: pl.Trainer) -> list[WandbLogger]:
    """The trainer's W&B loggers (ours or Lightning's own)."""
    return [logger for logger in trainer.loggers if isinstance(logger, WandbLogger)]
