"""Feature cache: one backbone pass, reused while nothing that changes the features changes."""

from __future__ import annotations

import csv
import logging
import os
import random
import re

import pytest
import pytorch_lightning as pl
import torch
from PIL import ImageOps
from torch.utils.data import TensorDataset

from caltech_cli import features
from caltech_cli.backbones import preprocessing_for
from caltech_cli.callbacks.finetuning import BackboneUnfreeze
from caltech_cli.data import Caltech101DataModule
from caltech_cli.images import load_rgb
from caltech_cli.model import TransferClassifier
from caltech_cli.transforms import eval_transform, flipped_eval_transform

from conftest import (
    PARTIAL,
    PRE64,
    CreatesFile,
    caltech,
    fills_the_disk,
    one_error,
    options,
    printed_metrics,
    quiet_trainer,
    run_caltech,
    small_data,
    small_run,
)


@pytest.fixture
def passes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count the images that go through a backbone for the cache, one entry per pass."""
    seen: list[int] = []
    real = features.compute_features

    def counting(extract, device, datasets, *args, **kwargs):
        seen.append(sum(len(dataset) for dataset in datasets))
        return real(extract, device, datasets, *args, **kwargs)

    monkeypatch.setattr(features, "compute_features", counting)
    return seen


def fit(
    image_folder, tmp_path, epochs: int = 2, **data_options
) -> tuple[TransferClassifier, Caltech101DataModule, dict]:
    pl.seed_everything(0)
    data = small_data(image_folder, tmp_path, **data_options)
    model = TransferClassifier(image_size=64, class_names=data.find_classes())
    model.configure_optimizers = lambda: torch.optim.AdamW(model.head.parameters(), lr=0.01)
    trainer = quiet_trainer(tmp_path, max_epochs=epochs)
    trainer.fit(model, datamodule=data)
    metrics = trainer.test(model, datamodule=data, verbose=False)[0]
    return model, data, metrics


def test_second_fit_reuses_the_cache(image_folder, tmp_path, passes, caplog):
    _, data, _ = fit(image_folder, tmp_path, cache_features=True)
    assert passes == [10 + 19, 9], "fit's val and train in one pass, then test; each once"
    assert isinstance(data.train_dataloader().dataset, features.CachedFeatures)
    with caplog.at_level(logging.INFO, logger="caltech_cli"):
        fit(image_folder, tmp_path, cache_features=True)
    assert passes == [10 + 19, 9], "nothing recomputed"
    assert caplog.text.count("Reusing cached") == 3


def test_changed_image_invalidates_the_cache(image_folder, tmp_path, passes):
    fit(image_folder, tmp_path, epochs=1, cache_features=True)
    victim = image_folder / "circles" / "image_0001.jpg"
    stat = victim.stat()
    os.utime(victim, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    fit(image_folder, tmp_path, epochs=1, cache_features=True)
    assert len(passes) == 3 and passes[2] in (19, 10, 9), "the split holding the changed file is recomputed, alone"


def test_other_image_size_is_another_cache(image_folder, tmp_path, passes):
    fit(image_folder, tmp_path, epochs=1, cache_features=True)
    data = Caltech101DataModule(
        str(image_folder),
        str(tmp_path / "data"),
        split=(50, 25, 25),
        num_workers=0,
        preprocessing=preprocessing_for("mobilenet_v2", "IMAGENET1K_V1", image_size=32),
        cache_features=True,
    )
    model = TransferClassifier(image_size=32, class_names=data.find_classes())
    trainer = quiet_trainer(tmp_path, enable_checkpointing=True)
    trainer.validate(model, datamodule=data, verbose=False)
    assert passes[-1] == 10


def test_half_written_cache_is_never_read(image_folder, tmp_path, passes):
    folder = tmp_path / "data" / "feature-cache"
    folder.mkdir(parents=True)
    for name in ("train", "val", "test"):
        (folder / f"{name}-0123456789abcdef01234567.pt.part").write_bytes(b"killed half-way")
    _, _, metrics = fit(image_folder, tmp_path, epochs=1, cache_features=True)
    assert passes == [10 + 19, 9]
    assert metrics["test/acc"] >= 0


def retyped(path, name: str, dtype: torch.dtype) -> None:
    edited(path, lambda features: features, name, dtype)


def edited(path, edit, name: str = "features", dtype: torch.dtype | None = None) -> None:
    """The file with its key intact and ``edit`` applied to one of its tensors."""
    stored = torch.load(path, weights_only=True)
    stored[name] = edit(stored[name]).to(dtype or stored[name].dtype)
    torch.save(stored, path)


@pytest.mark.hostile
def test_a_link_in_the_cache_folder_is_not_read_through(image_folder, tmp_path, passes, capsys):
    """A cache file moved out of the folder and a link to it left in its place: one line, before
    any pass, and the file it leads to untouched."""
    run = [*options(tmp_path, image_folder), "--trainer.max_epochs", "1"]
    assert caltech("fit", *run, capsys=capsys)[0] == 0
    file = next((tmp_path / "data" / "feature-cache").glob("train-*.pt"))
    away = tmp_path / "elsewhere.pt"
    file.rename(away)
    file.symlink_to(away)
    before = away.read_bytes()
    line = one_error(*caltech("fit", *run, capsys=capsys))
    assert f"data.cache_dir: {file} is a symbolic link" in line and "Fix: " in line
    assert away.read_bytes() == before and len(passes) == 1


def test_damaged_cache_is_computed_again(image_folder, tmp_path, passes, caplog):
    """Truncated, empty, another program's, planted or mismatched files in the cache folder: each
    is computed again with one line saying so, and nothing in them runs."""
    fit(image_folder, tmp_path, epochs=1, cache_features=True)
    files = sorted((tmp_path / "data" / "feature-cache").glob("*.pt"))
    assert len(files) == 3
    planted = tmp_path / "pwned"
    rounds = [
        [
            lambda f: f.write_bytes(f.read_bytes()[: f.stat().st_size // 2]),
            lambda f: f.write_bytes(b""),
            lambda f: torch.save({"features": CreatesFile(planted), "labels": torch.zeros(1)}, f),
        ],
        [
            lambda f: f.write_text("another program's notes"),
            lambda f: torch.save({"weights": torch.ones(3)}, f),
            lambda f: torch.save({"features": torch.zeros(1, 2, 3), "labels": torch.zeros(2), "key": "{}"}, f),
        ],
        # The right key and shapes, other number types: the head and the loss would fail on them.
        [
            lambda f: retyped(f, "labels", torch.int32),
            lambda f: retyped(f, "features", torch.float16),
            lambda f: retyped(f, "labels", torch.float32),
        ],
        # The right key, edited numbers: fewer features an image, or numbers that are not finite.
        [
            lambda f: edited(f, lambda features: features[..., :10]),
            lambda f: edited(f, lambda features: torch.full_like(features, float("nan"))),
            lambda f: edited(f, lambda features: features.index_fill(-1, torch.tensor([0]), float("inf"))),
        ],
    ]
    for damage in rounds:
        for file, spoil in zip(files, damage):
            spoil(file)
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="caltech_cli"):
            _, _, metrics = fit(image_folder, tmp_path, epochs=1, cache_features=True)
        assert caplog.text.count("cannot be used") == 3 and caplog.text.count("computing them again") == 3
        assert "Reusing cached" not in caplog.text and metrics["test/acc"] >= 0
    assert passes == [10 + 19, 9] * 5
    assert not planted.exists(), "nothing in a cache file runs"
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="caltech_cli"):
        fit(image_folder, tmp_path, epochs=1, cache_features=True)
    assert caplog.text.count("Reusing cached") == 3, "the files computed again are used"


def test_augmented_views(image_folder, tmp_path, passes):
    _, data, _ = fit(image_folder, tmp_path, epochs=1, cache_features=True, cache_views=3)
    cached = data.train_dataloader().dataset
    assert cached.features.shape[:2] == (3, 19)
    assert not torch.equal(cached.features[0], cached.features[1]), "views differ"
    assert passes[0] == 3 * 19 + 10, "three views of each training image, one of each validation image"


def test_head_on_cached_features_equals_head_on_images(image_folder, tmp_path):
    """The cache changes only where the features come from, not the scores."""
    model, _, metrics = fit(image_folder, tmp_path, epochs=3, cache_features=True)
    assert metrics["test/acc"] >= 0.8
    sample = torch.randn(4, 3, 64, 64)
    model.eval()
    with torch.no_grad():
        assert torch.allclose(model(sample), model(model.features(sample)), atol=1e-5)


def test_cache_is_computed_where_and_how_the_trainer_runs_the_model(image_folder, tmp_path, monkeypatch, passes):
    """The backbone pass that fills the cache runs after Lightning has placed the model on its
    root device, on that device and in the trainer's precision (here bf16 autocast on the CPU),
    not in the data module's setup while the model still sits on the CPU in float32. Another
    precision gives other features, so it is another cache."""
    events: list = []
    data = small_data(image_folder, tmp_path, cache_features=True)
    model = TransferClassifier(image_size=64, class_names=data.find_classes())
    trainer = quiet_trainer(tmp_path, max_epochs=1, precision="bf16-mixed", accelerator="cpu")
    placing = trainer.strategy.model_to_device
    monkeypatch.setattr(trainer.strategy, "model_to_device", lambda: (events.append("placed"), placing())[1])
    features = model.features

    def recording(images: torch.Tensor) -> torch.Tensor:
        events.append(
            (
                images.device,
                next(model.backbone.parameters()).device,
                torch.is_autocast_enabled("cpu"),
                torch.get_autocast_dtype("cpu"),
            )
        )
        return features(images)

    model.features = recording
    trainer.fit(model, datamodule=data)
    assert events and events[0] == "placed", "the model is placed before any feature is computed"
    calls = events[1:]
    assert passes == [19 + 10] and calls, "train and val features were computed"
    for images_device, model_device, autocast, dtype in calls:
        assert images_device == model_device == trainer.strategy.root_device
        assert autocast and dtype == torch.bfloat16, "the pass runs in the trainer's precision"

    fit(image_folder, tmp_path, epochs=1, cache_features=True)  # 32-true: other numbers, another cache
    assert passes[1:] == [10 + 19, 9], "float32 features are not taken from the bf16 cache"


def test_trained_backbone_is_not_cached(image_folder, tmp_path, passes):
    data = small_data(image_folder, tmp_path, cache_features=True)
    model = TransferClassifier(image_size=64, freeze_backbone=False, class_names=data.find_classes())
    trainer = quiet_trainer(tmp_path, max_epochs=1, limit_train_batches=1)
    trainer.fit(model, datamodule=data)
    assert passes == []


def test_resume_with_the_cache(image_folder, tmp_path, passes):
    """``fit --ckpt_path`` continues from the checkpoint on the same cached features."""
    data = small_data(image_folder, tmp_path, cache_features=True)

    def trainer(epochs: int) -> pl.Trainer:
        return quiet_trainer(tmp_path, max_epochs=epochs, enable_checkpointing=True)

    first = trainer(1)
    model = TransferClassifier(image_size=64, class_names=data.find_classes())
    first.fit(model, datamodule=data)
    first.save_checkpoint(tmp_path / "one.ckpt")
    resumed_model = TransferClassifier(image_size=64, class_names=data.find_classes())
    resumed = trainer(3)
    resumed.fit(
        resumed_model,
        datamodule=small_data(image_folder, tmp_path, cache_features=True),
        ckpt_path=tmp_path / "one.ckpt",
    )
    assert resumed.current_epoch == 3 and resumed.global_step == 3 * 3
    assert passes == [10 + 19], "the resumed fit reuses the features of the first"


@pytest.mark.e2e
def test_ddp_on_cpu_end_to_end(tar_archive, tmp_path):
    """Two processes (gloo): the archive is extracted once, both train on the same split, one
    computes each split's features and the other reuses them, and the logged validation metrics
    are those of the whole validation set (what one process gets from the same checkpoint)."""

    options = [*small_run(tmp_path, str(tar_archive)), "--trainer.logger", "false"]
    result = run_caltech(
        "fit",
        *options,
        "--trainer.max_epochs",
        "2",
        "--trainer.strategy",
        "ddp",
        "--trainer.devices",
        "2",
        "--trainer.accelerator",
        "cpu",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.count("Extracted ") == 1
    splits = re.findall(r"\(split ([0-9a-f]{12})\)", result.stderr)
    assert len(splits) == 2 and splits[0] == splits[1], "each process logs its split; they are the same"
    assert result.stderr.count("Cached val and train features") == 1
    assert result.stderr.count("Reusing cached train features") == 1
    assert len(list((tmp_path / "data" / "feature-cache").glob("*.pt"))) == 2
    assert (tmp_path / "runs" / "best.ckpt").resolve().is_file()

    with open(tmp_path / "runs" / "history.csv", newline="") as f:
        logged = list(csv.DictReader(f))[-1]
    # fit validates on the images alone; the config's validate adds their mirror images (tta_flip).
    alone = run_caltech(
        "validate",
        *options,
        "--ckpt_path",
        str(tmp_path / "runs" / "checkpoints" / "last.ckpt"),
        "--data.tta_flip",
        "false",
        cwd=tmp_path,
    )
    assert alone.returncode == 0, alone.stderr[-3000:]
    printed = printed_metrics(alone.stdout, "val")
    for name in ("val/acc", "val/acc_macro", "val/loss"):
        assert printed[name] == pytest.approx(float(logged[name]), rel=1e-5), name


def test_tta_flip_view_is_cached_and_eval_averages_the_views(image_folder, tmp_path, passes):
    """With ``tta_flip`` the test split's mirror images go through the backbone in the test's one
    pass, each test image decoded once for both views, and are stored; the model's scores of a
    test image are the log of its probabilities averaged over both views. Fit's own validation
    stays single-view."""
    model, data, metrics = fit(image_folder, tmp_path, epochs=1, cache_features=True, tta_flip=True)
    assert passes == [10 + 19, 9], "fit as without TTA; the test images decoded once for both views"
    cached = data.test_dataloader().dataset
    assert cached.features.shape[:2] == (2, 9) and cached.all_views
    first = data.test_set.files[0]
    model.eval()
    with torch.no_grad():
        mirrored = model.features(flipped_eval_transform(PRE64)(load_rgb(first))[None])[0]
        assert torch.allclose(cached.features[1, 0], mirrored, atol=1e-4), "the second view is the mirror image"
        assert not torch.allclose(cached.features[0, 0], mirrored, atol=1e-3)
        views = cached.features.transpose(0, 1)  # (images, views, width), as the loader batches them
        probs = model.head(cached.features).softmax(dim=-1).mean(dim=0)
        assert torch.allclose(model(views).softmax(dim=1), probs, atol=1e-5)
    accuracy = (probs.argmax(dim=1) == cached.labels).float().mean()
    assert metrics["test/acc"] == pytest.approx(float(accuracy))
    assert sorted(p.name.split("-")[0] for p in (tmp_path / "data" / "feature-cache").glob("*.pt")) == [
        "test",
        "test_flip",
        "train",
        "val",
    ]


def test_tta_flip_without_the_cache_stacks_the_views(image_folder, tmp_path):
    data = small_data(image_folder, tmp_path, batch_size=32, tta_flip=True)
    data.setup("validate")
    image = load_rgb(data.val_set.files[0])
    stacked, _ = data._dataset("val")[0]
    assert torch.equal(stacked[0], eval_transform(PRE64)(image))
    assert torch.equal(stacked[1], eval_transform(PRE64)(ImageOps.mirror(image)))
    assert data._dataset("train")[0][0].shape == (3, 64, 64), "training stays single-view"


def test_predict_with_tta_flip_averages_image_and_mirror(image_folder, tmp_path):
    files = sorted(image_folder.glob("**/circles/image_000[1-3].jpg"))
    assert len(files) == 3
    (tmp_path / "photos").mkdir()
    for file in files:
        (tmp_path / "photos" / file.name).write_bytes(file.read_bytes())
    (tmp_path / "photos" / "broken.jpg").write_bytes(b"not an image")
    data = Caltech101DataModule(
        str(image_folder),
        str(tmp_path / "data"),
        batch_size=8,
        num_workers=0,
        preprocessing=PRE64,
        predict_dir=str(tmp_path / "photos"),
        tta_flip=True,
    )
    model = TransferClassifier(image_size=64, class_names=["circles", "squares", "stripes"]).eval()
    trainer = quiet_trainer(tmp_path, enable_checkpointing=True)
    (batch,) = trainer.predict(model, datamodule=data)
    assert batch["error"][0] and not any(batch["error"][1:]), "the unreadable file is one error row"
    with torch.no_grad():
        for row, path in zip(batch["probs"][1:], [tmp_path / "photos" / f.name for f in files]):
            image = load_rgb(path)
            views = torch.stack([eval_transform(PRE64)(image), eval_transform(PRE64)(ImageOps.mirror(image))])
            assert torch.allclose(row, model(views).softmax(dim=1).mean(dim=0), atol=1e-5)
            assert not torch.allclose(row, model(views[:1]).softmax(dim=1)[0], atol=1e-4), "not the image alone"


def test_cached_features_come_a_whole_batch_at_a_time_as_item_by_item():
    """A loader over cached features fetches each batch in one indexing operation; the batch is
    what fetching and stacking item by item gives, random views drawn in the same order."""
    stored, labels = torch.randn(3, 10, 4), torch.arange(10) % 4
    cached = features.CachedFeatures(stored, labels)
    random.seed(0)
    loader = torch.utils.data.DataLoader(cached, batch_size=3, collate_fn=features.keep_batch)
    batched = list(loader)
    random.seed(0)
    items = [cached[i] for i in range(10)]
    assert [len(b[0]) for b in batched] == [3, 3, 3, 1]
    assert torch.equal(torch.cat([b[0] for b in batched]), torch.stack([f for f, _ in items]))
    assert torch.cat([b[1] for b in batched]).tolist() == [label for _, label in items] == labels.tolist()
    both = features.CachedFeatures(stored, labels, all_views=True)
    views, batch_labels = both.__getitems__([7, 2])
    assert views.shape == (2, 3, 4) and torch.equal(views[0], stored[:, 7]) and batch_labels.tolist() == [3, 2]


@pytest.mark.hostile
def test_a_disk_that_fills_during_the_cache_write_is_one_line(image_folder, tmp_path, capsys, monkeypatch):
    """Nothing truncated is left under a name a later run would trust."""
    fills_the_disk(monkeypatch, ".pt.")
    line = one_error(*caltech("fit", *options(tmp_path, image_folder), capsys=capsys))
    assert "cannot write" in line and "feature-cache" in line and "the disk is full" in line
    assert not [p.name for p in (tmp_path / "data" / "feature-cache").iterdir() if p.name != ".lock"]


def test_a_pass_over_datasets_of_one_and_of_two_views_never_batches_across_their_seam():
    """Items of one view (3, H, W) and of two (2, 3, H, W) go through one loader: batches end at
    each seam, each dataset gets its (views, len, width) features, an empty one too."""
    one = TensorDataset(torch.arange(5.0)[:, None, None, None].expand(5, 3, 2, 2), torch.arange(5))
    two = TensorDataset(torch.arange(3.0)[:, None, None, None, None].expand(3, 2, 3, 2, 2), torch.arange(3))
    empty = TensorDataset(torch.zeros(0, 3, 2, 2), torch.zeros(0, dtype=torch.long))
    assert features.seam_batches([5, 3], 4) == [[0, 1, 2, 3], [4], [5, 6, 7]]

    def extract(images: torch.Tensor) -> torch.Tensor:
        return images.flatten(1)[:, :1] * 10  # one feature: the image's value times 10

    out = features.compute_features(extract, torch.device("cpu"), [one, empty, two], 4, 0, 2, "test", [1, 1, 2])
    (got_one, labels_one), (got_empty, _), (got_two, labels_two) = out
    assert got_one.shape == (1, 5, 1) and torch.equal(got_one[0, :, 0], torch.arange(5.0) * 10)
    assert got_empty.shape == (1, 0, 1)
    assert got_two.shape == (2, 3, 1) and torch.equal(got_two[1, :, 0], torch.arange(3.0) * 10)
    assert labels_one.tolist() == [0, 1, 2, 3, 4] and labels_two.tolist() == [0, 1, 2]


# -- partial fine-tuning: the frozen trunk's output, cached


def partial_fit(
    image_folder, tmp_path, epochs: int = 2, train_blocks: int = 5, ckpt_path=None, change=None, **options
) -> tuple[TransferClassifier, Caltech101DataModule, pl.Trainer]:
    """A fit whose backbone trains only its last ``train_blocks`` blocks, from epoch 1, on the
    cached output of the blocks below; ``change`` alters the model before it fits."""
    pl.seed_everything(0)
    data = small_data(image_folder, tmp_path, cache_features=True, **options)
    model = TransferClassifier(image_size=64, freeze_backbone=False, class_names=data.find_classes())
    if change is not None:
        change(model)
    callback = BackboneUnfreeze(unfreeze_at_epoch=1, train_blocks=train_blocks)
    trainer = quiet_trainer(tmp_path, max_epochs=epochs, callbacks=[callback], enable_checkpointing=True)
    trainer.fit(model, datamodule=data, ckpt_path=ckpt_path)
    return model, data, trainer


def test_partial_fine_tuning_trains_the_top_blocks_on_the_cached_trunk(image_folder, tmp_path, passes):
    """MobileNetV2's first 14 blocks run once per image, in one pass over val and train; the last
    five and the head train on their output. The cached output is the trunk's forward pass of
    the image, and the top's output on it is the whole backbone's."""
    start = TransferClassifier(image_size=64, freeze_backbone=False, class_names=["a", "b", "c"]).backbone
    model, data, _ = partial_fit(image_folder, tmp_path, epochs=3)
    assert passes == [10 + 19], "the trunk ran once over val and train"
    cached = data.train_dataloader().dataset
    assert isinstance(cached, features.CachedFeatures) and cached.trunk
    assert cached.features.shape == (1, 19, 96, 4, 4) and cached.features.dtype == torch.float32
    batch, _ = next(iter(data.train_dataloader()))
    assert isinstance(batch, features.TrunkOutput)
    names = sorted(p.name.split("-")[0] for p in (tmp_path / "data" / "feature-cache").glob("*.pt"))
    assert names == ["trunk14", "trunk14"]

    trunk, top = model.backbone.features[:14], model.backbone.features[14:]
    assert all(
        torch.equal(a, b) for a, b in zip(trunk.state_dict().values(), start.features[:14].state_dict().values())
    )
    assert not torch.equal(top[-1][0].weight, start.features[-1][0].weight), "the top blocks trained"

    model.eval()
    image = eval_transform(PRE64)(load_rgb(data.train_set.files[3]))[None]
    with torch.no_grad():
        assert torch.allclose(cached.features[0, 3], model.trunk().trunk(image)[0], atol=1e-6)
        from_cache = model(features.TrunkOutput(cached.features[0, 3:4]))
        assert torch.allclose(from_cache, model(image), atol=1e-5), "the top on the cache is the network on the image"


def test_the_trunk_cache_is_keyed_by_its_depth_and_weights(image_folder, tmp_path, passes):
    """Another depth, or other weights in the trunk, is another cache; other weights above it are not."""
    partial_fit(image_folder, tmp_path, epochs=1)
    assert passes == [29]

    def nudge_top(model: TransferClassifier) -> None:
        with torch.no_grad():
            model.backbone.features[15].conv[0][0].weight.mul_(1.01)

    partial_fit(image_folder, tmp_path, epochs=1, change=nudge_top)
    assert passes == [29], "the same trunk: the cache is reused"

    def nudge_trunk(model: TransferClassifier) -> None:
        with torch.no_grad():
            model.backbone.features[13].conv[0][0].weight.mul_(1.01)

    partial_fit(image_folder, tmp_path, epochs=1, change=nudge_trunk)
    assert passes == [29, 29], "other weights in the trunk"
    partial_fit(image_folder, tmp_path, epochs=1, train_blocks=3)
    assert passes == [29, 29, 29], "a deeper trunk"
    assert len(list((tmp_path / "data" / "feature-cache").glob("trunk16-*.pt"))) == 2


def test_a_trunk_output_edited_under_its_key_is_computed_again(image_folder, tmp_path, passes, caplog):
    """Maps cut to fewer pixels would train on without an error: the stored shape is checked."""
    partial_fit(image_folder, tmp_path, epochs=1)
    for file in (tmp_path / "data" / "feature-cache").glob("trunk14-*.pt"):
        edited(file, lambda maps: maps[..., :3, :3])
    with caplog.at_level(logging.INFO, logger="caltech_cli"):
        partial_fit(image_folder, tmp_path, epochs=1)
    assert caplog.text.count("cannot be used") == 2 and passes == [29, 29]


def test_a_resumed_partial_fine_tune_reuses_the_trunk(image_folder, tmp_path, passes):
    """(That it ends where an unbroken fit does: tests/callbacks/test_finetuning.py.)"""
    _, _, first = partial_fit(image_folder, tmp_path / "broken", epochs=2)
    first.save_checkpoint(tmp_path / "two.ckpt")
    _, _, second = partial_fit(image_folder, tmp_path / "broken", epochs=3, ckpt_path=tmp_path / "two.ckpt")
    assert second.current_epoch == 3 and len(second.optimizers[0].param_groups) == 1 + 5
    assert passes == [29], "the resumed fit computed nothing: it reused its first part's trunk"


def test_a_bf16_fit_keeps_the_trunk_in_bf16_under_its_own_key(image_folder, tmp_path, passes):
    partial_fit(image_folder, tmp_path, epochs=1)
    pl.seed_everything(0)
    data = small_data(image_folder, tmp_path, cache_features=True)
    model = TransferClassifier(image_size=64, freeze_backbone=False, class_names=data.find_classes())
    callback = BackboneUnfreeze(unfreeze_at_epoch=1, train_blocks=5)
    trainer = quiet_trainer(tmp_path, max_epochs=2, callbacks=[callback], precision="bf16-mixed")
    trainer.fit(model, datamodule=data)
    assert passes == [29, 29], "bfloat16 outputs are not float32 ones"
    assert data.train_dataloader().dataset.features.dtype == torch.bfloat16


@pytest.mark.hostile
def test_a_trunk_cache_folder_that_is_a_file_is_one_line(image_folder, tmp_path, capsys):
    blocker = tmp_path / "blocker"
    blocker.write_text("the user's file\n")
    run = [*small_run(tmp_path, str(image_folder), PARTIAL), "--trainer.logger", "false", "--trainer.max_epochs", "1"]
    line = one_error(*caltech("fit", *run, "--data.cache_dir", str(blocker), capsys=capsys))
    assert f"data.cache_dir: {blocker} cannot be made a folder (a file is in its way)" in line
    assert blocker.read_text() == "the user's file\n"
