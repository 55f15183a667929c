"""The ``caltech`` command: LightningCLI with this project's links and defaults, nothing more."""

from __future__ import annotations

import logging
import os
import signal
import sys
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from jsonargparse import Namespace, set_parsing_settings
from pytorch_lightning import Trainer
from pytorch_lightning.accelerators import CUDAAccelerator
from pytorch_lightning.cli import ArgsType, LightningArgumentParser, LightningCLI, LRSchedulerTypeTuple
from pytorch_lightning.plugins.io import TorchCheckpointIO
from pytorch_lightning.utilities.exceptions import MisconfigurationException, SIGTERMException
from torch.optim import Optimizer

# The callbacks package is imported whole: jsonargparse resolves a short class name
# (`--trainer.callbacks+=BackboneUnfreeze`) and lists it in `--help` only once its module is loaded.
from caltech_cli import compare, export
from caltech_cli.backbones import preprocessing_for, weights_from_checkpoint
from caltech_cli.callbacks import (
    BestAndLastCheckpoint,
    EpochHistory,
    PredictionWriter,
    TestReport,
    WandbSaveConfig,
    WandbValidationSamples,
)
from caltech_cli.checkpoints import WholeCheckpointIO, read_checkpoint
from caltech_cli.data import ImageClassificationDataModule
from caltech_cli.devices import cpu_computes_bf16, runs_on_cpu
from caltech_cli.errors import CaltechError
from caltech_cli.files import writable_folder
from caltech_cli.model import MODEL_OPTIONS, PRECISION_KEY, TRAINING_PRECISIONS, TransferClassifier
from caltech_cli.options import precision_plugins, refuse_what_cannot_work
from caltech_cli.parser import CaltechArgumentParser, check_arguments, use_checked_loader
from caltech_cli.text import EscapeArguments, shown

log = logging.getLogger(__name__)

# Saved model options that decide the network a checkpoint's weights belong to; class names and
# their number come from the data and are checked against the checkpoint when it is loaded.
NETWORK_OPTIONS = ("backbone", "weights", "freeze_backbone", "image_size", "channels_last")


def _yaml(value: Any) -> str:
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def _preprocessing_fields(backbone: str, weights: str | None, image_size: int | None) -> dict:
    """The weights' preprocessing as plain fields, the form jsonargparse keeps dataclasses in."""
    return asdict(preprocessing_for(backbone, weights, image_size))


def data_class_names(data: ImageClassificationDataModule) -> list[str] | None:
    return data.find_classes()


