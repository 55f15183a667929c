"""sources.extract: the wanted folder found in nested archives and moved into place, marked; the user's folders stay."""

from __future__ import annotations

import logging
import os
import signal
import tarfile
import zipfile

import pytest

from caltech_cli.data import Caltech101DataModule, ImageFolderDataModule
from caltech_cli.errors import CaltechError
from caltech_cli.sources.markers import extracted_from

from conftest import (
    CLASSES,
    FOLDER,
    data_module,
    link,
    member,
    no_links_under,
    prepare,
    tar_gz,
    tar_with,
    written_outside,
)


def test_prepare_finds_folder_inside_nested_archive(nested_zip, tmp_path, count_extractions):
    dm = data_module(nested_zip, tmp_path / "data")
    dm.prepare_data()
    assert count_extractions == [nested_zip.name, f"{FOLDER}.tar.gz"]
    assert dm.find_classes() == sorted(CLASSES)


def test_archive_without_the_folder_is_refused(tmp_path):

    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "a.txt").write_text("x")
    archive = tmp_path / "other.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "other", arcname="other")
    with pytest.raises(CaltechError, match=f"no folder named {FOLDER}"):
        data_module(archive, tmp_path / "data").prepare_data()
    assert not (tmp_path / "data" / FOLDER).exists()


@pytest.mark.hostile
def test_unsafe_member_inside_a_nested_archive(tmp_path):
    inner = tar_with(tmp_path / f"{FOLDER}.tar.gz", member("../../evil.txt"))
    outer = tmp_path / "outer.zip"
    with zipfile.ZipFile(outer, "w") as zf:
        zf.write(inner, f"caltech-101/{inner.name}")
    with pytest.raises(CaltechError, match="evil.txt"):
        prepare(outer, tmp_path / "data")
    assert written_outside(tmp_path, tmp_path / "data") == []


@pytest.mark.hostile
def test_link_that_leads_out_only_once_moved_is_left_out(tmp_path, caplog):
    """Inside the scratch folder the link stays in; moved past its wrapper folders into data_dir,
    it would reach a file of the machine."""
    host_file = tmp_path / "sandbox" / "secret.jpg"
    host_file.parent.mkdir()
    host_file.write_bytes(b"the machine's own file")
    archive = tar_gz(
        tmp_path / "wrapped.tar.gz",
        (member(f"wrap/{FOLDER}/cats/ok.txt"), b"ok"),
        link(f"wrap/{FOLDER}/cats/secret.jpg", "../../../secret.jpg"),
    )
    data_dir = tmp_path / "sandbox" / "data"
    with caplog.at_level(logging.INFO, logger="caltech_cli"):
        prepare(archive, data_dir)
    assert (data_dir / FOLDER / "cats" / "ok.txt").read_text() == "ok"
    assert not os.path.lexists(data_dir / FOLDER / "cats" / "secret.jpg")
    assert no_links_under(data_dir)
    assert "Left out 1 symbolic links" in caplog.text


@pytest.mark.hostile
def test_link_to_its_own_folder_does_not_make_data_dir_the_data_set(tmp_path):
    archive = tar_gz(tmp_path / "photos.tar.gz", link("top", "."))
    data_dir = tmp_path / "data"
    (data_dir / "feature-cache").mkdir(parents=True)
    data = ImageFolderDataModule(str(archive), data_dir=str(data_dir), num_workers=0)
    with pytest.raises(CaltechError, match="no class folders"):
        data.find_classes()
    assert not (data_dir / "photos").is_symlink() and no_links_under(data_dir)
    assert data.root.resolve() != data_dir.resolve()


@pytest.mark.hostile
def test_nested_archives_share_one_budget(tmp_path):
    """Each archive unpacks to 3 MiB, under the 4 MiB limit; together they pass it."""
    zeros = bytes(3 * 2**20)
    inner = tar_gz(
        tmp_path / f"{FOLDER}.tar.gz", (member("zeros-inner.bin"), zeros), (member(f"{FOLDER}/cats/ok.txt"), b"ok")
    )
    outer = tar_gz(
        tmp_path / "outer.tar.gz",
        (member("zeros-outer.bin"), zeros),
        (member(f"wrap/{inner.name}"), inner.read_bytes()),
    )
    with pytest.raises(
        CaltechError, match=r"outer\.tar\.gz unpacks to .* \(archives inside it included\), over the limit"
    ):
        prepare(outer, tmp_path / "data", max_extract_gb=4 / 1024)
    assert not (tmp_path / "data" / FOLDER).exists()
    prepare(outer, tmp_path / "data", max_extract_gb=8 / 1024)
    assert (tmp_path / "data" / FOLDER / "cats" / "ok.txt").is_file()


@pytest.mark.hostile
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


@pytest.mark.hostile
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
        assert extracted_from(data.root) == str(archive)
    assert folders == [["one.txt"], ["two.txt"]]


@pytest.mark.hostile
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
