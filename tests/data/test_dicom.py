"""DICOM input: pydicom's modality and VOI LUTs, MONOCHROME1 inverted, 8-bit scaling as a 16-bit PNG; one decode
for training, predict, inference and the server; a bad DICOM named or skipped like a bad PNG."""

from __future__ import annotations

import asyncio
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pydicom = pytest.importorskip("pydicom")

from pydicom.pixels import apply_modality_lut, apply_voi_lut  # noqa: E402

from covid_lightning import CLASSES, RadiographyDataModule  # noqa: E402
from covid_lightning.data.hygiene import check_dataset, inspect_image  # noqa: E402
from covid_lightning.data.scan import DatasetError, list_predict_images, scan_dataset  # noqa: E402
from covid_lightning.data.transforms import ImageReadError, decode_rgb, load_image, to_rgb_array  # noqa: E402
from covid_lightning.inference import preprocess, to_rgb_uint8  # noqa: E402
from tests.helpers.dicom import dicom_from_png, write_dicom  # noqa: E402

RNG = np.random.default_rng(0)
PIXELS = RNG.integers(0, 4096, (12, 10)).astype(np.uint16)  # 12-bit stored values


def expected_gray(path: Path, lo: float, hi: float) -> np.ndarray:
    """pydicom's own pipeline (apply_modality_lut -> apply_voi_lut), MONOCHROME1 inverted within the output range
    ``lo..hi``, then the 8-bit scaling of a 16-bit PNG (``(v - lo) / (hi - lo) * 255``, rounded, clipped)."""
    ds = pydicom.dcmread(path)
    values = np.asarray(apply_voi_lut(apply_modality_lut(ds.pixel_array, ds), ds), dtype=np.float64)
    if ds.PhotometricInterpretation == "MONOCHROME1":
        values = lo + hi - values
    return np.clip((values - lo) / (hi - lo) * 255 + 0.5, 0, 255).astype(np.uint8)


def assert_gray_rgb(rgb: np.ndarray, gray: np.ndarray) -> None:
    assert rgb.dtype == np.uint8 and rgb.shape == (*gray.shape, 3)
    for c in range(3):
        np.testing.assert_array_equal(rgb[..., c], gray)


@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
def test_rescale_and_window(tmp_path: Path, photometric: str):
    slope, intercept = 2.0, -1024.0
    path = write_dicom(
        tmp_path / "x.dcm", PIXELS, photometric=photometric, rescale=(slope, intercept), window=(1500, 3000)
    )
    lo, hi = intercept, (2**12 - 1) * slope + intercept  # the stored range through the rescale: the window's output
    gray = expected_gray(path, lo, hi)
    assert_gray_rgb(load_image(path), gray)
    assert_gray_rgb(decode_rgb(path.read_bytes()), gray)  # bytes (the server, a stream) decode the same
    # the window clips: rescaled values below it are black (white for MONOCHROME1), above it white (black)
    rescaled = PIXELS * slope + intercept
    dark, bright = (0, 255) if photometric == "MONOCHROME2" else (255, 0)
    assert (gray[rescaled <= 0] == dark).all() and (gray[rescaled > 3000] == bright).all()
    assert len(np.unique(gray)) > 10


def test_monochrome1_is_the_inverse_of_monochrome2(tmp_path: Path):
    mono2 = load_image(write_dicom(tmp_path / "2.dcm", PIXELS, rescale=(1.0, 0.0)))
    mono1 = load_image(write_dicom(tmp_path / "1.dcm", PIXELS, photometric="MONOCHROME1", rescale=(1.0, 0.0)))
    assert np.abs(mono1.astype(int) + mono2.astype(int) - 255).max() <= 1  # rounding


@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
def test_voi_lut_sequence(tmp_path: Path, photometric: str):
    entries = [min(65535, int(40 * v) % 65536) for v in range(4096)]  # a 16-bit VOI LUT over the 12-bit values
    path = write_dicom(tmp_path / "x.dcm", PIXELS, photometric=photometric, voi_lut=(0, 16, entries))
    gray = expected_gray(path, 0.0, 65535.0)  # the LUT's own bit depth is the output range
    assert_gray_rgb(load_image(path), gray)


def test_no_lut_scales_the_bit_depth_like_a_16_bit_png(tmp_path: Path):
    pixels = RNG.integers(0, 65536, (9, 11)).astype(np.uint16)
    dicom = load_image(write_dicom(tmp_path / "x.dcm", pixels, bits_stored=16))
    Image.fromarray(pixels).save(tmp_path / "x.png")
    with Image.open(tmp_path / "x.png") as im:
        png = to_rgb_array(im)
    np.testing.assert_array_equal(dicom, png)
    np.testing.assert_array_equal(dicom, load_image(tmp_path / "x.png"))


