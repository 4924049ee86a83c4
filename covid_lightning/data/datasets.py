"""Torch Datasets returning sample dicts: ``image`` (uint8 3xHxW), ``label``, ``path``, ``mask``."""

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
    """The augmentation seed of one sample in one epoch (a pure function: resumable, worker-independent)."""
    return (seed * 1_000_003 + epoch * 100_003 + index) % (2**32)


class EpochSampler(DistributedSampler):
    """Shuffled order that depends only on ``(seed, epoch)``, sharded over ranks, with the epoch encoded.

    Lightning calls ``set_epoch`` every epoch, and ``epoch_source`` (the fit loop's epoch) is asked too,
    because a resumed run builds its first iterator before ``set_epoch``; so a resumed run sees the same
    order as an uninterrupted one, and every rank agrees. Each yielded index is
    ``epoch * len(dataset) + i``: the dataset decodes it and seeds its augmentation with
    :func:`sample_seed`, so augmentation is reproducible whatever the number of DataLoader workers.
    """

    def __init__(
        self,
        dataset: Dataset,
        num_replicas: int = 1,
        rank: int = 0,
        seed: int = 0,
        epoch_source: Callable[[], int] | None = None,
    ) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.epoch_source = epoch_source

    def __iter__(self) -> Iterator[int]:
        if self.epoch_source is not None:
            # A resumed run may build its (multi-worker) iterator before Lightning calls set_epoch.
            self.set_epoch(self.epoch_source())
        offset = self.epoch * len(self.dataset)
        return (offset + i for i in super().__iter__())


class XRayDataset(Dataset):
    """Records -> sample dicts through an albumentations transform.

    With ``masks=True`` every record must carry a mask; the sample then also has ``mask``, a float
    tensor of shape (1, H, W) with values {0, 1}, aligned with the image by the same transform.
    With ``seed`` set, the transform is reseeded per sample from (seed, epoch, index), where indices
    at or beyond ``len(self)`` carry the epoch (see :class:`EpochSampler`). ``roi`` (e.g. the lungs only)
    is applied to the decoded image before the transform; it cannot be combined with ``masks``.
    ``image_cache``/``mask_cache`` (:class:`~covid_lightning.data.image_cache.DecodedCache`, indexed by
    ``cache_index[i]``) replace decoding with a lookup of the already resized arrays.
    """

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
        if masks and roi is not None:
            raise ValueError("A lung ROI cannot be applied to a segmentation dataset (the masks would not follow).")
        if image_cache is not None and (roi is not None or cache_index is None):
            raise ValueError("A decoded-image cache needs cache_index and cannot be combined with a lung ROI.")
        self.records = list(records)
        self.transform = transform
        self.masks = masks
        self.seed = seed
        self.roi = roi
        self.image_cache, self.mask_cache = image_cache, mask_cache
        self.cache_index = list(cache_index) if cache_index is not None else None

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        epoch, index = divmod(index, len(self.records))
        if self.seed is not None:
            self.transform.set_random_seed(sample_seed(self.seed, epoch, index))
        rec = self.records[index]
        if self.image_cache is not None:  # decoded and resized once (data.cache_images)
            image = self.image_cache[self.cache_index[index]]
        else:
            image = load_image(rec.path)
        if self.roi is not None:
            image = self.roi(image, rec.path)
        if self.masks:
            if self.mask_cache is not None:
                mask = self.mask_cache[self.cache_index[index]]
            else:
                mask = load_mask(rec.mask_path)
            out = self.transform(image=image, mask=mask)
            mask = out["mask"].to(torch.float32).unsqueeze(0)
            return {"image": out["image"], "mask": mask, "label": rec.label, "path": str(rec.path)}
        out = self.transform(image=image)
        return {"image": out["image"], "label": rec.label, "path": str(rec.path)}


class ImageFolderDataset(Dataset):
    """Any folder of images (recursive, PNG/JPEG) for prediction: ``image``, ``path``, ``size`` (H, W).

    ``roi`` is applied to the decoded image before the transform; ``size`` stays the original image's.
    """

    def __init__(self, paths: Sequence[Path], transform: Callable[..., dict], roi: ImageHook | None = None) -> None:
        self.paths = list(paths)
        self.transform = transform
        self.roi = roi

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, Any]:
        image = load_image(self.paths[index])
        size = torch.tensor(image.shape[:2])
        if self.roi is not None:
            image = self.roi(image, self.paths[index])
        out = self.transform(image=image)
        return {"image": out["image"], "path": str(self.paths[index]), "size": size}


class FeatureDataset(Dataset):
    """Pre-computed network activations as samples: ``{"features", "label", "path"}``.

    Used by :class:`covid_lightning.callbacks.FrozenFeatureCache` in place of an image dataset. Indices
    at or beyond ``len(self)`` carry the epoch (see :class:`EpochSampler`) and are folded back.
    """

    def __init__(self, features: torch.Tensor, labels: Sequence[int], paths: Sequence[str]) -> None:
        if not len(features) == len(labels) == len(paths):
            raise ValueError(f"{len(features)} features, {len(labels)} labels and {len(paths)} paths.")
        self.features = features
        self.labels = list(labels)
        self.paths = list(paths)
        self.seed: int | None = None  # nothing random to seed; kept for the DataModule's interface

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, Any]:
        index %= len(self.labels)
        return {"features": self.features[index], "label": self.labels[index], "path": self.paths[index]}
