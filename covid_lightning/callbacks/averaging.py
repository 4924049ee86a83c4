"""EMA of the weights whose checkpoints test as they validated."""

from __future__ import annotations

import warnings
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import EMAWeightAveraging


class EMAWeights(EMAWeightAveraging):
    """Lightning's :class:`~lightning.pytorch.callbacks.EMAWeightAveraging`, except when a checkpoint is loaded to
    test, validate or predict in the Trainer that fitted it (``trainer.test(ckpt_path="best")`` after ``fit``, what
    ``scripts/ablate.py`` does).

    Validation, and so checkpoint selection, score the averaged weights, which a checkpoint holds as its
    ``state_dict``. Lightning's callback, still holding its averaged model after ``fit``, reloads the raw weights
    (``current_model_state``) for any stage: the test then scores weights the selection never saw. Here only a
    resumed fit does that; other stages keep the averaged ``state_dict``, as a fresh ``lightning test`` does.
    """

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if trainer.state.fn == "fit":
            super().on_load_checkpoint(trainer, pl_module, checkpoint)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        with warnings.catch_warnings():  # about sharded layers; these modules' configure_model only compiles
            warnings.filterwarnings("ignore", message=".*overrides the configure_model callback.*")
            super().setup(trainer, pl_module, stage)
