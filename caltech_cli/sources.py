"""Getting a data set onto disk: download, verify, extract, find the image folder.

A download streams into a ``.<name>.*.part`` file of its own and is renamed into place only once
it is complete (the length the server announced) and its checksum matches, so a file with the
final name is always a whole one; a marker beside it says which URL it came from, so that only
the tool's own downloads are ever replaced. An extraction goes into a temporary folder and is
moved into place, then its marker says it is complete: a folder whose marker does not say so is
never used, and a folder without a marker is the user's and is never replaced.

Archives come from the internet, so extraction trusts nothing in them. tar and zip archives are
read and written here, member by member, by Python's ``tarfile`` and ``zipfile``, so what is
checked is exactly what is written: an absolute path, a ``..`` that climbs out, a link that
points outside, a device file or FIFO is refused by name; other symbolic links are left out (an
image data set needs none, and where a link points changes when its folder moves); files get
mode 0644, folders 0755 and the running user as owner; and one size and file-count budget holds
for everything extracted from one source, archives inside it included (decompression bombs).
A damaged archive ends in one line naming it. Formats Python cannot read (rar, 7z, ...) go to
patool, and what it wrote is then checked and made the same way.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import lzma
import os
import posixpath
import re
import shutil
import signal
import stat
import tarfile
import tempfile
import threading
import time
import urllib.error
import urllib.request
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import IO, TypeVar
from urllib.parse import urlparse

import patoolib
from patoolib.util import PatoolError
from tqdm import tqdm

from caltech_cli.errors import CaltechError

log = logging.getLogger(__name__)

URL_SCHEMES = ("http", "https", "ftp", "file")
RETRY_PAUSE_S = 2.0
# Nested archives are opened to this depth when the wanted folder is not found at the top.
MAX_NESTING = 3
T = TypeVar("T")
_END = object()


def is_url(source: str) -> bool:
    return urlparse(source).scheme in URL_SCHEMES


def _hasher(checksum: str) -> tuple[hashlib._Hash, str]:
    algorithm, _, expected = checksum.partition(":")
    if not expected or algorithm not in hashlib.algorithms_guaranteed or algorithm.startswith("shake"):
        raise CaltechError(f"checksum {checksum!r} must look like 'sha256:<hex>' or 'md5:<hex>'.")
    return hashlib.new(algorithm), expected.lower()


def file_digest(path: Path, algorithm: str = "sha256") -> str:
    """Hex digest of a file, read in 1 MiB blocks."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_checksum(path: Path, checksum: str) -> bool:
    """Whether ``path`` matches ``checksum`` ('algorithm:hex')."""
    digest, expected = _hasher(checksum)
    return file_digest(path, digest.name) == expected


def _fetch(url: str, partial: Path, name: str, checksum: str | None, timeout: float) -> str:
    """Stream ``url`` into ``partial``; return its digest ('' when no checksum is asked for).

    A connection that closes before the length the server announced is an error (Python's
    ``read`` just returns short), so a half file is never taken for a whole one."""
    digest = _hasher(checksum)[0] if checksum else None
    received = 0
    with urllib.request.urlopen(url, timeout=timeout) as response, open(partial, "wb") as out:
        announced = (response.headers.get("Content-Length") or "").strip()
        total = int(announced) if announced.isdigit() and int(announced) > 0 else None
        with tqdm(total=total, unit="B", unit_scale=True, desc=f"Downloading {name}") as bar:
            for block in iter(lambda: response.read(1 << 20), b""):
                out.write(block)
                received += len(block)
                if digest is not None:
                    digest.update(block)
                bar.update(len(block))
    if total is not None and received != total:
        raise ConnectionError(f"the connection closed after {received} of the {total} bytes announced")
    return digest.hexdigest() if digest is not None else ""


def download_name(url: str) -> str:
    """The file name a download of ``url`` gets: the URL's own, with ``.archive`` added where it
    has no archive suffix (the extracted folder takes the name without the suffix), and a short
    name made from the URL's hash where the URL's would be too long for a file system."""
    name = Path(urlparse(url).path).name
    if name in ("", ".", ".."):
        name = "download"
    suffix = _archive_suffix(name)
    if suffix is None:
        name, suffix = name + ".archive", ".archive"
    if len(os.fsencode(name)) > 200:
        name = f"download-{hashlib.sha256(url.encode()).hexdigest()[:16]}{suffix}"
    return name


