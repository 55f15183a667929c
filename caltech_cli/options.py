"""Option values that cannot work, refused before anything runs: a count below what divides, a
number that is not finite, a device that is not there. Lightning would divide by zero, or refuse
with a traceback, some only after an epoch has trained."""

from __future__ import annotations

import importlib
import math

import torch
from jsonargparse import Namespace

from caltech_cli.errors import CaltechError

# Scheduler options that count steps or epochs: 0 divides by zero once the first epoch has trained.
SCHEDULER_COUNTS = ("T_max", "T_0", "step_size", "total_steps", "steps_per_epoch")


# Trainer and checkpoint counts and the least value that works: below it Lightning divides by zero
# or refuses with a traceback, some only after an epoch has trained.
TRAINER_COUNTS = {
    "trainer.max_epochs": -1,
    "trainer.max_steps": -1,
    "trainer.check_val_every_n_epoch": 1,
    "trainer.accumulate_grad_batches": 1,
    "trainer.num_nodes": 1,
    "trainer.devices": -1,
    "trainer.log_every_n_steps": 1,
    "checkpoint.save_top_k": -1,
    "checkpoint.every_n_epochs": 0,
    "checkpoint.every_n_train_steps": 0,
}
# Precisions that convert the network's weights to another type, while the images, a frozen
# backbone's features and a trunk's output come as float32 (or bfloat16 under autocast).
WEIGHT_PRECISIONS = {"64", "64-true", "16-true", "bf16-true", "transformer-engine", "transformer-engine-float16"}
# What the model logs, and a checkpoint may monitor.
LOGGED = ("val/acc", "val/acc_macro", "val/loss", "train/acc", "train/loss")


def _check_numbers(config: Namespace) -> None:
    """Refuse optimizer and scheduler numbers that cannot work, before anything trains: a value
    that is not finite, a negative learning rate, a step count below 1."""
    for section in ("optimizer", "lr_scheduler"):
        init_args = config.get(f"{section}.init_args")
        for key, value in (vars(init_args) if isinstance(init_args, Namespace) else {}).items():
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if number and not math.isfinite(value):
                raise CaltechError(f"{section}.{key} {value} is not a number. Fix: pass a finite --{section}.{key}.")
            if number and section == "lr_scheduler" and key in SCHEDULER_COUNTS and value < 1:
                raise CaltechError(
                    f"lr_scheduler.{key} {value} cannot work: it must be 1 or more. "
                    f"Fix: pass --lr_scheduler.{key} 1 or more."
                )
    lr = config.get("optimizer.init_args.lr")
    if isinstance(lr, (int, float)) and lr < 0:
        raise CaltechError(f"optimizer.lr {lr} is negative. Fix: pass a positive --optimizer.lr, like 0.001.")
    for option, least in TRAINER_COUNTS.items():
        value = config.get(option)
        if isinstance(value, int) and not isinstance(value, bool) and value < least:
            raise CaltechError(
                f"{option} {value} cannot work: it must be {least} or more. Fix: pass --{option} {least}."
            )
    interval = config.get("trainer.val_check_interval")
    if isinstance(interval, (int, float)) and not isinstance(interval, bool) and not interval > 0:
        raise CaltechError(
            f"trainer.val_check_interval {interval} cannot work: it must be above 0. "
            "Fix: pass --trainer.val_check_interval 1.0 (once an epoch)."
        )
    monitor = config.get("checkpoint.monitor")
    if monitor is not None and monitor not in LOGGED:
        raise CaltechError(
            f"checkpoint.monitor {monitor} is not a figure the model logs. Fix: pass --checkpoint.monitor one of "
            f"{', '.join(LOGGED)}."
        )


def precision_plugins(config: Namespace) -> list[type]:
    """The precision plugins that ``trainer.plugins`` names (Lightning's ``Precision`` classes)."""
    from pytorch_lightning.plugins.precision import Precision

    plugins = config.get("trainer.plugins")
    found = []
    for plugin in plugins if isinstance(plugins, list) else [plugins]:
        path = plugin.get("class_path") if isinstance(plugin, Namespace) else None
        if isinstance(path, str) and "." in path:
            module, _, name = path.rpartition(".")
            kind = getattr(importlib.import_module(module), name, None)
        else:
            kind = type(plugin)
        if isinstance(kind, type) and issubclass(kind, Precision):
            found.append(kind)
    return found


def _check_precision(config: Namespace) -> None:
    """Autocast or float32: a precision that converts the weights leaves the inputs (images, cached
    features) in float32, which the weights then do not take; and Lightning takes a precision
    either from ``trainer.precision`` or from a plugin, not both."""
    from pytorch_lightning.plugins.precision import (
        BitsandbytesPrecision,
        DoublePrecision,
        HalfPrecision,
        TransformerEnginePrecision,
    )

    fix = "Fix: pass --trainer.precision bf16-mixed (bfloat16 autocast), 16-mixed on a GPU, or 32-true"
    precision = config.get("trainer.precision")
    if str(precision) in WEIGHT_PRECISIONS:
        raise CaltechError(
            f"trainer.precision {precision} converts the network's weights, but its inputs (images, cached features) "
            f"stay float32. {fix}."
        )
    converting = (HalfPrecision, DoublePrecision, BitsandbytesPrecision, TransformerEnginePrecision)
    for plugin in precision_plugins(config):
        if issubclass(plugin, converting):
            raise CaltechError(
                f"trainer.plugins {plugin.__name__} converts the network's weights, but its inputs (images, cached "
                f"features) stay float32. {fix}, without the plugin."
            )
        if precision is not None:
            raise CaltechError(
                f"trainer.plugins {plugin.__name__} sets the precision, and so does trainer.precision {precision}: "
                "Lightning takes one. Fix: drop --trainer.precision, or the plugin."
            )


def refuse_what_cannot_work(subcommand: str, config: Namespace) -> None:
    """Refuse the first option of ``subcommand``'s ``config`` that cannot work, in one line."""
    if subcommand == "predict" and config.get("data.init_args.predict_dir") is None:
        raise CaltechError("predict needs images. Fix: pass --data.predict_dir <folder or image>.")
    _check_numbers(config)
    accelerator = config.get("trainer.accelerator")
    mps = accelerator == "gpu" and torch.backends.mps.is_available()  # Lightning's "gpu" on a Mac
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available() and not mps:
        raise CaltechError(
            f"trainer.accelerator {config.trainer.accelerator}: this machine has no GPU that PyTorch can use "
            f"(torch {torch.__version__}). Fix: pass --trainer.accelerator cpu, or auto to take a GPU where "
            "there is one."
        )
    _check_precision(config)
    if config.get("trainer.devices") in (0, "0"):
        raise CaltechError("trainer.devices 0 runs on nothing. Fix: pass --trainer.devices 1 (or auto).")
    if subcommand == "fit" and config.get("trainer.limit_train_batches") in (0, 0.0):
        raise CaltechError(
            "trainer.limit_train_batches 0 trains nothing, and fit would end without a checkpoint. "
            "Fix: pass --trainer.limit_train_batches 1.0 (every batch), or a share or count above 0."
        )
