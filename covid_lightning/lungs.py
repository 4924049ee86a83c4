"""Lung masks predicted once per image by a trained :class:`LungSegmenter`, cached on disk.

The classifier can then see the lungs only (``data.lung_masks`` + :class:`covid_lightning.data.roi.LungRoi`).
Masks are written as ``<cache>/<checkpoint key>/<roi_mask_name(image)>`` (PNG 0/255 at the image's own
size), where the checkpoint key is the sha1 of the checkpoint's bytes: another checkpoint gets another
folder, an image newer than its mask is recomputed, everything else is reused (a second run costs nothing)::

    covid-lightning lungmasks --ckpt runs/unet_seed/version_0/checkpoints/last.ckpt --root DATA
    # -> prints the folder to pass as --data.lung_masks
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from covid_lightning.data.roi import roi_mask_name
from covid_lightning.data.scan import DatasetError, list_predict_images
from covid_lightning.data.transforms import ImageReadError, load_image
from covid_lightning.inference import load_checkpoint, preprocess
from covid_lightning.runtime import cache_dir

log = logging.getLogger(__name__)

CHECKPOINT_NOTE = "checkpoint.txt"


def default_cache_root() -> Path:
    """``$XDG_CACHE_HOME/covid_lightning/lung_masks`` (``~/.cache/...`` by default)."""
    return cache_dir("lung_masks")


def checkpoint_key(path: str | Path) -> str:
    """The first 16 hex digits of the sha1 of the checkpoint file's bytes."""
    digest = hashlib.sha1()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:16]


def _is_fresh(mask_path: Path, image_path: Path) -> bool:
    """The mask exists and is not older than the image."""
    try:
        return mask_path.stat().st_mtime_ns >= image_path.stat().st_mtime_ns
    except FileNotFoundError:
        return False


def _write_png(mask: np.ndarray, path: Path) -> None:
    """Write atomically (temporary file + rename): concurrent writers (DDP ranks) never leave a torn file."""
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp")
    Image.fromarray(mask).save(tmp, format="PNG")
    os.replace(tmp, path)


def _load_segmenter(segmenter_ckpt: str | Path, device: torch.device) -> torch.nn.Module:
    model = load_checkpoint(segmenter_ckpt, map_location=device)
    if model.task != "segmentation":
        raise TypeError(f"{segmenter_ckpt} is a {type(model).__name__} checkpoint, not a LungSegmenter one.")
    return model.to(device).eval()