def _download_marker(target: Path) -> Path:
    return target.with_name(f".{target.name}.download")


def _read_record(path: Path) -> dict | None:
    """The JSON object in the marker file at ``path``; None unless it is a regular file (a link,
    a folder or a FIFO is never opened, read through or waited on) holding one."""
    try:
        if not stat.S_ISREG(path.lstat().st_mode):
            return None
        descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        with os.fdopen(descriptor, "rb") as file:
            record = json.loads(file.read(1 << 16))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _write_record(path: Path, record: dict) -> None:
    """Write a marker to a new file and rename it to ``path``: what is at ``path`` (callers have
    made sure it is one of our markers, or nothing) is replaced, never written through."""
    handle, scratch = tempfile.mkstemp(dir=path.parent, prefix=f"{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w") as out:
            out.write(json.dumps(record))
        os.chmod(scratch, 0o644)
        os.replace(scratch, path)
    except BaseException:
        Path(scratch).unlink(missing_ok=True)
        raise


def _not_a_marker(marker: Path, is_ours: Callable[[dict], bool]) -> str | None:
    """Why the marker's place is not ours to write; None when it is free or holds our marker."""
    if not (marker.exists() or marker.is_symlink()):
        return None
    if marker.is_symlink() or not marker.is_file():
        return f"{marker} is not a file"
    record = _read_record(marker)
    return None if record is not None and is_ours(record) else f"{marker} is not a marker of caltech's"


def _is_download_record(record: dict) -> bool:
    return isinstance(record.get("url"), str)


def _downloaded_from(target: Path) -> str | None:
    """The URL that :func:`download` fetched ``target`` from; None when the file is not one of its
    downloads as it left it: the user put it there or changed it since (size and modification
    time are recorded), or there is no readable marker."""
    marked = _read_record(_download_marker(target))
    try:
        state = target.lstat()
    except OSError:
        return None
    if marked is None or not _is_download_record(marked) or not stat.S_ISREG(state.st_mode):
        return None
    if (marked.get("size"), marked.get("mtime_ns")) != (state.st_size, state.st_mtime_ns):
        return None
    return marked["url"]


@contextmanager
def sigterm_raises() -> Iterator[None]:
    """SIGTERM raises ``SystemExit(143)`` in the block, so its clean-up runs (the default action
    kills the process where it stands, leaving partial files); only in the main thread, where
    Python handles signals."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:  # None: a handler set outside Python, which cannot be put back; the default is
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def _shown(url: str) -> str:
    """A URL for a message: control characters escaped, so the message stays one line."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in url)


def _in_the_way(target: Path, url: str, why: str) -> CaltechError:
    return CaltechError(
        f"{target} is in the way of the download of {_shown(url)}: it {why}, and it is not an earlier download "
        f"of that URL. Fix: move it out of {target.parent}, or pass it with --data.source if it is the archive "
        "you want."
    )


def _put_in_place(partial: Path, target: Path, url: str, was_ours: str | None) -> None:
    """Rename the finished download to ``target`` and record it, unless what is at ``target``
    changed while it downloaded (a file put there is the user's). The marker is written first,
    describing the file it is about to become, so no stop leaves our download unmarked."""
    if was_ours is None and (target.exists() or target.is_symlink()):
        raise _in_the_way(target, url, "appeared while it downloaded")
    if was_ours is not None and _downloaded_from(target) != was_ours:
        raise _in_the_way(target, url, "changed while it downloaded")
    state = partial.stat()
    _write_record(_download_marker(target), {"url": url, "size": state.st_size, "mtime_ns": state.st_mtime_ns})
    if was_ours is not None:
        os.replace(partial, target)
        return
    try:
        os.link(partial, target)  # fails, where a rename would not, if a file appeared there after the check
    except FileExistsError:
        raise _in_the_way(target, url, "appeared while it downloaded") from None
    except OSError:  # a file system without hard links
        os.replace(partial, target)
        return
    partial.unlink()


