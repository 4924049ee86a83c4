"""LR schedules torch does not ship as one class (so a YAML can name them with ``class_path``)."""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


class WarmupCosine(LambdaLR):
    """Linear warm-up from ``start_factor`` to 1 over ``warmup`` steps, then cosine decay to ``min_factor``."""

    def __init__(
        self,
        optimizer: Optimizer,
        warmup: int = 1,
        total: int = 10,
        start_factor: float = 0.1,
        min_factor: float = 0.0,
        last_epoch: int = -1,
    ) -> None:
        if total <= warmup:
            raise ValueError(f"total ({total}) must exceed warmup ({warmup}).")
        self.warmup, self.total, self.start_factor, self.min_factor = warmup, total, start_factor, min_factor
        super().__init__(optimizer, self.factor, last_epoch=last_epoch)

    def factor(self, step: int) -> float:
        if step < self.warmup:
            return self.start_factor + (1 - self.start_factor) * step / self.warmup
        progress = min(1.0, (step - self.warmup) / (self.total - self.warmup))
        return self.min_factor + (1 - self.min_factor) * 0.5 * (1 + math.cos(math.pi * progress))
