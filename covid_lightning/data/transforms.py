"""One decode for every input (PNG, JPEG or DICOM), and the albumentations pipelines: resize and augment only."""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import albumentations as A
import cv2
import numpy as np
from albumentations.pytorch import ToTensorV2
from PIL import Image, UnidentifiedImageError

DICOM_SUFFIXES = frozenset({".dcm", ".dicom"})
COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_RCT", "YBR_ICT", "YBR_PARTIAL_420")  # DICOM photometrics read as RGB
Source = str | Path | bytes | memoryview
#: scale, shift (of the size), rotation (degrees) and probability of the affine, brightness/contrast, gamma (%)
AUGMENT_LIMITS = {"light": (0.05, 0.04, 5, 0.5, 0.1, 10), "strong": (0.1, 0.06, 10, 0.7, 0.15, 20)}
AUGMENT_LIMITS["acquisition"] = (0.1, 0.06, 10, 0.7, 0.2, 30)  # with :func:`acquisition_cues` first
#: intensity standardisation after the resize, the same in training, evaluation, export and serving
Intensity = Literal["none", "clahe", "equalize"]
INTENSITY: dict[str, list[A.BasicTransform]] = {
    "none": [],
    "clahe": [A.CLAHE(clip_limit=2.0, tile_grid_size=(8, 8), p=1.0)],
    "equalize": [A.Equalize(p=1.0)],
}
#: the file's own channels and depth, no EXIF rotation (PIL never rotates either)
_CV2_FLAGS = cv2.IMREAD_UNCHANGED | cv2.IMREAD_IGNORE_ORIENTATION
_CV2_TO_RGB = {3: cv2.COLOR_BGR2RGB, 4: cv2.COLOR_BGRA2RGB}


class DicomError(OSError):
    """A DICOM file cannot be turned into an image (no pydicom, no pixel data, an unsupported layout, corrupt)."""


def has_dicom_magic(data: bytes | memoryview) -> bool:
    """True for the bytes of a DICOM Part 10 file (``DICM`` after the 128-byte preamble)."""
    return bytes(data[128:132]) == b"DICM"


def is_dicom(source: Source) -> bool:
    """DICOM bytes, or a DICOM file by its name (``.dcm``/``.dicom``) or its contents."""
    if isinstance(source, (bytes, memoryview)):
        return has_dicom_magic(source)
    if Path(source).suffix.lower() in DICOM_SUFFIXES:
        return True
    try:
        with open(source, "rb") as f:
            return has_dicom_magic(f.read(132))
    except OSError:
        return False


def _read(source: Source, *, pixels: bool) -> Any:
    try:
        import pydicom
    except ImportError as err:
        raise DicomError("reading DICOM needs pydicom: pip install 'covid-lightning[dicom]' (or pydicom)") from err
    fp = io.BytesIO(bytes(source)) if isinstance(source, (bytes, memoryview)) else str(source)
    try:
        return pydicom.dcmread(fp, stop_before_pixels=not pixels)
    except FileNotFoundError:
        raise
    except Exception as err:
        why = str(err).replace(" Use force=True to force reading.", "")  # pydicom's hint is for its own API
        raise DicomError(f"not a readable DICOM file: {why}") from err


def dicom_size(source: Source) -> tuple[int, int]:
    """``(width, height)`` from the header alone."""
    ds = _read(source, pixels=False)
    return int(ds.Columns), int(ds.Rows)


def output_range(ds: Any) -> tuple[float, float]:
    """The values the VOI stage can output: the VOI LUT's bit depth, else the stored bit depth."""
    voi = ds.get("VOILUTSequence")
    if voi and voi[0].get("LUTDescriptor") is not None and voi[0].get("LUTData") is not None:
        return 0.0, float(2 ** int(voi[0].LUTDescriptor[2]) - 1)
    modality, bits = ds.get("ModalityLUTSequence"), int(ds.BitsStored)
    if modality:
        return 0.0, float(2 ** int(modality[0].LUTDescriptor[2]) - 1)
    signed = int(ds.get("PixelRepresentation", 0)) != 0
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    if ds.get("RescaleSlope") is not None and ds.get("RescaleIntercept") is not None:
        slope, intercept = float(ds.RescaleSlope), float(ds.RescaleIntercept)
        lo, hi = sorted((lo * slope + intercept, hi * slope + intercept))
    return float(lo), float(hi)


