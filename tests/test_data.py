"""Data modules: the steps composed, presplit folders, ImageFolderDataModule, a bad image during training."""

from __future__ import annotations

import json
import re
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from caltech_cli.data import ImageFolderDataModule, NotReadYetError
from caltech_cli.errors import CaltechError

from conftest import (
    CLASSES,
    csv_rows,
    damaged_png,
    data_module,
    draw,
    printed_metrics,
    run_caltech,
    small_run,
)


def test_each_split_has_its_own_transform(image_folder, tmp_path):
    dm = data_module(image_folder, tmp_path)
    dm.setup("fit")
    image_train_a, _ = dm.train_set[0]
    torch.manual_seed(0)
    views = {tuple(dm.train_set[0][0].flatten()[:50].tolist()) for _ in range(5)}
    assert len(views) > 1, "training images are augmented"
    val_a, val_b = dm.val_set[0][0], dm.val_set[0][0]
    assert torch.equal(val_a, val_b), "evaluation images are not"
    assert image_train_a.shape == val_a.shape == (3, 32, 32)
    assert dm.train_set.transform is not dm.val_set.transform


def test_predict_needs_a_folder_with_images(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CaltechError, match="holds no image files"):
        data_module(tmp_path, tmp_path, predict_dir=str(tmp_path / "empty")).setup("predict")
    with pytest.raises(CaltechError, match="--data.predict_dir"):
        data_module(tmp_path, tmp_path).setup("predict")
    with pytest.raises(CaltechError, match="nowhere does not exist. Fix: pass a folder of images"):
        data_module(tmp_path, tmp_path, predict_dir="nowhere").setup("predict")


@pytest.mark.e2e
@pytest.mark.hostile
def test_an_image_that_fails_to_decode_is_left_out_of_every_number(tmp_path):
    """The scan passes PNGs whose checksums were made to fit; they fail to decode in the backbone
    pass. Without --data.skip_bad_images one line names one and the option. With it the run goes
    on, and each bad file counts in no metric: the test report's support is the readable images',
    its accuracy theirs, no image is counted twice, and the report never opens the bad file. A
    feature cache computed leaving them out is not reused by a run without the option, which
    stops at the file as it would have without the cache."""
    rng = np.random.default_rng(3)
    for split, count in (("train", 4), ("val", 2), ("test", 2)):
        for kind in CLASSES:
            folder = tmp_path / "photos" / split / kind
            folder.mkdir(parents=True)
            for i in range(count):
                draw(kind, rng).save(folder / f"{i}.jpg")
    bad = damaged_png(tmp_path / "photos" / "train" / "circles" / "bad.png", checksum_intact=True)
    bad_test = damaged_png(tmp_path / "photos" / "test" / "circles" / "bad.png", checksum_intact=True)
    options = [*small_run(tmp_path, str(tmp_path / "photos")), "--trainer.logger", "false", "--trainer.max_epochs", "1"]

    stopping = run_caltech("fit", *options, cwd=tmp_path)
    assert stopping.returncode == 2, stopping.stderr[-3000:]
    errors = [line for line in stopping.stderr.splitlines() if line.startswith("caltech: error:")]
    assert len(errors) == 1 and f"cannot read image {bad}" in errors[0] and "--data.skip_bad_images true" in errors[0]
    assert "Traceback" not in stopping.stderr

    skipping = run_caltech("fit", *options, "--data.skip_bad_images", "true", cwd=tmp_path)
    assert skipping.returncode == 0, skipping.stderr[-3000:]
    assert f"Leaving out {bad}, which cannot be read" in skipping.stderr
    assert f"Left out 1 image files that could not be read (they count in no metric): {bad}" in skipping.stderr

    checkpoint = ["--ckpt_path", str(tmp_path / "runs" / "best.ckpt")]
    tested = run_caltech("test", *options, "--data.skip_bad_images", "true", "--data.tta_flip", "false", *checkpoint,
                         cwd=tmp_path)  # fmt: skip
    assert tested.returncode == 0, tested.stderr[-3000:]
    assert f"Left out 1 image files that could not be read (they count in no metric): {bad_test}" in tested.stderr
    rows = {row["class"]: row for row in csv_rows(tmp_path / "runs" / "report" / "per_class.csv")}
    assert {name: int(row["support"]) for name, row in rows.items()} == dict.fromkeys(CLASSES, 2)
    printed = printed_metrics(tested.stdout)
    recall = sum(float(row["recall"]) * 2 for row in rows.values()) / 6
    assert printed["test/acc"] == pytest.approx(recall, abs=1e-6), "accuracy over the six readable images"
    shown = {row["path"] for row in csv_rows(tmp_path / "runs" / "report" / "top_losses.csv")}
    assert str(bad_test) not in shown and len(shown) == 6

    strict = run_caltech("test", *options, "--data.tta_flip", "false", *checkpoint, cwd=tmp_path)
    assert strict.returncode == 2, strict.stderr[-3000:]
    assert "computed leaving out 1 images" in strict.stderr, "the cache of the run with the option is not used"
    assert f"cannot read image {bad_test}" in strict.stderr.splitlines()[-1]


