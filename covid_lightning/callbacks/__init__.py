"""Callbacks: weight EMA, frozen-feature cache, staged unfreezing, overlays, evaluation reports, prediction writing."""

from covid_lightning.callbacks.averaging import EMAWeights
from covid_lightning.callbacks.checkpoint import RunCheckpoint
from covid_lightning.callbacks.feature_cache import FrozenFeatureCache
from covid_lightning.callbacks.finetuning import StagedUnfreeze
from covid_lightning.callbacks.overlays import SegmentationOverlays
from covid_lightning.callbacks.prediction_writer import PredictionWriter
from covid_lightning.callbacks.reports import EvaluationReport

__all__ = [
    "EMAWeights",
    "EvaluationReport",
    "FrozenFeatureCache",
    "PredictionWriter",
    "RunCheckpoint",
    "SegmentationOverlays",
    "StagedUnfreeze",
]
