"""Lung masks predicted once per image by a :class:`LungSegmenter` and cached, for ``data.lung_masks``."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jsonargparse.typing import PositiveInt
from PIL import Image

from covid_lightning.data.image_cache import atomic_path
from covid_lightning.data.roi import roi_mask_name
from covid_lightning.data.scan import list_predict_images
from covid_lightning.data.transforms import ImageReadError, load_image
from covid_lightning.inference import input_spec, load_checkpoint, predict_batch, preprocess
from covid_lightning.runtime import cache_dir

log = logging.getLogger(__name__)


def checkpoint_key(path: str | Path) -> str:
    """The first 16 hex digits of the sha1 of the checkpoint file's bytes."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha1").hexdigest()[:16]


def _is_fresh(mask: Path, image: Path) -> bool:
    """The mask was written after the image last changed: its content (mtime) or its file (ctime: a copy that
    keeps an older mtime, ``cp -p``, unzip, rsync, still gets a new ctime)."""
    try:
        st = image.stat()
        return mask.stat().st_mtime_ns >= max(st.st_mtime_ns, st.st_ctime_ns)
    except FileNotFoundError:
        return False


def predict_lung_masks(
    segmenter_ckpt: str | Path,
    image_paths: Iterable[str | Path],
    cache_root: str | Path | None = None,
    batch_size: int = 16,
    device: str | None = None,
) -> Path:
    """Predict and cache the lung mask of every image not cached yet; return the mask folder."""
    ckpt = Path(segmenter_ckpt).expanduser()
    if not ckpt.is_file():
        raise FileNotFoundError(f"Segmenter checkpoint {ckpt} does not exist.")
    out_dir = (Path(cache_root).expanduser() if cache_root else cache_dir("lung_masks")) / checkpoint_key(ckpt)
    out_dir.mkdir(parents=True, exist_ok=True)
    images = {roi_mask_name(p): p for p in (Path(q).expanduser() for q in image_paths)}
    todo = [(name, path) for name, path in images.items() if not _is_fresh(out_dir / name, path)]
    if not todo:
        log.info("Lung masks of all %d image(s) already in %s.", len(images), out_dir)
        return out_dir
    model = load_checkpoint(ckpt, map_location=device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if model.task != "segmentation":
        raise TypeError(f"{ckpt} is a {type(model).__name__} checkpoint, not a LungSegmenter one.")
    (out_dir / "checkpoint.txt").write_text(f"{ckpt.resolve()}\n")
    skipped = 0
    for start in range(0, len(todo), batch_size):
        names, rgbs = [], []
        for name, path in todo[start : start + batch_size]:
            try:
                rgbs.append(load_image(path))
                names.append(name)
            except ImageReadError as err:
                skipped += 1
                log.warning("Lung mask skipped: %s", err)
        if rgbs:
            batch = preprocess(rgbs, *input_spec(model))
            for name, mask in zip(names, predict_batch(model.eval(), batch, [rgb.shape[:2] for rgb in rgbs])):
                with atomic_path(out_dir / name) as tmp:  # DDP ranks never see a torn file
                    Image.fromarray(mask.astype(np.uint8) * 255).save(tmp, format="PNG")
    done, reused = len(todo) - skipped, len(images) - len(todo)
    log.info("Lung masks: %d computed, %d reused, %d unreadable image(s) skipped -> %s", done, reused, skipped, out_dir)
    return out_dir


def attach_lung_masks(
    datamodule: Any, segmenter_ckpt: str | Path, cache_root: str | Path | None = None, stage: str | None = None
) -> Path:
    """Compute the lung masks ``datamodule`` will use at ``stage`` and set ``hparams.lung_masks`` to their folder."""
    folder = predict_lung_masks(segmenter_ckpt, datamodule.image_paths(stage), cache_root=cache_root)
    datamodule.hparams.lung_masks = str(folder)
    return folder


def lungmasks(
    ckpt: Path, root: Path, out: Path | None = None, batch_size: PositiveInt = 16, device: str | None = None
) -> int:
    """Predict (once, cached) the lung mask of every image under ROOT and print the folder for --data.lung_masks.

    Args:
        ckpt: LungSegmenter checkpoint.
        root: folder of images, e.g. a dataset root or a predict folder.
        out: cache folder (default: ~/.cache/covid_lightning/lung_masks).
        batch_size: images per forward pass.
        device: e.g. cpu, cuda, cuda:1 (default: cuda when available).
    """
    folder = predict_lung_masks(ckpt, list_predict_images(root), out, batch_size=batch_size, device=device)
    log.info("Pass this folder as --data.lung_masks (mode: --data.lung_roi crop|mask|crop_mask):")
    print(folder, flush=True)
    return 0
