"""Checkpoint -> predictions for paths, PIL images, arrays or tensors: the one prediction path."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from covid_lightning.data.roi import cut_to_lungs
from covid_lightning.data.transforms import eval_transform, load_image, to_rgb_array
from covid_lightning.errors import UserError

ImageLike = str | Path | Image.Image | np.ndarray | torch.Tensor


def to_rgb_uint8(image: ImageLike) -> np.ndarray:
    """Any supported input -> HxWx3 uint8 RGB; tensors are CHW or HW, uint8 or float in [0, 1]."""
    if isinstance(image, (str, Path)):
        return load_image(image)
    if isinstance(image, Image.Image):
        return to_rgb_array(image)
    if isinstance(image, torch.Tensor):
        t = image.detach().cpu()
        t = (t.clamp(0, 1) * 255).round().to(torch.uint8) if t.is_floating_point() else t
        image = t.numpy() if t.dim() == 2 else np.moveaxis(t.numpy(), 0, -1)
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        raise TypeError(f"Expected uint8 image data, got {arr.dtype}.")
    arr = arr[..., None] if arr.ndim == 2 else arr
    return np.ascontiguousarray(np.repeat(arr, 3, axis=-1) if arr.shape[-1] == 1 else arr[..., :3])


def preprocess(images: Sequence[ImageLike], image_size: int, intensity: str = "none") -> torch.Tensor:
    """Images -> the uint8 (N, 3, S, S) batch the model expects, exactly as in validation."""
    transform = eval_transform(image_size, intensity)
    return torch.stack([transform(image=to_rgb_uint8(im))["image"] for im in images])


def input_spec(model: Any) -> tuple[int, str]:
    """A model's input size and intensity standardisation (from its ``describe()``): what :func:`preprocess`
    needs to feed it."""
    info = model.describe()
    if cut_to_lungs(info):
        raise UserError(
            f"This {info['kind']} was trained on lung regions (lung_roi {info['lung_roi']}): whole images would "
            "give it other inputs than it learned from. Predict with `lightning predict --config <its run>/config.yaml "
            "--ckpt_path CKPT --data.predict_root IMAGES`: the config's data.lung_segmenter finds the lungs first."
        )
    return int(info["image_size"]), str(info["intensity"])


@torch.inference_mode()
def predict_batch(model: Any, batch: torch.Tensor, sizes: Sequence[tuple[int, int]] | None = None) -> list[Any]:
    """A preprocessed batch -> what users get per image: class probabilities, or masks at ``sizes`` (H, W)."""
    return model.postprocess(model.probabilities(model(batch.to(model.device))), sizes)


def predict(model: Any, images: Sequence[ImageLike]) -> list[Any]:
    """:func:`predict_batch` of images in any supported form, masks at each image's own size."""
    rgbs = [to_rgb_uint8(im) for im in images]
    batch = preprocess(rgbs, *input_spec(model))
    return predict_batch(model.eval(), batch, [rgb.shape[:2] for rgb in rgbs])


def classify(model: Any, image: ImageLike | Sequence[ImageLike]) -> dict[str, float] | list[dict[str, float]]:
    """Class probabilities keyed by class name, for one image or a list of images."""
    single = not isinstance(image, (list, tuple))
    out = predict(model, [image] if single else image)
    return out[0] if single else out


def segment(model: Any, image: ImageLike, return_probs: bool = False) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Boolean lung mask (H, W) at the image's own size; ``return_probs`` adds the float32 probability map."""
    if not return_probs:
        return predict(model, [image])[0]
    rgb = to_rgb_uint8(image)
    with torch.inference_mode():
        probs = model.eval().probabilities(model(preprocess([rgb], *input_spec(model)).to(model.device)))
    return model.postprocess(probs, [rgb.shape[:2]])[0], model.resize_probs(probs[0], rgb.shape[:2])


def load_checkpoint(path: str | Path, map_location: Any = "cpu") -> Any:
    """Load any covid-lightning checkpoint as the model class that wrote it (nothing outside the package)."""
    from covid_lightning.checkpointing import load_checkpoint_file
    from covid_lightning.modules.base import MODEL_CLASS_KEY, model_class

    checkpoint = load_checkpoint_file(path)
    class_path = checkpoint.get(MODEL_CLASS_KEY) or checkpoint.get("hyper_parameters", {}).get("_class_path", "")
    cls = model_class(class_path)
    if cls is None:
        raise TypeError(f"{path} is not a covid-lightning model checkpoint (model class: {class_path or '?'}).")
    return cls.load_from_checkpoint(path, map_location=map_location)
