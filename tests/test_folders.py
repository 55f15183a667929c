"""folders: classes, files judged by content, the split; what a classifier cannot learn is refused by name."""

from __future__ import annotations

import logging
import os
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from caltech_cli.errors import CaltechError
from caltech_cli.folders import apportion, stratified_split

from conftest import FOLDER, caltech, damaged_png, data_module, one_error, options, run_caltech


def test_images_are_judged_by_content(image_folder, tmp_path):
    dm = data_module(image_folder, tmp_path)
    dm.setup("fit")
    files = {p.relative_to(image_folder).as_posix() for s in (dm.train_set, dm.val_set, dm.test_set) for p in s.files}
    assert "squares/tmp" in files, "a JPEG without extension is an image"
    assert "stripes/README.txt" not in files, "a text file is not"
    assert len(files) == 3 * 12 + 2


def test_split_is_deterministic_disjoint_and_complete(image_folder, tmp_path):
    def splits(seed: int) -> list[list[Path]]:
        dm = data_module(image_folder, tmp_path, seed=seed)
        dm.setup("fit")
        return [list(s.files) for s in (dm.train_set, dm.val_set, dm.test_set)]

    first, again, other = splits(1), splits(1), splits(2)
    assert first == again
    assert first != other
    everything = [p for part in first for p in part]
    assert len(everything) == len(set(everything)) == 38
    assert [len(p) for p in first] == [19, 10, 9]


def test_split_is_stratified():
    labels = [0] * 100 + [1] * 50 + [2] * 10
    train, val, test = stratified_split(labels, (70, 10, 20), seed=0)
    for part, share in ((train, 0.7), (val, 0.1), (test, 0.2)):
        counts = Counter(labels[i] for i in part)
        for label, total in Counter(labels).items():
            assert abs(counts[label] - share * total) <= 1, (label, counts[label], share * total)


def test_apportion_adds_up_exactly():
    assert apportion(9145, (6500, 1000, 1645)) == [6500, 1000, 1645]
    assert apportion(38, (50, 25, 25)) == [19, 10, 9]
    assert sum(apportion(101, (1, 1, 1))) == 101


def test_unknown_class_is_refused(image_folder, tmp_path):
    dm = data_module(image_folder, tmp_path, classes=["circles", "planes"])
    with pytest.raises(CaltechError, match="planes"):
        dm.find_classes()


def test_class_subset(image_folder, tmp_path):
    dm = data_module(image_folder, tmp_path, classes=["stripes", "circles"])
    dm.setup("fit")
    assert dm.find_classes() == ["circles", "stripes"]
    assert set(dm.train_set.labels) == {0, 1}


