"""Lung region of interest: feed the classifier the lungs, not the whole film.

A lung mask predicted once per image (see :mod:`covid_lightning.lungs`) is stored as
``<mask_dir>/<roi_mask_name(image_path)>`` (PNG, 0/255, the image's own size). :class:`LungRoi` reads
it back and crops and/or masks the decoded image before the usual transforms. Data layer only:
numpy and OpenCV, no model.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Literal

import cv2
import numpy as np

from covid_lightning.data.scan import DatasetError
from covid_lightning.data.transforms import load_mask

log = logging.getLogger(__name__)

RoiMode = Literal["crop", "mask", "crop_mask"]
ROI_MODES: tuple[str, ...] = ("crop", "mask", "crop_mask")
#: A mask covering less than this share of the image is treated as "no lungs found": image unchanged.
MIN_LUNG_FRACTION = 0.01
#: Fallbacks logged one by one per LungRoi (per worker process); later ones are only counted.
MAX_FALLBACK_WARNINGS = 5
HOW_TO_MAKE_MASKS = (
    "Compute them with `covid-lightning lungmasks --ckpt SEGMENTER.ckpt --root DATA_DIR` and pass the folder "
    "it prints as --data.lung_masks (or set --data.lung_segmenter SEGMENTER.ckpt to compute them automatically)."
)


def roi_mask_name(image_path: str | Path) -> str:
    """The file name of an image's predicted lung mask: sha1 of its resolved absolute path + ``.png``."""
    resolved = Path(image_path).expanduser().resolve()
    return hashlib.sha1(str(resolved).encode("utf-8")).hexdigest() + ".png"


def _check_mode(mode: str) -> None:
    if mode not in ROI_MODES:
        raise ValueError(f"Unknown lung ROI mode {mode!r}; choose one of {', '.join(ROI_MODES)}.")


def _apply_roi(image: np.ndarray, mask: np.ndarray, mode: str, margin: float) -> tuple[np.ndarray, bool]:
    """:func:`apply_roi`, also telling whether the ROI was applied (False = fallback, image unchanged)."""
    _check_mode(mode)
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}.")
    if image.ndim != 3 or mask.ndim != 2:
        raise ValueError(f"Expected an HxWxC image and an hxw mask, got shapes {image.shape} and {mask.shape}.")
    h, w = image.shape[:2]
    mask = (mask > 0).astype(np.uint8)
    if mask.shape != (h, w):
        mask = cv2.resize(mask, (w, h), interpolation=cv2.INTER_NEAREST)
    if mask.sum() < MIN_LUNG_FRACTION * h * w:
        return image, False
    out = image
    if mode in ("mask", "crop_mask"):
        ry, rx = round(margin * h), round(margin * w)
        if ry or rx:
            kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * rx + 1, 2 * ry + 1))
            keep = cv2.dilate(mask, kernel)
        else:
            keep = mask
        out = image * keep[..., None].astype(image.dtype)
    if mode in ("crop", "crop_mask"):
        rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        y0, y1, x0, x1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
        dy, dx = round(margin * (y1 - y0)), round(margin * (x1 - x0))
        y0, y1 = max(0, y0 - dy), min(h, y1 + dy)
        x0, x1 = max(0, x0 - dx), min(w, x1 + dx)
        out = np.ascontiguousarray(out[y0:y1, x0:x1])
    return out, True


def apply_roi(image: np.ndarray, mask: np.ndarray, mode: RoiMode = "crop", margin: float = 0.1) -> np.ndarray:
    """Keep the lungs of ``image`` (HxWx3 uint8) given a lung ``mask`` (hxw, > 0 = lung, any size).

    The mask is resized to the image (nearest). ``crop``: crop to the lungs' bounding box grown by
    ``margin`` x its height/width on each side, clipped to the image. ``mask``: zero the pixels outside
    the lungs dilated by ``margin`` x the image height/width (elliptical kernel). ``crop_mask``: both
    (mask, then crop). A mask covering less than :data:`MIN_LUNG_FRACTION` of the image is ignored:
    ``image`` itself is returned unchanged.
    """
    return _apply_roi(image, mask, mode, margin)[0]


class LungRoi:
    """``(image, image_path) -> image`` with the lung ROI applied, reading ``mask_dir / roi_mask_name(path)``.

    Picklable (DataLoader workers). ``applied`` and ``fallbacks`` count the images processed with and
    without a usable mask; with worker processes each worker counts its own copy.
    """

    def __init__(self, mask_dir: str | Path, mode: RoiMode = "crop", margin: float = 0.1) -> None:
        _check_mode(mode)
        if margin < 0:
            raise ValueError(f"lung margin must be >= 0, got {margin}.")
        self.mask_dir = Path(mask_dir).expanduser()
        if not self.mask_dir.is_dir():
            raise DatasetError(f"Lung mask folder {self.mask_dir} does not exist. {HOW_TO_MAKE_MASKS}")
        self.mode = mode
        self.margin = margin
        self.applied = 0
        self.fallbacks = 0

    def mask_path(self, image_path: str | Path) -> Path:
        """Where the predicted lung mask of ``image_path`` is expected."""
        return self.mask_dir / roi_mask_name(image_path)

    def __call__(self, image: np.ndarray, image_path: str | Path) -> np.ndarray:
        path = self.mask_path(image_path)
        if not path.is_file():
            raise DatasetError(f"No lung mask for image {image_path} (expected {path}). {HOW_TO_MAKE_MASKS}")
        out, used = _apply_roi(image, load_mask(path), self.mode, self.margin)
        if used:
            self.applied += 1
        else:
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

    def __repr__(self) -> str:
        return f"LungRoi(mask_dir={str(self.mask_dir)!r}, mode={self.mode!r}, margin={self.margin})"
