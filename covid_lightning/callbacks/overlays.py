"""The lab's "visual predictions": truth and predicted lung contours on the image, for fixed validation images."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from PIL import Image

from covid_lightning.inference import ImageLike, predict_batch, to_rgb_uint8
from covid_lightning.plotting import image_panels, save_figure

#: contour colours: ground truth, prediction
TRUTH, PREDICTION = "lime", "magenta"


def per_image_scores(probs: torch.Tensor, target: torch.Tensor, threshold: float) -> dict[str, torch.Tensor]:
    """Dice and IoU of each image's thresholded mask (1 where both masks are empty)."""
    pred, truth = (probs > threshold).flatten(1).float(), target.flatten(1).float()
    inter, total = (pred * truth).sum(1), pred.sum(1) + truth.sum(1)
    empty = total == 0
    dice = torch.where(empty, 1.0, 2 * inter / total.clamp_min(1))
    return {"dice": dice, "iou": torch.where(empty, 1.0, inter / (total - inter).clamp_min(1))}


def overlay_figure(
    images: Sequence[ImageLike], preds: Sequence[ImageLike], masks: Sequence[ImageLike] | None = None,
    names: Sequence[str] | None = None, columns: int = 3,
) -> Figure:  # fmt: skip
    """One panel per image: the predicted lung contour (and the ground truth's) on the image, titled with the file
    name (and the per-image Dice of the binary masks), and a legend of the contours."""
    preds = [np.asarray(p, dtype=np.float32).squeeze() for p in preds]
    truths = [None] * len(preds) if masks is None else [np.asarray(m, dtype=np.float32).squeeze() for m in masks]
    details = ["" if p.any() else "no lung predicted" for p in preds]  # (an empty prediction has no contour)
    if masks is not None:
        dice = per_image_scores(torch.from_numpy(np.stack(preds)), torch.from_numpy(np.stack(truths)), 0.5)["dice"]
        details = [", ".join(filter(None, [f"Dice {d:.3f}", e])) for d, e in zip(dice.tolist(), details)]
    names = names or [f"image {i + 1}" for i in range(len(preds))]
    titles = [f"{name}\n{detail}" if detail else name for name, detail in zip(names, details)]
    fig, axes = image_panels([to_rgb_uint8(im) for im in images], titles, columns)
    for ax, pred, truth in zip(axes, preds, truths):
        for mask, colour in ((truth, TRUTH), (pred, PREDICTION)):
            if mask is not None and 0 < mask.mean() < 1:  # an empty or full mask has no contour
                ax.contour(mask, levels=[0.5], colors=colour, linewidths=1.2)
    labels = [("truth", TRUTH)] * (masks is not None) + [("prediction", PREDICTION)]
    handles = [Line2D([], [], color=colour, linewidth=2, label=label) for label, colour in labels]
    fig.legend(handles=handles, loc="outside lower center", ncols=len(handles))
    return fig


class SegmentationOverlays(L.Callback):
    """After each validation epoch, write ``<log_dir>/overlays/epoch_NNN.png`` and log it to TensorBoard.

    Args:
        num_images: panels in the figure (the first images of the validation set).
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
        names = [Path(s.get("path", "")).name for s in samples]
        fig = overlay_figure(images, predict_batch(pl_module, images), masks, names)
        path = Path(log_dir or trainer.default_root_dir) / "overlays" / f"epoch_{trainer.current_epoch:03d}.png"
        self.last_path = save_figure(fig, path, f"Validation, epoch {trainer.current_epoch}")
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                with Image.open(path) as im:
                    image = np.asarray(im.convert("RGB"))
                logger.experiment.add_image("val/overlays", image, trainer.current_epoch, dataformats="HWC")
