"""Hostile inputs: archives that try to write outside data_dir, pickles that run code."""

from __future__ import annotations

import gzip
import io
import logging
import os
import shutil
import signal
import stat
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import pytest
import torch
import numpy as np
from conftest import CLASSES, FOLDER, damaged_png, draw, pack_tar_gz, run_caltech, small_run

from caltech_cli import sources
from caltech_cli.backbones import resolve_backbone
from caltech_cli.data import Caltech101DataModule, ImageFolderDataModule
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
    budget = sources.Budget(sources.Limits(2**30, 100), "x.rar")
    with pytest.raises(CaltechError, match="'escape' is a symbolic link"):
        sources.check_tree("x.rar", root, budget)
    (root / "escape").unlink()
    (tmp_path / "outside.txt").write_text("a file of the machine")
    os.link(tmp_path / "outside.txt", root / "hard")
    with pytest.raises(CaltechError, match="'hard' is a hard link to a file outside"):
        sources.check_tree("x.rar", root, budget)


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


def test_link_that_leads_out_only_once_moved_is_left_out(tmp_path, caplog):
    """Inside the scratch folder the link stays in; moved past its wrapper folders into data_dir,
    it would reach a file of the machine."""
    host_file = tmp_path / "sandbox" / "secret.jpg"
    host_file.parent.mkdir()
    host_file.write_bytes(b"the machine's own file")
    archive = tar_gz(tmp_path / "wrapped.tar.gz", (member(f"wrap/{FOLDER}/cats/ok.txt"), b"ok"),
                     link(f"wrap/{FOLDER}/cats/secret.jpg", "../../../secret.jpg"))
    data_dir = tmp_path / "sandbox" / "data"
    with caplog.at_level(logging.INFO, logger="caltech_cli"):
        prepare(archive, data_dir)
    assert (data_dir / FOLDER / "cats" / "ok.txt").read_text() == "ok"
    assert not os.path.lexists(data_dir / FOLDER / "cats" / "secret.jpg")
    assert no_links_under(data_dir)
    assert "Left out 1 symbolic links" in caplog.text


def test_link_to_its_own_folder_does_not_make_data_dir_the_data_set(tmp_path):
    archive = tar_gz(tmp_path / "photos.tar.gz", link("top", "."))
    data_dir = tmp_path / "data"
    (data_dir / "feature-cache").mkdir(parents=True)
    data = ImageFolderDataModule(str(archive), data_dir=str(data_dir), num_workers=0)
    with pytest.raises(CaltechError, match="no class folders"):
        data.class_names
    assert not (data_dir / "photos").is_symlink() and no_links_under(data_dir)
    assert data.root.resolve() != data_dir.resolve()


def test_tar_with_a_damaged_header_is_refused_not_skipped_over(tmp_path):
    """tarfile stops at an unreadable header where GNU tar skips ahead to the next one: what
    follows it is neither listed nor written, and the archive is refused as damaged."""
    visible, hidden = io.BytesIO(), io.BytesIO()
    with tarfile.open(fileobj=visible, mode="w") as tar:
        info = member(f"{FOLDER}/cats/ok.txt", size=2)
        tar.addfile(info, io.BytesIO(b"ok"))
    with tarfile.open(fileobj=hidden, mode="w") as tar:
        tar.addfile(member(f"{FOLDER}/cats/evil-etc", tarfile.SYMTYPE, "/etc"))
        big = member(f"{FOLDER}/cats/evil-big.bin", size=2**20)
        tar.addfile(big, io.BytesIO(bytes(2**20)))
    stream = visible.getvalue()[:1024] + b"\x01" * 512 + hidden.getvalue()
    archive = tmp_path / "damaged.tar.gz"
    archive.write_bytes(gzip.compress(stream))
    with pytest.raises(CaltechError, match=r"damaged\.tar\.gz is damaged or incomplete .*Fix: download it again"):
        prepare(archive, tmp_path / "data")
    assert not (tmp_path / "data" / FOLDER).exists()
    assert not [p for p in tmp_path.rglob("evil*")]


