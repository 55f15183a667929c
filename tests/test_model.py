"""The model: a frozen backbone stays frozen, checkpoints' classes, the training loss and its epoch figures."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from caltech_cli.backbones import preprocessing_for
from caltech_cli.callbacks import BestAndLastCheckpoint, EpochHistory
from caltech_cli.data import Caltech101DataModule
from caltech_cli.devices import CPU_BATCH
from caltech_cli.errors import CaltechError
from caltech_cli.history import read_history
from caltech_cli.model import TransferClassifier

from conftest import quiet_trainer, small_data


def test_frozen_backbone_is_bit_identical_after_fit(image_folder, tmp_path):
    pre = preprocessing_for("mobilenet_v2", "IMAGENET1K_V1", image_size=64)
    data = Caltech101DataModule(
        str(image_folder), str(tmp_path), split=(50, 25, 25), batch_size=8, num_workers=0, preprocessing=pre
    )
    model = TransferClassifier(image_size=64, class_names=data.find_classes())
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    head_before = model.head.weight.clone()
    trainer = quiet_trainer(tmp_path, max_epochs=2)
    trainer.fit(model, datamodule=data)
    after = model.backbone.state_dict()
    assert before.keys() == after.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed == [], f"frozen backbone changed: {changed[:5]}"
    assert not torch.equal(head_before, model.head.weight), "the head must learn"
    assert not model.backbone.training and model.training


def test_unfrozen_backbone_trains(image_folder, tmp_path):
    pre = preprocessing_for("resnet18", None, image_size=32)
    data = Caltech101DataModule(
        str(image_folder), str(tmp_path), split=(50, 25, 25), batch_size=8, num_workers=0, preprocessing=pre
    )
    model = TransferClassifier(
        backbone="resnet18", weights=None, freeze_backbone=False, image_size=32, class_names=data.find_classes()
    )
    before = model.backbone.conv1.weight.clone()
    trainer = quiet_trainer(tmp_path, max_epochs=1)
    trainer.fit(model, datamodule=data)
    assert not torch.equal(before, model.backbone.conv1.weight)


def test_checkpoint_with_other_classes_is_refused():
    model = TransferClassifier(weights=None, class_names=["a", "b"])
    with pytest.raises(CaltechError, match="trained on 3 classes"):
        model.on_load_checkpoint({"hyper_parameters": {"backbone": "mobilenet_v2", "class_names": ["a", "b", "c"]}})
    with pytest.raises(CaltechError, match="resnet18"):
        model.on_load_checkpoint({"hyper_parameters": {"backbone": "resnet18", "class_names": ["a", "b"]}})


def test_checkpoint_names_the_classes_when_the_model_has_none():
    model = TransferClassifier(weights=None)
    assert model.head is None
    trained = TransferClassifier(weights=None, class_names=["x", "y"])
    saved = {"backbone": "mobilenet_v2", "class_names": ["x", "y"]}
    model.on_load_checkpoint({"hyper_parameters": saved, "state_dict": trained.state_dict()})
    assert model.class_names == ["x", "y"] and model.head.out_features == 2


@pytest.mark.hostile
@pytest.mark.parametrize(
    "change, says",
    [
        (lambda state: state.pop("head.bias"), "lacks head.bias"),
        (lambda state: state.update(extra=torch.zeros(1)), "holds extra, which its network has not"),
        (lambda state: state.update({"head.weight": torch.zeros(3, 7)}), "holds head.weight as (3, 7)"),
        (lambda state: state.update({"head.weight": state["head.weight"].long()}), "as torch.int64"),
    ],
)
def test_a_checkpoint_whose_weights_do_not_fit_is_one_line(change, says):
    trained = TransferClassifier(backbone="resnet18", weights=None, class_names=["x", "y"])
    state = trained.state_dict()
    change(state)
    model = TransferClassifier(backbone="resnet18", weights=None)
    with pytest.raises(CaltechError, match=re.escape(says)):
        model.on_load_checkpoint(
            {"hyper_parameters": {"backbone": "resnet18", "class_names": ["x", "y"]}, "state_dict": state}
        )


@pytest.mark.parametrize("class_weights", ["inverse", "sqrt_inverse"])
def test_class_weighted_smoothed_training_loss(image_folder, tmp_path, class_weights):
    """Fit takes the class weights from the training labels; the training loss is the weighted,
    label-smoothed cross-entropy computed by hand, while val and test losses stay plain. Fit logs
    val/acc_macro beside val/acc."""
    data = small_data(image_folder, tmp_path, cache_features=True)
    data.setup("fit")
    # An imbalanced training set: drop most of the first class's training images.
    first = [i for i, label in enumerate(data.train_set.labels) if label == 0][1:]
    keep = [i for i in range(len(data.train_set)) if i not in first]
    data.splits["train"] = dataclasses.replace(
        data.train_set, files=[data.train_set.files[i] for i in keep], labels=[data.train_set.labels[i] for i in keep]
    )
    model = TransferClassifier(
        image_size=64, class_names=data.find_classes(), class_weights=class_weights, label_smoothing=0.1
    )
    trainer = quiet_trainer(tmp_path, max_epochs=1)
    trainer.fit(model, datamodule=data)
    assert "val/acc_macro" in trainer.callback_metrics
    counts = torch.bincount(torch.tensor(data.train_set.labels), minlength=3).float()
    power = 1.0 if class_weights == "inverse" else 0.5
    weights = (counts.sum() / (3 * counts)) ** power
    assert counts[0] == 1 and torch.allclose(model.loss_weights, weights)
    features = torch.randn(6, model.num_features)
    labels = torch.tensor([0, 1, 2, 2, 1, 1])
    logp = model.head(features).log_softmax(dim=1)
    # Label smoothing 0.1 over 3 classes: target 0.9 + 0.1/3 on the label, 0.1/3 elsewhere.
    target = torch.full((6, 3), 0.1 / 3)
    target[torch.arange(6), labels] += 0.9
    per_class = -(target * logp * weights).sum(dim=1)  # torch's weighted smoothing weighs each class term
    expected = per_class.sum() / weights[labels].sum()
    logits = model.head(features)
    assert torch.allclose(model.loss(logits, labels, training=True), expected, atol=1e-5)
    plain = -logp[torch.arange(6), labels].mean()
    assert torch.allclose(model.loss(logits, labels, training=False), plain, atol=1e-5)


@pytest.mark.parametrize("smoothing", [-0.1, 1.0, 2.5])
def test_label_smoothing_out_of_range_is_refused(smoothing):
    with pytest.raises(CaltechError, match=r"model.label_smoothing .* is not in \[0, 1\)"):
        TransferClassifier(weights=None, num_classes=3, label_smoothing=smoothing)


class EpochFigures(pl.Callback):
    """What each training epoch should log, from its batches (their loss, size and hits, taken
    before the step changes the head), beside what the callbacks see logged when it ends; stops
    the fit within an epoch (``stop_at``: epoch, batch) as early stopping or a time limit would,
    or fails there (``fail_at``) as a crash or Ctrl-C would."""

    def __init__(self, stop_at: tuple[int, int] | None = None, fail_at: tuple[int, int] | None = None) -> None:
        self.batches: list[list[tuple[float, int, int]]] = []
        self.logged: list[dict[str, float]] = []
        self.stop_at, self.fail_at = stop_at, fail_at
        self._hits = 0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.batches.append([])  # a fit resumed within an epoch starts none

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.batches[-1]:
            self.batches.append([])

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx) -> None:
        if (trainer.current_epoch, batch_idx) == self.fail_at:
            raise RuntimeError("stopped here")
        with torch.no_grad():
            self._hits = int((pl_module(batch[0]).argmax(dim=1) == batch[1]).sum())

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx) -> None:
        self.batches[-1].append((float(outputs["loss"]), len(batch[1]), self._hits))
        if (trainer.current_epoch, batch_idx) == self.stop_at:
            trainer.should_stop = True

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.logged.append({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/")})


def expected_figures(batches: list[tuple[float, int, int]]) -> dict[str, float]:
    images = sum(n for _, n, _ in batches)
    return {
        "train/loss": sum(loss * n for loss, n, _ in batches) / images,
        "train/acc": sum(hits for _, _, hits in batches) / images,
    }


def history_figures(root: Path) -> list[dict[str, float]]:
    return [{k: row[k] for k in ("train/loss", "train/acc")} for row in read_history(root / "history.csv")]


def features_loader() -> torch.utils.data.DataLoader:
    """50 stored feature vectors of MobileNetV2's width in batches of 8: 7 steps an epoch."""
    torch.manual_seed(0)
    features, labels = torch.randn(50, 1280), torch.randint(3, (50,))
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(features, labels), batch_size=8)


