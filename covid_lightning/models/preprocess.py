"""Input scaling inside the model, so the preprocessing contract travels with the weights."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

#: Named normalisations: (mean, std) applied to images scaled to [0, 1].
NORMALIZATIONS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "unit": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),  # x / 255, the Keras lab's scaling
    "keras": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),  # x / 127.5 - 1, Keras mobilenet_v2.preprocess_input
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """``uint8`` images (0..255) as floats in [0, 1]; floats as given: what the network takes."""
    return x.float().div_(255.0) if x.dtype == torch.uint8 else x


class Normalize(nn.Module):
    """``uint8`` images (0..255) or floats in [0, 1] -> ``(x / 255 - mean) / std`` by :data:`NORMALIZATIONS` name."""

    def __init__(self, name: str, imagenet: tuple[Sequence[float], Sequence[float]] | None = None) -> None:
        super().__init__()
        if name not in NORMALIZATIONS:
            raise ValueError(f"Unknown normalization {name!r}; choose one of auto, {', '.join(NORMALIZATIONS)}.")
        mean, std = imagenet if name == "imagenet" and imagenet else NORMALIZATIONS[name]
        self.name, self.mean_std = name, (list(mean), list(std))
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (to_unit(x) - self.mean) / self.std

    def extra_repr(self) -> str:
        return f"{self.name}, mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"
