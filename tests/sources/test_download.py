"""sources.download: streamed into a partial file, checked, renamed into place; never over a file of the user's."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest

from caltech_cli.data import Caltech101DataModule, ImageFolderDataModule
from caltech_cli.errors import CaltechError
from caltech_cli.sources import download as downloads
from caltech_cli.sources.names import archive_stem, download_name

from conftest import CLASSES, FOLDER, data_module, pack_tar_gz, run_caltech, small_run, within


def test_download_with_wrong_checksum_leaves_nothing(tar_archive, tmp_path):
    dm = data_module(tar_archive.as_uri(), tmp_path / "data", checksum="sha256:" + "0" * 64)
    with pytest.raises(CaltechError, match="checksum"):
        dm.prepare_data()
    assert not list((tmp_path / "data").glob(f"*{tar_archive.name}*")), "no partial or bad file may stay"
    assert not (tmp_path / "data" / FOLDER).exists()


def test_download_checksum_is_verified_when_right(tar_archive, tmp_path):
    digest = hashlib.sha256(tar_archive.read_bytes()).hexdigest()
    dm = data_module(tar_archive.as_uri(), tmp_path / "data", checksum=f"sha256:{digest}")
    dm.prepare_data()
    assert len(dm.find_classes()) == len(CLASSES)


@pytest.mark.hostile
def test_download_retries_then_succeeds(tar_archive, tmp_path, monkeypatch):
    real = downloads.urllib.request.urlopen
    calls = []

    def flaky(url, timeout):
        calls.append(url)
        if len(calls) < 3:
            raise TimeoutError("timed out")
        return real(url, timeout=timeout)

    monkeypatch.setattr(downloads.urllib.request, "urlopen", flaky)
    monkeypatch.setattr(downloads, "RETRY_PAUSE_S", 0.0)
    path = downloads.download(tar_archive.as_uri(), tmp_path, checksum=None)
    assert len(calls) == 3 and path.read_bytes() == tar_archive.read_bytes()


@pytest.mark.hostile
def test_download_gives_one_error_after_its_attempts(tmp_path, monkeypatch):
    monkeypatch.setattr(downloads, "RETRY_PAUSE_S", 0.0)
    with pytest.raises(CaltechError, match=r"3 attempts.*--data.source"):
        downloads.download((tmp_path / "missing.zip").as_uri(), tmp_path / "data", checksum=None)
    assert not list((tmp_path / "data").glob("*missing.zip*")), "no partial file stays"


@pytest.mark.e2e
@pytest.mark.hostile
def test_file_of_the_user_in_the_way_of_a_download_is_never_replaced(tar_archive, tmp_path):
    """A same-named file in data_dir that the tool did not download (another version, the user's
    own) stops the run with one line naming it; it and a ``<name>.part`` of the user's stay."""
    data = tmp_path / "data"
    data.mkdir()
    theirs, their_part = data / tar_archive.name, data / f"{tar_archive.name}.part"
    theirs.write_bytes(b"another version")
    their_part.write_bytes(b"notes")
    digest = hashlib.sha256(tar_archive.read_bytes()).hexdigest()
    result = run_caltech(
        "fit",
        *small_run(tmp_path, tar_archive.as_uri()),
        "--data.checksum",
        f"sha256:{digest}",
        "--trainer.logger",
        "false",
        cwd=tmp_path,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("caltech: error:")]
    assert len(errors) == 1 and f"{theirs} is in the way" in errors[0] and "Fix: move it out" in errors[0]
    assert "Traceback" not in result.stderr
    assert theirs.read_bytes() == b"another version" and their_part.read_bytes() == b"notes"
    (data / "folder.zip").mkdir()
    with pytest.raises(CaltechError, match="folder.zip is in the way .* is not a file"):
        downloads.download((tmp_path / "folder.zip").as_uri(), data, checksum=None)
    assert (data / "folder.zip").is_dir()


@pytest.mark.hostile
def test_earlier_download_of_the_same_url_with_another_checksum_is_replaced(tar_archive, tmp_path, image_folder):
    """The tool's own earlier download, as it left it, is fetched again when the checksum asks for
    other bytes (the file changed upstream and the known checksum with it)."""
    data, source = tmp_path / "data", tmp_path / "upstream" / tar_archive.name
    source.parent.mkdir()
    pack_tar_gz(image_folder, source)
    path = downloads.download(source.as_uri(), data, checksum=None)
    shutil.copy(tar_archive, source)  # a new version of the archive under the same URL
    digest = hashlib.sha256(tar_archive.read_bytes()).hexdigest()
    again = downloads.download(source.as_uri(), data, checksum=f"sha256:{digest}")
    assert again == path and path.read_bytes() == tar_archive.read_bytes()
    assert sorted(p.name for p in data.iterdir()) == sorted([path.name, f".{path.name}.download"])