def download(url: str, folder: Path, checksum: str | None, timeout: float = 60.0, attempts: int = 3) -> Path:
    """Stream ``url`` into ``folder`` with a progress bar; reuse a complete earlier download.

    Network errors, time-outs, server errors and connections that close early are retried
    ``attempts`` times with growing pauses; a partial file is deleted, never used (also on
    Ctrl-C, and on SIGTERM under :func:`sigterm_raises`, which ``prepare_data`` holds around the
    download and the extraction; ``kill -9`` leaves it, as a hidden ``.<name>.*.part``).

    A file of the same name is reused when it matches ``checksum``, or, without one, when it is
    an earlier download of the same URL or was put there by the user. Otherwise it is replaced
    only when it is an earlier download of this tool as the tool left it (a marker beside it
    records the URL, size and modification time): anything else there is the user's, and is
    never overwritten.
    """
    name = download_name(url)
    target = folder / name
    ours = _downloaded_from(target)
    if target.is_file():  # a link the user put there counts as the user's file
        if checksum is not None and file_checksum(target, checksum):
            log.info("Reusing the downloaded %s", target)
            return target
        if checksum is None and ours in (url, None):
            log.info("Reusing %s%s", target, "" if ours else " (no checksum to check it against)")
            return target
    if (target.exists() or target.is_symlink()) and ours is None:
        raise _in_the_way(target, url, "does not match the checksum" if target.is_file() else "is not a file")
    problem = _not_a_marker(_download_marker(target), _is_download_record)
    if problem is not None:
        raise CaltechError(
            f"{problem}, where the download of {_shown(url)} keeps its marker. Fix: move it out of {folder}."
        )
    folder.mkdir(parents=True, exist_ok=True)
    expected = _hasher(checksum)[1] if checksum else None
    for attempt in range(1, attempts + 1):
        # A name of its own, so that no file of the user's (a ``<name>.part``) is written over.
        handle, scratch = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".part")
        os.fchmod(handle, 0o644)
        os.close(handle)
        partial = Path(scratch)
        try:
            got = _fetch(url, partial, name, checksum, timeout)
            if expected is not None and got != expected:
                raise CaltechError(
                    f"the download of {_shown(url)} has checksum {got}, expected {expected}: the file is "
                    "damaged or not the one expected. Fix: try again, or pass another source with --data.source."
                )
            _put_in_place(partial, target, url, ours)
            return target
        except (OSError, http.client.HTTPException) as error:  # URLError, time-outs, resets, short reads
            partial.unlink(missing_ok=True)
            client_error = isinstance(error, urllib.error.HTTPError) and 400 <= error.code < 500 \
                and error.code not in (408, 429)  # asking again gets the same answer
            if attempt == attempts or client_error or isinstance(error, http.client.InvalidURL):
                raise CaltechError(
                    f"cannot download {_shown(url)} ({attempt} attempt{'s' * (attempt > 1)}, last: {error}). "
                    f"Fix: check the URL and the network, or download it yourself and pass the file with "
                    f"--data.source /path/to/{name}."
                ) from error
            log.warning("Download of %s failed (%s); trying again (%d of %d)", _shown(url), error, attempt + 1,
                        attempts)
            time.sleep(RETRY_PAUSE_S * attempt)
        except BaseException:  # a checksum that does not match, Ctrl-C, SIGTERM: no half file stays behind
            partial.unlink(missing_ok=True)
            raise
    raise AssertionError("unreachable: the last attempt returns or raises")


ARCHIVE_SUFFIXES = (".tar.gz", ".tar.bz2", ".tar.xz", ".tar.zst", ".tgz", ".tbz2", ".txz", ".tar", ".zip", ".rar", ".7z")


def _archive_suffix(name: str) -> str | None:
    """The archive suffix ``name`` ends with (any case), or None."""
    return next((suffix for suffix in ARCHIVE_SUFFIXES if name.lower().endswith(suffix)), None)


def archive_stem(source: str) -> str:
    """The name of an archive (path or URL) without its archive suffix: ``photos.tar.gz`` -> ``photos``."""
    name = PurePosixPath(urlparse(source).path if is_url(source) else source).name
    suffix = _archive_suffix(name)
    stem = name[: -len(suffix)] if suffix else Path(name).stem
    if stem in ("", ".", ".."):
        return "dataset"
    if len(os.fsencode(stem)) > 200:  # with the marker's dots and suffix it would not fit a file name
        return f"dataset-{hashlib.sha256(source.encode()).hexdigest()[:16]}"
    return stem