def data_num_classes(data: ImageClassificationDataModule) -> int | None:
    names = data.find_classes()
    return None if names is None else len(names)


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
                "data": {"class_path": "caltech_cli.Caltech101DataModule"},
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
        # The data module finds its classes (fetching the data first where needed) when the model is built.
        parser.link_arguments("data", "model.num_classes", compute_fn=data_num_classes, apply_on="instantiate")
        parser.link_arguments("data", "model.class_names", compute_fn=data_class_names, apply_on="instantiate")

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """The trainer; on a CUDA device float32 matrix products may use TensorFloat-32, which
        Hopper and Ampere tensor cores run many times faster at the precision training needs.
        Checkpoints are written whole (``WholeCheckpointIO``). ``validate``, ``test`` and ``predict``
        run in one process: on several, each process scores its own share of the images, padded
        to equal length, and the report and predictions would hold one share."""
        trainer = super().instantiate_trainer(**kwargs)
        if self.subcommand in ("validate", "test", "predict") and trainer.world_size > 1:
            raise CaltechError(
                f"{self.subcommand} runs on one device ({trainer.world_size} processes would each see a share of the "
                "images, and the numbers and files would not hold them all). Fix: pass --trainer.devices 1 "
                "(and --trainer.num_nodes 1)."
            )
        if isinstance(trainer.accelerator, CUDAAccelerator):
            torch.set_float32_matmul_precision("high")
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # not one the user configured
            trainer.strategy.checkpoint_io = WholeCheckpointIO()
        return trainer

    def parse_arguments(self, parser: LightningArgumentParser, args: ArgsType) -> None:
        """Parse, then refuse what cannot work before anything runs: arguments and configs past the
        limits of what a config may hold (before they are parsed), a checkpoint that is not one of
        ours (or would run code) before LightningCLI reads it, predict without images, numbers that
        cannot train; and say which model options a checkpoint overrides."""
        CaltechArgumentParser.checkpoint_read = None
        if args is None or isinstance(args, list):
            check_arguments(sys.argv[1:] if args is None else [str(arg) for arg in args])
        super().parse_arguments(parser, args)
        self.checkpoint_options: dict[str, Any] | None = None
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        config = self.config[subcommand]
        refuse_what_cannot_work(subcommand, config)
        self.checkpoint_precision: str | None = None
        if config.get("ckpt_path"):
            checkpoint = read_checkpoint(Path(config.ckpt_path), MODEL_OPTIONS)
            self.checkpoint_options = checkpoint["hyper_parameters"]
            self.checkpoint_precision = _trained_in(checkpoint, Path(config.ckpt_path))
            self._say_which_options_win(config.model, self.checkpoint_options)
            # LightningCLI parses the checkpoint's saved options next; until the classes are built
            # (before_instantiate_classes) an error of the parser is the checkpoint's.
            CaltechArgumentParser.checkpoint_read = str(config.ckpt_path)

    @staticmethod
    def _say_which_options_win(given: Namespace, saved: dict[str, Any]) -> None:
        """LightningCLI rebuilds the model from the checkpoint's saved options, whatever --model.*
        says: say so, in one line, when they differ."""
        differ = [(k, saved[k], given.get(k)) for k in NETWORK_OPTIONS if k in saved and saved[k] != given.get(k)]
        if differ:
            used = ", ".join(f"model.{k} {_yaml(mine)} (not {_yaml(theirs)})" for k, mine, theirs in differ)
            log.warning(
                f"Using the checkpoint's {used}: its weights were trained in that network, so the checkpoint's "
                "model options win over --model.* and the config."
            )

    def before_instantiate_classes(self) -> None:
        """Everything of a run goes under trainer.default_root_dir, which must be a folder we can
        write: a logger without a save_dir writes there too (its wandb/ folder, the checkpoints
        and config.yaml). A fit without a precision trains in the one its checkpoint trained in, or
        where the backbone trains on a CPU that computes bfloat16, in bf16 autocast
        (``_training_precision``)."""
        CaltechArgumentParser.checkpoint_read = None
        config = self.config[self.subcommand] if self.subcommand else self.config
        if self.subcommand == "fit":
            _training_precision(config, self.checkpoint_precision)
        root = config.trainer.default_root_dir or os.getcwd()
        writable_folder(Path(root), "trainer.default_root_dir")
        loggers = config.trainer.logger
        for logger in loggers if isinstance(loggers, list) else [loggers]:
            init_args = logger.get("init_args") if isinstance(logger, Namespace) else None
            if isinstance(init_args, Namespace) and "save_dir" in init_args and init_args.save_dir is None:
                init_args.save_dir = str(root)

    def instantiate_classes(self) -> None:
        """With a checkpoint to load, the backbone is built without its weights: they are all in
        the checkpoint (``backbones.weights_from_checkpoint``)."""
        if self.checkpoint_options is None:
            return super().instantiate_classes()
        with weights_from_checkpoint():
            return super().instantiate_classes()

    def after_instantiate_classes(self) -> None:
        """Refuse a checkpoint trained on other classes than the data's now, before any image is read."""
        super().after_instantiate_classes()
        if self.checkpoint_options is not None:
            self.model.check_checkpoint_options(self.checkpoint_options)


