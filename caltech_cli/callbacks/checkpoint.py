"""The checkpoint callback: best and last checkpoints, the random generators' states in them, and a
checkpoint where a stopped fit was."""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.utilities import rank_zero_info

from caltech_cli.errors import CaltechError
from caltech_cli.files import no_link_below


def rng_states() -> dict[str, Any]:
    """The random generators' states (torch, CUDA, NumPy, Python) in types a ``weights_only``
    checkpoint load accepts."""
    numpy_state = np.random.get_state(legacy=False)
    numpy_state["state"]["key"] = numpy_state["state"]["key"].tolist()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": numpy_state,
        "python": random.getstate(),
    }


def set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    numpy_state = dict(states["numpy"], state=dict(states["numpy"]["state"]))
    numpy_state["state"]["key"] = np.asarray(numpy_state["state"]["key"], dtype=np.uint32)
    np.random.set_state(numpy_state)
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))


class BestAndLastCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` that says where the best and the last checkpoint are when fit ends.

    Each run keeps its checkpoints in its own folder; ``<trainer.default_root_dir>/best.ckpt``
    is a link to the best one of the latest run, so ``caltech test --ckpt_path
    runs/transfer/best.ckpt`` works without looking up a run id.

    Checkpoints also hold the random generators' states at the moment they are written (the end
    of an epoch), and ``fit --ckpt_path`` puts them back, so a resumed run draws the same
    shuffles, crops and dropout masks as a run that was never stopped, and ends with the same
    weights (with ``--trainer.deterministic true`` where kernels are not deterministic).

    Lightning 2.6 writes ``last.ckpt`` only in epochs that improve the best one (the pvnet
    project ran into it too: openclimatefix/pvnet#544), which would make it a copy of the best
    and a resume would repeat epochs; here it is written at the end of every epoch.

    A fit stopped by Ctrl-C, SIGTERM or an error saves where it stopped as ``last.ckpt``, the
    file that ``fit --ckpt_path`` resumes from. Lightning's own ``save_on_exception`` names it
    like a best checkpoint (``best-epoch01-...``, which could even replace the real best), and
    writes nothing when the signal comes after the epoch's best checkpoint but before its last.
    """

    _last_saved_at_step = -1

    def _save_last_checkpoint(self, trainer: pl.Trainer, monitor_candidates: dict[str, torch.Tensor]) -> None:
        super()._save_last_checkpoint(trainer, monitor_candidates)
        self._last_saved_at_step = trainer.global_step

    def _save_last_each_epoch(self, trainer: pl.Trainer) -> None:
        fitting = trainer.state.fn == "fit" and not trainer.sanity_checking and not trainer.fast_dev_run
        if self.save_last and fitting and self._last_saved_at_step != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if not self._should_save_on_train_epoch_end(trainer):
            self._save_last_each_epoch(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self._should_save_on_train_epoch_end(trainer):
            self._save_last_each_epoch(trainer)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "rng_states": rng_states()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        if "rng_states" in state_dict:
            set_rng_states(state_dict["rng_states"])

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        fitting = trainer.state.fn == "fit" and not trainer.sanity_checking and not trainer.fast_dev_run
        started = trainer.global_step > 0
        if not (self.save_on_exception and self.save_last and fitting and started):
            return
        if self._last_saved_at_step != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        reason = (
            "SIGTERM"
            if trainer.received_sigterm
            else "Ctrl-C"
            if isinstance(exception, KeyboardInterrupt)
            else (type(exception).__name__)
        )
        rank_zero_info(
            f"Stopped by {reason} in epoch {trainer.current_epoch} at step {trainer.global_step}: saved in "
            f"{self.last_model_path}; `caltech fit --ckpt_path {self.last_model_path}` resumes from it"
        )

    def best_link(self, trainer: pl.Trainer) -> Path:
        """``<trainer.default_root_dir>/best.ckpt``, refused while something this tool did not make
        is there: only a link to a checkpoint in this callback's folder (the one an earlier fit
        made) is replaced, never the user's own file or link."""
        link = Path(trainer.default_root_dir) / "best.ckpt"
        ours = False
        if link.is_symlink() and self.dirpath:
            target = link.parent / os.readlink(link)
            ours = target.suffix == ".ckpt" and target.resolve().parent == Path(self.dirpath).resolve()
        if (link.exists() or link.is_symlink()) and not ours:
            kind = "link to something else" if link.is_symlink() else "folder" if link.is_dir() else "file"
            raise CaltechError(
                f"{link} is in the way: fit links best.ckpt there, and this {kind} was not made by caltech, so it is "
                "left as it is. Fix: move or rename it, or pass another --trainer.default_root_dir."
            )
        return link

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Refuse before training, not after it, when best.ckpt could not be linked, or the
        checkpoints' folder in the run is a link to elsewhere."""
        super().on_fit_start(trainer, pl_module)
        if self.dirpath:
            no_link_below(Path(trainer.default_root_dir), Path(self.dirpath), "checkpoint.dirpath")
        self.best_link(trainer)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        if self.best_model_path:
            score = "" if self.best_model_score is None else f" ({self.monitor}={self.best_model_score:.4f})"
            rank_zero_info(f"Best checkpoint{score}: {self.best_model_path}")
            link = self.best_link(trainer)
            link.unlink(missing_ok=True)
            link.symlink_to(os.path.relpath(Path(self.best_model_path).resolve(), link.parent.resolve()))
            rank_zero_info(f"Linked {link} to it")
        if self.last_model_path:
            rank_zero_info(f"Last checkpoint: {self.last_model_path}")
