"""The run's checkpoints: the best by the model's own metric, and ``last.ckpt`` after every epoch."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint


class RunCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` whose ``monitor``/``mode`` default to the model's, with ``best-*.ckpt`` and ``last.ckpt``."""

    def __init__(
        self,
        monitor: str | None = None,
        mode: str | None = None,
        filename: str | None = None,
        save_last: bool = True,
        save_top_k: int = 1,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            monitor=monitor, mode=mode or "min", filename=filename, save_last=save_last, save_top_k=save_top_k, **kwargs
        )
        self._auto_mode, self._auto_filename = mode is None, filename is None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.monitor is None and getattr(pl_module, "monitor", None):
            self.monitor = pl_module.monitor
            if self._auto_mode:
                self.mode = getattr(pl_module, "monitor_mode", "min")
                self.kth_value = torch.tensor(torch.inf if self.mode == "min" else -torch.inf)
        if self._auto_filename and self.monitor:
            self.filename = f"best-epoch{{epoch:02d}}-{self.monitor.rsplit('/', 1)[-1]}{{{self.monitor}:.4f}}"
            self.auto_insert_metric_name = False
        super().setup(trainer, pl_module, stage)

    # Lightning writes last.ckpt only at a step where it wrote a best checkpoint; a resume needs it every epoch.
    def _ensure_last(self, trainer: L.Trainer, at_train_epoch_end: bool) -> None:
        skip = self._should_skip_saving_checkpoint(trainer)  # also when a checkpoint was written at this step
        if at_train_epoch_end == self._should_save_on_train_epoch_end(trainer) and not skip:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        self._ensure_last(trainer, True)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        self._ensure_last(trainer, False)
