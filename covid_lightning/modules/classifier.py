"""XRayClassifier: the lab's transfer-learning classifier as a LightningModule."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch.nn.modules.batchnorm import _BatchNorm
from torchmetrics import CatMetric, MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassCalibrationError,
    MulticlassConfusionMatrix,
    MulticlassF1Score,
    MulticlassPrecision,
    MulticlassRecall,
)
from torchmetrics.wrappers import ClasswiseWrapper
from torchvision.transforms import v2

from covid_lightning.constants import CLASSES
from covid_lightning.data.transforms import Intensity
from covid_lightning.errors import UserError
from covid_lightning.models.classifier import REGIMES, XRayNet
from covid_lightning.models.preprocess import to_unit
from covid_lightning.modules.base import XRayModule
from covid_lightning.modules.metrics import PairAccuracy, fit_temperature

log = logging.getLogger(__name__)


class ClassMismatchError(UserError, ValueError):
    """A model and its data (or its checkpoint) disagree about the classes; the message names both."""


def metric_key(name: str) -> str:
    """Class name -> metric-key-safe name (``Viral Pneumonia`` -> ``Viral_Pneumonia``)."""
    return name.replace(" ", "_")


class XRayClassifier(XRayModule):
    """ImageNet-pretrained timm backbone + the lab's dense head, with the lab's freezing regimes.

    Args:
        backbone: timm model name (default ``mobilenetv2_050``, Keras MobileNetV2 alpha=0.5).
        num_classes: number of classes; None: as many as ``class_names`` (the CLI links both from the data).
        class_names: class names in label order (stored in the checkpoint; default the Kaggle four).
        pretrained: ImageNet weights through timm (HF hub + cache); fails fast offline.
        pretrained_file: local backbone weights (``.safetensors``, ``.pth`` or the Keras ``.h5``).
        flavor: ``keras`` = Keras-equivalent backbone for Keras weights; ``auto``: ``keras`` for ``.h5`` files.
        normalization: ``auto`` follows the weights; ``unit`` is the lab's /255 on purpose.
        image_size: square input size (linked from ``data.image_size`` by the CLI; stored for inference).
        intensity: the input's intensity standardisation (linked from ``data.intensity``; stored for inference).
        hidden_sizes: widths of the head's hidden Dense layers.
        dropout: dropout after each hidden Dense layer.
        trainable: ``head``, ``last_conv``, ``last_2_conv``, ``last_4_blocks`` or ``all`` (frozen BN stays in eval).
        class_weights: per-class loss weights; the CLI links them from ``data.class_weights``.
        class_prior: train class frequencies; when given the training loss is logit-adjusted (``CE(logits + log
            prior)``, Menon et al. 2021) and predictions use the raw logits. Linked from ``data.class_prior``.
        label_smoothing: cross-entropy label smoothing.
        mixup_alpha: MixUp of the training inputs (Zhang et al. 2018; torchvision's ``v2.MixUp``, Beta(alpha, alpha)),
            of the cached frozen-prefix activations under FrozenFeatureCache (manifold MixUp); 0: off.
        calibrate: fit a softmax temperature on the validation NLL each epoch (Guo et al., 2017); argmax unchanged.
        backbone_lr_factor: the trainable backbone layers get ``lr * backbone_lr_factor``.
        optimizer: optimizer factory (default Adam, lr 1e-3, as the lab).
        lr_scheduler: optional LR scheduler factory; ``scheduler_interval`` is ``epoch`` or ``step``.
        memory_format: ``channels_last`` (default), ``contiguous``, or ``auto`` (both timed at fit start).
        compile_model: ``torch.compile`` the network (worth it for long GPU runs).
    """

    _compat_keys = ("backbone", "num_classes", "hidden_sizes", "flavor")
    task = "classification"
    monitor = "val/acc"
    monitor_mode = "max"

    def __init__(
        self,
        backbone: str = "mobilenetv2_050",
        num_classes: int | None = None,
        class_names: Sequence[str] | None = None,
        pretrained: bool = True,
        pretrained_file: str | None = None,
        flavor: Literal["auto", "timm", "keras"] = "auto",
        normalization: Literal["auto", "unit", "imagenet", "keras"] = "auto",
        image_size: int = 224,
        intensity: Intensity = "none",
        hidden_sizes: Sequence[int] = (1024, 512),
        dropout: float = 0.0,
        trainable: str = "head",
        class_weights: Sequence[float] | None = None,
        class_prior: Sequence[float] | None = None,
        label_smoothing: float = 0.0,
        mixup_alpha: float = 0.0,
        calibrate: bool = True,
        backbone_lr_factor: float = 1.0,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        scheduler_interval: Literal["epoch", "step"] = "epoch",
        memory_format: Literal["channels_last", "contiguous", "auto"] = "channels_last",
        compile_model: bool = False,
    ) -> None:
        super().__init__(optimizer, lr_scheduler, scheduler_interval, memory_format, compile_model)
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        if trainable not in REGIMES:
            raise ValueError(f"Unknown trainable regime {trainable!r}; choose one of {', '.join(REGIMES)}.")
        if num_classes is None:
            num_classes = len(class_names) if class_names is not None else len(CLASSES)
        if class_names is None:
            defaults = CLASSES if num_classes <= len(CLASSES) else range(num_classes)
            class_names = [str(n) for n in defaults][:num_classes]
        class_names = list(class_names)
        if len(class_names) != num_classes:
            raise ValueError(f"class_names has {len(class_names)} names but num_classes is {num_classes}.")
        self.class_names = class_names
        self.net = XRayNet(
            backbone=backbone,
            num_classes=num_classes,
            hidden_sizes=hidden_sizes,
            dropout=dropout,
            pretrained=pretrained,
            pretrained_file=pretrained_file,
            flavor=flavor,
            normalization=normalization,
            trainable=trainable,
        )
        # Store what "auto" resolved to, so the checkpoint rebuilds exactly this network and preprocessing.
        self._finish_net()
        net = self.net
        self.hparams.update(
            flavor=net.flavor, normalization=net.normalization, num_classes=num_classes, class_names=class_names
        )
        if class_weights is not None and len(class_weights) != num_classes:
            raise ValueError(f"class_weights has {len(class_weights)} values, expected {num_classes}.")
        weight = None if class_weights is None else torch.as_tensor(list(class_weights), dtype=torch.float32)
        self.register_buffer("class_weight", weight, persistent=False)
        if class_prior is not None and len(class_prior) != num_classes:
            raise ValueError(f"class_prior has {len(class_prior)} values, expected {num_classes}.")
        offset = None if class_prior is None else torch.as_tensor(list(class_prior), dtype=torch.float32).log()
        self.register_buffer("prior_offset", offset, persistent=False)
        self.label_smoothing = label_smoothing
        if mixup_alpha < 0:
            raise ValueError(f"mixup_alpha must be >= 0 (0: off), not {mixup_alpha}.")
        self.mixup = v2.MixUp(alpha=mixup_alpha, num_classes=num_classes) if mixup_alpha > 0 else None
        self.register_buffer("temperature", torch.ones(()), persistent=False)  # in the checkpoint's own key
        self.val_logits, self.val_labels = CatMetric(), CatMetric()  # synchronised across ranks

        keys = [metric_key(n) for n in class_names]
        pair = {}
        if "COVID" in class_names and "Normal" in class_names:  # the like-for-like comparison
            pair["acc_covid_vs_normal"] = PairAccuracy(class_names.index("COVID"), class_names.index("Normal"))
        self._init_metrics(
            MetricCollection(
                {
                    **pair,
                    "acc": MulticlassAccuracy(num_classes, average="micro"),
                    "balanced_acc": MulticlassAccuracy(num_classes, average="macro"),  # mean recall
                    "f1_macro": MulticlassF1Score(num_classes, average="macro"),
                    "precision": ClasswiseWrapper(
                        MulticlassPrecision(num_classes, average=None), labels=keys, prefix="precision_"
                    ),
                    "recall": ClasswiseWrapper(
                        MulticlassRecall(num_classes, average=None), labels=keys, prefix="recall_"
                    ),
                    "f1": ClasswiseWrapper(MulticlassF1Score(num_classes, average=None), labels=keys, prefix="f1_"),
                    "ece": MulticlassCalibrationError(num_classes, n_bins=15),
                },
                compute_groups=False,  # shared-state groups make torchmetrics warn "compute before update"
            )
        )
        self.val_confmat = MulticlassConfusionMatrix(num_classes)
        self.test_confmat = MulticlassConfusionMatrix(num_classes)
        #: the last computed confusion matrix per stage (rows: true class, columns: predicted class)
        self.confusion_matrices: dict[str, torch.Tensor] = {}

    def param_groups(self) -> list[dict[str, Any]]:
        """Head and trainable backbone parameters; the backbone group is scaled by ``backbone_lr_factor``."""
        head = [p for p in self.net.head.parameters() if p.requires_grad]
        backbone = [p for p in self.net.backbone.parameters() if p.requires_grad]
        groups = [{"params": head, "name": "head"}]
        if backbone:
            groups.append({"params": backbone, "name": "backbone", "lr_factor": self.hparams.backbone_lr_factor})
        return groups

    def setup(self, stage: str) -> None:
        super().setup(stage)
        dm = self.trainer.datamodule if self._trainer is not None else None
        data_names = getattr(dm, "class_names", None) if stage != "predict" else None
        if data_names is not None and [str(n) for n in data_names] != [str(n) for n in self.class_names]:
            raise ClassMismatchError(
                f"The data's classes ({', '.join(map(str, data_names))}) are not this model's "
                f"({', '.join(map(str, self.class_names))}): build the model with class_names from the data "
                "(the CLI links data.class_names to the model), or use the data it was trained on."
            )

    def on_fit_start(self) -> None:
        super().on_fit_start()
        frozen_bn = sum(1 for m in self.net.modules() if isinstance(m, _BatchNorm) and not m.training)
        if frozen_bn:
            log.info("%d frozen BatchNorm layers run in inference mode for the whole run (as in Keras).", frozen_bn)
            # Lightning warns about modules in eval mode at the start of training: here that is the design.
            warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training.*")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits (N, num_classes) for uint8 (0..255) or float ([0, 1]) images (N, 3, H, W)."""
        return self.net(self.to_input(images))

    def shared_step(self, batch: dict[str, Any], stage: str) -> dict[str, torch.Tensor]:
        labels = target = batch["label"]
        if "features" in batch:  # cached activations of the frozen prefix (FrozenFeatureCache)
            inputs, network = batch["features"].float(), self.net.forward_suffix
        else:
            inputs, network = batch["image"], self.net
        if stage == "train" and self.mixup is not None:
            inputs, target = self.mixup(to_unit(inputs), labels)  # soft targets: each image's share of both labels
            labels = target.argmax(dim=1)  # the training metrics score the larger share
        logits = network(self.to_input(inputs)).float()
        weight = self.class_weight if stage == "train" else None
        smoothing = self.label_smoothing if stage == "train" else 0.0
        adjusted = logits + self.prior_offset if stage == "train" and self.prior_offset is not None else logits
        loss = F.cross_entropy(adjusted, target, weight=weight, label_smoothing=smoothing)
        self._check_finite(loss, stage)
        probs = self.probabilities(logits)
        self.stage_metrics(stage).update(probs, labels)
        if stage == "val" and self._fitting_temperature():
            self.val_logits.update(logits.detach())
            self.val_labels.update(labels)
        if stage != "train":
            getattr(self, f"{stage}_confmat").update(probs, labels)
        self._log_loss(stage, loss, batch_size=labels.shape[0])
        return {"loss": loss, "probs": probs.detach(), "target": labels}

    def _store_confusion_matrix(self, stage: str) -> None:
        confmat = getattr(self, f"{stage}_confmat")
        self.confusion_matrices[stage] = confmat.compute().cpu()
        confmat.reset()

    def _fitting_temperature(self) -> bool:
        """Calibrate on a fit's validation epochs (not its sanity check, not ``validate``/``test`` of a checkpoint)."""
        trainer = self._trainer
        fitting = trainer is not None and trainer.state.fn == "fit" and not trainer.sanity_checking
        return bool(self.hparams.calibrate) and fitting

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        self._store_confusion_matrix("val")
        if self._fitting_temperature() and self.val_labels.update_count:
            with warnings.catch_warnings():  # CatMetric warns about its own synchronisation on one process
                warnings.simplefilter("ignore")
                logits, labels = self.val_logits.compute(), self.val_labels.compute().long()
            self.temperature.fill_(fit_temperature(logits, labels))
            self.log("val/temperature", self.temperature.item(), sync_dist=False)
        self.val_logits.reset()
        self.val_labels.reset()

    def test_sources(self) -> list[str]:
        """The test loaders' sources (the datamodule's ``test_sources``): ``in-distribution``, external set names."""
        dm = self.trainer.datamodule if self._trainer is not None else None
        return list(getattr(dm, "test_sources", None) or ["in-distribution"])

    def test_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        """The test split as ever; an external set only logs ``external/<source>/acc`` and returns its predictions,
        named by ``source`` (what the evaluation report files them under)."""
        sources = self.test_sources()
        source = sources[dataloader_idx] if dataloader_idx < len(sources) else "in-distribution"
        if source == "in-distribution":
            return self.shared_step(batch, "test")
        probs, labels = self.probabilities(self(batch["image"])), batch["label"]
        accuracy = (probs.argmax(1) == labels).float().mean()
        self.log(f"external/{source}/acc", accuracy, on_epoch=True, batch_size=len(labels), sync_dist=True,
                 add_dataloader_idx=False)  # fmt: skip
        return {"probs": probs.detach(), "target": labels, "source": source}

    def on_test_epoch_end(self) -> None:
        if "in-distribution" in self.test_sources():  # only external sets: no test split to score
            super().on_test_epoch_end()
            self._store_confusion_matrix("test")

    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        return {"path": batch["path"], "probs": self.probabilities(self(batch["image"])).cpu()}

    def describe(self) -> dict[str, Any]:
        info = {**super().describe(), "class_names": [str(n) for n in self.class_names]}
        return info | {"temperature": round(float(self.temperature), 6)}

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Calibrated class probabilities: ``softmax(logits / temperature)`` (temperature 1 until fitted)."""
        return (logits.float() / self.temperature).softmax(dim=-1)

    def postprocess(
        self, probs: torch.Tensor, sizes: Sequence[tuple[int, int]] | None = None
    ) -> list[dict[str, float]]:
        """Class probabilities keyed by class name, one dict per image (sizes do not matter here)."""
        return [dict(zip(self.class_names, p.tolist())) for p in probs.float().cpu()]

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["temperature"] = float(self.temperature)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse, naming both sides, weights of other classes (the CLI builds the head from the data's classes)."""
        super().on_load_checkpoint(checkpoint)
        self.temperature.fill_(float(checkpoint.get("temperature", 1.0)))  # 1: written before calibration
        stored = (checkpoint.get("hyper_parameters") or {}).get("class_names")
        if stored is not None and [str(n) for n in stored] != [str(n) for n in self.class_names]:
            raise ClassMismatchError(
                f"The checkpoint was trained with num_classes {len(stored)} ({', '.join(map(str, stored))}), but this "
                f"model has num_classes {len(self.class_names)} ({', '.join(map(str, self.class_names))}), taken "
                "from its data. Use the data it was trained on: the same data.manifest (or the Kaggle layout for "
                "its four classes)."
            )
