"""The fine-tuning callback: the head first, then the backbone's blocks at their own rates."""

from __future__ import annotations

import csv
import inspect
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from pytorch_lightning.callbacks import BaseFinetuning
from torch import nn

from caltech_cli.callbacks.finetuning import BackboneUnfreeze, add_param_group
from caltech_cli.errors import CaltechError
from caltech_cli.model import TransferClassifier

from conftest import FINETUNE, PARTIAL, REPO, printed_metrics, run_caltech, small_run


def trainer_stub(optimizer: torch.optim.Optimizer, epoch: int, *schedulers) -> SimpleNamespace:
    return SimpleNamespace(
        optimizers=[optimizer],
        current_epoch=epoch,
        is_global_zero=True,
        strategy=None,
        lr_scheduler_configs=[SimpleNamespace(scheduler=s) for s in schedulers],
    )


def frozen_model(callback: BackboneUnfreeze) -> tuple[TransferClassifier, torch.optim.Optimizer]:
    model = TransferClassifier(weights=None, freeze_backbone=False, class_names=["a", "b"], image_size=32)
    callback.freeze_before_training(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    callback.on_fit_start(trainer_stub(optimizer, 0), model)
    model.train()
    return model, optimizer


def test_backbone_is_frozen_then_joins_at_discriminative_rates():
    callback = BackboneUnfreeze(unfreeze_at_epoch=2, backbone_lr_ratio=0.1, layer_decay=0.5)
    model, optimizer = frozen_model(callback)
    assert [len(g["params"]) for g in optimizer.param_groups] == [2], "only the head is optimized at first"
    assert not model.backbone.training and not model.backbone_trains

    callback.on_train_epoch_start(trainer_stub(optimizer, 1), model)
    assert len(optimizer.param_groups) == 1

    callback.on_train_epoch_start(trainer_stub(optimizer, 2), model)
    assert len(optimizer.param_groups) == 1 + 19
    rates = [g["lr"] for g in optimizer.param_groups]
    assert rates[1] == pytest.approx(1e-4), "the last block at a tenth of the head's rate"
    assert rates[2] == pytest.approx(0.5e-4) and rates[-1] == pytest.approx(1e-4 * 0.5**18)
    assert all(p.requires_grad for p in model.backbone.parameters())
    assert model.backbone.training
    norms = [m for m in model.backbone.modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms and not any(m.training for m in norms), "BatchNorm keeps ImageNet statistics"


def test_gradual_unfreezing_and_train_bn():
    callback = BackboneUnfreeze(unfreeze_at_epoch=1, blocks_per_epoch=4, train_bn=True)
    model, optimizer = frozen_model(callback)
    callback.on_train_epoch_start(trainer_stub(optimizer, 1), model)
    blocks = callback.blocks
    assert len(optimizer.param_groups) == 1 + 4
    assert all(p.requires_grad for block in blocks[-4:] for p in block)
    assert not any(p.requires_grad for block in blocks[:-4] for p in block)
    assert model.backbone.features[-1].training and not model.backbone.features[0].training, (
        "frozen blocks stay in eval mode"
    )
    callback.on_train_epoch_start(trainer_stub(optimizer, 2), model)
    assert len(optimizer.param_groups) == 1 + 8
    assert isinstance(model.backbone.features[-1][1], nn.BatchNorm2d) and model.backbone.features[-1][1].training


def test_train_blocks_keeps_the_trunk_frozen_throughout():
    """Only the last ``train_blocks`` blocks ever join; the model learns how many stay frozen
    (the trunk whose output the data module caches)."""
    callback = BackboneUnfreeze(unfreeze_at_epoch=1, train_blocks=5, blocks_per_epoch=3)
    model, optimizer = frozen_model(callback)
    assert model.frozen_blocks == 14 and len(callback.blocks) == 5
    callback.on_train_epoch_start(trainer_stub(optimizer, 1), model)
    assert len(optimizer.param_groups) == 1 + 3
    for epoch in (2, 3, 9):
        callback.on_train_epoch_start(trainer_stub(optimizer, epoch), model)
        assert len(optimizer.param_groups) == 1 + 5
    assert all(p.requires_grad for p in model.backbone.features[14:].parameters())
    assert not any(p.requires_grad for p in model.backbone.features[:14].parameters())
    assert not model.backbone.features[13].training and model.backbone.features[14].training


@pytest.mark.parametrize(
    ("train_blocks", "says"), [(0, "must be 1 or more"), (20, "more blocks than the backbone's 19")]
)
def test_train_blocks_that_cannot_work_are_one_line(train_blocks, says):
    with pytest.raises(CaltechError, match=says) as refused:
        frozen_model(BackboneUnfreeze(train_blocks=train_blocks))
    assert "Fix: pass --trainer.callbacks.train_blocks" in str(refused.value)


@pytest.mark.parametrize(
    "make",
    [
        lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10),
        lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=10),
        lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: 0.9**epoch),
    ],
)
def test_joining_group_follows_the_schedule_at_its_scale(make):
    head, late = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.SGD([head], lr=1e-2)
    scheduler = make(optimizer)
    for _ in range(3):
        optimizer.step()
        scheduler.step()
    add_param_group(trainer_stub(optimizer, 3, scheduler), optimizer, [late], 0.25)
    for _ in range(4):
        optimizer.step()
        scheduler.step()
        head_lr, late_lr = (g["lr"] for g in optimizer.param_groups)
        assert late_lr == pytest.approx(0.25 * head_lr)


