"""Where a run writes: folders and files that cannot be written are one line, and the user's files stay."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from caltech_cli.errors import CaltechError
from caltech_cli.files import written_whole

from conftest import caltech, old_checkpoint, one_error, options, predicting, within


@pytest.mark.hostile
@pytest.mark.parametrize("where", ["file", "under-a-file"])
def test_data_dir_that_is_a_file_is_refused(tar_archive, tmp_path, capsys, where):
    blocker = tmp_path / "blocker"
    blocker.write_text("the user's file\n")
    data_dir = blocker if where == "file" else blocker / "data"
    line = one_error(*caltech("fit", *options(tmp_path, tar_archive), "--data.data_dir", str(data_dir), capsys=capsys))
    assert f"data.data_dir: {data_dir} cannot be made a folder" in line
    assert blocker.read_text() == "the user's file\n"


@pytest.mark.e2e
@pytest.mark.hostile
def test_output_paths_that_cannot_be_written(trained_run, tmp_path, capsys):
    blocker = tmp_path / "blocker"
    blocker.write_text("the user's file\n")
    predict = predicting(trained_run, tmp_path)
    photos = tmp_path / "photos"
    line = one_error(*caltech(*predict, "--predictions.output", str(photos), capsys=capsys))
    assert f"predictions.output: {photos} is a folder" in line
    line = one_error(*caltech(*predict, "--predictions.output", str(blocker / "p.csv"), capsys=capsys))
    assert f"predictions.output: {blocker} cannot be made a folder" in line
    line = one_error(
        *caltech("export", "--ckpt_path", str(trained_run.best), "--output", str(blocker / "m.onnx"), capsys=capsys)
    )
    assert f"output: {blocker} cannot be made a folder" in line
    assert "is a folder" in one_error(
        *caltech("export", "--ckpt_path", str(trained_run.best), "--output", str(tmp_path), capsys=capsys)
    )
    assert blocker.read_text() == "the user's file\n"


@pytest.mark.hostile
@pytest.mark.parametrize("option", ["trainer.default_root_dir", "data.cache_dir", "report.output", "compare"])
def test_output_folder_that_is_a_file_is_refused(trained_run, tmp_path, capsys, option):
    blocker = tmp_path / "blocker"
    blocker.write_text("the user's file\n")
    if option == "compare":
        args = ["compare", str(trained_run.runs), "--output", str(blocker)]
        option = "output"
    else:
        command = "test" if option == "report.output" else "fit"
        args = [command, *options(tmp_path, trained_run.source), f"--{option}", str(blocker)]
        args += ["--ckpt_path", str(trained_run.best)] if command == "test" else []
    line = one_error(*caltech(*args, capsys=capsys))
    assert f"{option}: {blocker} cannot be made a folder (a file is in its way)" in line
    assert blocker.read_text() == "the user's file\n"


@pytest.mark.hostile
@pytest.mark.parametrize("folder", ["/proc/self", "/sys/kernel", "/dev/shm/x"])
def test_a_run_folder_in_the_kernels_file_systems_is_refused(image_folder, tmp_path, capsys, folder):
    """os.access calls them writable; nothing of a run belongs there."""
    line = one_error(*caltech("fit", *options(tmp_path, image_folder), "--trainer.default_root_dir", folder,
                              capsys=capsys))  # fmt: skip
    assert f"trainer.default_root_dir: {folder} is in /" in line


@pytest.mark.hostile
@pytest.mark.parametrize("where", ["predictions.csv", "predictions.output", "history.csv", "config.yaml"])
def test_a_fifo_where_an_output_goes_is_one_line_not_a_hang(image_folder, tmp_path, capsys, where):
    runs = tmp_path / "runs"
    runs.mkdir()
    fifo = tmp_path / "out.csv" if where == "predictions.output" else runs / where
    os.mkfifo(fifo)
    if where in ("predictions.csv", "predictions.output"):
        more = ["--predictions.output", str(fifo)] if where == "predictions.output" else []
        args = old_checkpoint(tmp_path, "predict", "--data.predict_dir", str(image_folder / "circles"), *more)
    else:
        args = ["fit", *options(tmp_path, image_folder)]
    with within(60):
        line = one_error(*caltech(*args, capsys=capsys))
    assert f"{fifo} is a FIFO" in line


@pytest.mark.hostile
def test_an_output_is_whole_or_absent_when_the_disk_fills(tmp_path, monkeypatch):
    """A write stopped half-way (the disk full) leaves nothing under the output's name, and an
    earlier whole file there stays until the new one is whole."""
    target = tmp_path / "metrics.json"
    target.write_text("the earlier, whole file")

    def fills_the_disk(self, text, *args, **kwargs):
        self.write_bytes(text.encode()[: len(text) // 2])
        raise OSError(errno.ENOSPC, "No space left on device", str(self))

    monkeypatch.setattr(Path, "write_text", fills_the_disk)
    full = r"cannot write .*metrics\.json \(the disk is full\); nothing was left"
    with pytest.raises(CaltechError, match=full), written_whole(target, "report.output") as scratch:
        scratch.write_text('{"test/acc": 0.9}')
    assert target.read_text(encoding="utf-8") == "the earlier, whole file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]
