"""A frozen backbone's features, computed once per image and kept on disk.

With a frozen backbone nearly all of a transfer fit's cost is the backbone's forward pass, and
it gives the same answer in every epoch. The cache computes it once and the head trains on the
stored features, so a fit costs about one pass over the images however many epochs it runs,
and later fits, tests and validations with the same backbone cost almost nothing.

Partial fine-tuning keeps the backbone's first blocks (its trunk, ``blocks.Cut``) frozen
throughout a fit while the last ones train: the same cache then holds the trunk's output, maps
of a few tens of KB an image, and the top blocks and the head train on them (``TrunkOutput``).

The backbone pass runs where the trainer put the model and in its precision: the data module
hands in the model's extractor, its device and its precision from its loader hooks, after
Lightning has placed the model. It runs with pinned memory and as many loader workers as the data
module has: on a GPU it is a decoding pipeline feeding the device.

A cache file is keyed by everything that changes its numbers: the backbone's (or trunk's) weights
(hashed), a trunk's depth in blocks, the preprocessing and transform, the precision, the number of
augmented views, and the image files themselves (path, size, modification time) with their
labels. It is written to a temporary name and renamed when complete, under a file lock, so a
half-written cache is never read and processes that start together compute it once. A cache
file that is damaged anyway (truncated, empty, another program's) is computed again, with one
line saying so; nothing in it is run.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import json
import logging
import os
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn
from torch.utils.data import ConcatDataset, DataLoader, Dataset
from tqdm import tqdm

from caltech_cli.devices import Extractor, full_batch, warm_up
from caltech_cli.engines import Runner, weights_fingerprint
from caltech_cli.files import check_target, folder_lock, written_whole
from caltech_cli.images import LabelledImages
from caltech_cli.loading import loader_workers
from caltech_cli.metrics import LEFT_OUT
from caltech_cli.text import reason
from caltech_cli.transforms import Preprocessing, eval_transform, flip_views, flipped_eval_transform, train_transform

log = logging.getLogger(__name__)
FORMAT_VERSION = 1


def files_fingerprint(dataset: LabelledImages) -> str:
    digest = hashlib.sha256()
    for path, label in zip(dataset.files, dataset.labels):
        stat = os.stat(path)
        digest.update(os.fsencode(path) + f"\0{stat.st_size}\0{stat.st_mtime_ns}\0{label}\n".encode())
    return digest.hexdigest()


class TrunkOutput(NamedTuple):
    """A batch of a frozen trunk's cached output, which the model's top blocks take where they
    would take images (a tensor of maps could be taken for images, so it says what it is)."""

    values: torch.Tensor


class CachedFeatures(Dataset):
    """Stored features with their labels; with several augmented views, each access picks one
    at random, so every epoch sees a different view of each image, as with live augmentation.
    With ``all_views`` (test-time augmentation) each access gives every view, (views, width),
    and the model averages its probabilities over them. A trunk's output (``trunk``) comes in
    batches of :class:`TrunkOutput`.

    A loader fetches a whole batch with one indexing operation (``__getitems__``, with
    :func:`keep_batch` as its ``collate_fn``): the head's epochs cost little more than its steps,
    where picking and stacking items one by one cost more than the head itself.
    """

    def __init__(
        self, features: torch.Tensor, labels: torch.Tensor, all_views: bool = False, trunk: bool = False
    ) -> None:
        self.features = features  # (views, images, width), or (views, images, *map) of a trunk
        self.labels = labels
        self.all_views = all_views
        self.trunk = trunk

    def __len__(self) -> int:
        return self.labels.numel()

    def __getitem__(self, index: int) -> tuple[torch.Tensor | TrunkOutput, int]:
        features, labels = self.__getitems__([index])
        return (TrunkOutput(features.values[0]) if self.trunk else features[0]), int(labels[0])

    def __getitems__(self, indices: Sequence[int]) -> tuple[torch.Tensor | TrunkOutput, torch.Tensor]:
        """The batch of these items: (len, width) features, or (len, views, width) with
        ``all_views``, and their labels; the same draws of views as item by item."""
        rows = torch.as_tensor(indices, dtype=torch.long)
        if self.all_views:
            batch = self.features[:, rows].transpose(0, 1)
        else:
            count = self.features.shape[0]
            views = torch.as_tensor([random.randrange(count) for _ in indices]) if count > 1 else torch.zeros_like(rows)
            batch = self.features[views, rows]
        return (TrunkOutput(batch) if self.trunk else batch), self.labels[rows]


Batch = tuple[torch.Tensor | TrunkOutput, torch.Tensor]


def keep_batch(batch: Batch) -> Batch:
    """The ``collate_fn`` for :class:`CachedFeatures`, whose ``__getitems__`` makes the batch."""
    return batch


@dataclass
class CachedSplit:
    """What the cache holds for one split's images: with ``views`` > 1, that many augmented views
    of each; ``name`` names its file (``train``, ``val_flip``)."""

    name: str
    dataset: LabelledImages  # with the transform whose output is cached
    transform_id: str
    views: int = 1
    # The split whose images these are the mirror images of (test-time augmentation): computed
    # together, an image is decoded once for both (``transforms.FlipViews``).
    mirror_of: str | None = None


def seam_batches(sizes: Sequence[int], batch_size: int) -> list[list[int]]:
    """Batches of indices into datasets of ``sizes`` one after the other, none across a seam
    (datasets may give items of different shapes: one view of an image, or two)."""
    batches, start = [], 0
    for size in sizes:
        batches += [list(range(i, min(i + batch_size, start + size))) for i in range(start, start + size, batch_size)]
        start += size
    return batches


def compute_features(
    extract: Extractor,
    device: torch.device,
    datasets: Sequence[Dataset],
    batch_size: int,
    num_workers: int,
    crop_size: int,
    desc: str,
    views: Sequence[int] = (),
    dtype: torch.dtype = torch.float32,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Run ``extract`` over the datasets, one after the other through one loader (its workers
    start once, and keep decoding across the seams); returns each one's (views, len, width)
    features (or a trunk's (views, len, *map)) on the CPU in ``dtype``, for items of one view
    (3, H, W) or several (views, 3, H, W): ``views`` says how many each dataset gives (one where
    not said), for the warm-up of each batch shape on a GPU; and the labels the pass saw
    (``LEFT_OUT`` for images that could not be read).

    The features stay on the device until the pass ends, so copying them back never stalls it.
    """
    sizes = [len(dataset) for dataset in datasets]
    batches = seam_batches(sizes, batch_size)
    loader = DataLoader(
        ConcatDataset(datasets), batch_sampler=batches, num_workers=num_workers, pin_memory=device.type == "cuda"
    )
    ends = list(itertools.accumulate(sizes))
    chunks: list[list[torch.Tensor]] = [[] for _ in datasets]  # each dataset's, batch by batch
    seen = []
    with torch.inference_mode(), tqdm(total=len(loader.dataset), desc=desc, unit="img") as bar:
        loaded = iter(loader)
        for count in sorted(set(views) or {1}):
            warm_up(extract, device, batch_size * count, crop_size)
        for indices, (images, labels) in zip(batches, loaded):
            each = images.shape[1] if images.ndim == 5 else 1  # views of each image
            flat = images.flatten(0, 1) if images.ndim == 5 else images
            features = extract(full_batch(flat.to(device, non_blocking=True), batch_size * each))[: len(flat)]
            owner = bisect.bisect_right(ends, indices[0])  # the dataset of this batch (none crosses a seam)
            chunks[owner].append(features.to(dtype).unflatten(0, (len(images), each)).transpose(0, 1))
            seen.append(labels)
            bar.update(len(images))
    shape = next((own[0].shape[2:] for own in chunks if own), (0,))
    counts = list(views) or [1] * len(datasets)
    features = [
        torch.cat(own, dim=1).cpu() if own else torch.zeros(count, 0, *shape, dtype=dtype)  # an empty dataset
        for own, count in zip(chunks, counts)
    ]
    labels = torch.cat(seen) if seen else torch.zeros(0, dtype=torch.long)
    return list(zip(features, labels.split(sizes)))


