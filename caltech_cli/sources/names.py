"""What a source is called on disk: whether it is a URL, the file a download gets, and the folder
an archive is extracted to."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path, PurePosixPath
from urllib.parse import urlparse

URL_SCHEMES = ("http", "https", "ftp", "file")
ARCHIVE_SUFFIXES = (
    ".tar.gz",
    ".tar.bz2",
    ".tar.xz",
    ".tar.zst",
    ".tgz",
    ".tbz2",
    ".txz",
    ".tar",
    ".zip",
    ".rar",
    ".7z",
)
# Longer names would not fit a file system's 255 bytes with a marker's dots and suffix around them.
MAX_NAME_BYTES = 200


def is_url(source: str) -> bool:
    return urlparse(source).scheme in URL_SCHEMES


def archive_suffix(name: str) -> str | None:
    """The archive suffix ``name`` ends with (any case), or None."""
    return next((suffix for suffix in ARCHIVE_SUFFIXES if name.lower().endswith(suffix)), None)


def download_name(url: str) -> str:
    """The file name a download of ``url`` gets: the URL's own, with ``.archive`` added where it
    has no archive suffix (the extracted folder takes the name without the suffix), and a short
    name made from the URL's hash where the URL's would be too long for a file system."""
    name = Path(urlparse(url).path).name
    if name in ("", ".", ".."):
        name = "download"
    suffix = archive_suffix(name)
    if suffix is None:
        name, suffix = name + ".archive", ".archive"
    if len(os.fsencode(name)) > MAX_NAME_BYTES:
        name = f"download-{hashlib.sha256(url.encode()).hexdigest()[:16]}{suffix}"
    return name


def archive_stem(source: str) -> str:
    """The name of an archive (path or URL) without its archive suffix: ``photos.tar.gz`` -> ``photos``."""
    name = PurePosixPath(urlparse(source).path if is_url(source) else source).name
    suffix = archive_suffix(name)
    stem = name[: -len(suffix)] if suffix else Path(name).stem
    if stem in ("", ".", ".."):
        return "dataset"
    if len(os.fsencode(stem)) > MAX_NAME_BYTES:
        return f"dataset-{hashlib.sha256(source.encode()).hexdigest()[:16]}"
    return stem
