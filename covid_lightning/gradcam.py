"""Grad-CAM heatmaps for the classifier (``pytorch_grad_cam``) on the backbone's last conv block.

Inputs require grad while every parameter is frozen, so it works whatever the ``trainable`` regime.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn

from covid_lightning.inference import ImageLike, classify, input_spec, preprocess, to_rgb_uint8
from covid_lightning.plotting import image_panels, save_figure


def default_target_layer(model: nn.Module) -> nn.Module:
    """The backbone's ``bn2`` (last conv + BN + ReLU6) when it has one, else its last ``Conv2d``."""
    backbone = model.net.backbone
    bn2 = getattr(backbone, "bn2", None)
    return bn2 if isinstance(bn2, nn.Module) else [m for m in backbone.modules() if isinstance(m, nn.Conv2d)][-1]


def class_index(model: nn.Module, target_class: int | str) -> int:
    """A class index or name -> the class index (checked against ``model.class_names``)."""
    names = list(model.class_names)
    index = names.index(target_class) if target_class in names else target_class
    if isinstance(index, str) or not 0 <= int(index) < len(names):
        raise ValueError(f"Unknown class {target_class!r}; the model's classes are {names}.")
    return int(index)


def _resize(heatmap: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(h, w) map -> float32 (H, W) in [0, 1], bilinear."""
    heatmap = cv2.resize(heatmap.astype(np.float32), (size[1], size[0]), interpolation=cv2.INTER_LINEAR)
    return np.clip(np.nan_to_num(heatmap, nan=0.0), 0.0, 1.0)


def gradcam_batch(
    model: nn.Module,
    images: Sequence[ImageLike],
    target_classes: Sequence[int | str | None] | None = None,
    layer: nn.Module | None = None,
) -> list[np.ndarray]:
    """Grad-CAM heatmaps, float32 (H, W) in [0, 1] at each image's size, for ``target_classes`` (None: predicted)."""
    rgbs = [to_rgb_uint8(im) for im in images]
    target_classes = [None] * len(rgbs) if target_classes is None else list(target_classes)
    if len(target_classes) != len(rgbs):
        raise ValueError(f"{len(target_classes)} target classes for {len(rgbs)} images.")
    params = list(model.parameters())
    saved = [(p, p.requires_grad, p.grad) for p in params]
    was_training = model.training
    try:
        with torch.inference_mode(False), torch.enable_grad(), torch.autocast(model.device.type, enabled=False):
            for p in params:
                p.requires_grad_(False)
            x = (preprocess(rgbs, *input_spec(model)).to(model.device).float() / 255).requires_grad_(True)
            with GradCAM(model=model, target_layers=[layer or default_target_layer(model)]) as cam:  # -> eval mode
                targets = None  # the package's default: each image's predicted class
                if any(t is not None for t in target_classes):
                    with torch.no_grad():
                        predicted = model(x).argmax(dim=-1).tolist()
                    indices = [p if t is None else class_index(model, t) for t, p in zip(target_classes, predicted)]
                    targets = [ClassifierOutputTarget(i) for i in indices]
                maps = cam(input_tensor=x, targets=targets)
    finally:
        for p, flag, grad in saved:
            p.requires_grad_(flag)
            p.grad = grad
        model.train(was_training)
    return [_resize(m, rgb.shape[:2]) for m, rgb in zip(maps, rgbs)]


def gradcam(
    model: nn.Module, image: ImageLike, target_class: int | str | None = None, layer: nn.Module | None = None
) -> np.ndarray:
    """Grad-CAM heatmap of ``image`` for ``target_class`` (index or name; None: the predicted class)."""
    return gradcam_batch(model, [image], [target_class], layer=layer)[0]


def overlay_heatmap(image: np.ndarray, heatmap: np.ndarray, alpha: float = 0.6, cmap: str = "inferno") -> np.ndarray:
    """The heatmap (resized to the image) in ``cmap`` over an RGB or gray uint8 image -> uint8 RGB; each pixel's
    opacity is ``alpha`` x its heat, so the anatomy stays visible and is untouched where the heat is 0."""
    rgb = to_rgb_uint8(np.asarray(image)).astype(np.float32)
    heat = _resize(np.asarray(heatmap), rgb.shape[:2])
    weight = alpha * heat[..., None]
    return (rgb * (1 - weight) + 255 * colormaps[cmap](heat)[..., :3] * weight).round().astype(np.uint8)


def gradcam_figure(image: ImageLike, heatmap: np.ndarray, title: str, cmap: str = "inferno") -> Figure:
    """The :func:`overlay_heatmap` of ``image`` titled ``title``, with a colour bar of the relevance scale."""
    overlay = overlay_heatmap(to_rgb_uint8(image), heatmap, cmap=cmap)
    fig, [ax] = image_panels([overlay], [title], 1, size=4.5)
    fig.set_size_inches(5.6, 4.5 * overlay.shape[0] / overlay.shape[1] + 0.9)  # the image's own aspect, no margins
    fig.colorbar(ScalarMappable(Normalize(0, 1), cmap), ax=ax, label="Grad-CAM relevance, 0-1", shrink=0.9)
    return fig


def save_gradcam(model: nn.Module, image: ImageLike, path: str | Path, target_class: int | str | None = None) -> Path:
    """Write the Grad-CAM figure of ``image`` for ``target_class`` (None: the predicted class), captioned with the
    class and its probability, to ``path`` (format by suffix)."""
    rgb = to_rgb_uint8(image)
    probs = classify(model, rgb)
    name = max(probs, key=probs.get) if target_class is None else model.class_names[class_index(model, target_class)]
    title = f"{Path(image).name}\n" if isinstance(image, (str, Path)) else ""
    heatmap = gradcam(model, rgb, name)
    return save_figure(gradcam_figure(rgb, heatmap, f"{title}Grad-CAM for {name} (p {probs[name]:.3f})"), path)
