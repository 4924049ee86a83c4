"""Callbacks: staged unfreezing (and, later, visual checks, prediction writers, reports)."""

from covid_lightning.callbacks.finetuning import StagedUnfreeze

__all__ = ["StagedUnfreeze"]