def _marker(folder: Path) -> Path:
    return folder.parent / f".{folder.name}.complete"


def _marked(folder: Path) -> dict:
    """What the marker of ``folder`` records; {} when there is none or it cannot be read (a link,
    a folder or a FIFO in its place is never read through)."""
    return _read_record(_marker(folder)) or {}


def is_ready(folder: Path) -> bool:
    """Whether ``folder`` was completely extracted by :func:`extract`."""
    marked = _marked(folder)
    return folder.is_dir() and "source" in marked and marked.get("complete", True) is True


def extracted_from(folder: Path) -> str | None:
    """The source that ``folder`` was extracted from, as recorded in its marker."""
    return _marked(folder).get("source") if is_ready(folder) else None


def _check_ours(folder: Path) -> None:
    """Refuse to replace a ``folder`` that this tool did not extract (only ours have a marker), or
    to write a marker where something else than one of ours is."""
    problem = _not_a_marker(_marker(folder), lambda record: "source" in record)
    if problem is not None:
        raise CaltechError(f"{problem}, where caltech marks the folder it extracts. Fix: move it out of "
                           f"{folder.parent}, or pass another --data.data_dir.")
    if (folder.exists() or folder.is_symlink()) and not _marker(folder).exists():
        raise CaltechError(
            f"{folder} is in the way: it exists but was not extracted by caltech (there is no "
            f"{_marker(folder).name} beside it), and caltech does not replace what it did not make. Fix: move it "
            "away or pass another --data.data_dir; to train on it as it is, pass it as the source "
            "(--data.source, or --data.root of ImageFolderDataModule)."
        )


def _is_archive(path: Path) -> bool:
    try:
        patoolib.get_archive_format(str(path))
    except PatoolError:
        return False
    return True


def _find_folder(root: Path, name: str) -> Path | None:
    matches = sorted((p for p in root.rglob(name) if p.is_dir()), key=lambda p: len(p.parts))
    return matches[0] if matches else None


def _top_folder(root: Path) -> Path:
    """The folder an archive holds: past wrapper folders that hold one folder and nothing else."""
    while True:
        entries = [p for p in root.iterdir() if not p.name.startswith(".") and p.name != "__MACOSX"]
        if len(entries) != 1 or not entries[0].is_dir():
            return root
        root = entries[0]


@dataclass(frozen=True)
class Limits:
    """The most that one source may unpack to."""

    max_bytes: int
    max_files: int


@dataclass
class Budget:
    """What everything extracted from one source adds up to, the archives inside it included,
    checked against the limits before each file is written."""

    limits: Limits
    source: str
    size: int = 0
    files: int = 0

    def take(self, shown: str, member: str, size: int) -> None:
        """Count one more file of ``size`` bytes; refuse it if that passes a limit."""
        self.files += 1
        self.size += size
        if self.size > self.limits.max_bytes or self.files > self.limits.max_files:
            raise CaltechError(
                f"refusing to extract {shown}: with member {member!r}, {self.source} unpacks to {self.size:,} bytes "
                f"in {self.files:,} files (archives inside it included), over the limit of "
                f"{self.limits.max_bytes:,} bytes and {self.limits.max_files:,} files. Fix: raise "
                "data.max_extract_gb or data.max_extract_files if you trust the archive."
            )


def _climbs_out(name: str) -> bool:
    """Whether an archive path is absolute or leaves the folder it is extracted into."""
    path = PurePosixPath(name.replace("\\", "/"))
    if path.is_absolute() or PureWindowsPath(name).drive:
        return True
    depth = 0
    for part in path.parts:
        depth += -1 if part == ".." else 0 if part in ("", ".") else 1
        if depth < 0:
            return True
    return False


def _refuse(shown: str, member: str, why: str) -> CaltechError:
    return CaltechError(
        f"refusing to extract {shown}: member {member!r} {why}. Nothing was written outside "
        f"the data folder. Fix: use an archive from a source you trust."
    )


