"""Ownership markers: small JSON files beside what the tool downloaded or extracted, saying so.

Only what a marker says is the tool's is ever replaced; anything else in its place is the user's.
A marker is written to a new file and renamed into place, and read only when it is a regular
file: a link, a folder or a FIFO where one goes is never written through, read through or
waited on.
"""

from __future__ import annotations

import json
import os
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path

from caltech_cli.errors import CaltechError
from caltech_cli.files import read_json_record


def write_record(path: Path, record: dict) -> None:
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


def not_a_marker(marker: Path, is_ours: Callable[[dict], bool]) -> str | None:
    """Why the marker's place is not ours to write; None when it is free or holds our marker."""
    if not (marker.exists() or marker.is_symlink()):
        return None
    if marker.is_symlink() or not marker.is_file():
        return f"{marker} is not a file"
    record = read_json_record(marker)
    return None if record is not None and is_ours(record) else f"{marker} is not a marker of caltech's"


# -- downloads: ``.<name>.download`` beside the file records its URL, size and modification time


def download_marker(target: Path) -> Path:
    return target.with_name(f".{target.name}.download")


def is_download_record(record: dict) -> bool:
    return isinstance(record.get("url"), str)


def mark_download(target: Path, url: str, state: os.stat_result) -> None:
    """Record that the file about to be (or just) put at ``target``, of this size and
    modification time, is the download of ``url``."""
    write_record(download_marker(target), {"url": url, "size": state.st_size, "mtime_ns": state.st_mtime_ns})


def downloaded_from(target: Path) -> str | None:
    """The URL that the tool downloaded ``target`` from; None when the file is not one of its
    downloads as it left it: the user put it there or changed it since (size and modification
    time are recorded), or there is no readable marker."""
    marked = read_json_record(download_marker(target))
    try:
        state = target.lstat()
    except OSError:
        return None
    if marked is None or not is_download_record(marked) or not stat.S_ISREG(state.st_mode):
        return None
    if (marked.get("size"), marked.get("mtime_ns")) != (state.st_size, state.st_mtime_ns):
        return None
    return marked["url"]


# -- extractions: ``.<folder>.complete`` beside the folder records its source and whether it is whole


def extraction_marker(folder: Path) -> Path:
    return folder.parent / f".{folder.name}.complete"


def marked_extraction(folder: Path) -> dict:
    """What the marker of ``folder`` records; {} when there is none or it cannot be read (a link,
    a folder or a FIFO in its place is never read through)."""
    return read_json_record(extraction_marker(folder)) or {}


def mark_extraction(folder: Path, source: str, complete: bool) -> None:
    write_record(extraction_marker(folder), {"source": source, "complete": complete})


def is_ready(folder: Path) -> bool:
    """Whether ``folder`` was completely extracted by the tool."""
    marked = marked_extraction(folder)
    return folder.is_dir() and "source" in marked and marked.get("complete", True) is True


def extracted_from(folder: Path) -> str | None:
    """The source that ``folder`` was extracted from, as recorded in its marker."""
    return marked_extraction(folder).get("source") if is_ready(folder) else None


def check_extraction_is_ours(folder: Path) -> None:
    """Refuse to replace a ``folder`` that this tool did not extract (only ours have a marker), or
    to write a marker where something else than one of ours is."""
    marker = extraction_marker(folder)
    problem = not_a_marker(marker, lambda record: "source" in record)
    if problem is not None:
        raise CaltechError(
            f"{problem}, where caltech marks the folder it extracts. Fix: move it out of "
            f"{folder.parent}, or pass another --data.data_dir."
        )
    if (folder.exists() or folder.is_symlink()) and not marker.exists():
        raise CaltechError(
            f"{folder} is in the way: it exists but was not extracted by caltech (there is no "
            f"{marker.name} beside it), and caltech does not replace what it did not make. Fix: move it "
            "away or pass another --data.data_dir; to train on it as it is, pass it as the source "
            "(--data.source, or --data.root of ImageFolderDataModule)."
        )