def scale_to_uint8(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Values in ``lo..hi`` -> uint8, rounded and clipped: the one rule for data deeper than 8 bits."""
    span = hi - lo if hi > lo else 1.0
    return np.clip((values - lo) / span * 255.0 + 0.5, 0, 255).astype(np.uint8)


def read_dicom(source: Source) -> tuple[np.ndarray, str]:
    """One single-frame DICOM radiograph (path or bytes) -> HxWx3 uint8 RGB and its kind for reports."""
    ds = _read(source, pixels=True)
    photometric, frames = str(ds.get("PhotometricInterpretation", "")), int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise DicomError(f"multi-frame DICOM ({frames} frames): one radiograph per file is expected")
    if photometric not in ("MONOCHROME1", "MONOCHROME2", *COLOUR):
        raise DicomError(f"unsupported PhotometricInterpretation {photometric!r}: expected MONOCHROME1/2 or RGB/YBR")
    try:
        arr = ds.pixel_array
    except Exception as err:
        raise DicomError(f"cannot decode the pixel data: {err}") from err
    bits = int(ds.get("BitsStored", 8) or 8)
    if photometric in COLOUR:
        rgb = arr if arr.dtype == np.uint8 else scale_to_uint8(arr, 0.0, float(2**bits - 1))
    else:
        from pydicom.pixels import apply_modality_lut, apply_voi_lut

        values = np.asarray(apply_voi_lut(apply_modality_lut(arr, ds), ds), dtype=np.float64)
        lo, hi = output_range(ds)
        if photometric == "MONOCHROME1":
            values = lo + hi - values
        rgb = np.repeat(scale_to_uint8(values, lo, hi)[..., None], 3, axis=2)
    return np.ascontiguousarray(rgb), f"{photometric} {bits}-bit"


class ImageReadError(OSError):
    """An image or mask file could not be decoded; the message names the file."""


def to_rgb_array(image: Image.Image) -> np.ndarray:
    """Any PIL image (L, RGB, RGBA, P, 16-bit gray) -> HxWx3 uint8 RGB array (16-bit scaled from 0..65535)."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(image, dtype=np.float32)
        top = 65535.0 if image.mode.startswith("I;16") or arr.max() > 255 else 255.0
        return np.repeat(scale_to_uint8(arr, 0.0, top)[..., None], 3, axis=2)
    return np.array(image if image.mode == "RGB" else image.convert("RGB"))


def _from_cv2(source: Source, gray: bool) -> np.ndarray | None:
    """A PNG through OpenCV (faster, pixel-identical to PIL); None where PIL must decode."""
    if isinstance(source, (bytes, memoryview)):
        png = bytes(source[:8]) == b"\x89PNG\r\n\x1a\n"
        arr = cv2.imdecode(np.frombuffer(source, dtype=np.uint8), _CV2_FLAGS) if png else None
    else:
        arr = cv2.imread(str(source), _CV2_FLAGS) if Path(source).suffix.lower() == ".png" else None
    if arr is None or arr.dtype != np.uint8 or (arr.ndim == 3 and arr.shape[2] not in _CV2_TO_RGB):
        return None
    if arr.ndim == 2:
        return arr if gray else cv2.cvtColor(arr, cv2.COLOR_GRAY2RGB)
    if not gray:
        return cv2.cvtColor(arr, _CV2_TO_RGB[arr.shape[2]])
    same = np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(arr[..., 0], arr[..., 2])
    return np.ascontiguousarray(arr[..., 0]) if same else None


def _decode(source: Source, gray: bool = False) -> np.ndarray:
    """HxWx3 uint8 RGB, or with ``gray`` HxW (PIL's ``L`` conversion); unreadable data raises ``OSError``."""
    decoded = _from_cv2(source, gray)
    if decoded is not None:
        return decoded
    if isinstance(source, (bytes, memoryview)) or Path(source).suffix.lower() not in DICOM_SUFFIXES:
        try:
            with Image.open(io.BytesIO(bytes(source)) if isinstance(source, (bytes, memoryview)) else source) as im:
                return np.asarray(im.convert("L")) if gray else to_rgb_array(im)
        except UnidentifiedImageError:
            if not is_dicom(source):  # a DICOM without .dcm in its name is recognised by its contents
                raise
    rgb = read_dicom(source)[0]
    return np.ascontiguousarray(rgb[..., 0]) if gray else rgb


def decode_rgb(source: Source) -> np.ndarray:
    """A PNG/JPEG/DICOM/... file or its bytes -> HxWx3 uint8 RGB; unreadable data raises ``OSError``."""
    return _decode(source)


def decode_binary_mask(source: Source) -> np.ndarray:
    """A mask file or its bytes -> HxW uint8 {0, 1}: > 127 is lung (masks stored as 0/1: > 0)."""
    gray = _decode(source, gray=True)
    return (gray > (127 if gray.max() > 1 else 0)).astype(np.uint8)


def load_image(path: str | Path) -> np.ndarray:
    """:func:`decode_rgb` of a file; :class:`ImageReadError` names the file."""
    return _named(decode_rgb, path, "image")


def load_mask(path: str | Path) -> np.ndarray:
    """:func:`decode_binary_mask` of a file; :class:`ImageReadError` names the file."""
    return _named(decode_binary_mask, path, "mask")


def _named(decode: Callable[[Source], np.ndarray], path: str | Path, kind: str) -> np.ndarray:
    try:
        return decode(path)
    except OSError as err:
        raise ImageReadError(f"Cannot decode {kind} {path}: {err}. Remove or replace the file.") from err


def acquisition_cues() -> list[A.BasicTransform]:
    """Erase what a film's acquisition and processing leave (DeGrave et al. 2021): resampling, JPEG, blur/noise,
    border crops; brightness, contrast and gamma are in the affine presets' steps."""
    return [
        A.CropAndPad(percent=(-0.08, 0.0), keep_size=True, p=0.5),  # borders: markers, collimation edges
        A.Downscale(scale_range=(0.3, 0.9), p=0.5),
        A.ImageCompression(quality_range=(30, 95), p=0.5),
        A.OneOf([A.GaussianBlur(blur_limit=(3, 5)), A.GaussNoise(std_range=(0.02, 0.08), per_channel=False)], p=0.5),
    ]


def build_transform(
    image_size: int, *, train: bool = False, augment: str = "none", intensity: str = "none"
) -> A.Compose:
    """Resize, augment when training (X-ray-safe: no flips), standardise intensity, to a uint8 CHW tensor."""
    if augment not in ("none", *AUGMENT_LIMITS):
        raise ValueError(f"Unknown augment {augment!r}; choose none, {', '.join(AUGMENT_LIMITS)}.")
    if intensity not in INTENSITY:
        raise ValueError(f"Unknown intensity {intensity!r}; choose {', '.join(INTENSITY)}.")
    steps: list[A.BasicTransform] = [
        A.Resize(image_size, image_size, interpolation=cv2.INTER_LINEAR, mask_interpolation=cv2.INTER_NEAREST)
    ]
    if train and augment != "none":
        scale, shift, turn, p, light, gamma = AUGMENT_LIMITS[augment]
        affine = {"border_mode": cv2.BORDER_CONSTANT, "fill": 0, "fill_mask": 0, "p": p}
        steps += acquisition_cues() if augment == "acquisition" else []
        steps += [
            A.Affine(scale=(1 - scale, 1 + scale), translate_percent=(-shift, shift), rotate=(-turn, turn), **affine),
            A.RandomBrightnessContrast(brightness_limit=light, contrast_limit=light),
            A.RandomGamma(gamma_limit=(100 - gamma, 100 + gamma), p=0.3),
        ]
    return A.Compose([*steps, *INTENSITY[intensity], ToTensorV2()], is_check_shapes=False)


def eval_transform(image_size: int, intensity: str = "none") -> A.Compose:
    """The deterministic preprocessing of validation, test, predict and :mod:`covid_lightning.inference`."""
    return build_transform(image_size, intensity=intensity)
