"""Where the tool writes, and what it reads whole: folders and files checked before anything is
written there, files written aside and renamed when whole, the locks that let processes started
together wait for each other, file digests."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import secrets
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO

from filelock import FileLock

from caltech_cli.errors import CaltechError

# Pseudo file systems of the kernel: writable by os.access's account, and no place for a run's files.
SYSTEM_FOLDERS = (Path("/proc"), Path("/sys"), Path("/dev"))


def writable_folder(folder: Path, option: str, wanted: str = "a folder you can write") -> Path:
    """``folder``, made if missing; one clear error when it is a file, cannot be written or lies
    in the kernel's ``/proc``, ``/sys`` or ``/dev``."""
    resolved = folder.resolve()
    system = next((root for root in SYSTEM_FOLDERS if resolved.is_relative_to(root)), None)
    if system is not None:
        raise CaltechError(
            f"{option}: {folder} is in {system}, the kernel's, not a folder for files. Fix: pass --{option} {wanted}."
        )
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


# What writing raises when the disk (or the user's quota, or a file-size limit) is full.
DISK_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


def kind_of(path: Path, follow: bool = False) -> str | None:
    """What is at ``path`` when it is not a regular file: "symbolic link" (unless ``follow``),
    "folder", "FIFO", "device" or "socket"; None for a regular file or nothing."""
    try:
        mode = (path.stat() if follow else path.lstat()).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return None
    kinds = {stat.S_ISLNK: "symbolic link", stat.S_ISDIR: "folder", stat.S_ISFIFO: "FIFO", stat.S_ISSOCK: "socket"}
    kind = next((name for test, name in kinds.items() if test(mode)), None)
    return kind or (None if stat.S_ISREG(mode) else "device")


def check_target(path: Path, option: str) -> Path:
    """``path``, where a file the tool writes is to go: free, or a regular file, which is replaced.
    A link is not written through, a FIFO not waited on, a folder or a device not touched."""
    kind = kind_of(path)
    if kind is not None:
        raise CaltechError(
            f"{option}: {path} is a {kind}, where caltech writes a file. Fix: move it away, or pass "
            f"--{option} another path."
        )
    return path


def no_link_below(root: Path, folder: Path, option: str) -> None:
    """Refuse a symbolic link on the way from a run's ``root`` down to ``folder``, a folder the tool
    makes there (``report``, ``checkpoints``): files written through it would land wherever it
    points. ``root`` itself is the user's choice, link or not."""
    try:
        inside = Path(os.path.abspath(folder)).relative_to(os.path.abspath(root))
    except ValueError:
        return
    current = Path(root)
    for part in inside.parts:
        current = current / part
        if current.is_symlink():
            raise CaltechError(
                f"{option}: {current} is a symbolic link, where caltech makes a folder of its own, and files written "
                f"through it would land elsewhere. Fix: remove the link, or pass --{option} the folder it points to."
            )


def cannot_write(path: Path, option: str, error: OSError) -> CaltechError:
    """The one line for an output that could not be written (a full disk, above all)."""
    reason = "the disk is full" if error.errno in DISK_FULL else error.strerror or str(error)
    return CaltechError(
        f"cannot write {path} ({reason}); nothing was left under its name. Fix: free some space, or pass "
        f"--{option} another place."
    )


def scratch_beside(path: Path) -> Path:
    """A new, empty file of its own beside ``path`` (``.<name>.<random>.part``), with the mode a
    new file of the user's gets."""
    while True:
        scratch = path.with_name(f".{path.name}.{secrets.token_hex(4)}.part")
        try:
            os.close(os.open(scratch, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o666))
            return scratch
        except FileExistsError:
            continue


@contextmanager
def written_whole(path: Path, option: str) -> Iterator[Path]:
    """A scratch file beside ``path`` for the block to write; renamed to ``path`` when the block
    ends, so a file under that name is always whole, and removed when it fails. A full disk, or
    anything else that stops the write, leaves nothing under ``path`` and ends in one line."""
    check_target(path, option)
    try:
        scratch = scratch_beside(path)
    except OSError as error:
        raise cannot_write(path, option, error) from error
    try:
        yield scratch
        os.replace(scratch, path)
    except OSError as error:
        scratch.unlink(missing_ok=True)
        if error.errno in DISK_FULL or error.filename in (str(scratch), scratch):
            raise cannot_write(path, option, error) from error
        raise
    except BaseException:
        scratch.unlink(missing_ok=True)
        raise


@contextmanager
def text_written(path: Path, option: str) -> Iterator[TextIO]:
    """A UTF-8 text file (``newline=""``, as the csv module wants) that appears at ``path`` whole."""
    with written_whole(path, option) as scratch, open(scratch, "w", newline="", encoding="utf-8") as file:
        yield file


def write_text(path: Path, text: str, option: str) -> None:
    """Write ``text`` to ``path`` whole, as :func:`written_whole` does."""
    with text_written(path, option) as file:
        file.write(text)


def read_json_record(path: Path) -> dict | None:
    """The JSON object in the small file at ``path`` (a marker, an export's metadata); None unless
    it is a regular file (a link, a folder or a FIFO is never opened, read through or waited on)
    holding one."""
    try:
        if not stat.S_ISREG(path.lstat().st_mode):
            return None
        descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        with os.fdopen(descriptor, "rb") as file:
            record = json.loads(file.read(1 << 16))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


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


# Folders nested deeper than this are a mistake or an attack (Python's own walks recurse, and fail
# at about a thousand); images never need it.
MAX_DEPTH = 64


def walk(root: Path) -> Iterator[tuple[Path, list[str], list[str]]]:
    """``os.walk(root)`` top-down, without recursion and without following links to folders, and
    refused in one line past :data:`MAX_DEPTH` folders: ``(folder, folder names, file names)``, in
    which the caller may prune the folder names, as with ``os.walk``."""
    stack = [(root, 0)]
    while stack:
        folder, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise CaltechError(
                f"{root} holds folders nested more than {MAX_DEPTH} deep ({folder}). Fix: keep the images in a "
                "shallower tree."
            )
        try:
            entries = sorted(os.scandir(folder), key=lambda entry: entry.name)
        except OSError:
            continue  # as os.walk does: a folder that cannot be listed is passed over
        folders = [entry.name for entry in entries if entry.is_dir()]
        files = [entry.name for entry in entries if not entry.is_dir()]
        linked = {entry.name for entry in entries if entry.is_symlink()}
        yield folder, folders, files
        stack += [(folder / name, depth + 1) for name in reversed(folders) if name not in linked]


def files_under(root: Path) -> list[Path]:
    """Every file under ``root`` (a link to a file too, none inside a linked folder), sorted."""
    found = [folder / name for folder, _, names in walk(root) for name in names]
    return sorted(path for path in found if path.is_file())


def remove_tree(root: Path) -> None:
    """``shutil.rmtree(root, ignore_errors=True)`` without recursion, for trees of any depth;
    links are removed, never followed."""
    stack = [(root, False)]
    while stack:
        path, emptied = stack.pop()
        if emptied:
            with contextlib.suppress(OSError):
                path.rmdir()
            continue
        if path.is_symlink() or not path.is_dir():
            with contextlib.suppress(OSError):
                path.unlink()
            continue
        stack.append((path, True))
        with contextlib.suppress(OSError):
            stack += [(Path(entry.path), False) for entry in os.scandir(path)]


def file_digest(path: Path, algorithm: str = "sha256") -> str:
    """Hex digest of a file, read in 1 MiB blocks."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
