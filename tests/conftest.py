"""Small generated image data sets in Caltech-101's layout, hostile files built at test time, and
helpers to run the real CLI.

Markers: ``e2e`` for tests that drive the ``caltech`` command in a subprocess (a test that uses
:func:`run_caltech` or the ``trained_run`` fixture must carry it, and ``run_caltech`` checks that
it does), so ``pytest -m "not e2e"`` is the fast loop; ``hostile`` for tests of hostile or clumsy
inputs; ``real_data`` for the opt-in checks on the real archive (``--real-data``).
"""

from __future__ import annotations

import csv
import errno
import http.server
import io
import logging
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import tarfile
import threading
import time
import urllib.request
import zipfile
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from PIL import Image, ImageDraw

from caltech_cli.backbones import preprocessing_for
from caltech_cli.cli import main
from caltech_cli.data import Caltech101DataModule
from caltech_cli.files import remove_tree
from caltech_cli.sources import extract
from caltech_cli.transforms import Preprocessing

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
FINETUNE = str(REPO / "configs" / "finetune.yaml")
PARTIAL = str(REPO / "configs" / "partial.yaml")
# A config and a checkpoint written by caltech 0.1.0 (tiny: timm's test ConvNeXt); see its README.
FIXTURE = Path(__file__).parent / "fixtures" / "v0.1.0"
REAL_ARCHIVE = REPO.parent / "shared/data/caltech101/101_ObjectCategories.tar.gz"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--real-data",
        action="store_true",
        help="also run the end-to-end checks on the real Caltech-101 archive (minutes)",
    )


