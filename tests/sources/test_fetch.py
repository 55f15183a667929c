"""sources.fetch: from a source to the folder of its images, once; a folder used in place; SIGTERM cleans up."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from caltech_cli.errors import CaltechError

from conftest import (
    CLASSES,
    FOLDER,
    as_from_a_terminal,
    damaged,
    data_module,
    run_caltech,
    small_run,
    within,
)


def test_prepare_from_local_archive_once(tar_archive, tmp_path, count_extractions, caplog):
    dm = data_module(tar_archive, tmp_path / "data")
    dm.prepare_data()
    assert sorted(p.name for p in (tmp_path / "data" / FOLDER).iterdir()) == sorted(CLASSES)
    assert count_extractions == [tar_archive.name]
    again = data_module(tar_archive, tmp_path / "data")
    with caplog.at_level(logging.INFO, logger="caltech_cli"):
        again.prepare_data()
    assert count_extractions == [tar_archive.name], "a second prepare_data must not extract again"
    assert "already extracted" in caplog.text
    assert not list((tmp_path / "data").glob(".extracting-*")), "scratch folders must be cleaned up"


def test_prepare_from_file_url_downloads_then_extracts(tar_archive, tmp_path):
    dm = data_module(tar_archive.as_uri(), tmp_path / "data")
    dm.prepare_data()
    downloaded = tmp_path / "data" / tar_archive.name
    assert downloaded.read_bytes() == tar_archive.read_bytes()
    assert not list((tmp_path / "data").glob("*.part"))
    assert dm.find_classes() == sorted(CLASSES)


def test_extracted_folder_is_used_in_place(image_folder, tmp_path):
    dm = data_module(image_folder.parent, tmp_path / "data")
    dm.prepare_data()
    assert dm.root == image_folder
    assert not (tmp_path / "data").exists(), "a folder source must not be copied"


def test_missing_source_names_it(tmp_path):
    dm = data_module(tmp_path / "nope.tar.gz", tmp_path / "data")
    with pytest.raises(CaltechError, match="nope.tar.gz does not exist"):
        dm.prepare_data()


@pytest.mark.e2e
@pytest.mark.hostile
def test_interrupted_download_is_one_error_line(tar_archive, tmp_path):
    archive = damaged(tar_archive, "truncated", tmp_path)
    result = run_caltech("fit", *small_run(tmp_path, str(archive)), "--trainer.logger", "false", cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("caltech: error:")]
    assert len(errors) == 1 and str(archive) in errors[0] and "download it again" in errors[0]
    assert "Traceback" not in result.stderr


class ZeroReader:
    """A file of ``size`` zero bytes that takes no memory (for a member that is slow to write)."""

    def __init__(self, size: int) -> None:
        self.left = size

    def read(self, count: int = -1) -> bytes:
        count = self.left if count < 0 else min(count, self.left)
        self.left -= count
        return bytes(count)


@pytest.mark.e2e
@pytest.mark.hostile
def test_sigterm_during_a_download_or_extraction_leaves_no_partial_file(tar_archive, image_folder, tmp_path, server):
    """SIGTERM exits 143 and removes what the download or the extraction had written so far;
    files of the user's named like partial files stay."""
    data = tmp_path / "data"
    data.mkdir()
    theirs = [data / f".{tar_archive.name}.k1lled_9.part", data / f".{tar_archive.name}.notes"]
    for path in theirs:
        path.write_text("mine")
    big = tmp_path / "big" / tar_archive.name  # about 400 MB to write, a few hundred bytes to send
    big.parent.mkdir()
    with tarfile.open(big, "w:gz") as tar:
        tar.add(image_folder, arcname=FOLDER)
        member = tarfile.TarInfo(f"{FOLDER}/zeros.bin")
        member.size = 400 << 20
        tar.addfile(member, ZeroReader(member.size))
    for source, busy in [(server.url + "?slow=1", ".*.part"), (str(big), ".extracting-*")]:
        process = subprocess.Popen(
            [
                str(Path(sys.executable).with_name("caltech")),
                "fit",
                *small_run(tmp_path, source),
                "--trainer.logger",
                "false",
            ],
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            preexec_fn=as_from_a_terminal,
        )
        deadline = time.monotonic() + 120
        while not [p for p in data.glob(busy) if p not in theirs] and time.monotonic() < deadline:
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        output = process.communicate(timeout=60)[0]
        assert process.returncode == 128 + signal.SIGTERM, output[-3000:]
        assert sorted(data.iterdir()) == sorted([*theirs, data / ".prepare.lock"]), output[-3000:]
        assert "Traceback" not in output


@pytest.mark.hostile
def test_a_fifo_as_the_source_is_one_line_not_a_hang(tmp_path):
    fifo = tmp_path / "photos.tar.gz"
    os.mkfifo(fifo)
    with within(20), pytest.raises(CaltechError, match=f"data.source {fifo} is a FIFO, not an archive"):
        data_module(fifo, tmp_path / "data").prepare_data()
