"""The lab's training curves (from a run's ``metrics.csv``) and image panels, on a ``Figure``, never ``pyplot``."""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import yaml
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from covid_lightning.modules.classifier import XRayClassifier
from covid_lightning.modules.segmenter import LungSegmenter

#: panel title -> (train column, val column), per run kind
PANELS: dict[str, dict[str, tuple[str, str]]] = {
    "classification": {"Loss": ("train/loss", "val/loss"), "Accuracy": ("train/acc", "val/acc")},
    "segmentation": {
        "Loss": ("train/loss", "val/loss"),
        "IoU": ("train/iou", "val/iou"),
        "Dice": ("train/dice", "val/dice"),
    },
}


def find_metrics_csv(path: str | Path) -> Path:
    """``metrics.csv`` itself, a run folder holding one, or a folder of runs (the newest ``metrics.csv`` below)."""
    path = Path(path).expanduser()
    if path.is_dir():
        found = sorted(path.rglob("metrics.csv"), key=lambda p: p.stat().st_mtime)
        path = path / "metrics.csv" if (path / "metrics.csv").is_file() or not found else found[-1]
    if not path.is_file():
        raise FileNotFoundError(f"No metrics.csv at {path} (give a CSVLogger run folder or its metrics.csv).")
    return path


def read_epoch_metrics(metrics_csv: str | Path) -> dict[int, dict[str, float]]:
    """CSVLogger ``metrics.csv`` -> ``{epoch: {column: last non-empty value}}`` (``*_step`` columns dropped)."""
    epochs: dict[int, dict[str, float]] = {}
    with Path(metrics_csv).open(newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            if row.get("epoch") in (None, ""):
                continue
            values = epochs.setdefault(int(float(row["epoch"])), {})
            for key, value in row.items():
                if key not in ("epoch", "step", None) and value not in (None, "") and not key.endswith("_step"):
                    values[key.removesuffix("_epoch")] = float(value)
    return dict(sorted(epochs.items()))


def run_kind(epochs: Mapping[int, Mapping[str, float]]) -> str:
    """``segmentation`` when IoU/Dice columns are present, else ``classification``."""
    columns = {k for values in epochs.values() for k in values}
    return "segmentation" if columns & {"val/iou", "val/dice", "train/iou", "train/dice"} else "classification"


def best_epoch(epochs: Mapping[int, Mapping[str, float]], monitor: str, mode: str = "max") -> int | None:
    """The epoch with the best ``monitor`` value (the first one on ties); None when it was never logged."""
    candidates = [(e, v[monitor]) for e, v in epochs.items() if monitor in v and not math.isnan(v[monitor])]
    sign = 1.0 if mode == "max" else -1.0
    return max(candidates, key=lambda ev: (sign * ev[1], -ev[0]))[0] if candidates else None


def run_monitor(csv_path: Path, kind: str) -> tuple[str, str]:
    """The ``(monitor, mode)`` that picked the run's best checkpoint: its ``config.yaml``'s ``checkpoint`` when set,
    else the module's own (``monitor``/``monitor_mode`` of the LightningModule class)."""
    module = LungSegmenter if kind == "segmentation" else XRayClassifier
    config_path = csv_path.with_name("config.yaml")
    config = yaml.safe_load(config_path.read_text(encoding="utf-8")) if config_path.is_file() else None
    checkpoint = (config or {}).get("checkpoint") or {}
    if checkpoint.get("monitor"):
        return checkpoint["monitor"], checkpoint.get("mode") or "min"  # RunCheckpoint's (Lightning's) default
    return module.monitor, module.monitor_mode


def plot_curves(metrics_csv: str | Path, out: str | Path | None = None) -> Path:
    """Train vs val per epoch: loss + accuracy, or loss + IoU + Dice; the epoch the run's checkpoint kept marked.

    Args:
        metrics_csv: a CSVLogger ``metrics.csv``, a run folder, or a folder of runs (the newest run).
        out: the PNG to write (default ``curves.png`` next to ``metrics.csv``).
    """
    csv_path = find_metrics_csv(metrics_csv)
    epochs = read_epoch_metrics(csv_path)
    kind = run_kind(epochs)
    present = {k for values in epochs.values() for k in values}
    panels = {title: cols for title, cols in PANELS[kind].items() if set(cols) & present}
    if not panels:
        raise ValueError(f"{csv_path} has no per-epoch train/val metrics to plot (columns: {sorted(present)}).")
    monitor, mode = run_monitor(csv_path, kind)
    best = best_epoch(epochs, monitor, mode)
    fig = Figure(figsize=(5.2 * len(panels), 4.0), layout="constrained")
    for ax, (title, keys) in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels.items()):
        for key, label, style in zip(keys, ("train", "val"), ("o-", "s-")):
            xs = [e for e, v in epochs.items() if key in v]
            if xs:
                ax.plot(xs, [epochs[e][key] for e in xs], style, label=label, markersize=4)
        if best is not None:
            ax.axvline(best, color="0.6", linestyle=":", label=f"best epoch ({monitor})")
        ax.set(title=title, xlabel="epoch")
        ax.grid(alpha=0.3)
        ax.legend()
        ax.xaxis.get_major_locator().set_params(integer=True)
    fig.suptitle(f"{csv_path.parent.parent.name}/{csv_path.parent.name}")
    return save_figure(fig, Path(out) if out is not None else csv_path.with_name("curves.png"))


def save_figure(fig: Figure, path: str | Path, title: str = "") -> Path:
    """Write ``fig`` (with suptitle ``title``) as ``path`` at the lab's 110 dpi; returns the path."""
    if title:
        fig.suptitle(title)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.draw_without_rendering()  # constrained layout makes room for multi-line titles only from a second pass
    fig.savefig(path, dpi=110)
    return Path(path)


def image_panels(
    images: Sequence[np.ndarray], titles: Sequence[str], columns: int = 3, size: float = 3.2
) -> tuple[Figure, list[Axes]]:
    """One uint8 RGB image per titled panel (first line: the file name), without axes, ``columns`` to a row."""
    cols = max(min(columns, len(images)), 1)
    rows = math.ceil(max(len(images), 1) / cols)
    fig = Figure(figsize=(size * cols, (size + 0.4) * rows + 0.5), layout="constrained")
    axes = list(fig.subplots(rows, cols, squeeze=False).flat)
    for ax in axes:
        ax.set_axis_off()
    for ax, image, title in zip(axes, images, titles):
        name, *rest = title.split("\n")  # a long first line (a file name) is cut in the middle: titles never collide
        ax.imshow(image)
        ax.set_title("\n".join([name if len(name) <= 34 else f"{name[:16]}…{name[-16:]}", *rest]), fontsize=9)
    return fig, axes[: len(images)]
