"""Where a run writes: folders and files that cannot be written are one line, and the user's files stay."""

from __future__ import annotations

import pytest

from conftest import caltech, one_error, options, predicting


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
