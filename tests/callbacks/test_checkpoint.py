"""The checkpoint callback: best.ckpt, last.ckpt every epoch and where a stopped fit was."""

from __future__ import annotations

import inspect
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from pytorch_lightning.callbacks import ModelCheckpoint

from caltech_cli.callbacks import BestAndLastCheckpoint
from caltech_cli.errors import CaltechError

from conftest import as_from_a_terminal, caltech, fills_the_disk, one_error, options, run_caltech, small_run


def interrupted_fit(tar_archive: Path, tmp_path: Path, signum: int) -> tuple[list[str], str, int]:
    """Start a long ``caltech fit``, send ``signum`` once an epoch has finished and been saved; its
    options, output and exit status. (history.csv is no sign of that: Lightning writes the epoch's checkpoints
    after every other callback's epoch end, so a signal sent then can land between them.)"""
    options = [*small_run(tmp_path, str(tar_archive)), "--trainer.logger", "false", "--data.batch_size", "2"]
    process = subprocess.Popen(
        [str(Path(sys.executable).with_name("caltech")), "fit", *options, "--trainer.max_epochs", "1000"],
        cwd=tmp_path,
        env=dict(os.environ, WANDB_MODE="disabled"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=as_from_a_terminal,
    )
    saved = tmp_path / "runs" / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 120
    while not saved.exists() and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.5)
    assert saved.exists(), process.communicate()[0][-3000:]
    # A Ctrl-C that lands in a finaliser (``__del__``) is reported there and lost, as a key press
    # would be; like a user, press again until the fit reacts (Lightning then ignores repeats).
    # SIGTERM only sets a flag, and is never lost.
    repeats = 12 if signum == signal.SIGINT else 1
    for _ in range(repeats):
        process.send_signal(signum)
        try:
            output = process.communicate(timeout=120 // repeats)[0]
            break
        except subprocess.TimeoutExpired:
            continue
    else:
        process.kill()
        raise AssertionError(
            f"{signal.Signals(signum).name} never stopped the fit (test process: handler "
            f"{signal.getsignal(signum)}, blocked {signal.pthread_sigmask(signal.SIG_BLOCK, [])})\n"
            f"{process.communicate()[0][-3000:]}"
        )
    return options, output, process.returncode


@pytest.mark.e2e
@pytest.mark.hostile
def test_sigterm_during_fit_leaves_a_checkpoint_to_resume_from(tar_archive, tmp_path):
    options, output, status = interrupted_fit(tar_archive, tmp_path, signal.SIGTERM)
    assert status == 128 + signal.SIGTERM, f"a scheduler must see that the job did not finish\n{output[-3000:]}"
    last = tmp_path / "runs" / "checkpoints" / "last.ckpt"
    assert last.is_file(), output[-3000:]
    assert "Stopped by SIGTERM" in output and str(last) in output
    bests = list(last.parent.glob("best-*.ckpt"))
    assert len(bests) == 1, f"the checkpoint of the interruption is not named like a best one: {bests}"
    assert torch.load(bests[0], weights_only=True)["loops"]["fit_loop"]["epoch_loop.batch_progress"]["is_last_batch"]
    resumed = run_caltech(
        "fit",
        *options,
        "--trainer.max_epochs",
        "1000",
        "--trainer.max_steps",
        "0",
        "--ckpt_path",
        str(last),
        cwd=tmp_path,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Restoring states from the checkpoint" in resumed.stderr


@pytest.mark.e2e
@pytest.mark.hostile
def test_ctrl_c_during_fit_saves_a_checkpoint(tar_archive, tmp_path):
    _, output, status = interrupted_fit(tar_archive, tmp_path, signal.SIGINT)
    assert "graceful shutdown" in output, output[-2000:]
    assert status == 128 + signal.SIGINT, output[-2000:]
    assert (tmp_path / "runs" / "checkpoints" / "last.ckpt").is_file(), output[-2000:]


@pytest.mark.hostile
def test_a_file_named_best_ckpt_is_never_replaced(image_folder, tmp_path, capsys):
    runs = tmp_path / "runs"
    runs.mkdir()
    (runs / "best.ckpt").write_text("the user's own file\n")
    line = one_error(*caltech("fit", *options(tmp_path, image_folder), capsys=capsys))
    assert f"{runs / 'best.ckpt'} is in the way" in line and "move or rename it" in line
    assert (runs / "best.ckpt").read_text() == "the user's own file\n"
    assert not list(runs.glob("checkpoints/*.ckpt")), "refused before training"


@pytest.mark.hostile
def test_best_ckpt_link_of_an_earlier_fit_is_replaced(tmp_path):
    checkpoint = BestAndLastCheckpoint(dirpath=tmp_path / "checkpoints")
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "best.ckpt").symlink_to("checkpoints/best-epoch00-val_acc0.5000.ckpt")
    trainer = SimpleNamespace(default_root_dir=str(tmp_path))
    assert checkpoint.best_link(trainer) == tmp_path / "best.ckpt"


@pytest.mark.hostile
def test_a_link_of_the_users_named_best_ckpt_is_left_alone(tmp_path):
    checkpoint = BestAndLastCheckpoint(dirpath=tmp_path / "checkpoints")
    (tmp_path / "mine.ckpt").write_text("the user's own checkpoint\n")
    (tmp_path / "best.ckpt").symlink_to(tmp_path / "mine.ckpt")
    with pytest.raises(CaltechError, match="link to something else was not made by caltech"):
        checkpoint.best_link(SimpleNamespace(default_root_dir=str(tmp_path)))


@pytest.mark.hostile
def test_a_checkpoints_folder_that_links_elsewhere_is_refused_before_training(image_folder, tmp_path, capsys):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "checkpoints").symlink_to(elsewhere)
    line = one_error(*caltech("fit", *options(tmp_path, image_folder), capsys=capsys))
    assert "checkpoint.dirpath" in line and "is a symbolic link" in line
    assert not list(elsewhere.iterdir())


