"""PredictionWriter: ``lightning predict`` -> ``predictions.csv`` (and Grad-CAM figures) for a classifier,
``masks/*.png`` and ``lung_area.csv`` (and contour overlays) for a segmenter; rank 0 gathers the CSV rows of every rank.
"""

from __future__ import annotations

import csv
import logging
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from matplotlib.figure import Figure
from PIL import Image

from covid_lightning.callbacks.overlays import overlay_figure
from covid_lightning.data.roi import cut_to_lungs
from covid_lightning.errors import UserError
from covid_lightning.inference import to_rgb_uint8
from covid_lightning.modules.base import as_xray_module
from covid_lightning.plotting import save_figure

log = logging.getLogger(__name__)

CSV_NAMES = {"classification": "predictions.csv", "segmentation": "lung_area.csv"}
FOLDERS = (MASKS_DIR, GRADCAM_DIR, OVERLAYS_DIR) = ("masks", "gradcam", "overlays")


def _png_name(rel: str) -> str:
    return Path(rel).with_suffix(".png").as_posix().lstrip("/")


class PredictionWriter(BasePredictionWriter):
    """Write the predictions of an :class:`XRayClassifier` or a :class:`LungSegmenter`.

    Args:
        output_dir: where to write; None = the run's log folder (``<default_root_dir>/predictions`` without one).
        gradcam: classifier only: also write ``gradcam/<image>.png``, the Grad-CAM of the predicted class over the
            image, titled with the file name, the class and its probability (as in the CSV), with a colour bar.
        overlays: segmenter only: also write ``overlays/<image>.png``, the predicted lung contour on the image,
            titled with the file name.
        overwrite: replace earlier predictions found in ``output_dir`` (otherwise the run refuses).
    """

    def __init__(
        self, output_dir: str | None = None, gradcam: bool = False, overlays: bool = False, overwrite: bool = False
    ) -> None:
        super().__init__(write_interval="batch")
        self.output_dir, self.gradcam, self.overlays, self.overwrite = output_dir, gradcam, overlays, overwrite
        self.out_dir: Path | None = None
        self.csv_path: Path | None = None  # the CSV of the last predict run (rank 0)
        self._root: Path | None = None
        self._names: dict[str, str] = {}
        self._rows: list[list[Any]] = []
        self._header: list[str] = []
        self._task = ""

    def relative_path(self, path: str | Path) -> str:
        """POSIX path of an input relative to the predict root when under it, else absolute."""
        p = Path(path).expanduser().resolve()
        return p.relative_to(self._root).as_posix() if self._root and p.is_relative_to(self._root) else p.as_posix()

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        info = pl_module.describe()
        if self.gradcam and cut_to_lungs(info):
            raise UserError(
                f"--predictions.gradcam explains whole images, and this model was trained on lung regions (lung_roi "
                f"{info['lung_roi']}): predict without it (the CSV holds the lung-region predictions)."
            )
        log_dir = trainer.log_dir  # a collective call: all ranks
        default = Path(log_dir) if trainer.loggers and log_dir else Path(trainer.default_root_dir) / "predictions"
        self.out_dir = Path(self.output_dir).expanduser() if self.output_dir else default
        earlier = [self.out_dir / n for n in (*CSV_NAMES.values(), *FOLDERS) if (self.out_dir / n).exists()]
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
        root = trainer.datamodule.hparams.get("predict_root") if trainer.datamodule is not None else None
        self._root = Path(root).expanduser().resolve() if root else None
        if self._root is not None and self._root.is_file():  # one image: paths relative to its folder
            self._root = self._root.parent
        self._task = as_xray_module(pl_module, "write predictions of").task
        if self.gradcam and self._task != "classification":
            raise ValueError("PredictionWriter(gradcam=True) needs a classifier; this model has no class_names.")
        if self.overlays and self._task != "segmentation":
            raise ValueError("PredictionWriter(overlays=True) needs a segmenter; for a classifier use gradcam=True.")
        classes = info.get("class_names", [])
        self._header = ["path", "predicted", *classes] if classes else ["path", "mask_path", "lung_fraction"]
        self._rows, self.csv_path = [], None
        # each input's output name; inputs that would share one (a.png, a.jpg) keep their suffix
        loaders = trainer.predict_dataloaders
        rels = [
            self.relative_path(p)
            for loader in (loaders if isinstance(loaders, (list, tuple)) else [loaders])
            for p in getattr(getattr(loader, "dataset", None), "paths", None) or []
        ]
        shared = Counter(_png_name(r) for r in rels)
        self._names = {r: r.lstrip("/") + ".png" if shared[_png_name(r)] > 1 else _png_name(r) for r in rels}
        self.out_dir.mkdir(parents=True, exist_ok=True)

    def _save_image(self, folder: str, rel: str, image: np.ndarray | Figure) -> str:
        """Write an image or a figure as ``<folder>/<rel's output name>``; returns that path relative to ``out_dir``."""
        out = Path(folder) / self._names.get(rel, _png_name(rel))
        (self.out_dir / out).parent.mkdir(parents=True, exist_ok=True)
        if isinstance(image, Figure):
            save_figure(image, self.out_dir / out)
        else:
            Image.fromarray(image).save(self.out_dir / out)
        return out.as_posix()

    def write_on_batch_end(self, trainer: L.Trainer, pl_module: Any, prediction: dict[str, Any], *_: Any) -> None:
        sizes = prediction.get("size")
        sizes = [tuple(s) for s in torch.as_tensor(sizes).tolist()] if sizes is not None else None
        paths = list(prediction["path"])
        outputs = pl_module.postprocess(prediction["probs"], sizes)
        rgbs = [to_rgb_uint8(p) if self.gradcam or self.overlays else None for p in paths]
        heats = [None] * len(paths)
        if self.gradcam:  # for the class of the CSV, captioned with its probability there
            from covid_lightning.gradcam import gradcam_batch, gradcam_figure

            heats = gradcam_batch(pl_module, rgbs, [max(out, key=out.get) for out in outputs])
        for path, out, rgb, heat in zip(paths, outputs, rgbs, heats):
            rel, name = self.relative_path(path), Path(path).name
            if self._task == "classification":
                predicted = max(out, key=out.get)
                self._rows.append([rel, predicted, *(f"{v:.6f}" for v in out.values())])
                if self.gradcam:
                    caption = f"{name}\npredicted {predicted} (p {out[predicted]:.3f})"
                    self._save_image(GRADCAM_DIR, rel, gradcam_figure(rgb, heat, caption))
            else:
                mask_path = self._save_image(MASKS_DIR, rel, out.astype(np.uint8) * 255)  # uint8 (H, W): mode L
                self._rows.append([rel, mask_path, f"{float(out.mean()):.6f}"])
                if self.overlays:
                    self._save_image(OVERLAYS_DIR, rel, overlay_figure([rgb], [out], names=[name]))

    def on_predict_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        rows = self._rows
        if trainer.world_size > 1:
            parts: list[Any] = [None] * trainer.world_size
            torch.distributed.all_gather_object(parts, rows)
            rows = [row for part in parts for row in part]
        if trainer.is_global_zero:
            unique = {str(row[0]): row for row in rows}  # the distributed sampler repeats inputs to even out ranks
            self.csv_path = self.out_dir / CSV_NAMES[self._task]
            with open(self.csv_path, "w", newline="", encoding="utf-8") as f:
                csv.writer(f).writerows([self._header, *(unique[key] for key in sorted(unique))])
            log.info("Predictions written to %s", self.csv_path)
        self._rows = []
