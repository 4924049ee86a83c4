"""Figures: the lab's training curves from a run's ``metrics.csv``, confusion matrices, ROC curves.

Everything draws on a ``matplotlib.figure.Figure`` (the Agg canvas), never through ``pyplot``: no
global backend is switched, nothing needs a display, and it is safe in worker threads.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

#: curves of a classification run: panel title -> (train column, val column)
CLASSIFICATION_PANELS: dict[str, tuple[str, str]] = {
    "Loss": ("train/loss", "val/loss"),
    "Accuracy": ("train/acc", "val/acc"),
}
#: curves of a segmentation run
SEGMENTATION_PANELS: dict[str, tuple[str, str]] = {
    "Loss": ("train/loss", "val/loss"),
    "IoU": ("train/iou", "val/iou"),
    "Dice": ("train/dice", "val/dice"),
}
#: the validation metric that picks the best epoch, per run kind (what the modules monitor)
MONITORS: dict[str, tuple[str, str]] = {"classification": ("val/acc", "max"), "segmentation": ("val/dice", "max")}


def find_metrics_csv(path: str | Path) -> Path:
    """``metrics.csv`` itself, a run folder holding one, or a folder of runs (the newest ``metrics.csv`` below)."""
    path = Path(path).expanduser()
    if path.is_file():
        return path
    if (path / "metrics.csv").is_file():
        return path / "metrics.csv"
    if path.is_dir():
        found = sorted(path.rglob("metrics.csv"), key=lambda p: p.stat().st_mtime)
        if found:
            return found[-1]
    raise FileNotFoundError(f"No metrics.csv at {path} (give a CSVLogger run folder or its metrics.csv).")


def read_epoch_metrics(metrics_csv: str | Path) -> dict[int, dict[str, float]]:
    """CSVLogger ``metrics.csv`` -> ``{epoch: {column: value}}`` (the last non-empty value of each column).

    ``train/loss_epoch`` is also available as ``train/loss`` (the per-epoch mean of the training loss);
    per-step columns (``*_step``) are dropped.
    """
    epochs: dict[int, dict[str, float]] = {}
    with Path(metrics_csv).open(newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            epoch = row.get("epoch")
            if epoch in (None, ""):
                continue
            values = epochs.setdefault(int(float(epoch)), {})
            for key, value in row.items():
                if key in ("epoch", "step") or key is None or value in (None, "") or key.endswith("_step"):
                    continue
                values[key.removesuffix("_epoch")] = float(value)
    return dict(sorted(epochs.items()))


def run_kind(columns: set[str] | Mapping[int, Mapping[str, float]]) -> str:
    """``segmentation`` when IoU/Dice columns are present, else ``classification``."""
    if isinstance(columns, Mapping):
        columns = {k for values in columns.values() for k in values}
    seg = {"val/iou", "val/dice", "train/iou", "train/dice"}
    return "segmentation" if columns & seg else "classification"


def best_epoch(epochs: Mapping[int, Mapping[str, float]], monitor: str, mode: str = "max") -> int | None:
    """The epoch with the best ``monitor`` value (the first one on ties); None when it was never logged."""
    candidates = [(e, v[monitor]) for e, v in epochs.items() if monitor in v and not math.isnan(v[monitor])]
    if not candidates:
        return None
    sign = 1.0 if mode == "max" else -1.0
    best = max(candidates, key=lambda ev: (sign * ev[1], -ev[0]))
    return best[0]


def plot_curves(metrics_csv: str | Path, out_png: str | Path | None = None) -> Path:
    """The lab's training curves, train vs val per epoch: loss + accuracy (classification) or
    loss + IoU + Dice (segmentation, detected from the columns). The best epoch is marked.

    Args:
        metrics_csv: a CSVLogger ``metrics.csv``, or a run folder (see :func:`find_metrics_csv`).
        out_png: where to write; default ``curves.png`` next to ``metrics.csv``.

    Returns:
        The PNG path.
    """
    csv_path = find_metrics_csv(metrics_csv)
    epochs = read_epoch_metrics(csv_path)
    kind = run_kind(epochs)
    panels = SEGMENTATION_PANELS if kind == "segmentation" else CLASSIFICATION_PANELS
    present = {k for values in epochs.values() for k in values}
    panels = {title: cols for title, cols in panels.items() if set(cols) & present}
    if not panels:
        raise ValueError(f"{csv_path} has no per-epoch train/val metrics to plot (columns: {sorted(present)}).")
    monitor, mode = MONITORS[kind]
    best = best_epoch(epochs, monitor, mode)

    fig = Figure(figsize=(5.2 * len(panels), 4.0), layout="constrained")
    for ax, (title, (train_key, val_key)) in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels.items()):
        for key, label, style in ((train_key, "train", "o-"), (val_key, "val", "s-")):
            xs = [e for e, v in epochs.items() if key in v]
            if xs:
                ax.plot(xs, [epochs[e][key] for e in xs], style, label=label, markersize=4)
        if best is not None:
            ax.axvline(best, color="0.6", linestyle=":", label=f"best epoch ({monitor})")
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend()
        ax.xaxis.get_major_locator().set_params(integer=True)
    fig.suptitle(f"{csv_path.parent.parent.name}/{csv_path.parent.name}")
    out = Path(out_png) if out_png is not None else csv_path.with_name("curves.png")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    return out


def plot_confusion_matrix(
    confmat: np.ndarray, class_names: Sequence[str], out_png: str | Path, title: str = ""
) -> Path:
    """Two panels: counts and row-normalised (recall per true class); rows true, columns predicted."""
    cm = np.asarray(confmat, dtype=np.int64)
    rows = cm.sum(axis=1, keepdims=True)
    norm = np.divide(cm, rows, out=np.zeros(cm.shape, dtype=np.float64), where=rows > 0)
    n = len(class_names)
    size = max(4.5, 1.1 * n + 2.0)
    fig = Figure(figsize=(2 * size + 1.0, size), layout="constrained")
    axes = fig.subplots(1, 2)
    for ax, data, fmt, panel in ((axes[0], cm, "d", "counts"), (axes[1], norm, ".2f", "row-normalised")):
        vmax = 1.0 if data is norm else max(int(cm.max()), 1)
        im = ax.imshow(data, cmap="Blues", vmin=0, vmax=vmax)
        for i in range(n):
            for j in range(n):
                ax.text(
                    j,
                    i,
                    format(data[i, j], fmt),
                    ha="center",
                    va="center",
                    color="white" if data[i, j] > 0.55 * vmax else "black",
                    fontsize=9,
                )
        ax.set_xticks(range(n), class_names, rotation=35, ha="right")
        ax.set_yticks(range(n), class_names)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(panel)
        fig.colorbar(im, ax=ax, shrink=0.8)
    if title:
        fig.suptitle(title)
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    return out


def plot_roc(
    fpr: Sequence[np.ndarray],
    tpr: Sequence[np.ndarray],
    auroc: Sequence[float],
    class_names: Sequence[str],
    out_png: str | Path,
    title: str = "",
) -> Path:
    """One-vs-rest ROC curve per class, AUROC in the legend (``n/a`` for a class without positives/negatives)."""
    fig = Figure(figsize=(6.0, 5.5), layout="constrained")
    ax = fig.subplots()
    for f, t, auc, name in zip(fpr, tpr, auroc, class_names):
        defined = auc is not None and not math.isnan(auc)
        ax.plot(np.asarray(f), np.asarray(t), label=f"{name} (AUROC {auc:.3f})" if defined else f"{name} (n/a)")
    ax.plot([0, 1], [0, 1], linestyle="--", color="0.6", linewidth=1)
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(f"ROC (one-vs-rest): {title}" if title else "ROC (one-vs-rest)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    return out
