"""Where the tool writes, and what it reads whole: folders and files checked before anything is
written there, the locks that let processes started together wait for each other, file digests."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock

from caltech_cli.errors import CaltechError


def writable_folder(folder: Path, option: str, wanted: str = "a folder you can write") -> Path:
    """``folder``, made if missing; one clear error when it is a file or cannot be written."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        reason = "a file is in its way" if isinstance(error, (FileExistsError, NotADirectoryError)) else error.strerror
        raise CaltechError(
            f"{option}: {folder} cannot be made a folder ({reason}). Fix: pass --{option} {wanted}."
        ) from error
    if not os.access(folder, os.W_OK | os.X_OK):
        raise CaltechError(f"{option}: {folder} cannot be written (permission denied). Fix: pass --{option} {wanted}.")
    return folder


def writable_file(path: Path, option: str) -> Path:
    """``path``, to be written: its folder exists and can be written, and it is not a folder itself."""
    if path.is_dir():
        raise CaltechError(f"{option}: {path} is a folder. Fix: pass --{option} the path of a file.")
    writable_folder(path.parent, option, "a file in a folder you can write")
    if path.exists() and not os.access(path, os.W_OK):
        raise CaltechError(
            f"{option}: {path} cannot be written (permission denied). Fix: pass --{option} another file."
        )
    return path


@contextmanager
def folder_lock(path: Path, option: str) -> Iterator[None]:
    """Hold the lock file ``path`` (processes that start together wait for each other); one clear
    error when something that is not a lock file is in its place (a folder, a link that loops)."""
    lock = FileLock(str(path))
    try:
        lock.acquire()
    except OSError as error:
        raise CaltechError(
            f"{option}: cannot lock {path} ({error.strerror or error}). Fix: remove {path}; caltech makes it anew."
        ) from error
    try:
        yield
    finally:
        lock.release()


def file_digest(path: Path, algorithm: str = "sha256") -> str:
    """Hex digest of a file, read in 1 MiB blocks."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
