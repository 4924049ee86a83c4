"""Metrics torchmetrics does not ship, written as torchmetrics ``Metric`` s (synchronised across ranks)."""

from __future__ import annotations

import torch
from torchmetrics import Metric


class PairAccuracy(Metric):
    """Accuracy of a two-class decision inside a multiclass model: among samples whose true class is
    ``a`` or ``b``, the prediction is whichever of the two has the higher probability.

    The COVID-19 Radiography sample mixes classes with different processing histories; COVID vs Normal
    (same processing) is the clean comparison, so it is reported beside the overall accuracy.
    """

    full_state_update = False
    higher_is_better = True

    def __init__(self, a: int, b: int) -> None:
        super().__init__()
        self.a, self.b = a, b
        self.add_state("correct", default=torch.tensor(0), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0), dist_reduce_fx="sum")

    def update(self, probs: torch.Tensor, target: torch.Tensor) -> None:
        keep = (target == self.a) | (target == self.b)
        pred = torch.where(probs[:, self.a] >= probs[:, self.b], self.a, self.b)
        self.correct += (pred[keep] == target[keep]).sum()
        self.total += keep.sum()

    def compute(self) -> torch.Tensor:
        return self.correct.float() / self.total.clamp(min=1)
