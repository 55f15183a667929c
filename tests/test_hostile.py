"""Hostile inputs: archives that try to write outside data_dir, pickles that run code."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import FOLDER, run_caltech, small_run

from caltech_cli import sources
from caltech_cli.backbones import resolve_backbone
from caltech_cli.data import Caltech101DataModule
from caltech_cli.errors import CaltechError


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


@pytest.mark.parametrize(
    ("info", "says"),
    [
        (member("../evil.txt"), "path outside"),
        (member(f"{FOLDER}/../../evil.txt"), "path outside"),
        (member("/tmp/caltech-test-evil.txt"), "path outside"),
        (member(f"{FOLDER}/cats/evil-link", tarfile.SYMTYPE, "../../../evil-target"), "symbolic link"),
        (member(f"{FOLDER}/cats/evil-abs", tarfile.SYMTYPE, "/etc/passwd"), "symbolic link"),
        (member(f"{FOLDER}/cats/evil-hard", tarfile.LNKTYPE, "../evil-target"), "hard link"),
        (member(f"{FOLDER}/cats/evil-fifo", tarfile.FIFOTYPE), "FIFO"),
        (member(f"{FOLDER}/cats/evil-dev", tarfile.CHRTYPE), "device"),
    ],
    ids=["dotdot", "nested-dotdot", "absolute", "symlink-out", "symlink-abs", "hardlink-out", "fifo", "device"],
)
def test_unsafe_tar_members_are_refused_by_name(tmp_path, info, says):
    archive = tar_with(tmp_path / "bad.tar.gz", info)
    data_dir = tmp_path / "sandbox" / "data"
    with pytest.raises(CaltechError, match=says) as error:
        prepare(archive, data_dir)
    assert repr(info.name) in str(error.value), "the message names the member"
    assert not (data_dir / FOLDER).exists()
    assert not Path("/tmp/caltech-test-evil.txt").exists()
    assert written_outside(tmp_path, data_dir) == []
    assert not list(data_dir.glob(".extracting-*")), "the scratch folder is removed"


def test_unsafe_zip_member_is_refused(tmp_path):
    archive = tmp_path / "bad.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr(f"{FOLDER}/cats/ok.txt", "ok")
        zf.writestr("../../evil.txt", "x")
    with pytest.raises(CaltechError, match="'../../evil.txt'"):
        prepare(archive, tmp_path / "data")
    assert written_outside(tmp_path, tmp_path / "data") == []


def test_unsafe_member_inside_a_nested_archive(tmp_path):
    inner = tar_with(tmp_path / f"{FOLDER}.tar.gz", member("../../evil.txt"))
    outer = tmp_path / "outer.zip"
    with zipfile.ZipFile(outer, "w") as zf:
        zf.write(inner, f"caltech-101/{inner.name}")
    with pytest.raises(CaltechError, match="evil.txt"):
        prepare(outer, tmp_path / "data")
    assert written_outside(tmp_path, tmp_path / "data") == []


def test_decompression_bomb_is_refused_before_extraction(tmp_path):
    big = member(f"{FOLDER}/cats/zeros.bin", size=3 * 2**20)
    archive = tar_with(tmp_path / "bomb.tar.gz", big, payload=bytes(3 * 2**20))
    assert archive.stat().st_size < 100_000, "compresses to almost nothing"
    with pytest.raises(CaltechError, match="over the limit"):
        prepare(archive, tmp_path / "data", max_extract_gb=2 / 1024)
    assert not (tmp_path / "data" / FOLDER).exists()
    with pytest.raises(CaltechError, match="2 files"):
        prepare(archive, tmp_path / "data2", max_extract_files=1)


def test_extracted_tree_is_checked_for_any_format(tmp_path):
    root = tmp_path / "extracted"
    root.mkdir()
    (root / "fine.txt").write_text("ok")
    (root / "escape").symlink_to(tmp_path)
    limits = sources.Limits(2**30, 100)
    with pytest.raises(CaltechError, match="'escape' is a symbolic link"):
        sources.check_tree(tmp_path / "x.rar", root, limits)


class CreatesFile:
    """Unpickling this opens (creates) a file: what a malicious checkpoint would do."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def test_weights_file_that_runs_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    torch.save({"conv1.weight": CreatesFile(marker)}, evil)
    with pytest.raises(CaltechError, match="evil.pth"):
        resolve_backbone("resnet18", str(evil))
    assert not marker.exists(), "the pickle's code must not run"


