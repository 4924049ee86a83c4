"""Small DICOM files written with pydicom's own dataset API (no fixture files in the repository)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def write_dicom(
    path: Path,
    pixels: np.ndarray,
    *,
    photometric: str = "MONOCHROME2",
    bits_stored: int = 12,
    rescale: tuple[float, float] | None = None,
    window: tuple[float, float] | None = None,
    voi_lut: tuple[int, int, list[int]] | None = None,
) -> Path:
    """A single-frame grayscale DICOM (16 bits allocated, unsigned) with the optional display attributes.

    Args:
        rescale: (slope, intercept), the modality LUT.
        window: (center, width), the VOI window.
        voi_lut: (first mapped value, bits per entry, entries), a VOI LUT Sequence.
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DigitalXRayImageStorageForPresentation
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.Rows, ds.Columns = (int(n) for n in pixels.shape)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    ds.PixelData = np.ascontiguousarray(pixels, dtype="<u2").tobytes()
    if rescale is not None:
        ds.RescaleSlope, ds.RescaleIntercept = rescale
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    if voi_lut is not None:
        first, bits, entries = voi_lut
        item = Dataset()
        item.add_new(0x00283002, "US", [len(entries), first, bits])  # LUT Descriptor
        item.add_new(0x00283006, "US", list(entries))  # LUT Data
        ds.VOILUTSequence = [item]
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def dicom_from_png(png: Path, path: Path, **kw: Any) -> Path:
    """The gray pixels of an 8-bit PNG as a 12-bit DICOM (x16), e.g. to mix DICOMs into a dataset."""
    from PIL import Image

    with Image.open(png) as im:
        gray = np.asarray(im.convert("L"), dtype=np.uint16) * 16
    return write_dicom(path, gray, **kw)
