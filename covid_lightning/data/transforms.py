"""Image loading and the albumentations pipelines (train/eval x classification/segmentation).

PNG decoding goes through OpenCV (~1.7x faster than PIL on the Kaggle PNGs: about
1.0 vs 1.9 ms per 299x299 image on one core) and falls back to PIL, with the same result, where OpenCV
returns something other than 8-bit (16-bit gray, scaled as :func:`to_rgb_array` does) or cannot read the
file (PIL then raises the error that names it). DICOM files (by name or content) and bytes go through
:mod:`covid_lightning.data.dicom` (modality and VOI LUTs, MONOCHROME1 inverted, scaled to 8 bits by the same
:func:`scale_to_uint8`), so training, predict, ``classify()``/``segment()`` and the server see the same pixels.

The preprocessing contract is deliberately small: decode to RGB uint8, resize to a square
``image_size`` (bilinear for images, nearest for masks), hand a ``uint8`` CHW tensor to the model.
Scaling and normalisation happen inside the model (:class:`covid_lightning.models.preprocess.Normalize`),
so they travel with the checkpoint and an exported model, and no two places can disagree.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Literal

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import albumentations as A  # noqa: E402
import cv2  # noqa: E402
import numpy as np  # noqa: E402
from albumentations.pytorch import ToTensorV2  # noqa: E402
from PIL import Image, UnidentifiedImageError  # noqa: E402

from covid_lightning.data.dicom import DICOM_SUFFIXES, is_dicom, read_dicom, scale_to_uint8  # noqa: E402

Augment = Literal["none", "light", "strong"]
AUGMENTS: tuple[str, ...] = ("none", "light", "strong")


def to_rgb_array(image: Image.Image) -> np.ndarray:
    """Any PIL image (L, RGB, RGBA, P, 16-bit gray) -> HxWx3 uint8 RGB array."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(image, dtype=np.float32)
        top = 65535.0 if image.mode.startswith("I;16") or arr.max() > 255 else 255.0
        return np.repeat(scale_to_uint8(arr, 0.0, top)[..., None], 3, axis=2)
    if image.mode != "RGB":
        image = image.convert("RGB")
    return np.array(image)  # a writable copy (np.asarray of a PIL image is read-only)


class ImageReadError(OSError):
    """An image or mask file could not be decoded; the message names the file."""


#: OpenCV's flags: the file's own channels and depth, no EXIF rotation (as PIL, which never rotates).
CV2_READ_FLAGS = cv2.IMREAD_UNCHANGED | cv2.IMREAD_IGNORE_ORIENTATION
_CV2_TO_RGB = {1: cv2.COLOR_GRAY2RGB, 3: cv2.COLOR_BGR2RGB, 4: cv2.COLOR_BGRA2RGB}


#: PNG (the dataset's format) is read through OpenCV, pixel-identical to PIL in every PNG mode; other
#: formats go through PIL (OpenCV converts CMYK JPEGs and premultiplies TIFF alpha differently).
CV2_SUFFIXES = frozenset({".png"})
CV2_SIGNATURES = (b"\x89PNG\r\n\x1a\n",)


def cv2_read(path: str | Path) -> np.ndarray | None:
    """``cv2.imread`` of a PNG file (``None`` for other formats, or where OpenCV fails)."""
    return cv2.imread(str(path), CV2_READ_FLAGS) if Path(path).suffix.lower() in CV2_SUFFIXES else None


def cv2_decode(data: bytes | memoryview) -> np.ndarray | None:
    """``cv2.imdecode`` of PNG bytes (``None`` for other formats, or where OpenCV fails)."""
    if not bytes(data[:8]).startswith(CV2_SIGNATURES):
        return None
    return cv2.imdecode(np.frombuffer(data, dtype=np.uint8), CV2_READ_FLAGS)


def rgb_from_cv2(arr: np.ndarray | None) -> np.ndarray | None:
    """An ``IMREAD_UNCHANGED`` array -> HxWx3 uint8 RGB (alpha dropped, as PIL's ``convert("RGB")``).

    ``None`` where PIL must decode instead: OpenCV failed, or the data is not 8-bit.
    """
    if arr is None or arr.dtype != np.uint8:
        return None
    code = _CV2_TO_RGB.get(1 if arr.ndim == 2 else arr.shape[2])
    return None if code is None else cv2.cvtColor(arr, code)


