"""Data modules: one base that owns the whole way from a source to batches.

archive or URL -> extracted image folder -> class folders -> stratified split (or the folder's
own train/val/test) -> per-split transforms -> DataLoaders. A subclass only says where its files
come from (a default source, the folder to look for in archives, known checksums).
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, ClassVar

import pytorch_lightning as pl
import torch
from pytorch_lightning import LightningDataModule
from pytorch_lightning.trainer.states import TrainerFn
from torch.utils.data import DataLoader, Dataset

from caltech_cli import sources
from caltech_cli.backbones import Preprocessing
from caltech_cli.errors import CaltechError, folder_lock, writable_folder
from caltech_cli.features import CPU_BATCH, CachedFeatures, Split, cached_features, keep_batch
from caltech_cli.images import (
    IMAGE_EXTENSIONS,
    NOT_AN_IMAGE,
    LabelledImages,
    UnlabelledImages,
    Views,
    eval_transform,
    find_images,
    flipped_eval_transform,
    image_problem,
    stratified_split,
    train_transform,
)
from caltech_cli.report import printable

log = logging.getLogger(__name__)

CALTECH101_URL = "https://data.caltech.edu/records/mzrjq-6wc02/files/caltech-101.zip"


def _subfolders(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def default_num_workers() -> int:
    """One loader worker per core available to this process: decoding JPEGs is what keeps a
    GPU waiting, and on a CPU the backbone's threads and the workers share the cores anyway."""
    return len(os.sched_getaffinity(0))


