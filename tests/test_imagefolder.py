"""Any image folder: one sub-folder per class, or already split into train/, val/ and test/."""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

import pytest
import torch

from caltech_cli.data import ImageFolderDataModule
from caltech_cli.errors import CaltechError
from conftest import CLASSES, run_caltech, small_run


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


def module(root: Path | str, tmp_path: Path, **kwargs) -> ImageFolderDataModule:
    return ImageFolderDataModule(str(root), data_dir=str(tmp_path / "data"), num_workers=0, **kwargs)


def test_class_folders_are_split_like_caltech(image_folder, tmp_path):
    dm = module(image_folder, tmp_path, split=(50, 25, 25))
    assert dm.root == image_folder and dm.presplit is None
    assert dm.class_names == sorted(CLASSES)
    sizes = [len(dm.train_set), len(dm.val_set), len(dm.test_set)]
    assert sum(sizes) == 38 and min(sizes) > 0


@pytest.mark.parametrize("val_name", ["val", "valid", "validation"])
def test_presplit_folder_keeps_its_split(image_folder, tmp_path, val_name):
    root = presplit_folder(image_folder, tmp_path / "photos", val_name)
    dm = module(root, tmp_path, split=(98, 1, 1))
    assert dm.class_names == sorted(CLASSES)
    assert [len(dm.train_set), len(dm.val_set), len(dm.test_set)] == [18, 9, 9], "data.split is not used"
    assert all(p.parent.parent.name == "train" for p in dm.train_set.files)
    assert {p.parent.parent.name for p in dm.val_set.files} == {val_name}
    labels = {p.parent.name: label for p, label in zip(dm.test_set.files, dm.test_set.labels)}
    assert labels == {name: dm.class_names.index(name) for name in CLASSES}


def test_presplit_without_test_folder_trains_and_says_what_test_needs(image_folder, tmp_path):
    dm = module(presplit_folder(image_folder, tmp_path / "photos", with_test=False), tmp_path)
    assert len(dm.train_set) == 18 and len(dm.val_set) == 9
    with pytest.raises(CaltechError, match="no test/ folder"):
        dm.test_set


def test_presplit_class_missing_from_train_is_refused(image_folder, tmp_path):
    root = presplit_folder(image_folder, tmp_path / "photos")
    (root / "val" / "dogs").mkdir()
    with pytest.raises(CaltechError, match="classes that .*train lacks: dogs"):
        module(root, tmp_path).class_names


def test_archive_with_a_wrapper_folder(image_folder, tmp_path):
    archive = tmp_path / "my_photos.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in image_folder.rglob("*"):
            if path.is_file():
                zf.write(path, f"export-2026/photos/{path.relative_to(image_folder)}")
    dm = module(archive, tmp_path, split=(50, 25, 25))
    assert dm.class_names == sorted(CLASSES)
    assert dm.root == tmp_path / "data" / "my_photos"
    assert len(dm.train_set) + len(dm.val_set) + len(dm.test_set) == 38


def test_options_of_the_base_show_in_help(tmp_path):
    result = run_caltech("fit", "--data.help", "ImageFolderDataModule", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    for option in ("--data.root", "--data.batch_size", "--data.cache_features", "--data.predict_dir"):
        assert option in result.stdout
    assert "--data.source" not in result.stdout, "root replaces source"


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
    predict = run_caltech("predict", *options, "--data", "ImageFolderDataModule", "--data.root", str(tmp_path / "gone"),
                          "--data.predict_dir", str(photos), "--ckpt_path", str(best), "--trainer.logger", "false",
                          cwd=tmp_path)
    assert predict.returncode == 0, predict.stderr[-3000:]
    rows = (tmp_path / "runs" / "predictions.csv").read_text().splitlines()
    assert len(rows) == 1 + 3 and all(row.split(",")[1] in CLASSES for row in rows[1:])
