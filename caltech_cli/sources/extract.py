"""Extracting a source archive into place: find the wanted folder, in nested archives too, and
move it where the data module looks for it, marked as complete.

An extraction goes into a temporary folder and is moved into place, then its marker says it is
complete: a folder whose marker does not say so is never used, and a folder without a marker is
the user's and is never replaced.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

from caltech_cli.errors import CaltechError
from caltech_cli.files import files_under, remove_tree, walk
from caltech_cli.sources.markers import check_extraction_is_ours, mark_extraction, marked_extraction
from caltech_cli.sources.unpack import Budget, Limits, is_archive, unpack

log = logging.getLogger(__name__)

# Nested archives are opened to this depth when the wanted folder is not found at the top.
MAX_NESTING = 3


def _find_folder(root: Path, name: str) -> Path | None:
    """The shallowest folder called ``name`` under ``root``."""
    matches = [folder / name for folder, folders, _ in walk(root) if name in folders]
    matches = sorted((p for p in matches if p.is_dir()), key=lambda p: (len(p.parts), p))
    return matches[0] if matches else None


def _top_folder(root: Path) -> Path:
    """The folder an archive holds: past wrapper folders that hold one folder and nothing else."""
    while True:
        entries = [p for p in root.iterdir() if not p.name.startswith(".") and p.name != "__MACOSX"]
        if len(entries) != 1 or not entries[0].is_dir():
            return root
        root = entries[0]


def extract(archive: Path, folder: Path, source: str, limits: Limits, inner: str | None = None) -> Path:
    """Extract ``archive`` and move the folder named ``inner`` found in it to ``folder``; without
    ``inner``, the archive's own top folder.

    Archives inside the archive (the official Caltech-101 zip holds a .tar.gz) are opened too when
    ``inner`` is not found, those whose name mentions it first; the limits hold for everything
    extracted from ``archive``, at every depth. A ``folder`` that this tool did not extract is
    never replaced.
    """
    check_extraction_is_ours(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".extracting-", dir=folder.parent))
    budget = Budget(limits, str(archive))
    try:
        log.info("Extracting %s", archive)
        unpack(archive, scratch / "0", budget, str(archive))
        if inner is None:
            return _finish(_top_folder(scratch / "0"), folder, source, scratch)
        found = _find_folder(scratch, inner)
        for depth in range(1, MAX_NESTING + 1):
            if found is not None:
                break
            nested = sorted(
                (p for p in files_under(scratch) if is_archive(p)),
                key=lambda p: inner not in p.name,
            )
            if not nested:
                break
            for number, packed in enumerate(nested):
                log.info("Extracting %s (inside %s)", packed.name, archive.name)
                unpack(packed, scratch / f"{depth}.{number}", budget, f"{packed.name} (inside {archive})")
                packed.unlink()
                found = _find_folder(scratch, inner)
                if found is not None:
                    break
        if found is None:
            raise CaltechError(
                f"{archive} holds no folder named {inner}. Fix: pass the data set's archive "
                f"or a folder that holds {inner}."
            )
        return _finish(found, folder, source, scratch)
    finally:
        remove_tree(scratch)


def _finish(found: Path, folder: Path, source: str, scratch: Path) -> Path:
    """Put the extracted ``found`` at ``folder`` and mark it complete, naming its source.

    An earlier extraction at ``folder`` (ours: it has a marker) moves into ``scratch``, which is
    then deleted. The marker says "not complete" while the folders move, so a run stopped half-way
    leaves a folder that is known to be ours and is extracted again.
    """
    check_extraction_is_ours(folder)
    earlier = marked_extraction(folder).get("source")
    mark_extraction(folder, source, complete=False)
    if folder.exists() or folder.is_symlink():
        log.info("Replacing %s (extracted earlier from %s)", folder, earlier)
        os.replace(folder, scratch / "replaced")
    os.replace(found, folder)
    mark_extraction(folder, source, complete=True)
    return folder
