"""Grad-CAM: original-size heatmaps in [0, 1], class-dependent, frozen backbones, overlays and captioned figures."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from covid_lightning import XRayClassifier
from covid_lightning.gradcam import (
    default_target_layer,
    gradcam,
    gradcam_batch,
    gradcam_figure,
    overlay_heatmap,
    save_gradcam,
)


@pytest.fixture(scope="module")
def xray(demo_root: Path) -> Image.Image:
    """A demo X-ray resized to 180x240 (H x W), not square."""
    with Image.open(demo_root / "COVID" / "images" / "COVID-1.png") as im:
        return im.resize((240, 180), Image.BILINEAR)


def _fresh(trainable: str) -> XRayClassifier:
    torch.manual_seed(0)
    return XRayClassifier(pretrained=False, trainable=trainable, image_size=128)


def _check(heatmap: np.ndarray, size: tuple[int, int]) -> None:
    assert heatmap.shape == size and heatmap.dtype == np.float32
    assert np.isfinite(heatmap).all() and heatmap.min() >= 0.0 and heatmap.max() <= 1.0


def test_checkpoint_heatmap_at_original_size(classifier_ckpt: Path, xray: Image.Image):
    model = XRayClassifier.load_from_checkpoint(classifier_ckpt)
    assert default_target_layer(model) is model.net.backbone.bn2
    heatmap = gradcam(model, xray)
    _check(heatmap, (180, 240))
    assert heatmap.max() > 0.5  # min-max scaled: not an empty map
    by_name = gradcam(model, xray, target_class=model.class_names[2])
    np.testing.assert_allclose(by_name, gradcam(model, xray, target_class=2))
    with pytest.raises(ValueError, match="Unknown class"):
        gradcam(model, xray, target_class="Flu")


def test_heatmaps_differ_between_classes(xray: Image.Image):
    model = _fresh("all")
    maps = gradcam_batch(model, [xray] * 4, target_classes=[0, 1, 2, 3])
    for m in maps:
        _check(m, (180, 240))
    assert max(np.abs(maps[0] - m).max() for m in maps[1:]) > 0.05
    np.testing.assert_allclose(maps[1], gradcam(model, xray, target_class=1), atol=1e-5)


def test_frozen_backbone_head_only(xray: Image.Image):
    model = _fresh("head")
    assert not any(p.requires_grad for p in model.net.backbone.parameters())
    model.train()
    flags = [p.requires_grad for p in model.parameters()]
    with torch.inference_mode():  # as inside Trainer.predict
        heatmap = gradcam(model, np.asarray(xray), target_class="Normal")
    _check(heatmap, (180, 240))
    assert heatmap.max() > 0.5 and heatmap.std() > 0  # gradients reached the last conv block
    # nothing left behind: flags, gradients, train mode (frozen BN still in eval)
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())
    assert model.training and not model.net.backbone.bn2.training


def test_overlay_and_save(classifier_ckpt: Path, xray: Image.Image, tmp_path: Path):
    model = XRayClassifier.load_from_checkpoint(classifier_ckpt)
    rgb = np.asarray(xray.convert("RGB"))
    overlay = overlay_heatmap(rgb, np.linspace(0, 1, 16, dtype=np.float32).reshape(4, 4))
    assert overlay.shape == (180, 240, 3) and overlay.dtype == np.uint8
    assert not np.array_equal(overlay, rgb)
    # the anatomy stays visible: untouched where there is no heat, tinted (not painted over) where it is hottest
    np.testing.assert_array_equal(overlay_heatmap(rgb, np.zeros((4, 4), np.float32)), rgb)
    hot = overlay_heatmap(rgb, np.ones((4, 4), np.float32)).astype(float)
    assert not np.array_equal(hot, rgb) and np.corrcoef(hot.mean(-1).ravel(), rgb.mean(-1).ravel())[0, 1] > 0.99
    assert hot.mean(-1).std() > 0.3 * rgb.mean(-1).std()
    path = save_gradcam(model, xray, tmp_path / "sub" / "cam.png", target_class=0)
    with Image.open(path) as im:  # the captioned figure with its colour bar
        assert im.mode in ("RGB", "RGBA") and min(im.size) > 300
        assert np.asarray(im.convert("L")).std() > 10


def test_gradcam_figure_caption_and_colour_bar(xray: Image.Image):
    fig = gradcam_figure(xray, np.linspace(0, 1, 16, dtype=np.float32).reshape(4, 4), "COVID-1.png\npredicted COVID")
    image, bar = fig.axes
    assert image.get_title() == "COVID-1.png\npredicted COVID"
    assert bar.get_ylabel() == "Grad-CAM relevance, 0-1" and bar.get_ylim() == (0.0, 1.0)