def _passes(missing: Sequence[CachedSplit], preprocessing: Preprocessing) -> list[tuple[Dataset, list[str]]]:
    """The datasets of one backbone pass, each with the splits whose views it gives, in order:
    a split and its mirror images' split (``mirror_of``) go through as one dataset whose items
    are both views of an image, decoded once; a split of ``views`` augmented views goes through
    that many times (each a new random view)."""
    names = {split.name for split in missing}
    passes: list[tuple[Dataset, list[str]]] = []
    for split in missing:
        if split.mirror_of in names:
            continue  # it goes through with the split it mirrors
        mirror = next((other.name for other in missing if other.mirror_of == split.name), None)
        if mirror is None:
            passes += [(split.dataset, [split.name])] * split.views
        else:
            passes.append((replace(split.dataset, transform=flip_views(preprocessing)), [split.name, mirror]))
    return passes


def _key(split: CachedSplit, backbone: str, preprocessing: Preprocessing, extraction: Extraction, engine: str) -> dict:
    key = {
        "version": FORMAT_VERSION,
        "backbone": backbone,
        "preprocessing": asdict(preprocessing),
        "transform": split.transform_id,
        "precision": extraction.precision,
        "views": split.views,
        "files": files_fingerprint(split.dataset),
    }
    if extraction.trunk_blocks:
        key = {**key, "trunk_blocks": extraction.trunk_blocks, "dtype": str(extraction.dtype)}
    # PyTorch's features keep the keys they had before there were engines, and their files.
    return key if engine == "torch" else {**key, "engine": engine}


