"""PredictionWriter: ``lightning predict`` -> CSVs, lung masks and Grad-CAM overlays on disk.

What a run writes under ``output_dir`` (default: the run's log folder, e.g.
``runs/<name>/version_N/predict/version_M/``; ``<default_root_dir>/predictions`` without a logger).
Earlier predictions in an explicit ``output_dir`` are never replaced silently: the run refuses to start
unless ``overwrite: true``, which first removes the earlier CSVs, masks and overlays.

- classifier: ``predictions.csv`` with ``path`` (relative to ``data.predict_root`` when the image is
  under it, else absolute), ``predicted`` (class name), then one probability column per class;
  with ``gradcam: true`` also ``gradcam/<relative path>.png``, the Grad-CAM overlay of the predicted class;
- segmenter: ``masks/<relative path>.png``, a mode-L mask with values {0, 255} at the image's
  original size (probabilities resized bilinearly to (H, W), then thresholded at ``model.threshold``),
  and ``lung_area.csv`` with ``path``, ``mask_path`` (relative to ``output_dir``) and ``lung_fraction``
  (lung pixels / all pixels of that mask).

Output file names keep the input's sub-folders and always end in ``.png``; when two inputs would map
to the same name (``a.png`` and ``a.jpg``), the original suffix is kept (``a.jpg.png``). CSV rows are
sorted by ``path``.

``write_interval="batch"``: masks and overlays are written as each batch arrives (nothing image-sized
is kept in memory); the CSV rows are collected and written at the end of the predict epoch. With one
device the final CSVs are written directly. With several devices each rank writes its own shard
(``predictions.rank{R}.csv`` / ``lung_area.rank{R}.csv``) and its own images, then, after
``trainer.strategy.barrier()``, rank 0 merges the shards into the final CSVs (sorted by path,
duplicates dropped) and deletes them. On several nodes ``output_dir`` must be on a shared file system.
"""

from __future__ import annotations

import csv
import logging
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from PIL import Image

from covid_lightning.errors import UserError
from covid_lightning.modules.base import as_xray_module

log = logging.getLogger(__name__)

CLASSIFICATION_CSV = "predictions.csv"
SEGMENTATION_CSV = "lung_area.csv"
MASKS_DIR = "masks"
GRADCAM_DIR = "gradcam"


def shard_path(final: str | Path, rank: int) -> Path:
    """``predictions.csv`` -> ``predictions.rank{rank}.csv`` (same folder)."""
    final = Path(final)
    return final.with_name(f"{final.stem}.rank{rank}{final.suffix}")


