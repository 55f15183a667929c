"""Small generated image data sets in Caltech-101's layout, and helpers to run the real CLI."""

from __future__ import annotations

import os
import re
import struct
import subprocess
import sys
import tarfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

FOLDER = "101_ObjectCategories"
# Three classes a network tells apart in a few steps: colour and shape differ.
CLASSES = {
    "circles": (220, 40, 40),
    "squares": (40, 200, 60),
    "stripes": (40, 60, 220),
}
PER_CLASS = 12
REPO = Path(__file__).resolve().parents[1]
TRANSFER = str(REPO / "configs" / "transfer.yaml")
SCRATCH = str(REPO / "configs" / "scratch.yaml")
REAL_ARCHIVE = REPO.parent / "shared/data/caltech101/101_ObjectCategories.tar.gz"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--real-data", action="store_true",
                     help="also run the end-to-end checks on the real Caltech-101 archive (minutes)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Checks on the real data are opt-in: the suite runs on generated images."""
    if config.getoption("--real-data"):
        return
    skip = pytest.mark.skip(reason="on the real archive: run with --real-data")
    for item in items:
        if "real_data" in item.keywords:
            item.add_marker(skip)


def draw(kind: str, rng: np.random.Generator) -> Image.Image:
    """One image of a class: its shape in its colour on a noisy background of random size."""
    w, h = (int(v) for v in rng.integers(48, 96, size=2))
    noise = rng.integers(90, 160, size=(h, w, 3), dtype=np.uint8)
    image = Image.fromarray(noise)
    pen = ImageDraw.Draw(image)
    colour = tuple(int(np.clip(c + rng.integers(-20, 20), 0, 255)) for c in CLASSES[kind])
    x0, y0 = int(rng.integers(2, w // 4)), int(rng.integers(2, h // 4))
    x1, y1 = int(w - rng.integers(2, w // 4)), int(h - rng.integers(2, h // 4))
    if kind == "circles":
        pen.ellipse((x0, y0, x1, y1), fill=colour)
    elif kind == "squares":
        pen.rectangle((x0, y0, x1, y1), fill=colour)
    else:
        for x in range(0, w, 8):
            pen.rectangle((x, 0, x + 3, h), fill=colour)
    return image


def make_caltech_like(root: Path, per_class: int = PER_CLASS, seed: int = 0) -> Path:
    """``root/101_ObjectCategories/<class>/image_NNNN.jpg``, plus the real archive's oddities:
    one greyscale JPEG, one JPEG without extension (like BACKGROUND_Google/tmp) and one text
    file that is not an image."""
    rng = np.random.default_rng(seed)
    top = root / FOLDER
    for kind in CLASSES:
        folder = top / kind
        folder.mkdir(parents=True)
        for i in range(1, per_class + 1):
            draw(kind, rng).save(folder / f"image_{i:04d}.jpg", quality=90)
    draw("circles", rng).convert("L").save(top / "circles" / f"image_{per_class + 1:04d}.jpg")
    draw("squares", rng).save(top / "squares" / "tmp", format="JPEG")
    (top / "stripes" / "README.txt").write_text("not an image\n")
    return top


def damaged_png(path: Path, checksum_intact: bool, seed: int = 0) -> Path:
    """A PNG with zeros written over the middle of its image data, its end intact: the chunk's
    checksum then fails (what a bad copy leaves), or with ``checksum_intact`` it is recomputed
    (what someone who means harm makes), and only decoding finds the damage."""
    noise = np.random.default_rng(seed).integers(0, 255, (48, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(path, format="PNG")
    data = bytearray(path.read_bytes())
    start = data.index(b"IDAT")
    length = struct.unpack(">I", data[start - 4 : start])[0]
    middle = start + 4 + length // 2
    data[middle : middle + 16] = bytes(16)
    if checksum_intact:
        data[start + 4 + length : start + 8 + length] = struct.pack(">I", zlib.crc32(data[start : start + 4 + length]))
    path.write_bytes(bytes(data))
    return path


def pack_tar_gz(folder: Path, archive: Path) -> Path:
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname=folder.name)
    return archive


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The extracted folder (``.../101_ObjectCategories``)."""
    return make_caltech_like(tmp_path_factory.mktemp("images"))


@pytest.fixture(scope="session")
def tar_archive(image_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return pack_tar_gz(image_folder, tmp_path_factory.mktemp("tar") / f"{FOLDER}.tar.gz")


@pytest.fixture(scope="session")
def nested_zip(tar_archive: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Like the official ``caltech-101.zip``: the .tar.gz inside a folder inside a zip."""
    archive = tmp_path_factory.mktemp("zip") / "caltech-101.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("caltech-101/README", "Caltech-101\n")
        zf.write(tar_archive, f"caltech-101/{FOLDER}.tar.gz")
    return archive


def run_caltech(*args: str, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run the installed ``caltech`` command in a subprocess, W&B offline, and return its result."""
    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true", PYTHONUNBUFFERED="1")
    command = [str(Path(sys.executable).with_name("caltech")), *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def printed_metrics(output: str, stage: str = "test") -> dict[str, float]:
    """The metrics table that ``caltech test`` or ``validate`` prints, as numbers."""
    pattern = rf"^\s*({stage}/\w+)\s+([0-9.e-]+)\s*$"
    return {k: float(v) for k, v in re.findall(pattern, output, re.MULTILINE)}


def small_run(root: Path, source: str, config: str = TRANSFER) -> list[str]:
    """Options that shrink a config to the generated images, with everything under ``root``."""
    return [
        "--config", config,
        "--data.source", source,
        "--data.data_dir", str(root / "data"),
        "--data.split", "[50, 25, 25]",
        "--data.batch_size", "8",
        "--data.num_workers", "0",
        "--model.image_size", "64",
        "--trainer.default_root_dir", str(root / "runs"),
    ]


@dataclass
class TrainedRun:
    """A finished small ``caltech fit`` and ``caltech test`` of the transfer config."""

    root: Path
    source: str
    fit: subprocess.CompletedProcess
    test: subprocess.CompletedProcess

    @property
    def runs(self) -> Path:
        return self.root / "runs"

    @property
    def best(self) -> Path:
        return self.runs / "best.ckpt"


@pytest.fixture(scope="session")
def trained_run(tar_archive: Path, tmp_path_factory: pytest.TempPathFactory) -> TrainedRun:
    root = tmp_path_factory.mktemp("trained")
    source = tar_archive.as_uri()
    fit = run_caltech(
        "fit", *small_run(root, source),
        "--trainer.max_epochs", "4", "--optimizer.lr", "0.01", "--lr_scheduler.T_max", "4", "--data.batch_size", "4",
        cwd=root,
    )
    assert fit.returncode == 0, fit.stderr[-3000:]
    test = run_caltech("test", *small_run(root, source), "--ckpt_path", str(root / "runs" / "best.ckpt"), cwd=root)
    assert test.returncode == 0, test.stderr[-3000:]
    return TrainedRun(root, source, fit, test)