def _damaged(shown: str, why: object) -> CaltechError:
    reason = " ".join(str(why).split()) or type(why).__name__
    return CaltechError(
        f"{shown} is damaged or incomplete ({reason}), as an interrupted download leaves it. Fix: download it "
        "again (delete the damaged file first), or pass the extracted folder with --data.source."
    )


# What reading a damaged tar or zip archive raises (gzip's and bz2's errors are OSErrors).
READ_ERRORS = (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError, zlib.error, lzma.LZMAError)
# Archives that Python's tarfile and zipfile read; a file named like one that they cannot read is damaged.
PYTHON_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz", ".zip")


@contextmanager
def _read_errors(shown: str) -> Iterator[None]:
    """Turn an error reading the archive (and only reading it: nothing is written inside) into the
    one-line message for a damaged archive."""
    try:
        yield
    except READ_ERRORS as error:
        raise _damaged(shown, error) from error


def _reading(shown: str, items: Iterable[T]) -> Iterator[T]:
    """``items``, each read under :func:`_read_errors`."""
    iterator = iter(items)
    while True:
        with _read_errors(shown):
            item = next(iterator, _END)
        if item is _END:
            return
        yield item


def _folder(into: Path, relative: PurePosixPath) -> Path:
    """``into / relative``, its missing folders created with mode 0755 (nothing inside ``into`` is a link)."""
    folder = into
    for part in relative.parts:
        folder = folder / part
        if not folder.is_dir():
            folder.mkdir(mode=0o755)
    return folder


def _write(source: IO[bytes], target: Path, shown: str) -> None:
    """Copy ``source`` into a regular file owned by the running user, mode 0644 at most."""
    descriptor = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
    with open(descriptor, "wb") as out:
        for block in _reading(shown, iter(lambda: source.read(1 << 20), b"")):
            out.write(block)


def _check_tar_member(member: tarfile.TarInfo, into: Path, shown: str) -> None:
    if member.ischr() or member.isblk() or member.isfifo():
        raise _refuse(shown, member.name, "is a device file or FIFO")
    if _climbs_out(member.name):
        raise _refuse(shown, member.name, "has a path outside the extraction folder")
    if member.issym() and _climbs_out(str(PurePosixPath(member.name).parent / member.linkname)):
        raise _refuse(shown, member.name, f"is a symbolic link to {member.linkname!r}, outside the folder")
    if member.islnk() and _climbs_out(member.linkname):
        raise _refuse(shown, member.name, f"is a hard link to {member.linkname!r}, outside the folder")
    try:
        tarfile.data_filter(member, str(into))
    except tarfile.FilterError as error:
        raise _refuse(shown, member.name, f"is refused by tar's data filter ({error})") from error


def _check_tar_end(tar: tarfile.TarFile, shown: str) -> None:
    """Refuse data after where ``tarfile`` stopped: it takes an unreadable header for the end of
    the archive, where GNU tar skips ahead to the next one. Only zero padding may follow."""
    with _read_errors(shown):
        tar.fileobj.seek(tar.offset)
    for block in _reading(shown, iter(lambda: tar.fileobj.read(1 << 20), b"")):
        if block.strip(b"\0"):
            raise _damaged(shown, f"an unreadable tar header at byte {tar.offset:,}, with data after it")


def _unpack_tar(archive: Path, into: Path, budget: Budget, shown: str) -> int:
    """Extract a tar archive member by member with Python's ``tarfile``, so that what is checked is
    exactly what is written; return the number of symbolic links left out.

    Each member passes :func:`_check_tar_member` (PEP 706's ``data`` filter among the checks) and
    the budget before it is written; a hard link becomes a copy of the file it names.
    """
    links = 0
    with _read_errors(shown):
        tar = tarfile.open(archive)
    with tar:
        for member in _reading(shown, tar):
            _check_tar_member(member, into, shown)
            name = PurePosixPath(posixpath.normpath(member.name))
            if member.issym():
                links += 1
            elif member.isdir():
                _folder(into, name)
            elif member.islnk():
                linked = into / posixpath.normpath(member.linkname)
                if not linked.is_file():
                    raise _refuse(shown, member.name, f"is a hard link to {member.linkname!r}, not a file before it")
                budget.take(shown, member.name, linked.stat().st_size)
                with open(linked, "rb") as source:
                    _write(source, _folder(into, name.parent) / name.name, shown)
            else:
                budget.take(shown, member.name, member.size)
                with _read_errors(shown):
                    source = tar.extractfile(member)
                _write(source, _folder(into, name.parent) / name.name, shown)
        _check_tar_end(tar, shown)
    return links


