"""Evaluation reports for ``validate`` / ``test``: the lab's tables (lists of dict rows) and figures, on disk."""

from __future__ import annotations

import csv
import logging
import math
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from matplotlib.figure import Figure
from torchmetrics import CatMetric, SumMetric
from torchmetrics.classification import MulticlassConfusionMatrix, MulticlassROC
from torchmetrics.functional.classification import (
    multiclass_accuracy,
    multiclass_auroc,
    multiclass_calibration_error,
    multiclass_confusion_matrix,
    multiclass_f1_score,
    multiclass_precision,
    multiclass_recall,
)

from covid_lightning.callbacks.overlays import overlay_figure, per_image_scores
from covid_lightning.inference import to_rgb_uint8
from covid_lightning.modules.metrics import bootstrap, classification_scores, pair_choice
from covid_lightning.plotting import image_panels, save_figure

#: bootstrap resamples (over images) behind every interval of a report; below ``FEW`` images a figure is flagged
RESAMPLES, FEW = 1000, 30

log = logging.getLogger(__name__)

#: segmentation metrics in report order: key -> display name
SEGMENTATION_NAMES: dict[str, str] = {
    "iou": "IoU (Jaccard)", "dice": "Dice (F1)", "precision": "precision", "recall": "recall",
    "accuracy": "pixel accuracy", "dice_per_image": "mean per-image Dice",
}  # fmt: skip


