"""Callbacks: staged unfreezing, segmentation overlay grids."""

from covid_lightning.callbacks.finetuning import StagedUnfreeze
from covid_lightning.callbacks.overlays import SegmentationOverlays

__all__ = ["SegmentationOverlays", "StagedUnfreeze"]