def test_checkpoint_that_runs_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"backbone": CreatesFile(marker)}}, evil)
    result = run_caltech("test", "--ckpt_path", str(evil), "--data.source", str(tmp_path), "--trainer.logger", "false",
                         cwd=tmp_path)
    assert result.returncode == 2
    assert "evil.ckpt" in result.stderr and "Traceback" not in result.stderr
    assert not marker.exists(), "the pickle's code must not run"


def interrupted_fit(tar_archive: Path, tmp_path: Path, signum: int) -> tuple[list[str], str, int]:
    """Start a long ``caltech fit``, send ``signum`` once an epoch has finished and been saved; its
    options, output and exit status. (history.csv is no sign of that: Lightning writes the epoch's checkpoints
    after every other callback's epoch end, so a signal sent then can land between them.)"""
    options = [*small_run(tmp_path, str(tar_archive)), "--trainer.logger", "false", "--data.batch_size", "2"]
    process = subprocess.Popen([str(Path(sys.executable).with_name("caltech")), "fit", *options,
                                "--trainer.max_epochs", "1000"], cwd=tmp_path, env=dict(os.environ, WANDB_MODE="disabled"),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    saved = tmp_path / "runs" / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 120
    while not saved.exists() and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.5)
    assert saved.exists(), process.communicate()[0][-3000:]
    process.send_signal(signum)
    output = process.communicate(timeout=120)[0]
    return options, output, process.returncode


def test_sigterm_during_fit_leaves_a_checkpoint_to_resume_from(tar_archive, tmp_path):
    options, output, status = interrupted_fit(tar_archive, tmp_path, signal.SIGTERM)
    assert status == 128 + signal.SIGTERM, f"a scheduler must see that the job did not finish\n{output[-3000:]}"
    last = tmp_path / "runs" / "checkpoints" / "last.ckpt"
    assert last.is_file(), output[-3000:]
    assert "Stopped by SIGTERM" in output and str(last) in output
    bests = list(last.parent.glob("best-*.ckpt"))
    assert len(bests) == 1, f"the checkpoint of the interruption is not named like a best one: {bests}"
    assert torch.load(bests[0], weights_only=True)["loops"]["fit_loop"]["epoch_loop.batch_progress"]["is_last_batch"]
    resumed = run_caltech("fit", *options, "--trainer.max_epochs", "1000", "--trainer.max_steps", "0",
                          "--ckpt_path", str(last), cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Restoring states from the checkpoint" in resumed.stderr


@pytest.mark.parametrize(
    ("options", "says"),
    [
        (["--model.backbone", "resnet181"], "resnet18"),
        (["--model.weights", "IMAGENET9K"], "IMAGENET1K_V1"),
        (["--data.split", "[100, 0, 0]"], "leaves no images for val, test"),
        (["--data.predict_dir", "nowhere"], "nowhere does not exist"),
    ],
    ids=["backbone", "weights", "split", "predict_dir"],
)
def test_bad_options_are_one_clear_error(tar_archive, tmp_path, options, says):
    command = "predict" if "--data.predict_dir" in options else "fit"
    result = run_caltech(command, *small_run(tmp_path, str(tar_archive)), "--trainer.logger", "false", *options,
                         cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    assert says in result.stderr and "Traceback" not in result.stderr


def test_download_retries_then_succeeds(tar_archive, tmp_path, monkeypatch):
    real = sources.urllib.request.urlopen
    calls = []

    def flaky(url, timeout):
        calls.append(url)
        if len(calls) < 3:
            raise TimeoutError("timed out")
        return real(url, timeout=timeout)

    monkeypatch.setattr(sources.urllib.request, "urlopen", flaky)
    monkeypatch.setattr(sources, "RETRY_PAUSE_S", 0.0)
    path = sources.download(tar_archive.as_uri(), tmp_path, checksum=None)
    assert len(calls) == 3 and path.read_bytes() == tar_archive.read_bytes()


def test_download_gives_one_error_after_its_attempts(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "RETRY_PAUSE_S", 0.0)
    with pytest.raises(CaltechError, match=r"3 attempts.*--data.source"):
        sources.download((tmp_path / "missing.zip").as_uri(), tmp_path / "data", checksum=None)
    assert not list((tmp_path / "data").glob("missing.zip*")), "no partial file stays"


def test_ctrl_c_during_fit_saves_a_checkpoint(tar_archive, tmp_path):
    _, output, status = interrupted_fit(tar_archive, tmp_path, signal.SIGINT)
    assert "graceful shutdown" in output, output[-2000:]
    assert status == 128 + signal.SIGINT, output[-2000:]
    assert (tmp_path / "runs" / "checkpoints" / "last.ckpt").is_file(), output[-2000:]