# tables ----------------------------------------------------------------------------------------------------
def _fmt(value: Any, digits: int) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _columns(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    return list(dict.fromkeys(k for r in rows for k in r))


def to_markdown(rows: Sequence[Mapping[str, Any]], digits: int = 4) -> str:
    """Dict rows as a GitHub table (columns: every key, in order of appearance; first one left-aligned)."""
    columns = _columns(rows)
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join(["---"] + ["---:"] * (len(columns) - 1)) + "|"]
    lines += ["| " + " | ".join(_fmt(r.get(c), digits) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_csv(path: Path, rows: Sequence[Mapping[str, Any]]) -> Path:
    """Dict rows as CSV (None -> empty cell)."""
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, _columns(rows))
        writer.writeheader()
        writer.writerows(rows)
    return path


# classification --------------------------------------------------------------------------------------------
def confusion_matrix(probs: torch.Tensor, target: torch.Tensor, num_classes: int) -> np.ndarray:
    """(C, C) counts, rows true class, columns predicted class (argmax of ``probs``, or labels)."""
    probs = torch.as_tensor(probs).cpu()
    probs = probs.float() if probs.ndim == 2 else probs.long()
    return multiclass_confusion_matrix(probs, torch.as_tensor(target).long().cpu(), num_classes=num_classes).numpy()


def classification_table(probs: torch.Tensor, target: torch.Tensor, class_names: Sequence[str]) -> list[dict[str, Any]]:
    """sklearn's ``classification_report`` as rows + one-vs-rest AUROC (``probs``: (N, C), or (N,) labels: no AUROC)."""
    target, probs = torch.as_tensor(target).long().flatten().cpu(), torch.as_tensor(probs).cpu()
    probs = probs.float() if probs.ndim == 2 else probs.long()
    n = len(class_names)
    kw: dict[str, Any] = {"num_classes": n, "average": None}
    scores = {
        "precision": multiclass_precision(probs, target, **kw).numpy(),
        "recall": multiclass_recall(probs, target, **kw).numpy(),
        "f1-score": multiclass_f1_score(probs, target, **kw).numpy(),
    }
    support = np.bincount(target.numpy(), minlength=n)
    auroc: list[float | None] = [None] * n
    if probs.ndim == 2:
        with warnings.catch_warnings():  # torchmetrics warns (and returns 0) for classes without positives
            warnings.simplefilter("ignore")
            values = multiclass_auroc(probs, target, num_classes=n, average=None, thresholds=None).tolist()
        auroc = [v if 0 < s < len(target) else None for v, s in zip(values, support)]
    rows: list[dict[str, Any]] = [
        {"class": name, **{k: float(v[i]) for k, v in scores.items()}, "support": int(support[i]), "auroc": auroc[i]}
        for i, name in enumerate(class_names)
    ]
    accuracy = float(multiclass_accuracy(probs, target, num_classes=n, average="micro"))
    total = int(support.sum())
    accuracy_row = {"precision": None, "recall": None, "f1-score": accuracy, "support": total, "auroc": None}
    rows.append({"class": "accuracy", **accuracy_row})
    defined = [i for i in range(n) if auroc[i] is not None]
    for name, weights in (("macro avg", np.ones(n)), ("weighted avg", support)):
        averages = {k: float(np.average(v, weights=weights)) for k, v in scores.items()}
        auc = float(np.average([auroc[i] for i in defined], weights=weights[defined])) if defined else None
        rows.append({"class": name, **averages, "support": total, "auroc": auc})
    return rows


def to_text(rows: Sequence[Mapping[str, Any]], digits: int = 2) -> str:
    """The rows in sklearn's ``classification_report`` text layout (character for character)."""
    headers = ["precision", "recall", "f1-score", "support"]
    width = max([len(str(r["class"])) for r in rows] + [len("weighted avg"), digits])
    report = ("{:>{width}s} " + " {:>9}" * len(headers)).format("", *headers, width=width) + "\n\n"
    for r in rows:
        if r["class"] == "accuracy":
            line = "\n{:>{width}s} " + " {:>9.{digits}}" * 2 + " {:>9.{digits}f} {:>9}\n"
            report += line.format("accuracy", "", "", r["f1-score"], r["support"], width=width, digits=digits)
        else:
            line = "{:>{width}s} " + " {:>9.{digits}f}" * 3 + " {:>9}\n"
            values = [r["precision"], r["recall"], r["f1-score"], r["support"]]
            report += line.format(str(r["class"]), *values, width=width, digits=digits)
    return report


def interval_rows(
    probs: torch.Tensor, target: torch.Tensor, class_names: Sequence[str], seed: int = 0
) -> list[dict[str, Any]]:
    """Headline and per-class metrics, each with its 95% percentile bootstrap interval over images and its n."""
    names = [str(c) for c in class_names]
    pair = (names.index("COVID"), names.index("Normal")) if {"COVID", "Normal"} <= set(names) else None
    target = torch.as_tensor(target).long().cpu()
    scores = bootstrap(classification_scores(probs, target, names, pair), len(target), RESAMPLES, seed=seed)
    support = np.bincount(target.numpy(), minlength=len(names))
    label = {"pair_accuracy": "COVID vs Normal accuracy", "balanced_accuracy": "balanced accuracy"}
    rows = []
    for key, (value, low, high) in scores.items():
        kind, _, name = key.partition("/")
        n = int(support[names.index(name)]) if name else len(target)
        n = int(support[list(pair)].sum()) if key == "pair_accuracy" else n
        rows.append({"metric": f"{kind} {name}" if name else label.get(key, key.replace("_", " ")), "value": value})
        rows[-1] |= {"95% CI low": low, "95% CI high": high, "n": n, "note": f"n < {FEW}" if n < FEW else ""}
    return rows


def uncalibrated(probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """The probabilities before temperature scaling: ``softmax(T * log p)`` = ``softmax(logits)``."""
    return (temperature * torch.as_tensor(probs).float().clamp_min(1e-12).log()).softmax(-1)


def reliability(probs: torch.Tensor, target: torch.Tensor, bins: int = 15) -> tuple[float, np.ndarray]:
    """ECE (torchmetrics, L1, ``bins`` equal-width confidence bins) and per bin (confidence, accuracy, count)."""
    probs, target = torch.as_tensor(probs).float().cpu(), torch.as_tensor(target).long().cpu()
    ece = float(multiclass_calibration_error(probs, target, probs.shape[1], n_bins=bins))
    confidence, correct = probs.max(1).values.numpy(), (probs.argmax(1) == target).numpy()
    which = np.minimum((confidence * bins).astype(int), bins - 1)
    table = np.array([
        [confidence[which == b].mean(), correct[which == b].mean(), (which == b).sum()] if (which == b).any()
        else [np.nan, np.nan, 0]
        for b in range(bins)
    ])  # fmt: skip
    return ece, table


def write_classification_report(
    probs: torch.Tensor, target: torch.Tensor, class_names: Sequence[str], out: Path, title: str, note: str = "",
    temperature: float = 1.0,
) -> list[dict[str, Any]]:  # fmt: skip
    """The classification tables and figures into ``out``; returns the table rows."""
    names, n = list(class_names), len(class_names)
    rows = classification_table(probs, target, names)
    cm = confusion_matrix(probs, target, n)
    cm_rows = [{"true class": name, **dict(zip(names, map(int, cm[i])))} for i, name in enumerate(names)]
    intervals = interval_rows(probs, target, names)
    few = [f"{r['class']} (n={r['support']})" for r in rows[:n] if r["support"] < FEW]
    md = [f"# {title}", "", f"{len(target)} images. {note}".rstrip(), ""]
    if few:
        md += [f"**Warning: fewer than {FEW} images for {', '.join(few)}: their figures are unreliable.**", ""]
    md += [f"95% bootstrap intervals ({RESAMPLES} seeded resamples of the images, percentile):", ""]
    md += [to_markdown(intervals, 3), to_markdown(rows)]
    calibration = []
    for label, p in (("temperature 1 (uncalibrated)", uncalibrated(probs, temperature)), ("as given", probs)):
        ece, table = reliability(p, target)
        calibration.append({"probabilities": label, "temperature": 1.0 if "1 (" in label else temperature, "ECE": ece})
        calibration[-1]["bins"] = table
    md += ["Calibration (expected calibration error, 15 confidence bins; temperature fitted on the validation split):"]
    md += ["", to_markdown([{k: v for k, v in c.items() if k != "bins"} for c in calibration], 4)]
    md += ["Confusion matrix (rows: true class, columns: predicted class):", "", to_markdown(cm_rows)]
    md += ["The lab's `classification_report` layout:", "", "```text", to_text(rows).rstrip("\n"), "```", ""]
    (out / "classification_report.md").write_text("\n".join(md), encoding="utf-8")
    write_csv(out / "classification_report.csv", rows)
    write_csv(out / "intervals.csv", intervals)
    write_csv(out / "calibration.csv", [{k: v for k, v in c.items() if k != "bins"} for c in calibration])
    write_csv(out / "confusion_matrix.csv", cm_rows)
    write_csv(
        out / "auroc.csv", [{k: r.get(k) for k in ("class", "auroc", "support")} for r in rows if r is not rows[n]]
    )

    fig = Figure(figsize=(2 * max(4.5, 1.1 * n + 2) + 1, max(4.5, 1.1 * n + 2)), layout="constrained")
    counts, normalised = fig.subplots(1, 2)
    plot = MulticlassConfusionMatrix(n).plot
    plot(torch.as_tensor(cm), ax=counts, labels=names)
    plot(torch.as_tensor(cm / np.maximum(cm.sum(1, keepdims=True), 1)), ax=normalised, labels=names)
    counts.set_title("counts")
    normalised.set_title("row-normalised")
    save_figure(fig, out / "confusion_matrix.png", title)

    roc = MulticlassROC(n, thresholds=None, sync_on_compute=False)  # rank 0 alone draws
    roc.update(torch.as_tensor(probs).float().cpu(), torch.as_tensor(target).long().cpu())
    fig = Figure(figsize=(6.0, 5.5), layout="constrained")
    ax = fig.subplots()
    with warnings.catch_warnings():  # classes without positives: torchmetrics warns, the curve is flat
        warnings.simplefilter("ignore")
        roc.plot(score=True, ax=ax, labels=names)
    ax.set_title("ROC (one-vs-rest)")
    save_figure(fig, out / "roc.png", title)

    fig = Figure(figsize=(5.5, 5.5), layout="constrained")
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], color="0.6", linestyle="--", label="perfectly calibrated")
    for c in calibration:
        ax.plot(c["bins"][:, 0], c["bins"][:, 1], marker="o", label=f"T = {c['temperature']:.2f}, ECE {c['ECE']:.3f}")
    ax.set(xlabel="confidence (top class probability)", ylabel="accuracy", xlim=(0, 1), ylim=(0, 1.02))
    ax.set_title(f"Reliability diagram ({len(target)} images)")
    ax.legend(loc="upper left")
    save_figure(fig, out / "reliability.png", title)
    return rows