def head_only_trainer(root: Path, *callbacks: pl.Callback, **options) -> pl.Trainer:
    options = {"max_epochs": 3, "enable_checkpointing": True, **options}
    return quiet_trainer(root, callbacks=[*callbacks, EpochHistory()], **options)


@pytest.mark.parametrize(
    ("options", "stop_at", "steps"),
    [
        ({}, None, [7, 7, 7]),
        ({"limit_train_batches": 3}, None, [3, 3, 3]),
        ({"max_steps": 9}, None, [7, 2]),
        ({}, (1, 2), [7, 3]),  # stopped within an epoch, as early stopping or trainer.max_time do
    ],
)
def test_training_epoch_logs_its_mean_loss_and_accuracy(tmp_path, options, stop_at, steps):
    """The training loss and accuracy are logged once per epoch (``self.log`` every step cost a
    large share of the head's epochs) and are still the means over all of the epoch's images,
    however the epoch ends, for the callbacks, the loggers and history.csv alike."""
    model = TransferClassifier(backbone="mobilenet_v2", weights=None, class_names=["a", "b", "c"])
    figures = EpochFigures(stop_at=stop_at)
    trainer = head_only_trainer(tmp_path, figures, enable_checkpointing=False, **options)
    trainer.fit(model, features_loader())
    assert [len(batches) for batches in figures.batches] == steps
    expected = [expected_figures(batches) for batches in figures.batches]
    assert history_figures(tmp_path) == [pytest.approx(e, rel=1e-5) for e in expected]
    if stop_at is None:  # a stopped epoch's figures come after the callbacks' epoch end (history.csv waits)
        assert figures.logged == [pytest.approx(e, rel=1e-5) for e in expected]
    final = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/")}
    assert final == pytest.approx(expected[-1], rel=1e-5), "the loggers see the last epoch's figures"