def _trained_in(checkpoint: dict[str, Any], path: Path) -> str:
    """The precision a checkpoint's fit trained in: one of ``TRAINING_PRECISIONS``, or 32-true for
    a checkpoint written before caltech recorded it (the default of its day); anything else was
    altered."""
    trained_in = checkpoint.get(PRECISION_KEY, "32-true")
    if not isinstance(trained_in, str) or trained_in not in TRAINING_PRECISIONS:
        raise CaltechError(
            f"{shown(path)} says it trained in precision {shown(trained_in)[:40]}, not one of "
            f"{', '.join(TRAINING_PRECISIONS)}: it was altered or damaged. Fix: pass a .ckpt written by `caltech fit`."
        )
    return trained_in


def _runs_natively(precision: str, accelerator: object) -> bool:
    """Whether the machine computes in ``precision`` itself: a CPU computes float32, and bfloat16
    where it has the instructions; a GPU whatever Lightning lets it take."""
    if not runs_on_cpu(accelerator):
        return True
    return precision == "32-true" or (precision == "bf16-mixed" and cpu_computes_bf16())


def _training_precision(config: Namespace, resumed: str | None) -> None:
    """The precision of a fit where none is given (neither ``trainer.precision`` nor a precision
    plugin): a resumed fit goes on in the precision its checkpoint trained in (``resumed``), so its
    epochs do not change precision half-way, where this machine computes in it. Otherwise a
    backbone that trains on a CPU that computes bfloat16 itself trains in bf16 autocast
    (``bf16-mixed``): there it trains 1.5 times as many images a second as float32 for the same
    accuracy (docs/performance.md, "bfloat16 autocast on a CPU"); elsewhere bfloat16 is emulated,
    slower than float32. A frozen backbone's head trains in seconds either way, and its features
    keep their float32 key."""
    if config.trainer.precision is not None or precision_plugins(config):
        return
    accelerator = config.trainer.accelerator
    trains = not config.model.freeze_backbone and runs_on_cpu(accelerator) and cpu_computes_bf16()
    default = "bf16-mixed" if trains else None
    if resumed is not None:
        if _runs_natively(resumed, accelerator):
            config.trainer.precision = resumed
            log.info(f"Resuming in {resumed}, the precision the checkpoint trained in.")
            return
        config.trainer.precision = default
        log.warning(
            f"The checkpoint trained in {resumed}, which this CPU does not compute itself: the fit goes on in "
            f"{default or '32-true'}."
        )
        return
    if default is not None:
        config.trainer.precision = default
        log.info(
            "Training in bf16-mixed: this CPU computes bfloat16 itself, 1.5x as fast as float32 for the same "
            "accuracy. Pass --trainer.precision 32-true to train in float32."
        )


def _show_our_messages() -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler.addFilter(EscapeArguments())
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
    "Three more commands: `caltech compare RUN_DIR...` (curves and test metrics side by side), "
    "`caltech export --ckpt_path CKPT --format onnx|torchscript` and `caltech serve --ckpt_path CKPT` (a local "
    "HTTP API and page); each takes --help."
)


# What a config or an option may name as a class or a function (a class path, an lr_lambda, a
# LambdaCallback hook): these packages, and those the machine's user adds in CALTECH_TRUSTED_IMPORTS
# (comma-separated). So a config from a stranger can neither import a module of its choosing, which
# runs its top-level code before any type is checked, nor hand an option a function such as
# os._exit, os.umask or builtins.print.
TRUSTED_IMPORTS = (
    "caltech_cli",
    "torch",
    "torchvision",
    "torchmetrics",
    "pytorch_lightning",
    "lightning",
    "lightning_fabric",
    "timm",
    "math",
)


def trust_only_known_imports() -> None:
    """Deny every import path a config names but those of ``TRUSTED_IMPORTS`` (jsonargparse's
    import path policy, enforced before anything is imported)."""
    extra = [name.strip() for name in os.environ.get("CALTECH_TRUSTED_IMPORTS", "").split(",") if name.strip()]
    try:
        set_parsing_settings(import_path_denylist=["*"], import_path_allowlist=[*TRUSTED_IMPORTS, *extra])
    except ValueError as error:
        raise CaltechError(
            f"CALTECH_TRUSTED_IMPORTS={os.environ.get('CALTECH_TRUSTED_IMPORTS', '')!r} cannot be used ({error}). "
            "Fix: set it to module names separated by commas, like my_callbacks,my_package."
        ) from error


