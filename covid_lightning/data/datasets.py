"""Torch Datasets of sample dicts (``image`` uint8 3xHxW, ``label``, ``path``, ``mask``), and their sampler."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler

from covid_lightning.data.scan import Record
from covid_lightning.data.transforms import load_image, load_mask

#: ``(image HxWx3 uint8, image path) -> image``, applied right after decoding (e.g. ``data.roi.LungRoi``).
ImageHook = Callable[[np.ndarray, Path], np.ndarray]


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The augmentation seed of one sample in one epoch: resumable and independent of the DataLoader workers."""
    return (seed * 1_000_003 + epoch * 100_003 + index) % (2**32)


def make_sample(transform: Callable[..., dict], image: np.ndarray, mask: np.ndarray | None, label: int, path: str):
    """The sample dict: the transformed image (and mask: float (1, H, W) in {0, 1}), the label and the path."""
    if mask is None:
        return {"image": transform(image=image)["image"], "label": label, "path": path}
    out = transform(image=image, mask=mask)
    return {"image": out["image"], "mask": out["mask"].to(torch.float32).unsqueeze(0), "label": label, "path": path}


class EpochSampler(DistributedSampler):
    """Shuffled by ``(seed, epoch)``, sharded over ranks; yields ``epoch * len(dataset) + i`` to seed augmentation.
    With ``weights`` an epoch draws ``len(dataset)`` items with replacement in proportion to them."""

    def __init__(
        self,
        dataset: Dataset,
        num_replicas: int,
        rank: int,
        seed: int,
        epoch_source: Callable[[], int],
        weights: Sequence[float] | None = None,
    ):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.epoch_source = epoch_source
        self.weights = None if weights is None else torch.as_tensor(weights, dtype=torch.double)

    def __iter__(self) -> Iterator[int]:
        self.set_epoch(self.epoch_source())
        offset = self.epoch * len(self.dataset)
        if self.weights is None:
            return (offset + i for i in super().__iter__())
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        drawn = torch.multinomial(self.weights, self.total_size, replacement=True, generator=generator).tolist()
        return (offset + i for i in drawn[self.rank : self.total_size : self.num_replicas])


class XRayDataset(Dataset):
    """Records -> sample dicts through an albumentations transform, reseeded per sample with ``seed``."""

    def __init__(
        self,
        records: Sequence[Record],
        transform: Callable[..., dict],
        masks: bool = False,
        seed: int | None = None,
        roi: ImageHook | None = None,
        image_cache: Any = None,
        mask_cache: Any = None,
        cache_index: Sequence[int] | None = None,
    ) -> None:
        self.records, self.transform, self.masks, self.seed, self.roi = list(records), transform, masks, seed, roi
        self.image_cache, self.mask_cache, self.cache_index = image_cache, mask_cache, cache_index

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        epoch, index = divmod(index, len(self.records))
        if self.seed is not None:
            self.transform.set_random_seed(sample_seed(self.seed, epoch, index))
        rec = self.records[index]
        cached = self.cache_index[index] if self.cache_index is not None else None
        image = self.image_cache[cached] if self.image_cache is not None else load_image(rec.path)
        if self.roi is not None:
            image = self.roi(image, rec.path)
        mask = None
        if self.masks:
            mask = self.mask_cache[cached] if self.mask_cache is not None else load_mask(rec.mask_path)
        return make_sample(self.transform, image, mask, rec.label, str(rec.path))


class ImageFolderDataset(Dataset):
    """Image files for prediction: ``image``, ``path`` and ``size`` (the original H, W; ``roi`` applied after)."""

    def __init__(self, paths: Sequence[Path], transform: Callable[..., dict], roi: ImageHook | None = None) -> None:
        self.paths, self.transform, self.roi = list(paths), transform, roi

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, Any]:
        image = load_image(self.paths[index])
        size = torch.tensor(image.shape[:2])
        if self.roi is not None:
            image = self.roi(image, self.paths[index])
        return {"image": self.transform(image=image)["image"], "path": str(self.paths[index]), "size": size}


class FeatureDataset(Dataset):
    """Pre-computed activations (:class:`~covid_lightning.callbacks.FrozenFeatureCache`) as samples."""

    def __init__(self, features: torch.Tensor, labels: Sequence[int], paths: Sequence[str]) -> None:
        self.features, self.labels, self.paths = features, list(labels), list(paths)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, Any]:
        index %= len(self.labels)
        return {"features": self.features[index], "label": self.labels[index], "path": self.paths[index]}