def test_fit_resumed_within_an_epoch_logs_what_it_trained(tmp_path):
    """A fit that failed within an epoch saved last.ckpt there; resumed from it (the same model
    object, as in a notebook), the epoch's figures are those of the batches trained after the
    resume, and history.csv keeps the epochs before it."""
    model = TransferClassifier(backbone="mobilenet_v2", weights=None, class_names=["a", "b", "c"])
    checkpoints = BestAndLastCheckpoint(dirpath=tmp_path / "checkpoints", save_last=True, save_on_exception=True)
    failing = EpochFigures(fail_at=(1, 3))
    with pytest.raises(RuntimeError, match="stopped here"):
        head_only_trainer(tmp_path, failing, checkpoints).fit(model, features_loader())
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    resumed = EpochFigures()
    checkpoints = BestAndLastCheckpoint(dirpath=tmp_path / "checkpoints", save_last=True, save_on_exception=True)
    head_only_trainer(tmp_path, resumed, checkpoints).fit(
        model, features_loader(), ckpt_path=tmp_path / "checkpoints" / "last.ckpt"
    )
    assert [len(batches) for batches in resumed.batches] == [4, 7]
    expected = [expected_figures(failing.batches[0]), *map(expected_figures, resumed.batches)]
    assert history_figures(tmp_path) == [pytest.approx(e, rel=1e-5) for e in expected]


def test_backbone_in_eval_mode_runs_large_cpu_batches_in_chunks():
    """On a CPU, predict's and test's batches (64 images, 128 with mirror images) go through a
    backbone in eval mode in chunks of CPU_BATCH, several times as fast there, with the same
    features; a backbone that trains sees its batch whole (BatchNorm's batch statistics)."""
    model = TransferClassifier(backbone="mobilenet_v2", weights=None, freeze_backbone=False, class_names=["a", "b"])
    calls: list[int] = []
    model.backbone.register_forward_hook(lambda module, args, output: calls.append(len(args[0])))
    images = torch.randn(2 * CPU_BATCH + 3, 3, 64, 64)
    model.eval()
    chunked = model.features(images)
    assert calls == [CPU_BATCH, CPU_BATCH, 3]
    calls.clear()
    with torch.no_grad():
        whole = model.backbone(images.contiguous(memory_format=torch.channels_last))
    assert torch.allclose(chunked, whole, atol=1e-5)
    calls.clear()
    model.train()
    model.features(images)
    assert calls == [len(images)], "a training backbone's batch statistics need the whole batch"