def loader_workers(workers: int, images: int, batch_size: int) -> int:
    """Workers worth starting for ``images``: no more than there are batches, and none for a
    single batch, which loads faster in the main process than a worker starts (``predict`` on
    one photo answers sooner)."""
    batches = -(-images // batch_size)
    return min(workers, batches) if batches > 1 else 0


# Images per batch of the backbone pass that fills the feature cache, when not given: on a CPU
# the backbone's own best (``features.CPU_BATCH``); on a GPU the pass waits on decoding, and each
# worker decodes a whole batch before the device sees any of it: batches of 32 keep that wait
# short at the start and at the end of the pass.
FEATURE_BATCH_SIZE = {"cpu": CPU_BATCH, "cuda": 32}
# The splits whose features a stage uses, computed together when the first is asked for.
STAGE_SPLITS = {TrainerFn.FITTING: ("val", "train"), TrainerFn.VALIDATING: ("val",), TrainerFn.TESTING: ("test",)}


def _check_options(*checks: tuple[str, Any, bool, str]) -> None:
    """Refuse the first option whose value cannot work, in one line that says what it must be."""
    for option, value, ok, must_be in checks:
        if not ok:
            shown = list(value) if isinstance(value, tuple) else value
            raise CaltechError(f"data.{option} {shown} cannot work: it must be {must_be}. "
                               f"Fix: pass --data.{option} with such a value.")


# Sub-folders that mark a data set as already split; "valid" and "validation" count as "val".
SPLIT_FOLDERS = {"train": ("train",), "val": ("val", "valid", "validation"), "test": ("test",)}


class ImageClassificationDataModule(LightningDataModule):
    """Images in one folder per class, from a URL, an archive or a folder.

    The folder holds either one sub-folder per class, split here by class and seed, or
    ``train/``, ``val/`` (or ``valid/``) and optionally ``test/``, each with one sub-folder per
    class, used as they are.

    Args:
        source: Where the data comes from: an https or ``file://`` URL, a local archive
            (.tar.gz, .zip, .rar, anything patool extracts, archives inside archives too) or an
            already extracted folder, which is used in place. Null means the data set's
            official source, where it has one.
        data_dir: Where downloads and extracted files land.
        split: Relative sizes of the train, validation and test sets, e.g. ``[70, 10, 20]``.
            The split is stratified by class and fixed by ``seed``. Null means the data set's
            usual proportions. Unused when the folder is already split.
        seed: Seed of the split; the same seed gives the same split on every run and process.
        classes: Use only these class folders (all of them by default).
        batch_size: Images per batch.
        num_workers: DataLoader worker processes; null means one per available core.
        crop_scale: Range of the area fraction that training's random resized crop keeps.
        checksum: Expected checksum of a downloaded archive ('sha256:<hex>' or 'md5:<hex>');
            null uses the known checksum of the source URL, if there is one.
        predict_dir: A folder of images (searched recursively) or one image, for ``predict``.
        skip_bad_images: Train without image files that cannot be used (empty, truncated,
            corrupt, too large) instead of stopping before training; either way they are listed.
            A file that the scan passes and that fails to decode later is then skipped too (the
            next image of its class takes its place) and counted at the end, instead of stopping.
        max_extract_gb: Refuse archives that unpack to more than this many GiB.
        max_extract_files: Refuse archives that unpack to more than this many files.
        cache_features: With a frozen backbone, compute its features once per image, keep them
            on disk and train the head on them: a fit then costs about one forward pass over
            the images, and later runs with the same backbone reuse them.
        cache_views: 0 caches training features of the evaluation transform (the usual linear
            probe); N > 0 caches N augmented views of each training image instead, one drawn at
            random each time the image is used.
        cache_dir: Where cached features are kept; null means ``<data_dir>/feature-cache``.
        feature_batch_size: Images per batch of the backbone pass that fills the cache; null
            picks by device: 4 on a CPU (small channels-last batches keep the activations in
            the cache: 4 ran MobileNetV2 about 2x as fast as 16 on a 2-core CPU), 32 on a GPU
            (the pass waits on decoding, and smaller batches reach the device sooner). The head
            may learn from larger batches (``batch_size``).
        tta_flip: Test-time augmentation: ``validate``, ``test`` and ``predict`` average the
            model's probabilities over each image and its mirror image. With cached features the
            mirror images' features are cached too (one more backbone pass over the split, once).
            Validation inside ``fit`` stays single-view, so a fit costs what it did.
        preprocessing: Image size and normalization; linked from the model's weights by the CLI.
    """

    folder_name: ClassVar[str | None] = None  # the folder to find in archives; None: the archive's top folder
    default_source: ClassVar[str | None] = None
    default_split: ClassVar[tuple[float, float, float]] = (70, 10, 20)
    known_checksums: ClassVar[dict[str, str]] = {}  # URL -> 'algorithm:hex' 

    def __init__(
        self,
        source: str | None = None,
        data_dir: str = "./data",
        split: tuple[float, float, float] | None = None,
        seed: int = 42,
        classes: list[str] | None = None,
        batch_size: int = 32,
        num_workers: int | None = None,
        crop_scale: tuple[float, float] = (0.5, 1.0),
        checksum: str | None = None,
        predict_dir: str | None = None,
        skip_bad_images: bool = False,
        max_extract_gb: float = 20.0,
        max_extract_files: int = 2_000_000,
        cache_features: bool = False,
        cache_views: int = 0,
        cache_dir: str | None = None,
        feature_batch_size: int | None = None,
        tta_flip: bool = False,
        preprocessing: Preprocessing | None = None,
    ) -> None:
        super().__init__()
        _check_options(
            ("batch_size", batch_size, batch_size >= 1, "1 or more"),
            ("feature_batch_size", feature_batch_size, feature_batch_size is None or feature_batch_size >= 1,
             "1 or more, or null for batch_size"),
            ("num_workers", num_workers, num_workers is None or num_workers >= 0,
             "0 or more, or null for one per core"),
            ("split", split, split is None or (min(split) >= 0 and sum(split) > 0),
             "three sizes of 0 or more, not all 0, like [70, 10, 20]"),
            ("crop_scale", crop_scale, 0 < crop_scale[0] <= crop_scale[1] <= 1,
             "[smallest, largest] area fraction with 0 < smallest <= largest <= 1, like [0.5, 1.0]"),
            ("cache_views", cache_views, cache_views >= 0, "0 (the evaluation transform) or a number of views"),
        )
        source = source or self.default_source
        if source is None:
            raise CaltechError("data.source is missing. Fix: pass --data.source <archive, folder or URL>.")
        self.source = source
        self.data_dir = Path(data_dir)
        self.split = split or self.default_split
        self.seed = seed
        self.classes = classes
        self.batch_size = batch_size
        self.num_workers = default_num_workers() if num_workers is None else num_workers
        self.crop_scale = crop_scale
        self.checksum = checksum
        self.predict_dir = predict_dir
        self.skip_bad_images = skip_bad_images
        self.extract_limits = sources.Limits(int(max_extract_gb * 2**30), max_extract_files)
        self.cache_features = cache_features
        self.cache_views = cache_views
        self.cache_dir = Path(cache_dir) if cache_dir else self.data_dir / "feature-cache"
        self.feature_batch_size = feature_batch_size
        self.tta_flip = tta_flip
        self.preprocessing = preprocessing or Preprocessing()
        self._class_names: list[str] | None = None
        self._splits: list[LabelledImages] | None = None
        self._features: dict[str, CachedFeatures] = {}
        self.predict_files: list[Path] = []

    # -- where the files are -------------------------------------------------------------------

    @property
    def _source_folder(self) -> Path | None:
        path = Path(self.source)
        return path if not sources.is_url(self.source) and path.is_dir() else None

    @property
    def root(self) -> Path:
        """The folder that holds one subfolder per class (or train/, val/ and test/)."""
        folder = self._source_folder
        if folder is not None:
            if self.folder_name is not None and (folder / self.folder_name).is_dir():
                return folder / self.folder_name
            return folder
        return self.data_dir / (self.folder_name or sources.archive_stem(self.source))

    @property
    def presplit(self) -> dict[str, Path] | None:
        """The split folders when the data set comes split (train/ and val/ at least), else None."""
        if not self.root.is_dir():
            return None
        found = {}
        for split, names in SPLIT_FOLDERS.items():
            folder = next((self.root / n for n in names if (self.root / n).is_dir()), None)
            if folder is not None:
                found[split] = folder
        return found if "train" in found and "val" in found else None

    def _source_id(self) -> str:
        return self.source if sources.is_url(self.source) else str(Path(self.source).resolve())

    def _ready(self) -> bool:
        if self._source_folder is not None:
            return self.root.is_dir()
        return sources.extracted_from(self.root) == self._source_id()

    def prepare_data(self) -> None:
        """Download and extract the source once; later runs reuse the extracted folder.

        ``predict`` needs only its images and the checkpoint, so it fetches nothing. A file lock
        lets processes that start together (torchrun, several jobs) wait for the first one.
        """
        if self.trainer is not None and self.trainer.state.fn == TrainerFn.PREDICTING:
            return
        if self._source_folder is not None:
            log.info("Using the data set at %s in place", self.root)
            return
        writable_folder(self.data_dir, "data.data_dir")
        # SIGTERM raises, so that a stopped download or extraction removes its partial files.
        with folder_lock(self.data_dir / ".prepare.lock", "data.data_dir"), sources.sigterm_raises():
            if self._ready():
                log.info("Using the data set at %s (from %s, already extracted)", self.root, self.source)
                return
            if sources.is_url(self.source):
                checksum = self.checksum or self.known_checksums.get(self.source)
                archive = sources.download(self.source, self.data_dir, checksum)
            else:
                archive = Path(self.source)
                if not archive.is_file():
                    raise CaltechError(
                        f"data.source {self.source} does not exist. Fix: pass --data.source with the path of the "
                        f"archive or of the extracted folder, or an https URL to download it from."
                    )
            sources.extract(archive, self.root, self._source_id(), self.extract_limits, self.folder_name)
            log.info("Extracted %s to %s", archive, self.root)

    # -- classes and splits --------------------------------------------------------------------

    @property
    def class_names(self) -> list[str] | None:
        """Sorted class-folder names (of ``train/`` in a split data set); their positions are the labels.

        The CLI links them into the model when it is built, before any trainer hook runs, so the
        first access fetches the data. With ``predict_dir`` set and no data on disk it is None
        instead: predicting takes the class names from the checkpoint and needs no training data.
        """
        if self._class_names is None:
            if not self._ready():
                if self.predict_dir is not None:
                    return None
                self.prepare_data()
            presplit = self.presplit
            found = _subfolders(presplit["train"] if presplit else self.root)
            for split, folder in (presplit or {}).items():
                strays = sorted(set(_subfolders(folder)) - set(found))
                if strays:
                    raise CaltechError(
                        f"{folder} has classes that {presplit['train']} lacks: {', '.join(strays)}. "
                        "Fix: add training images of them, or remove those folders."
                    )
            if self.classes is not None:
                missing = sorted(set(self.classes) - set(found))
                if missing:
                    raise CaltechError(
                        f"data.classes names folders that {self.root} does not have: {', '.join(missing)}."
                    )
                found = sorted(self.classes)
            if not found:
                raise CaltechError(f"{self.root} has no class folders. Fix: point data.source at the data set.")
            if len(found) == 1:
                where = "data.classes keeps" if self.classes is not None else f"{self.root} has"
                raise CaltechError(
                    f"{where} one class ({found[0]}): a classifier needs two or more. Fix: add a folder of images "
                    "for each other class, or point data.source at the whole data set."
                )
            unnamed = ", ".join(printable(name) for name in found if printable(name) != name)
            if unnamed:
                raise CaltechError(
                    f"class folders under {self.root} have names that are not valid UTF-8: {unnamed}. "
                    "Class names go into checkpoints, reports and W&B. Fix: rename them."
                )
            self._class_names = found
        return self._class_names

    @property
    def num_classes(self) -> int | None:
        names = self.class_names
        return None if names is None else len(names)

    def _scan(self, root: Path) -> tuple[list[Path], list[int]]:
        """Every usable image under ``root``'s class folders, judged by content, not by extension.

        Files that are not images and do not claim to be (a README) are ignored. Files named as
        images that cannot be used (empty, truncated, corrupt, too large) are listed with the
        reason, and stop the run before training unless ``skip_bad_images`` is set. Symbolic
        links that lead outside the data set's folder are not followed: a folder from elsewhere
        must not feed other files of this machine into training, reports and W&B.
        """
        names = self.class_names or []
        inside = self.root.resolve()
        files, labels, ignored, bad, outside = [], [], [], [], []
        for label, name in enumerate(names):
            # rglob does not descend into linked folders: only a linked file, class or split folder
            # can lead outside, and only their files need resolving.
            linked = root.is_symlink() or (root / name).is_symlink()
            for path in sorted(p for p in (root / name).rglob("*") if p.is_file()):
                if (linked or path.is_symlink()) and not path.resolve().is_relative_to(inside):
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
            shown = ", ".join(printable(str(p.relative_to(root))) for p in ignored[:10])
            log.info("Ignoring %d files that are not images: %s", len(ignored), shown)
        if outside:
            shown = ", ".join(str(p.relative_to(root)) for p in outside[:10])
            log.warning("Not following %d symbolic links that lead outside %s: %s", len(outside), self.root, shown)
        if bad:
            listing = "\n  ".join(bad)
            if not self.skip_bad_images:
                raise CaltechError(
                    f"{len(bad)} image files under {root} cannot be used:\n  {listing}\n"
                    "Fix: remove or replace them, or pass --data.skip_bad_images true to train without them."
                )
            log.warning("Skipping %d image files that cannot be used:\n  %s", len(bad), listing)
        if not files:
            raise CaltechError(f"no images found under {root}.")
        return files, labels

    def _require_every_class(self, root: Path, labels: list[int]) -> None:
        """Refuse class folders without usable images: the model would get outputs for classes it
        never sees, and per-class metrics for classes that never occur."""
        names = self.class_names or []
        empty = sorted(set(range(len(names))) - set(labels))
        if empty:
            shown = ", ".join(printable(names[i]) for i in empty)
            raise CaltechError(
                f"class folders under {root} hold no usable images: {shown}. A model would get a head for classes "
                "that never occur. Fix: add images to them, remove them, or list the classes to use in --data.classes."
            )

    def _split_files(self) -> list[tuple[list[Path], list[int]]]:
        """(files, labels) of train, val and test: the folder's own split, or a stratified one."""
        presplit = self.presplit
        if presplit is not None:
            log.info("Using the split of %s (train/val/test folders); data.split is not used", self.root)
            scanned = [self._scan(presplit[name]) if name in presplit else ([], []) for name in SPLIT_FOLDERS]
            self._require_every_class(presplit["train"], scanned[0][1])
            return scanned
        files, labels = self._scan(self.root)
        self._require_every_class(self.root, labels)
        parts = stratified_split(labels, self.split, self.seed)
        empty = [name for name, part in zip(SPLIT_FOLDERS, parts) if not part]
        if empty:
            raise CaltechError(
                f"data.split {list(self.split)} leaves no images for {', '.join(empty)} out of {len(files)}. "
                "Fix: give every set a larger share."
            )
        return [([files[i] for i in part], [labels[i] for i in part]) for part in parts]

    def _make_splits(self) -> list[LabelledImages]:
        if self._splits is None:
            pre = self.preprocessing
            transforms = [train_transform(pre, self.crop_scale), eval_transform(pre), eval_transform(pre)]
            self._splits = [
                LabelledImages(files, labels, transform, pre.resize_size, self.skip_bad_images)
                for (files, labels), transform in zip(self._split_files(), transforms)
            ]
            log.info(
                "%d images in %d classes: %s train, %s val, %s test (split %s)",
                sum(len(s) for s in self._splits),
                len(self.class_names or []),
                *(len(s) for s in self._splits),
                self.split_fingerprint(),
            )
        return self._splits

    def split_fingerprint(self) -> str:
        """A short hash of which file is in which split: equal on every process and every run
        with the same data and seed, so logs show that they trained and tested on the same sets."""
        digest = hashlib.sha256()
        for name, split in zip(SPLIT_FOLDERS, self._make_splits()):
            for path, label in zip(split.files, split.labels):
                digest.update(f"{name}\0".encode() + os.fsencode(path.relative_to(self.root)) + f"\0{label}\n".encode())
        return digest.hexdigest()[:12]

    @property
    def train_set(self) -> LabelledImages:
        return self._make_splits()[0]

    @property
    def val_set(self) -> LabelledImages:
        return self._make_splits()[1]

    @property
    def test_set(self) -> LabelledImages:
        test = self._make_splits()[2]
        if not test:
            raise CaltechError(f"{self.root} has no test/ folder with images. Fix: add one, with a sub-folder per class.")
        return test

    def setup(self, stage: str) -> None:
        if stage == "predict":
            if self.predict_dir is None:
                raise CaltechError("predict needs images. Fix: pass --data.predict_dir <folder or image>.")
            folder = Path(self.predict_dir)
            if not folder.exists():
                raise CaltechError(f"data.predict_dir {folder} does not exist.")
            self.predict_files = find_images(folder)
            if not self.predict_files:
                raise CaltechError(f"data.predict_dir {folder} holds no image files.")
            return
        self._make_splits()
        model = self.trainer.lightning_module if self.trainer is not None else None
        if self.cache_features and model is not None and not getattr(model, "freeze_backbone", False):
            log.info("Not caching features: the backbone is trained (model.freeze_backbone is false)")
        if self._frozen_model() is not None:
            writable_folder(self.cache_dir, "data.cache_dir")

    def teardown(self, stage: str) -> None:
        """Say which image files were skipped because they could not be read (``skip_bad_images``)."""
        skipped = [path for split in self._splits or [] for path in split.skipped()]
        if skipped:
            log.warning(
                "Skipped %d image files that could not be read (the next image of the class took each one's "
                "place): %s. Fix: remove or replace them.", len(skipped), ", ".join(map(str, skipped[:10]))
            )

    # -- feature cache -------------------------------------------------------------------------

    def _frozen_model(self) -> pl.LightningModule | None:
        """The attached model when its backbone's features can be cached, else None."""
        model = self.trainer.lightning_module if self.trainer is not None else None
        if not self.cache_features or model is None or not getattr(model, "freeze_backbone", False):
            return None
        return model

    @property
    def _device(self) -> torch.device:
        """Where the trainer runs the model (the CPU before a trainer is attached)."""
        return self.trainer.strategy.root_device if self.trainer is not None else torch.device("cpu")

    def _dataset(self, split: str) -> Dataset:
        """The split's images, or with a frozen backbone and ``cache_features`` its cached features.

        Called from the ``*_dataloader`` hooks, which Lightning calls after it has moved the model
        to its device: the backbone pass runs there, in the trainer's precision, never on the
        CPU while a GPU waits. The first call computes every split the running stage needs
        (fit: train and val) in one pass, so the loader's workers start once.
        """
        model = self._frozen_model()
        if model is None:
            images = self._images(split)
            if self._tta(split):
                images = replace(images, transform=Views(self._tta_transforms()))
            return images
        if self._stored(split) not in self._features:
            precision = self.trainer.precision_plugin

            def extract(images: torch.Tensor) -> torch.Tensor:
                with precision.forward_context():
                    return model.features(images)

            wanted = [s for s in STAGE_SPLITS.get(self.trainer.state.fn, ()) if self._stored(s) not in self._features]
            names = list(dict.fromkeys([*wanted, split]))
            splits = [s for name in names for s in self._to_cache(name)]
            batch_size = self.feature_batch_size or FEATURE_BATCH_SIZE.get(self._device.type, 32)
            images = sum(s.views * len(s.dataset) for s in splits)
            found = cached_features(
                extract, model.backbone, splits, self.cache_dir, self.preprocessing, str(self.trainer.precision),
                batch_size, loader_workers(self.num_workers, images, batch_size),
            )
            for name in names:
                if self._tta(name):
                    views = torch.cat([found[name].features, found[f"{name}_flip"].features])
                    self._features[self._stored(name)] = CachedFeatures(views, found[name].labels, all_views=True)
                else:
                    self._features[name] = found[name]
        return self._features[self._stored(split)]

    def _images(self, split: str) -> LabelledImages:
        return getattr(self, f"{split}_set")

    def _tta(self, split: str) -> bool:
        """Whether the split is evaluated on several views: with ``tta_flip``, for val and test
        outside ``fit`` (fit's validation stays single-view, so it costs what it did)."""
        fitting = self.trainer is not None and self.trainer.state.fn == TrainerFn.FITTING
        return self.tta_flip and split != "train" and not fitting

    def _stored(self, split: str) -> str:
        """The split's key among the loaded features: single-view and TTA features differ."""
        return f"{split}+flip" if self._tta(split) else split

    def _tta_transforms(self) -> list[Callable]:
        return [eval_transform(self.preprocessing), flipped_eval_transform(self.preprocessing)]

    def _to_cache(self, split: str) -> list[Split]:
        """What the cache holds for a split: the evaluation transform's view, or for training with
        ``cache_views`` that many augmented views; with test-time augmentation also the mirror
        images' view, as a split of its own (``<split>_flip``), so single-view runs share the first."""
        pre = self.preprocessing
        if split == "train" and self.cache_views > 0:
            transform = train_transform(pre, self.crop_scale)
            return [Split(split, replace(self.train_set, transform=transform), f"train{list(self.crop_scale)}",
                          self.cache_views)]
        splits = [Split(split, replace(self._images(split), transform=eval_transform(pre)), "eval")]
        if self._tta(split):
            flipped = replace(self._images(split), transform=flipped_eval_transform(pre))
            splits.append(Split(f"{split}_flip", flipped, "eval-hflip"))
        return splits

    # -- loaders -------------------------------------------------------------------------------

    def _loader(self, dataset: Dataset, shuffle: bool = False) -> DataLoader:
        """Images load in worker processes; cached features are in memory and need none.

        Training draws its shuffle and its workers' seeds from the global generator, whose state
        checkpoints keep, and starts fresh workers each epoch (persistent ones would carry their
        own generator state past a checkpoint), so a resumed fit draws what an unbroken one
        would. Evaluation draws from a generator of its own, leaving the global one alone.
        """
        cached = isinstance(dataset, CachedFeatures)
        workers = 0 if cached else loader_workers(self.num_workers, len(dataset), self.batch_size)
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=workers,
            persistent_workers=workers > 0 and not shuffle,
            generator=None if shuffle else torch.Generator().manual_seed(self.seed),
            # Pinned pages let the copy to a GPU overlap the next step (Lightning copies non-blocking).
            pin_memory=self._device.type == "cuda",
            collate_fn=keep_batch if cached else None,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self._dataset("train"), shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self._dataset("val"))

    def test_dataloader(self) -> DataLoader:
        return self._loader(self._dataset("test"))

    def predict_dataloader(self) -> DataLoader:
        pre = self.preprocessing
        if self.tta_flip:
            images = UnlabelledImages(self.predict_files, Views(self._tta_transforms()), pre.crop_size,
                                      pre.resize_size, views=2)
        else:
            images = UnlabelledImages(self.predict_files, eval_transform(pre), pre.crop_size, pre.resize_size)
        return self._loader(images)


