"""DICOM radiographs -> the 8-bit RGB arrays every other image becomes (through ``transforms.decode_rgb``).

Grayscale data goes through pydicom's own display pipeline: the modality LUT (rescale slope/intercept or a
Modality LUT Sequence, :func:`pydicom.pixels.apply_modality_lut`), then the VOI LUT or window
(:func:`pydicom.pixels.apply_voi_lut`); MONOCHROME1 (white = low values) is then inverted, and the values are
scaled to 0..255 from the full range that stage can output (the stored bit depth through the modality LUT, or
the VOI LUT's bit depth), as a 16-bit PNG is scaled from 0..65535. Colour DICOMs (RGB, YBR) are read as RGB.

pydicom is an optional dependency (``pip install 'covid-lightning[dicom]'``); compressed transfer syntaxes
need its pixel-data handlers (pylibjpeg, GDCM or Pillow's). Every failure is a :class:`DicomError`, an
``OSError``, so a bad DICOM is reported like any unreadable image.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

DICOM_SUFFIXES = frozenset({".dcm", ".dicom"})
#: "DICM" after the 128-byte preamble of a DICOM Part 10 file
DICOM_MAGIC = b"DICM"
MONOCHROME = ("MONOCHROME1", "MONOCHROME2")
COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_RCT", "YBR_ICT", "YBR_PARTIAL_420")

Source = str | Path | bytes | memoryview


class DicomError(OSError):
    """A DICOM file cannot be turned into an image (no pydicom, no pixel data, an unsupported layout, corrupt)."""


@dataclass(frozen=True)
class DicomImage:
    """The decoded 8-bit RGB pixels and what the header said about them."""

    rgb: np.ndarray
    photometric: str
    bits_stored: int

    @property
    def mode(self) -> str:
        """A short description for reports, e.g. ``MONOCHROME1 12-bit``."""
        return f"{self.photometric} {self.bits_stored}-bit"


def has_dicom_magic(data: bytes | memoryview) -> bool:
    """True for the bytes of a DICOM Part 10 file (``DICM`` after the 128-byte preamble)."""
    return bytes(data[128:132]) == DICOM_MAGIC


def is_dicom(source: Source) -> bool:
    """A DICOM file by its name (``.dcm``/``.dicom``) or its contents (the ``DICM`` marker), or DICOM bytes."""
    if isinstance(source, (bytes, memoryview)):
        return has_dicom_magic(source)
    path = Path(source)
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    try:
        with path.open("rb") as f:
            return has_dicom_magic(f.read(132))
    except OSError:
        return False


def _pydicom() -> Any:
    try:
        import pydicom
    except ImportError as err:
        raise DicomError(
            "reading DICOM needs pydicom: pip install 'covid-lightning[dicom]' (or pip install pydicom)"
        ) from err
    return pydicom


def _read(source: Source, *, pixels: bool) -> Any:
    pydicom = _pydicom()
    fp = io.BytesIO(bytes(source)) if isinstance(source, (bytes, memoryview)) else str(source)
    try:
        return pydicom.dcmread(fp, stop_before_pixels=not pixels)
    except FileNotFoundError:
        raise
    except Exception as err:  # noqa: BLE001 - pydicom raises many kinds for a bad file
        why = str(err).replace(" Use force=True to force reading.", "")  # pydicom's hint is for its own API
        raise DicomError(f"not a readable DICOM file: {why}") from err


def dicom_size(source: Source) -> tuple[int, int]:
    """``(width, height)`` from the header alone (the pixel data is not read)."""
    ds = _read(source, pixels=False)
    try:
        return int(ds.Columns), int(ds.Rows)
    except AttributeError as err:
        raise DicomError("DICOM file without Rows/Columns: it holds no image") from err


def output_range(ds: Any) -> tuple[float, float]:
    """The values the VOI stage can output: the VOI LUT's bit depth when there is one (pydicom prefers it),
    else the stored bit depth through the modality LUT (what windowing and no VOI at all both output)."""
    voi = ds.get("VOILUTSequence")
    if voi and voi[0].get("LUTDescriptor") is not None and voi[0].get("LUTData") is not None:
        return 0.0, float(2 ** int(voi[0].LUTDescriptor[2]) - 1)
    modality = ds.get("ModalityLUTSequence")
    if modality:
        lo, hi = 0.0, float(2 ** int(modality[0].LUTDescriptor[2]) - 1)
    elif int(ds.get("PixelRepresentation", 0)) == 0:
        lo, hi = 0.0, float(2 ** int(ds.BitsStored) - 1)
    else:
        lo, hi = float(-(2 ** (int(ds.BitsStored) - 1))), float(2 ** (int(ds.BitsStored) - 1) - 1)
    if not modality and ds.get("RescaleSlope") is not None and ds.get("RescaleIntercept") is not None:
        slope, intercept = float(ds.RescaleSlope), float(ds.RescaleIntercept)
        lo, hi = sorted((lo * slope + intercept, hi * slope + intercept))
    return lo, hi


def scale_to_uint8(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Values in ``lo..hi`` -> uint8 0..255, rounded and clipped: the one rule for deeper-than-8-bit data
    (16-bit PNGs from 0..65535, DICOMs from the range of their display pipeline)."""
    span = hi - lo if hi > lo else 1.0
    return np.clip((values - lo) / span * 255.0 + 0.5, 0, 255).astype(np.uint8)


def display_values(ds: Any, arr: np.ndarray) -> tuple[np.ndarray, float, float]:
    """Stored grayscale values -> modality LUT -> VOI LUT/window -> MONOCHROME1 inverted, with the output range."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    values = apply_voi_lut(apply_modality_lut(arr, ds), ds)
    lo, hi = output_range(ds)
    if ds.PhotometricInterpretation == "MONOCHROME1":
        values = (lo + hi) - np.asarray(values, dtype=np.float64)
    return np.asarray(values), lo, hi


def read_dicom(source: Source) -> DicomImage:
    """Decode one single-frame DICOM radiograph (path or bytes) to HxWx3 uint8 RGB; :class:`DicomError` if it
    cannot be."""
    ds = _read(source, pixels=True)
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise DicomError("DICOM file without pixel data (not an image)")
    photometric = str(ds.get("PhotometricInterpretation", ""))
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise DicomError(f"multi-frame DICOM ({frames} frames): one radiograph per file is expected")
    if photometric not in MONOCHROME + COLOUR:
        raise DicomError(
            f"unsupported PhotometricInterpretation {photometric or '(none)'}: "
            f"expected {', '.join(MONOCHROME)} or RGB/YBR"
        )
    try:
        arr = ds.pixel_array
    except Exception as err:  # noqa: BLE001 - a missing pixel-data handler or corrupt pixel data
        raise DicomError(f"cannot decode the pixel data: {err}") from err
    bits = int(ds.get("BitsStored", 8) or 8)
    if photometric in MONOCHROME:
        if arr.ndim != 2:
            raise DicomError(f"grayscale DICOM with pixel array of shape {arr.shape}")
        values, lo, hi = display_values(ds, arr)
        gray = scale_to_uint8(values, lo, hi)
        rgb = np.repeat(gray[..., None], 3, axis=2)
    else:
        if arr.ndim != 3 or arr.shape[2] != 3:
            raise DicomError(f"colour DICOM with pixel array of shape {arr.shape}")
        rgb = arr if arr.dtype == np.uint8 else scale_to_uint8(arr, 0.0, float(2**bits - 1))
    return DicomImage(np.ascontiguousarray(rgb), photometric, bits)
