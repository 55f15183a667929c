"""Files of tensors: checkpoints and weights from strangers, read without running code from them,
and the run's own checkpoints, written whole.

Every checkpoint and weights file goes through :func:`load_safely` (``torch.load`` with
``weights_only``) or safetensors; anything else is refused in one line that says what it is.
"""

from __future__ import annotations

import pickle
from collections.abc import Collection
from pathlib import Path
from typing import Any

import torch
from pytorch_lightning.plugins.io import TorchCheckpointIO

from caltech_cli.errors import CaltechError
from caltech_cli.files import kind_of, written_whole

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
    kind = kind_of(path, follow=True)
    if kind is not None:
        raise CaltechError(
            f"{what} {path} is a {kind}, not a file. Fix: pass the path of a file saved with torch.save."
        )
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


# Number types a weights file may hold: floats, and int64 for counters and index buffers (BatchNorm's
# num_batches_tracked). Anything else loaded into a float parameter is silently cast, so it is refused.
WEIGHT_DTYPES = {torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int64}


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The weights in a ``.safetensors`` file or a ``torch.save`` file (a state dict, or a dict
    holding one under ``state_dict`` or ``model``, as training scripts save them): names to
    tensors of float types (and int64 counters), refused in one line otherwise."""
    if path.suffix == ".safetensors" and path.is_file():
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = load_file(path, device="cpu")
        except (SafetensorError, OSError) as error:
            raise CaltechError(f"cannot read weights file {path}: {error}. Fix: pass a .safetensors file.") from error
    else:
        state = load_safely(path, "weights file")
        for key in ("state_dict", "model"):
            if isinstance(state, dict) and isinstance(state.get(key), dict):
                state = state[key]
    fix = "Fix: pass a file saved with torch.save(model.state_dict(), path)."
    if not isinstance(state, dict):
        raise CaltechError(f"weights file {path} holds a {type(state).__name__}, not a state dict. {fix}")
    odd = next(
        (key for key, value in state.items() if not (isinstance(key, str) and isinstance(value, torch.Tensor))), None
    )
    if odd is not None:
        raise CaltechError(
            f"weights file {path} is not a state dict: its entry {odd!r} is not a name with a tensor. {fix}"
        )
    odd = next((key for key, value in state.items() if value.dtype not in WEIGHT_DTYPES), None)
    if odd is not None:
        raise CaltechError(
            f"weights file {path} holds {odd} as {state[odd].dtype}, not as floating-point weights: loading would "
            f"cast it silently. {fix}"
        )
    return state


def check_weight_types(path: Path, state: dict[str, torch.Tensor], network: torch.nn.Module) -> None:
    """Refuse weights that a network holds as floats but the file does not (an int64 kernel)."""
    expected = network.state_dict()
    for key, value in state.items():
        if key in expected and expected[key].is_floating_point() and not value.is_floating_point():
            raise CaltechError(
                f"weights file {path} holds {key} as {value.dtype}, where the network has floats: loading would "
                "cast it silently. Fix: pass the network's own weights, saved with torch.save(model.state_dict())."
            )


def check_state_fits(state: Any, network: torch.nn.Module, where: str) -> None:
    """Refuse a checkpoint's state dict that does not fit ``network`` key for key, shape for shape
    and float for float, in one line; loading would end in a traceback, or cast an int64 kernel
    to floats silently."""
    fix = "Fix: pass a checkpoint that `caltech fit` wrote, unchanged."
    expected = network.state_dict()
    if not isinstance(state, dict):
        raise CaltechError(f"{where} holds no state dict of a network. {fix}")
    missing = [key for key in expected if key not in state]
    extra = [key for key in state if key not in expected]
    if missing or extra:
        named = f"lacks {missing[0]}" if missing else f"holds {extra[0]}, which its network has not"
        count = len(missing) + len(extra)
        raise CaltechError(f"{where} {named} ({count} key{'s' if count > 1 else ''} differ). {fix}")
    for key, mine in expected.items():
        theirs = state[key]
        if not isinstance(theirs, torch.Tensor) or theirs.shape != mine.shape:
            shape = tuple(theirs.shape) if isinstance(theirs, torch.Tensor) else type(theirs).__name__
            raise CaltechError(f"{where} holds {key} as {shape}, where its network has {tuple(mine.shape)}. {fix}")
        if theirs.is_floating_point() != mine.is_floating_point():
            raise CaltechError(f"{where} holds {key} as {theirs.dtype}, where its network has {mine.dtype}. {fix}")


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
    names = saved["class_names"]
    if len(names) < 2 or not all(isinstance(name, str) for name in names) or len(set(names)) != len(names):
        raise CaltechError(
            f"{path} names {len(names)} classes, not two or more distinct names: it was altered or damaged. {fix}."
        )
    unknown = sorted(set(saved) - set(model_options) - LIGHTNING_KEYS)
    if unknown:
        raise CaltechError(
            f"{path} saves model options that caltech's model does not have ({', '.join(map(str, unknown))}): "
            f"another program wrote it, or it was altered. {fix}."
        )
    return checkpoint


class WholeCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, writing each checkpoint aside and renaming it when whole: a
    disk that fills during the write leaves no truncated ``best-*.ckpt`` or ``last.ckpt`` for a
    later run to trust, and ends in one line."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:  # Lightning's own says what it does not support
            super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with written_whole(path, "trainer.default_root_dir") as scratch:
            torch.save(checkpoint, scratch)
