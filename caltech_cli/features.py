"""A frozen backbone's features, computed once per image and kept on disk.

With a frozen backbone nearly all of a transfer fit's cost is the backbone's forward pass, and
it gives the same answer in every epoch. The cache computes it once and the head trains on the
stored features, so a fit costs about one pass over the images however many epochs it runs,
and later fits, tests and validations with the same backbone cost almost nothing.

A cache file is keyed by everything that changes its numbers: the backbone's weights (hashed),
the preprocessing and transform, the number of augmented views, and the image files themselves
(path, size, modification time) with their labels. It is written to a temporary name and
renamed when complete, under a file lock, so a half-written cache is never read and processes
that start together compute it once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
from filelock import FileLock
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from caltech_cli.backbones import Preprocessing
from caltech_cli.images import LabelledImages

log = logging.getLogger(__name__)
FORMAT_VERSION = 1
Extractor = Callable[[torch.Tensor], torch.Tensor]


def weights_fingerprint(module: nn.Module) -> str:
    """sha256 over a module's class, parameter and buffer names, shapes, dtypes and bytes."""
    digest = hashlib.sha256(type(module).__qualname__.encode())
    for name, tensor in module.state_dict().items():
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
    return digest.hexdigest()


def files_fingerprint(dataset: LabelledImages) -> str:
    digest = hashlib.sha256()
    for path, label in zip(dataset.files, dataset.labels):
        stat = os.stat(path)
        digest.update(os.fsencode(path) + f"\0{stat.st_size}\0{stat.st_mtime_ns}\0{label}\n".encode())
    return digest.hexdigest()


class CachedFeatures(Dataset):
    """Stored features with their labels; with several augmented views, each access picks one
    at random, so every epoch sees a different view of each image, as with live augmentation."""

    def __init__(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        self.features = features  # (views, images, width)
        self.labels = labels

    def __len__(self) -> int:
        return self.labels.numel()

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        view = random.randrange(self.features.shape[0]) if self.features.shape[0] > 1 else 0
        return self.features[view, index], int(self.labels[index])


def compute_features(
    extract: Extractor, device: torch.device, dataset: Dataset, views: int, batch_size: int, num_workers: int, desc: str
) -> torch.Tensor:
    """Run ``extract`` over ``dataset`` ``views`` times; returns (views, len(dataset), width) on the CPU."""
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, pin_memory=device.type == "cuda")
    chunks: list[list[torch.Tensor]] = [[] for _ in range(views)]
    with torch.inference_mode(), tqdm(total=views * len(dataset), desc=desc, unit="img") as bar:
        for view in range(views):
            for images, _ in loader:
                chunks[view].append(extract(images.to(device, non_blocking=True)).float().cpu())
                bar.update(len(images))
    return torch.stack([torch.cat(view) for view in chunks])


def cached_features(
    extract: Extractor,
    backbone: nn.Module,
    dataset: LabelledImages,
    folder: Path,
    preprocessing: Preprocessing,
    transform_id: str,
    views: int,
    batch_size: int,
    num_workers: int,
    name: str,
) -> CachedFeatures:
    """Load the features of ``dataset`` from ``folder``, computing and storing them first if needed.

    ``extract`` maps an image batch to features (the model's own ``features``, so memory format
    and precision match training); ``backbone`` is what it runs, hashed for the key.
    """
    key = {
        "version": FORMAT_VERSION,
        "backbone": weights_fingerprint(backbone),
        "preprocessing": asdict(preprocessing),
        "transform": transform_id,
        "views": views,
        "files": files_fingerprint(dataset),
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    path = folder / f"{name}-{digest}.pt"
    folder.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        if path.is_file():
            stored = torch.load(path, map_location="cpu", weights_only=True)
            log.info("Reusing cached %s features (%d images) from %s", name, len(dataset), path)
            return CachedFeatures(stored["features"], stored["labels"])
        device = next(backbone.parameters()).device
        features = compute_features(extract, device, dataset, views, batch_size, num_workers, f"Features of {name} images")
        labels = torch.as_tensor(list(dataset.labels), dtype=torch.long)
        partial = path.with_name(path.name + ".part")
        torch.save({"features": features, "labels": labels, "key": json.dumps(key)}, partial)
        os.replace(partial, path)
        log.info("Cached %s features of %d images in %s", name, len(dataset), path)
    return CachedFeatures(features, labels)
