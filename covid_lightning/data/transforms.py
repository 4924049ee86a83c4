"""Image loading and the albumentations pipelines (train/eval x classification/segmentation).

The preprocessing contract is deliberately small: decode to RGB uint8, resize to a square
``image_size`` (bilinear for images, nearest for masks), hand a ``uint8`` CHW tensor to the model.
Scaling and normalisation happen inside the model (:class:`covid_lightning.models.preprocess.Normalize`),
so they travel with the checkpoint and an exported model, and no two places can disagree.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import albumentations as A  # noqa: E402
import cv2  # noqa: E402
import numpy as np  # noqa: E402
from albumentations.pytorch import ToTensorV2  # noqa: E402
from PIL import Image  # noqa: E402

Augment = Literal["none", "light", "strong"]
AUGMENTS: tuple[str, ...] = ("none", "light", "strong")


def to_rgb_array(image: Image.Image) -> np.ndarray:
    """Any PIL image (L, RGB, RGBA, P, 16-bit gray) -> HxWx3 uint8 RGB array."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(image, dtype=np.float32)
        top = 65535.0 if image.mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr = np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(arr[..., None], 3, axis=2)
    if image.mode != "RGB":
        image = image.convert("RGB")
    return np.array(image)  # a writable copy (np.asarray of a PIL image is read-only)


class ImageReadError(OSError):
    """An image or mask file could not be decoded; the message names the file."""


def load_image(path: str | Path) -> np.ndarray:
    """Decode an image file as HxWx3 uint8 RGB (gray images are repeated over the 3 channels)."""
    try:
        with Image.open(path) as im:
            return to_rgb_array(im)
    except OSError as err:
        raise ImageReadError(f"Cannot decode image {path}: {err}. Remove or replace the file.") from err


def load_mask(path: str | Path) -> np.ndarray:
    """Decode a lung mask as HxW uint8 with values {0, 1}: > 127 is lung (masks stored as 0/1: > 0)."""
    try:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("L"))
    except OSError as err:
        raise ImageReadError(f"Cannot decode mask {path}: {err}. Remove or replace the file.") from err
    return (arr > (127 if arr.max() > 1 else 0)).astype(np.uint8)


def _augmentations(augment: str) -> list[A.BasicTransform]:
    """X-ray-safe augmentation: small affine, brightness/contrast/gamma; never a vertical flip.

    No horizontal flip either: the heart is on the patient's left and chest films are read that way.
    """
    if augment not in AUGMENTS:
        raise ValueError(f"Unknown augment {augment!r}; choose one of {', '.join(AUGMENTS)}.")
    if augment == "none":
        return []
    strong = augment == "strong"
    return [
        A.Affine(
            scale=(0.9, 1.1) if strong else (0.95, 1.05),
            translate_percent=(-0.06, 0.06) if strong else (-0.04, 0.04),
            rotate=(-10, 10) if strong else (-5, 5),
            border_mode=cv2.BORDER_CONSTANT,
            fill=0,
            fill_mask=0,
            p=0.7 if strong else 0.5,
        ),
        A.RandomBrightnessContrast(
            brightness_limit=0.15 if strong else 0.1, contrast_limit=0.15 if strong else 0.1, p=0.5
        ),
        A.RandomGamma(gamma_limit=(80, 120) if strong else (90, 110), p=0.3),
    ]


def build_transform(image_size: int, *, train: bool = False, augment: str = "none") -> A.Compose:
    """The pipeline for images (and masks, passed as ``mask=``): resize, augment if training, to tensor.

    Geometric transforms move image and mask together; intensity transforms touch the image only.
    Image and mask may differ in size on input (the Kaggle masks are 256x256, the images 299x299):
    the first step resizes each to ``image_size`` on its own, so they line up from then on.
    """
    steps: list[A.BasicTransform] = [
        A.Resize(image_size, image_size, interpolation=cv2.INTER_LINEAR, mask_interpolation=cv2.INTER_NEAREST)
    ]
    if train:
        steps += _augmentations(augment)
    steps.append(ToTensorV2())
    return A.Compose(steps, is_check_shapes=False)


def eval_transform(image_size: int) -> A.Compose:
    """The deterministic preprocessing shared by validation, test, predict and :mod:`covid_lightning.inference`."""
    return build_transform(image_size, train=False)