def make_cli(args: ArgsType = None, run: bool = True) -> CaltechCLI:
    """Build (and with ``run``, run) the CLI; without ``run`` the arguments take no subcommand."""
    trust_only_known_imports()
    use_checked_loader()
    return CaltechCLI(
        TransferClassifier,
        ImageClassificationDataModule,
        subclass_mode_data=True,
        parser_class=CaltechArgumentParser,
        save_config_callback=WandbSaveConfig,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"description": DESCRIPTION},
        args=args,
        run=run,
    )


# Commands that are not Trainer methods, with their own small parsers.
def _serve(args: list[str]) -> None:
    """``caltech serve``, imported only when asked for: its server libraries cost the other commands' start-up."""
    from caltech_cli.serve.command import main as serve

    serve(args)


OTHER_COMMANDS = {"compare": compare.main, "export": export.main, "serve": _serve}


def _caltech_error_in(error: BaseException | None) -> CaltechError | None:
    """The CaltechError behind ``error``: jsonargparse raises its own error about the data
    option ``from`` what a data module's ``__init__`` raised."""
    while error is not None and not isinstance(error, CaltechError):
        error = error.__cause__
    return error


def _another_process_stopped(error: BaseException) -> bool:
    """Whether ``error`` is what a process of a multi-process run (DDP) gets when another stops:
    the other one has said why (one line, as every process does), so a traceback here only
    hides it."""
    distributed = getattr(torch.distributed, "DistBackendError", ())
    return isinstance(error, distributed) or (
        isinstance(error, RuntimeError) and "Connection closed by peer" in str(error)
    )


def main(args: list[str] | None = None) -> None:
    """Run ``caltech``; a problem the user can fix ends in one line and exit status 2.

    A run stopped by SIGTERM or Ctrl-C exits with 128 + the signal's number (143, 130), as a
    process killed by it would, so schedulers and scripts see that it did not finish; Lightning
    itself exits 0 after SIGTERM and 1 after Ctrl-C.
    """
    _show_our_messages()
    for message in EXPECTED_WARNINGS:
        warnings.filterwarnings("ignore", message=message)
    argv = sys.argv[1:] if args is None else args
    try:
        if argv and argv[0] in OTHER_COMMANDS:
            OTHER_COMMANDS[argv[0]](list(argv[1:]))
        else:
            make_cli(args)
    except MisconfigurationException as error:  # Lightning's refusal of options (an accelerator not there...)
        print(
            f"caltech: error: {shown(' '.join(str(error).split()))} Fix: change that option (`--help` lists them).",
            file=sys.stderr,
        )
        raise SystemExit(2) from None
    except Exception as error:
        caltech_error = _caltech_error_in(error)
        if caltech_error is None and _another_process_stopped(error):
            print(
                "caltech: error: another process of this run stopped, and this one cannot go on without it. "
                "Fix: see that process's error above, and correct what it says.",
                file=sys.stderr,
            )
            raise SystemExit(2) from None
        if caltech_error is None:
            raise
        # Raised in a DataLoader worker, it arrives wrapped in the worker's traceback: keep the message.
        message = str(caltech_error).rsplit(f"{CaltechError.__name__}: ", 1)[-1].strip()
        print(f"caltech: error: {shown(message)}", file=sys.stderr)
        raise SystemExit(2) from None
    except SIGTERMException:
        raise SystemExit(128 + signal.SIGTERM) from None
    except SystemExit as stop:
        if isinstance(stop.__context__, KeyboardInterrupt):  # Lightning's sys.exit(1) after its Ctrl-C handling
            raise SystemExit(128 + signal.SIGINT) from None
        raise
    except KeyboardInterrupt:
        raise SystemExit(128 + signal.SIGINT) from None
