"""Evaluation reports for ``lightning validate`` / ``lightning test``: the lab's tables and figures, on disk.

Classifier: the sklearn-style classification report (+ AUROC), confusion matrix (CSV, PNG), ROC curves.
Segmenter: pooled-pixel IoU/Dice/precision/recall/accuracy + mean per-image Dice, and an overlay grid.
The numbers come from torchmetrics; the tables are also available as pure functions
(:func:`classification_table`, :func:`to_markdown`, :func:`to_text`, :func:`segmentation_metrics`).
"""

from __future__ import annotations

import csv
import logging
import math
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from PIL import Image
from torchmetrics import Metric, MetricCollection
from torchmetrics.classification import BinaryAccuracy, BinaryF1Score, BinaryJaccardIndex, BinaryPrecision, BinaryRecall
from torchmetrics.functional.classification import (
    multiclass_accuracy,
    multiclass_auroc,
    multiclass_confusion_matrix,
    multiclass_f1_score,
    multiclass_precision,
    multiclass_recall,
    multiclass_roc,
)
from torchmetrics.segmentation import DiceScore
from torchmetrics.utilities import dim_zero_cat

from covid_lightning.callbacks.overlays import overlay_grid
from covid_lightning.plotting import plot_confusion_matrix, plot_roc

log = logging.getLogger(__name__)

#: the columns of the classification table (sklearn's names) + AUROC
TABLE_COLUMNS = ("class", "precision", "recall", "f1-score", "support", "auroc")
#: segmentation metrics in report order: key -> display name
SEGMENTATION_NAMES: dict[str, str] = {
    "iou": "IoU (Jaccard)",
    "dice": "Dice (F1)",
    "precision": "precision",
    "recall": "recall",
    "accuracy": "pixel accuracy",
    "dice_per_image": "mean per-image Dice",
}
#: ``trainer.state.fn`` -> the split a report describes (fit's report is its last validation)
_SPLIT = {"fit": "val", "validate": "val", "test": "test"}


# classification: pure functions -------------------------------------------------------------------------
def _class_names(class_names: Sequence[str] | None, num_classes: int) -> list[str]:
    names = list(class_names) if class_names is not None else [str(i) for i in range(num_classes)]
    if len(names) != num_classes:
        raise ValueError(f"{len(names)} class names for {num_classes} classes.")
    return names


def classification_table(
    probs: torch.Tensor, target: torch.Tensor, class_names: Sequence[str] | None = None
) -> list[dict[str, Any]]:
    """The lab's classification report as rows: one per class, then ``accuracy``, ``macro avg``, ``weighted avg``.

    Same definitions as ``sklearn.metrics.classification_report(y_true, y_pred, labels=range(C))``:
    per-class precision/recall/F1 (0 where undefined), ``accuracy`` (in the ``f1-score`` column, its
    precision/recall None), macro = plain mean over all classes, weighted = support-weighted mean.
    The ``auroc`` column is one-vs-rest AUROC from the probabilities; None for a class without positive
    or negative samples (macro/weighted over the defined classes), and None when ``probs`` are labels.

    Args:
        probs: (N, C) class probabilities (or scores), or (N,) predicted labels.
        target: (N,) true labels.
        class_names: C names in label order (default ``"0"``, ``"1"``, ...).
    """
    target = torch.as_tensor(target).long().flatten().cpu()
    probs = torch.as_tensor(probs).cpu()
    if probs.ndim == 2:
        num_classes = probs.shape[1]
        probs = probs.float()
    elif probs.ndim == 1:
        num_classes = len(class_names) if class_names is not None else int(max(probs.max(), target.max())) + 1
        probs = probs.long()
    else:
        raise ValueError(f"probs must be (N, C) probabilities or (N,) labels, not shape {tuple(probs.shape)}.")
    names = _class_names(class_names, num_classes)
    kw: dict[str, Any] = {"num_classes": num_classes, "average": None}
    precision = multiclass_precision(probs, target, **kw).tolist()
    recall = multiclass_recall(probs, target, **kw).tolist()
    f1 = multiclass_f1_score(probs, target, **kw).tolist()
    support = torch.bincount(target, minlength=num_classes).tolist()
    total = int(sum(support))
    accuracy = float(multiclass_accuracy(probs, target, num_classes=num_classes, average="micro"))
    auroc = class_auroc(probs, target, num_classes) if probs.ndim == 2 else [None] * num_classes

    rows = [
        {"class": n, "precision": p, "recall": r, "f1-score": f, "support": s, "auroc": a}
        for n, p, r, f, s, a in zip(names, precision, recall, f1, support, auroc)
    ]
    rows.append({"class": "accuracy", "precision": None, "recall": None, "f1-score": accuracy, "support": total})
    defined = [(a, s) for a, s in zip(auroc, support) if a is not None]
    macro_auc = float(np.mean([a for a, _ in defined])) if defined else None
    weight = sum(s for _, s in defined)
    weighted_auc = sum(a * s for a, s in defined) / weight if defined and weight else None
    per_class = {"precision": precision, "recall": recall, "f1-score": f1}
    for name, weights, auc in (("macro avg", [1] * num_classes, macro_auc), ("weighted avg", support, weighted_auc)):
        norm = float(sum(weights)) or 1.0
        averages = {k: sum(w * v for w, v in zip(weights, vals)) / norm for k, vals in per_class.items()}
        rows.append({"class": name, **averages, "support": total, "auroc": auc})
    rows[num_classes]["auroc"] = None  # the accuracy row
    return rows