def write_csv(path: str | Path, header: Sequence[str], rows: Sequence[Sequence[Any]], key: int = 0) -> Path:
    """Write ``rows`` under ``header``, sorted by column ``key``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(sorted(rows, key=lambda r: str(r[key])))
    return path


def merge_csv_shards(shards: Sequence[str | Path], output: str | Path, key: str = "path", remove: bool = True) -> Path:
    """Merge per-rank CSV shards (same header) into ``output``, sorted by ``key``; duplicate keys are kept
    once. ``remove`` deletes the shards afterwards. A missing shard is an error (not a silent gap)."""
    header: list[str] | None = None
    rows: dict[str, list[str]] = {}
    for shard in shards:
        shard = Path(shard)
        if not shard.is_file():
            raise FileNotFoundError(
                f"Prediction shard {shard} is missing: every rank must write to a folder rank 0 can read."
            )
        with open(shard, newline="", encoding="utf-8") as f:
            reader = csv.reader(f)
            shard_header = next(reader, None)
            if shard_header is None:
                continue
            if header is None:
                header = shard_header
            elif shard_header != header:
                raise ValueError(f"{shard} has columns {shard_header}, expected {header}.")
            index = header.index(key)
            for row in reader:
                rows.setdefault(row[index], row)
    if header is None:
        raise ValueError(f"No header in any of {list(map(str, shards))}.")
    out = write_csv(output, header, list(rows.values()), key=header.index(key))
    if remove:
        for shard in shards:
            Path(shard).unlink(missing_ok=True)
    return out


class PredictionWriter(BasePredictionWriter):
    """Write predictions of an :class:`XRayClassifier` or a :class:`LungSegmenter` to disk (see the module doc).

    Args:
        output_dir: where to write; None = the run's log folder (``trainer.log_dir``).
        gradcam: classifier only: also write a Grad-CAM overlay per image for its predicted class.
        overwrite: replace earlier predictions found in ``output_dir`` (otherwise the run refuses).
    """

    def __init__(self, output_dir: str | None = None, gradcam: bool = False, overwrite: bool = False) -> None:
        super().__init__(write_interval="batch")
        self.output_dir = output_dir
        self.gradcam = gradcam
        self.overwrite = overwrite
        self.out_dir: Path | None = None
        #: the final CSV written by the last predict run (set on rank 0)
        self.csv_path: Path | None = None
        self._root: Path | None = None
        self._collisions: set[str] = set()
        self._rows: list[list[Any]] = []
        self._header: list[str] = []
        self._classifier = False

    # paths -----------------------------------------------------------------------------------
    def relative_path(self, path: str | Path) -> str:
        """POSIX path of an input relative to the predict root when under it, else absolute."""
        p = Path(path).expanduser().resolve()
        if self._root is not None:
            try:
                return p.relative_to(self._root).as_posix()
            except ValueError:
                pass
        return p.as_posix()

    @staticmethod
    def _png_key(rel: str) -> str:
        return Path(rel).with_suffix(".png").as_posix().lstrip("/")

    def output_relpath(self, rel: str) -> Path:
        """Where an input's mask/overlay goes under ``masks/`` or ``gradcam/``: same sub-folders, ``.png``."""
        key = self._png_key(rel)
        if key in self._collisions:
            key = rel.lstrip("/") + ".png"
        return Path(key)

    def _scan_collisions(self, trainer: L.Trainer) -> None:
        """Output names that two inputs share (``a.png`` + ``a.jpg``): deterministic on every rank."""
        self._collisions = set()
        loaders = trainer.predict_dataloaders
        for loader in loaders if isinstance(loaders, (list, tuple)) else [loaders]:
            seen: set[str] = set()
            for p in getattr(getattr(loader, "dataset", None), "paths", None) or []:
                key = self._png_key(self.relative_path(p))
                (self._collisions if key in seen else seen).add(key)

    def _clear_earlier(self, trainer: L.Trainer) -> None:
        """Refuse to mix with earlier predictions in ``out_dir`` (or remove them with ``overwrite``)."""
        earlier = [self.out_dir / n for n in (CLASSIFICATION_CSV, SEGMENTATION_CSV, MASKS_DIR, GRADCAM_DIR)]
        earlier = [p for p in earlier if p.exists()]
        if earlier and not self.overwrite:
            raise UserError(
                f"{self.out_dir} already holds predictions ({', '.join(p.name for p in earlier)}). Give another "
                "--predictions.output_dir, or --predictions.overwrite true to replace them."
            )
        if earlier and trainer.is_global_zero:
            for path in earlier:
                shutil.rmtree(path) if path.is_dir() else path.unlink()
            log.info("Removed earlier predictions in %s (overwrite).", self.out_dir)
        trainer.strategy.barrier("prediction_writer_cleared")

    # hooks -----------------------------------------------------------------------------------
    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        log_dir = trainer.log_dir  # a collective call: all ranks
        default = Path(log_dir) if trainer.loggers and log_dir else Path(trainer.default_root_dir) / "predictions"
        self.out_dir = Path(self.output_dir).expanduser() if self.output_dir else default
        self._clear_earlier(trainer)
        root = getattr(getattr(trainer.datamodule, "hparams", None), "predict_root", None)
        self._root = Path(root).expanduser().resolve() if root else None
        if self._root is not None and self._root.is_file():  # one image: paths relative to its folder
            self._root = self._root.parent
        self._classifier = as_xray_module(pl_module, "write predictions of").task == "classification"
        if self.gradcam and not self._classifier:
            raise ValueError("PredictionWriter(gradcam=True) needs a classifier; this model has no class_names.")
        if self._classifier:
            self._header = ["path", "predicted", *pl_module.class_names]
        else:
            self._header = ["path", "mask_path", "lung_fraction"]
        self._rows = []
        self.csv_path = None
        self._scan_collisions(trainer)
        self.out_dir.mkdir(parents=True, exist_ok=True)

    def write_on_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        prediction: dict[str, Any],
        batch_indices: Sequence[int] | None,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        paths = list(prediction["path"])
        probs = prediction["probs"]
        if self._classifier:
            self._write_classification(pl_module, paths, probs)
        else:
            sizes = prediction.get("size")
            if sizes is None:
                raise ValueError("Segmentation predictions need 'size' (the original H, W) to write masks.")
            self._write_segmentation(pl_module, paths, probs, sizes)

    def _write_classification(self, pl_module: L.LightningModule, paths: list[str], probs: torch.Tensor) -> None:
        names = list(pl_module.class_names)
        probs = probs.float().cpu()
        predicted = probs.argmax(dim=-1).tolist()
        for path, p, k in zip(paths, probs.tolist(), predicted):
            self._rows.append([self.relative_path(path), names[k], *(f"{v:.6f}" for v in p)])
        if self.gradcam:
            from covid_lightning.gradcam import gradcam_batch, overlay_heatmap
            from covid_lightning.inference import to_rgb_uint8

            rgbs = [to_rgb_uint8(p) for p in paths]
            for path, rgb, heat in zip(paths, rgbs, gradcam_batch(pl_module, rgbs, predicted)):
                out = self.out_dir / GRADCAM_DIR / self.output_relpath(self.relative_path(path))
                out.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(overlay_heatmap(rgb, heat)).save(out)

    def _write_segmentation(
        self, pl_module: L.LightningModule, paths: list[str], probs: torch.Tensor, sizes: torch.Tensor
    ) -> None:
        sizes = [tuple(s) for s in torch.as_tensor(sizes).tolist()]
        for path, mask in zip(paths, pl_module.postprocess(probs, sizes)):
            mask = mask.astype(np.uint8) * 255
            rel = self.relative_path(path)
            mask_rel = Path(MASKS_DIR) / self.output_relpath(rel)
            out = self.out_dir / mask_rel
            out.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(mask).save(out)  # uint8 (H, W) -> mode L
            self._rows.append([rel, mask_rel.as_posix(), f"{float((mask > 0).mean()):.6f}"])

    def on_predict_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        final = self.out_dir / (CLASSIFICATION_CSV if self._classifier else SEGMENTATION_CSV)
        if trainer.world_size == 1:
            self.csv_path = write_csv(final, self._header, self._rows)
        else:
            write_csv(shard_path(final, trainer.global_rank), self._header, self._rows)
            trainer.strategy.barrier("prediction_writer_shards")
            if trainer.is_global_zero:
                shards = [shard_path(final, r) for r in range(trainer.world_size)]
                self.csv_path = merge_csv_shards(shards, final)
            trainer.strategy.barrier("prediction_writer_merged")
        if trainer.is_global_zero:
            log.info("Predictions written to %s", self.csv_path)
        self._rows = []
