"""The transfer-learning classifier: a torchvision or timm backbone and one Linear head."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from pytorch_lightning import LightningModule
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from caltech_cli.backbones import load_safely, resolve_backbone
from caltech_cli.errors import CaltechError
from caltech_cli.features import full_batch, warm_up


class TransferClassifier(LightningModule):
    """A pretrained (or random) torchvision or timm backbone with a Linear head over its features.

    The head maps the backbone's pooled features (512 for resnet18, 1280 for mobilenet_v2) to
    the classes; the backbone's own ImageNet classifier is removed, not stacked under the head.

    Args:
        backbone: Any torchvision classification model name (``torchvision.models.list_models()``),
            or ``timm/<model>.<tag>`` for a timm model (``timm/vit_small_patch14_dinov2.lvd142m``,
            ``timm/convnext_tiny.fb_in22k``; ``timm.list_pretrained()``).
        weights: A torchvision weights name (``IMAGENET1K_V1``, ``DEFAULT``); for a timm backbone
            ``pretrained`` (timm's weights of that name, from the Hugging Face cache or Hub); a
            path to a state-dict file (``.pth``, ``.safetensors``); or null for random weights
            (training from scratch).
        freeze_backbone: Train only the head; the backbone's parameters stay fixed and it stays
            in eval mode, so its BatchNorm statistics do not move either. With false the whole
            network trains (or, with the ``BackboneUnfreeze`` callback, the backbone joins later).
        num_classes: Number of classes; linked from the data module by the CLI.
        class_names: Class names in label order; linked from the data module by the CLI and
            saved in checkpoints, so ``test`` and ``predict`` need no training data to name them.
        image_size: Crop size in pixels instead of the weights' own (224 for ImageNet weights);
            a timm ViT's position embeddings are resampled to it.
        channels_last: Run the backbone in channels-last memory format. On a CPU it is more
            than twice as fast for MobileNetV2 (``benchmarks/``); on a GPU it lets convolutions
            use tensor cores, best with ``--trainer.precision bf16-mixed``.
    """

    def __init__(
        self,
        backbone: str = "mobilenet_v2",
        weights: str | None = "IMAGENET1K_V1",
        freeze_backbone: bool = True,
        num_classes: int | None = None,
        class_names: list[str] | None = None,
        image_size: int | None = None,
        channels_last: bool = True,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        resolved = resolve_backbone(backbone, weights, image_size)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.backbone = resolved.module.to(memory_format=self.memory_format)
        self.num_features = resolved.num_features
        self.preprocessing = resolved.preprocessing
        self.freeze_backbone = freeze_backbone
        # Whether unfrozen BatchNorm layers use batch statistics; the fine-tuning callback sets it.
        self.train_bn = True
        if freeze_backbone:
            self.backbone.requires_grad_(False)
            self.backbone.eval()
        self.class_names: list[str] | None = None
        self.head: nn.Linear | None = None
        if class_names is not None:
            if num_classes is not None and num_classes != len(class_names):
                raise CaltechError(f"model.num_classes {num_classes} differs from the {len(class_names)} class_names.")
            self.set_classes(class_names)
        elif num_classes is not None:
            self.set_classes([str(i) for i in range(num_classes)])

    def set_classes(self, class_names: list[str]) -> None:
        """Build the head and the metrics for these classes and record them in the hyperparameters."""
        self.class_names = list(class_names)
        num_classes = len(self.class_names)
        self.hparams["class_names"] = self.class_names
        self.hparams["num_classes"] = num_classes
        self.head = nn.Linear(self.num_features, num_classes)

        def accuracy(**kwargs: Any) -> MulticlassAccuracy:
            return MulticlassAccuracy(num_classes=num_classes, **kwargs)

        self.train_metrics = MetricCollection({"acc": accuracy(average="micro")}, prefix="train/")
        self.val_metrics = MetricCollection({"acc": accuracy(average="micro")}, prefix="val/")
        self.test_metrics = MetricCollection(
            {
                "acc": accuracy(average="micro"),
                "acc_top5": accuracy(average="micro", top_k=min(5, num_classes)),
                "acc_macro": accuracy(average="macro"),
            },
            prefix="test/",
        )

    def train(self, mode: bool = True) -> TransferClassifier:
        """Switch modes, but keep frozen parts of the backbone in eval mode (their BatchNorm
        statistics stay fixed and dropout stays off), and all its BatchNorm layers unless
        ``train_bn``."""
        super().train(mode)
        if mode:
            for module in self.backbone.modules():
                params = list(module.parameters())
                frozen = bool(params) and not any(p.requires_grad for p in params)
                if frozen or (isinstance(module, nn.modules.batchnorm._BatchNorm) and not self.train_bn):
                    module.eval()
        return self

    @property
    def backbone_trains(self) -> bool:
        return any(p.requires_grad for p in self.backbone.parameters())

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """The backbone's pooled features of an image batch (without gradients while frozen)."""
        images = images.contiguous(memory_format=self.memory_format)
        if not self.backbone_trains:
            with torch.no_grad():
                return self.backbone(images)
        return self.backbone(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Class scores for images (N, 3, H, W), or for cached backbone features (N, width)."""
        if self.head is None:
            raise CaltechError(
                "the model does not know its classes. Fix: give it the training data (data.source) "
                "or, to predict, a checkpoint (--ckpt_path)."
            )
        return self.head(images if images.ndim == 2 else self.features(images))

    def _step(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = batch
        logits = self(images)
        loss = F.cross_entropy(logits, labels)
        metrics: MetricCollection = getattr(self, f"{stage}_metrics")
        self.log(f"{stage}/loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(labels),
                 sync_dist=True)
        metrics.update(logits, labels)
        self.log_dict(metrics, on_step=False, on_epoch=True, prog_bar=stage != "test", batch_size=len(labels))
        return loss, logits

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")[0]

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        """Returns the logits, which the TestReport callback turns into the test report."""
        return {"logits": self._step(batch, "test")[1].detach()}

    def on_predict_epoch_start(self) -> None:
        """Set the device up for the batch shape while the loader workers decode the first
        batches (``features.warm_up``); every batch then has that shape (``full_batch``)."""
        # Lightning rebuilds the loader around a batch sampler, which holds the batch size.
        self._predict_batch_size = self.trainer.predict_dataloaders.batch_sampler.batch_size
        if self.head is not None:
            with self.trainer.precision_plugin.forward_context():
                warm_up(self.features, self.device, self._predict_batch_size, self.preprocessing.crop_size)

    def predict_step(self, batch: tuple[torch.Tensor, torch.Tensor, list[str]], batch_idx: int) -> dict[str, Any]:
        images, indices, errors = batch
        probs = self(full_batch(images, self._predict_batch_size))[: len(images)].softmax(dim=1)
        return {"index": indices, "probs": probs, "error": list(errors)}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """The tutorial's AdamW at 2e-4 for Python use; ``caltech`` replaces it with its --optimizer."""
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=2e-4)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.check_checkpoint_options(checkpoint.get("hyper_parameters", {}))

    def check_checkpoint_options(self, saved: dict[str, Any]) -> None:
        """Check that a checkpoint's saved options fit this model, and take its classes if the
        model has none. ``caltech`` calls it as soon as the data is known, before any image is read."""
        if saved.get("backbone", self.hparams["backbone"]) != self.hparams["backbone"]:
            raise CaltechError(
                f"the checkpoint holds a {saved['backbone']} model, not {self.hparams['backbone']}. "
                f"Fix: pass --model.backbone {saved['backbone']}, or the checkpoint of a {self.hparams['backbone']} run."
            )
        names = saved.get("class_names")
        if names is None:
            return
        if self.class_names is None:
            self.set_classes(names)
        elif list(names) != self.class_names:
            raise CaltechError(
                f"the checkpoint was trained on {len(names)} classes ({', '.join(names[:3])}, ...) but the data has "
                f"{len(self.class_names)} ({', '.join(self.class_names[:3])}, ...). "
                "Fix: use the same data (data.source, data.classes) as the run that wrote the checkpoint."
            )


# What Lightning adds to the saved hyper-parameters besides the model's options; never used here.
LIGHTNING_KEYS = {"_instantiator"}


def read_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint that ``caltech fit`` wrote, loaded without running code from it (``weights_only``).

    Anything else is refused in one line that says what it is: a plain state dict (which
    ``--model.weights`` takes), another program's checkpoint, or saved options this model does
    not have (a checkpoint asking for a ``_class_path`` to import, say).
    """
    checkpoint = load_safely(path, "checkpoint")
    fix = "Fix: pass a .ckpt written by `caltech fit` (<trainer.default_root_dir>/best.ckpt)"
    if isinstance(checkpoint, dict) and checkpoint and all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        raise CaltechError(
            f"{path} is not a checkpoint of a caltech model: it is a plain state dict (weights only, without "
            f"class names or model options). {fix}; to start training from these weights use --model.weights {path}."
        )
    saved = checkpoint.get("hyper_parameters") if isinstance(checkpoint, dict) else None
    if not isinstance(saved, dict) or not isinstance(checkpoint.get("state_dict"), dict) or not (
        isinstance(saved.get("backbone"), str) and isinstance(saved.get("class_names"), list)
    ):
        kind = type(checkpoint).__name__ if not isinstance(checkpoint, dict) else "dict without caltech's model options"
        raise CaltechError(f"{path} is not a checkpoint of a caltech model (it holds a {kind}). {fix}.")
    unknown = sorted(set(saved) - set(inspect.signature(TransferClassifier).parameters) - LIGHTNING_KEYS)
    if unknown:
        raise CaltechError(
            f"{path} saves model options that caltech's model does not have ({', '.join(map(str, unknown))}): "
            f"another program wrote it, or it was altered. {fix}."
        )
    return checkpoint
