"""Batches from datasets: how many loader workers, how large a batch, and the loaders themselves."""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
from torch.utils.data import DataLoader, Dataset

from caltech_cli.devices import CPU_BATCH

# Images per batch of the backbone pass that fills the feature cache, when not given: on a CPU
# the backbone's own best (``devices.CPU_BATCH``); on a GPU the pass waits on decoding, and each
# worker decodes a whole batch before the device sees any of it: batches of 32 keep that wait
# short at the start and at the end of the pass.
FEATURE_BATCH_SIZE = {"cpu": CPU_BATCH, "cuda": 32}


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


def feature_batch_size(given: int | None, device: torch.device) -> int:
    """The backbone pass's batch: the one given, else the device's (``FEATURE_BATCH_SIZE``)."""
    return given or FEATURE_BATCH_SIZE.get(device.type, 32)


def loader(
    dataset: Dataset,
    batch_size: int,
    workers: int,
    seed: int,
    shuffle: bool = False,
    pin_memory: bool = False,
    collate_fn: Callable | None = None,
) -> DataLoader:
    """A loader that a resumed fit draws from as an unbroken one would.

    Training draws its shuffle and its workers' seeds from the global generator, whose state
    checkpoints keep, and starts fresh workers each epoch (persistent ones would carry their
    own generator state past a checkpoint). Evaluation draws from a generator of its own,
    seeded by ``seed``, leaving the global one alone, and keeps its workers. Pinned pages let
    the copy to a GPU overlap the next step (Lightning copies non-blocking).
    """
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=workers,
        persistent_workers=workers > 0 and not shuffle,
        generator=None if shuffle else torch.Generator().manual_seed(seed),
        pin_memory=pin_memory,
        collate_fn=collate_fn,
    )
