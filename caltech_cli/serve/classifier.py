"""Images to class probabilities, as ``caltech predict`` computes them: the same decoding, the same
preprocessing, the same test-time augmentation, the same network (a checkpoint, or its ONNX export)."""

from __future__ import annotations

import io
import json
import math
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch
from torchvision.transforms import InterpolationMode

from caltech_cli.errors import CaltechError
from caltech_cli.images import load_rgb
from caltech_cli.transforms import Preprocessing, eval_transform, flip_views


@dataclass
class Classifier:
    """What the server runs. ``transform`` turns decoded bytes into the network's input of one
    image ((3, S, S), or (2, 3, S, S) with test-time augmentation); ``probabilities`` maps a stack
    of those to (N, classes)."""

    class_names: list[str]
    preprocessing: Preprocessing
    tta: bool
    probabilities: Callable[[torch.Tensor], torch.Tensor]
    transform: Callable
    info: dict[str, Any] = field(default_factory=dict)

    def prepare(self, data: bytes) -> torch.Tensor:
        """One image's input from its file's bytes (decoded in memory: nothing reaches the disk);
        raises what ``images.UNREADABLE`` names for a file that is not a readable image."""
        return self.transform(load_rgb(io.BytesIO(data), self.preprocessing.resize_size))


def from_checkpoint(path: Path, tta: bool, engine: str = "torch", cache_dir: Path | None = None) -> Classifier:
    """A checkpoint's network, run as ``caltech predict`` runs it (its memory format included), its
    backbone on ``engine`` (``model.engine``) with the graphs kept in ``cache_dir``: ``auto`` runs
    an engine only where its graph is kept there already, so that start-up costs no export (but
    for a kept graph found damaged, exported again as everywhere)."""
    from caltech_cli.checkpoints import read_checkpoint
    from caltech_cli.engines import AUTO_MIN_IMAGES, Options
    from caltech_cli.model import MODEL_OPTIONS, load_trained

    checkpoint = read_checkpoint(path, MODEL_OPTIONS)
    saved = checkpoint["hyper_parameters"]
    model, preprocessing = load_trained(path, saved.get("channels_last", True), checkpoint)
    model.backbone.requires_grad_(False)  # it only answers: an engine may run it
    model.engine = engine
    # auto's rule for a pass of a few images: an engine where its graph is kept, else PyTorch.
    images = 1 if engine == "auto" else AUTO_MIN_IMAGES
    runner = model.backbone_runner(images, cache_dir, options=Options("--engine", "cache_dir"))

    @torch.inference_mode()
    def probabilities(images: torch.Tensor) -> torch.Tensor:
        return model(images).softmax(dim=1)

    transform = flip_views(preprocessing) if tta else eval_transform(preprocessing)
    info = {
        "backbone": saved["backbone"],
        "weights": saved.get("weights"),
        "source": str(path),
        "format": "checkpoint",
        "engine": runner.name,
    }
    return Classifier(list(model.class_names), preprocessing, tta, probabilities, transform, info)


def from_onnx(path: Path, tta: bool) -> Classifier:
    """An exported ONNX file (``caltech export``): its class names and preprocessing are in its
    metadata; its input is images in [0, 1], normalised inside. With test-time augmentation the
    probabilities of an image and its mirror image are averaged, as ``predict`` averages them."""
    try:
        import onnxruntime
    except ImportError as error:
        raise CaltechError(
            "serving an ONNX file needs onnxruntime. Fix: pip install onnxruntime, or serve the checkpoint."
        ) from error
    fix = "Fix: pass a .onnx written by `caltech export`, or a checkpoint with --ckpt_path."
    try:
        options = onnxruntime.SessionOptions()
        options.log_severity_level = 3
        session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        meta = session.get_modelmeta().custom_metadata_map
        names = json.loads(meta["class_names"])
        preprocessing = Preprocessing(**json.loads(meta["preprocessing"]))
    except Exception as error:  # onnxruntime raises its own types for files that are not models
        raise CaltechError(
            f"{path} is not an ONNX file that `caltech export` wrote ({' '.join(str(error).split())[:200]}). {fix}"
        ) from error
    problem = metadata_problem(names, preprocessing, session)
    if problem is not None:
        raise CaltechError(f"{path}: its metadata {problem}: it was altered, or not written by `caltech export`. {fix}")
    # Pixels in [0, 1]: the exported network normalizes them itself.
    transform = flip_views(preprocessing, normalize=False) if tta else eval_transform(preprocessing, normalize=False)

    def probabilities(images: torch.Tensor) -> torch.Tensor:
        flat = images.flatten(0, 1) if images.ndim == 5 else images
        out = torch.from_numpy(session.run(["probabilities"], {"images": flat.numpy()})[0])
        return out.unflatten(0, images.shape[:2]).mean(dim=1) if images.ndim == 5 else out

    info = {
        "backbone": json.loads(meta.get("backbone", "null")),
        "source": str(path),
        "format": "onnx",
        "engine": f"onnxruntime {onnxruntime.__version__} fp32",
    }
    return Classifier(names, preprocessing, tta, probabilities, transform, info)


def metadata_problem(names: Any, preprocessing: Preprocessing, session: Any) -> str | None:
    """What in an ONNX file's metadata does not fit its network, or None: the class names must be
    two or more distinct names, one a network output; the preprocessing's sizes whole and fitting
    the network's input, its statistics three numbers each, its interpolation one torchvision knows."""
    outputs = session.get_outputs()[0].shape
    height, width = session.get_inputs()[0].shape[2:4]
    pre = preprocessing
    if not isinstance(names, list) or len(names) < 2 or not all(isinstance(n, str) for n in names):
        return "names no list of two or more classes"
    if len(set(names)) != len(names):
        return "names a class twice"
    if isinstance(outputs[-1], int) and outputs[-1] != len(names):
        return f"names {len(names)} classes for the network's {outputs[-1]} outputs"
    sizes = (pre.crop_size, pre.resize_size)
    if not all(isinstance(n, int) and not isinstance(n, bool) and 16 <= n <= 4096 for n in sizes):
        return f"gives crop and resize sizes {sizes}, not whole numbers from 16 to 4096"
    if pre.resize_size < pre.crop_size or any(isinstance(n, int) and n != pre.crop_size for n in (height, width)):
        return (
            f"gives a crop of {pre.crop_size} (after a resize to {pre.resize_size}) for an input of {height} x {width}"
        )
    statistics = (pre.mean, pre.std)
    if not all(isinstance(v, (list, tuple)) and len(v) == 3 for v in statistics):
        return "gives a mean or standard deviation that is not three numbers"
    if not all(isinstance(x, (int, float)) and math.isfinite(x) for v in statistics for x in v) or min(pre.std) <= 0:
        return "gives a mean or standard deviation that is not finite, or a deviation that is not above 0"
    if pre.interpolation not in {mode.value for mode in InterpolationMode}:
        return f"gives interpolation {pre.interpolation!r}, not one torchvision knows"
    return None


def describe(classifier: Classifier, top_k: int) -> dict[str, Any]:
    """What ``GET /info`` says: the classes, the network, its preprocessing and the versions."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        versions = {name: version(name) for name in ("caltech-cli", "torch", "torchvision", "fastapi", "uvicorn")}
    return {
        "classes": classifier.class_names,
        **classifier.info,
        "preprocessing": asdict(classifier.preprocessing),
        "tta_flip": classifier.tta,
        "top_k": top_k,
        "versions": versions,
    }
