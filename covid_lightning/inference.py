"""Checkpoint -> ready-to-use predictions for a path, a PIL image, an array or a tensor.

The eval preprocessing is rebuilt from the checkpoint alone (``image_size`` in the hyper-parameters,
normalisation inside the model), with the very function validation uses
(:func:`covid_lightning.data.transforms.eval_transform`)::

    from covid_lightning import XRayClassifier
    from covid_lightning.inference import classify

    model = XRayClassifier.load_from_checkpoint("runs/.../best.ckpt")
    classify(model, "COVID-1.png")  # {"COVID": 0.91, "Lung_Opacity": 0.03, ...}

    segmenter = LungSegmenter.load_from_checkpoint("runs/.../best.ckpt")
    mask = segment(segmenter, "COVID-1.png")  # bool (299, 299): the lungs at the image's own size
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from covid_lightning.data.transforms import eval_transform, load_image, to_rgb_array

ImageLike = str | Path | Image.Image | np.ndarray | torch.Tensor


def to_rgb_uint8(image: ImageLike) -> np.ndarray:
    """Any supported image input -> HxWx3 uint8 RGB array.

    Tensors are CHW (or HW), uint8 0..255 or float in [0, 1]; arrays are HxW or HxWxC uint8.
    """
    if isinstance(image, (str, Path)):
        return load_image(image)
    if isinstance(image, Image.Image):
        return to_rgb_array(image)
    if isinstance(image, torch.Tensor):
        t = image.detach().cpu()
        if t.is_floating_point():
            t = (t.clamp(0, 1) * 255).round().to(torch.uint8)
        arr = t.numpy()
        arr = arr if arr.ndim == 2 else np.moveaxis(arr, 0, -1)
    else:
        arr = np.asarray(image)
    if arr.dtype != np.uint8:
        raise TypeError(f"Expected uint8 image data, got {arr.dtype}.")
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    if arr.shape[-1] == 4:
        arr = arr[..., :3]
    return np.ascontiguousarray(arr)


def preprocess(images: Sequence[ImageLike], image_size: int) -> torch.Tensor:
    """Images -> the uint8 (N, 3, S, S) batch the model expects, exactly as in validation."""
    transform = eval_transform(image_size)
    return torch.stack([transform(image=to_rgb_uint8(im))["image"] for im in images])


@torch.inference_mode()
def classify(model: torch.nn.Module, image: ImageLike | Sequence[ImageLike]) -> dict[str, float] | list[dict]:
    """Class probabilities keyed by class name, for one image or a list of images."""
    single = not isinstance(image, (list, tuple))
    images = [image] if single else list(image)
    model.eval()
    batch = preprocess(images, model.hparams.image_size).to(model.device)
    out = model.postprocess(model.probabilities(model(batch)))
    return out[0] if single else out


@torch.inference_mode()
def segment(
    model: torch.nn.Module, image: ImageLike, return_probs: bool = False
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Binary lung mask (H, W) of bools at the input's original size; with ``return_probs`` also the
    float32 probability map at that size."""
    rgb = to_rgb_uint8(image)
    model.eval()
    batch = preprocess([rgb], model.hparams.image_size).to(model.device)
    probs = model.probabilities(model(batch))[0]
    if not return_probs:
        return model.postprocess(probs[None], [rgb.shape[:2]])[0]
    probs_np = model.resize_probs(probs, rgb.shape[:2])
    return probs_np > model.threshold, probs_np


def load_checkpoint(path: str | Path, map_location: Any = "cpu") -> torch.nn.Module:
    """Load any covid-lightning checkpoint as the model class that wrote it."""
    from covid_lightning.modules.base import MODEL_CLASS_KEY, model_class

    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    class_path = checkpoint.get(MODEL_CLASS_KEY) or checkpoint.get("hyper_parameters", {}).get("_class_path", "")
    cls = model_class(class_path)
    if cls is None:
        raise TypeError(f"{path} is not a covid-lightning model checkpoint (model class: {class_path or '?'}).")
    return cls.load_from_checkpoint(path, map_location=map_location)
