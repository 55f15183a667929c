"""Getting a data set onto disk: download, verify, extract, find the image folder.

A download streams into ``<name>.part`` and is renamed into place only once it is complete and
its checksum matches, so a file with the final name is always a whole one. An extraction goes
into a temporary folder and is moved into place, then a marker is written last: a folder
without its marker is never used.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

import patoolib
from patoolib.util import PatoolError
from tqdm import tqdm

from caltech_cli.errors import CaltechError

log = logging.getLogger(__name__)

URL_SCHEMES = ("http", "https", "ftp", "file")
# Nested archives are opened to this depth when the wanted folder is not found at the top.
MAX_NESTING = 3


def is_url(source: str) -> bool:
    return urlparse(source).scheme in URL_SCHEMES


def _hasher(checksum: str) -> tuple[hashlib._Hash, str]:
    algorithm, _, expected = checksum.partition(":")
    if not expected or algorithm not in hashlib.algorithms_available:
        raise CaltechError(f"checksum {checksum!r} must look like 'sha256:<hex>' or 'md5:<hex>'.")
    return hashlib.new(algorithm), expected.lower()


def file_checksum(path: Path, checksum: str) -> bool:
    """Whether ``path`` matches ``checksum`` ('algorithm:hex')."""
    digest, expected = _hasher(checksum)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest() == expected


def download(url: str, folder: Path, checksum: str | None, timeout: float = 60.0) -> Path:
    """Stream ``url`` into ``folder`` with a progress bar; reuse a complete earlier download."""
    name = Path(urlparse(url).path).name or "download"
    target = folder / name
    if target.is_file() and (checksum is None or file_checksum(target, checksum)):
        log.info("Reusing the downloaded %s", target)
        return target
    folder.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".part")
    digest, expected = _hasher(checksum) if checksum else (None, None)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(partial, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"Downloading {name}") as bar:
                for block in iter(lambda: response.read(1 << 20), b""):
                    out.write(block)
                    if digest is not None:
                        digest.update(block)
                    bar.update(len(block))
    except OSError as error:
        partial.unlink(missing_ok=True)
        raise CaltechError(
            f"cannot download {url}: {error}. Fix: check the network, or download it yourself and "
            f"pass the file with --data.source /path/to/{name}."
        ) from error
    if digest is not None and digest.hexdigest() != expected:
        partial.unlink(missing_ok=True)
        raise CaltechError(
            f"the download of {url} has checksum {digest.hexdigest()}, expected {expected}: the file is "
            "damaged or not the one expected. Fix: try again, or pass another source with --data.source."
        )
    os.replace(partial, target)
    return target


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


def _unpack(archive: Path, into: Path) -> None:
    into.mkdir(parents=True, exist_ok=True)
    try:
        patoolib.extract_archive(str(archive), outdir=str(into), verbosity=-1, interactive=False)
    except PatoolError as error:
        raise CaltechError(
            f"cannot extract {archive}: {error}. Fix: check that the file is a complete archive "
            "(download it again), or pass the already extracted folder with --data.source."
        ) from error


def extract(archive: Path, folder: Path, source: str) -> Path:
    """Extract ``archive`` and move the folder named ``folder.name`` found in it to ``folder``.

    Archives inside the archive (the official Caltech-101 zip holds a .tar.gz) are opened too,
    those whose name mentions the wanted folder first.
    """
    folder.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".extracting-", dir=folder.parent))
    try:
        log.info("Extracting %s", archive)
        _unpack(archive, scratch / "0")
        found = _find_folder(scratch, folder.name)
        for depth in range(1, MAX_NESTING + 1):
            if found is not None:
                break
            nested = sorted(
                (p for p in scratch.rglob("*") if p.is_file() and _is_archive(p)),
                key=lambda p: folder.name not in p.name,
            )
            if not nested:
                break
            for number, inner in enumerate(nested):
                log.info("Extracting %s (inside %s)", inner.name, archive.name)
                _unpack(inner, scratch / f"{depth}.{number}")
                inner.unlink()
                found = _find_folder(scratch, folder.name)
                if found is not None:
                    break
        if found is None:
            raise CaltechError(
                f"{archive} holds no folder named {folder.name}. Fix: pass the Caltech-101 archive "
                f"(101_ObjectCategories.tar.gz or caltech-101.zip) or a folder that holds {folder.name}."
            )
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(found, folder)
        _marker(folder).write_text(json.dumps({"source": source}))
        return folder
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
