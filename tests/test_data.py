"""Data module: getting the data, classes, split, transforms, RGB."""

from __future__ import annotations

import logging
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CLASSES, FOLDER, damaged_png
from PIL import Image

from caltech_cli import sources
from caltech_cli.backbones import Preprocessing
from caltech_cli.data import Caltech101DataModule
from caltech_cli.errors import CaltechError
from caltech_cli.images import (
    LabelledImages,
    apportion,
    eval_transform,
    image_problem,
    load_rgb,
    stratified_split,
    to_rgb,
    train_transform,
)

SMALL = Preprocessing(crop_size=32, resize_size=36)


def module(source: Path | str, data_dir: Path, **kwargs) -> Caltech101DataModule:
    kwargs.setdefault("split", (50, 25, 25))
    return Caltech101DataModule(str(source), str(data_dir), num_workers=0, preprocessing=SMALL, **kwargs)


@pytest.fixture
def count_extractions(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record every archive that is extracted."""
    calls: list[str] = []
    real = sources.unpack

    def spy(archive: Path, *args):
        calls.append(archive.name)
        return real(archive, *args)

    monkeypatch.setattr(sources, "unpack", spy)
    return calls


def test_prepare_from_local_archive_once(tar_archive, tmp_path, count_extractions, caplog):
    dm = module(tar_archive, tmp_path / "data")
    dm.prepare_data()
    assert sorted(p.name for p in (tmp_path / "data" / FOLDER).iterdir()) == sorted(CLASSES)
    assert count_extractions == [tar_archive.name]
    again = module(tar_archive, tmp_path / "data")
    with caplog.at_level(logging.INFO, logger="caltech_cli"):
        again.prepare_data()
    assert count_extractions == [tar_archive.name], "a second prepare_data must not extract again"
    assert "already extracted" in caplog.text
    assert not list((tmp_path / "data").glob(".extracting-*")), "scratch folders must be cleaned up"


def test_prepare_from_file_url_downloads_then_extracts(tar_archive, tmp_path):
    dm = module(tar_archive.as_uri(), tmp_path / "data")
    dm.prepare_data()
    downloaded = tmp_path / "data" / tar_archive.name
    assert downloaded.read_bytes() == tar_archive.read_bytes()
    assert not list((tmp_path / "data").glob("*.part"))
    assert dm.class_names == sorted(CLASSES)


def test_download_with_wrong_checksum_leaves_nothing(tar_archive, tmp_path):
    dm = module(tar_archive.as_uri(), tmp_path / "data", checksum="sha256:" + "0" * 64)
    with pytest.raises(CaltechError, match="checksum"):
        dm.prepare_data()
    assert not list((tmp_path / "data").glob(f"*{tar_archive.name}*")), "no partial or bad file may stay"
    assert not (tmp_path / "data" / FOLDER).exists()


def test_download_checksum_is_verified_when_right(tar_archive, tmp_path):
    digest = sources.hashlib.sha256(tar_archive.read_bytes()).hexdigest()
    dm = module(tar_archive.as_uri(), tmp_path / "data", checksum=f"sha256:{digest}")
    dm.prepare_data()
    assert dm.num_classes == len(CLASSES)


def test_prepare_finds_folder_inside_nested_archive(nested_zip, tmp_path, count_extractions):
    dm = module(nested_zip, tmp_path / "data")
    dm.prepare_data()
    assert count_extractions == [nested_zip.name, f"{FOLDER}.tar.gz"]
    assert dm.class_names == sorted(CLASSES)


def test_extracted_folder_is_used_in_place(image_folder, tmp_path):
    dm = module(image_folder.parent, tmp_path / "data")
    dm.prepare_data()
    assert dm.root == image_folder
    assert not (tmp_path / "data").exists(), "a folder source must not be copied"


def test_missing_source_names_it(tmp_path):
    dm = module(tmp_path / "nope.tar.gz", tmp_path / "data")
    with pytest.raises(CaltechError, match="nope.tar.gz does not exist"):
        dm.prepare_data()


def test_archive_without_the_folder_is_refused(tmp_path):
    import tarfile

    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "a.txt").write_text("x")
    archive = tmp_path / "other.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "other", arcname="other")
    with pytest.raises(CaltechError, match=f"no folder named {FOLDER}"):
        module(archive, tmp_path / "data").prepare_data()
    assert not (tmp_path / "data" / FOLDER).exists()


def test_images_are_judged_by_content(image_folder, tmp_path):
    dm = module(image_folder, tmp_path)
    dm.setup("fit")
    files = {p.relative_to(image_folder).as_posix() for s in (dm.train_set, dm.val_set, dm.test_set) for p in s.files}
    assert "squares/tmp" in files, "a JPEG without extension is an image"
    assert "stripes/README.txt" not in files, "a text file is not"
    assert len(files) == 3 * 12 + 2


def test_split_is_deterministic_disjoint_and_complete(image_folder, tmp_path):
    def splits(seed: int) -> list[list[Path]]:
        dm = module(image_folder, tmp_path, seed=seed)
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
    dm = module(image_folder, tmp_path, classes=["circles", "planes"])
    with pytest.raises(CaltechError, match="planes"):
        dm.class_names


def test_class_subset(image_folder, tmp_path):
    dm = module(image_folder, tmp_path, classes=["stripes", "circles"])
    dm.setup("fit")
    assert dm.class_names == ["circles", "stripes"]
    assert set(dm.train_set.labels) == {0, 1}


def test_each_split_has_its_own_transform(image_folder, tmp_path):
    dm = module(image_folder, tmp_path)
    dm.setup("fit")
    image_train_a, _ = dm.train_set[0]
    torch.manual_seed(0)
    views = {tuple(dm.train_set[0][0].flatten()[:50].tolist()) for _ in range(5)}
    assert len(views) > 1, "training images are augmented"
    val_a, val_b = dm.val_set[0][0], dm.val_set[0][0]
    assert torch.equal(val_a, val_b), "evaluation images are not"
    assert image_train_a.shape == val_a.shape == (3, 32, 32)
    assert dm.train_set.transform is not dm.val_set.transform


def test_normalization_comes_from_preprocessing():
    image = Image.new("RGB", (40, 40), (255, 255, 255))
    pre = Preprocessing(crop_size=32, resize_size=36, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    assert torch.allclose(eval_transform(pre)(image), torch.ones(3, 32, 32))
    assert train_transform(pre, (0.5, 1.0))(image).shape == (3, 32, 32)


def test_greyscale_file_loads_as_rgb(image_folder):
    path = image_folder / "circles" / "image_0013.jpg"
    assert Image.open(path).mode == "L"
    image = load_rgb(path)
    assert image.mode == "RGB"


@pytest.mark.parametrize(
    "image",
    [
        Image.new("L", (8, 8), 7),
        Image.new("CMYK", (8, 8), (0, 0, 0, 0)),
        Image.new("RGBA", (8, 8), (0, 0, 0, 0)),
        Image.new("LA", (8, 8), (0, 0)),
        Image.fromarray(np.full((8, 8), 65535, dtype=np.uint16)),
    ],
    ids=["L", "CMYK", "RGBA", "LA", "I16"],
)
def test_to_rgb_handles_modes(image):
    rgb = to_rgb(image)
    assert rgb.mode == "RGB" and rgb.size == (8, 8)
    if image.mode in ("RGBA", "LA"):
        assert rgb.getpixel((0, 0)) == (255, 255, 255), "transparent pixels become white"
    if image.mode == "CMYK":
        assert rgb.getpixel((0, 0)) == (255, 255, 255)
    if image.mode.startswith("I"):
        assert rgb.getpixel((0, 0)) == (255, 255, 255), "16-bit white stays white"


def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (40, 20), (200, 10, 10))
    exif = image.getexif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    image.save(tmp_path / "rotated.jpg", exif=exif)
    assert load_rgb(tmp_path / "rotated.jpg").size == (20, 40)


def test_large_jpeg_is_decoded_at_reduced_size(tmp_path):
    path = tmp_path / "big.jpg"
    Image.new("RGB", (2000, 1600), (10, 20, 30)).save(path)
    image = load_rgb(path, min_size=256)
    assert 256 <= min(image.size) < 1600


def test_predict_needs_a_folder_with_images(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CaltechError, match="holds no image files"):
        module(tmp_path, tmp_path, predict_dir=str(tmp_path / "empty")).setup("predict")
    with pytest.raises(CaltechError, match="--data.predict_dir"):
        module(tmp_path, tmp_path).setup("predict")


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
    dm = module(top, tmp_path)
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
    dm = module(top, tmp_path, skip_bad_images=True, split=(1, 1, 1))
    dm.setup("fit")
    everything = [s for s in (dm.train_set, dm.val_set, dm.test_set)]
    names = {p.name for s in everything for p in s.files}
    assert names == {f"{i}.jpg" for i in range(6)} | {"cmyk.jpg", "sixteen_bit.png", "palette.png", "animated.gif", "rotated.jpg"}
    for part in everything:
        for i in range(len(part)):
            assert part[i][0].shape == (3, 32, 32)


def test_decompression_bomb_is_listed(tmp_path, monkeypatch):
    top = bad_images_folder(tmp_path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 30x30 and larger are now "bombs"
    with pytest.raises(CaltechError, match="decompression-bomb"):
        module(top, tmp_path).setup("fit")


def test_image_that_fails_in_a_worker_is_named(image_folder, tmp_path):
    dm = module(image_folder, tmp_path)
    dm.setup("fit")
    victim = tmp_path / "gone.jpg"
    dataset = type(dm.train_set)([victim], [0], dm.train_set.transform)
    with pytest.raises(CaltechError, match="cannot read image .*gone.jpg"):
        dataset[0]


def test_damage_the_end_does_not_show_is_listed_by_the_scan(tmp_path):
    """A PNG damaged in the middle fails its checksums; a BMP (no end marker) is decoded."""
    top = bad_images_folder(tmp_path)
    damaged_png(top / "circles" / "damaged.png", checksum_intact=False)
    Image.new("RGB", (40, 40), (1, 2, 3)).save(top / "circles" / "short.bmp")
    whole = (top / "circles" / "short.bmp").read_bytes()
    (top / "circles" / "short.bmp").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(CaltechError) as error:
        module(top, tmp_path).setup("fit")
    assert f"{top / 'circles' / 'damaged.png'}: damaged PNG" in str(error.value)
    assert f"{top / 'circles' / 'short.bmp'}: damaged BMP" in str(error.value)


def test_image_that_fails_after_the_scan_is_skipped_with_the_option(tmp_path):
    """A PNG whose checksums were made to fit passes the scan; decoding it fails."""
    good = [tmp_path / f"{i}.png" for i in range(3)]
    for i, path in enumerate(good):
        Image.new("RGB", (40, 40), (80 * i, 20, 30)).save(path)
    bad = damaged_png(tmp_path / "bad.png", checksum_intact=True)
    assert image_problem(bad) is None
    files, labels = [good[0], bad, good[1], good[2]], [0, 0, 1, 0]

    strict = LabelledImages(files, labels, eval_transform(SMALL))
    with pytest.raises(CaltechError, match=r"cannot read image .*bad\.png.*--data\.skip_bad_images true"):
        strict[1]

    skipping = LabelledImages(files, labels, eval_transform(SMALL), skip_bad=True)
    image, label = skipping[1]
    assert label == 0 and torch.equal(image, skipping[3][0]), "the next image of its class stands in"
    fresh = LabelledImages(files, labels, eval_transform(SMALL), skip_bad=True)
    loader = torch.utils.data.DataLoader(fresh, batch_size=2, num_workers=2)
    assert sum(len(batch_labels) for _, batch_labels in loader) == 4
    assert fresh.skipped() == [bad], "what loader workers found is known to the main process"

    alone = LabelledImages([bad, good[0]], [0, 1], eval_transform(SMALL), skip_bad=True)
    with pytest.raises(CaltechError, match="no image labelled 0 can be read"):
        alone[0]


def test_links_out_of_a_folder_used_in_place_are_not_followed(image_folder, tmp_path, caplog):
    host_image = tmp_path / "elsewhere" / "private.jpg"
    host_image.parent.mkdir()
    shutil.copy(image_folder / "circles" / "image_0001.jpg", host_image)
    top = tmp_path / "copy" / FOLDER
    shutil.copytree(image_folder, top)
    (top / "circles" / "private.jpg").symlink_to(host_image)
    (top / "circles" / "again.jpg").symlink_to(top / "squares" / "image_0002.jpg")
    dm = module(top, tmp_path)
    with caplog.at_level(logging.INFO, logger="caltech_cli"):
        dm.setup("fit")
    used = [p for s in (dm.train_set, dm.val_set, dm.test_set) for p in s.files]
    assert top / "circles" / "again.jpg" in used, "a link inside the folder is followed"
    assert all(p.resolve().is_relative_to(top.resolve()) for p in used)
    assert "Not following 1 symbolic links that lead outside" in caplog.text and "private.jpg" in caplog.text