def _unpack_zip(archive: Path, into: Path, budget: Budget, shown: str) -> int:
    """Extract a zip archive member by member with Python's ``zipfile``; return the number of
    symbolic links left out. A member is written as at most its declared size (``zipfile``
    stops there and checks the CRC), which the budget counts before it is written."""
    links = 0
    with _read_errors(shown):
        zf = zipfile.ZipFile(archive)
    with zf:
        for info in zf.infolist():
            if _climbs_out(info.filename):
                raise _refuse(shown, info.filename, "has a path outside the extraction folder")
            name = PurePosixPath(posixpath.normpath(info.filename))
            if stat.S_ISLNK(info.external_attr >> 16):
                with _read_errors(shown), zf.open(info) as member:
                    target = member.read(4096).decode("utf-8", "replace")
                if _climbs_out(str(PurePosixPath(info.filename).parent / target)):
                    raise _refuse(shown, info.filename, f"is a symbolic link to {target!r}, outside the folder")
                links += 1
            elif info.is_dir():
                _folder(into, name)
            else:
                budget.take(shown, info.filename, info.file_size)
                try:
                    with _read_errors(shown):
                        member = zf.open(info)
                except (RuntimeError, NotImplementedError) as error:  # encrypted, or compressed in a way zipfile lacks
                    raise CaltechError(
                        f"cannot extract {shown}: {error}. Fix: extract it yourself and pass the folder with --data.source."
                    ) from error
                with member:
                    _write(member, _folder(into, name.parent) / name.name, shown)
    return links


def _unpack_other(archive: Path, into: Path, budget: Budget, shown: str) -> int:
    """Extract a format Python cannot read (rar, 7z, ...) with patool, then check what it wrote."""
    try:
        kind, compression = patoolib.get_archive_format(str(archive))
        patoolib.find_archive_program(kind, "extract", compression=compression)
    except PatoolError as error:
        raise CaltechError(
            f"cannot extract {shown}: {error}. Fix: install one of those programs (e.g. unrar or 7z), or extract "
            "the archive yourself and pass the folder with --data.source."
        ) from error
    try:
        patoolib.extract_archive(str(archive), outdir=str(into), verbosity=-1, interactive=False)
    except PatoolError as error:
        raise CaltechError(
            f"cannot extract {shown}: {' '.join(str(error).split())}. Fix: check that the file is a complete "
            "archive (download it again), or pass the already extracted folder with --data.source."
        ) from error
    return check_tree(shown, into, budget)


def check_tree(shown: str, root: Path, budget: Budget) -> int:
    """Make what another program extracted into ``root`` like what this module writes itself.

    Refused: links that leave ``root``, hard links to files outside it, devices, FIFOs and sockets.
    Other symbolic links are removed (their number is returned), every file is counted against
    the budget, and everything gets mode 0644 (folders 0755) and the running user as owner.
    """
    inside = root.resolve()
    links = 0
    linked: dict[tuple[int, int], list] = {}  # (device, inode) -> [links found, links it has, a name]
    for folder, folders, files in os.walk(root):
        for entry in (Path(folder) / name for name in folders + files):
            name = str(entry.relative_to(root))
            info = entry.lstat()
            if stat.S_ISLNK(info.st_mode):
                target = os.readlink(entry)
                if not (entry.parent / target).resolve().is_relative_to(inside):
                    raise _refuse(shown, name, f"is a symbolic link to {target!r}, outside the folder")
                entry.unlink()
                links += 1
                continue
            if not (stat.S_ISREG(info.st_mode) or stat.S_ISDIR(info.st_mode)):
                raise _refuse(shown, name, "is a device file, FIFO or socket")
            if os.geteuid() == 0 and (info.st_uid, info.st_gid) != (os.getuid(), os.getgid()):
                os.chown(entry, os.getuid(), os.getgid(), follow_symlinks=False)
            os.chmod(entry, 0o755 if stat.S_ISDIR(info.st_mode) else 0o644)
            if stat.S_ISREG(info.st_mode):
                budget.take(shown, name, info.st_size)
                if info.st_nlink > 1:
                    linked.setdefault((info.st_dev, info.st_ino), [0, info.st_nlink, name])[0] += 1
        folders[:] = [name for name in folders if (Path(folder) / name).is_dir()]
    for found, total, name in linked.values():
        if found < total:
            raise _refuse(shown, name, "is a hard link to a file outside the folder")
    return links