# The tests that may start the command in a subprocess (marked e2e), by node id.
END_TO_END: set[str] = set()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """A test on the ``trained_run`` fixture is end to end; checks on the real data are opt-in
    (the suite runs on generated images)."""
    skip = pytest.mark.skip(reason="on the real archive: run with --real-data")
    for item in items:
        if "trained_run" in getattr(item, "fixturenames", ()) and "e2e" not in item.keywords:
            item.add_marker(pytest.mark.e2e)
        if "e2e" in item.keywords:
            END_TO_END.add(item.nodeid)
        if "real_data" in item.keywords and not config.getoption("--real-data"):
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
    test = os.environ.get("PYTEST_CURRENT_TEST", "").rsplit(" (", 1)[0]
    assert test in END_TO_END, f"{test} starts caltech in a subprocess: mark it @pytest.mark.e2e"
    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true", PYTHONUNBUFFERED="1")
    command = [str(Path(sys.executable).with_name("caltech")), *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def csv_rows(path: Path) -> list[dict[str, str]]:
    """The rows of a CSV file the tool wrote, by column name."""
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def printed_metrics(output: str, stage: str = "test") -> dict[str, float]:
    """The metrics table that ``caltech test`` or ``validate`` prints, as numbers."""
    pattern = rf"^\s*({stage}/\w+)\s+([0-9.e-]+)\s*$"
    return {k: float(v) for k, v in re.findall(pattern, output, re.MULTILINE)}


def small_run(root: Path, source: str, config: str = TRANSFER) -> list[str]:
    """Options that shrink a config to the generated images, with everything under ``root``."""
    return [
        "--config",
        config,
        "--data.source",
        source,
        "--data.data_dir",
        str(root / "data"),
        "--data.split",
        "[50, 25, 25]",
        "--data.batch_size",
        "8",
        "--data.num_workers",
        "0",
        "--model.image_size",
        "64",
        "--trainer.default_root_dir",
        str(root / "runs"),
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


def predicting(run: TrainedRun, tmp_path: Path, checkpoint: Path | None = None) -> list[str]:
    """``caltech predict`` with the transfer config on a folder of one of the run's images, into
    ``tmp_path/out``, with the run's checkpoint or ``checkpoint``."""
    photos = tmp_path / "photos"
    photos.mkdir(exist_ok=True)
    shutil.copy(run.root / "data" / FOLDER / "circles" / "image_0001.jpg", photos / "one.jpg")
    return [
        "predict", "--config", TRANSFER, "--ckpt_path", str(checkpoint or run.best), "--data.predict_dir", str(photos),
        "--trainer.logger", "false", "--trainer.default_root_dir", str(tmp_path / "out"),
    ]  # fmt: skip


def old_checkpoint(tmp_path: Path, command: str, *more: str) -> list[str]:
    """``caltech <command>`` with the config and checkpoint of ``FIXTURE`` (fast: a tiny model),
    writing under ``tmp_path/runs``."""
    return [
        command, "--config", str(FIXTURE / "config.yaml"), "--ckpt_path", str(FIXTURE / "best.ckpt"),
        "--data.data_dir", str(tmp_path / "data"), "--trainer.default_root_dir", str(tmp_path / "runs"), *more,
    ]  # fmt: skip


@pytest.fixture(scope="session")
def trained_run(tar_archive: Path, tmp_path_factory: pytest.TempPathFactory) -> TrainedRun:
    root = tmp_path_factory.mktemp("trained")
    source = tar_archive.as_uri()
    fit = run_caltech(
        "fit",
        *small_run(root, source),
        "--trainer.max_epochs",
        "4",
        "--optimizer.lr",
        "0.01",
        "--lr_scheduler.T_max",
        "4",
        "--data.batch_size",
        "4",
        cwd=root,
    )
    assert fit.returncode == 0, fit.stderr[-3000:]
    test = run_caltech("test", *small_run(root, source), "--ckpt_path", str(root / "runs" / "best.ckpt"), cwd=root)
    assert test.returncode == 0, test.stderr[-3000:]
    return TrainedRun(root, source, fit, test)


# -- data modules and the command in this process ------------------------------------------


SMALL = Preprocessing(crop_size=32, resize_size=36)
# MobileNetV2's ImageNet preprocessing at 64 pixels: the real weights, on images that run fast.
PRE64 = preprocessing_for("mobilenet_v2", "IMAGENET1K_V1", image_size=64)


def small_data(image_folder: Path, tmp_path: Path, **options) -> Caltech101DataModule:
    """The generated images as a data module that trains in seconds: split 50/25/25, batches of 8,
    no loader workers, MobileNetV2's preprocessing at 64 pixels."""
    options = {"split": (50, 25, 25), "batch_size": 8, "num_workers": 0, "preprocessing": PRE64, **options}
    return Caltech101DataModule(str(image_folder), str(tmp_path / "data"), **options)


def quiet_trainer(root: Path, **options) -> pl.Trainer:
    """A trainer that logs, saves and prints nothing a test did not ask for."""
    defaults = {"logger": False, "enable_checkpointing": False, "enable_progress_bar": False}
    return pl.Trainer(**{**defaults, "enable_model_summary": False, "default_root_dir": root, **options})


def data_module(source: Path | str, data_dir: Path, **kwargs) -> Caltech101DataModule:
    kwargs.setdefault("split", (50, 25, 25))
    return Caltech101DataModule(str(source), str(data_dir), num_workers=0, preprocessing=SMALL, **kwargs)


@pytest.fixture
def count_extractions(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record every archive that is extracted."""
    calls: list[str] = []
    real = extract.unpack

    def spy(archive: Path, *args):
        calls.append(archive.name)
        return real(archive, *args)

    monkeypatch.setattr(extract, "unpack", spy)
    return calls


# -- hostile files, built at test time --------------------------------------------------------


def tar_with(path: Path, *members: tarfile.TarInfo, payload: bytes = b"x") -> Path:
    """A .tar.gz holding one good image folder entry and the given members."""
    with tarfile.open(path, "w:gz") as tar:
        good = tarfile.TarInfo(f"{FOLDER}/cats/ok.txt")
        good.size = 2
        tar.addfile(good, io.BytesIO(b"ok"))
        for member in members:
            tar.addfile(member, io.BytesIO(payload) if member.isfile() else None)
    return path


def member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "", size: int = 1) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.size = kind, link, size if kind == tarfile.REGTYPE else 0
    return info


def prepare(archive: Path, data_dir: Path, **options) -> None:
    Caltech101DataModule(str(archive), str(data_dir), num_workers=0, **options).prepare_data()


def written_outside(root: Path, data_dir: Path) -> list[Path]:
    return [p for p in root.rglob("*") if "evil" in p.name and data_dir not in p.parents and p.parent != root]


def tar_gz(path: Path, *members: tuple[tarfile.TarInfo, bytes | None]) -> Path:
    """A .tar.gz of the given members, each with its content (None for links and folders)."""
    with tarfile.open(path, "w:gz") as tar:
        for info, content in members:
            if content is not None:
                info.size = len(content)
            tar.addfile(info, io.BytesIO(content) if content is not None else None)
    return path


def link(name: str, target: str) -> tuple[tarfile.TarInfo, None]:
    return member(name, tarfile.SYMTYPE, target), None


def no_links_under(folder: Path) -> bool:
    return not [p for p in folder.rglob("*") if p.is_symlink()]


def damaged(archive: Path, how: str, into: Path) -> Path:
    data = archive.read_bytes()
    if how == "truncated":
        data = data[: len(data) // 2]
    else:  # bytes overwritten in the middle, as a bad copy leaves them
        middle = len(data) // 2
        data = data[:middle] + bytes(range(256)) * 4 + data[middle + 1024 :]
    path = into / archive.name
    path.write_bytes(data)
    return path


class CreatesFile:
    """Unpickling this opens (creates) a file: what a malicious checkpoint would do."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def fills_the_disk(monkeypatch: pytest.MonkeyPatch, where: str) -> None:
    """Make every torch.save to a file named with ``where`` stop half-way, as a full disk stops it."""
    real = torch.save

    def save(obj, path, *args, **kwargs):
        if where not in str(path):
            return real(obj, path, *args, **kwargs)
        real(obj, path, *args, **kwargs)
        Path(path).write_bytes(Path(path).read_bytes()[:1000])
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(torch, "save", save)


@contextmanager
def within(seconds: int) -> Iterator[None]:
    """Fail the block, instead of hanging the suite, when it does not end within ``seconds``
    (a FIFO waited on, a limit that does not hold)."""

    def stop(signum: int, frame: object) -> None:
        raise TimeoutError(f"did not end within {seconds} s")

    previous = signal.signal(signal.SIGALRM, stop)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture
def deep_folder() -> Iterator[Callable[[Path, int], Path]]:
    """Makes ``root`` with ``depth`` folders nested in it and returns the innermost; removes them
    after the test (pytest's own clean-up recurses, and fails on such a tree)."""
    made: list[Path] = []

    def make(root: Path, depth: int) -> Path:
        folder = root
        folder.mkdir(parents=True, exist_ok=True)
        made.append(root)
        for _ in range(depth):
            folder = folder / "d"
            os.mkdir(folder)
        return folder

    yield make
    for root in made:
        remove_tree(root)


def as_from_a_terminal() -> None:
    """In the child before it runs: the signal dispositions and mask of a command typed in a
    terminal. Ignored or blocked signals are inherited, and code run earlier in the test process
    (a library's helper thread or process start) can leave them so."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


class ArchiveServer:
    """An HTTP server on localhost for one archive: ``?truncate=N`` sends the first N bytes under
    the full Content-Length and closes (as a dropped connection does), ``?slow=1`` trickles it,
    ``?length=X`` announces X as its length, ``?status=N`` answers with that HTTP error."""

    def __init__(self, archive: Path) -> None:
        body = archive.read_bytes()

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                query = dict(part.split("=") for part in self.path.partition("?")[2].split("&") if "=" in part)
                if "status" in query:
                    self.send_error(int(query["status"]))
                    return
                self.send_response(200)
                self.send_header("Content-Length", query.get("length", str(len(body))))
                self.end_headers()
                if "truncate" in query:
                    self.wfile.write(body[: int(query["truncate"])])
                    return
                for start in range(0, len(body), 4096):
                    self.wfile.write(body[start : start + 4096])
                    if "slow" in query:
                        time.sleep(0.5)

            def log_message(self, *args) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/{archive.name}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def server(tar_archive):
    served = ArchiveServer(tar_archive)
    yield served
    served.close()


def caltech(*args: str, capsys: pytest.CaptureFixture) -> tuple[int, str]:
    """Run ``caltech`` in this process; its exit status and what it printed to stderr."""
    package = logging.getLogger("caltech_cli")
    handlers = list(package.handlers)
    try:
        with mock.patch.object(sys, "argv", ["caltech"]):  # not pytest's arguments
            main(list(args))
        status = 0
    except SystemExit as stop:
        status = stop.code
    finally:
        package.handlers[:] = handlers  # main adds one for each call, bound to this test's stderr
    return status, capsys.readouterr().err


def one_error(status: int, stderr: str) -> str:
    """The one ``caltech: error:`` line, asserting it is the only one, with exit status 2 and no
    traceback or usage text."""
    errors = [line for line in stderr.splitlines() if line.startswith("caltech: error:")]
    assert status == 2 and len(errors) == 1, stderr[-3000:]
    assert "Traceback" not in stderr and "usage:" not in stderr, stderr[-3000:]
    assert "Fix:" in errors[0], errors[0]
    return errors[0]


def options(tmp_path: Path, source: Path | str, *more: str) -> list[str]:
    return [*small_run(tmp_path, str(source)), "--trainer.logger", "false", "--trainer.max_epochs", "1", *more]


# -- the server and the browser ---------------------------------------------------------------


CHROMIUM = Path("/usr/bin/chromium")
# Chromium as a test drives it here: headless, and asking the network for nothing of its own.
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-sync",
                  "--disable-background-networking", "--disable-component-update"]  # fmt: skip


def photos(folder: Path, count: int = 6) -> list[Path]:
    """Generated images of the three classes, as `predict` and the server both see them."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(7)
    paths = []
    for i in range(count):
        path = folder / f"{list(CLASSES)[i % 3]}_{i}.jpg"
        draw(list(CLASSES)[i % 3], rng).save(path, quality=90)
        paths.append(path)
    return paths


def upload(paths: list[Path]) -> list[tuple[str, tuple[str, bytes, str]]]:
    """Files as httpx posts them in a multipart form."""
    return [("files", (path.name, path.read_bytes(), "image/jpeg")) for path in paths]


@dataclass
class Server:
    """A ``caltech serve`` running in a process of its own, at ``url``."""

    process: subprocess.Popen
    url: str
    said: str = ""  # its output until it served


@contextmanager
def serving(*options: str, cwd: Path) -> Iterator[Server]:
    """Start ``caltech serve`` with ``options`` on a free port of 127.0.0.1, wait until it answers,
    and stop it after the block."""
    test = os.environ.get("PYTEST_CURRENT_TEST", "").rsplit(" (", 1)[0]
    assert test in END_TO_END, f"{test} starts caltech in a subprocess: mark it @pytest.mark.e2e"
    command = [str(Path(sys.executable).with_name("caltech")), "serve", *options, "--port", "0"]
    process = subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        said = []  # what it says before it serves (which engine runs the backbone, say)
        while not (found := re.search(r"Serving .* at (http://127\.0\.0\.1:\d+/)", said[-1] if said else "")):
            said.append(process.stdout.readline())
            assert said[-1], "".join(said)[-3000:]
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(found[1] + "health", timeout=2):
                    break
            except OSError:
                time.sleep(0.2)
        yield Server(process, found[1], "".join(said))
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()


def watched(browser: object) -> tuple[object, list[str]]:
    """A new page, and the list of every URL it requests."""
    page = browser.new_page()
    requested: list[str] = []
    page.on("request", lambda request: requested.append(request.url))
    return page, requested


@pytest.fixture(scope="session")
def chromium() -> Iterator[object]:
    """Debian's Chromium, headless, driven by Playwright (which downloads no browser of its own)."""
    assert CHROMIUM.exists(), "the browser tests need Debian's chromium: apt-get install chromium (.ci/setup does)"
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS)
        yield browser
        browser.close()