def _load_cache(
    path: Path, key: dict, dataset: LabelledImages, views: int, name: str, extraction: Extraction
) -> CachedFeatures | None:
    """The features stored at ``path`` if they are what ``key`` describes; None, with one line
    saying so, when the file is truncated, empty, another program's or does not match: its key,
    the features' shape for an image (``extraction.shape``) and their being finite numbers are all
    checked, so a file edited under an intact key is not trusted either.

    ``weights_only`` loading runs no code from the file, whatever it holds.
    """
    try:
        stored = torch.load(path, map_location="cpu", weights_only=True)
        features, labels = stored["features"], stored["labels"]
        if not (
            stored.get("key") == json.dumps(key)
            and isinstance(features, torch.Tensor)
            and isinstance(labels, torch.Tensor)
            and features.dtype == extraction.dtype
            and labels.dtype == torch.long
            and tuple(features.shape) == (views, len(dataset), *extraction.shape)
            and all(stored in (label, LEFT_OUT) for stored, label in zip(labels.tolist(), dataset.labels))
        ):
            raise ValueError("it holds other features than this key's")
        if not all(torch.isfinite(chunk).all() for chunk in features.reshape(-1).split(1 << 24)):
            raise ValueError("it holds numbers that are not finite")
        left_out = [i for i, label in enumerate(labels.tolist()) if label == LEFT_OUT]
        if left_out and not dataset.skip_bad:
            raise ValueError(
                f"it was computed leaving out {len(left_out)} images that could not be read (data.skip_bad_images), "
                "and this run does not skip them"
            )
        for index in left_out:  # named at the end of the run, as if this run had found them
            dataset.failed[index] = 1
    # A cache is only a copy: whatever is wrong with the file, the features are computed again.
    except Exception as error:
        log.warning("The cached %s features in %s cannot be used (%s); computing them again", name, path, reason(error))
        return None
    return CachedFeatures(features, labels, trunk=bool(extraction.trunk_blocks))


@dataclass(frozen=True)
class Extraction:
    """How the backbone pass runs: ``runner(images, fingerprint)`` is what runs a pass of that many
    images (PyTorch where and how the trainer runs the model, or an inference engine, ``engines``)
    and ``planned(images, fingerprint)`` names it without building it, for the key; ``backbone``
    is what it runs, hashed (``fingerprint``) for the key, and its device is where the pass runs;
    ``precision`` names the trainer's precision for the key; ``shape`` is checked in what is
    loaded. A pass of a trunk (partial
    fine-tuning) says its depth, ``trunk_blocks``, and the ``dtype`` its output is kept in (the
    precision the top blocks compute in); features are kept in float32."""

    runner: Callable[[int, str], Runner]
    planned: Callable[[int, str], str]
    backbone: nn.Module
    precision: str
    batch_size: int
    num_workers: int
    shape: tuple[int, ...]  # what the pass gives for one image: (width,), or a trunk's (96, 14, 14)
    trunk_blocks: int = 0
    dtype: torch.dtype = torch.float32

    @property
    def what(self) -> str:
        """What the pass computes, for the logs: ``features``, ``trunk (14 blocks)`` outputs."""
        return f"trunk ({self.trunk_blocks} blocks) outputs" if self.trunk_blocks else "features"

    @property
    def prefix(self) -> str:
        """What a cache file's name starts with before its split's name: a trunk's depth."""
        return f"trunk{self.trunk_blocks}-" if self.trunk_blocks else ""