def unpack(archive: Path, into: Path, budget: Budget, shown: str) -> None:
    """Extract one archive into the new folder ``into``; ``shown`` names it in messages.

    tar and zip are extracted here, member by member; other formats by patool, then checked.
    """
    into.mkdir(mode=0o755)
    try:
        with _read_errors(shown):
            kind = "tar" if tarfile.is_tarfile(archive) else "zip" if zipfile.is_zipfile(archive) else None
        if kind is None and archive.name.lower().endswith(PYTHON_SUFFIXES):
            raise _damaged(shown, "neither tar nor zip can read it")
        unpacker = {"tar": _unpack_tar, "zip": _unpack_zip, None: _unpack_other}[kind]
        links = unpacker(archive, into, budget, shown)
    except OSError as error:  # reading errors are CaltechErrors by now: this is writing
        raise CaltechError(
            f"cannot extract {shown} into {into.parent.parent}: {error}. Fix: check that there is free space and "
            "that you can write there, or pass another --data.data_dir."
        ) from error
    if links:
        log.warning("Left out %d symbolic links of %s: an image data set needs none, and they could lead "
                    "outside the data folder", links, shown)


def extract(archive: Path, folder: Path, source: str, limits: Limits, inner: str | None = None) -> Path:
    """Extract ``archive`` and move the folder named ``inner`` found in it to ``folder``; without
    ``inner``, the archive's own top folder.

    Archives inside the archive (the official Caltech-101 zip holds a .tar.gz) are opened too when
    ``inner`` is not found, those whose name mentions it first; the limits hold for everything
    extracted from ``archive``, at every depth. A ``folder`` that this tool did not extract is
    never replaced.
    """
    _check_ours(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".extracting-", dir=folder.parent))
    budget = Budget(limits, str(archive))
    try:
        log.info("Extracting %s", archive)
        unpack(archive, scratch / "0", budget, str(archive))
        if inner is None:
            return _finish(_top_folder(scratch / "0"), folder, source, scratch)
        found = _find_folder(scratch, inner)
        for depth in range(1, MAX_NESTING + 1):
            if found is not None:
                break
            nested = sorted(
                (p for p in scratch.rglob("*") if p.is_file() and _is_archive(p)),
                key=lambda p: inner not in p.name,
            )
            if not nested:
                break
            for number, packed in enumerate(nested):
                log.info("Extracting %s (inside %s)", packed.name, archive.name)
                unpack(packed, scratch / f"{depth}.{number}", budget, f"{packed.name} (inside {archive})")
                packed.unlink()
                found = _find_folder(scratch, inner)
                if found is not None:
                    break
        if found is None:
            raise CaltechError(
                f"{archive} holds no folder named {inner}. Fix: pass the data set's archive "
                f"or a folder that holds {inner}."
            )
        return _finish(found, folder, source, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _finish(found: Path, folder: Path, source: str, scratch: Path) -> Path:
    """Put the extracted ``found`` at ``folder`` and mark it complete, naming its source.

    An earlier extraction at ``folder`` (ours: it has a marker) moves into ``scratch``, which is
    then deleted. The marker says "not complete" while the folders move, so a run stopped half-way
    leaves a folder that is known to be ours and is extracted again.
    """
    _check_ours(folder)
    marker, earlier = _marker(folder), _marked(folder).get("source")
    _write_record(marker, {"source": source, "complete": False})
    if folder.exists() or folder.is_symlink():
        log.info("Replacing %s (extracted earlier from %s)", folder, earlier)
        os.replace(folder, scratch / "replaced")
    os.replace(found, folder)
    _write_record(marker, {"source": source, "complete": True})
    return folder
