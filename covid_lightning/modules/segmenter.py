"""LungSegmenter: lung masks with the lab's U-Net or an smp architecture, AMP-safe."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torchmetrics import MetricCollection
from torchmetrics.classification import BinaryAccuracy, BinaryF1Score, BinaryJaccardIndex, BinaryPrecision, BinaryRecall
from torchmetrics.segmentation import DiceScore

from covid_lightning.data.transforms import Intensity
from covid_lightning.models.segmentation import SegmentationNet
from covid_lightning.modules.base import XRayModule

LOSSES = ("bce", "bce_dice")


def _per_image_dice() -> DiceScore:
    """Mean over images of each image's lung Dice."""
    with warnings.catch_warnings():  # torchmetrics warns about a default we set explicitly
        warnings.filterwarnings("ignore", message=".*DiceScore metric currently defaults.*")
        return DiceScore(num_classes=1, average="micro", aggregation_level="samplewise")


class LungSegmenter(XRayModule):
    """Binary lung segmentation; sigmoid, loss and metrics run in float32 on logits (AMP-safe).

    Metrics are pooled over every pixel of the epoch, as the lab reported them, plus ``dice_per_image``.

    Args:
        arch: ``seed_unet`` (the lab's network) or an smp architecture name.
        encoder: smp encoder for smp architectures.
        encoder_weights: smp pretrained encoder weights (``imagenet``); None = from scratch.
        encoder_weights_file: local encoder state dict (offline machines).
        normalization: input normalisation (``auto``: imagenet for a pretrained encoder, else x/255).
        image_size: square input size (linked from ``data.image_size``; stored for inference).
        intensity: the input's intensity standardisation (linked from ``data.intensity``; stored for inference).
        loss: ``bce`` (the lab's) or ``bce_dice`` (BCE + smp DiceLoss).
        threshold: probability above which a pixel is lung.
        model_kwargs: extra architecture arguments (e.g. ``{batch_norm: true}`` for ``seed_unet``).
        optimizer: optimizer factory (default Adam, lr 1e-3, as the lab).
        lr_scheduler: optional LR scheduler factory.
        memory_format: ``channels_last`` (default), ``contiguous``, or ``auto`` (both timed at fit start).
        compile_model: ``torch.compile`` the network (worth it for long GPU runs).
    """

    _compat_keys = ("arch", "encoder", "model_kwargs")
    task = "segmentation"
    monitor = "val/dice"
    monitor_mode = "max"

    def __init__(
        self,
        arch: str = "seed_unet",
        encoder: str = "resnet34",
        encoder_weights: str | None = None,
        encoder_weights_file: str | None = None,
        normalization: Literal["auto", "unit", "imagenet", "keras"] = "auto",
        image_size: int = 128,
        intensity: Intensity = "none",
        loss: Literal["bce", "bce_dice"] = "bce",
        threshold: float = 0.5,
        model_kwargs: dict[str, Any] | None = None,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        scheduler_interval: Literal["epoch", "step"] = "epoch",
        memory_format: Literal["channels_last", "contiguous", "auto"] = "channels_last",
        compile_model: bool = False,
    ) -> None:
        super().__init__(optimizer, lr_scheduler, scheduler_interval, memory_format, compile_model)
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        if loss not in LOSSES:
            raise ValueError(f"Unknown loss {loss!r}; choose one of {', '.join(LOSSES)}.")
        self.net = SegmentationNet(
            arch=arch,
            encoder=encoder,
            encoder_weights=encoder_weights,
            encoder_weights_file=encoder_weights_file,
            normalization=normalization,
            model_kwargs=model_kwargs,
        )
        self._finish_net()
        self.hparams.update(normalization=self.net.normalization)
        self.dice_loss = smp.losses.DiceLoss(mode="binary", from_logits=True) if loss == "bce_dice" else None
        self.threshold = threshold
        # Targets are {0, 1} by construction (data.transforms.decode_binary_mask) and probabilities come from a
        # sigmoid, so torchmetrics' per-update input checks (a torch.unique over every pixel) are skipped:
        # the pixel metrics cost less than half as much per batch on a CPU.
        checks = {"threshold": threshold, "validate_args": False}
        self._init_metrics(
            MetricCollection(
                {
                    "iou": BinaryJaccardIndex(**checks),
                    "dice": BinaryF1Score(**checks),
                    "precision": BinaryPrecision(**checks),
                    "recall": BinaryRecall(**checks),
                    "accuracy": BinaryAccuracy(**checks),
                    "dice_per_image": _per_image_dice(),
                },
                compute_groups=False,
            )
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Lung logits (N, 1, H, W) for uint8 (0..255) or float ([0, 1]) images (N, 3, H, W)."""
        return self.net(self.to_input(images))

    def compute_loss(self, logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """The training loss, always in float32 (safe under autocast)."""
        logits, masks = logits.float(), masks.float()
        loss = F.binary_cross_entropy_with_logits(logits, masks)
        if self.dice_loss is not None:
            loss = loss + self.dice_loss(logits, masks)
        return loss

    def shared_step(self, batch: dict[str, Any], stage: str) -> dict[str, torch.Tensor]:
        images, masks = batch["image"], batch["mask"]
        logits = self(images).float()
        loss = self.compute_loss(logits, masks)
        self._check_finite(loss, stage)
        probs = logits.sigmoid()
        target = masks.to(torch.int64)
        metrics = self.stage_metrics(stage)
        for name, metric in metrics.items(keep_base=True):
            if name.endswith("dice_per_image"):
                metric.update((probs > self.threshold).long(), target)
            else:
                metric.update(probs, target)
        self._log_loss(stage, loss, batch_size=images.shape[0])
        return {"loss": loss, "probs": probs.detach(), "target": target}

    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        probs = self.probabilities(self(batch["image"])).cpu()
        return {"path": batch["path"], "probs": probs, "size": batch.get("size")}

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "threshold": float(self.threshold)}

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.float().sigmoid()

    @staticmethod
    def resize_probs(probs: torch.Tensor, size: Sequence[int]) -> np.ndarray:
        """(1, S, S) or (S, S) probabilities -> float32 (H, W) at ``size``, resized bilinearly."""
        p = probs.float().reshape(1, 1, *probs.shape[-2:])
        p = F.interpolate(p, size=(int(size[0]), int(size[1])), mode="bilinear", align_corners=False)
        return p[0, 0].cpu().numpy()

    def postprocess(self, probs: torch.Tensor, sizes: Sequence[tuple[int, int]] | None = None) -> list[np.ndarray]:
        """Boolean lung masks, one per image at its own (H, W): probabilities resized bilinearly, then
        thresholded at ``threshold`` (the one rule of predict, ``segment()``, the server and lung masking)."""
        if sizes is None:
            sizes = [tuple(probs.shape[-2:])] * len(probs)
        return [self.resize_probs(p, size) > self.threshold for p, size in zip(probs, sizes)]