@pytest.mark.hostile
def test_ctrl_c_between_the_best_and_the_last_write_still_leaves_last_ckpt(image_folder, tmp_path, capsys, monkeypatch):
    """The signal lands after epoch 0's best checkpoint is written and before its last.ckpt."""
    real = BestAndLastCheckpoint._save_last_checkpoint
    calls = []

    def interrupted_once(self, trainer, monitor_candidates):
        calls.append(trainer.global_step)
        if len(calls) == 1:
            raise KeyboardInterrupt
        real(self, trainer, monitor_candidates)

    monkeypatch.setattr(BestAndLastCheckpoint, "_save_last_checkpoint", interrupted_once)
    try:
        status, stderr = caltech("fit", *options(tmp_path, image_folder, "--trainer.max_epochs", "3"), capsys=capsys)
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)  # Lightning ignores Ctrl-C after the first
    folder = tmp_path / "runs" / "checkpoints"
    assert status == 128 + signal.SIGINT, stderr[-3000:]
    bests = [p.name for p in folder.glob("best-epoch00-*.ckpt")]
    assert len(bests) == 1 and {p.name for p in folder.iterdir()} == {*bests, "last.ckpt"}, list(folder.iterdir())
    assert torch.load(folder / "last.ckpt", weights_only=True)["global_step"] == calls[0]


# The private parts of Lightning's ModelCheckpoint that BestAndLastCheckpoint overrides or calls, with
# their parameters: a Lightning release that renames or changes one fails here, not in a user's fit.
CHECKPOINT_PRIVATE_API = {
    "_save_last_checkpoint": ["self", "trainer", "monitor_candidates"],
    "_should_save_on_train_epoch_end": ["self", "trainer"],
    "_monitor_candidates": ["self", "trainer"],
}


def test_the_private_lightning_hooks_it_overrides_are_as_it_expects():
    for name, parameters in CHECKPOINT_PRIVATE_API.items():
        assert list(inspect.signature(getattr(ModelCheckpoint, name)).parameters) == parameters, name
    checkpoint = BestAndLastCheckpoint()
    for attribute in ("save_last", "save_on_exception", "last_model_path", "best_model_path"):
        assert hasattr(checkpoint, attribute), attribute


@pytest.mark.hostile
def test_a_disk_that_fills_during_a_checkpoint_write_is_one_line(image_folder, tmp_path, capsys, monkeypatch):
    """A checkpoint is written aside and renamed when whole: a full disk leaves no truncated
    best-*.ckpt or last.ckpt that a later run (or `fit --ckpt_path`) would trust."""
    fills_the_disk(monkeypatch, ".ckpt.")
    try:
        line = one_error(*caltech("fit", *options(tmp_path, image_folder), capsys=capsys))
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    assert "cannot write" in line and ".ckpt (the disk is full)" in line
    assert not list((tmp_path / "runs").rglob("*.ckpt*")), "no checkpoint, whole or not, and no scratch file"