def error_figure(errors: Sequence[Mapping[str, Any]], class_names: Sequence[str]) -> Figure:
    """Misclassified images (``image``, ``path``, ``true``, ``pred``, ``p``: the predicted class's probability), each
    titled with its file name, true class and predicted class."""
    titles = [f"{Path(e['path']).name}\ntrue {class_names[int(e['true'])]}\npredicted "
              f"{class_names[int(e['pred'])]}, p {float(e['p']):.2f}" for e in errors]  # fmt: skip
    return image_panels([to_rgb_uint8(e["image"]) for e in errors], titles)[0]


def save_errors(
    worst: Sequence[Mapping[str, Any]],
    probs: torch.Tensor,
    target: torch.Tensor,
    class_names: Sequence[str],
    path: Path,
    title: str,
) -> None:
    """``worst_cases.png``: the most confident errors, captioned with how many errors and images there were."""
    if worst:
        errors = int((probs.argmax(1) != target).sum())
        what = f"The {len(worst)} most confident of {errors} errors ({len(target)} images)"
        save_figure(error_figure(worst, class_names), path, f"{title}\n{what}")


def _lowest(items: Sequence[dict[str, Any]], k: int) -> list[dict[str, Any]]:
    """The ``k`` items of lowest ``score``, one per ``path`` (the distributed sampler repeats images)."""
    return sorted({item["path"]: item for item in items}.values(), key=lambda item: item["score"])[:k]