def test_tar_and_zip_are_never_handed_to_another_program(nested_zip, tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("patool was asked to extract a tar or zip archive")

    monkeypatch.setattr(sources.patoolib, "extract_archive", refuse)
    prepare(nested_zip, tmp_path / "data")
    assert (tmp_path / "data" / FOLDER / "circles").is_dir()


def test_nested_archives_share_one_budget(tmp_path):
    """Each archive unpacks to 3 MiB, under the 4 MiB limit; together they pass it."""
    zeros = bytes(3 * 2**20)
    inner = tar_gz(tmp_path / f"{FOLDER}.tar.gz", (member("zeros-inner.bin"), zeros),
                   (member(f"{FOLDER}/cats/ok.txt"), b"ok"))
    outer = tar_gz(tmp_path / "outer.tar.gz", (member("zeros-outer.bin"), zeros),
                   (member(f"wrap/{inner.name}"), inner.read_bytes()))
    with pytest.raises(CaltechError, match=r"outer\.tar\.gz unpacks to .* \(archives inside it included\), over the limit"):
        prepare(outer, tmp_path / "data", max_extract_gb=4 / 1024)
    assert not (tmp_path / "data" / FOLDER).exists()
    prepare(outer, tmp_path / "data", max_extract_gb=8 / 1024)
    assert (tmp_path / "data" / FOLDER / "cats" / "ok.txt").is_file()


def hostile_modes_zip(path: Path) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        folder = zipfile.ZipInfo(f"{FOLDER}/cats/")
        folder.external_attr = (stat.S_IFDIR | 0o1777) << 16
        zf.writestr(folder, "")
        setuid = zipfile.ZipInfo(f"{FOLDER}/cats/setuid.bin")
        setuid.create_system = 3
        setuid.external_attr = (stat.S_IFREG | 0o6777) << 16
        zf.writestr(setuid, "x")
    return path


def hostile_modes_tar(path: Path) -> Path:
    folder = member(f"{FOLDER}/cats", tarfile.DIRTYPE)
    folder.mode = 0o1777
    setuid = member(f"{FOLDER}/cats/setuid.bin")
    setuid.mode, setuid.uid, setuid.gid, setuid.uname, setuid.gname = 0o6777, 4242, 4242, "", ""
    return tar_gz(path, (folder, None), (setuid, b"x"))


def assert_safe(folder: Path) -> None:
    for path in [folder, *folder.rglob("*")]:
        info = path.lstat()
        assert stat.S_IMODE(info.st_mode) & (stat.S_ISUID | stat.S_ISGID | stat.S_ISVTX | 0o022) == 0, path
        assert (info.st_uid, info.st_gid) == (os.getuid(), os.getgid()), path


@pytest.mark.parametrize("make", [hostile_modes_tar, hostile_modes_zip], ids=["tar", "zip"])
def test_extracted_files_get_safe_modes_and_the_running_user(tmp_path, make):
    archive = make(tmp_path / ("modes.tar.gz" if make is hostile_modes_tar else "modes.zip"))
    prepare(archive, tmp_path / "data")
    assert (tmp_path / "data" / FOLDER / "cats" / "setuid.bin").read_text() == "x"
    assert_safe(tmp_path / "data" / FOLDER)


@pytest.mark.skipif(shutil.which("zstd") is None, reason="needs the zstd program")
def test_format_python_cannot_read_is_checked_after_patool(tmp_path, caplog):
    """A .tar.zst goes to patool (GNU tar, which keeps modes and, as root, owners): the tree it
    wrote gets the same treatment as what Python extracts."""
    plain = hostile_modes_tar(tmp_path / "modes.tar.gz")
    inside = tmp_path / "modes.tar"
    inside.write_bytes(gzip.decompress(plain.read_bytes()))
    with tarfile.open(inside, "a") as tar:
        tar.addfile(member(f"{FOLDER}/cats/again.bin", tarfile.SYMTYPE, "setuid.bin"))
        tar.addfile(member(f"{FOLDER}/cats/more.bin"), io.BytesIO(b"y"))
    archive = tmp_path / "modes.tar.zst"
    subprocess.run(["zstd", "-q", str(inside), "-o", str(archive)], check=True)
    with caplog.at_level(logging.INFO, logger="caltech_cli"):
        prepare(archive, tmp_path / "data")
    assert (tmp_path / "data" / FOLDER / "cats" / "setuid.bin").read_text() == "x"
    assert_safe(tmp_path / "data" / FOLDER)
    assert no_links_under(tmp_path / "data") and "Left out 1 symbolic links" in caplog.text

    with tarfile.open(inside, "a") as tar:
        tar.addfile(member(f"{FOLDER}/cats/escape", tarfile.SYMTYPE, "../../../.."))
    evil = tmp_path / "evil.tar.zst"
    subprocess.run(["zstd", "-q", str(inside), "-o", str(evil)], check=True)
    with pytest.raises(CaltechError, match="'101_ObjectCategories/cats/escape' is a symbolic link"):
        prepare(evil, tmp_path / "data2")
    with pytest.raises(CaltechError, match="2 files .*over the limit"):
        prepare(archive, tmp_path / "data3", max_extract_files=1)


def test_hard_link_inside_becomes_a_copy(tmp_path):
    archive = tar_gz(tmp_path / "linked.tar.gz", (member(f"{FOLDER}/cats/a.txt"), b"same"),
                     (member(f"{FOLDER}/dogs/b.txt", tarfile.LNKTYPE, f"{FOLDER}/cats/a.txt"), None))
    prepare(archive, tmp_path / "data")
    copy = tmp_path / "data" / FOLDER / "dogs" / "b.txt"
    assert copy.read_text() == "same" and copy.stat().st_nlink == 1


@pytest.fixture
def no_programs(tmp_path, monkeypatch):
    """A PATH with no archive programs on it (patool caches where it found programs)."""
    empty = tmp_path / "empty-path"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    sources.patoolib.util.find_program.cache_clear()
    yield
    sources.patoolib.util.find_program.cache_clear()


def test_missing_extractor_program_is_named(tmp_path, no_programs):
    archive = tmp_path / "photos.rar"
    archive.write_bytes(b"Rar!\x1a\x07\x01\x00" + bytes(64))
    with pytest.raises(CaltechError) as error:
        ImageFolderDataModule(str(archive), data_dir=str(tmp_path / "data"), num_workers=0).prepare_data()
    message = str(error.value)
    assert "photos.rar" in message and "unrar" in message and "7z" in message and "Fix: install" in message
    assert "\n" not in message


def test_folder_of_the_user_in_the_way_is_never_deleted(tmp_path):
    archive = tmp_path / "photos.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("photos/cats/a.txt", "new")
    data_dir = tmp_path / "data"
    mine = data_dir / "photos" / "my-notes.txt"
    mine.parent.mkdir(parents=True)
    mine.write_text("the user's own")
    with pytest.raises(CaltechError, match=r"photos is in the way: .*not extracted by caltech.*Fix: move it away"):
        ImageFolderDataModule(str(archive), data_dir=str(data_dir), num_workers=0).prepare_data()
    assert mine.read_text() == "the user's own"
    assert not list(data_dir.glob(".extracting-*"))


def test_earlier_extraction_of_another_source_is_replaced(tmp_path):
    """What this tool extracted itself (it has a marker) is replaced when the source changes."""
    folders = []
    for version in ("one", "two"):
        (tmp_path / version).mkdir()
        archive = tmp_path / version / "photos.zip"
        with zipfile.ZipFile(archive, "w") as zf:
            zf.writestr(f"photos/cats/{version}.txt", version)
        data = ImageFolderDataModule(str(archive), data_dir=str(tmp_path / "data"), num_workers=0)
        data.prepare_data()
        folders.append(sorted(p.name for p in data.root.rglob("*.txt")))
        assert sources.extracted_from(data.root) == str(archive)
    assert folders == [["one.txt"], ["two.txt"]]


def damaged(archive: Path, how: str, into: Path) -> Path:
    data = archive.read_bytes()
    if how == "truncated":
        data = data[: len(data) // 2]
    else:  # bytes overwritten in the middle, as a bad copy leaves them
        middle = len(data) // 2
        data = data[:middle] + bytes(range(256)) * 4 + data[middle + 1024:]
    path = into / archive.name
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("how", ["truncated", "overwritten"])
@pytest.mark.parametrize("which", ["tar_archive", "nested_zip"])
def test_damaged_archive_is_named(request, tmp_path, which, how):
    archive = damaged(request.getfixturevalue(which), how, tmp_path)
    with pytest.raises(CaltechError, match=rf"{archive.name}.* is damaged or incomplete .*Fix: download it again"):
        prepare(archive, tmp_path / "data")
    assert not (tmp_path / "data" / FOLDER).exists()


def test_interrupted_download_is_one_error_line(tar_archive, tmp_path):
    archive = damaged(tar_archive, "truncated", tmp_path)
    result = run_caltech("fit", *small_run(tmp_path, str(archive)), "--trainer.logger", "false", cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("caltech: error:")]
    assert len(errors) == 1 and str(archive) in errors[0] and "download it again" in errors[0]
    assert "Traceback" not in result.stderr


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


def as_from_a_terminal() -> None:
    """In the child before it runs: the signal dispositions and mask of a command typed in a
    terminal. Ignored or blocked signals are inherited, and code run earlier in the test process
    (a library's helper thread or process start) can leave them so."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def interrupted_fit(tar_archive: Path, tmp_path: Path, signum: int) -> tuple[list[str], str, int]:
    """Start a long ``caltech fit``, send ``signum`` once an epoch has finished and been saved; its
    options, output and exit status. (history.csv is no sign of that: Lightning writes the epoch's checkpoints
    after every other callback's epoch end, so a signal sent then can land between them.)"""
    options = [*small_run(tmp_path, str(tar_archive)), "--trainer.logger", "false", "--data.batch_size", "2"]
    process = subprocess.Popen([str(Path(sys.executable).with_name("caltech")), "fit", *options,
                                "--trainer.max_epochs", "1000"], cwd=tmp_path, env=dict(os.environ, WANDB_MODE="disabled"),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               preexec_fn=as_from_a_terminal)
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
        raise AssertionError(f"{signal.Signals(signum).name} never stopped the fit (test process: handler "
                             f"{signal.getsignal(signum)}, blocked {signal.pthread_sigmask(signal.SIG_BLOCK, [])})\n"
                             f"{process.communicate()[0][-3000:]}")
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
    assert not list((tmp_path / "data").glob("*missing.zip*")), "no partial file stays"


def test_ctrl_c_during_fit_saves_a_checkpoint(tar_archive, tmp_path):
    _, output, status = interrupted_fit(tar_archive, tmp_path, signal.SIGINT)
    assert "graceful shutdown" in output, output[-2000:]
    assert status == 128 + signal.SIGINT, output[-2000:]
    assert (tmp_path / "runs" / "checkpoints" / "last.ckpt").is_file(), output[-2000:]


def test_image_that_fails_in_training_is_skipped_with_the_option(tmp_path):
    """The scan passes a PNG whose checksums were made to fit; it fails to decode in the first
    backbone pass. Without --data.skip_bad_images one line names it and the option, which (as the
    second run shows) does help: with it the run goes on and counts the file."""
    rng = np.random.default_rng(3)
    for split, count in (("train", 4), ("val", 2), ("test", 1)):
        for kind in CLASSES:
            folder = tmp_path / "photos" / split / kind
            folder.mkdir(parents=True)
            for i in range(count):
                draw(kind, rng).save(folder / f"{i}.jpg")
    bad = damaged_png(tmp_path / "photos" / "train" / "circles" / "bad.png", checksum_intact=True)
    options = [*small_run(tmp_path, str(tmp_path / "photos")), "--trainer.logger", "false", "--trainer.max_epochs", "1"]

    stopping = run_caltech("fit", *options, cwd=tmp_path)
    assert stopping.returncode == 2, stopping.stderr[-3000:]
    errors = [line for line in stopping.stderr.splitlines() if line.startswith("caltech: error:")]
    assert len(errors) == 1 and f"cannot read image {bad}" in errors[0] and "--data.skip_bad_images true" in errors[0]
    assert "Traceback" not in stopping.stderr

    skipping = run_caltech("fit", *options, "--data.skip_bad_images", "true", cwd=tmp_path)
    assert skipping.returncode == 0, skipping.stderr[-3000:]
    assert f"Skipping {bad}, which cannot be read" in skipping.stderr
    assert f"Skipped 1 image files that could not be read (the next image of the class took each one's place): {bad}" \
        in skipping.stderr


def test_file_of_the_user_in_the_way_of_a_download_is_never_replaced(tar_archive, tmp_path):
    """A same-named file in data_dir that the tool did not download (another version, the user's
    own) stops the run with one line naming it; it and a ``<name>.part`` of the user's stay."""
    data = tmp_path / "data"
    data.mkdir()
    theirs, their_part = data / tar_archive.name, data / f"{tar_archive.name}.part"
    theirs.write_bytes(b"another version")
    their_part.write_bytes(b"notes")
    digest = sources.hashlib.sha256(tar_archive.read_bytes()).hexdigest()
    result = run_caltech("fit", *small_run(tmp_path, tar_archive.as_uri()), "--data.checksum", f"sha256:{digest}",
                         "--trainer.logger", "false", cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("caltech: error:")]
    assert len(errors) == 1 and f"{theirs} is in the way" in errors[0] and "Fix: move it out" in errors[0]
    assert "Traceback" not in result.stderr
    assert theirs.read_bytes() == b"another version" and their_part.read_bytes() == b"notes"
    (data / "folder.zip").mkdir()
    with pytest.raises(CaltechError, match="folder.zip is in the way .* is not a file"):
        sources.download((tmp_path / "folder.zip").as_uri(), data, checksum=None)
    assert (data / "folder.zip").is_dir()


def test_earlier_download_of_the_same_url_with_another_checksum_is_replaced(tar_archive, tmp_path, image_folder):
    """The tool's own earlier download, as it left it, is fetched again when the checksum asks for
    other bytes (the file changed upstream and the known checksum with it)."""
    data, source = tmp_path / "data", tmp_path / "upstream" / tar_archive.name
    source.parent.mkdir()
    pack_tar_gz(image_folder, source)
    path = sources.download(source.as_uri(), data, checksum=None)
    shutil.copy(tar_archive, source)  # a new version of the archive under the same URL
    digest = sources.hashlib.sha256(tar_archive.read_bytes()).hexdigest()
    again = sources.download(source.as_uri(), data, checksum=f"sha256:{digest}")
    assert again == path and path.read_bytes() == tar_archive.read_bytes()
    assert sorted(p.name for p in data.iterdir()) == sorted([path.name, f".{path.name}.download"])


class ArchiveServer:
    """An HTTP server on localhost for one archive: ``?truncate=N`` sends the first N bytes under
    the full Content-Length and closes (as a dropped connection does), ``?slow=1`` trickles it,
    ``?length=X`` announces X as its length, ``?status=N`` answers with that HTTP error."""

    def __init__(self, archive: Path) -> None:
        import http.server
        import threading

        body = archive.read_bytes()

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (the http.server interface)
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
                    self.wfile.write(body[start:start + 4096])
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


def test_connection_that_closes_early_is_never_taken_for_a_whole_download(tar_archive, tmp_path, server, monkeypatch):
    monkeypatch.setattr(sources, "RETRY_PAUSE_S", 0.0)
    data = tmp_path / "data"
    with pytest.raises(CaltechError, match=r"3 attempts.*closed after 1000 of the \d+ bytes announced"):
        sources.download(server.url + "?truncate=1000", data, checksum=None)
    assert list(data.iterdir()) == [], "no half file is renamed into place or left behind"
    path = sources.download(server.url, data, checksum=None)
    assert path.read_bytes() == tar_archive.read_bytes()


def test_download_marker_place_is_never_written_through(tar_archive, tmp_path):
    """A link, a folder or a file of the user's where the download's marker goes: nothing outside
    data_dir is read or written through it, the run stops with one line, no partial file stays."""
    data, outside = tmp_path / "data", tmp_path / "outside.txt"
    data.mkdir()
    outside.write_text("precious")
    marker = data / f".{tar_archive.name}.download"
    for planted, says in [(lambda: marker.symlink_to(outside), "is not a file"),
                          (lambda: marker.mkdir(), "is not a file"),
                          (lambda: marker.write_text("my notes"), "is not a marker of caltech's")]:
        planted()
        with pytest.raises(CaltechError, match=f"{marker} {says}, where the download .* keeps its marker"):
            sources.download(tar_archive.as_uri(), data, checksum=None)
        assert outside.read_text() == "precious"
        assert sorted(p.name for p in data.iterdir()) == [marker.name], "nothing downloaded, nothing left"
        shutil.rmtree(marker) if marker.is_dir() and not marker.is_symlink() else marker.unlink()


def test_download_that_is_ours_only_while_unchanged(tar_archive, tmp_path, image_folder):
    """Another URL's earlier download is replaced; a download the user has since replaced with a file
    of their own is theirs (the marker records size and time), and a folder with a forged marker
    too; without a checksum a file the user put there is used as it is."""
    data = tmp_path / "data"
    other = tmp_path / "elsewhere" / tar_archive.name
    other.parent.mkdir()
    pack_tar_gz(image_folder, other)
    path = sources.download(other.as_uri(), data, checksum=None)
    assert sources.download(tar_archive.as_uri(), data, checksum=None) == path
    assert path.read_bytes() == tar_archive.read_bytes(), "the download of another URL was replaced"
    digest = sources.hashlib.sha256(tar_archive.read_bytes()).hexdigest()
    path.write_bytes(b"my own archive")
    with pytest.raises(CaltechError, match="is in the way .* does not match the checksum"):
        sources.download(tar_archive.as_uri(), data, checksum=f"sha256:{digest}")
    assert path.read_bytes() == b"my own archive"
    assert sources.download(tar_archive.as_uri(), data, checksum=None).read_bytes() == b"my own archive"
    path.unlink()
    path.mkdir()
    (data / f".{path.name}.download").write_text(f'{{"url": "{tar_archive.as_uri()}"}}')
    with pytest.raises(CaltechError, match="is in the way .* is not a file"):
        sources.download(tar_archive.as_uri(), data, checksum=None)
    assert path.is_dir() and not list(data.glob("*.part")) and not list(data.glob(".*.part"))


def test_download_names_that_would_collide_or_not_fit(tar_archive, tmp_path, server):
    """A URL without an archive suffix does not take the name of the folder it is extracted to;
    a name too long for a file system gets a short one; an invalid URL is one line."""
    suffixless = tmp_path / "photos"
    shutil.copy(tar_archive, suffixless)
    data = ImageFolderDataModule(suffixless.as_uri(), data_dir=str(tmp_path / "data"), split=(50, 25, 25))
    data.prepare_data()
    assert (tmp_path / "data" / "photos.archive").is_file() and data.class_names == sorted(CLASSES)
    long_name = "x" * 240 + ".tar.gz"
    assert sources.download_name(f"https://example.org/{long_name}").startswith("download-")
    assert sources.download_name(f"https://example.org/{long_name}").endswith(".tar.gz")
    with pytest.raises(CaltechError, match=r"cannot download .* \(1 attempt, last: URL can't contain"):
        sources.download(server.url.replace(tar_archive.name, "my photos.tar.gz"), tmp_path / "d2", checksum=None)


class ZeroReader:
    """A file of ``size`` zero bytes that takes no memory (for a member that is slow to write)."""

    def __init__(self, size: int) -> None:
        self.left = size

    def read(self, count: int = -1) -> bytes:
        count = self.left if count < 0 else min(count, self.left)
        self.left -= count
        return bytes(count)


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
            [str(Path(sys.executable).with_name("caltech")), "fit", *small_run(tmp_path, source), "--trainer.logger",
             "false"], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            preexec_fn=as_from_a_terminal)
        deadline = time.monotonic() + 120
        while not [p for p in data.glob(busy) if p not in theirs] and time.monotonic() < deadline:
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        output = process.communicate(timeout=60)[0]
        assert process.returncode == 128 + signal.SIGTERM, output[-3000:]
        assert sorted(data.iterdir()) == sorted([*theirs, data / ".prepare.lock"]), output[-3000:]
        assert "Traceback" not in output


def test_extraction_marker_place_is_never_written_through_or_waited_on(tar_archive, tmp_path):
    """A link to a file outside, or a FIFO, where the extracted folder's marker goes: one line, the
    outside file unchanged, no wait on the FIFO (an alarm fails the test instead of hanging it)."""
    outside = tmp_path / "outside.txt"
    outside.write_text("precious")
    for plant in (lambda marker: marker.symlink_to(outside), lambda marker: os.mkfifo(marker)):
        data = tmp_path / f"data{len(list(tmp_path.iterdir()))}"
        data.mkdir()
        marker = data / f".{FOLDER}.complete"
        plant(marker)
        def hang(signum, frame):
            raise TimeoutError("prepare_data waited on the FIFO")

        previous = signal.signal(signal.SIGALRM, hang)
        signal.alarm(30)
        try:
            with pytest.raises(CaltechError, match=rf"{marker} is not a file, where caltech marks the folder"):
                Caltech101DataModule(str(tar_archive), str(data)).prepare_data()
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, previous)
        assert outside.read_text() == "precious"
        assert sorted(p.name for p in data.iterdir()) == sorted([marker.name, ".prepare.lock"])


def test_file_that_appears_while_downloading_is_the_users(tar_archive, tmp_path, monkeypatch):
    """The target is checked again when the download is done: a file put there meanwhile stays."""
    data = tmp_path / "data"
    target = data / tar_archive.name
    real = sources._fetch

    def user_copies_theirs_meanwhile(*args, **kwargs):
        digest = real(*args, **kwargs)
        target.write_bytes(b"copied by the user meanwhile")
        return digest

    monkeypatch.setattr(sources, "_fetch", user_copies_theirs_meanwhile)
    with pytest.raises(CaltechError, match=f"{target} is in the way .* appeared while it downloaded"):
        sources.download(tar_archive.as_uri(), data, checksum=None)
    assert target.read_bytes() == b"copied by the user meanwhile"
    assert sorted(p.name for p in data.iterdir() if not p.name.endswith(".download")) == [target.name]


def test_odd_servers_urls_checksums_and_locks_are_one_line(tar_archive, tmp_path, server, monkeypatch):
    monkeypatch.setattr(sources, "RETRY_PAUSE_S", 0.0)
    data = tmp_path / "data"
    assert sources.download(server.url + "?length=abc", data, checksum=None).read_bytes() == tar_archive.read_bytes()
    with pytest.raises(CaltechError, match=r"\(1 attempt, last: HTTP Error 404"):
        sources.download(server.url + "?status=404", tmp_path / "d404", checksum=None)  # not asked 3 times
    with pytest.raises(CaltechError, match="must look like 'sha256:<hex>'"):
        sources.download(server.url, tmp_path / "dshake", checksum="shake_128:abcd")
    with pytest.raises(CaltechError) as raised:
        sources.download(server.url.replace(tar_archive.name, "a\nb.tar.gz"), tmp_path / "dnl", checksum=None)
    assert "\n" not in str(raised.value) and "a\\nb.tar.gz" in str(raised.value)
    assert sources.archive_stem("https://example.org/x/..") == "dataset"
    assert sources.archive_stem("a" * 247 + ".tar.gz").startswith("dataset-")
    locked = tmp_path / "dlock"
    (locked / ".prepare.lock").mkdir(parents=True)
    with pytest.raises(CaltechError, match=r"data.data_dir: cannot lock .*\.prepare\.lock .*Fix: remove"):
        Caltech101DataModule(str(tar_archive), str(locked)).prepare_data()