def mask_from_cv2(arr: np.ndarray | None) -> np.ndarray | None:
    """An ``IMREAD_UNCHANGED`` array -> the HxW uint8 gray mask, or ``None`` where PIL must convert.

    Gray stored as RGB (the Kaggle masks: R = G = B) is its first channel, which is exactly PIL's
    ``convert("L")`` there; colour, 16-bit or unreadable masks go to PIL.
    """
    if arr is None or arr.dtype != np.uint8:
        return None
    if arr.ndim == 2:
        return arr
    first = arr[..., 0]
    if arr.shape[2] in (3, 4) and np.array_equal(first, arr[..., 1]) and np.array_equal(first, arr[..., 2]):
        return np.ascontiguousarray(first)
    return None


def binarize_mask(arr: np.ndarray) -> np.ndarray:
    """HxW uint8 gray -> {0, 1}: > 127 is lung (masks stored as 0/1: > 0)."""
    return (arr > (127 if arr.max() > 1 else 0)).astype(np.uint8)


Source = str | Path | bytes | memoryview


def _open(source: Source) -> Image.Image:
    return Image.open(io.BytesIO(bytes(source)) if isinstance(source, (bytes, memoryview)) else source)


def _open_pil_or_dicom(source: Source, *, gray: bool = False) -> np.ndarray:
    """PIL's decode (RGB, or gray with ``gray``); DICOM (by name or by its ``DICM`` marker) through
    :func:`covid_lightning.data.dicom.read_dicom`. Unreadable data raises ``OSError``."""
    if isinstance(source, (bytes, memoryview)) or Path(source).suffix.lower() not in DICOM_SUFFIXES:
        try:
            with _open(source) as im:
                return np.asarray(im.convert("L")) if gray else to_rgb_array(im)
        except UnidentifiedImageError:
            if not is_dicom(source):  # a DICOM without .dcm in its name is recognised by its contents
                raise
    rgb = read_dicom(source).rgb
    return np.ascontiguousarray(rgb[..., 0]) if gray else rgb


def decode_rgb(source: Source) -> np.ndarray:
    """A PNG/JPEG/DICOM/... file (path) or its bytes -> HxWx3 uint8 RGB: OpenCV for PNG, pydicom for DICOM,
    else PIL (gray images repeated over the 3 channels). Unreadable data raises ``OSError``."""
    decoded = cv2_decode(source) if isinstance(source, (bytes, memoryview)) else cv2_read(source)
    rgb = rgb_from_cv2(decoded)
    if rgb is not None:
        return rgb
    return _open_pil_or_dicom(source)


def decode_binary_mask(source: Source) -> np.ndarray:
    """A mask file (path) or its bytes -> HxW uint8 {0, 1} (:func:`binarize_mask`); OpenCV for PNG, else PIL
    (or pydicom). Unreadable data raises ``OSError``."""
    decoded = cv2_decode(source) if isinstance(source, (bytes, memoryview)) else cv2_read(source)
    gray = mask_from_cv2(decoded)
    if gray is None:
        gray = _open_pil_or_dicom(source, gray=True)
    return binarize_mask(gray)


def load_image(path: str | Path) -> np.ndarray:
    """Decode an image file as HxWx3 uint8 RGB (gray images are repeated over the 3 channels)."""
    try:
        return decode_rgb(path)
    except OSError as err:
        raise ImageReadError(f"Cannot decode image {path}: {err}. Remove or replace the file.") from err


def load_mask(path: str | Path) -> np.ndarray:
    """Decode a lung mask as HxW uint8 with values {0, 1}: > 127 is lung (masks stored as 0/1: > 0)."""
    try:
        return decode_binary_mask(path)
    except OSError as err:
        raise ImageReadError(f"Cannot decode mask {path}: {err}. Remove or replace the file.") from err


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
