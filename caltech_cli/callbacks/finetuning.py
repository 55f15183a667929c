"""Fine-tuning: the head learns on the frozen backbone first, then the backbone joins at lower rates.

The schedule of Lightning's ``BackboneFinetuning``, fastai's ``fine_tune`` and ULMFiT's gradual
unfreezing, on top of Lightning's ``BaseFinetuning`` (which saves the optimizer's parameter
groups in the checkpoint and puts them back on ``fit --ckpt_path``):

- Before ``unfreeze_at_epoch`` only the head learns; the backbone is frozen and in eval mode,
  exactly the feature extractor of ``configs/transfer.yaml``, so the new head is trained before
  any gradient reaches the pretrained weights (a random head would otherwise damage them).
- From then on the backbone's blocks join the optimizer, each as its own parameter group: the
  last block at ``backbone_lr_ratio`` times the head's rate, each earlier one at ``layer_decay``
  times the rate of the block after it (discriminative rates: early layers hold generic features
  that need the least change). With ``blocks_per_epoch`` they join that many per epoch, from the
  last block backwards (gradual unfreezing); otherwise all at once.
- A joining group takes the head group's settings and its rates times its ratio (``lr``,
  ``initial_lr``, a scheduler's ``max_lr``...), and the LR scheduler is told of it, so it follows the same
  schedule at its own scale instead of keeping a fixed rate.

BatchNorm, chosen on purpose: while a block is frozen its BatchNorm layers are in eval mode (the
ImageNet statistics, as the head saw them). After unfreezing, by default (``train_bn: false``)
they stay in eval mode: their running statistics stay ImageNet's while their scale and shift
learn with the rest of the block. The features the head learned on keep their distribution
when the backbone joins, training and evaluation normalise the same way, and small CPU batches
(16-64 images) give no noisy batch statistics. ``train_bn: true`` lets them normalise with batch
statistics and update their running averages, better with large batches and with images far
from ImageNet's.
"""

from __future__ import annotations

import logging
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import BaseFinetuning
from pytorch_lightning.strategies import DDPStrategy
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Optimizer

from caltech_cli.blocks import backbone_blocks
from caltech_cli.errors import CaltechError

log = logging.getLogger(__name__)

# Per-parameter-group lists that LR schedulers keep: scaled by a new group's ratio, or copied.
SCALED_SCHEDULER_LISTS = ("base_lrs", "min_lrs", "max_lrs", "_last_lr")
COPIED_SCHEDULER_LISTS = ("lr_lambdas",)