@pytest.mark.e2e
def test_finetune_refuses_a_frozen_model(image_folder, tmp_path):
    result = run_caltech(
        "fit",
        *small_run(tmp_path, str(image_folder), FINETUNE),
        "--model.freeze_backbone",
        "true",
        "--trainer.logger",
        "false",
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert "Fix: pass --model.freeze_backbone false" in result.stderr.strip().splitlines()[-1]


def finetune(tmp_path: Path, source: str, name: str, *options: str):
    """The fine-tuning config on the generated images, with the backbone joining 8 blocks per
    epoch from epoch 1, a worker process drawing the augmentations, and deterministic kernels."""
    root = tmp_path / name
    result = run_caltech(
        "fit",
        *small_run(root, source, FINETUNE),
        "--trainer.logger",
        "false",
        "--data.num_workers",
        "1",
        "--trainer.callbacks.unfreeze_at_epoch",
        "1",
        "--trainer.callbacks.blocks_per_epoch",
        "8",
        "--trainer.deterministic",
        "true",
        *options,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return root / "runs"


def history(runs: Path) -> list[dict[str, str]]:
    """history.csv's metrics (its timings, train/seconds, train/images_per_s and fit/seconds, differ run to run)."""
    with open(runs / "history.csv", newline="") as f:
        timings = ("train/seconds", "train/images_per_s", "fit/seconds")
        return [{k: v for k, v in row.items() if k not in timings} for row in csv.DictReader(f)]


@pytest.mark.e2e
def test_resumed_fit_ends_where_an_unbroken_one_does(image_folder, tmp_path):
    """Stop after 2 of 4 epochs, resume from last.ckpt: same weights, optimizer and metrics as a
    fit that ran 4 epochs at once, across the unfreezing (parameter groups added before and
    after the stop)."""
    whole = finetune(tmp_path, str(image_folder), "whole", "--trainer.max_epochs", "4")
    broken = finetune(tmp_path, str(image_folder), "broken", "--trainer.max_epochs", "2")
    first_half = torch.load(broken / "checkpoints" / "last.ckpt", weights_only=True)
    assert first_half["epoch"] == 1 and len(first_half["optimizer_states"][0]["param_groups"]) == 1 + 8
    finetune(
        tmp_path,
        str(image_folder),
        "broken",
        "--trainer.max_epochs",
        "4",
        "--ckpt_path",
        str(broken / "checkpoints" / "last.ckpt"),
    )

    a = torch.load(whole / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(broken / "checkpoints" / "last.ckpt", weights_only=True)
    assert a["epoch"] == b["epoch"] == 3, "last.ckpt is written every epoch"
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key in a["state_dict"]:
        assert torch.equal(a["state_dict"][key], b["state_dict"][key]), key
    assert [g["lr"] for g in a["optimizer_states"][0]["param_groups"]] == [
        g["lr"] for g in b["optimizer_states"][0]["param_groups"]
    ]
    assert len(a["optimizer_states"][0]["param_groups"]) == 1 + 19
    assert history(whole) == history(broken)
    assert [row["epoch"] for row in history(broken)] == ["0", "1", "2", "3"]

    # The schedule did what it says: BatchNorm statistics are ImageNet's, the convolutions moved.
    start = TransferClassifier(image_size=64, freeze_backbone=False, class_names=["a", "b", "c"]).state_dict()
    assert torch.equal(
        a["state_dict"]["backbone.features.0.1.running_mean"], start["backbone.features.0.1.running_mean"]
    )
    assert not torch.equal(a["state_dict"]["backbone.features.0.0.weight"], start["backbone.features.0.0.weight"])


@pytest.mark.e2e
def test_partial_fine_tune_end_to_end(image_folder, tmp_path):
    """configs/partial.yaml on the generated images: the trunk runs once (a resumed fit reuses its
    output), only the top blocks train, a resumed fit ends where an unbroken one does, and fit's
    validation on the cached trunk is what `caltech validate` computes from the images (both in
    float32, the precision that can tell)."""

    def partial(name: str, *options: str) -> tuple[Path, str]:
        root = tmp_path / name
        result = run_caltech(
            "fit",
            *small_run(root, str(image_folder), PARTIAL),
            "--trainer.logger",
            "false",
            "--data.cache_views",
            "2",
            "--trainer.deterministic",
            "true",
            "--trainer.precision",
            "32-true",
            *options,
            cwd=tmp_path,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        return root / "runs", result.stderr

    whole, said = partial("whole", "--trainer.max_epochs", "3")
    assert said.count("Cached val and train trunk (14 blocks) outputs") == 1
    broken, _ = partial("broken", "--trainer.max_epochs", "2")
    checkpoint = str(broken / "checkpoints" / "last.ckpt")
    _, said = partial("broken", "--trainer.max_epochs", "3", "--ckpt_path", checkpoint)
    assert "Cached" not in said and said.count("Reusing cached") == 2, "train and val from the first part's pass"

    a = torch.load(whole / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    b = torch.load(broken / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert history(whole) == history(broken)
    start = TransferClassifier(image_size=64, freeze_backbone=False, class_names=["a", "b", "c"]).state_dict()
    for key in start:
        moved = not torch.equal(a[key], start[key])
        in_top = key.startswith(tuple(f"backbone.features.{i}." for i in range(14, 19)))
        if key.startswith("backbone.") and not key.endswith(("running_mean", "running_var", "num_batches_tracked")):
            assert moved == in_top, key

    alone = run_caltech(
        "validate",
        *small_run(tmp_path / "whole", str(image_folder), PARTIAL),
        "--trainer.logger",
        "false",
        "--data.tta_flip",
        "false",
        "--ckpt_path",
        str(whole / "checkpoints" / "last.ckpt"),
        cwd=tmp_path,
    )
    assert alone.returncode == 0, alone.stderr[-3000:]
    printed, logged = printed_metrics(alone.stdout, "val"), history(whole)[-1]
    for name in ("val/loss", "val/acc", "val/acc_macro"):
        assert printed[name] == pytest.approx(float(logged[name]), rel=1e-4), name


@pytest.mark.e2e
def test_ddp_trains_the_unfrozen_backbone_on_every_process(image_folder, tmp_path):
    """DDP registers the parameters that need gradients when it wraps the model; a block unfrozen
    later must still have its gradients averaged (Lightning-AI/pytorch-lightning#20340), or each
    process trains its own backbone. Then the logged validation (each process scores its half
    with its own weights) would differ from one process scoring the saved weights."""
    runs = finetune(
        tmp_path,
        str(image_folder),
        "ddp",
        "--trainer.max_epochs",
        "3",
        "--trainer.strategy",
        "ddp",
        "--trainer.devices",
        "2",
        "--trainer.accelerator",
        "cpu",
        "--data.num_workers",
        "0",
        "--trainer.precision",
        "32-true",  # the validation below runs in float32: so does the fit, to compare to the bit
    )
    logged = history(runs)[-1]
    alone = run_caltech(
        "validate",
        *small_run(tmp_path / "ddp", str(image_folder), FINETUNE),
        "--trainer.logger",
        "false",
        "--ckpt_path",
        str(runs / "checkpoints" / "last.ckpt"),
        "--data.tta_flip",
        "false",  # fit validates on the images alone
        cwd=tmp_path,
    )
    assert alone.returncode == 0, alone.stderr[-3000:]
    printed = printed_metrics(alone.stdout, "val")
    assert printed["val/loss"] == pytest.approx(float(logged["val/loss"]), rel=1e-5)


@pytest.mark.e2e
def test_callback_by_its_short_name(tmp_path):
    """`--trainer.callbacks+=BackboneUnfreeze` (jsonargparse finds a class by its name only
    among the modules the command has loaded) and its options under `--trainer.callbacks.help`."""
    config = str(REPO / "configs" / "transfer.yaml")
    added = run_caltech(
        "fit",
        "--config",
        config,
        "--model.freeze_backbone",
        "false",
        "--trainer.callbacks+=BackboneUnfreeze",
        "--trainer.callbacks.unfreeze_at_epoch",
        "3",
        "--print_config",
        cwd=tmp_path,
    )
    assert added.returncode == 0, added.stderr[-2000:]
    assert re.search(r"class_path: caltech_cli\.(finetuning\.)?BackboneUnfreeze", added.stdout)
    assert "unfreeze_at_epoch: 3" in added.stdout
    helped = run_caltech("fit", "--trainer.callbacks.help", "BackboneUnfreeze", cwd=tmp_path)
    assert helped.returncode == 0 and "--trainer.callbacks.unfreeze_at_epoch" in helped.stdout, helped.stderr[-2000:]


def test_the_private_lightning_parts_it_uses_are_as_it_expects():
    """BaseFinetuning's ``_restarting`` (set when a checkpoint's parameter groups are loaded, so that a
    resumed fit keeps them) and ``_store`` (which records the groups for the checkpoint)."""
    callback = BackboneUnfreeze()
    assert callback._restarting is False
    callback.load_state_dict({"internal_optimizer_metadata": {}})
    assert callback._restarting is True
    parameters = list(inspect.signature(BaseFinetuning._store).parameters)
    assert parameters == ["self", "pl_module", "opt_idx", "num_param_groups", "current_param_groups"]
