"""Metrics torchmetrics does not ship, written as torchmetrics ``Metric`` s (synchronised across ranks)."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import numpy as np
import torch
from scipy.stats import rankdata
from torchmetrics import Metric


class PairAccuracy(Metric):
    """Accuracy of a two-class decision (``a`` vs ``b``, the more probable of the two) inside a multiclass model."""

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


def bootstrap(
    statistic: Callable[[np.ndarray], dict[str, float]],
    n: int,
    resamples: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> dict[str, tuple[float, float, float]]:
    """``{name: (value, low, high)}``: each metric of ``statistic`` with its seeded percentile bootstrap interval."""
    point = statistic(np.arange(n))
    if n == 0:
        return {k: (v, float("nan"), float("nan")) for k, v in point.items()}
    rng = np.random.default_rng(seed)
    draws = np.array([[statistic(rng.integers(0, n, n)).get(k, np.nan) for k in point] for _ in range(resamples)])
    tail = 50 * (1 - level)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns: no interval
        low, high = np.nanpercentile(draws, [tail, 100 - tail], axis=0)
    return {k: (float(point[k]), float(lo), float(hi)) for k, lo, hi in zip(point, low, high)}


def classification_scores(
    probs: torch.Tensor, target: torch.Tensor, class_names: Sequence[str], pair: tuple[int, int] | None = None
) -> Callable[[np.ndarray], dict[str, float]]:
    """A :func:`bootstrap` statistic over images: headline and per-class scores; undefined values are NaN."""
    p_all, y_all = probs.float().cpu().numpy(), target.long().cpu().numpy()
    k = len(class_names)

    def scores(idx: np.ndarray) -> dict[str, float]:
        p, y = p_all[idx], y_all[idx]
        yhat = p.argmax(1)
        confusion = np.bincount(y * k + yhat, minlength=k * k).reshape(k, k)
        tp, n_true, n_pred = np.diag(confusion), confusion.sum(1), confusion.sum(0)
        with np.errstate(divide="ignore", invalid="ignore"):
            recall = np.where(n_true > 0, tp / n_true, np.nan)
            f1 = np.where(n_true > 0, 2 * tp / (n_true + n_pred), np.nan)
        out = {"accuracy": float(tp.sum() / max(len(y), 1))}
        for c, name in enumerate(class_names):
            positive = y == c
            n_pos = int(positive.sum())
            auroc = np.nan
            if 0 < n_pos < len(y):
                ranks = rankdata(p[:, c])
                auroc = (ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * (len(y) - n_pos))
            out |= {f"recall/{name}": recall[c], f"f1/{name}": f1[c], f"auroc/{name}": float(auroc)}
        present = n_true > 0
        out["balanced_accuracy"] = float(recall[present].mean()) if present.any() else np.nan
        out["macro_f1"] = float(f1[present].mean()) if present.any() else np.nan
        if pair is not None:
            a, b = pair
            keep = (y == a) | (y == b)
            choice = np.where(p[keep, a] >= p[keep, b], a, b)
            out["pair_accuracy"] = float((choice == y[keep]).mean()) if keep.any() else np.nan
        return {key: float(v) for key, v in out.items()}

    return scores


def fit_temperature(logits: torch.Tensor, target: torch.Tensor, max_iter: int = 100) -> float:
    """Temperature scaling (Guo et al., 2017): the ``T`` minimising the NLL of ``softmax(logits / T)``."""
    logits, target = logits.detach().float().cpu(), target.detach().long().cpu()
    log_t = torch.zeros(1, requires_grad=True)  # T = exp(log_t) > 0
    optimizer = torch.optim.LBFGS([log_t], lr=0.1, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(logits / log_t.exp(), target)
        loss.backward()
        return loss

    optimizer.step(closure)
    return float(log_t.detach().exp().clamp(0.05, 20.0))