def cached_features(
    extraction: Extraction, splits: Sequence[CachedSplit], folder: Path, preprocessing: Preprocessing
) -> dict[str, CachedFeatures]:
    """Load the features of the splits from ``folder``; those not there yet are computed in one
    backbone pass (all their images through one loader) and stored."""
    fingerprint = weights_fingerprint(extraction.backbone)
    asked = sum(split.views * len(split.dataset) for split in splits)

    def paths_for(engine: str) -> dict[str, tuple[Path, dict]]:
        paths = {}
        for split in splits:
            key = _key(split, fingerprint, preprocessing, extraction, engine)
            digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
            paths[split.name] = (folder / f"{extraction.prefix}{split.name}-{digest}.pt", key)
        return paths

    def reuse(splits: Sequence[CachedSplit], paths: dict[str, tuple[Path, dict]]) -> list[CachedSplit]:
        """Load the splits stored under ``paths`` into ``found``; the splits that are not there."""
        missing = []
        for split in splits:
            path, key = paths[split.name]
            # A link, a FIFO or a folder where a cache file goes is refused, not read through.
            there = check_target(path, "data.cache_dir").is_file()
            cached = _load_cache(path, key, split.dataset, split.views, split.name, extraction) if there else None
            if cached is None:
                missing.append(split)
            else:
                log.info(
                    "Reusing cached %s %s (%d images) from %s", split.name, extraction.what, len(split.dataset), path
                )
                found[split.name] = cached
        return missing

    planned = extraction.planned(asked, fingerprint)
    paths = paths_for(planned)
    folder.mkdir(parents=True, exist_ok=True)
    found: dict[str, CachedFeatures] = {}
    with folder_lock(folder / ".lock", "data.cache_dir"):
        missing = reuse(splits, paths)
        if not missing:
            return found
        runner = extraction.runner(asked, fingerprint)
        if runner.name != planned:  # the planned engine could not run: the features of the one that does
            paths = paths_for(runner.name)
            missing = reuse(missing, paths)
            if not missing:
                return found
        device = next(extraction.backbone.parameters()).device
        names = " and ".join(split.name for split in missing)
        # No more workers than the splits asked for (those found on disk too) have batches.
        workers = loader_workers(extraction.num_workers, asked, extraction.batch_size)
        start = time.perf_counter()
        passes = _passes(missing, preprocessing)
        computed = compute_features(
            runner.extract,
            device,
            [dataset for dataset, _ in passes],
            extraction.batch_size,
            workers,
            preprocessing.crop_size,
            f"{extraction.what.capitalize()} of {names} images",
            [len(split_names) for _, split_names in passes],
            extraction.dtype,
        )
        seconds = time.perf_counter() - start
        images = sum(split.views * len(split.dataset) for split in missing)
        views: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {split.name: [] for split in missing}
        for (_, split_names), (features, seen) in zip(passes, computed):
            for name, view in zip(split_names, features):
                views[name].append((view, seen))
        for split in missing:
            features = torch.stack([view for view, _ in views[split.name]])
            # An image that could not be read in any view is left out of all of them.
            labels = torch.stack([seen for _, seen in views[split.name]]).min(dim=0).values.long()
            path, key = paths[split.name]
            with written_whole(path, "data.cache_dir") as scratch:
                torch.save({"features": features, "labels": labels, "key": json.dumps(key)}, scratch)
            found[split.name] = CachedFeatures(features, labels, trunk=bool(extraction.trunk_blocks))
        log.info(
            "Cached %s %s of %d images in %s (%.1f s on %s, %s, %.0f images/s)",
            names,
            extraction.what,
            images,
            folder,
            seconds,
            device,
            runner.name,
            images / seconds,
        )
    return found


@dataclass
class FeatureCache:
    """The features a data module's loaders give for a frozen backbone, split by split.

    What the cache holds for a split: the evaluation transform's view, or for training with
    ``cache_views`` that many augmented views; with test-time augmentation also the mirror
    images' view, as a split of its own (``<split>_flip``), so single-view runs share the first.
    Loaded features stay in memory for the process, keyed by split and whether it is evaluated on
    both views (``tta``).
    """

    folder: Path
    preprocessing: Preprocessing
    crop_scale: tuple[float, float]
    cache_views: int
    loaded: dict[tuple[str, bool], CachedFeatures] = field(default_factory=dict)

    def get(self, split: str, tta: bool) -> CachedFeatures | None:
        return self.loaded.get((split, tta))

    def load(self, splits: Mapping[str, tuple[LabelledImages, bool]], extraction: Extraction) -> None:
        """Load or compute the features of ``splits`` (name -> its images, and whether it is
        evaluated with test-time augmentation) that are not loaded yet, in one backbone pass."""
        wanted = {name: part for name, part in splits.items() if (name, part[1]) not in self.loaded}
        if not wanted:
            return
        cached = [split for name, (images, tta) in wanted.items() for split in self._to_cache(name, images, tta)]
        found = cached_features(extraction, cached, self.folder, self.preprocessing)
        for name, (_, tta) in wanted.items():
            if tta:
                views = torch.cat([found[name].features, found[f"{name}_flip"].features])
                self.loaded[name, tta] = CachedFeatures(views, found[name].labels, True, found[name].trunk)
            else:
                self.loaded[name, tta] = found[name]

    def _to_cache(self, name: str, images: LabelledImages, tta: bool) -> list[CachedSplit]:
        pre = self.preprocessing
        if name == "train" and self.cache_views > 0:
            transform = train_transform(pre, self.crop_scale)
            return [
                CachedSplit(
                    name, replace(images, transform=transform), f"train{list(self.crop_scale)}", self.cache_views
                )
            ]
        splits = [CachedSplit(name, replace(images, transform=eval_transform(pre)), "eval")]
        if tta:
            flipped = replace(images, transform=flipped_eval_transform(pre))
            splits.append(CachedSplit(f"{name}_flip", flipped, "eval-hflip", mirror_of=name))
        return splits