@pytest.mark.hostile
def test_connection_that_closes_early_is_never_taken_for_a_whole_download(tar_archive, tmp_path, server, monkeypatch):
    monkeypatch.setattr(downloads, "RETRY_PAUSE_S", 0.0)
    data = tmp_path / "data"
    with pytest.raises(CaltechError, match=r"3 attempts.*closed after 1000 of the \d+ bytes announced"):
        downloads.download(server.url + "?truncate=1000", data, checksum=None)
    assert list(data.iterdir()) == [], "no half file is renamed into place or left behind"
    path = downloads.download(server.url, data, checksum=None)
    assert path.read_bytes() == tar_archive.read_bytes()


@pytest.mark.hostile
def test_download_marker_place_is_never_written_through(tar_archive, tmp_path):
    """A link, a folder or a file of the user's where the download's marker goes: nothing outside
    data_dir is read or written through it, the run stops with one line, no partial file stays."""
    data, outside = tmp_path / "data", tmp_path / "outside.txt"
    data.mkdir()
    outside.write_text("precious")
    marker = data / f".{tar_archive.name}.download"
    for planted, says in [
        (lambda: marker.symlink_to(outside), "is not a file"),
        (lambda: marker.mkdir(), "is not a file"),
        (lambda: marker.write_text("my notes"), "is not a marker of caltech's"),
    ]:
        planted()
        with pytest.raises(CaltechError, match=f"{marker} {says}, where the download .* keeps its marker"):
            downloads.download(tar_archive.as_uri(), data, checksum=None)
        assert outside.read_text() == "precious"
        assert sorted(p.name for p in data.iterdir()) == [marker.name], "nothing downloaded, nothing left"
        shutil.rmtree(marker) if marker.is_dir() and not marker.is_symlink() else marker.unlink()


@pytest.mark.hostile
def test_download_that_is_ours_only_while_unchanged(tar_archive, tmp_path, image_folder):
    """Another URL's earlier download is replaced; a download the user has since replaced with a file
    of their own is theirs (the marker records size and time), and a folder with a forged marker
    too; without a checksum a file the user put there is used as it is."""
    data = tmp_path / "data"
    other = tmp_path / "elsewhere" / tar_archive.name
    other.parent.mkdir()
    pack_tar_gz(image_folder, other)
    path = downloads.download(other.as_uri(), data, checksum=None)
    assert downloads.download(tar_archive.as_uri(), data, checksum=None) == path
    assert path.read_bytes() == tar_archive.read_bytes(), "the download of another URL was replaced"
    digest = hashlib.sha256(tar_archive.read_bytes()).hexdigest()
    path.write_bytes(b"my own archive")
    with pytest.raises(CaltechError, match="is in the way .* does not match the checksum"):
        downloads.download(tar_archive.as_uri(), data, checksum=f"sha256:{digest}")
    assert path.read_bytes() == b"my own archive"
    assert downloads.download(tar_archive.as_uri(), data, checksum=None).read_bytes() == b"my own archive"
    path.unlink()
    path.mkdir()
    (data / f".{path.name}.download").write_text(f'{{"url": "{tar_archive.as_uri()}"}}')
    with pytest.raises(CaltechError, match="is in the way .* is not a file"):
        downloads.download(tar_archive.as_uri(), data, checksum=None)
    assert path.is_dir() and not list(data.glob("*.part")) and not list(data.glob(".*.part"))


@pytest.mark.hostile
def test_download_names_that_would_collide_or_not_fit(tar_archive, tmp_path, server):
    """A URL without an archive suffix does not take the name of the folder it is extracted to;
    a name too long for a file system gets a short one; an invalid URL is one line."""
    suffixless = tmp_path / "photos"
    shutil.copy(tar_archive, suffixless)
    data = ImageFolderDataModule(suffixless.as_uri(), data_dir=str(tmp_path / "data"), split=(50, 25, 25))
    data.prepare_data()
    assert (tmp_path / "data" / "photos.archive").is_file() and data.find_classes() == sorted(CLASSES)
    long_name = "x" * 240 + ".tar.gz"
    assert download_name(f"https://example.org/{long_name}").startswith("download-")
    assert download_name(f"https://example.org/{long_name}").endswith(".tar.gz")
    with pytest.raises(CaltechError, match=r"cannot download .* \(1 attempt, last: URL can't contain"):
        downloads.download(server.url.replace(tar_archive.name, "my photos.tar.gz"), tmp_path / "d2", checksum=None)


