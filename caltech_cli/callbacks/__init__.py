"""Callbacks: everything a run writes or tells besides training itself, one callback a module, and
the fine-tuning schedule. Their class paths ``caltech_cli.callbacks.<Name>`` stay as they were."""

from caltech_cli.callbacks.checkpoint import BestAndLastCheckpoint
from caltech_cli.callbacks.finetuning import BackboneUnfreeze
from caltech_cli.callbacks.history import EpochHistory
from caltech_cli.callbacks.prediction_writer import PredictionWriter
from caltech_cli.callbacks.report_writer import TestReport
from caltech_cli.callbacks.wandb_config import WandbSaveConfig
from caltech_cli.callbacks.wandb_samples import WandbValidationSamples

__all__ = [
    "BackboneUnfreeze",
    "BestAndLastCheckpoint",
    "EpochHistory",
    "PredictionWriter",
    "TestReport",
    "WandbSaveConfig",
    "WandbValidationSamples",
]
