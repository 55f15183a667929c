"""sources.unpack: one archive, member by member, checked before it is written, under one budget."""

from __future__ import annotations

import gzip
import io
import logging
import os
import shutil
import stat
import subprocess
import tarfile
import zipfile
from pathlib import Path

import pytest

from caltech_cli.data import ImageFolderDataModule
from caltech_cli.errors import CaltechError
from caltech_cli.sources import unpack

from conftest import FOLDER, damaged, member, no_links_under, prepare, tar_gz, tar_with, written_outside


@pytest.mark.hostile
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


@pytest.mark.hostile
def test_unsafe_zip_member_is_refused(tmp_path):
    archive = tmp_path / "bad.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr(f"{FOLDER}/cats/ok.txt", "ok")
        zf.writestr("../../evil.txt", "x")
    with pytest.raises(CaltechError, match="'../../evil.txt'"):
        prepare(archive, tmp_path / "data")
    assert written_outside(tmp_path, tmp_path / "data") == []


@pytest.mark.hostile
def test_decompression_bomb_is_refused_before_extraction(tmp_path):
    big = member(f"{FOLDER}/cats/zeros.bin", size=3 * 2**20)
    archive = tar_with(tmp_path / "bomb.tar.gz", big, payload=bytes(3 * 2**20))
    assert archive.stat().st_size < 100_000, "compresses to almost nothing"
    with pytest.raises(CaltechError, match="over the limit"):
        prepare(archive, tmp_path / "data", max_extract_gb=2 / 1024)
    assert not (tmp_path / "data" / FOLDER).exists()
    with pytest.raises(CaltechError, match="2 files"):
        prepare(archive, tmp_path / "data2", max_extract_files=1)


@pytest.mark.hostile
def test_extracted_tree_is_checked_for_any_format(tmp_path):
    root = tmp_path / "extracted"
    root.mkdir()
    (root / "fine.txt").write_text("ok")
    (root / "escape").symlink_to(tmp_path)
    budget = unpack.Budget(unpack.Limits(2**30, 100), "x.rar")
    with pytest.raises(CaltechError, match="'escape' is a symbolic link"):
        unpack.check_tree("x.rar", root, budget)
    (root / "escape").unlink()
    (tmp_path / "outside.txt").write_text("a file of the machine")
    os.link(tmp_path / "outside.txt", root / "hard")
    with pytest.raises(CaltechError, match="'hard' is a hard link to a file outside"):
        unpack.check_tree("x.rar", root, budget)


@pytest.mark.hostile
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
    assert not list(tmp_path.rglob("evil*"))


@pytest.mark.hostile
def test_tar_and_zip_are_never_handed_to_another_program(nested_zip, tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("patool was asked to extract a tar or zip archive")

    monkeypatch.setattr(unpack.patoolib, "extract_archive", refuse)
    prepare(nested_zip, tmp_path / "data")
    assert (tmp_path / "data" / FOLDER / "circles").is_dir()


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


@pytest.mark.hostile
@pytest.mark.parametrize("make", [hostile_modes_tar, hostile_modes_zip], ids=["tar", "zip"])
def test_extracted_files_get_safe_modes_and_the_running_user(tmp_path, make):
    archive = make(tmp_path / ("modes.tar.gz" if make is hostile_modes_tar else "modes.zip"))
    prepare(archive, tmp_path / "data")
    assert (tmp_path / "data" / FOLDER / "cats" / "setuid.bin").read_text() == "x"
    assert_safe(tmp_path / "data" / FOLDER)


@pytest.mark.e2e
@pytest.mark.hostile
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


@pytest.mark.hostile
def test_hard_link_inside_becomes_a_copy(tmp_path):
    archive = tar_gz(
        tmp_path / "linked.tar.gz",
        (member(f"{FOLDER}/cats/a.txt"), b"same"),
        (member(f"{FOLDER}/dogs/b.txt", tarfile.LNKTYPE, f"{FOLDER}/cats/a.txt"), None),
    )
    prepare(archive, tmp_path / "data")
    copy = tmp_path / "data" / FOLDER / "dogs" / "b.txt"
    assert copy.read_text() == "same" and copy.stat().st_nlink == 1


@pytest.fixture
def no_programs(tmp_path, monkeypatch):
    """A PATH with no archive programs on it (patool caches where it found programs)."""
    empty = tmp_path / "empty-path"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    unpack.patoolib.util.find_program.cache_clear()
    yield
    unpack.patoolib.util.find_program.cache_clear()


@pytest.mark.hostile
def test_missing_extractor_program_is_named(tmp_path, no_programs):
    archive = tmp_path / "photos.rar"
    archive.write_bytes(b"Rar!\x1a\x07\x01\x00" + bytes(64))
    with pytest.raises(CaltechError) as error:
        ImageFolderDataModule(str(archive), data_dir=str(tmp_path / "data"), num_workers=0).prepare_data()
    message = str(error.value)
    assert "photos.rar" in message and "unrar" in message and "7z" in message and "Fix: install" in message
    assert "\n" not in message


@pytest.mark.hostile
@pytest.mark.parametrize("how", ["truncated", "overwritten"])
@pytest.mark.parametrize("which", ["tar_archive", "nested_zip"])
def test_damaged_archive_is_named(request, tmp_path, which, how):
    archive = damaged(request.getfixturevalue(which), how, tmp_path)
    with pytest.raises(CaltechError, match=rf"{archive.name}.* is damaged or incomplete .*Fix: download it again"):
        prepare(archive, tmp_path / "data")
    assert not (tmp_path / "data" / FOLDER).exists()


@pytest.mark.hostile
def test_a_member_nested_too_deep_is_refused_before_anything_is_marked(tmp_path):
    """A tree a thousand folders deep breaks Python's own walks (a RecursionError traceback,
    after the folder was marked complete); it is refused by name before it is written."""
    deep = "/".join(["d"] * 1100)
    archive = tar_gz(tmp_path / "deep.tar.gz", (member(f"{FOLDER}/cats/ok.txt"), b"ok"),
                     (member(f"{FOLDER}/cats/{deep}/x.jpg"), b"x"))  # fmt: skip
    with pytest.raises(CaltechError, match="is nested more than 64 folders deep"):
        prepare(archive, tmp_path / "data")
    assert not (tmp_path / "data" / FOLDER).exists()
    assert not (tmp_path / "data" / f".{FOLDER}.complete").exists()
    assert not list((tmp_path / "data").glob(".extracting-*"))