def presplit_folder(image_folder: Path, root: Path, val_name: str = "val", with_test: bool = True) -> Path:
    """``root/{train,<val_name>,test}/<class>/``: images 1-6 train, 7-9 val, 10-12 test."""
    parts = {"train": range(1, 7), val_name: range(7, 10)}
    if with_test:
        parts["test"] = range(10, 13)
    for split, numbers in parts.items():
        for kind in CLASSES:
            folder = root / split / kind
            folder.mkdir(parents=True)
            for i in numbers:
                shutil.copy(image_folder / kind / f"image_{i:04d}.jpg", folder)
    return root


def folder_module(root: Path | str, tmp_path: Path, **kwargs) -> ImageFolderDataModule:
    return ImageFolderDataModule(str(root), data_dir=str(tmp_path / "data"), num_workers=0, **kwargs)


def test_class_folders_are_split_like_caltech(image_folder, tmp_path):
    dm = folder_module(image_folder, tmp_path, split=(50, 25, 25))
    assert dm.find_classes() == sorted(CLASSES)
    assert dm.root == image_folder and dm.layout.split_folders is None
    dm.setup("fit")
    sizes = [len(dm.train_set), len(dm.val_set), len(dm.test_set)]
    assert sum(sizes) == 38 and min(sizes) > 0


@pytest.mark.parametrize("val_name", ["val", "valid", "validation"])
def test_presplit_folder_keeps_its_split(image_folder, tmp_path, val_name):
    root = presplit_folder(image_folder, tmp_path / "photos", val_name)
    dm = folder_module(root, tmp_path, split=(98, 1, 1))
    assert dm.find_classes() == sorted(CLASSES)
    dm.setup("fit")
    assert [len(dm.train_set), len(dm.val_set), len(dm.test_set)] == [18, 9, 9], "data.split is not used"
    assert all(p.parent.parent.name == "train" for p in dm.train_set.files)
    assert {p.parent.parent.name for p in dm.val_set.files} == {val_name}
    labels = {p.parent.name: label for p, label in zip(dm.test_set.files, dm.test_set.labels)}
    assert labels == {name: dm.find_classes().index(name) for name in CLASSES}


def test_presplit_without_test_folder_trains_and_says_what_test_needs(image_folder, tmp_path):
    dm = folder_module(presplit_folder(image_folder, tmp_path / "photos", with_test=False), tmp_path)
    dm.setup("fit")
    assert len(dm.train_set) == 18 and len(dm.val_set) == 9
    with pytest.raises(CaltechError, match="no test/ folder"):
        dm.setup("test")


def test_archive_with_a_wrapper_folder(image_folder, tmp_path):
    archive = tmp_path / "my_photos.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in image_folder.rglob("*"):
            if path.is_file():
                zf.write(path, f"export-2026/photos/{path.relative_to(image_folder)}")
    dm = folder_module(archive, tmp_path, split=(50, 25, 25))
    assert dm.find_classes() == sorted(CLASSES)
    assert dm.root == tmp_path / "data" / "my_photos"
    dm.setup("fit")
    assert len(dm.train_set) + len(dm.val_set) + len(dm.test_set) == 38


