"""Torch Datasets returning sample dicts: ``image`` (uint8 3xHxW), ``label``, ``path``, ``mask``."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from covid_lightning.data.scan import Record
from covid_lightning.data.transforms import load_image, load_mask


class XRayDataset(Dataset):
    """Records -> sample dicts through an albumentations transform.

    With ``masks=True`` every record must carry a mask; the sample then also has ``mask``, a float
    tensor of shape (1, H, W) with values {0, 1}, aligned with the image by the same transform.
    """

    def __init__(self, records: Sequence[Record], transform: Callable[..., dict], masks: bool = False) -> None:
        self.records = list(records)
        self.transform = transform
        self.masks = masks

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        rec = self.records[index]
        image = load_image(rec.path)
        if self.masks:
            out = self.transform(image=image, mask=load_mask(rec.mask_path))
            mask = out["mask"].to(torch.float32).unsqueeze(0)
            return {"image": out["image"], "mask": mask, "label": rec.label, "path": str(rec.path)}
        out = self.transform(image=image)
        return {"image": out["image"], "label": rec.label, "path": str(rec.path)}


class ImageFolderDataset(Dataset):
    """Any folder of images (recursive, PNG/JPEG) for prediction: ``image``, ``path``, ``size`` (H, W)."""

    def __init__(self, paths: Sequence[Path], transform: Callable[..., dict]) -> None:
        self.paths = list(paths)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, Any]:
        image = load_image(self.paths[index])
        out = self.transform(image=image)
        return {"image": out["image"], "path": str(self.paths[index]), "size": torch.tensor(image.shape[:2])}
