"""Getting pretrained weights into a model without ever falling back to random weights silently."""

from __future__ import annotations

from pathlib import Path

import torch


class PretrainedWeightsError(RuntimeError):
    """Pretrained weights were asked for but cannot be had; the message says how to supply a file."""


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors`` or ``.pth``/``.pt``/``.bin`` (weights-only unpickling)."""
    path = Path(path)
    if not path.is_file():
        raise PretrainedWeightsError(f"Weights file {path} does not exist.")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise PretrainedWeightsError(f"{path} does not hold a state dict (found {type(obj).__name__}).")
    return obj