class Caltech101DataModule(ImageClassificationDataModule):
    """Caltech-101: 101 object classes plus the clutter class BACKGROUND_Google, about 9k images.

    The default source is the official CaltechDATA zip; its inner ``101_ObjectCategories.tar.gz``
    (or that archive alone, or its extracted folder) works as well. The default split keeps the
    proportions 6500/1000/1645 of the well-known tutorial.
    """

    folder_name = "101_ObjectCategories"
    default_source = CALTECH101_URL
    default_split = (6500, 1000, 1645)
    known_checksums = {CALTECH101_URL: "md5:3138e1922a9193bfa496528edbbc45d0"}


class ImageFolderDataModule(ImageClassificationDataModule):
    """Your own images: a folder (or an archive, or a URL of one) with one sub-folder per class,
    or with ``train/``, ``val/`` and ``test/`` each holding one sub-folder per class.

    Everything else works as for Caltech-101: transforms from the weights, class names saved in
    checkpoints, the feature cache, reports and ``predict``.

    Args:
        root: The folder, archive or URL. An archive may wrap the folder in one top folder.
        kwargs: The options of :class:`ImageClassificationDataModule` (``caltech fit --data.help
            ImageFolderDataModule`` lists them), except ``source``, which ``root`` replaces.
    """

    def __init__(self, root: str, **kwargs: Any) -> None:
        super().__init__(source=root, **kwargs)
