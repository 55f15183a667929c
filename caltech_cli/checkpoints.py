"""Files of tensors from strangers: checkpoints and weights, read without running code from them.

Every checkpoint and weights file goes through :func:`load_safely` (``torch.load`` with
``weights_only``) or safetensors; anything else is refused in one line that says what it is.
"""

from __future__ import annotations

import pickle
from collections.abc import Collection
from pathlib import Path
from typing import Any

import torch

from caltech_cli.errors import CaltechError

# What Lightning adds to the saved hyper-parameters besides the model's options; never used here.
LIGHTNING_KEYS = {"_instantiator"}


def _unpickling_detail(error: BaseException) -> str:
    """The line of an unpickling error that names what was refused, for a one-line message."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    detail = next((line for line in lines if "Unsupported" in line), lines[0] if lines else "")
    return f"{type(error).__name__}: {detail[:200]}"


def _not_torch_file(what: str, path: Path, error: BaseException) -> CaltechError:
    return CaltechError(
        f"cannot read {what} {path}: it is not a file torch.save wrote, or it is damaged "
        f"({_unpickling_detail(error)}). Fix: pass a file saved with torch.save."
    )


def load_safely(path: Path, what: str) -> Any:
    """``torch.load`` that never runs code from the file (``weights_only``), with one clear error."""
    if not path.is_file():
        raise CaltechError(f"{what} {path} does not exist. Fix: check the path.")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "GLOBAL" in str(error):  # the weights-only unpickler met a class or function to call
            raise CaltechError(
                f"refusing to load {what} {path}: unpickling it would run code or build objects that are not "
                f"tensors ({_unpickling_detail(error)}). Nothing from it was run. Fix: load only files "
                "from sources you trust, saved with torch.save of a state dict."
            ) from error
        raise _not_torch_file(what, path, error) from error
    except Exception as error:  # torch raises several types for unreadable files
        raise _not_torch_file(what, path, error) from error


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The weights in a ``.safetensors`` file or a ``torch.save`` file (a state dict, or a dict
    holding one under ``state_dict`` or ``model``, as training scripts save them)."""
    if path.suffix == ".safetensors" and path.is_file():
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(path, device="cpu")
        except (SafetensorError, OSError) as error:
            raise CaltechError(f"cannot read weights file {path}: {error}. Fix: pass a .safetensors file.") from error
    state = load_safely(path, "weights file")
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise CaltechError(
            f"weights file {path} holds a {type(state).__name__}, not a state dict. "
            "Fix: pass a file saved with torch.save(model.state_dict(), path)."
        )
    return state


def read_checkpoint(path: Path, model_options: Collection[str]) -> dict[str, Any]:
    """A checkpoint that ``caltech fit`` wrote, loaded without running code from it (``weights_only``).

    Anything else is refused in one line that says what it is: a plain state dict (which
    ``--model.weights`` takes), another program's checkpoint, or saved options that are not among
    ``model_options`` (a checkpoint asking for a ``_class_path`` to import, say).
    """
    checkpoint = load_safely(path, "checkpoint")
    fix = "Fix: pass a .ckpt written by `caltech fit` (<trainer.default_root_dir>/best.ckpt)"
    if isinstance(checkpoint, dict) and checkpoint and all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        raise CaltechError(
            f"{path} is not a checkpoint of a caltech model: it is a plain state dict (weights only, without "
            f"class names or model options). {fix}; to start training from these weights use --model.weights {path}."
        )
    saved = checkpoint.get("hyper_parameters") if isinstance(checkpoint, dict) else None
    if (
        not isinstance(saved, dict)
        or not isinstance(checkpoint.get("state_dict"), dict)
        or not (isinstance(saved.get("backbone"), str) and isinstance(saved.get("class_names"), list))
    ):
        kind = type(checkpoint).__name__ if not isinstance(checkpoint, dict) else "dict without caltech's model options"
        raise CaltechError(f"{path} is not a checkpoint of a caltech model (it holds a {kind}). {fix}.")
    unknown = sorted(set(saved) - set(model_options) - LIGHTNING_KEYS)
    if unknown:
        raise CaltechError(
            f"{path} saves model options that caltech's model does not have ({', '.join(map(str, unknown))}): "
            f"another program wrote it, or it was altered. {fix}."
        )
    return checkpoint
