"""Callbacks: frozen-feature cache, staged unfreezing, overlay grids, evaluation reports, prediction writing."""

from covid_lightning.callbacks.checkpoint import RunCheckpoint
from covid_lightning.callbacks.feature_cache import FrozenFeatureCache
from covid_lightning.callbacks.finetuning import StagedUnfreeze
from covid_lightning.callbacks.overlays import SegmentationOverlays
from covid_lightning.callbacks.prediction_writer import PredictionWriter
from covid_lightning.callbacks.reports import EvaluationReport

__all__ = [
    "EvaluationReport",
    "FrozenFeatureCache",
    "PredictionWriter",
    "RunCheckpoint",
    "SegmentationOverlays",
    "StagedUnfreeze",
]
