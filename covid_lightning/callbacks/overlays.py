"""The lab's "visual predictions": image | ground truth | prediction overlay, for fixed validation images."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from PIL import Image
from torchvision.utils import draw_segmentation_masks, make_grid

from covid_lightning.inference import predict_batch


def overlay_grid(images: torch.Tensor, masks: torch.Tensor, preds: torch.Tensor) -> np.ndarray:
    """Images, masks and predictions -> an HxWx3 uint8 grid: image, ground truth (green), prediction (red)."""
    tiles = []
    for image, truth, pred in zip(images.cpu().to(torch.uint8), masks.cpu() > 0.5, preds.cpu() > 0.5):
        tiles += [image, draw_segmentation_masks(image, truth, 0.45, (0, 200, 0))]
        tiles.append(draw_segmentation_masks(image, pred, 0.45, (230, 40, 40)))
    return make_grid(tiles, nrow=3, padding=0).permute(1, 2, 0).numpy()


class SegmentationOverlays(L.Callback):
    """After each validation epoch, write ``<log_dir>/overlays/epoch_NNN.png`` and log it to TensorBoard.

    Args:
        num_images: rows in the grid.
        every_n_epochs: write every n-th epoch (the last epoch is always written).
    """

    def __init__(self, num_images: int = 6, every_n_epochs: int = 1) -> None:
        self.num_images, self.every_n_epochs = num_images, every_n_epochs
        self.last_path: Path | None = None

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        log_dir = trainer.log_dir  # every rank must ask (it may synchronise across ranks)
        epoch = trainer.current_epoch + 1
        due = epoch % self.every_n_epochs == 0 or epoch >= (trainer.max_epochs or 0)
        if trainer.sanity_checking or not trainer.is_global_zero or not due:
            return
        dataset = getattr(trainer.val_dataloaders, "dataset", None)
        samples = [dataset[i] for i in range(min(self.num_images, len(dataset) if dataset is not None else 0))]
        if not samples:
            return
        images, masks = (torch.stack([s[key] for s in samples]) for key in ("image", "mask"))
        preds = torch.from_numpy(np.stack(predict_batch(pl_module, images)))[:, None]
        grid = overlay_grid(images, masks, preds)
        folder = Path(log_dir or trainer.default_root_dir) / "overlays"
        folder.mkdir(parents=True, exist_ok=True)
        self.last_path = folder / f"epoch_{trainer.current_epoch:03d}.png"
        Image.fromarray(grid).save(self.last_path)
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image("val/overlays", grid, trainer.current_epoch, dataformats="HWC")
