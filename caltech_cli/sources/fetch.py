"""One call from a source (a URL, an archive or a folder) to the folder of its images."""

from __future__ import annotations

import logging
from pathlib import Path

from caltech_cli.errors import CaltechError
from caltech_cli.files import folder_lock, kind_of, writable_folder
from caltech_cli.signals import sigterm_raises
from caltech_cli.sources.download import download
from caltech_cli.sources.extract import extract
from caltech_cli.sources.markers import extracted_from
from caltech_cli.sources.names import archive_stem, is_url
from caltech_cli.sources.unpack import Limits

log = logging.getLogger(__name__)


def local_folder(source: str) -> Path | None:
    """``source`` as a folder to use in place, or None (a URL, an archive, a path that is missing)."""
    path = Path(source)
    return path if not is_url(source) and path.is_dir() else None


def data_folder(source: str, data_dir: Path, folder_name: str | None) -> Path:
    """The folder that holds the images of ``source``, or will once it is fetched: a folder used in
    place (its ``folder_name`` sub-folder where it has one), else ``data_dir/<folder_name>`` (the
    archive's name without its suffix when there is no ``folder_name``)."""
    folder = local_folder(source)
    if folder is not None:
        if folder_name is not None and (folder / folder_name).is_dir():
            return folder / folder_name
        return folder
    return data_dir / (folder_name or archive_stem(source))


def source_id(source: str) -> str:
    """What an extraction's marker records as its source: the URL, or the archive's absolute path."""
    return source if is_url(source) else str(Path(source).resolve())


def is_fetched(source: str, data_dir: Path, folder_name: str | None) -> bool:
    """Whether ``fetch`` has nothing left to do: a folder used in place exists, or ``source`` was
    extracted completely to its data folder."""
    folder = data_folder(source, data_dir, folder_name)
    if local_folder(source) is not None:
        return folder.is_dir()
    return extracted_from(folder) == source_id(source)


def fetch(source: str, data_dir: Path, folder_name: str | None, checksum: str | None, limits: Limits) -> Path:
    """Download and extract ``source`` once, and return the folder of its images; later calls
    reuse the extracted folder, and a folder source is used in place.

    A file lock in ``data_dir`` lets processes that start together (torchrun, several jobs) wait
    for the first one; SIGTERM raises, so that a stopped download or extraction removes its
    partial files.
    """
    folder = data_folder(source, data_dir, folder_name)
    if local_folder(source) is not None:
        log.info("Using the data set at %s in place", folder)
        return folder
    writable_folder(data_dir, "data.data_dir")
    with folder_lock(data_dir / ".prepare.lock", "data.data_dir"), sigterm_raises():
        if is_fetched(source, data_dir, folder_name):
            log.info("Using the data set at %s (from %s, already extracted)", folder, source)
            return folder
        if is_url(source):
            archive = download(source, data_dir, checksum, max_bytes=limits.max_bytes)
        else:
            archive = Path(source)
            kind = kind_of(archive, follow=True)
            if kind is not None:
                raise CaltechError(
                    f"data.source {source} is a {kind}, not an archive. Fix: pass an archive or a folder."
                )
            if not archive.is_file():
                raise CaltechError(
                    f"data.source {source} does not exist. Fix: pass --data.source with the path of the "
                    f"archive or of the extracted folder, or an https URL to download it from."
                )
        extract(archive, folder, source_id(source), limits, folder_name)
        log.info("Extracted %s to %s", archive, folder)
    return folder
