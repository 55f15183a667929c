"""The one exception type for problems a user can fix, and the checks of where we write.

`caltech` turns it into a single ``caltech: error: ...`` line and exit status 2 instead of a
traceback, so every message must name the thing that is wrong and say how to fix it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock


class CaltechError(Exception):
    """A problem with the user's data, files or options, with the fix in its message."""


def writable_folder(folder: Path, option: str, wanted: str = "a folder you can write") -> Path:
    """``folder``, made if missing; one clear error when it is a file or cannot be written."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        reason = "a file is in its way" if isinstance(error, (FileExistsError, NotADirectoryError)) else error.strerror
        raise CaltechError(f"{option}: {folder} cannot be made a folder ({reason}). Fix: pass --{option} "
                           f"{wanted}.") from error
    if not os.access(folder, os.W_OK | os.X_OK):
        raise CaltechError(f"{option}: {folder} cannot be written (permission denied). Fix: pass --{option} {wanted}.")
    return folder


def writable_file(path: Path, option: str) -> Path:
    """``path``, to be written: its folder exists and can be written, and it is not a folder itself."""
    if path.is_dir():
        raise CaltechError(f"{option}: {path} is a folder. Fix: pass --{option} the path of a file.")
    writable_folder(path.parent, option, "a file in a folder you can write")
    if path.exists() and not os.access(path, os.W_OK):
        raise CaltechError(f"{option}: {path} cannot be written (permission denied). Fix: pass --{option} "
                           "another file.")
    return path


@contextmanager
def folder_lock(path: Path, option: str) -> Iterator[None]:
    """Hold the lock file ``path`` (processes that start together wait for each other); one clear
    error when something that is not a lock file is in its place (a folder, a link that loops)."""
    lock = FileLock(str(path))
    try:
        lock.acquire()
    except OSError as error:
        raise CaltechError(f"{option}: cannot lock {path} ({error.strerror or error}). Fix: remove {path}; caltech "
                           "makes it anew.") from error
    try:
        yield
    finally:
        lock.release()