def class_auroc(probs: torch.Tensor, target: torch.Tensor, num_classes: int) -> list[float | None]:
    """One-vs-rest AUROC per class (exact, no binning); None where a class has no positives or no negatives."""
    with warnings.catch_warnings():  # torchmetrics warns (and returns 0) for classes without positives
        warnings.simplefilter("ignore")
        values = multiclass_auroc(probs.float(), target, num_classes=num_classes, average=None, thresholds=None)
    support = torch.bincount(target, minlength=num_classes)
    n = target.numel()
    return [float(v) if 0 < int(s) < n else None for v, s in zip(values, support)]


def roc_curves(
    probs: torch.Tensor, target: torch.Tensor, num_classes: int
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """One-vs-rest ROC curves (false and true positive rates per class), exact thresholds."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fpr, tpr, _ = multiclass_roc(probs.float().cpu(), target.long().cpu(), num_classes=num_classes, thresholds=None)
    return [f.numpy() for f in fpr], [t.numpy() for t in tpr]


def confusion_matrix(probs: torch.Tensor, target: torch.Tensor, num_classes: int) -> np.ndarray:
    """(C, C) counts, rows true class, columns predicted class (argmax of ``probs``)."""
    probs = torch.as_tensor(probs).cpu()
    probs = probs.float() if probs.ndim == 2 else probs.long()
    return multiclass_confusion_matrix(probs, torch.as_tensor(target).long().cpu(), num_classes=num_classes).numpy()


def _fmt(value: Any, digits: int) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def to_markdown(rows: Sequence[Mapping[str, Any]], digits: int = 4) -> str:
    """A table of :func:`classification_table` rows (or any rows of dicts) as GitHub markdown."""
    columns = [c for c in TABLE_COLUMNS if any(c in r for r in rows)] or list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join(["---"] + ["---:"] * (len(columns) - 1)) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c), digits) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def to_text(rows: Sequence[Mapping[str, Any]], digits: int = 2) -> str:
    """The rows in sklearn's ``classification_report`` text layout (character for character)."""
    headers = ["precision", "recall", "f1-score", "support"]
    width = max([len(str(r["class"])) for r in rows] + [len("weighted avg"), digits])
    report = ("{:>{width}s} " + " {:>9}" * len(headers)).format("", *headers, width=width) + "\n\n"
    row_fmt = "{:>{width}s} " + " {:>9.{digits}f}" * 3 + " {:>9}\n"
    for r in rows:
        if r["class"] == "accuracy":
            report += "\n" + ("{:>{width}s} " + " {:>9.{digits}}" * 2 + " {:>9.{digits}f}" + " {:>9}\n").format(
                "accuracy", "", "", r["f1-score"], r["support"], width=width, digits=digits
            )
        else:
            values = [r["precision"], r["recall"], r["f1-score"], r["support"]]
            report += row_fmt.format(str(r["class"]), *values, width=width, digits=digits)
    return report


def _write_csv(path: Path, rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(columns)
        for r in rows:
            w.writerow(["" if r.get(c) is None else r.get(c) for c in columns])
    return path


def write_classification_report(
    probs: torch.Tensor,
    target: torch.Tensor,
    class_names: Sequence[str] | None,
    out_dir: str | Path,
    title: str = "",
    note: str = "",
) -> dict[str, Path]:
    """All classification report files into ``out_dir``; returns ``{name: path}``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    probs, target = torch.as_tensor(probs).float().cpu(), torch.as_tensor(target).long().cpu()
    num_classes = probs.shape[1]
    names = _class_names(class_names, num_classes)
    rows = classification_table(probs, target, names)
    cm = confusion_matrix(probs, target, num_classes)
    files: dict[str, Path] = {}

    cm_rows = [{"true class": n, **{p: int(v) for p, v in zip(names, cm[i])}} for i, n in enumerate(names)]
    md = [f"# {title or 'Classification report'}", "", f"{len(target)} images. {note}".rstrip(), "", to_markdown(rows)]
    md += ["Confusion matrix (rows: true class, columns: predicted class):", "", _plain_markdown(cm_rows)]
    md += ["The lab's `classification_report` layout:", "", "```text", to_text(rows).rstrip("\n"), "```", ""]
    files["classification_report.md"] = out / "classification_report.md"
    files["classification_report.md"].write_text("\n".join(md), encoding="utf-8")
    files["classification_report.csv"] = _write_csv(out / "classification_report.csv", rows, TABLE_COLUMNS)
    files["confusion_matrix.csv"] = _write_csv(out / "confusion_matrix.csv", cm_rows, list(cm_rows[0]))
    files["confusion_matrix.png"] = plot_confusion_matrix(cm, names, out / "confusion_matrix.png", title=title)

    auroc = [r["auroc"] for r in rows[:num_classes]]
    auc_rows = [{"class": n, "auroc": a, "support": r["support"]} for n, a, r in zip(names, auroc, rows)]
    auc_rows.append({"class": "macro avg", "auroc": rows[-2]["auroc"], "support": len(target)})
    auc_rows.append({"class": "weighted avg", "auroc": rows[-1]["auroc"], "support": len(target)})
    files["auroc.csv"] = _write_csv(out / "auroc.csv", auc_rows, ("class", "auroc", "support"))
    fpr, tpr = roc_curves(probs, target, num_classes)
    files["roc.png"] = plot_roc(fpr, tpr, [math.nan if a is None else a for a in auroc], names, out / "roc.png", title)
    return files


def _plain_markdown(rows: Sequence[Mapping[str, Any]], digits: int = 4) -> str:
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join(["---"] + ["---:"] * (len(columns) - 1)) + "|"]
    lines += ["| " + " | ".join(_fmt(r.get(c), digits) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


# segmentation ----------------------------------------------------------------------------------------------
def segmentation_metric_collection(threshold: float = 0.5) -> MetricCollection:
    """The segmenter's metrics (pooled pixels + per-image Dice), as ``LungSegmenter`` computes them."""
    with warnings.catch_warnings():  # torchmetrics warns about a default we set explicitly
        warnings.filterwarnings("ignore", message=".*DiceScore metric currently defaults.*")
        per_image = DiceScore(num_classes=1, average="micro", aggregation_level="samplewise")
    return MetricCollection(
        {
            "iou": BinaryJaccardIndex(threshold=threshold),
            "dice": BinaryF1Score(threshold=threshold),
            "precision": BinaryPrecision(threshold=threshold),
            "recall": BinaryRecall(threshold=threshold),
            "accuracy": BinaryAccuracy(threshold=threshold),
            "dice_per_image": per_image,
        },
        compute_groups=False,
    )


def _update_segmentation(
    metrics: MetricCollection, probs: torch.Tensor, target: torch.Tensor, threshold: float
) -> None:
    target = target.long()
    for name, metric in metrics.items(keep_base=True):
        if name == "dice_per_image":
            metric.update((probs > threshold).long(), target)
        else:
            metric.update(probs, target)


def segmentation_metrics(probs: torch.Tensor, target: torch.Tensor, threshold: float = 0.5) -> dict[str, float]:
    """IoU, Dice, precision, recall, accuracy over all pixels + mean per-image Dice, for (N, 1, H, W) inputs."""
    metrics = segmentation_metric_collection(threshold)
    _update_segmentation(metrics, probs.float(), target, threshold)
    return {k: float(v) for k, v in metrics.compute().items()}


def segmentation_rows(values: Mapping[str, float], num_images: int, threshold: float) -> list[dict[str, Any]]:
    """Report rows ``{metric, name, value}`` in report order, then the image count and threshold."""
    rows = [{"metric": k, "name": SEGMENTATION_NAMES[k], "value": float(values[k])} for k in SEGMENTATION_NAMES]
    rows.append({"metric": "images", "name": "images", "value": int(num_images)})
    rows.append({"metric": "threshold", "name": "threshold", "value": float(threshold)})
    return rows


def write_segmentation_report(
    rows: Sequence[Mapping[str, Any]],
    out_dir: str | Path,
    overlays: np.ndarray | None = None,
    title: str = "",
    note: str = "",
) -> dict[str, Path]:
    """``segmentation_report.{md,csv}`` (+ ``overlays.png`` from an HxWx3 grid) into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lines = [
        f"# {title or 'Segmentation report'}",
        "",
        *([note, ""] if note else []),
        "| metric | value |",
        "|---|---:|",
    ]
    lines += [f"| {r['name']} | {_fmt(r['value'], 4)} |" for r in rows]
    lines += ["", "IoU, Dice, precision, recall and accuracy are pooled over every pixel of the split (as the lab "]
    lines += ["reported them); mean per-image Dice averages each image's own Dice.", ""]
    files = {"segmentation_report.md": out / "segmentation_report.md"}
    files["segmentation_report.md"].write_text("\n".join(lines), encoding="utf-8")
    files["segmentation_report.csv"] = _write_csv(out / "segmentation_report.csv", rows, ("metric", "value"))
    if overlays is not None:
        files["overlays.png"] = out / "overlays.png"
        Image.fromarray(overlays).save(files["overlays.png"])
    return files


# the callback ------------------------------------------------------------------------------------------------
class _Collector(Metric):
    """Concatenates probabilities and targets; torchmetrics gathers them across ranks (uneven sizes too)."""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("probs", default=[], dist_reduce_fx="cat")
        self.add_state("target", default=[], dist_reduce_fx="cat")

    def update(self, probs: torch.Tensor, target: torch.Tensor) -> None:
        self.probs.append(probs.detach().float())
        self.target.append(target.detach().long())

    def compute(self) -> tuple[torch.Tensor, torch.Tensor]:
        return dim_zero_cat(self.probs), dim_zero_cat(self.target)


class EvaluationReport(L.Callback):
    """Write the lab's evaluation report into ``<log_dir>/report_<split>/`` after validate/test.

    For an :class:`~covid_lightning.XRayClassifier`: ``classification_report.{md,csv}`` (per class
    precision, recall, F1, support, AUROC; accuracy, macro avg, weighted avg), ``confusion_matrix.{csv,png}``
    (counts and row-normalised), ``roc.png`` and ``auroc.csv``. For a
    :class:`~covid_lightning.LungSegmenter`: ``segmentation_report.{md,csv}`` and ``overlays.png``.

    The probabilities come from the ``outputs`` of the batch-end hooks (what ``validation_step`` /
    ``test_step`` return). Metrics are torchmetrics states, synchronised across ranks (DDP) when computed;
    rank 0 writes. Nothing is written for a stage that ran no batches.

    Args:
        stages: when to report: ``validate`` and ``test`` (the CLI subcommands), ``fit`` = the last
            validation epoch of a fit (the final weights, not necessarily the best checkpoint's).
        num_images: rows of the segmentation overlay grid (the first images of the split).
    """

    def __init__(self, stages: Sequence[str] = ("validate", "test"), num_images: int = 6) -> None:
        unknown = set(stages) - set(_SPLIT)
        if unknown:
            raise ValueError(f"Unknown stages {sorted(unknown)}; choose from {', '.join(_SPLIT)}.")
        self.stages = tuple(stages)
        self.num_images = num_images
        #: report folder -> {file name: path}, for every report written
        self.written: dict[str, dict[str, Path]] = {}
        #: split -> the last report's rows (classification table or segmentation rows)
        self.results: dict[str, list[dict[str, Any]]] = {}
        self._reset()

    def _reset(self) -> None:
        self._fn: str | None = None
        self._kind: str | None = None
        self._metric: Metric | MetricCollection | None = None
        self._batches = 0
        self._samples = 0
        self._threshold = 0.5
        self._overlays: dict[str, list[torch.Tensor]] = {"image": [], "mask": [], "pred": []}

    # collection ------------------------------------------------------------------------------------------
    def _start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._reset()
        fn = getattr(trainer.state.fn, "value", trainer.state.fn)
        if trainer.sanity_checking or fn not in self.stages:
            return
        self._fn = fn
        self._kind = pl_module.task
        self._threshold = float(getattr(pl_module, "threshold", 0.5))
        metric = _Collector() if self._kind == "classification" else segmentation_metric_collection(self._threshold)
        self._metric = metric.to(pl_module.device)

    def _collect(self, outputs: Any, batch: Any) -> None:
        if self._metric is None:
            return
        if not isinstance(outputs, Mapping) or "probs" not in outputs or "target" not in outputs:
            raise TypeError("EvaluationReport needs validation_step/test_step to return {'probs', 'target', ...}.")
        probs, target = outputs["probs"].detach().float(), outputs["target"].detach()
        self._batches += 1
        self._samples += int(target.shape[0])
        if self._kind == "classification":
            self._metric.update(probs, target)
            return
        _update_segmentation(self._metric, probs, target, self._threshold)
        have = sum(len(x) for x in self._overlays["image"])
        if have < self.num_images and isinstance(batch, Mapping) and "image" in batch:
            take = self.num_images - have
            self._overlays["image"].append(batch["image"][:take].detach().cpu())
            self._overlays["mask"].append(target[:take].detach().cpu())
            self._overlays["pred"].append((probs[:take] > self._threshold).detach().cpu())

    def _finish(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Compute on every rank (synchronised), write on rank 0."""
        if self._metric is None or self._fn is None:
            return
        split = _SPLIT[self._fn]
        counts = torch.tensor([self._batches, self._samples], dtype=torch.long, device=pl_module.device)
        counts = trainer.strategy.reduce(counts, reduce_op="sum")
        batches, samples = int(counts[0]), int(counts[1])
        if batches == 0:
            log.info("EvaluationReport: the %s stage ran no batches; no report written.", split)
            self._reset()
            return
        out_dir = Path(trainer.log_dir or trainer.default_root_dir) / f"report_{split}"  # log_dir is collective
        title = f"{type(pl_module).__name__}, {split} split" + (", last validation of fit" if self._fn == "fit" else "")
        ckpt = getattr(trainer, "ckpt_path", None)
        note = f"Checkpoint: `{ckpt}`." if ckpt else ""
        if self._kind == "classification":
            probs, target = self._metric.compute()
            if trainer.is_global_zero:
                names = getattr(pl_module, "class_names", None)
                files = write_classification_report(probs, target, names, out_dir, title=title, note=note)
                self.results[split] = classification_table(probs, target, names)
                self._done(out_dir, files)
        else:
            values = {k: float(v) for k, v in self._metric.compute().items()}
            if trainer.is_global_zero:
                rows = segmentation_rows(values, samples, self._threshold)
                grid = None
                if self._overlays["image"]:
                    grid = overlay_grid(
                        torch.cat(self._overlays["image"]),
                        torch.cat(self._overlays["mask"]).float(),
                        torch.cat(self._overlays["pred"]).float(),
                    )
                files = write_segmentation_report(rows, out_dir, grid, title=title, note=note)
                self.results[split] = rows
                self._done(out_dir, files)
        self._reset()

    def _done(self, out_dir: Path, files: dict[str, Path]) -> None:
        self.written[out_dir.name] = files
        log.info("Evaluation report written to %s: %s", out_dir, ", ".join(sorted(files)))

    # hooks ---------------------------------------------------------------------------------------------------
    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start(trainer, pl_module)

    def on_validation_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._collect(outputs, batch)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._fn == "validate":
            self._finish(trainer, pl_module)
        # during fit the last validation epoch's states are kept until on_fit_end

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._fn == "fit":
            self._finish(trainer, pl_module)

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start(trainer, pl_module)

    def on_test_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._collect(outputs, batch)

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._fn == "test":
            self._finish(trainer, pl_module)
