"""Downloading a source: streamed into a partial file of its own, checked, renamed into place.

A download streams into a ``.<name>.*.part`` file and is renamed into place only once it is
complete (the length the server announced) and its checksum matches, so a file with the final
name is always a whole one; a marker beside it says which URL it came from, so that only the
tool's own downloads are ever replaced.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

from tqdm import tqdm

from caltech_cli.errors import CaltechError
from caltech_cli.files import file_digest, kind_of
from caltech_cli.sources.markers import (
    download_marker,
    downloaded_from,
    is_download_record,
    mark_download,
    not_a_marker,
)
from caltech_cli.sources.names import download_name
from caltech_cli.text import escaped

log = logging.getLogger(__name__)

RETRY_PAUSE_S = 2.0


def _hasher(checksum: str) -> tuple[hashlib._Hash, str]:
    algorithm, _, expected = checksum.partition(":")
    if not expected or algorithm not in hashlib.algorithms_guaranteed or algorithm.startswith("shake"):
        raise CaltechError(
            f"checksum {checksum!r} must look like 'sha256:<hex>' or 'md5:<hex>'. "
            "Fix: pass --data.checksum in that form, or null."
        )
    return hashlib.new(algorithm), expected.lower()


def file_checksum(path: Path, checksum: str) -> bool:
    """Whether ``path`` matches ``checksum`` ('algorithm:hex')."""
    digest, expected = _hasher(checksum)
    return file_digest(path, digest.name) == expected


def _too_large(url: str, max_bytes: int) -> CaltechError:
    return CaltechError(
        f"the download of {escaped(url)} is over {max_bytes:,} bytes, the limit of what a source may unpack to. "
        "Fix: raise data.max_extract_gb if you trust the source."
    )


def _check_local(url: str) -> None:
    """A ``file://`` URL must name a regular file: a FIFO would be waited on forever, a device
    (``/dev/zero``) read without end."""
    parsed = urlparse(url)
    if parsed.scheme == "file":
        kind = kind_of(Path(url2pathname(parsed.path)), follow=True)
        if kind is not None:
            raise CaltechError(f"data.source {escaped(url)} names a {kind}, not a file. Fix: name an archive.")


def _stream(url: str, partial: Path, name: str, checksum: str | None, timeout: float, max_bytes: int) -> str:
    """Stream ``url`` into ``partial``; return its digest ('' when no checksum is asked for).

    A connection that closes before the length the server announced is an error (Python's
    ``read`` just returns short), so a half file is never taken for a whole one; a download is
    stopped once it passes ``max_bytes``."""
    digest = _hasher(checksum)[0] if checksum else None
    received = 0
    with urllib.request.urlopen(url, timeout=timeout) as response, open(partial, "wb") as out:
        announced = (response.headers.get("Content-Length") or "").strip()
        total = int(announced) if announced.isdigit() and int(announced) > 0 else None
        if total is not None and total > max_bytes:
            raise _too_large(url, max_bytes)
        with tqdm(total=total, unit="B", unit_scale=True, desc=f"Downloading {name}") as bar:
            for block in iter(lambda: response.read(1 << 20), b""):
                received += len(block)
                if received > max_bytes:
                    raise _too_large(url, max_bytes)
                out.write(block)
                if digest is not None:
                    digest.update(block)
                bar.update(len(block))
    if total is not None and received != total:
        raise ConnectionError(f"the connection closed after {received} of the {total} bytes announced")
    return digest.hexdigest() if digest is not None else ""


def _in_the_way(target: Path, url: str, why: str) -> CaltechError:
    return CaltechError(
        f"{target} is in the way of the download of {escaped(url)}: it {why}, and it is not an earlier download "
        f"of that URL. Fix: move it out of {target.parent}, or pass it with --data.source if it is the archive "
        "you want."
    )


def _put_in_place(partial: Path, target: Path, url: str, was_ours: str | None) -> None:
    """Rename the finished download to ``target`` and record it, unless what is at ``target``
    changed while it downloaded (a file put there is the user's). The marker is written first,
    describing the file it is about to become, so no stop leaves our download unmarked."""
    if was_ours is None and (target.exists() or target.is_symlink()):
        raise _in_the_way(target, url, "appeared while it downloaded")
    if was_ours is not None and downloaded_from(target) != was_ours:
        raise _in_the_way(target, url, "changed while it downloaded")
    mark_download(target, url, partial.stat())
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


def download(
    url: str,
    folder: Path,
    checksum: str | None,
    timeout: float = 60.0,
    attempts: int = 3,
    max_bytes: int = 20 << 30,
) -> Path:
    """Stream ``url`` into ``folder`` with a progress bar; reuse a complete earlier download.

    Network errors, time-outs, server errors and connections that close early are retried
    ``attempts`` times with growing pauses; more than ``max_bytes`` is refused. A partial file is
    deleted, never used (also on Ctrl-C, and on SIGTERM under ``signals.sigterm_raises``, which
    ``fetch`` holds around the download and the extraction; ``kill -9`` leaves it, as a hidden
    ``.<name>.*.part``).

    A file of the same name is reused when it matches ``checksum``, or, without one, when it is
    an earlier download of the same URL or was put there by the user. Otherwise it is replaced
    only when it is an earlier download of this tool as the tool left it (a marker beside it
    records the URL, size and modification time): anything else there is the user's, and is
    never overwritten.
    """
    _check_local(url)
    name = download_name(url)
    target = folder / name
    ours = downloaded_from(target)
    if target.is_file():  # a link the user put there counts as the user's file
        if checksum is not None and file_checksum(target, checksum):
            log.info("Reusing the downloaded %s", target)
            return target
        if checksum is None and ours in (url, None):
            log.info("Reusing %s%s", target, "" if ours else " (no checksum to check it against)")
            return target
    if (target.exists() or target.is_symlink()) and ours is None:
        raise _in_the_way(target, url, "does not match the checksum" if target.is_file() else "is not a file")
    problem = not_a_marker(download_marker(target), is_download_record)
    if problem is not None:
        raise CaltechError(
            f"{problem}, where the download of {escaped(url)} keeps its marker. Fix: move it out of {folder}."
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
            got = _stream(url, partial, name, checksum, timeout, max_bytes)
            if expected is not None and got != expected:
                raise CaltechError(
                    f"the download of {escaped(url)} has checksum {got}, expected {expected}: the file is "
                    "damaged or not the one expected. Fix: try again, or pass another source with --data.source."
                )
            _put_in_place(partial, target, url, ours)
            return target
        except (OSError, http.client.HTTPException) as error:  # URLError, time-outs, resets, short reads
            partial.unlink(missing_ok=True)
            client_error = (
                isinstance(error, urllib.error.HTTPError)
                and 400 <= error.code < 500
                and error.code not in (408, 429)  # asking again gets the same answer
            )
            if attempt == attempts or client_error or isinstance(error, http.client.InvalidURL):
                raise CaltechError(
                    f"cannot download {escaped(url)} ({attempt} attempt{'s' * (attempt > 1)}, last: {error}). "
                    f"Fix: check the URL and the network, or download it yourself and pass the file with "
                    f"--data.source /path/to/{name}."
                ) from error
            log.warning(
                "Download of %s failed (%s); trying again (%d of %d)", escaped(url), error, attempt + 1, attempts
            )
            time.sleep(RETRY_PAUSE_S * attempt)
        except BaseException:  # a checksum that does not match, Ctrl-C, SIGTERM: no half file stays behind
            partial.unlink(missing_ok=True)
            raise
    raise AssertionError("unreachable: the last attempt returns or raises")
