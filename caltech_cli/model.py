"""The transfer-learning classifier: a torchvision or timm backbone and one Linear head."""

from __future__ import annotations

import contextlib
import inspect
import math
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pytorch_lightning import LightningModule
from pytorch_lightning.trainer.states import TrainerFn
from torch import nn
from torchmetrics import MetricCollection

from caltech_cli.backbones import preprocessing_for, resolve_backbone
from caltech_cli.blocks import Cut, cut_backbone
from caltech_cli.checkpoints import check_state_fits, read_checkpoint
from caltech_cli.devices import CPU_BATCH, full_batch, warm_up
from caltech_cli.engines import CLI_OPTIONS, Engine, Options, Runner, backbone_runner, planned, weights_fingerprint
from caltech_cli.errors import CaltechError
from caltech_cli.features import CachedFeatures, TrunkOutput
from caltech_cli.metrics import LEFT_OUT, inverse_frequency, stage_metrics
from caltech_cli.transforms import Preprocessing


class TransferClassifier(LightningModule):
    """A pretrained (or random) torchvision or timm backbone with a Linear head over its features.

    The head maps the backbone's pooled features (512 for resnet18, 1280 for mobilenet_v2) to
    the classes; the backbone's own ImageNet classifier is removed, not stacked under the head.
    (The class runs past 250 lines for its ``Args``, the model options' ``--help``, and Lightning's
    hooks of each stage.)

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
        class_weights: Weight the training loss per class by its training images: ``inverse``
            frequency (each class counts as much as any other, however few its images),
            ``sqrt_inverse`` (halfway), or ``none``. Caltech-101 holds 800 airplanes and 31
            images of some classes; weighting lifts the mean per-class accuracy (``acc_macro``).
        label_smoothing: Label smoothing of the training loss (``torch.nn.functional.cross_entropy``).
        engine: What runs the backbone where it does not train (the feature cache's pass,
            ``validate``, ``test`` and ``predict`` on images) on a CPU: ``auto`` OpenVINO in
            bfloat16 where it is installed and the CPU computes bfloat16 itself, else ONNX
            Runtime (PyTorch for a pass of a few hundred images whose graph is not built yet);
            or ``torch``, ``onnxruntime``, ``openvino`` (in the trainer's precision). Each
            engine's features are checked against PyTorch's before a pass; on a GPU the
            backbone runs on PyTorch.
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
        class_weights: Literal["none", "inverse", "sqrt_inverse"] = "none",
        label_smoothing: float = 0.0,
        engine: Engine = "auto",
    ) -> None:
        super().__init__()
        # The engine is how this machine runs the backbone, not part of the trained model: not saved.
        self.save_hyperparameters(ignore=["engine"])
        resolved = resolve_backbone(backbone, weights, image_size)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.backbone = resolved.module.to(memory_format=self.memory_format)
        self.num_features = resolved.num_features
        self.preprocessing = resolved.preprocessing
        self.freeze_backbone = freeze_backbone
        self.class_weights = class_weights
        if not 0 <= label_smoothing < 1:
            raise CaltechError(f"model.label_smoothing {label_smoothing} is not in [0, 1). Fix: pass e.g. 0.1, or 0.")
        self.label_smoothing = label_smoothing
        self.engine = engine
        # What runs the backbone while it does not train (``backbone_runner``), and for which weights,
        # device and precision; dropped when a stage ends, so other weights never meet it.
        self._inference: tuple[tuple[str, str, bool], Runner] | None = None
        # Per-class weights of the training loss, from the training labels when fit starts.
        self.loss_weights: torch.Tensor | None = None
        # Whether unfrozen BatchNorm layers use batch statistics; the fine-tuning callback sets it.
        self.train_bn = True
        # Whether the backbone joins the training later in this fit; the fine-tuning callback sets
        # it. No engine runs such a backbone, even while it is frozen: a fine-tune whose frozen
        # epochs ran on OpenVINO in bfloat16 ended in a segmentation fault once the backbone had
        # trained beside loader workers (4 runs of 4; PyTorch, ONNX Runtime and no workers: none).
        self.joins_training = False
        # The backbone's first blocks that stay frozen throughout this fit (the trunk of partial
        # fine-tuning; the fine-tuning callback sets it): the data module may cache their output.
        self.frozen_blocks = 0
        self._cut: Cut | None = None  # the backbone cut after them (``trunk``); not a submodule
        # The training epoch's loss summed over its images so far, and their count (``training_step``).
        self._train_loss_sum: torch.Tensor | None = None
        self._train_images = 0
        # The images of the step just taken that count (an image left out because it cannot be read
        # counts in nothing).
        self._step_counted = 0
        self._scored = 0  # the images the current val or test epoch scores
        if freeze_backbone:
            self.backbone.requires_grad_(False)
            self.backbone.eval()
        self.class_names: list[str] | None = None
        self.head: nn.Linear | None = None
        if class_names is not None:
            if num_classes is not None and num_classes != len(class_names):
                raise CaltechError(
                    f"model.num_classes {num_classes} differs from the {len(class_names)} class_names. "
                    "Fix: leave model.num_classes out: it follows from the class names."
                )
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
        metrics = stage_metrics(num_classes)
        self.train_metrics, self.val_metrics, self.test_metrics = metrics["train"], metrics["val"], metrics["test"]

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
        """The backbone's pooled features of an image batch (without gradients while frozen).

        On a CPU a backbone in eval mode runs a large batch (``predict``'s 64 images, 128 with
        their mirror images) in chunks of ``CPU_BATCH``, several times as fast there; its
        BatchNorm layers use their running statistics, so the chunks give the same features. A
        backbone in training mode sees the batch whole, for its batch statistics.
        """
        runner = self._inference[1] if self._inference is not None else None
        if runner is not None and runner.name != "torch" and not self.backbone_trains and images.device.type == "cpu":
            return runner.extract(images)
        images = images.contiguous(memory_format=self.memory_format)
        chunked = images.device.type == "cpu" and not self.backbone.training and len(images) > CPU_BATCH
        with torch.no_grad() if not self.backbone_trains else contextlib.nullcontext():
            if chunked:
                return torch.cat([self.backbone(chunk) for chunk in images.split(CPU_BATCH)])
            return self.backbone(images)

    def trunk(self) -> Cut:
        """The backbone cut after its ``frozen_blocks`` first blocks: the trunk, whose output the
        data module caches, and the top, which trains on it (``blocks.cut_backbone``)."""
        if self._cut is None or self._cut.depth != self.frozen_blocks:
            self._cut = cut_backbone(self.backbone, self.frozen_blocks, f"model.backbone {self.hparams['backbone']}")
        return self._cut

    def trunk_runner(self, images: int, folder: Path | None, fingerprint: str) -> Runner:
        """What runs a pass of ``images`` images through the trunk: the engine of ``model.engine``
        with its graph kept in ``folder`` (as for the whole backbone), else PyTorch as the trainer runs
        the model. The trunk's weights have this ``fingerprint``."""
        trunk = self.trunk().trunk

        def on_torch(images: torch.Tensor) -> torch.Tensor:
            images = images.contiguous(memory_format=self.memory_format)
            precision = self._trainer.precision_plugin.forward_context() if self._trainer else contextlib.nullcontext()
            with torch.no_grad(), precision:
                return trunk(images)

        crop = self.preprocessing.crop_size
        bf16 = self._bf16()
        return backbone_runner(trunk, fingerprint, crop, self.engine, on_torch, images, folder, bf16, part="trunk")

    def _top(self, values: torch.Tensor) -> torch.Tensor:
        """The pooled features of the trunk's output (``TrunkOutput``): the top blocks' forward pass."""
        if values.dtype != torch.float32 and not torch.is_autocast_enabled(values.device.type):
            values = values.float()  # kept in bfloat16 for an autocast that is not on
        if values.ndim == 4:
            values = values.contiguous(memory_format=self.memory_format)
        with torch.no_grad() if not self.backbone_trains else contextlib.nullcontext():
            return self.trunk().top(values)

    def _on_torch(self, images: torch.Tensor) -> torch.Tensor:
        """The backbone's features on PyTorch, as the trainer runs the model (its precision)."""
        precision = self._trainer.precision_plugin.forward_context() if self._trainer else contextlib.nullcontext()
        with precision:
            return self.features(images)

    def _bf16(self) -> bool:
        return self._trainer is not None and str(self._trainer.precision).startswith("bf16")

    def planned_engine(self, images: int, folder: Path | None, fingerprint: str) -> str:
        """What :meth:`backbone_runner` would run a pass of ``images`` images on (``engines.label``),
        for the backbone's weights of this ``fingerprint``."""
        crop = self.preprocessing.crop_size
        return planned(self.engine, self.device, images, folder, fingerprint, crop, self._bf16())

    def backbone_runner(
        self, images: int, folder: Path | None, fingerprint: str | None = None, options: Options = CLI_OPTIONS
    ) -> Runner:
        """What runs a pass of ``images`` images through the backbone, which must not train: the
        engine of ``model.engine``, its graph kept in ``folder`` (``engines.backbone_runner``;
        ``options`` names the options its messages speak of). ``fingerprint``: the backbone's
        ``weights_fingerprint``, where the caller has it already."""
        fingerprint = fingerprint or weights_fingerprint(self.backbone)
        key = (fingerprint, str(self.device), self._bf16())
        if self._inference is not None and self._inference[0] == key:
            return self._inference[1]  # chosen once: an engine, or PyTorch (said once)
        self._inference = None  # PyTorch runs the backbone until an engine does
        runner = backbone_runner(
            self.backbone,
            fingerprint,
            self.preprocessing.crop_size,
            self.engine,
            self._on_torch,
            images,
            folder,
            self._bf16(),
            options,
        )
        self._inference = (key, runner)
        return runner

    def load_state_dict(self, *args: Any, **kwargs: Any) -> Any:
        """Other weights: an engine built for the ones before must not run them."""
        self._inference = None
        return super().load_state_dict(*args, **kwargs)

    def _engine_for(self, loaders: Any) -> None:
        """Run the backbone on its engine for the images these loaders give, where it does not
        train, nor will in this fit (cached features need no backbone)."""
        if self.backbone_trains or self.joins_training:
            self._inference = None
            return
        datasets = [
            getattr(loader, "dataset", None) for loader in (loaders if isinstance(loaders, list) else [loaders])
        ]
        images = sum(
            len(d) * getattr(d, "views", 1) for d in datasets if d is not None and not isinstance(d, CachedFeatures)
        )
        if images:
            datamodule = getattr(self._trainer, "datamodule", None)
            self.backbone_runner(images, getattr(datamodule, "cache_dir", None))

    def on_validation_start(self) -> None:
        if not self.trainer.sanity_checking:  # a few batches: not worth a graph
            self._engine_for(self.trainer.val_dataloaders)

    def on_test_start(self) -> None:
        self._engine_for(self.trainer.test_dataloaders)

    def on_predict_start(self) -> None:
        self._engine_for(self.trainer.predict_dataloaders)

    def _stage_ends(self) -> None:
        """A stage is over: the next one, perhaps with other weights or on another device, chooses again."""
        self._inference = None

    on_fit_end = on_test_end = on_predict_end = _stage_ends

    def on_validation_end(self) -> None:
        if self.trainer.state.fn == TrainerFn.VALIDATING:  # fit's validations keep fit's engine
            self._stage_ends()

    def forward(self, images: torch.Tensor | TrunkOutput) -> torch.Tensor:
        """Class scores for images (N, 3, H, W), for cached backbone features (N, width), or for
        the cached output of the backbone's frozen trunk (``TrunkOutput``, partial fine-tuning).

        With several views of each (test-time augmentation: (N, views, 3, H, W) or (N, views,
        width)), the log of the probabilities averaged over the views: their softmax is that
        average, and cross-entropy and accuracy take them as they take logits.
        """
        if self.head is None:
            raise CaltechError(
                "the model does not know its classes. Fix: give it the training data (data.source) "
                "or, to predict, a checkpoint (--ckpt_path)."
            )
        if isinstance(images, TrunkOutput):
            return self.head(self._top(images.values))
        if images.ndim in (3, 5):
            count, views = images.shape[:2]
            logits = self(images.flatten(0, 1)).unflatten(0, (count, views))
            return logits.float().log_softmax(dim=-1).logsumexp(dim=1) - math.log(views)
        return self.head(images if images.ndim == 2 else self.features(images))

    def on_fit_start(self) -> None:
        """Weigh the classes of the training loss by their training images (``class_weights``)."""
        if self.class_weights == "none":
            return
        train_set = getattr(getattr(self.trainer, "datamodule", None), "train_set", None)
        if train_set is None:
            raise CaltechError("model.class_weights needs the training labels. Fix: fit with a data module.")
        counts = torch.bincount(torch.as_tensor(list(train_set.labels)), minlength=len(self.class_names or []))
        self.loss_weights = inverse_frequency(counts, 1.0 if self.class_weights == "inverse" else 0.5).to(self.device)

    def _counted_in(self, labels: torch.Tensor) -> int:
        """How many of ``labels`` count in the loss and the metrics. Only a data module that leaves
        unreadable images out (``data.skip_bad_images``) has labels that do not (``LEFT_OUT``), and
        only then are they counted, which makes a step wait for the device."""
        datamodule = getattr(self._trainer, "datamodule", None)
        if datamodule is not None and getattr(datamodule, "skip_bad_images", None) is False:
            return len(labels)
        return int((labels != LEFT_OUT).sum())

    def loss(
        self, logits: torch.Tensor, labels: torch.Tensor, training: bool, counted: int | None = None
    ) -> torch.Tensor:
        """Cross-entropy; in training with the class weights and label smoothing, so that val and
        test losses stay comparable between runs. Images left out (``LEFT_OUT``) count in no mean,
        and a batch of nothing but those has a loss of 0 (PyTorch's mean would be 0/0)."""
        weight = self.loss_weights if training else None
        smoothing = self.label_smoothing if training else 0.0
        if counted is None or counted == len(labels):
            return F.cross_entropy(logits, labels, weight=weight, label_smoothing=smoothing)
        per_image = F.cross_entropy(logits, labels, weight=weight, label_smoothing=smoothing, reduction="none")
        counts = labels != LEFT_OUT
        if weight is not None:
            counts = weight[labels.clamp_min(0)] * counts
        return per_image.sum() / counts.sum().clamp_min(torch.finfo(per_image.dtype).tiny)

    def _step(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = batch
        counted = self._counted_in(labels)
        logits = self(images)
        loss = self.loss(logits, labels, training=stage == "train", counted=counted)
        metrics: MetricCollection = getattr(self, f"{stage}_metrics")
        metrics.update(logits, labels)
        self._step_counted = counted
        if stage != "train":
            self._scored += counted
            self.log(
                f"{stage}/loss",
                loss,
                on_step=False,
                on_epoch=True,
                prog_bar=True,
                batch_size=max(counted, 1),
                sync_dist=True,
            )
            self.log_dict(metrics, on_step=False, on_epoch=True, prog_bar=stage != "test", batch_size=max(counted, 1))
        return loss, logits

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """One step; the epoch's training loss and metrics are logged once, at its last batch.

        Lightning's ``self.log`` costs about as much as a step of the head over cached features,
        so logging every step only to average at the epoch's end took a large share of a transfer
        fit's head epochs. Logged after the last batch (``on_train_batch_end``), the epoch's figures
        reach the callbacks' ``on_train_epoch_end`` (``history.csv``, checkpoints) and the loggers
        as before.
        """
        loss = self._step(batch, "train")[0]
        images = self._step_counted
        weighted = loss.detach().float() * images  # summed in float32 whatever the trainer's precision
        self._train_loss_sum = weighted if self._train_loss_sum is None else self._train_loss_sum + weighted
        self._train_images += images
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """After the epoch's last batch, or the step that reaches ``trainer.max_steps``, log its figures."""
        max_steps = self.trainer.max_steps
        if self.trainer.is_last_batch or (max_steps != -1 and self.trainer.global_step >= max_steps):
            self._log_training_epoch()

    def _log_training_epoch(self) -> None:
        """Log the training loss (its mean over the epoch's images) and metrics of the epoch so far."""
        if not self._train_images:
            return
        self.log(
            "train/loss",
            self._train_loss_sum / self._train_images,
            on_step=False,
            on_epoch=True,
            prog_bar=True,
            batch_size=self._train_images,
            sync_dist=True,
        )
        self.log_dict(self.train_metrics, on_step=False, on_epoch=True, prog_bar=True)
        self._train_loss_sum, self._train_images = None, 0

    def on_train_start(self) -> None:
        """Start the sums afresh, also where a fit resumes within an epoch (no epoch starts
        then), after another fit of this model that an exception cut short."""
        self._start_sums()

    def on_train_epoch_start(self) -> None:
        """A frozen backbone that sees images runs on its engine; Lightning calls this after the
        callbacks' own, so a backbone ``BackboneUnfreeze`` unfreezes now is not put on one."""
        self._start_sums()
        self._engine_for(self.trainer.train_dataloader)

    def _start_sums(self) -> None:
        self._train_loss_sum, self._train_images = None, 0
        if self.class_names is not None:
            self.train_metrics.reset()

    def on_train_epoch_end(self) -> None:
        """An epoch that something stopped before its last batch (early stopping at a validation
        within the epoch, ``trainer.max_time``) logs what it trained too; ``EpochHistory`` writes
        its row after this."""
        self._log_training_epoch()

    def on_validation_epoch_start(self) -> None:
        self._scored = 0

    on_test_epoch_start = on_validation_epoch_start

    def _check_scored(self, stage: str) -> None:
        """Refuse metrics of no image: where every image of the set was left out as unreadable
        (``data.skip_bad_images``), they would print 0 (or nan) as if something had been scored."""
        if self.trainer.sanity_checking:
            return
        scored = self.trainer.strategy.reduce(torch.tensor(self._scored, device=self.device), reduce_op="sum")
        if int(scored) == 0:
            raise CaltechError(
                f"no {stage} image could be read, so there is nothing to score: every one was left out "
                "(data.skip_bad_images). Fix: replace them (without --data.skip_bad_images the error names one)."
            )

    def on_validation_epoch_end(self) -> None:
        self._check_scored("validation")

    def on_test_epoch_end(self) -> None:
        self._check_scored("test")

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
        # With test-time augmentation the backbone sees each batch's views together.
        views = getattr(self.trainer.predict_dataloaders.dataset, "views", 1)
        if self.head is not None:
            with self.trainer.precision_plugin.forward_context():
                warm_up(self.features, self.device, self._predict_batch_size * views, self.preprocessing.crop_size)

    def predict_step(self, batch: tuple[torch.Tensor, torch.Tensor, list[str]], batch_idx: int) -> dict[str, Any]:
        images, indices, errors = batch
        probs = self(full_batch(images, self._predict_batch_size))[: len(images)].softmax(dim=1)
        return {"index": indices, "probs": probs, "error": list(errors)}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """The tutorial's AdamW at 2e-4 for Python use; ``caltech`` replaces it with its --optimizer."""
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=2e-4)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep the precision the fit trains in: a resumed fit goes on in it (``cli._training_precision``)."""
        checkpoint[PRECISION_KEY] = str(self.trainer.precision)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint of other classes, or whose weights do not fit this network, in one
        line (before Lightning's ``load_state_dict`` would raise or cast)."""
        self.check_checkpoint_options(checkpoint.get("hyper_parameters", {}))
        check_state_fits(checkpoint.get("state_dict"), self, "the checkpoint (--ckpt_path)")

    def check_checkpoint_options(self, saved: dict[str, Any]) -> None:
        """Check that a checkpoint's saved options fit this model, and take its classes if the
        model has none. ``caltech`` calls it as soon as the data is known, before any image is read."""
        if saved.get("backbone", self.hparams["backbone"]) != self.hparams["backbone"]:
            raise CaltechError(
                f"the checkpoint holds a {saved['backbone']} model, not {self.hparams['backbone']}. Fix: pass "
                f"--model.backbone {saved['backbone']}, or the checkpoint of a {self.hparams['backbone']} run."
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


# Where a checkpoint keeps the precision its fit trained in, and the ones a resumed fit takes from it.
PRECISION_KEY = "trainer_precision"
TRAINING_PRECISIONS = ("32-true", "bf16-mixed", "16-mixed")
# The options a checkpoint may save: the model's own (``checkpoints.read_checkpoint`` refuses others).
MODEL_OPTIONS = frozenset(inspect.signature(TransferClassifier).parameters)


def load_trained(
    ckpt_path: Path, channels_last: bool = False, checkpoint: dict[str, Any] | None = None
) -> tuple[TransferClassifier, Preprocessing]:
    """The model of a checkpoint that ``caltech fit`` wrote, in eval mode on the CPU, and the
    preprocessing it was trained with (``export`` and ``serve`` run it outside Lightning).
    ``checkpoint``: the file as ``read_checkpoint`` gave it, where the caller has read it already.

    The backbone is built without its pretrained weights (the checkpoint holds all of them), so
    this needs no download.
    """
    checkpoint = checkpoint or read_checkpoint(ckpt_path, MODEL_OPTIONS)
    saved = checkpoint["hyper_parameters"]
    model = TransferClassifier(
        backbone=saved["backbone"],
        weights=None,
        freeze_backbone=False,
        class_names=saved["class_names"],
        image_size=saved.get("image_size"),
        channels_last=channels_last,
    )
    check_state_fits(checkpoint["state_dict"], model, f"the checkpoint {ckpt_path}")
    model.load_state_dict(checkpoint["state_dict"])
    model.eval()
    return model, preprocessing_for(saved["backbone"], saved.get("weights"), saved.get("image_size"))
