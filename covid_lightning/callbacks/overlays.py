"""The lab's "visual predictions": image | ground truth | prediction overlay, for fixed validation images."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from PIL import Image

GT_COLOR = np.array([0, 200, 0], dtype=np.float32)  # ground truth: green
PRED_COLOR = np.array([230, 40, 40], dtype=np.float32)  # prediction: red


def _overlay(gray_rgb: np.ndarray, mask: np.ndarray, color: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    out = gray_rgb.astype(np.float32).copy()
    m = mask.astype(bool)
    out[m] = (1 - alpha) * out[m] + alpha * color
    return out.clip(0, 255).astype(np.uint8)


def overlay_grid(images: torch.Tensor, masks: torch.Tensor, preds: torch.Tensor) -> np.ndarray:
    """uint8 (N,3,H,W) images, {0,1} (N,1,H,W) masks and predictions -> an HxWx3 grid, one row per image.

    Columns: the image, the ground-truth mask over it (green), the predicted mask over it (red).
    """
    rows = []
    for img, gt, pr in zip(images, masks, preds):
        rgb = img.permute(1, 2, 0).cpu().numpy().astype(np.uint8)
        gt_np, pr_np = gt[0].cpu().numpy() > 0.5, pr[0].cpu().numpy() > 0.5
        rows.append(np.concatenate([rgb, _overlay(rgb, gt_np, GT_COLOR), _overlay(rgb, pr_np, PRED_COLOR)], axis=1))
    return np.concatenate(rows, axis=0)


class SegmentationOverlays(L.Callback):
    """After each validation epoch, write ``<log_dir>/overlays/epoch_NNN.png`` and log it to TensorBoard.

    The same ``num_images`` validation images (the first ones of the val set) are shown every time.

    Args:
        num_images: rows in the grid.
        every_n_epochs: write every n-th epoch (the last epoch is always written).
    """

    def __init__(self, num_images: int = 6, every_n_epochs: int = 1) -> None:
        self.num_images = num_images
        self.every_n_epochs = every_n_epochs
        self.last_path: Path | None = None

    def _batch(self, trainer: L.Trainer) -> dict[str, torch.Tensor] | None:
        loader = trainer.val_dataloaders
        dataset = getattr(loader, "dataset", None)
        if dataset is None or len(dataset) == 0:
            return None
        samples = [dataset[i] for i in range(min(self.num_images, len(dataset)))]
        return {
            "image": torch.stack([s["image"] for s in samples]),
            "mask": torch.stack([s["mask"] for s in samples]),
        }

    @torch.no_grad()
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        log_dir = trainer.log_dir  # every rank must ask (it may synchronise across ranks)
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        last = trainer.current_epoch + 1 >= (trainer.max_epochs or 0)
        if (trainer.current_epoch + 1) % self.every_n_epochs and not last:
            return
        batch = self._batch(trainer)
        if batch is None:
            return
        probs = pl_module(batch["image"].to(pl_module.device)).float().sigmoid()
        threshold = getattr(pl_module, "threshold", 0.5)
        grid = overlay_grid(batch["image"], batch["mask"], (probs > threshold).float())
        out_dir = Path(log_dir or trainer.default_root_dir) / "overlays"
        out_dir.mkdir(parents=True, exist_ok=True)
        self.last_path = out_dir / f"epoch_{trainer.current_epoch:03d}.png"
        Image.fromarray(grid).save(self.last_path)
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image("val/overlays", grid, trainer.current_epoch, dataformats="HWC")
