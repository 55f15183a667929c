"""Image files to tensors: judging them, decoding them as upright RGB, and the datasets that do it.

Pure functions and small datasets; the data module composes them.
"""

from __future__ import annotations

import importlib
import logging
import multiprocessing
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import Dataset

from caltech_cli.errors import CaltechError
from caltech_cli.files import files_under
from caltech_cli.metrics import LEFT_OUT

log = logging.getLogger(__name__)

# Extensions that `predict` looks for in a folder. Training data is judged by content instead,
# because real archives hold images without extensions (Caltech-101's BACKGROUND_Google/tmp).
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".ppm", ".pgm", ".jfif"}


# The formats decoded, PIL's names for them (its JPEG reader also reads a camera's MPO). PIL knows
# more, some of which hand the file to another program (EPS to Ghostscript): a file of any other
# format is "not an image", whatever its name.
FORMATS = ("JPEG", "PNG", "GIF", "BMP", "WEBP", "TIFF", "PPM")
# PIL registers a format when its plugin is imported; Image.open(formats=...) needs them registered.
for _plugin in ("Bmp", "Gif", "Jpeg", "Png", "Ppm", "Tiff", "WebP"):
    importlib.import_module(f"PIL.{_plugin}ImagePlugin")
NOT_AN_IMAGE = "not an image"
# What opening or decoding a bad image file raises (PIL's bomb error is none of the others).
UNREADABLE = (OSError, ValueError, SyntaxError, EOFError, struct.error, Image.DecompressionBombError)
# Pixels an image may hold once its short side is resized for the backbone: a sliver of 1 x 400,000
# pixels, 128 bytes as a PNG, would take gigabytes there (2**25 pixels is 100 MB as RGB).
MAX_RESIZED_PIXELS = 1 << 25
# The short side the scan judges an image's shape by: the smallest resize of the usual preprocessing.
SCAN_SHORT_SIDE = 224
# The bytes an intact file of these formats ends with (allowing some trailing padding).
END_MARKERS = {"JPEG": b"\xff\xd9", "PNG": b"IEND\xaeB`\x82"}


def _ends_intact(path: Path, marker: bytes) -> bool:
    with open(path, "rb") as f:
        f.seek(max(0, path.stat().st_size - 64))
        return marker in f.read()


def size_problem(size: tuple[int, int], short_side: int | None = None) -> str | None:
    """Why an image of ``size`` (width, height) costs more than it is worth, or None: over PIL's
    decompression-bomb limit (``Image.MAX_IMAGE_PIXELS``, which PIL itself only warns about below
    twice its value), or, with its short side resized to ``short_side``, over
    :data:`MAX_RESIZED_PIXELS`."""
    width, height = size
    limit = Image.MAX_IMAGE_PIXELS
    if limit and width * height > limit:
        return f"{width} x {height} pixels, over PIL's decompression-bomb limit of {limit:,}"
    if short_side and min(width, height) and short_side**2 * max(size) / min(size) > MAX_RESIZED_PIXELS:
        return (
            f"{width} x {height} pixels, too thin: resized to a short side of {short_side} it would be over "
            f"{MAX_RESIZED_PIXELS:,}"
        )
    return None


