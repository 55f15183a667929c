"""The ``caltech`` command: LightningCLI with this project's links and defaults, nothing more."""

from __future__ import annotations

import logging
import sys
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from pytorch_lightning import Trainer
from pytorch_lightning.accelerators import CUDAAccelerator
from pytorch_lightning.cli import ArgsType, LightningArgumentParser, LightningCLI, LRSchedulerTypeTuple
from torch.optim import Optimizer

from caltech_cli import compare, export
from caltech_cli.backbones import load_safely, preprocessing_for
from caltech_cli.callbacks import (
    BestAndLastCheckpoint,
    EpochHistory,
    PredictionWriter,
    TestReport,
    WandbSaveConfig,
    WandbValidationSamples,
)
from caltech_cli.data import ImageClassificationDataModule
from caltech_cli.errors import CaltechError
from caltech_cli.model import TransferClassifier


def _preprocessing_fields(backbone: str, weights: str | None, image_size: int | None) -> dict:
    """The weights' preprocessing as plain fields, the form jsonargparse keeps dataclasses in."""
    return asdict(preprocessing_for(backbone, weights, image_size))


class CaltechCLI(LightningCLI):
    """Links the data's classes into the model and the weights' preprocessing into the data."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_optimizer_args((Optimizer,))
        parser.add_lr_scheduler_args(LRSchedulerTypeTuple)
        parser.add_lightning_class_args(BestAndLastCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.monitor": "val/acc",
                "checkpoint.mode": "max",
                "checkpoint.save_last": True,
                # Ctrl-C or SIGTERM during fit saves where it stopped; `fit --ckpt_path last.ckpt` resumes.
                "checkpoint.save_on_exception": True,
                "checkpoint.filename": "best-epoch{epoch:02d}-val_acc{val/acc:.4f}",
                "checkpoint.auto_insert_metric_name": False,
                "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 2e-4}},
                "data": {"class_path": "caltech_cli.data.Caltech101DataModule"},
            }
        )
        parser.add_lightning_class_args(PredictionWriter, "predictions")
        parser.add_lightning_class_args(TestReport, "report")
        parser.add_lightning_class_args(WandbValidationSamples, "wandb_samples")
        parser.add_lightning_class_args(EpochHistory, "history")
        parser.link_arguments(
            ("model.backbone", "model.weights", "model.image_size"),
            "data.init_args.preprocessing",
            compute_fn=_preprocessing_fields,
            apply_on="parse",
        )
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
        parser.link_arguments("data.class_names", "model.class_names", apply_on="instantiate")

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """The trainer; on a CUDA device float32 matrix products may use TensorFloat-32, which
        Hopper and Ampere tensor cores run many times faster at the precision training needs."""
        trainer = super().instantiate_trainer(**kwargs)
        if isinstance(trainer.accelerator, CUDAAccelerator):
            torch.set_float32_matmul_precision("high")
        return trainer

    def parse_arguments(self, parser: LightningArgumentParser, args: ArgsType) -> None:
        """Parse, then refuse a checkpoint that would run code before LightningCLI reads it."""
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt_path:
            load_safely(Path(ckpt_path), "checkpoint")


def _show_our_messages() -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    package = logging.getLogger("caltech_cli")
    package.addHandler(handler)
    package.setLevel(logging.INFO)
    logging.getLogger("pytorch_lightning.utilities.rank_zero").addFilter(_no_product_tips)


def _no_product_tips(record: logging.LogRecord) -> bool:
    """Drop Lightning's tips that advertise other products (litlogger, litmodels): they say
    nothing about this run."""
    return not str(record.msg).startswith("💡 Tip")


# Warnings that say what this tool does on purpose: the frozen backbone stays in eval mode; the
# CLI's --optimizer replaces the model's own configure_optimizers; loaders of cached features
# read from memory and need no workers (image loaders get one per core unless told otherwise); the
# model summary's size estimate in mixed precision is a side remark, not a problem of the run.
EXPECTED_WARNINGS = (
    r"Found \d+ module\(s\) in eval mode",
    r".*configure_optimizers` will be overridden",
    r".*isinstance\(treespec, LeafSpec\)` is deprecated",
    r"The '\w+_dataloader' does not have many workers",
    r"Precision .* is not supported by the model summary",
)


DESCRIPTION = (
    "Transfer learning on images: fit, validate, test and predict with a torchvision backbone. "
    "Two more commands: `caltech compare RUN_DIR...` (curves and test metrics side by side) and "
    "`caltech export --ckpt_path CKPT --format onnx|torchscript`; each takes --help."
)


def make_cli(args: ArgsType = None, run: bool = True) -> CaltechCLI:
    """Build (and with ``run``, run) the CLI; without ``run`` the arguments take no subcommand."""
    return CaltechCLI(
        TransferClassifier,
        ImageClassificationDataModule,
        subclass_mode_data=True,
        save_config_callback=WandbSaveConfig,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"description": DESCRIPTION},
        args=args,
        run=run,
    )


# Commands that are not Trainer methods, with their own small parsers.
OTHER_COMMANDS = {"compare": compare.main, "export": export.main}


def main(args: list[str] | None = None) -> None:
    """Run ``caltech``; a problem the user can fix ends in one line and exit status 2."""
    _show_our_messages()
    for message in EXPECTED_WARNINGS:
        warnings.filterwarnings("ignore", message=message)
    argv = sys.argv[1:] if args is None else args
    try:
        if argv and argv[0] in OTHER_COMMANDS:
            OTHER_COMMANDS[argv[0]](list(argv[1:]))
        else:
            make_cli(args)
    except CaltechError as error:
        # Raised in a DataLoader worker, it arrives wrapped in the worker's traceback: keep the message.
        message = str(error).rsplit(f"{CaltechError.__name__}: ", 1)[-1].strip()
        print(f"caltech: error: {message}", file=sys.stderr)
        raise SystemExit(2) from None
