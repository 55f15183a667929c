"""Data modules: a source's images as a LightningDataModule, composed of the steps of the data's way.

``sources`` fetches the folder, ``folders`` finds its classes and split, ``transforms`` and
``images`` make the tensors, ``features`` caches a frozen backbone's features and ``loading``
makes the loaders. A subclass only says where its files come from (a default source, the folder
to look for in archives, known checksums).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, ClassVar

import pytorch_lightning as pl
import torch
from pytorch_lightning import LightningDataModule
from pytorch_lightning.trainer.states import TrainerFn
from torch.utils.data import DataLoader, Dataset

from caltech_cli import folders, sources
from caltech_cli.blocks import output_shape
from caltech_cli.errors import CaltechError
from caltech_cli.features import CachedFeatures, Extraction, FeatureCache, keep_batch
from caltech_cli.files import writable_folder
from caltech_cli.images import LabelledImages, UnlabelledImages, images_to_predict
from caltech_cli.loading import default_num_workers, feature_batch_size, loader, loader_workers
from caltech_cli.transforms import Preprocessing, eval_transform, flip_views, train_transform

log = logging.getLogger(__name__)


class NotReadYetError(CaltechError, AttributeError):
    """What a data module knows only once it has read its folder (``find_classes``, ``setup``).
    An AttributeError too, so that ``getattr(data, "train_set", None)`` is None before ``setup``."""


CALTECH101_URL = "https://data.caltech.edu/records/mzrjq-6wc02/files/caltech-101.zip"
# The splits whose features a stage uses, computed together when the first is asked for.
STAGE_SPLITS = {TrainerFn.FITTING: ("val", "train"), TrainerFn.VALIDATING: ("val",), TrainerFn.TESTING: ("test",)}


def _check_options(*checks: tuple[str, Any, bool, str]) -> None:
    """Refuse the first option whose value cannot work, in one line that says what it must be."""
    for option, value, ok, must_be in checks:
        if not ok:
            shown = list(value) if isinstance(value, tuple) else value
            raise CaltechError(
                f"data.{option} {shown} cannot work: it must be {must_be}. Fix: pass --data.{option} with such a value."
            )


class ImageClassificationDataModule(LightningDataModule):
    """Images in one folder per class, from a URL, an archive or a folder.

    The folder holds either one sub-folder per class, split here by class and seed, or
    ``train/``, ``val/`` (or ``valid/``) and optionally ``test/``, each with one sub-folder per
    class, used as they are. (The class runs past 250 lines for its ``Args``, which are the data
    options' ``--help``; the work is in the modules it composes.)

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
            the processor's cache; docs/performance.md), 32 on a GPU (the pass waits on
            decoding, and smaller batches reach the device sooner). The head may learn from
            larger batches (``batch_size``).
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
            (
                "feature_batch_size",
                feature_batch_size,
                feature_batch_size is None or feature_batch_size >= 1,
                "1 or more, or null to pick by device",
            ),
            (
                "num_workers",
                num_workers,
                num_workers is None or num_workers >= 0,
                "0 or more, or null for one per core",
            ),
            (
                "split",
                split,
                split is None or (all(map(math.isfinite, split)) and min(split) >= 0 and sum(split) > 0),
                "three finite sizes of 0 or more, not all 0, like [70, 10, 20]",
            ),
            (
                "crop_scale",
                crop_scale,
                0 < crop_scale[0] <= crop_scale[1] <= 1,
                "[smallest, largest] area fraction with 0 < smallest <= largest <= 1, like [0.5, 1.0]",
            ),
            ("cache_views", cache_views, cache_views >= 0, "0 (the evaluation transform) or a number of views"),
            (
                "max_extract_gb",
                max_extract_gb,
                math.isfinite(max_extract_gb) and max_extract_gb > 0,
                "above 0, like 20",
            ),
            ("max_extract_files", max_extract_files, max_extract_files >= 1, "1 or more"),
        )
        source = source or self.default_source
        if source is None:
            raise CaltechError("data.source is missing. Fix: pass --data.source <archive, folder or URL>.")
        self.source = source
        self.data_dir = Path(data_dir)
        self.root = sources.data_folder(source, self.data_dir, self.folder_name)
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
        self.feature_batch_size = feature_batch_size
        self.tta_flip = tta_flip
        self.preprocessing = preprocessing or Preprocessing()
        self.cache_dir = Path(cache_dir) if cache_dir else self.data_dir / "feature-cache"
        self.cache_views = cache_views
        self.feature_cache = FeatureCache(self.cache_dir, self.preprocessing, crop_scale, cache_views)
        self.trunk_caches: dict[int, FeatureCache] = {}  # by the trunk's depth in blocks
        self.layout: folders.Layout | None = None
        self.splits: dict[str, LabelledImages] = {}  # train, val and test, once setup has made them
        self.fingerprint: str | None = None
        # The training images' keys a checkpoint keeps, computed at its first save (``state_dict``).
        self._train_keys: list[str] | None = None
        self.predict_files: list[Path] = []

    def prepare_data(self) -> None:
        """Download and extract the source once (``sources.fetch``); later runs reuse the folder.
        ``predict`` needs only its images and the checkpoint, so it fetches nothing."""
        if self.trainer is not None and self.trainer.state.fn == TrainerFn.PREDICTING:
            return
        checksum = self.checksum or self.known_checksums.get(self.source)
        sources.fetch(self.source, self.data_dir, self.folder_name, checksum, self.extract_limits)

    def find_classes(self) -> list[str] | None:
        """The class names (sorted class folders; their positions are the labels), fetching the data
        first if it is not on disk yet: the CLI links them into the model when it is built, before
        any trainer hook runs. With ``predict_dir`` set and no data on disk it is None instead:
        predicting takes the class names from the checkpoint and needs no training data."""
        if self.layout is None:
            if not sources.is_fetched(self.source, self.data_dir, self.folder_name):
                if self.predict_dir is not None:
                    return None
                self.prepare_data()
            self.layout = folders.read_layout(self.root, self.classes)
        return self.class_names

    @property
    def class_names(self) -> list[str]:
        """The classes that :meth:`find_classes` (which ``setup`` calls) found."""
        if self.layout is None:
            raise NotReadYetError(
                "the data module has not read its classes yet. Fix: call find_classes() or setup() first."
            )
        return list(self.layout.classes)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def train_set(self) -> LabelledImages:
        return self._split("train")

    @property
    def val_set(self) -> LabelledImages:
        return self._split("val")

    @property
    def test_set(self) -> LabelledImages:
        return self._split("test")

    def _split(self, name: str) -> LabelledImages:
        if not self.splits:
            raise NotReadYetError(f"the data module has not made its {name} set yet. Fix: call setup('fit') first.")
        return self.splits[name]

    def split_fingerprint(self) -> str:
        """A short hash of which file is in which split (``folders.Splits``), making them if needed."""
        if not self.splits:
            self._make_splits()
        return self.fingerprint

    def setup(self, stage: str) -> None:
        if stage == "predict":
            self.predict_files = images_to_predict(self.predict_dir)
            return
        if not self.splits:
            self._make_splits()
        if stage == "test" and not self.test_set:
            raise CaltechError(
                f"{self.root} has no test/ folder with images. Fix: add one, with a sub-folder per class."
            )

    def _make_splits(self) -> None:
        self.find_classes()
        splits = folders.split(self.layout, self.split, self.seed, self.skip_bad_images)
        pre = self.preprocessing
        transforms = [train_transform(pre, self.crop_scale), eval_transform(pre), eval_transform(pre)]
        self.splits = {
            name: LabelledImages(part.files, part.labels, transform, pre.resize_size, self.skip_bad_images)
            for name, part, transform in zip(folders.SPLITS, splits, transforms)
        }
        self.fingerprint = splits.fingerprint
        self._train_keys = None
        log.info(
            "%d images in %d classes: %s train, %s val, %s test (split %s)",
            sum(len(part.files) for part in splits),
            len(self.layout.classes),
            *(len(part.files) for part in splits),
            splits.fingerprint,
        )

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps of the data: the split's fingerprint and keys of its training
        images (``folders.member_keys``), which :meth:`load_state_dict` checks against."""
        if not self.splits:
            return {}
        if self._train_keys is None:  # once: Lightning asks at every save, and the split stays
            self._train_keys = sorted(folders.member_keys(self.root, self.train_set.files))
        return {"split": self.fingerprint, "train_keys": self._train_keys}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Refuse a checkpoint whose training images are among those this run scores: a resumed
        fit must keep its split (its validation would score images it trained on), and
        ``validate`` or ``test`` must not score training images of the checkpoint."""
        trained_split, train_keys = state.get("split"), state.get("train_keys")
        if not self.splits or trained_split == self.fingerprint or not isinstance(train_keys, list):
            return
        fn = self.trainer.state.fn if self.trainer is not None else None
        if fn == TrainerFn.FITTING:
            raise CaltechError(
                f"the checkpoint was trained on split {trained_split} and this data makes split {self.fingerprint}: "
                "resumed, it would validate on images it trained on. Fix: resume with the data.source, data.seed, "
                "data.split and data.classes of its fit, or start a new fit without --ckpt_path."
            )
        name = "val" if fn == TrainerFn.VALIDATING else "test"
        scored = self.splits[name].files
        seen = folders.member_keys(self.root, scored) & set(map(str, train_keys))
        if seen:
            raise CaltechError(
                f"{len(seen)} of the {len(scored)} {name} images are training images of the checkpoint (split "
                f"{trained_split}, now {self.fingerprint}), so the score would not be a {name} score. Fix: pass the "
                f"data.seed, data.split and data.classes of its fit, or {name} on images it did not train on."
            )

    def teardown(self, stage: str) -> None:
        """Say which image files were left out because they could not be read (``skip_bad_images``)."""
        skipped = [path for part in self.splits.values() for path in part.skipped()]
        if skipped:
            log.warning(
                "Left out %d image files that could not be read (they count in no metric): %s. Fix: remove or "
                "replace them.",
                len(skipped),
                ", ".join(map(str, skipped[:10])),
            )

    # -- what the loaders give: images, or the cached output of what stays frozen

    def _cache(self) -> tuple[FeatureCache, Callable[[], Extraction]] | None:
        """With ``cache_features``, the cache the loaders give from and how to fill it: a frozen
        backbone's features; in a fit that keeps the backbone's first blocks frozen throughout
        (partial fine-tuning, ``BackboneUnfreeze``'s ``train_blocks``, which sets the model's
        ``frozen_blocks`` when the trainer sets up), their output. None: the loaders give images."""
        model = self.trainer.lightning_module if self.trainer is not None else None
        if not self.cache_features or model is None:
            return None
        if getattr(model, "freeze_backbone", False):
            return self.feature_cache, lambda: self._extraction(model)
        depth = getattr(model, "frozen_blocks", 0)
        if depth and self.trainer.state.fn == TrainerFn.FITTING:
            cache = self.trunk_caches.setdefault(
                depth, FeatureCache(self.cache_dir, self.preprocessing, self.crop_scale, self.cache_views)
            )
            return cache, lambda: self._extraction(model, depth)
        return None

    def _device(self) -> torch.device:
        """Where the trainer runs the model (the CPU before a trainer is attached)."""
        return self.trainer.strategy.root_device if self.trainer is not None else torch.device("cpu")

    def _tta(self, split: str) -> bool:
        """Whether the split is evaluated on several views: with ``tta_flip``, for val and test
        outside ``fit`` (fit's validation stays single-view, so it costs what it did)."""
        fitting = self.trainer is not None and self.trainer.state.fn == TrainerFn.FITTING
        return self.tta_flip and split != "train" and not fitting

    def _dataset(self, split: str) -> Dataset:
        """The split's images, or with ``cache_features`` the cached output of what stays frozen
        (``_cache``).

        Called from the ``*_dataloader`` hooks, which Lightning calls after it has moved the model
        to its device: the backbone pass runs there, in the trainer's precision, never on the
        CPU while a GPU waits. The first call computes every split the running stage needs
        (fit: train and val) in one pass, so the loader's workers start once.
        """
        images = self.splits[split]
        found = self._cache()
        if found is None:
            if self.cache_features and split == "train":
                log.info("Not caching features: the backbone trains (model.freeze_backbone is false)")
            return replace(images, transform=flip_views(self.preprocessing)) if self._tta(split) else images
        cache, extraction = found
        if cache.get(split, self._tta(split)) is None:
            writable_folder(self.cache_dir, "data.cache_dir")
            names = dict.fromkeys([*STAGE_SPLITS.get(self.trainer.state.fn, ()), split])
            wanted = {name: (self.splits[name], self._tta(name)) for name in names}
            cache.load(wanted, extraction())
        return cache.get(split, self._tta(split))

    def _extraction(self, model: pl.LightningModule, trunk_blocks: int = 0) -> Extraction:
        """The backbone pass (or with ``trunk_blocks`` the pass through the trunk of that many
        blocks) as the trainer runs the model (its device, memory format and precision), on the
        model's inference engine (``model.engine``). A trunk's output is kept in the precision the
        top blocks compute in."""
        batch_size = feature_batch_size(self.feature_batch_size, self._device())
        precision = str(self.trainer.precision)
        if not trunk_blocks:
            return Extraction(
                lambda images, fingerprint: model.backbone_runner(images, self.cache_dir, fingerprint),
                lambda images, fingerprint: model.planned_engine(images, self.cache_dir, fingerprint),
                model.backbone,
                precision,
                batch_size,
                self.num_workers,
                (model.num_features,),
            )
        trunk = model.trunk().trunk
        return Extraction(
            lambda images, fingerprint: model.trunk_runner(images, self.cache_dir, fingerprint),
            lambda images, fingerprint: model.planned_engine(images, self.cache_dir, fingerprint),
            trunk,
            precision,
            batch_size,
            self.num_workers,
            output_shape(trunk, self.preprocessing.crop_size),
            trunk_blocks,
            torch.bfloat16 if precision.startswith("bf16") else torch.float32,
        )

    def _loader(self, dataset: Dataset, shuffle: bool = False) -> DataLoader:
        """Images load in worker processes; cached features are in memory and need none."""
        cached = isinstance(dataset, CachedFeatures)
        workers = 0 if cached else loader_workers(self.num_workers, len(dataset), self.batch_size)
        return loader(
            dataset,
            self.batch_size,
            workers,
            self.seed,
            shuffle=shuffle,
            pin_memory=self._device().type == "cuda",
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
            images = UnlabelledImages(self.predict_files, flip_views(pre), pre.crop_size, pre.resize_size, views=2)
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
