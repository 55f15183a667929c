"""images: decoding as upright RGB in any mode, and files that fail to decode."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, UnidentifiedImageError

from caltech_cli.errors import CaltechError
from caltech_cli.images import LabelledImages, UnlabelledImages, image_problem, images_to_predict, load_rgb, to_rgb
from caltech_cli.metrics import LEFT_OUT
from caltech_cli.transforms import eval_transform

from conftest import SMALL, damaged_png, data_module, within


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


def test_image_that_fails_in_a_worker_is_named(image_folder, tmp_path):
    dm = data_module(image_folder, tmp_path)
    dm.setup("fit")
    victim = tmp_path / "gone.jpg"
    dataset = type(dm.train_set)([victim], [0], dm.train_set.transform)
    with pytest.raises(CaltechError, match="cannot read image .*gone.jpg"):
        dataset[0]


@pytest.mark.hostile
def test_image_that_fails_after_the_scan_is_left_out_with_the_option(tmp_path):
    """A PNG whose checksums were made to fit passes the scan; decoding it fails. With the option
    it is left out (a blank image labelled LEFT_OUT, which no loss or metric counts), and no other
    image stands in for it."""
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
    assert label == LEFT_OUT and image.shape == skipping[0][0].shape
    assert not any(torch.equal(image, skipping[i][0]) for i in (0, 2, 3)), "no image stands in for it"
    fresh = LabelledImages(files, labels, eval_transform(SMALL), skip_bad=True)
    loader = torch.utils.data.DataLoader(fresh, batch_size=2, num_workers=2)
    assert [label for _, batch_labels in loader for label in batch_labels.tolist()] == [0, LEFT_OUT, 1, 0]
    assert fresh.skipped() == [bad], "what loader workers found is known to the main process"


@pytest.mark.hostile
def test_images_that_cost_more_than_they_are_worth_are_refused_before_decoding(tmp_path):
    """A 1 x 400,000 PNG of a few hundred bytes takes gigabytes once its short side is resized; a
    10,000 x 10,000 1-bit PNG of 12 KB as much decoded. Each is an error row of predict, the other
    photos are predicted, and the scan lists both before training."""
    thin, huge, fine = tmp_path / "thin.png", tmp_path / "huge.png", tmp_path / "fine.png"
    Image.new("L", (400_000, 1)).save(thin)
    Image.new("1", (10_000, 10_000)).save(huge)
    Image.new("RGB", (60, 40), (9, 9, 9)).save(fine)
    assert thin.stat().st_size < 1000 and huge.stat().st_size < 20_000
    assert "too thin" in image_problem(thin) and "decompression-bomb" in image_problem(huge)
    images = UnlabelledImages([thin, huge, fine], eval_transform(SMALL), SMALL.crop_size, SMALL.resize_size)
    with within(20):
        rows = [images[i] for i in range(3)]
    assert "too thin" in rows[0][2] and "decompression-bomb" in rows[1][2] and rows[2][2] == ""
    assert rows[2][0].shape == (3, 32, 32)


@pytest.mark.hostile
def test_formats_outside_the_list_are_not_images_whatever_their_name(tmp_path):
    """PIL would open an EPS file by handing it to Ghostscript (and an ICNS, a PSD, ... with readers
    few photos need); named .jpg, it is still not an image, and no other program runs."""
    eps, tga = tmp_path / "photo.jpg", tmp_path / "photo.png"
    eps.write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n")
    Image.new("RGB", (40, 40)).save(tga, format="TGA")
    for path in (eps, tga):
        assert image_problem(path) == "not an image"
        with pytest.raises(UnidentifiedImageError):
            load_rgb(path)


@pytest.mark.hostile
def test_a_predict_folder_too_deep_is_one_line(tmp_path, deep_folder):
    Image.new("RGB", (40, 40)).save(deep_folder(tmp_path / "photos", 1100) / "x.jpg")
    with pytest.raises(CaltechError, match="nested more than 64 deep"):
        images_to_predict(str(tmp_path / "photos"))
