"""Getting a data set onto disk: download, verify, extract, find the image folder.

A download streams into ``<name>.part`` and is renamed into place only once it is complete and
its checksum matches, so a file with the final name is always a whole one. An extraction goes
into a temporary folder and is moved into place, then a marker is written last: a folder
without its marker is never used.

Archives come from the internet, so extraction trusts nothing in them. Before anything is
written, the members of tar and zip archives are listed and any absolute path, ``..`` that
climbs out, link that points outside, device file or FIFO is refused by name, and so is an
archive whose members add up to more than the size or file-count limit (decompression bombs).
After extraction, for every format patool handles, the extracted tree is checked again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import stat
import tarfile
import tempfile
import time
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
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


def is_url(source: str) -> bool:
    return urlparse(source).scheme in URL_SCHEMES


def _hasher(checksum: str) -> tuple[hashlib._Hash, str]:
    algorithm, _, expected = checksum.partition(":")
    if not expected or algorithm not in hashlib.algorithms_available:
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
    """Stream ``url`` into ``partial``; return its digest ('' when no checksum is asked for)."""
    digest = _hasher(checksum)[0] if checksum else None
    with urllib.request.urlopen(url, timeout=timeout) as response, open(partial, "wb") as out:
        total = int(response.headers.get("Content-Length") or 0) or None
        with tqdm(total=total, unit="B", unit_scale=True, desc=f"Downloading {name}") as bar:
            for block in iter(lambda: response.read(1 << 20), b""):
                out.write(block)
                if digest is not None:
                    digest.update(block)
                bar.update(len(block))
    return digest.hexdigest() if digest is not None else ""


def download(url: str, folder: Path, checksum: str | None, timeout: float = 60.0, attempts: int = 3) -> Path:
    """Stream ``url`` into ``folder`` with a progress bar; reuse a complete earlier download.

    Network errors and time-outs are retried ``attempts`` times with growing pauses; a partial
    file is deleted, never used.
    """
    name = Path(urlparse(url).path).name or "download"
    target = folder / name
    if target.is_file() and (checksum is None or file_checksum(target, checksum)):
        log.info("Reusing the downloaded %s", target)
        return target
    folder.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".part")
    expected = _hasher(checksum)[1] if checksum else None
    for attempt in range(1, attempts + 1):
        try:
            got = _fetch(url, partial, name, checksum, timeout)
            break
        except OSError as error:  # URLError, time-outs and connection resets are OSErrors
            partial.unlink(missing_ok=True)
            if attempt == attempts:
                raise CaltechError(
                    f"cannot download {url} ({attempts} attempts, last: {error}). Fix: check the network, or "
                    f"download it yourself and pass the file with --data.source /path/to/{name}."
                ) from error
            log.warning("Download of %s failed (%s); trying again (%d of %d)", url, error, attempt + 1, attempts)
            time.sleep(RETRY_PAUSE_S * attempt)
    if expected is not None and got != expected:
        partial.unlink(missing_ok=True)
        raise CaltechError(
            f"the download of {url} has checksum {got}, expected {expected}: the file is "
            "damaged or not the one expected. Fix: try again, or pass another source with --data.source."
        )
    os.replace(partial, target)
    return target


ARCHIVE_SUFFIXES = (".tar.gz", ".tar.bz2", ".tar.xz", ".tar.zst", ".tgz", ".tbz2", ".txz", ".tar", ".zip", ".rar", ".7z")


def archive_stem(source: str) -> str:
    """The name of an archive (path or URL) without its archive suffix: ``photos.tar.gz`` -> ``photos``."""
    name = PurePosixPath(urlparse(source).path if is_url(source) else source).name
    for suffix in ARCHIVE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)] or "dataset"
    return Path(name).stem or "dataset"


def _marker(folder: Path) -> Path:
    return folder.parent / f".{folder.name}.complete"


def is_ready(folder: Path) -> bool:
    """Whether ``folder`` was completely extracted by :func:`extract`."""
    return folder.is_dir() and _marker(folder).is_file()


def extracted_from(folder: Path) -> str | None:
    """The source that ``folder`` was extracted from, as recorded in its marker."""
    if not is_ready(folder):
        return None
    return json.loads(_marker(folder).read_text()).get("source")


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
    """The most an archive may unpack to."""

    max_bytes: int
    max_files: int


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


def _refuse(archive: Path, member: str, why: str) -> CaltechError:
    return CaltechError(
        f"refusing to extract {archive}: member {member!r} {why}. Nothing was written outside "
        f"the data folder. Fix: use an archive from a source you trust."
    )


def _tar_members(archive: Path) -> list[tuple[str, int]]:
    """(name, size) of a tar archive's members, after refusing the unsafe ones."""
    listed = []
    with tarfile.open(archive) as tar:
        for member in tar:
            if member.ischr() or member.isblk() or member.isfifo():
                raise _refuse(archive, member.name, "is a device file or FIFO")
            if _climbs_out(member.name):
                raise _refuse(archive, member.name, "has a path outside the extraction folder")
            if member.issym() and _climbs_out(str(PurePosixPath(member.name).parent / member.linkname)):
                raise _refuse(archive, member.name, f"is a symbolic link to {member.linkname!r}, outside the folder")
            if member.islnk() and _climbs_out(member.linkname):
                raise _refuse(archive, member.name, f"is a hard link to {member.linkname!r}, outside the folder")
            listed.append((member.name, member.size))
    return listed


