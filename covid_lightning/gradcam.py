"""Grad-CAM heatmaps for the classifier, with the maintained ``grad-cam`` package (``pytorch_grad_cam``)::

    from covid_lightning import XRayClassifier
    from covid_lightning.gradcam import gradcam, save_gradcam

    model = XRayClassifier.load_from_checkpoint("runs/.../best.ckpt")
    heatmap = gradcam(model, "COVID-1.png")  # float32 (299, 299) in [0, 1], for the predicted class
    save_gradcam(model, "COVID-1.png", "COVID-1.gradcam.png", target_class="Normal")

Layer: by default the backbone's last conv block *after* its BatchNorm + ReLU6 (timm MobileNetV2
``bn2`` = Keras ``Conv_1_bn``/``out_relu``), i.e. exactly the feature map the global average pooling
and the head see. The conv output (``conv_head``) is before the per-channel BN scale/shift and the
ReLU6: its activations are not what the head is fed (negative values the ReLU6 drops, channels whose
BN scale is negative flip sign), so its maps are a distorted version of the same evidence.

Gradients: the model runs on float [0, 1] inputs that require grad, and every parameter is
temporarily frozen. Gradients then reach the target layer through the input, whatever the
``trainable`` regime (with a ``head``-only model and a uint8 input, nothing before the head requires
grad and ``pytorch_grad_cam`` fails with ``'NoneType' object has no attribute 'shape'``), and no
parameter's ``.grad`` is created or changed. It also works inside ``Trainer.predict`` (inference mode).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.image import show_cam_on_image
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn

from covid_lightning.inference import ImageLike, preprocess, to_rgb_uint8


def default_target_layer(model: nn.Module) -> nn.Module:
    """The last conv block of the classifier's backbone: ``bn2`` (conv + BN + ReLU6) when it exists, else
    the backbone's last ``Conv2d``."""
    net = getattr(model, "net", model)
    backbone = getattr(net, "backbone", net)
    layer = getattr(backbone, "bn2", None)
    if isinstance(layer, nn.Module):
        return layer
    convs = [m for m in backbone.modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ValueError(f"No convolution in {type(backbone).__name__}: pass layer= explicitly.")
    return convs[-1]


def class_index(model: nn.Module, target_class: int | str) -> int:
    """A class index or name -> the class index (checked against ``model.class_names``)."""
    names = list(getattr(model, "class_names", []))
    if isinstance(target_class, str):
        if target_class not in names:
            raise ValueError(f"Unknown class {target_class!r}; the model's classes are {names}.")
        return names.index(target_class)
    index = int(target_class)
    if names and not 0 <= index < len(names):
        raise ValueError(f"Class index {index} out of range for {len(names)} classes {names}.")
    return index


def _resize(heatmap: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(h, w) float map -> (H, W) bilinear, clipped to [0, 1], float32."""
    height, width = size
    if heatmap.shape != (height, width):
        heatmap = cv2.resize(heatmap.astype(np.float32), (width, height), interpolation=cv2.INTER_LINEAR)
    return np.clip(np.nan_to_num(heatmap, nan=0.0), 0.0, 1.0).astype(np.float32)


def gradcam_batch(
    model: nn.Module,
    images: Sequence[ImageLike],
    target_classes: Sequence[int | str | None] | None = None,
    layer: nn.Module | None = None,
) -> list[np.ndarray]:
    """Grad-CAM heatmaps for several images in one forward/backward pass.

    Each heatmap is float32 (H, W) in [0, 1] at its own image's original size. ``target_classes``: one
    index/name per image (None = the predicted class), or None for the predicted class of every image.
    The model's train/eval mode, ``requires_grad`` flags and parameter gradients are left as they were.
    """
    rgbs = [to_rgb_uint8(im) for im in images]
    if target_classes is None:
        target_classes = [None] * len(rgbs)
    if len(target_classes) != len(rgbs):
        raise ValueError(f"{len(target_classes)} target classes for {len(rgbs)} images.")
    layer = default_target_layer(model) if layer is None else layer
    params = list(model.parameters())
    saved = [(p, p.requires_grad, p.grad) for p in params]
    was_training = model.training
    device = params[0].device if params else torch.device("cpu")
    try:
        with torch.inference_mode(False), torch.enable_grad(), torch.autocast(device.type, enabled=False):
            for p in params:
                p.requires_grad_(False)
            # same preprocessing as classify(); float [0, 1] input so gradients can flow from it
            x = (preprocess(rgbs, model.hparams.image_size).to(device).float() / 255.0).requires_grad_(True)
            with GradCAM(model=model, target_layers=[layer]) as cam:  # puts the model in eval mode
                targets = None  # all None: the package targets each image's predicted class
                if any(t is not None for t in target_classes):
                    if any(t is None for t in target_classes):
                        with torch.no_grad():
                            predicted = model(x).argmax(dim=-1).tolist()
                    else:
                        predicted = [None] * len(rgbs)
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
    model: nn.Module,
    image: ImageLike,
    target_class: int | str | None = None,
    layer: nn.Module | None = None,
) -> np.ndarray:
    """Grad-CAM heatmap of ``image`` for ``target_class`` (index or name; None = the predicted class).

    Returns float32 (H, W) in [0, 1] at the input image's original size. ``layer`` defaults to
    :func:`default_target_layer` (the last conv block after BN + ReLU6).
    """
    return gradcam_batch(model, [image], [target_class], layer=layer)[0]


def overlay_heatmap(image_rgb_uint8: np.ndarray, heatmap: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend a jet-coloured heatmap over an RGB uint8 image (``alpha`` = heatmap weight) -> uint8 RGB.

    The heatmap is resized to the image if needed; gray (H, W) images are accepted.
    """
    rgb = to_rgb_uint8(np.asarray(image_rgb_uint8))
    heat = _resize(np.asarray(heatmap, dtype=np.float32), rgb.shape[:2])
    return show_cam_on_image(rgb.astype(np.float32) / 255.0, heat, use_rgb=True, image_weight=1.0 - alpha)


def save_gradcam(model: nn.Module, image: ImageLike, path: str | Path, target_class: int | str | None = None) -> Path:
    """Write the Grad-CAM overlay of ``image`` (original size, PNG or any PIL format by suffix) to ``path``."""
    rgb = to_rgb_uint8(image)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(overlay_heatmap(rgb, gradcam(model, rgb, target_class))).save(path)
    return path