def bad_images_folder(root: Path) -> Path:
    """A Caltech-like folder with good images in unusual formats and bad files named as images."""
    rng = np.random.default_rng(5)
    top = root / FOLDER
    for kind in ("circles", "squares"):
        (top / kind).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(top / kind / f"{i}.jpg")
    odd = top / "circles"
    Image.new("CMYK", (30, 30), (10, 20, 30, 40)).save(odd / "cmyk.jpg")
    Image.fromarray(np.full((30, 30), 40000, dtype=np.uint16)).save(odd / "sixteen_bit.png")
    Image.new("P", (30, 30), 3).save(odd / "palette.png", transparency=3)
    frames = [Image.new("RGB", (30, 30), c) for c in ((255, 0, 0), (0, 255, 0))]
    frames[0].save(odd / "animated.gif", save_all=True, append_images=frames[1:])
    rotated = Image.new("RGB", (30, 20))
    exif = rotated.getexif()
    exif[0x0112] = 8
    rotated.save(odd / "rotated.jpg", exif=exif)
    whole = (top / "squares" / "0.jpg").read_bytes()
    (top / "squares" / "truncated.jpg").write_bytes(whole[: len(whole) // 2])
    (top / "squares" / "empty.jpg").write_bytes(b"")
    (top / "squares" / "text.jpg").write_text("not a photo")
    (top / "squares" / "notes.txt").write_text("ignored: not named as an image")
    return top


def test_bad_images_stop_before_training_with_reasons(tmp_path):
    top = bad_images_folder(tmp_path)
    dm = data_module(top, tmp_path)
    with pytest.raises(CaltechError) as error:
        dm.setup("fit")
    message = str(error.value)
    assert "3 image files" in message and "--data.skip_bad_images true" in message
    assert f"{top / 'squares' / 'truncated.jpg'}: truncated JPEG" in message
    assert f"{top / 'squares' / 'empty.jpg'}: empty file" in message
    assert f"{top / 'squares' / 'text.jpg'}: not an image" in message
    assert "notes.txt" not in message and "cmyk" not in message


def test_bad_images_can_be_skipped_and_odd_formats_load(tmp_path):
    top = bad_images_folder(tmp_path)
    dm = data_module(top, tmp_path, skip_bad_images=True, split=(1, 1, 1))
    dm.setup("fit")
    everything = [dm.train_set, dm.val_set, dm.test_set]
    names = {p.name for s in everything for p in s.files}
    assert names == {f"{i}.jpg" for i in range(6)} | {
        "cmyk.jpg",
        "sixteen_bit.png",
        "palette.png",
        "animated.gif",
        "rotated.jpg",
    }
    for part in everything:
        for i in range(len(part)):
            assert part[i][0].shape == (3, 32, 32)


def test_decompression_bomb_is_listed(tmp_path, monkeypatch):
    top = bad_images_folder(tmp_path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 30x30 and larger are now "bombs"
    with pytest.raises(CaltechError, match="decompression-bomb"):
        data_module(top, tmp_path).setup("fit")


def test_damage_the_end_does_not_show_is_listed_by_the_scan(tmp_path):
    """A PNG damaged in the middle fails its checksums; a BMP (no end marker) is decoded."""
    top = bad_images_folder(tmp_path)
    damaged_png(top / "circles" / "damaged.png", checksum_intact=False)
    Image.new("RGB", (40, 40), (1, 2, 3)).save(top / "circles" / "short.bmp")
    whole = (top / "circles" / "short.bmp").read_bytes()
    (top / "circles" / "short.bmp").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(CaltechError) as error:
        data_module(top, tmp_path).setup("fit")
    assert f"{top / 'circles' / 'damaged.png'}: damaged PNG" in str(error.value)
    assert f"{top / 'circles' / 'short.bmp'}: damaged BMP" in str(error.value)


def test_links_out_of_a_folder_used_in_place_are_not_followed(image_folder, tmp_path, caplog):
    host_image = tmp_path / "elsewhere" / "private.jpg"
    host_image.parent.mkdir()
    shutil.copy(image_folder / "circles" / "image_0001.jpg", host_image)
    top = tmp_path / "copy" / FOLDER
    shutil.copytree(image_folder, top)
    (top / "circles" / "private.jpg").symlink_to(host_image)
    (top / "circles" / "again.jpg").symlink_to(top / "squares" / "image_0002.jpg")
    dm = data_module(top, tmp_path)
    with caplog.at_level(logging.INFO, logger="caltech_cli"):
        dm.setup("fit")
    used = [p for s in (dm.train_set, dm.val_set, dm.test_set) for p in s.files]
    assert top / "circles" / "again.jpg" in used, "a link inside the folder is followed"
    assert all(p.resolve().is_relative_to(top.resolve()) for p in used)
    assert "Not following 1 symbolic links that lead outside" in caplog.text and "private.jpg" in caplog.text


def copy_of(image_folder: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "images" / FOLDER
    shutil.copytree(image_folder, folder)
    return folder


@pytest.mark.hostile
def test_one_class_is_refused(image_folder, tmp_path, capsys):
    folder = tmp_path / "one"
    shutil.copytree(image_folder / "circles", folder / "circles")
    assert "has one class (circles)" in one_error(*caltech("fit", *options(tmp_path, folder), capsys=capsys))
    subset = options(tmp_path, image_folder, "--data.classes", "[squares]")
    assert "data.classes keeps one class (squares)" in one_error(*caltech("fit", *subset, capsys=capsys))


@pytest.mark.hostile
def test_class_folder_without_images_is_refused_by_name(image_folder, tmp_path, capsys):
    folder = copy_of(image_folder, tmp_path)
    (folder / "triangles").mkdir()
    (folder / "triangles" / "notes.txt").write_text("to do: draw triangles\n")
    line = one_error(*caltech("fit", *options(tmp_path, folder), capsys=capsys))
    assert "hold no usable images: triangles" in line and "head for classes that never occur" in line


@pytest.mark.e2e
@pytest.mark.hostile
def test_gitkeep_readme_and_names_that_are_not_utf8_do_not_stop_fit(image_folder, tmp_path):
    folder = copy_of(image_folder, tmp_path)
    (folder / "circles" / ".gitkeep").touch()
    (folder / "squares" / "README").touch()
    circles = os.fsencode(folder / "circles")
    shutil.copy(circles + b"/image_0001.jpg", circles + b"/caf\xe9.jpg")
    result = run_caltech("fit", *options(tmp_path, folder), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "circles/.gitkeep" in result.stderr and "squares/README" in result.stderr, "listed as not images"
    assert f"{3 * 12 + 3} images in 3 classes" in result.stderr, "the file with the odd name is trained on"


@pytest.mark.hostile
def test_class_folder_name_that_is_not_utf8_is_refused(image_folder, tmp_path, capsys):
    folder = copy_of(image_folder, tmp_path)
    os.rename(os.fsencode(folder / "stripes"), os.fsencode(folder) + b"/str\xffipes")
    line = one_error(*caltech("fit", *options(tmp_path, folder), capsys=capsys))
    assert "str\\xffipes" in line and "not valid UTF-8" in line


@pytest.mark.hostile
def test_a_class_named_twice_is_refused_by_name(image_folder, tmp_path):
    """Two labels for one folder would put every image of it under both, in train and test alike."""
    with pytest.raises(CaltechError, match="data.classes names circles more than once"):
        data_module(image_folder, tmp_path, classes=["circles", "squares", "circles"]).find_classes()


@pytest.mark.hostile
def test_a_folder_tree_too_deep_is_one_line(image_folder, tmp_path, deep_folder):
    """Python's own walks recurse and fail about a thousand folders down, with a traceback."""
    top = tmp_path / "copy" / FOLDER
    shutil.copytree(image_folder, top)
    shutil.copy(image_folder / "circles" / "image_0001.jpg", deep_folder(top / "circles", 1100) / "deep.jpg")
    with pytest.raises(CaltechError, match="nested more than 64 deep"):
        data_module(top, tmp_path).setup("fit")