def external_summary(
    probs: torch.Tensor, target: torch.Tensor, class_names: Sequence[str], source: str
) -> list[dict[str, Any]]:
    """An external set's accuracy, balanced accuracy (classes present) and, deciding COVID vs Normal by
    :func:`pair_choice`, sensitivity, specificity and their mean; each with its 95% interval."""
    probs, target = torch.as_tensor(probs).float().cpu(), torch.as_tensor(target).long().cpu()
    names, y = [str(c) for c in class_names], target.numpy()
    pair = [names.index("COVID"), names.index("Normal")] if {"COVID", "Normal"} <= set(names) else []
    keys = ["sensitivity (COVID)", "specificity (Normal)", "balanced COVID vs Normal accuracy"][: 3 * bool(pair)]
    headline = classification_scores(probs, target, names)
    right = [(pair_choice(probs.numpy(), *pair) == y) & (y == c) for c in pair]  # per class of the pair: its hits

    def scores(idx: np.ndarray) -> dict[str, np.ndarray]:
        with np.errstate(invalid="ignore"):  # no image of the class: NaN
            recall = [hit[idx].sum(1) / (y[idx] == c).sum(1) for hit, c in zip(right, pair)]
        out = {k.replace("_", " "): v for k, v in headline(idx).items() if k in ("accuracy", "balanced_accuracy")}
        return out | dict(zip(keys, [*recall, sum(recall) / 2]))

    counts = np.bincount(y, minlength=len(names))
    n = dict(zip(keys, [*counts[pair], counts[pair].sum()])) if pair else {}
    return [
        {"source": source, "metric": k, "value": v, "95% CI low": lo, "95% CI high": hi, "n": int(n.get(k, len(y)))}
        for k, (v, lo, hi) in bootstrap(scores, len(y), RESAMPLES).items()
    ]


def write_segmentation_report(
    values: Mapping[str, float], images: int, threshold: float, out: Path, title: str, note: str = "",
    per_image: Mapping[str, torch.Tensor] | None = None,
) -> list[dict[str, Any]]:  # fmt: skip
    """``segmentation_report.{md,csv}`` from the module's metric values (and per-image intervals); returns the rows."""
    rows = [{"metric": k, "value": float(values[k])} for k in SEGMENTATION_NAMES]
    rows += [{"metric": "images", "value": images}, {"metric": "threshold", "value": float(threshold)}]
    table = to_markdown(
        [{"metric": SEGMENTATION_NAMES.get(r["metric"], r["metric"]), "value": r["value"]} for r in rows]
    )
    md = [f"# {title}", "", *([note, ""] if note else []), table]
    md += ["IoU, Dice, precision, recall and accuracy are pooled over every pixel of the split (as the lab reported"]
    md += ["them); mean per-image Dice averages each image's own Dice.", ""]
    if per_image:
        scores = {k: v.double().cpu().numpy() for k, v in per_image.items()}
        found = bootstrap(lambda i: {k: v[i].mean(1) for k, v in scores.items()}, images, RESAMPLES)
        intervals = [
            {"metric": f"mean per-image {'Dice' if k == 'dice' else 'IoU'}", "value": v, "95% CI low": lo}
            | {"95% CI high": hi, "n": images, "note": f"n < {FEW}" if images < FEW else ""}
            for k, (v, lo, hi) in found.items()
        ]
        md += [f"95% bootstrap intervals ({RESAMPLES} seeded resamples of the images, percentile):", ""]
        md += [to_markdown(intervals, 3)]
        write_csv(out / "intervals.csv", intervals)
    (out / "segmentation_report.md").write_text("\n".join(md), encoding="utf-8")
    write_csv(out / "segmentation_report.csv", rows)
    return rows


