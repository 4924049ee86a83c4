"""Normalize + a segmentation network (SeedUNet or an smp architecture) -> lung logits."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from covid_lightning.models.preprocess import NORMALIZATIONS, Normalize
from covid_lightning.models.unet import build_segmentation_model


def resolve_seg_normalization(normalization: str, pretrained_encoder: bool) -> tuple[str, list[float], list[float]]:
    """``auto`` -> ``imagenet`` for a pretrained encoder, else ``unit`` (the lab's x/255)."""
    if normalization == "auto":
        normalization = "imagenet" if pretrained_encoder else "unit"
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"Unknown normalization {normalization!r}; choose one of auto, {', '.join(NORMALIZATIONS)}.")
    mean, std = NORMALIZATIONS[normalization]
    return normalization, list(mean), list(std)


class SegmentationNet(nn.Module):
    """uint8 or [0, 1] images (N, 3, H, W) -> lung logits (N, 1, H, W).

    Args:
        arch: ``seed_unet`` (the lab's U-Net) or an smp architecture (``Unet``, ``UnetPlusPlus``, ``FPN``, ...).
        encoder: smp encoder name for smp architectures (``resnet34``, ``tu-mobilenetv2_050``, ...).
        encoder_weights: smp's pretrained encoder weights (``imagenet``); fails fast offline.
        encoder_weights_file: local state dict of the encoder, for offline machines.
        normalization: ``auto`` (imagenet for a pretrained encoder, else ``unit``), ``unit``, ``imagenet``, ``keras``.
        model_kwargs: extra arguments of the architecture (e.g. ``batch_norm: true`` for SeedUNet).
    """

    def __init__(
        self,
        arch: str = "seed_unet",
        encoder: str = "resnet34",
        encoder_weights: str | None = None,
        encoder_weights_file: str | None = None,
        normalization: str = "auto",
        model_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        pretrained = encoder_weights is not None or encoder_weights_file is not None
        self.normalization, mean, std = resolve_seg_normalization(normalization, pretrained)
        self.normalize = Normalize(mean, std)
        self.model = build_segmentation_model(
            arch,
            encoder=encoder,
            encoder_weights=encoder_weights,
            encoder_weights_file=encoder_weights_file,
            **(model_kwargs or {}),
        )

    @property
    def mean(self) -> list[float]:
        return self.normalize.mean.flatten().tolist()

    @property
    def std(self) -> list[float]:
        return self.normalize.std.flatten().tolist()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(self.normalize(x))