def image_problem(path: Path) -> str | None:
    """Why ``path`` cannot be used as an image, or None when it can.

    Judged from the header (format, size, PIL's decompression-bomb limit); for JPEG and PNG
    also from the end of the file, which a truncated download or copy lacks; for PNG from the
    checksum of every chunk, which data damaged in the middle fails (no decoding needed); and
    other formats, which have no such cheap check, are decoded. Cheap enough to run over every
    file of a data set before training starts: a JPEG, nearly every photo, is not decoded.
    """
    try:
        if path.stat().st_size == 0:
            return "empty file"
        with Image.open(path, formats=FORMATS) as image:
            kind, size = image.format, image.size
    except Image.DecompressionBombError as error:
        return f"over PIL's decompression-bomb limit ({error})"
    except UnidentifiedImageError:
        return NOT_AN_IMAGE
    except (OSError, ValueError, SyntaxError) as error:
        return f"unreadable ({error})"
    problem = size_problem(size, SCAN_SHORT_SIDE)
    if problem is not None:
        return problem
    if kind in END_MARKERS and not _ends_intact(path, END_MARKERS[kind]):
        return f"truncated {kind} (its end is missing)"
    if kind != "JPEG":
        try:
            with Image.open(path, formats=FORMATS) as image:
                if kind == "PNG":
                    image.verify()
                else:
                    image.load()
        except UNREADABLE as error:
            return f"damaged {kind} ({error})"
    return None


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB the way a person would expect it to look.

    Transparent pixels become white (not black), 16-bit greyscale is scaled rather than
    clipped, CMYK and palettes are converted.
    """
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        high = array.max() if array.size and array.max() > 255 else 255.0
        image = Image.fromarray((array / high * 255).clip(0, 255).astype(np.uint8), mode="L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def load_rgb(path: Path, min_size: int | None = None) -> Image.Image:
    """Open an image as upright RGB.

    With ``min_size`` a JPEG is decoded at a reduced scale (PIL's ``draft``) that still keeps
    both sides at least ``min_size``: large photos then cost a fraction of a full decode. An image
    that would cost more than it is worth decoded, or resized to ``min_size`` (``size_problem``),
    is refused before it is decoded.
    """
    with Image.open(path, formats=FORMATS) as image:
        if min_size is not None and image.format == "JPEG":
            image.draft(image.mode, (min_size, min_size))
        problem = size_problem(image.size, min_size)
        if problem is not None:
            raise Image.DecompressionBombError(problem)
        image = ImageOps.exif_transpose(image)
        return to_rgb(image)


def find_images(folder: Path) -> list[Path]:
    """Image files (by extension) under ``folder``, recursively and sorted; a file is itself."""
    if folder.is_file():
        return [folder]
    return [path for path in files_under(folder) if path.suffix.lower() in IMAGE_EXTENSIONS]


def images_to_predict(predict_dir: str | None) -> list[Path]:
    """The image files ``predict`` runs on (``data.predict_dir``), refused in one line when there are none."""
    if predict_dir is None:
        raise CaltechError("predict needs images. Fix: pass --data.predict_dir <folder or image>.")
    folder = Path(predict_dir)
    if not folder.exists():
        raise CaltechError(f"data.predict_dir {folder} does not exist. Fix: pass a folder of images or one image.")
    files = find_images(folder)
    if not files:
        raise CaltechError(
            f"data.predict_dir {folder} holds no image files. Fix: pass a folder with images in it (searched "
            "recursively, by extension), or one image."
        )
    return files


@dataclass
class LabelledImages(Dataset):
    """Image files with class indices, each split with its own transform.

    The scan before training catches nearly every bad file, not all (a PNG whose data is damaged
    under intact checksums, a file changed since). Without ``skip_bad`` such a file stops the run
    with its name. With it, the file is left out: its item is a blank image labelled
    :data:`LEFT_OUT`, which the loss and every metric ignore (``ignore_index``), so it counts in
    nothing and no other image is counted in its place; batches, cached features and reports stay
    aligned with ``files``, and :meth:`skipped` names it afterwards. ``failed`` holds a flag per
    file in shared memory, which loader workers inherit, so their findings reach the main process.
    """

    files: Sequence[Path]
    labels: Sequence[int]
    transform: Callable
    min_size: int | None = None
    skip_bad: bool = False
    failed: Any = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.failed is None:
            self.failed = multiprocessing.RawArray("b", max(len(self.files), 1))

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = None if self.failed[index] else self._load(index)
        if image is None:  # left out: a blank image of the transform's shape, in no metric
            return self.transform(Image.new("RGB", (self.min_size or 32,) * 2)), LEFT_OUT
        return self.transform(image), self.labels[index]

    def _load(self, index: int) -> Image.Image | None:
        """The image at ``index``; None when it cannot be read and bad images are skipped."""
        try:
            return load_rgb(self.files[index], self.min_size)
        except UNREADABLE as error:
            if not self.skip_bad:
                raise CaltechError(
                    f"cannot read image {self.files[index]}: {error}. Fix: remove or replace it, or pass "
                    "--data.skip_bad_images true to leave such files out."
                ) from error
            if not self.failed[index]:
                log.warning(
                    "Leaving out %s, which cannot be read (%s): it counts in no metric", self.files[index], error
                )
            self.failed[index] = 1
            return None

    def skipped(self) -> list[Path]:
        """The files left out so far because they could not be read, in any process."""
        return [path for path, failed in zip(self.files, self.failed) if failed]


@dataclass
class UnlabelledImages(Dataset):
    """Images to predict. An unreadable file yields a blank tensor and its error, not an exception,
    so one bad photo among thousands costs one error row instead of the whole run."""

    files: Sequence[Path]
    transform: Callable
    crop_size: int
    min_size: int | None = None
    views: int = 1  # the transform's views of each image (``transforms.FlipViews``: 2)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, str]:
        try:
            return self.transform(load_rgb(self.files[index], self.min_size)), index, ""
        except UNREADABLE as error:
            blank = torch.zeros(3, self.crop_size, self.crop_size)
            blank = blank.expand(self.views, -1, -1, -1).clone() if self.views > 1 else blank
            return blank, index, f"{type(error).__name__}: {error}"
