"""Metrics torchmetrics does not ship, written as torchmetrics ``Metric`` s (synchronised across ranks)."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torchmetrics import Metric

#: a :func:`bootstrap` statistic: image indices, a resample a row (R, n) -> ``{metric: (R,) values}``
Statistic = Callable[[np.ndarray], dict[str, np.ndarray]]


def pair_choice(probs: torch.Tensor | np.ndarray, a: int, b: int) -> torch.Tensor | np.ndarray:
    """The COVID-vs-Normal decision in a multiclass model: per image ``a`` or ``b``, the more probable (tie: ``a``)."""
    return b + (a - b) * (probs[:, a] >= probs[:, b])


class PairAccuracy(Metric):
    """Accuracy of :func:`pair_choice` over the images of class ``a`` or ``b``."""

    full_state_update = False
    higher_is_better = True

    def __init__(self, a: int, b: int) -> None:
        super().__init__()
        self.a, self.b = a, b
        self.add_state("correct", default=torch.tensor(0), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0), dist_reduce_fx="sum")

    def update(self, probs: torch.Tensor, target: torch.Tensor) -> None:
        self.correct += (pair_choice(probs, self.a, self.b) == target).sum()  # right: the image is of class a or b
        self.total += ((target == self.a) | (target == self.b)).sum()

    def compute(self) -> torch.Tensor:
        return self.correct.float() / self.total.clamp(min=1)


def bootstrap(
    statistic: Statistic, n: int, resamples: int = 1000, level: float = 0.95, seed: int = 0
) -> dict[str, tuple[float, float, float]]:
    """``{name: (value, low, high)}``: each metric of ``statistic`` with its seeded percentile bootstrap interval.
    Each metric has its own resamples: metric ``j`` of ``m``, in resample ``r``, is scored on draw ``r * m + j``."""
    point = {k: float(v[0]) for k, v in statistic(np.arange(n)[None]).items()}
    if n == 0:
        return {k: (v, float("nan"), float("nan")) for k, v in point.items()}
    rng, block, rows = np.random.default_rng(seed), max(1, 2**20 // n), resamples * len(point)  # block: bounded memory
    parts = [statistic(rng.integers(0, n, (min(block, rows - i), n))) for i in range(0, rows, block)]
    draws = np.stack([np.concatenate([p[k] for p in parts])[j :: len(point)] for j, k in enumerate(point)], axis=1)
    tail = 50 * (1 - level)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns: no interval
        low, high = np.nanpercentile(draws, [tail, 100 - tail], axis=0)
    return {k: (float(point[k]), float(lo), float(hi)) for k, lo, hi in zip(point, low, high)}


def _counts(values: np.ndarray, size: int) -> np.ndarray:
    """(R, size): how often each value in [0, size) occurs in each row of ``values`` (R, n)."""
    rows = len(values)
    return np.bincount((values + size * np.arange(rows)[:, None]).ravel(), minlength=rows * size).reshape(rows, size)


def classification_scores(
    probs: torch.Tensor, target: torch.Tensor, class_names: Sequence[str], pair: tuple[int, int] | None = None
) -> Statistic:
    """A :func:`bootstrap` statistic over images: headline and per-class scores (AUROC: Mann-Whitney, ties half);
    undefined values are NaN. With ``pair``, also the accuracy of :func:`pair_choice` on the pair's images."""
    p_all, y_all = probs.float().cpu().numpy(), target.long().cpu().numpy()
    k = len(class_names)
    cell = y_all * k + p_all.argmax(1)  # each image's confusion matrix cell
    # per class: 2 * (dense rank of the image's score: ties share one) + (the image is of the class)
    ranks = [2 * np.unique(p_all[:, c], return_inverse=True)[1] + (y_all == c) for c in range(k)]
    right = None if pair is None else pair_choice(p_all, *pair) == y_all  # right: an image of the pair

    def scores(idx: np.ndarray) -> dict[str, np.ndarray]:
        confusion = _counts(cell[idx], k * k).reshape(-1, k, k)
        tp, n_true, n_pred = confusion.diagonal(0, 1, 2), confusion.sum(2), confusion.sum(1)
        present = n_true > 0
        with np.errstate(divide="ignore", invalid="ignore"):
            recall = np.where(present, tp / n_true, np.nan)
            f1 = np.where(present, 2 * tp / (n_true + n_pred), np.nan)
            out = {"accuracy": tp.sum(1) / idx.shape[1]}  # no images: NaN
            for c, name in enumerate(class_names):
                neg, pos = _counts(ranks[c][idx], 2 * len(y_all)).reshape(len(idx), -1, 2).transpose(2, 0, 1)
                auroc = (pos * (neg.cumsum(1) - neg / 2)).sum(1) / (pos.sum(1) * neg.sum(1))  # 0/0: NaN
                out |= {f"recall/{name}": recall[:, c], f"f1/{name}": f1[:, c], f"auroc/{name}": auroc}
            out["balanced_accuracy"] = np.nansum(recall, 1) / present.sum(1)  # over the classes present
            out["macro_f1"] = np.nansum(f1, 1) / present.sum(1)
            if pair is not None:
                out["pair_accuracy"] = right[idx].sum(1) / n_true[:, list(pair)].sum(1)
        return out

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