# the callback ------------------------------------------------------------------------------------------------
class EvaluationReport(L.Callback):
    """Write the lab's evaluation report (tables and figures) into ``<log_dir>/report_<split>/`` after validate/test.

    Args:
        stages: when to report: ``validate``, ``test``, ``fit`` (the last validation epoch of a fit).
        num_images: panels of the figures: ``worst_cases.png`` (the lowest per-image Dice, or the most confident
            errors) and the segmentation ``overlays.png`` (the first images of the split).
    """

    def __init__(
        self, stages: Sequence[Literal["fit", "validate", "test"]] = ("validate", "test"), num_images: int = 6
    ) -> None:
        self.stages, self.num_images = tuple(stages), num_images
        #: report folder -> {file name: path}, for every report written
        self.written: dict[str, dict[str, Path]] = {}
        #: split -> the last report's rows
        self.results: dict[str, list[dict[str, Any]]] = {}
        self._states: dict[str, Any] | None = None
        self._pending: tuple[str, Any] | None = None

    def _start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._states = self._pending = None
        if not trainer.sanity_checking and trainer.state.fn.value in self.stages:
            metrics = {"images": SumMetric(), "probs": CatMetric("disable"), "target": CatMetric("disable")}
            metrics |= {"dice": CatMetric("disable"), "iou": CatMetric("disable")}
            self._states = {k: m.to(pl_module.device) for k, m in metrics.items()}
            self._states |= {"first": [], "worst": {}, "external": {}}  # worst cases by source

    def _collect(self, pl_module: L.LightningModule, outputs: Mapping[str, Any], batch: Any) -> None:
        if self._states is None:
            return
        probs, target = outputs["probs"].detach().float(), outputs["target"].detach()
        source = outputs.get("source", "in-distribution")  # the model names an external test set's batches
        if source != "in-distribution":  # an external test set: its own predictions, its own report
            external = self._states["external"]
            if source not in external:
                external[source] = [CatMetric("disable").to(pl_module.device) for _ in range(2)]
            external[source][0].update(probs)
            external[source][1].update(target)
        else:
            self._states["images"].update(len(target))
            if pl_module.task == "classification":
                self._states["probs"].update(probs)
                self._states["target"].update(target)
        if pl_module.task == "classification":
            confidence, predicted = probs.max(1)
            score = torch.where(predicted != target, -confidence, torch.inf)  # the most confident errors first
            extra = {"true": target, "pred": predicted, "p": confidence}
        else:  # segmentation: in-distribution only (external sets are classification data)
            threshold = pl_module.describe()["threshold"]
            scores = per_image_scores(probs, target, threshold)
            for key, values in scores.items():
                self._states[key].update(values)
            score, extra = scores["dice"], {"truth": target > 0.5, "pred": probs > threshold}
        if "image" not in batch:  # cached features: no pictures to show
            return
        paths, score = batch.get("path") or [str(i) for i in range(len(target))], score.float().cpu()

        def item(i: int) -> dict[str, Any]:
            picture = {"score": float(score[i]), "image": batch["image"][i].cpu(), "path": str(paths[i])}
            return picture | {key: value[i].cpu() for key, value in extra.items()}

        if pl_module.task != "classification":
            first = self._states["first"]
            first += [item(i) for i in range(min(self.num_images - len(first), len(target)))]
        order = score.argsort()[: self.num_images].tolist()
        worst = self._states["worst"].get(source, []) + [item(i) for i in order if score[i] < torch.inf]
        self._states["worst"][source] = _lowest(worst, self.num_images)

    def _finish(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Compute on every rank (synchronised); write now, or at the end of fit."""
        if self._states is None:
            return
        split = "test" if trainer.testing else "val"
        images = int(self._states["images"].compute()) if self._states["images"].update_count else 0
        external = {k: (p.compute(), t.compute().long()) for k, (p, t) in self._states["external"].items()}
        if not images and not external:
            log.info("EvaluationReport: the %s stage ran no batches; no report written.", split)
            self._states = None
            return
        data: Any = None  # only external test sets ran
        if images and pl_module.task == "classification":
            data = (self._states["probs"].compute(), self._states["target"].compute().long())
        elif images:
            values = {k.split("/", 1)[1]: float(v) for k, v in pl_module.stage_metrics(split).compute().items()}
            per_image = {k: self._states[k].compute() for k in ("dice", "iou")}
            data = (values, images, self._states["first"], per_image)
        worst = self._states["worst"]
        if trainer.world_size > 1:  # every rank's worst images -> the worst of all, per source
            parts: list[Any] = [None] * trainer.world_size
            torch.distributed.all_gather_object(parts, worst)
            sources = {source for part in parts for source in part}
            worst = {s: _lowest([it for part in parts for it in part.get(s, [])], self.num_images) for s in sources}
        self._pending = (split, data, external, worst)
        if trainer.state.fn.value != "fit":
            self._write(trainer, pl_module)

    def _write(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        split, data, external, worst = self._pending
        self._pending = self._states = None
        out = Path(trainer.log_dir or trainer.default_root_dir) / f"report_{split}"  # log_dir is collective
        if not trainer.is_global_zero:
            return
        if external:
            self._write_external(trainer, pl_module, external, out.parent, worst)
        worst = worst.get("in-distribution", [])
        if data is None:
            return
        out.mkdir(parents=True, exist_ok=True)
        fit = trainer.state.fn.value == "fit"
        title = f"{type(pl_module).__name__}, {split} split" + (", last validation of fit" if fit else "")
        note = f"Checkpoint: `{trainer.ckpt_path}`." if trainer.ckpt_path else ""
        info = pl_module.describe()
        if pl_module.task == "classification":
            rows = write_classification_report(*data, info["class_names"], out, title, note, info["temperature"])
            save_errors(worst, *data, info["class_names"], out / "worst_cases.png", title)
        else:
            values, images, first, per_image = data
            rows = write_segmentation_report(values, images, info["threshold"], out, title, note, per_image)
            shown = {"overlays.png": (first, "first {} of"), "worst_cases.png": (worst, "{} lowest per-image Dice of")}
            for name, (items, what) in shown.items():
                if items:
                    fig = overlay_figure(*([it[k] for it in items] for k in ("image", "pred", "truth")),
                                         names=[Path(it["path"]).name for it in items])  # fmt: skip
                    save_figure(fig, out / name, f"{title}\nThe {what.format(len(items))} {images} images")
        files = {p.name: p for p in sorted(out.iterdir())}
        self.results[split], self.written[out.name] = rows, files
        log.info("Evaluation report written to %s: %s", out, ", ".join(sorted(files)))

    def _write_external(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        external: Mapping[str, Any],
        base: Path,
        worst: Mapping[str, list[dict[str, Any]]],
    ) -> None:
        """``report_external_<source>/`` per external test set (with its worst cases), and
        ``external_summary.{csv,md}`` over them."""
        info, summary = pl_module.describe(), []
        note = f"Checkpoint: `{trainer.ckpt_path}`." if trainer.ckpt_path else ""
        for source, (probs, target) in external.items():
            out = base / f"report_external_{source}"
            out.mkdir(parents=True, exist_ok=True)
            title, names = f"{type(pl_module).__name__}, external test set {source}", info["class_names"]
            rows = write_classification_report(probs, target, names, out, title, note, info["temperature"])
            save_errors(worst.get(source, []), probs, target, names, out / "worst_cases.png", title)
            self.results[f"external/{source}"], self.written[out.name] = rows, {p.name: p for p in out.iterdir()}
            summary += external_summary(probs, target, names, source)
        if len(external) > 1:  # every external film together: e.g. one hospital's COVID against all the normals
            summary += external_summary(*(torch.cat(t) for t in zip(*external.values())), names, "pooled")
        md = f"# External test sets\n\n95% bootstrap intervals ({RESAMPLES} seeded resamples, percentile).\n\n"
        (base / "external_summary.md").write_text(md + to_markdown(summary, 3), encoding="utf-8")
        files = [write_csv(base / "external_summary.csv", summary), base / "external_summary.md"]
        self.results["external_summary"], self.written["external_summary"] = summary, {p.name: p for p in files}
        log.info("External test reports written to %s: %s", base, ", ".join(external))

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start(trainer, pl_module)

    def on_validation_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:  # fmt: skip
        self._collect(pl_module, outputs, batch)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._finish(trainer, pl_module)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._pending is not None:
            self._write(trainer, pl_module)

    on_test_epoch_start = on_validation_epoch_start
    on_test_batch_end = on_validation_batch_end
    on_test_epoch_end = on_validation_epoch_end