@pytest.mark.hostile
def test_file_that_appears_while_downloading_is_the_users(tar_archive, tmp_path, monkeypatch):
    """The target is checked again when the download is done: a file put there meanwhile stays."""
    data = tmp_path / "data"
    target = data / tar_archive.name
    real = downloads._stream

    def user_copies_theirs_meanwhile(*args, **kwargs):
        digest = real(*args, **kwargs)
        target.write_bytes(b"copied by the user meanwhile")
        return digest

    monkeypatch.setattr(downloads, "_stream", user_copies_theirs_meanwhile)
    with pytest.raises(CaltechError, match=f"{target} is in the way .* appeared while it downloaded"):
        downloads.download(tar_archive.as_uri(), data, checksum=None)
    assert target.read_bytes() == b"copied by the user meanwhile"
    assert sorted(p.name for p in data.iterdir() if not p.name.endswith(".download")) == [target.name]


@pytest.mark.hostile
def test_odd_servers_urls_checksums_and_locks_are_one_line(tar_archive, tmp_path, server, monkeypatch):
    monkeypatch.setattr(downloads, "RETRY_PAUSE_S", 0.0)
    data = tmp_path / "data"
    assert downloads.download(server.url + "?length=abc", data, checksum=None).read_bytes() == tar_archive.read_bytes()
    with pytest.raises(CaltechError, match=r"\(1 attempt, last: HTTP Error 404"):
        downloads.download(server.url + "?status=404", tmp_path / "d404", checksum=None)  # not asked 3 times
    with pytest.raises(CaltechError, match="must look like 'sha256:<hex>'"):
        downloads.download(server.url, tmp_path / "dshake", checksum="shake_128:abcd")
    with pytest.raises(CaltechError) as raised:
        downloads.download(server.url.replace(tar_archive.name, "a\nb.tar.gz"), tmp_path / "dnl", checksum=None)
    assert "\n" not in str(raised.value) and "a\\nb.tar.gz" in str(raised.value)
    assert archive_stem("https://example.org/x/..") == "dataset"
    assert archive_stem("a" * 247 + ".tar.gz").startswith("dataset-")
    locked = tmp_path / "dlock"
    (locked / ".prepare.lock").mkdir(parents=True)
    with pytest.raises(CaltechError, match=r"data.data_dir: cannot lock .*\.prepare\.lock .*Fix: remove"):
        Caltech101DataModule(str(tar_archive), str(locked)).prepare_data()


@pytest.mark.hostile
@pytest.mark.parametrize("kind", ["FIFO", "device"])
def test_a_file_url_that_names_no_file_is_one_line(tmp_path, kind):
    """A FIFO would be waited on forever, /dev/zero read until the disk is full."""
    path = Path("/dev/zero") if kind == "device" else tmp_path / "photos.tar.gz"
    if kind == "FIFO":
        os.mkfifo(path)
    with within(20), pytest.raises(CaltechError, match=f"names a {kind}, not a file"):
        downloads.download(path.as_uri(), tmp_path / "data", checksum=None)
    assert not (tmp_path / "data").exists() or not list((tmp_path / "data").iterdir())


@pytest.mark.hostile
@pytest.mark.parametrize("query", ["", "?length=abc"], ids=["announced", "streamed"])
def test_a_download_past_the_size_limit_is_stopped(tar_archive, tmp_path, server, query):
    """Announced (Content-Length) or not, a download stops at the limit and leaves nothing."""
    limit = tar_archive.stat().st_size // 2
    with pytest.raises(CaltechError, match=f"is over {limit:,} bytes, the limit .* Fix: raise data.max_extract_gb"):
        downloads.download(server.url + query, tmp_path / "data", checksum=None, max_bytes=limit)
    assert list((tmp_path / "data").iterdir()) == []
    assert downloads.download(server.url + query, tmp_path / "data", checksum=None).is_file()