def _batches(items: Sequence[Any], size: int) -> Iterable[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def predict_lung_masks(
    segmenter_ckpt: str | Path,
    image_paths: Iterable[str | Path],
    cache_root: str | Path | None = None,
    batch_size: int = 16,
    device: str | torch.device | None = None,
) -> Path:
    """Predict (once) and cache the lung mask of every image; return the mask folder.

    Same computation as :func:`covid_lightning.inference.segment`: eval preprocessing, sigmoid, bilinear
    resize to the image's own size, threshold. Images whose mask exists and is not older than the image
    are skipped (the checkpoint is not even loaded when nothing is left); unreadable images are skipped
    with a warning (the dataset's own screening reports them).

    Args:
        segmenter_ckpt: a :class:`LungSegmenter` checkpoint.
        image_paths: the images (duplicates are computed once).
        cache_root: parent of the per-checkpoint folders; None = :func:`default_cache_root`.
        batch_size: images per forward pass.
        device: None = CUDA when available, else the CPU.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    ckpt = Path(segmenter_ckpt).expanduser()
    if not ckpt.is_file():
        raise FileNotFoundError(f"Segmenter checkpoint {ckpt} does not exist.")
    out_dir = Path(cache_root).expanduser() if cache_root is not None else default_cache_root()
    out_dir = out_dir / checkpoint_key(ckpt)
    out_dir.mkdir(parents=True, exist_ok=True)

    todo: dict[str, Path] = {}
    total = 0
    for p in image_paths:
        p = Path(p).expanduser()
        name = roi_mask_name(p)
        if name in todo:
            continue
        total += 1
        if not _is_fresh(out_dir / name, p):
            todo[name] = p
    if not todo:
        log.info("Lung masks of all %d image(s) already in %s.", total, out_dir)
        return out_dir

    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = _load_segmenter(ckpt, dev)
    (out_dir / CHECKPOINT_NOTE).write_text(f"{ckpt.resolve()}\n")
    size = int(model.hparams.image_size)
    unreadable: list[Path] = []
    with torch.inference_mode():
        for chunk in _batches(list(todo.items()), batch_size):
            names, images = [], []
            for name, path in chunk:
                try:
                    images.append(load_image(path))
                except ImageReadError as err:
                    unreadable.append(path)
                    log.warning("Lung mask skipped: %s", err)
                    continue
                names.append(name)
            if not images:
                continue
            probs = model.probabilities(model(preprocess(images, size).to(dev)))
            for name, mask in zip(names, model.postprocess(probs, [image.shape[:2] for image in images])):
                _write_png(mask.astype(np.uint8) * 255, out_dir / name)
    log.info(
        "Lung masks: %d computed, %d reused, %d unreadable image(s) skipped -> %s",
        len(todo) - len(unreadable),
        total - len(todo),
        len(unreadable),
        out_dir,
    )
    return out_dir


def attach_lung_masks(
    datamodule: Any,
    segmenter_ckpt: str | Path,
    cache_root: str | Path | None = None,
    stage: str | None = None,
    batch_size: int = 16,
) -> Path:
    """Compute the lung masks of every image ``datamodule`` will use and set ``datamodule.hparams.lung_masks``.

    ``stage`` ``"predict"`` covers ``predict_root`` (the dataset root when it is unset); ``fit``,
    ``validate`` and ``test`` cover the dataset root (the demo data when ``root`` is None); None covers
    both. Returns the mask folder.
    """
    hp = datamodule.hparams
    predict_root = hp.get("predict_root")
    paths: list[Path] = []
    if stage == "predict" and predict_root is not None:
        paths += list_predict_images(predict_root)
    else:
        paths += [r.path for r in datamodule._source().records]  # the dataset root, or the manifest's files
        if stage is None and predict_root is not None:
            paths += list_predict_images(predict_root)
    folder = predict_lung_masks(segmenter_ckpt, paths, cache_root=cache_root, batch_size=batch_size)
    hp.lung_masks = str(folder)
    return folder


def main(argv: Sequence[str] | None = None) -> int:
    """``covid-lightning lungmasks``: predict and cache the lung masks of a folder; print the mask folder."""
    parser = argparse.ArgumentParser(
        prog="covid-lightning lungmasks",
        description="Predict the lung mask of every PNG/JPEG under --root (recursive; the ground-truth "
        "<Class>/masks/ of a Kaggle-layout dataset excluded) with a LungSegmenter checkpoint, once per image "
        "(cached), and print the folder to pass as --data.lung_masks.",
    )
    parser.add_argument("--ckpt", required=True, help="LungSegmenter checkpoint")
    parser.add_argument("--root", required=True, help="folder of images, e.g. a dataset root or a predict folder")
    parser.add_argument("--out", default=None, help=f"cache folder (default: {default_cache_root()})")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default=None, help="e.g. cpu, cuda, cuda:1 (default: cuda when available)")
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        paths = list_predict_images(args.root)
        if not paths:
            raise DatasetError(f"No PNG/JPEG images under {args.root}.")
        folder = predict_lung_masks(args.ckpt, paths, args.out, batch_size=args.batch_size, device=args.device)
    except (DatasetError, FileNotFoundError, TypeError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print("Pass this folder as --data.lung_masks (mode: --data.lung_roi crop|mask|crop_mask):", file=sys.stderr)
    print(folder, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
