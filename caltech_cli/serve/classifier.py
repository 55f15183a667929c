"""Images to class probabilities, as ``caltech predict`` computes them: the same decoding, the same
preprocessing, the same test-time augmentation, the same network (a checkpoint, or its ONNX export)."""

from __future__ import annotations

import io
import json
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch
from torchvision.transforms import v2

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


def from_checkpoint(path: Path, tta: bool) -> Classifier:
    """A checkpoint's network, run as ``caltech predict`` runs it (its memory format included)."""
    from caltech_cli.checkpoints import read_checkpoint
    from caltech_cli.model import MODEL_OPTIONS, load_trained

    saved = read_checkpoint(path, MODEL_OPTIONS)["hyper_parameters"]
    model, preprocessing = load_trained(path, channels_last=saved.get("channels_last", True))

    @torch.inference_mode()
    def probabilities(images: torch.Tensor) -> torch.Tensor:
        return model(images).softmax(dim=1)

    transform = flip_views(preprocessing) if tta else eval_transform(preprocessing)
    info = {"backbone": saved["backbone"], "weights": saved.get("weights"), "source": str(path), "format": "checkpoint"}
    return Classifier(list(model.class_names), preprocessing, tta, probabilities, transform, info)


def from_onnx(path: Path, tta: bool) -> Classifier:
    """An exported ONNX file (``caltech export``): its class names and preprocessing are in its
    metadata; its input is images in [0, 1], normalised inside. With test-time augmentation the
    probabilities of an image and its mirror image are averaged, as ``predict`` averages them."""
    try:
        import onnxruntime
    except ImportError as error:
        raise CaltechError(
            "serving an ONNX file needs onnxruntime. Fix: pip install 'caltech-cli[export]', or serve the checkpoint."
        ) from error
    try:
        options = onnxruntime.SessionOptions()
        options.log_severity_level = 3
        session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        meta = session.get_modelmeta().custom_metadata_map
        names = json.loads(meta["class_names"])
        preprocessing = Preprocessing(**json.loads(meta["preprocessing"]))
    except Exception as error:  # onnxruntime raises its own types for files that are not models
        raise CaltechError(
            f"{path} is not an ONNX file that `caltech export` wrote ({' '.join(str(error).split())[:200]}). "
            "Fix: pass a .onnx written by `caltech export`, or a checkpoint with --ckpt_path."
        ) from error
    resize = v2.Compose(
        [
            v2.Resize(preprocessing.resize_size, interpolation=preprocessing.interpolation_mode),
            v2.CenterCrop(preprocessing.crop_size),
            v2.PILToTensor(),
            v2.ToDtype(torch.float32, scale=True),
        ]
    )
    mirror = v2.RandomHorizontalFlip(p=1.0)  # before the crop, as flipped_eval_transform does
    transform = (lambda image: torch.stack([resize(image), resize(mirror(image))])) if tta else resize

    def probabilities(images: torch.Tensor) -> torch.Tensor:
        flat = images.flatten(0, 1) if images.ndim == 5 else images
        out = torch.from_numpy(session.run(["probabilities"], {"images": flat.numpy()})[0])
        return out.unflatten(0, images.shape[:2]).mean(dim=1) if images.ndim == 5 else out

    info = {"backbone": json.loads(meta.get("backbone", "null")), "source": str(path), "format": "onnx"}
    return Classifier(names, preprocessing, tta, probabilities, transform, info)


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