class BackboneUnfreeze(BaseFinetuning):
    """Train the head on the frozen backbone, then unfreeze the backbone at lower learning rates.

    Use it with ``model.freeze_backbone: false`` (the callback does the freezing);
    ``configs/finetune.yaml`` sets both.

    Args:
        unfreeze_at_epoch: The first epoch (counted from 0) in which the backbone trains.
        backbone_lr_ratio: The last backbone block's learning rate as a fraction of the head's.
        layer_decay: Each earlier block's rate as a fraction of the next block's; 1 gives the
            whole backbone the same rate, 0.8 gives MobileNetV2's stem 0.8**18 (1.8%) of it.
        blocks_per_epoch: Unfreeze this many blocks per epoch, from the last backwards; null
            unfreezes the whole backbone at ``unfreeze_at_epoch``.
        train_bn: After unfreezing, let BatchNorm layers use batch statistics and update their
            running averages; false keeps the pretrained statistics (see the module's notes).
        train_blocks: Train only this many of the backbone's last blocks (partial fine-tuning);
            the blocks below them stay frozen for the whole fit, and with ``data.cache_features``
            their output is computed once per image (and view) and kept, so an epoch costs only the
            top blocks. Null trains every block.
    """

    def __init__(
        self,
        unfreeze_at_epoch: int = 1,
        backbone_lr_ratio: float = 0.1,
        layer_decay: float = 1.0,
        blocks_per_epoch: int | None = None,
        train_bn: bool = False,
        train_blocks: int | None = None,
    ) -> None:
        super().__init__()
        checks = (
            ("unfreeze_at_epoch", unfreeze_at_epoch, unfreeze_at_epoch >= 0, "0 or more"),
            ("backbone_lr_ratio", backbone_lr_ratio, backbone_lr_ratio > 0, "above 0, like 0.1"),
            ("layer_decay", layer_decay, 0 < layer_decay <= 1, "in (0, 1], like 0.85"),
            (
                "blocks_per_epoch",
                blocks_per_epoch,
                blocks_per_epoch is None or blocks_per_epoch >= 1,
                "1 or more, or null for all at once",
            ),
            (
                "train_blocks",
                train_blocks,
                train_blocks is None or train_blocks >= 1,
                "1 or more, or null for every block",
            ),
        )
        for option, value, ok, must_be in checks:
            if not ok:
                raise CaltechError(
                    f"BackboneUnfreeze's {option} {value} cannot work: it must be {must_be}. Fix: pass "
                    f"--trainer.callbacks.{option} with such a value (or init_args.{option} in the config)."
                )
        self.unfreeze_at_epoch = unfreeze_at_epoch
        self.backbone_lr_ratio = backbone_lr_ratio
        self.layer_decay = layer_decay
        self.blocks_per_epoch = blocks_per_epoch
        self.train_bn = train_bn
        self.train_blocks = train_blocks
        self.blocks: list[list[nn.Parameter]] = []  # the blocks that train, input side first

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and pl_module.hparams.get("freeze_backbone", False):
            raise CaltechError(
                "the fine-tuning callback unfreezes the backbone, but model.freeze_backbone is true, which keeps it "
                "frozen (and caches its features). Fix: pass --model.freeze_backbone false."
            )
        super().setup(trainer, pl_module, stage)
        # No inference engine runs a backbone that will train in this fit (model.joins_training);
        # validate, test and predict of its checkpoint may run it on one.
        pl_module.joins_training = stage == "fit"

    def freeze_before_training(self, pl_module: pl.LightningModule) -> None:
        blocks = backbone_blocks(pl_module.backbone)
        trained = len(blocks) if self.train_blocks is None else self.train_blocks
        if trained > len(blocks):
            raise CaltechError(
                f"BackboneUnfreeze's train_blocks {trained} asks for more blocks than the backbone's {len(blocks)}. "
                f"Fix: pass --trainer.callbacks.train_blocks {len(blocks)} or less (or null: all of them)."
            )
        self.blocks = blocks[len(blocks) - trained :]
        pl_module.frozen_blocks = len(blocks) - trained  # the trunk, frozen throughout the fit
        pl_module.backbone.requires_grad_(False)
        pl_module.train_bn = self.train_bn
        pl_module.train(pl_module.training)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Take the frozen backbone out of the optimizer (the CLI gives it every parameter), so it
        can come back in its own groups; a resumed run gets its saved groups back instead."""
        if not self._restarting:
            backbone = {id(p) for p in pl_module.backbone.parameters()}
            for optimizer in trainer.optimizers:
                for group in optimizer.param_groups:
                    group["params"] = [p for p in group["params"] if id(p) not in backbone]
        super().on_fit_start(trainer, pl_module)

    def unfrozen_blocks(self, epoch: int) -> int:
        """How many blocks (counted from the last) train in ``epoch``."""
        if epoch < self.unfreeze_at_epoch:
            return 0
        if self.blocks_per_epoch is None:
            return len(self.blocks)
        return min(len(self.blocks), self.blocks_per_epoch * (epoch - self.unfreeze_at_epoch + 1))

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        due = self.unfrozen_blocks(trainer.current_epoch)
        training = self.blocks[len(self.blocks) - due :]
        unfrozen = False
        for index, optimizer in enumerate(trainer.optimizers):
            before = len(optimizer.param_groups)
            in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
            added = []
            for depth, block in enumerate(reversed(training)):
                unfrozen |= not all(param.requires_grad for param in block)
                for param in block:
                    param.requires_grad_(True)
                if id(block[0]) not in in_optimizer:
                    ratio = self.backbone_lr_ratio * self.layer_decay**depth
                    add_param_group(trainer, optimizer, block, ratio)
                    added.append(ratio)
            self._store(pl_module, index, before, optimizer.param_groups)
            if added and trainer.is_global_zero:
                count = sum(p.numel() for block in training for p in block)
                log.info(
                    "Epoch %d: %d of %d backbone blocks train (%s parameters), at %.3g-%.3g x the head's rate",
                    trainer.current_epoch,
                    due,
                    len(self.blocks),
                    f"{count:,}",
                    min(added),
                    max(added),
                )
        pl_module.train(pl_module.training)
        if unfrozen:
            _rewrap_ddp(trainer)


def _rewrap_ddp(trainer: pl.Trainer) -> None:
    """Wrap the model in DistributedDataParallel again after unfreezing: DDP averages the
    gradients of only the parameters that needed them when it wrapped the model, so without this
    each process would train its own copy of the unfrozen blocks (Lightning's own
    ``BackboneFinetuning`` has this bug: Lightning-AI/pytorch-lightning#20340). Every process
    unfreezes in the same epoch, so they all wrap again together."""
    strategy = trainer.strategy
    if isinstance(strategy, DDPStrategy) and isinstance(strategy.model, DistributedDataParallel):
        strategy.model = strategy.model.module
        strategy.configure_ddp()


def add_param_group(trainer: pl.Trainer, optimizer: Optimizer, params: list[nn.Parameter], ratio: float) -> None:
    """Add ``params`` to ``optimizer`` with the first group's settings (momentum, weight decay, a
    scheduler's own keys) and ``ratio`` times its rates, and extend the optimizer's LR schedulers
    to the new group so they schedule it at that scale."""
    group: dict[str, Any] = {
        key: value * ratio if key.endswith("lr") and isinstance(value, float) else value
        for key, value in optimizer.param_groups[0].items()
    }
    optimizer.add_param_group({**group, "params": params})
    schedulers = [config.scheduler for config in trainer.lr_scheduler_configs]
    while schedulers:
        scheduler = schedulers.pop()
        schedulers.extend(getattr(scheduler, "_schedulers", []))  # SequentialLR, ChainedScheduler
        if getattr(scheduler, "optimizer", None) is not optimizer:
            continue
        for name in SCALED_SCHEDULER_LISTS + COPIED_SCHEDULER_LISTS:
            values = getattr(scheduler, name, None)
            if isinstance(values, list) and values:
                values.append(values[0] * ratio if name in SCALED_SCHEDULER_LISTS else values[0])