@pytest.mark.e2e
def test_options_of_the_base_show_in_help(tmp_path):
    result = run_caltech("fit", "--data.help", "ImageFolderDataModule", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    for option in ("--data.root", "--data.batch_size", "--data.cache_features", "--data.predict_dir"):
        assert option in result.stdout
    assert "--data.source" not in result.stdout, "root replaces source"


@pytest.mark.e2e
def test_cli_fit_test_predict_on_a_presplit_folder(image_folder, tmp_path):
    """``--data ImageFolderDataModule --data.root`` with the transfer config: cache, class names
    in the checkpoint, test report and predictions work as they do for Caltech-101."""
    root = presplit_folder(image_folder, tmp_path / "photos")
    options = [o for o in small_run(tmp_path, "unused") if o not in ("--data.source", "unused")]
    data = ["--data", "ImageFolderDataModule", "--data.root", str(root)]
    fit = run_caltech("fit", *options, *data, "--trainer.max_epochs", "2", "--trainer.logger", "false", cwd=tmp_path)
    assert fit.returncode == 0, fit.stderr[-3000:]
    assert "Cached val and train features" in fit.stderr and "18 train, 9 val, 9 test" in fit.stderr
    best = tmp_path / "runs" / "best.ckpt"
    assert torch.load(best, weights_only=True)["hyper_parameters"]["class_names"] == sorted(CLASSES)

    test = run_caltech("test", *options, *data, "--ckpt_path", str(best), "--trainer.logger", "false", cwd=tmp_path)
    assert test.returncode == 0, test.stderr[-3000:]
    report = json.loads((tmp_path / "runs" / "report" / "metrics.json").read_text())
    assert 0 <= report["test/acc"] <= 1
    per_class = (tmp_path / "runs" / "report" / "per_class.csv").read_text()
    assert all(name in per_class for name in CLASSES)

    photos = tmp_path / "new"
    shutil.copytree(root / "test" / "squares", photos)
    predict = run_caltech(
        "predict",
        *options,
        "--data",
        "ImageFolderDataModule",
        "--data.root",
        str(tmp_path / "gone"),
        "--data.predict_dir",
        str(photos),
        "--ckpt_path",
        str(best),
        "--trainer.logger",
        "false",
        cwd=tmp_path,
    )
    assert predict.returncode == 0, predict.stderr[-3000:]
    rows = (tmp_path / "runs" / "predictions.csv").read_text().splitlines()
    assert len(rows) == 1 + 3 and all(row.split(",")[1] in CLASSES for row in rows[1:])


def test_presplit_class_missing_from_train_is_refused(image_folder, tmp_path):
    root = presplit_folder(image_folder, tmp_path / "photos")
    (root / "val" / "dogs").mkdir()
    with pytest.raises(CaltechError, match="classes that .*train lacks: dogs"):
        folder_module(root, tmp_path).find_classes()


def test_what_the_data_module_knows_before_it_reads_its_folder(image_folder, tmp_path):
    """No property reads the disk: before find_classes() or setup() they say so, with the fix
    (an AttributeError too, for getattr's default), and methods do the reading."""
    dm = data_module(image_folder, tmp_path)
    with pytest.raises(NotReadYetError, match=r"not read its classes yet. Fix: call find_classes\(\)"):
        dm.class_names
    assert getattr(dm, "train_set", None) is None and not hasattr(dm, "num_classes")
    assert dm.find_classes() == dm.class_names == sorted(CLASSES) and dm.num_classes == 3
    with pytest.raises(NotReadYetError, match=r"not made its test set yet. Fix: call setup\('fit'\)"):
        dm.test_set
    assert re.fullmatch(r"[0-9a-f]{12}", dm.split_fingerprint()) and len(dm.train_set) == 19
    assert (dm.cache_dir, dm.cache_views) == (tmp_path / "feature-cache", 0)


@pytest.mark.e2e
def test_a_checkpoint_never_scores_the_images_it_trained_on(trained_run, tmp_path):
    """The checkpoint keeps its split's training images (as keys): a test or a validation whose
    split differs (another seed) and would score some of them is refused, and so is resuming a
    fit on another split; the same split tests as before."""
    common = [*small_run(trained_run.root, trained_run.source), "--trainer.default_root_dir", str(tmp_path / "runs")]
    for command, checkpoint, says in [
        ("test", trained_run.best, "test images are training images of the checkpoint"),
        ("validate", trained_run.best, "val images are training images of the checkpoint"),
        ("fit", next(trained_run.runs.rglob("last.ckpt")), "resumed, it would validate on images it trained on"),
    ]:
        refused = run_caltech(command, *common, "--data.seed", "7", "--ckpt_path", str(checkpoint), cwd=tmp_path)
        assert refused.returncode == 2 and says in refused.stderr.splitlines()[-1], refused.stderr[-3000:]
    tested = run_caltech("test", *common, "--ckpt_path", str(trained_run.best), cwd=tmp_path)
    assert tested.returncode == 0, tested.stderr[-3000:]
