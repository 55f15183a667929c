"""loading: workers and pinned memory where they pay."""

from __future__ import annotations

import os

import pytorch_lightning as pl
import torch

from caltech_cli.data import Caltech101DataModule

from conftest import PRE64, small_data


def test_loader_workers_default_to_every_available_core(image_folder, tmp_path, monkeypatch):
    """One worker per core (not capped), but no more than there are batches, and none for a
    single batch, which loads sooner in the main process than a worker starts."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    data = Caltech101DataModule(
        str(image_folder), str(tmp_path / "data"), split=(25, 50, 25), batch_size=1, preprocessing=PRE64
    )
    assert data.num_workers == 16, "not capped below the machine's cores"
    data.setup("fit")
    assert len(data.val_set) > 16
    loader = data.val_dataloader()
    assert loader.num_workers == 16 and loader.persistent_workers
    data.batch_size = len(data.val_set)
    assert data.val_dataloader().num_workers == 0


def test_memory_is_pinned_only_for_a_cuda_trainer(image_folder, tmp_path, monkeypatch):
    """A CPU run on a machine that has a GPU gains nothing from pinned pages, and pays for them."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    data = small_data(image_folder, tmp_path, batch_size=32)
    data.trainer = pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False)
    data.setup("fit")
    assert not data.train_dataloader().pin_memory and not data.val_dataloader().pin_memory
