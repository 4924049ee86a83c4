"""Lung ROI: crop/mask geometry, fallback, and the mask-folder loader."""

from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from covid_lightning.data.roi import LungRoi, apply_roi, roi_mask_name
from covid_lightning.data.scan import DatasetError
from covid_lightning.data.transforms import load_image, load_mask

H, W = 200, 300


@pytest.fixture
def image() -> np.ndarray:
    """Random non-zero pixels, so every zero in an output comes from masking."""
    return np.random.default_rng(0).integers(1, 256, size=(H, W, 3), dtype=np.uint8)


def rect_mask(y0: int, y1: int, x0: int, x1: int, shape: tuple[int, int] = (H, W)) -> np.ndarray:
    mask = np.zeros(shape, np.uint8)
    mask[y0:y1, x0:x1] = 1
    return mask


def test_roi_mask_name_is_stable_and_path_based(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    name = roi_mask_name(tmp_path / "a.png")
    assert name == roi_mask_name("a.png") == roi_mask_name(tmp_path / "x" / ".." / "a.png")
    assert name.endswith(".png") and len(name) == 40 + 4
    assert roi_mask_name(tmp_path / "b.png") != name


@pytest.mark.parametrize("scale", [1, 2])  # a mask at the image size, or at half of it (resized nearest)
def test_crop_is_the_bbox_grown_by_margin(image: np.ndarray, scale: int) -> None:
    mask = rect_mask(50 // scale, 110 // scale, 100 // scale, 200 // scale, (H // scale, W // scale))
    out = apply_roi(image, mask, "crop", margin=0.1)  # bbox 60 x 100 -> +6 rows, +10 columns per side
    np.testing.assert_array_equal(out, image[44:116, 90:210])
    np.testing.assert_array_equal(apply_roi(image, mask, "crop", margin=0.0), image[50:110, 100:200])


def test_crop_margin_is_clipped_at_the_borders(image: np.ndarray) -> None:
    mask = rect_mask(0, 60, 250, 300)  # touches the top and the right edge
    out = apply_roi(image, mask, "crop", margin=0.5)  # +30 rows, +25 columns per side, clipped
    np.testing.assert_array_equal(out, image[0:90, 225:300])
    full = apply_roi(image, rect_mask(10, 190, 10, 290), "crop", margin=1.0)
    np.testing.assert_array_equal(full, image)


def test_mask_zeroes_outside_the_lungs(image: np.ndarray) -> None:
    mask = rect_mask(50, 110, 100, 200)
    out = apply_roi(image, mask, "mask", margin=0.0)
    assert out.shape == image.shape
    np.testing.assert_array_equal(out[50:110, 100:200], image[50:110, 100:200])
    outside = np.ones((H, W), bool)
    outside[50:110, 100:200] = False
    assert not out[outside].any()


def test_mask_margin_dilates_by_image_size(image: np.ndarray) -> None:
    mask = rect_mask(50, 110, 100, 200)
    out = apply_roi(image, mask, "mask", margin=0.1)  # radius 20 rows (0.1 x 200), 30 columns (0.1 x 300)
    kept = out.any(axis=2)
    assert kept[50:110, 100:200].all()
    np.testing.assert_array_equal(out[kept], image[kept])
    # along the axes the dilation reaches exactly the radius
    assert kept[30, 150] and not kept[29, 150]  # top: 50 - 20
    assert kept[129, 150] and not kept[130, 150]  # bottom: 109 + 20
    assert kept[80, 70] and not kept[80, 69]  # left: 100 - 30
    assert kept[80, 229] and not kept[80, 230]  # right: 199 + 30
    # elliptical: the far corner of the grown box is not kept
    assert not kept[30, 70] and not kept[129, 229]
    assert not kept[:30].any() and not kept[130:].any() and not kept[:, :70].any() and not kept[:, 230:].any()


def test_crop_mask_is_mask_then_crop(image: np.ndarray) -> None:
    mask = rect_mask(50, 110, 100, 200)
    out = apply_roi(image, mask, "crop_mask", margin=0.1)
    expected = apply_roi(apply_roi(image, mask, "mask", margin=0.1), mask, "crop", margin=0.1)
    np.testing.assert_array_equal(out, expected)
    assert out.shape == (72, 120, 3)
    # two lungs: the crop spans both, the gap between them (beyond the dilation) is zeroed
    lungs = rect_mask(50, 150, 20, 80) | rect_mask(50, 150, 220, 280)
    out = apply_roi(image, lungs, "crop_mask", margin=0.05)  # crop +5 rows, +13 columns; dilation 10 x 15
    assert out.shape == (110, 286, 3)  # rows 45:155, columns 7:293
    kept = out.any(axis=2)
    left, right = 79 + 15 - 7, 220 - 15 - 7  # last/first dilated column of each lung, in crop coordinates
    assert kept[:, left].any() and kept[:, right].any() and not kept[:, left + 1 : right].any()


@pytest.mark.parametrize("mode", ["crop", "mask", "crop_mask"])
def test_empty_or_tiny_mask_returns_the_image(image: np.ndarray, mode: str) -> None:
    assert apply_roi(image, np.zeros((H, W), np.uint8), mode) is image
    tiny = rect_mask(0, 10, 0, 59)  # 590 px < 1% of 60,000
    assert apply_roi(image, tiny, mode) is image


def test_bad_arguments(image: np.ndarray, tmp_path: Path) -> None:
    mask = rect_mask(50, 110, 100, 200)
    with pytest.raises(ValueError, match="crop_mask"):
        apply_roi(image, mask, "lungs")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="margin"):
        apply_roi(image, mask, "crop", margin=-0.1)
    with pytest.raises(DatasetError, match="lungmasks"):
        LungRoi(tmp_path / "absent")


def test_lung_roi_missing_mask_names_the_image(tmp_path: Path, image: np.ndarray) -> None:
    roi = LungRoi(tmp_path, "crop")
    with pytest.raises(DatasetError) as err:
        roi(image, tmp_path / "COVID-7.png")
    message = str(err.value)
    assert "COVID-7.png" in message and "covid-lightning lungmasks" in message


def test_lung_roi_with_ground_truth_masks(demo_root: Path, tmp_path: Path) -> None:
    images = sorted((demo_root / "COVID" / "images").glob("*.png"))[:2]
    for path in images:  # the demo's ground-truth masks (256 px) stand in for predicted ones
        shutil.copy(demo_root / "COVID" / "masks" / path.name, tmp_path / roi_mask_name(path))
    roi = LungRoi(tmp_path, "crop", margin=0.05)
    for path in images:
        image = load_image(path)
        mask = cv2.resize(load_mask(demo_root / "COVID" / "masks" / path.name), image.shape[1::-1], interpolation=0)
        rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
        y0, y1, x0, x1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
        dy, dx = round(0.05 * (y1 - y0)), round(0.05 * (x1 - x0))
        expected = image[max(0, y0 - dy) : y1 + dy, max(0, x0 - dx) : x1 + dx]
        np.testing.assert_array_equal(roi(image, path), expected)
    assert (roi.applied, roi.fallbacks) == (2, 0)


def test_lung_roi_counts_fallbacks(tmp_path: Path, image: np.ndarray) -> None:
    import pickle

    from PIL import Image

    path = tmp_path / "img.png"
    Image.fromarray(np.zeros((H, W), np.uint8)).save(tmp_path / roi_mask_name(path))
    roi = pickle.loads(pickle.dumps(LungRoi(tmp_path, "crop_mask")))  # DataLoader workers get a copy
    assert roi(image, path) is image
    assert (roi.applied, roi.fallbacks) == (0, 1)
