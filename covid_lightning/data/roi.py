"""Lung region of interest: the classifier sees the lungs, not the whole film (numpy + OpenCV, no model)."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np

from covid_lightning.data.scan import DatasetError
from covid_lightning.data.transforms import load_mask

log = logging.getLogger(__name__)

RoiMode = Literal["crop", "mask", "crop_mask"]
#: the lung region of whole films, and that of a checkpoint written before models recorded their region
WHOLE_FILM, UNKNOWN_REGION = {"lung_roi": "none"}, {"lung_roi": "unknown"}


def cut_to_lungs(region: Mapping[str, Any]) -> bool:
    """Whether ``region`` (a model's ``describe()``, a DataModule's ``lung_region``) means images cut to the lungs."""
    return region.get("lung_roi", "none") not in ("none", "unknown")


#: A mask covering less than this share of the image means "no lungs found": the image is used unchanged.
MIN_LUNG_FRACTION = 0.01
MAX_FALLBACK_WARNINGS = 5
HOW_TO_MAKE_MASKS = (
    "Compute them with `covid-lightning lungmasks SEGMENTER.ckpt DATA_DIR` and pass the folder "
    "it prints as --data.lung_masks (or set --data.lung_segmenter SEGMENTER.ckpt to compute them automatically)."
)


def roi_mask_name(image_path: str | Path) -> str:
    """The file name of an image's predicted lung mask: sha1 of its resolved absolute path + ``.png``."""
    return hashlib.sha1(str(Path(image_path).expanduser().resolve()).encode("utf-8")).hexdigest() + ".png"


def _check(mode: str, margin: float) -> None:
    if mode not in ("crop", "mask", "crop_mask"):
        raise ValueError(f"Unknown lung ROI mode {mode!r}; choose one of crop, mask, crop_mask.")
    if margin < 0:
        raise ValueError(f"lung margin must be >= 0, got {margin}.")


def apply_roi(image: np.ndarray, mask: np.ndarray, mode: RoiMode = "crop", margin: float = 0.1) -> np.ndarray:
    """Keep the lungs of ``image`` (HxWx3) given a lung ``mask``: ``crop``, ``mask`` or ``crop_mask``.

    A mask under :data:`MIN_LUNG_FRACTION` returns ``image`` itself.
    """
    _check(mode, margin)
    h, w = image.shape[:2]
    mask = cv2.resize((mask > 0).astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST)
    if mask.sum() < MIN_LUNG_FRACTION * h * w:
        return image
    out = image
    if mode != "crop":
        ry, rx = round(margin * h), round(margin * w)
        keep = cv2.dilate(mask, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * rx + 1, 2 * ry + 1)))
        out = image * keep[..., None].astype(image.dtype)
    if mode != "mask":
        rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        y0, y1, x0, x1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
        dy, dx = round(margin * (y1 - y0)), round(margin * (x1 - x0))
        out = np.ascontiguousarray(out[max(0, y0 - dy) : min(h, y1 + dy), max(0, x0 - dx) : min(w, x1 + dx)])
    return out


class LungRoi:
    """``(image, image_path) -> image`` with the lung ROI applied, reading ``mask_dir / roi_mask_name(path)``."""

    def __init__(self, mask_dir: str | Path, mode: RoiMode = "crop", margin: float = 0.1) -> None:
        _check(mode, margin)
        self.mask_dir = Path(mask_dir).expanduser()
        if not self.mask_dir.is_dir():
            raise DatasetError(f"Lung mask folder {self.mask_dir} does not exist. {HOW_TO_MAKE_MASKS}")
        self.mode, self.margin, self.applied, self.fallbacks = mode, margin, 0, 0

    def __call__(self, image: np.ndarray, image_path: str | Path) -> np.ndarray:
        path = self.mask_dir / roi_mask_name(image_path)
        if not path.is_file():
            raise DatasetError(f"No lung mask for image {image_path} (expected {path}). {HOW_TO_MAKE_MASKS}")
        out = apply_roi(image, load_mask(path), self.mode, self.margin)
        if out is not image:
            self.applied += 1
            return out
        self.fallbacks += 1
        if self.fallbacks <= MAX_FALLBACK_WARNINGS:
            log.warning(
                "Lung mask of %s covers < %.0f%% of the image; using the whole image (%d such image(s) so far%s).",
                image_path,
                100 * MIN_LUNG_FRACTION,
                self.fallbacks,
                "; no further warnings" if self.fallbacks == MAX_FALLBACK_WARNINGS else "",
            )
        return out
