"""Unpacking one archive safely: member by member, checked before it is written, under a budget.

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

import logging
import lzma
import os
import posixpath
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import IO, TypeVar

import patoolib
from patoolib.util import PatoolError

from caltech_cli.errors import CaltechError
from caltech_cli.files import MAX_DEPTH, walk

log = logging.getLogger(__name__)

T = TypeVar("T")
_END = object()


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
    named = repr(member) if len(member) <= 200 else f"{member[:100]!r}...{member[-40:]!r}"
    return CaltechError(
        f"refusing to extract {shown}: member {named} {why}. Nothing was written outside "
        f"the data folder. Fix: use an archive from a source you trust."
    )


def _check_path(shown: str, member: str) -> None:
    """Refuse a member whose path climbs out of the folder, or is nested past ``MAX_DEPTH``."""
    if _climbs_out(member):
        raise _refuse(shown, member, "has a path outside the extraction folder")
    if len(PurePosixPath(posixpath.normpath(member)).parts) > MAX_DEPTH:
        raise _refuse(shown, member, f"is nested more than {MAX_DEPTH} folders deep")


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
    _check_path(shown, member.name)
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
        tar = tarfile.open(archive)  # noqa: SIM115 (opening is what may fail; `with tar` follows)
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
            _check_path(shown, info.filename)
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
                        f"cannot extract {shown}: {error}. "
                        "Fix: extract it yourself and pass the folder with --data.source."
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
    for folder, folders, files in walk(root):
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
        log.warning(
            "Left out %d symbolic links of %s: an image data set needs none, and they could lead "
            "outside the data folder",
            links,
            shown,
        )


def is_archive(path: Path) -> bool:
    """Whether patool knows ``path``'s format: an archive inside an archive, to open too."""
    try:
        patoolib.get_archive_format(str(path))
    except PatoolError:
        return False
    return True