def test_one_decode_for_training_predict_inference_and_the_server(tmp_path: Path):
    """The dataset (load_image), classify()/segment() (to_rgb_uint8), predict listing and the server's decode
    give the same pixels; a DICOM without .dcm in its name is recognised by its contents."""
    from covid_lightning.serve import RAW_CONTENT_TYPES, decode_image

    path = write_dicom(tmp_path / "in" / "x.dcm", PIXELS, photometric="MONOCHROME1", window=(2000, 2500))
    nameless = tmp_path / "in" / "scan_0001"
    shutil.copy(path, nameless)
    rgb = load_image(path)
    np.testing.assert_array_equal(to_rgb_uint8(path), rgb)
    np.testing.assert_array_equal(load_image(nameless), rgb)
    assert list_predict_images(tmp_path / "in") == [path]  # listed by suffix
    assert list_predict_images(nameless) == [nameless]  # a single file is checked by content
    served = decode_image(path.read_bytes(), 16, "none")
    assert "application/dicom" in RAW_CONTENT_TYPES
    assert (served["height"], served["width"]) == PIXELS.shape
    np.testing.assert_array_equal(served["image"], preprocess([rgb], 16)[0].numpy())


def test_the_server_takes_application_dicom(tmp_path: Path):
    """The HTTP dependency accepts ``Content-Type: application/dicom`` and refuses a corrupt DICOM with a 400."""
    from fastapi import HTTPException
    from starlette.requests import Request

    from covid_lightning.serve import HttpConfig, read_image_request

    def request(body: bytes, content_type: str) -> Request:
        app = type("App", (), {})()
        app.state = type("State", (), {"covid_lightning": HttpConfig(image_size=16, intensity="none")})()
        scope = {"type": "http", "method": "POST", "path": "/predict", "app": app,
                 "headers": [(b"content-type", content_type.encode())]}  # fmt: skip
        chunks = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive() -> dict:
            return chunks.pop(0) if chunks else {"type": "http.disconnect"}

        return Request(scope, receive)

    data = write_dicom(tmp_path / "x.dcm", PIXELS, window=(2000, 2500)).read_bytes()
    out = asyncio.run(read_image_request(request(data, "application/dicom")))
    assert (out["height"], out["width"]) == PIXELS.shape
    with pytest.raises(HTTPException) as err:
        asyncio.run(read_image_request(request(data[: len(data) - 50], "application/dicom")))
    assert err.value.status_code == 400 and "DICOM" in err.value.detail


def _bad_dicom(path: Path) -> Path:
    """A DICOM whose pixel data is cut short (the header reads, the pixels do not)."""
    data = write_dicom(path, PIXELS).read_bytes()
    path.write_bytes(data[: len(data) - 40])
    return path


def test_a_bad_dicom_is_named(tmp_path: Path):
    bad = _bad_dicom(tmp_path / "bad.dcm")
    with pytest.raises(ImageReadError, match=r"bad\.dcm"):
        load_image(bad)
    info = inspect_image(bad)
    assert not info.ok and "DICOM" in info.problem, info
    garbage = tmp_path / "garbage.dcm"
    garbage.write_bytes(b"\x00" * 128 + b"DICM" + b"\x01" * 30)
    assert not inspect_image(garbage).ok


@pytest.fixture
def dicom_dataset(demo_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The demo data with every COVID image replaced by a MONOCHROME1 12-bit DICOM, and one bad DICOM."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    root = tmp_path / "COVID-19_Radiography_Dataset"
    shutil.copytree(demo_root, root)
    for png in sorted((root / "COVID" / "images").glob("*.png")):
        dicom_from_png(png, png.with_suffix(".dcm"), photometric="MONOCHROME1", rescale=(1.0, 0.0))
        png.unlink()
    _bad_dicom(root / "Normal" / "images" / "Normal-bad.dcm")
    return root


def test_dicom_in_the_kaggle_layout(dicom_dataset: Path, caplog: pytest.LogCaptureFixture):
    """Scanned like PNGs; a bad one stops the run naming it, or is skipped and counted; check-data reports them."""
    records = scan_dataset(dicom_dataset)
    assert sum(r.path.suffix == ".dcm" for r in records) == 9
    with pytest.raises(DatasetError, match=r"Normal-bad\.dcm: (corrupt|truncated) DICOM"):
        RadiographyDataModule(root=str(dicom_dataset), image_size=32, num_workers=0).setup("fit")
    with caplog.at_level(logging.WARNING):
        dm = RadiographyDataModule(root=str(dicom_dataset), image_size=32, num_workers=0, on_bad_file="skip")
        dm.setup("fit")
    assert "Skipped 1 unreadable file(s)" in caplog.text and "Normal-bad.dcm" in caplog.text
    kept = [r for split in dm.records.values() for r in split]
    assert sum(r.path.suffix == ".dcm" for r in kept) == 8 and dm.class_names == CLASSES
    sample = dm.datasets["train"][0]
    assert sample["image"].shape == (3, 32, 32)
    report = check_dataset(dicom_dataset, workers=1)
    assert report["images"]["formats"]["DICOM"] == 8 and report["images"]["modes"]["MONOCHROME1 12-bit"] == 8
    assert [u["path"] for u in report["unreadable"]] == ["Normal/images/Normal-bad.dcm"]
    assert not report["trainable"]