def _zip_members(archive: Path) -> list[tuple[str, int]]:
    listed = []
    with zipfile.ZipFile(archive) as zf:
        for info in zf.infolist():
            if _climbs_out(info.filename):
                raise _refuse(archive, info.filename, "has a path outside the extraction folder")
            if stat.S_ISLNK(info.external_attr >> 16):
                target = zf.read(info).decode("utf-8", "replace")
                if _climbs_out(str(PurePosixPath(info.filename).parent / target)):
                    raise _refuse(archive, info.filename, f"is a symbolic link to {target!r}, outside the folder")
            listed.append((info.filename, info.file_size))
    return listed


def _check_totals(archive: Path, files: int, size: int, limits: Limits) -> None:
    if size > limits.max_bytes or files > limits.max_files:
        raise CaltechError(
            f"refusing to extract {archive}: it unpacks to {size:,} bytes in {files:,} files, over the limit of "
            f"{limits.max_bytes:,} bytes and {limits.max_files:,} files. Fix: raise data.max_extract_gb or "
            "data.max_extract_files if you trust the archive."
        )


def check_archive(archive: Path, limits: Limits) -> None:
    """Refuse an unsafe tar or zip archive before anything is extracted from it."""
    if tarfile.is_tarfile(archive):
        members = _tar_members(archive)
    elif zipfile.is_zipfile(archive):
        members = _zip_members(archive)
    else:
        return  # other formats: checked after extraction, by check_tree
    _check_totals(archive, len(members), sum(size for _, size in members), limits)


def check_tree(archive: Path, root: Path, limits: Limits) -> None:
    """Refuse what an extraction left in ``root``: links leaving it, devices, FIFOs, too much data."""
    files = size = 0
    for path in root.rglob("*"):
        name = str(path.relative_to(root))
        if path.is_symlink():
            target = (path.parent / os.readlink(path)).resolve()
            if not target.is_relative_to(root.resolve()):
                raise _refuse(archive, name, f"is a symbolic link to {os.readlink(path)!r}, outside the folder")
            continue
        mode = path.lstat().st_mode
        if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) or stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode):
            raise _refuse(archive, name, "is a device file, FIFO or socket")
        if stat.S_ISREG(mode):
            files += 1
            size += path.lstat().st_size
    _check_totals(archive, files, size, limits)


def _unpack(archive: Path, into: Path, limits: Limits) -> None:
    check_archive(archive, limits)
    into.mkdir(parents=True, exist_ok=True)
    try:
        patoolib.extract_archive(str(archive), outdir=str(into), verbosity=-1, interactive=False)
    except PatoolError as error:
        raise CaltechError(
            f"cannot extract {archive}: {error}. Fix: check that the file is a complete archive "
            "(download it again), or pass the already extracted folder with --data.source."
        ) from error
    check_tree(archive, into, limits)


def extract(archive: Path, folder: Path, source: str, limits: Limits, inner: str | None = None) -> Path:
    """Extract ``archive`` and move the folder named ``inner`` found in it to ``folder``; without
    ``inner``, the archive's own top folder.

    Archives inside the archive (the official Caltech-101 zip holds a .tar.gz) are opened too when
    ``inner`` is not found, those whose name mentions it first.
    """
    folder.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".extracting-", dir=folder.parent))
    try:
        log.info("Extracting %s", archive)
        _unpack(archive, scratch / "0", limits)
        if inner is None:
            return _finish(_top_folder(scratch / "0"), folder, source)
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
                _unpack(packed, scratch / f"{depth}.{number}", limits)
                packed.unlink()
                found = _find_folder(scratch, inner)
                if found is not None:
                    break
        if found is None:
            raise CaltechError(
                f"{archive} holds no folder named {inner}. Fix: pass the data set's archive "
                f"or a folder that holds {inner}."
            )
        return _finish(found, folder, source)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _finish(found: Path, folder: Path, source: str) -> Path:
    """Put the extracted ``found`` at ``folder`` and mark it complete, naming its source."""
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(found, folder)
    _marker(folder).write_text(json.dumps({"source": source}))
    return folder
