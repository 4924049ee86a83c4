"""The OpenCV decode path gives exactly what PIL gives, in every mode, for files, bytes and masks."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from covid_lightning.data.streaming import decode_image, decode_mask
from covid_lightning.data.transforms import ImageReadError, load_image, load_mask, to_rgb_array

RNG = np.random.default_rng(0)
PIXELS = RNG.integers(0, 256, (37, 41, 3), dtype=np.uint8)


def _image(mode: str) -> Image.Image:
    if mode == "I;16":
        return Image.fromarray(PIXELS[..., 0].astype(np.uint16) * 257)
    if mode == "RGBA":
        return Image.fromarray(np.dstack([PIXELS, PIXELS[..., :1]]))
    return Image.fromarray(PIXELS).convert(mode)


CASES = [
    *[("png", m) for m in ("L", "RGB", "RGBA", "P", "LA", "1", "I;16")],
    *[("jpg", m) for m in ("L", "RGB", "CMYK")],
    *[("tif", m) for m in ("RGBA", "I;16")],  # JPEG/TIFF/BMP go through PIL
    ("bmp", "RGB"),
]


@pytest.mark.parametrize(("ext", "mode"), CASES, ids=[f"{e}-{m}" for e, m in CASES])
def test_load_image_matches_pil(tmp_path: Path, ext: str, mode: str):
    path = tmp_path / f"x.{ext}"
    _image(mode).save(path)
    with Image.open(path) as im:
        expected = to_rgb_array(im)
    got = load_image(path)
    assert got.dtype == np.uint8 and got.shape == (37, 41, 3)
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(decode_image(path.read_bytes()), expected)


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "zero-one", "colour", "I;16"])
def test_load_mask_matches_pil(tmp_path: Path, mode: str):
    """Gray, gray-as-RGB (the Kaggle masks), 0/1, coloured and 16-bit masks threshold as PIL's gray does."""
    gray = (PIXELS[..., 0] > 100).astype(np.uint8)
    pixels = gray if mode == "zero-one" else gray * 255
    im = Image.fromarray(pixels)
    if mode in ("RGB", "RGBA"):
        im = im.convert(mode)
    elif mode == "colour":  # a red lung on a faint blue background: only PIL's luma weights decide
        im = Image.fromarray(np.dstack([pixels, np.zeros_like(pixels), np.full_like(pixels, 40)]))
    elif mode == "I;16":
        im = Image.fromarray(pixels.astype(np.uint16) * 257)
    path = tmp_path / "m.png"
    im.save(path)
    with Image.open(path) as reference:
        pil_gray = np.asarray(reference.convert("L"))
    expected = (pil_gray > (127 if pil_gray.max() > 1 else 0)).astype(np.uint8)
    if mode in ("L", "RGB", "RGBA", "zero-one"):
        np.testing.assert_array_equal(expected, gray)
    np.testing.assert_array_equal(load_mask(path), expected)
    np.testing.assert_array_equal(decode_mask(path.read_bytes()), expected)


def test_unreadable_file_names_itself(tmp_path: Path):
    path = tmp_path / "broken.png"
    buffer = io.BytesIO()
    _image("L").save(buffer, format="PNG")
    path.write_bytes(buffer.getvalue()[:60])  # truncated
    with pytest.raises(ImageReadError, match="broken.png"):
        load_image(path)
    with pytest.raises(ImageReadError, match="broken.png"):
        decode_image(path.read_bytes(), "broken.png")


def test_intensity_standardisation_and_acquisition_augment():
    """``equalize`` spreads a narrow histogram, ``clahe`` changes it locally; unknown names are refused."""
    from covid_lightning.data.transforms import build_transform, eval_transform

    rng = np.random.default_rng(0)
    gray = rng.integers(100, 140, (120, 100), dtype=np.uint8)  # a low-contrast film
    image = np.repeat(gray[..., None], 3, axis=2)
    plain, equal, clahe = (eval_transform(64, i)(image=image)["image"] for i in ("none", "equalize", "clahe"))
    assert int(plain.max()) - int(plain.min()) < 45 and int(equal.max()) - int(equal.min()) > 200
    assert not torch.equal(plain, clahe) and torch.equal(equal[0], equal[1])
    augment = build_transform(64, train=True, augment="acquisition")
    shapes = {tuple(augment(image=image)["image"].shape) for _ in range(10)}
    assert shapes == {(3, 64, 64)}
    with pytest.raises(ValueError, match="Unknown intensity 'gamma'"):
        eval_transform(64, "gamma")
    with pytest.raises(ValueError, match="acquisition"):
        build_transform(64, train=True, augment="heavy")
