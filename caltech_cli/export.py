"""``caltech export``: a trained checkpoint as one ONNX or TorchScript file for serving.

The exported model takes a batch of RGB images as float32 in [0, 1], shape (N, 3, S, S), already
resized and centre-cropped to S, and returns class probabilities (N, classes). Normalisation is
inside it. The class names and the preprocessing (resize, crop, mean, std, interpolation) are
stored inside the file (ONNX metadata, a TorchScript extra file ``caltech.json``) and in
``<file>.json`` beside it, so a server needs nothing else from this project.

Export writes the file it is told to and that side file, each whole (aside, then renamed), and
nothing else: not through a link, not over the checkpoint, and not over a ``.json`` that is not
an earlier export's.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from caltech_cli.engines import save_onnx
from caltech_cli.errors import CaltechError
from caltech_cli.files import check_target, read_json_record, writable_file, write_text, written_whole
from caltech_cli.model import TransferClassifier, load_trained
from caltech_cli.transforms import Preprocessing

FORMATS = {"onnx": ".onnx", "torchscript": ".pt"}
# What an export's side file holds; a file there without these keys is someone else's.
METADATA_KEYS = {"class_names", "preprocessing", "input", "output", "backbone", "checkpoint"}
METADATA_FILE = "caltech.json"  # the TorchScript extra file


class Probabilities(nn.Module):
    """Normalisation, backbone, head and softmax: images in [0, 1] to class probabilities."""

    def __init__(self, model: TransferClassifier, preprocessing: Preprocessing) -> None:
        super().__init__()
        self.backbone = model.backbone
        self.head = model.head
        self.register_buffer("mean", torch.tensor(preprocessing.mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(preprocessing.std).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone((images - self.mean) / self.std)).softmax(dim=1)


def metadata(model: TransferClassifier, preprocessing: Preprocessing, ckpt_path: Path) -> dict[str, Any]:
    size = preprocessing.crop_size
    return {
        "class_names": model.class_names,
        "preprocessing": asdict(preprocessing),
        "input": f"images: float32 RGB in [0, 1], shape (N, 3, {size}, {size}): resize the shorter side to "
        f"{preprocessing.resize_size} ({preprocessing.interpolation}), centre-crop {size}; normalisation "
        "is inside the model",
        "output": f"probabilities: float32, shape (N, {len(model.class_names or [])}), columns in class_names order",
        "backbone": model.hparams["backbone"],
        "checkpoint": str(ckpt_path),
    }


def _require(*modules: str) -> None:
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise CaltechError(
            f"ONNX export needs the Python packages {', '.join(missing)}. Fix: pip install onnx onnxscript onnxruntime."
        )


def _export_onnx(network: nn.Module, example: torch.Tensor, output: Path, info: dict[str, Any]) -> None:
    _require("onnx", "onnxscript")
    import onnx

    save_onnx(network, example, output, "probabilities")
    proto = onnx.load(str(output))
    for key, value in info.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, json.dumps(value)
    onnx.save(proto, str(output))


def _export_torchscript(network: nn.Module, example: torch.Tensor, output: Path, info: dict[str, Any]) -> None:
    with warnings.catch_warnings():  # TorchScript is deprecated in favour of torch.export, but asked for
        warnings.simplefilter("ignore", FutureWarning)
        # Python conditions on shapes (timm's ViTs have some) are traced for this image size, the
        # only one the file takes; a batch-size dependence would show in export's check.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(network, example)
        torch.jit.save(traced, str(output), _extra_files={METADATA_FILE: json.dumps(info)})


def run_exported(path: Path, images: torch.Tensor) -> torch.Tensor:
    """Probabilities from an exported file (onnxruntime for ONNX), to check it against PyTorch."""
    if path.suffix == ".onnx":
        _require("onnxruntime")
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return torch.from_numpy(session.run(["probabilities"], {"images": images.numpy()})[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.load(str(path))(images)


def metadata_path(output: Path) -> Path:
    """The side file of an exported ``output``: ``best.onnx`` -> ``best.onnx.json``."""
    return output.with_name(output.name + ".json")


def _check_outputs(ckpt_path: Path, output: Path, format: str) -> None:
    """Refuse an output that would write over something that is not an export's: the checkpoint,
    a file named for the other format, or a side file of someone else's."""
    if output.suffix != FORMATS[format]:
        raise CaltechError(
            f"output: {output} does not end in {FORMATS[format]}, the suffix of --format {format}. Fix: pass "
            f"--output ending in {FORMATS[format]}, or the --format that suffix names."
        )
    if output.exists() and ckpt_path.exists() and os.path.samefile(output, ckpt_path):
        raise CaltechError(f"output: {output} is the checkpoint itself. Fix: pass --output another file.")
    check_target(output, "output")
    side = metadata_path(output)
    check_target(side, "output")
    if side.exists() and not set(read_json_record(side) or {}) >= METADATA_KEYS:
        raise CaltechError(
            f"output: {side}, where export writes the metadata of {output.name}, is a file of someone else's. "
            "Fix: move it away, or pass --output another file."
        )


def export(ckpt_path: Path, format: str = "onnx", output: Path | None = None) -> tuple[Path, float | None]:
    """Write the exported model and its ``.json``; returns the path and the largest difference
    from PyTorch's probabilities on a few random images (None where onnxruntime is missing)."""
    if format not in FORMATS:
        raise CaltechError(f"unknown export format {format!r}. Fix: pass --format onnx or --format torchscript.")
    output = writable_file(output or ckpt_path.with_suffix(FORMATS[format]), "output")
    _check_outputs(ckpt_path, output, format)
    model, preprocessing = load_trained(ckpt_path)
    network = Probabilities(model, preprocessing).eval()
    size = preprocessing.crop_size
    generator = torch.Generator().manual_seed(0)
    example = torch.rand(2, 3, size, size, generator=generator)
    info = metadata(model, preprocessing, ckpt_path)
    with torch.no_grad(), written_whole(output, "output") as scratch:
        (_export_onnx if format == "onnx" else _export_torchscript)(network, example, scratch, info)
    with torch.no_grad():
        images = torch.rand(3, 3, size, size, generator=generator)
        expected = network(images)
    write_text(metadata_path(output), json.dumps(info, indent=2) + "\n", "output")
    if format == "onnx" and importlib.util.find_spec("onnxruntime") is None:
        return output, None
    return output, (run_exported(output, images) - expected).abs().max().item()


def main(args: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="caltech export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--ckpt_path", type=Path, required=True, help="a checkpoint written by `caltech fit`")
    parser.add_argument("--format", choices=sorted(FORMATS), default="onnx", help="onnx (default) or torchscript")
    parser.add_argument(
        "--output",
        type=Path,
        default=None,
        help="the file to write, ending in .onnx or .pt (default: the checkpoint's path with that suffix)",
    )
    options = parser.parse_args(args)
    path, difference = export(options.ckpt_path, options.format, options.output)
    check = (
        "not checked against PyTorch (onnxruntime is not installed)"
        if difference is None
        else f"largest difference from PyTorch's probabilities on 3 random images: {difference:.2e}"
    )
    print(f"Wrote {path} and {metadata_path(path)}\n{check}")
