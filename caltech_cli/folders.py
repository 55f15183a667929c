"""A data set's folder -> its classes -> its image files -> the train, val and test split.

Plain functions that return frozen values, so the whole way from a folder to a split can be
tested without a Trainer: :func:`read_layout` finds the classes (and the folder's own split, if
it comes split), :func:`scan` the usable images of each class, :func:`split` the three sets.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from caltech_cli.errors import CaltechError
from caltech_cli.files import files_under
from caltech_cli.images import IMAGE_EXTENSIONS, NOT_AN_IMAGE, image_problem
from caltech_cli.text import printable

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
# Sub-folders that mark a data set as already split; "valid" and "validation" count as "val".
SPLIT_FOLDERS = {"train": ("train",), "val": ("val", "valid", "validation"), "test": ("test",)}
# Bad files named in an error; the rest are logged above it.
SHOWN_PROBLEMS = 10


def subfolders(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def split_folders(root: Path) -> dict[str, Path] | None:
    """The split folders when the data set comes split (train/ and val/ at least), else None."""
    if not root.is_dir():
        return None
    found = {}
    for split, names in SPLIT_FOLDERS.items():
        folder = next((root / n for n in names if (root / n).is_dir()), None)
        if folder is not None:
            found[split] = folder
    return found if "train" in found and "val" in found else None


@dataclass(frozen=True)
class Layout:
    """What a data set's folder holds: its classes, sorted (their positions are the labels; of
    ``train/`` in a split data set), and its split folders when it comes split."""

    root: Path
    classes: tuple[str, ...]
    split_folders: Mapping[str, Path] | None = None


def read_layout(root: Path, wanted: Sequence[str] | None = None) -> Layout:
    """The classes of the data set at ``root`` (only ``wanted``, if given), refused in one line
    when a classifier cannot learn them: none or one, names that are not valid UTF-8 (they go into
    checkpoints, reports and W&B), a split folder with classes that ``train/`` lacks."""
    presplit = split_folders(root)
    found = subfolders(presplit["train"] if presplit else root)
    for folder in (presplit or {}).values():
        strays = sorted(set(subfolders(folder)) - set(found))
        if strays:
            raise CaltechError(
                f"{folder} has classes that {presplit['train']} lacks: {', '.join(strays)}. "
                "Fix: add training images of them, or remove those folders."
            )
    if wanted is not None:
        repeated = sorted({name for name in wanted if list(wanted).count(name) > 1})
        if repeated:
            raise CaltechError(
                f"data.classes names {', '.join(repeated)} more than once: each class is one folder and one label. "
                "Fix: name each class once."
            )
        missing = sorted(set(wanted) - set(found))
        if missing:
            raise CaltechError(
                f"data.classes names folders that {root} does not have: {', '.join(missing)}. "
                f"Fix: pass --data.classes with names of the class folders there"
                + (f", like {', '.join(found[:3])}." if found else ".")
            )
        found = sorted(wanted)
    if not found:
        raise CaltechError(f"{root} has no class folders. Fix: point data.source at the data set.")
    if len(found) == 1:
        where = "data.classes keeps" if wanted is not None else f"{root} has"
        raise CaltechError(
            f"{where} one class ({found[0]}): a classifier needs two or more. Fix: add a folder of images "
            "for each other class, or point data.source at the whole data set."
        )
    unnamed = ", ".join(printable(name) for name in found if printable(name) != name)
    if unnamed:
        raise CaltechError(
            f"class folders under {root} have names that are not valid UTF-8: {unnamed}. "
            "Class names go into checkpoints, reports and W&B. Fix: rename them."
        )
    return Layout(root, tuple(found), presplit)


@dataclass(frozen=True)
class Labelled:
    """Image files and their class indices, in the same order."""

    files: tuple[Path, ...] = ()
    labels: tuple[int, ...] = ()


def scan(folder: Path, classes: Sequence[str], inside: Path, skip_bad: bool) -> Labelled:
    """Every usable image under ``folder``'s class folders, judged by content, not by extension.

    Files that are not images and do not claim to be (a README) are ignored. Files named as
    images that cannot be used (empty, truncated, corrupt, too large) are listed with the
    reason, and stop the run before training unless ``skip_bad``. Symbolic links that lead
    outside ``inside`` (the data set's folder) are not followed: a folder from elsewhere must not
    feed other files of this machine into training, reports and W&B.
    """
    resolved = inside.resolve()
    files, labels, ignored, bad, outside = [], [], [], [], []
    for label, name in enumerate(classes):
        # files_under does not descend into linked folders: only a linked file, class or split
        # folder can lead outside, and only their files need resolving.
        linked = folder.is_symlink() or (folder / name).is_symlink()
        for path in files_under(folder / name):
            if (linked or path.is_symlink()) and not path.resolve().is_relative_to(resolved):
                outside.append(path)
                continue
            problem = image_problem(path)
            named_as_image = path.suffix.lower() in IMAGE_EXTENSIONS
            if problem is None:
                files.append(path)
                labels.append(label)
            elif not named_as_image and (problem == NOT_AN_IMAGE or path.stat().st_size == 0):
                ignored.append(path)  # a README, or an empty .gitkeep
            else:
                bad.append(f"{path}: {problem}")
    if ignored:
        shown = ", ".join(printable(str(p.relative_to(folder))) for p in ignored[:10])
        log.info("Ignoring %d files that are not images: %s", len(ignored), shown)
    if outside:
        shown = ", ".join(str(p.relative_to(folder)) for p in outside[:10])
        log.warning("Not following %d symbolic links that lead outside %s: %s", len(outside), inside, shown)
    if bad:
        if skip_bad:
            log.warning("Skipping %d image files that cannot be used: %s", len(bad), "; ".join(bad))
        else:
            if len(bad) > SHOWN_PROBLEMS:
                log.error("Image files that cannot be used: %s", "; ".join(bad))
            more = f"; and {len(bad) - SHOWN_PROBLEMS} more, listed above" if len(bad) > SHOWN_PROBLEMS else ""
            raise CaltechError(
                f"{len(bad)} image files under {folder} cannot be used: {'; '.join(bad[:SHOWN_PROBLEMS])}{more}. "
                "Fix: remove or replace them, or pass --data.skip_bad_images true to train without them."
            )
    if not files:
        raise CaltechError(
            f"no images found under {folder}. Fix: point data.source at a folder with a sub-folder of images per class."
        )
    return Labelled(tuple(files), tuple(labels))


def require_every_class(folder: Path, found: Labelled, classes: Sequence[str]) -> None:
    """Refuse class folders without usable images: the model would get outputs for classes it
    never sees, and per-class metrics for classes that never occur."""
    empty = sorted(set(range(len(classes))) - set(found.labels))
    if empty:
        shown = ", ".join(printable(classes[i]) for i in empty)
        raise CaltechError(
            f"class folders under {folder} hold no usable images: {shown}. A model would get a head for classes "
            "that never occur. Fix: add images to them, remove them, or list the classes to use in --data.classes."
        )


def apportion(total: int, weights: Sequence[float]) -> list[int]:
    """Split ``total`` into integers proportional to ``weights`` that add up exactly (largest remainder)."""
    if len(weights) == 0 or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"split weights must be non-negative with a positive sum, got {list(weights)}")
    exact = [total * w / sum(weights) for w in weights]
    counts = [int(x) for x in exact]
    by_remainder = sorted(range(len(weights)), key=lambda i: exact[i] - counts[i], reverse=True)
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    return counts


def stratified_split(labels: Sequence[int], weights: Sequence[float], seed: int) -> list[list[int]]:
    """Indices of ``labels`` split in the proportions ``weights``, stratified by label.

    Within each class the items are shuffled with ``seed`` and spread evenly over [0, 1); the
    whole set is then ordered by that position and cut at the exact split sizes. Each class thus
    lands in every split in (nearly) the split's proportion, the totals are exact, and the result
    depends only on the labels' order and the seed: the same on every run and every process.
    """
    rng = random.Random(seed)
    by_class: dict[int, list[int]] = defaultdict(list)
    for index, label in enumerate(labels):
        by_class[label].append(index)
    keyed = []
    for label in sorted(by_class):
        members = by_class[label]
        rng.shuffle(members)
        keyed += [((rank + 0.5) / len(members), rng.random(), index) for rank, index in enumerate(members)]
    order = [index for _, _, index in sorted(keyed)]
    splits, start = [], 0
    for count in apportion(len(labels), weights):
        splits.append(sorted(order[start : start + count]))
        start += count
    return splits


@dataclass(frozen=True)
class Splits:
    """The train, val and test sets, and a short hash of which file is in which (``fingerprint``):
    equal on every process and every run with the same data and seed, so logs show that they
    trained and tested on the same sets."""

    train: Labelled
    val: Labelled
    test: Labelled
    fingerprint: str

    def __iter__(self):  # train, val, test
        return iter((self.train, self.val, self.test))


def fingerprint(root: Path, parts: Sequence[Labelled]) -> str:
    digest = hashlib.sha256()
    for name, part in zip(SPLITS, parts):
        for path, label in zip(part.files, part.labels):
            digest.update(f"{name}\0".encode() + os.fsencode(path.relative_to(root)) + f"\0{label}\n".encode())
    return digest.hexdigest()[:12]


def member_keys(root: Path, files: Sequence[Path]) -> set[str]:
    """Short keys of image files by their path under ``root`` and their size: what a checkpoint
    keeps of its training set, so that a later test can tell whether it scores images the
    network trained on, without holding the file names themselves."""
    keys = set()
    for path in files:
        try:
            size = path.stat().st_size
        except OSError:
            size = -1
        key = os.fsencode(path.relative_to(root)) + f"\0{size}".encode()
        keys.add(hashlib.sha256(key).hexdigest()[:16])
    return keys


def files_key(root: Path, files: Sequence[Path]) -> str:
    """A short key of exactly these files, in any order: their paths under ``root`` and sizes
    (``member_keys``). Two tests with the same key scored the same images."""
    return hashlib.sha256("".join(sorted(member_keys(root, files))).encode()).hexdigest()[:12]


def split(layout: Layout, weights: Sequence[float], seed: int, skip_bad: bool) -> Splits:
    """The folder's own split (``weights`` unused), or a stratified one in the proportions
    ``weights``, fixed by ``seed``; a set left empty is refused."""
    presplit = layout.split_folders
    if presplit is not None:
        log.info("Using the split of %s (train/val/test folders); data.split is not used", layout.root)
        parts = [
            scan(presplit[name], layout.classes, layout.root, skip_bad) if name in presplit else Labelled()
            for name in SPLITS
        ]
        require_every_class(presplit["train"], parts[0], layout.classes)
        return Splits(*parts, fingerprint(layout.root, parts))
    found = scan(layout.root, layout.classes, layout.root, skip_bad)
    require_every_class(layout.root, found, layout.classes)
    indices = stratified_split(found.labels, weights, seed)
    empty = [name for name, part in zip(SPLITS, indices) if not part]
    if empty:
        raise CaltechError(
            f"data.split {list(weights)} leaves no images for {', '.join(empty)} out of {len(found.files)}. "
            "Fix: give every set a larger share."
        )
    parts = [Labelled(tuple(found.files[i] for i in part), tuple(found.labels[i] for i in part)) for part in indices]
    return Splits(*parts, fingerprint(layout.root, parts))
