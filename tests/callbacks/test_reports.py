"""EvaluationReport: the report's numbers against independent computations, and the files a test/validate run writes."""

from __future__ import annotations

import csv
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from PIL import Image

from covid_lightning import LungSegmentationDataModule, LungSegmenter, RadiographyDataModule, XRayClassifier
from covid_lightning.callbacks import reports
from covid_lightning.callbacks.reports import (
    EvaluationReport,
    classification_table,
    confusion_matrix,
    error_figure,
    to_markdown,
    to_text,
)
from covid_lightning.modules.classifier import metric_key

CLASSIFICATION_FILES = {
    "classification_report.md",
    "classification_report.csv",
    "confusion_matrix.png",
    "confusion_matrix.csv",
    "roc.png",
    "auroc.csv",
    "intervals.csv",
    "calibration.csv",
    "reliability.png",
}

# hand-made predictions: 4 classes, class "d" never predicted (precision 0/0 -> 0)
NAMES = ["a", "b", "c", "d"]
TARGET = torch.tensor([0, 0, 0, 0, 1, 1, 1, 2, 2, 2, 3])
PROBS = torch.tensor(
    [
        [0.70, 0.10, 0.10, 0.10],  # a -> a
        [0.60, 0.20, 0.10, 0.10],  # a -> a
        [0.30, 0.40, 0.20, 0.10],  # a -> b
        [0.25, 0.10, 0.55, 0.10],  # a -> c
        [0.10, 0.80, 0.05, 0.05],  # b -> b
        [0.20, 0.50, 0.20, 0.10],  # b -> b
        [0.45, 0.35, 0.10, 0.10],  # b -> a
        [0.10, 0.10, 0.75, 0.05],  # c -> c
        [0.05, 0.15, 0.65, 0.15],  # c -> c
        [0.10, 0.50, 0.30, 0.10],  # c -> b
        [0.40, 0.10, 0.15, 0.35],  # d -> a
    ]
)


def _by_hand(cm: np.ndarray) -> dict[str, np.ndarray | float]:
    """Precision/recall/F1/support/accuracy/averages straight from the confusion matrix."""
    tp = np.diag(cm).astype(float)
    col, row = cm.sum(axis=0), cm.sum(axis=1)
    precision = np.divide(tp, col, out=np.zeros_like(tp), where=col > 0)
    recall = np.divide(tp, row, out=np.zeros_like(tp), where=row > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    support = row
    return {
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "support": support,
        "accuracy": tp.sum() / cm.sum(),
        "macro": np.array([precision.mean(), recall.mean(), f1.mean()]),
        "weighted": np.array([(x * support).sum() / support.sum() for x in (precision, recall, f1)]),
    }


def _mann_whitney_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    pos, neg = scores[positive], scores[~positive]
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(greater / (len(pos) * len(neg)))


def test_table_equals_computation_from_confusion_matrix():
    cm_hand = np.zeros((4, 4), dtype=int)
    for t, p in zip(TARGET.tolist(), PROBS.argmax(1).tolist()):
        cm_hand[t, p] += 1
    np.testing.assert_array_equal(confusion_matrix(PROBS, TARGET, 4), cm_hand)
    expected = _by_hand(cm_hand)

    rows = classification_table(PROBS, TARGET, NAMES)
    assert [r["class"] for r in rows] == [*NAMES, "accuracy", "macro avg", "weighted avg"]
    for i, row in enumerate(rows[:4]):
        assert row["precision"] == pytest.approx(expected["precision"][i])
        assert row["recall"] == pytest.approx(expected["recall"][i])
        assert row["f1-score"] == pytest.approx(expected["f1"][i])
        assert row["support"] == expected["support"][i]
        auc = _mann_whitney_auc(PROBS[:, i].numpy(), (i == TARGET).numpy())
        assert row["auroc"] == pytest.approx(auc)
    assert rows[3]["precision"] == 0.0  # "d" never predicted: 0, as sklearn's zero_division
    acc = rows[4]
    assert acc["precision"] is None and acc["recall"] is None and acc["auroc"] is None
    assert acc["f1-score"] == pytest.approx(expected["accuracy"]) and acc["support"] == len(TARGET)
    for row, key in ((rows[5], "macro"), (rows[6], "weighted")):
        assert [row["precision"], row["recall"], row["f1-score"]] == pytest.approx(expected[key].tolist())
        assert row["support"] == len(TARGET)
    aucs = np.array([r["auroc"] for r in rows[:4]])
    assert rows[5]["auroc"] == pytest.approx(aucs.mean())
    assert rows[6]["auroc"] == pytest.approx((aucs * expected["support"]).sum() / len(TARGET))


def test_labels_instead_of_probabilities_and_absent_class():
    rows = classification_table(PROBS.argmax(1), TARGET, NAMES)
    assert rows[0]["precision"] == pytest.approx(classification_table(PROBS, TARGET, NAMES)[0]["precision"])
    assert all(r["auroc"] is None for r in rows)
    # class "d" absent from the targets: its AUROC is undefined, the averages skip it
    keep = TARGET != 3
    rows = classification_table(PROBS[keep], TARGET[keep], NAMES)
    assert rows[3]["support"] == 0 and rows[3]["auroc"] is None
    assert rows[5]["auroc"] == pytest.approx(np.mean([r["auroc"] for r in rows[:3]]))


def test_markdown_and_text_layout():
    rows = classification_table(PROBS, TARGET, NAMES)
    md = to_markdown(rows).splitlines()
    assert md[0] == "| class | precision | recall | f1-score | support | auroc |"
    assert len(md) == 2 + 7 and md[6].startswith("| accuracy |  |  | ")
    text = to_text(rows)
    assert text.splitlines()[0].split() == ["precision", "recall", "f1-score", "support"]
    assert "    accuracy" in text and "weighted avg" in text


def test_external_summary_equals_a_hand_computation_resample_by_resample():
    """Values and n by hand (COVID vs Normal: the larger of the two probabilities), and the intervals of the plain
    seeded percentile bootstrap: one ``rng.integers`` draw per resample and metric, in that order."""
    names = ["COVID", "Lung_Opacity", "Normal", "Viral Pneumonia"]
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 3, (60,), generator=g)  # no Viral Pneumonia: balanced accuracy over the classes present
    y[y == 0] = torch.where(torch.arange(int((y == 0).sum())) < 4, 0, 1)  # 4 COVID: absent from some resamples
    probs = (torch.randn(60, 4, generator=g) + torch.nn.functional.one_hot(y, 4)).softmax(1)
    p, t = probs.numpy(), y.numpy()

    def by_hand(i: np.ndarray) -> dict[str, float]:
        pred, pair, yi = p[i].argmax(1), np.where(p[i, 0] >= p[i, 2], 0, 2), t[i]
        sens = np.mean(pair[yi == 0] == 0) if (yi == 0).any() else np.nan
        spec = np.mean(pair[yi == 2] == 2) if (yi == 2).any() else np.nan
        balanced = np.mean([np.mean(pred[yi == c] == c) for c in np.unique(yi)])
        out = {"accuracy": np.mean(pred == yi), "balanced accuracy": balanced, "sensitivity (COVID)": sens}
        return out | {"specificity (Normal)": spec, "balanced COVID vs Normal accuracy": (sens + spec) / 2}

    rng = np.random.default_rng(0)
    point = by_hand(np.arange(60))
    draws = np.array([[by_hand(rng.integers(0, 60, 60))[k] for k in point] for _ in range(reports.RESAMPLES)])
    low, high = np.nanpercentile(draws, [2.5, 97.5], axis=0)
    rows = reports.external_summary(probs, y, names, "site")
    assert [r["metric"] for r in rows] == list(point) and {r["source"] for r in rows} == {"site"}
    assert [r["n"] for r in rows] == [60, 60, 4, int((t == 2).sum()), 4 + int((t == 2).sum())]
    got = np.array([[r["value"], r["95% CI low"], r["95% CI high"]] for r in rows])
    np.testing.assert_allclose(got, np.column_stack([list(point.values()), low, high]), rtol=1e-12)


def test_text_is_sklearns_classification_report():
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    g = torch.Generator().manual_seed(0)
    probs = torch.rand(60, 4, generator=g).softmax(-1)
    target = torch.randint(0, 4, (60,), generator=g)
    names = ["COVID", "Lung_Opacity", "Normal", "Viral Pneumonia"]
    rows = classification_table(probs, target, names)
    for digits in (2, 4):
        expected = sklearn_metrics.classification_report(
            target.numpy(), probs.argmax(1).numpy(), labels=range(4), target_names=names, digits=digits, zero_division=0
        )
        assert to_text(rows, digits) == expected
    auc = sklearn_metrics.roc_auc_score(target.numpy(), probs.numpy(), multi_class="ovr", average=None)
    assert [r["auroc"] for r in rows[:4]] == pytest.approx(auc.tolist())


# with a Trainer ----------------------------------------------------------------------------------------
def _trainer(tmp_path: Path, callbacks: list[L.Callback], **kw) -> L.Trainer:
    return L.Trainer(
        default_root_dir=tmp_path,
        accelerator="cpu",
        devices=1,
        logger=CSVLogger(tmp_path, name="eval"),
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kw,
    )


def _read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _assert_png(path: Path) -> tuple[int, int]:
    with Image.open(path) as im:
        assert im.format == "PNG"
        im.load()
        return im.size


def test_error_figure_titles_and_lowest_keeps_one_item_per_path():
    errors = [
        {"image": torch.zeros(3, 8, 8, dtype=torch.uint8), "path": "/x/a/a-12.png", "true": 0, "pred": 2, "p": 0.9}
    ]
    assert error_figure(errors, NAMES).axes[0].get_title() == "a-12.png\ntrue a\npredicted c, p 0.90"
    items = [{"path": p, "score": s} for p, s in (("a", 0.5), ("b", 0.1), ("a", 0.5), ("c", 0.9))]
    assert [i["path"] for i in reports._lowest(items, 2)] == ["b", "a"]  # a repeated image counts once


def _collected(task: str, batches: list[tuple]) -> dict:
    """What EvaluationReport keeps for its figures after ``batches`` of (probs, target, paths[, source]), 2 panels:
    the first images and, per source, the worst."""
    report = EvaluationReport(num_images=2)
    module = SimpleNamespace(task=task, device=torch.device("cpu"), describe=lambda: {"threshold": 0.5})
    report._start(
        SimpleNamespace(sanity_checking=False, state=SimpleNamespace(fn=SimpleNamespace(value="test"))), module
    )
    for probs, target, paths, *source in batches:
        image = torch.zeros(len(paths), 3, 4, 4, dtype=torch.uint8)
        outputs = {"probs": probs, "target": target} | ({"source": source[0]} if source else {})
        report._collect(module, outputs, {"image": image, "path": paths})

    def names(items: list[dict]) -> list[tuple[str, float]]:
        return [(Path(i["path"]).name, round(i["score"], 3)) for i in items]

    worst = {f"worst {source}": names(items) for source, items in report._states["worst"].items()}
    return {"first": names(report._states["first"])} | worst


def test_figures_keep_the_first_and_the_worst_images_across_batches():
    truth = torch.zeros(1, 4, 4)
    truth[0, :2] = 1
    half = truth.clone()
    half[0, :, 2:] = 0
    good, bad, part = truth, torch.zeros_like(truth), half  # Dice 1, 0, 2 * 4 / 12
    batches = [(torch.stack([good, part, bad]), torch.stack([truth] * 3), ["a.png", "b.png", "c.png"]),
               (torch.stack([part, bad, good]), torch.stack([truth] * 3), ["d.png", "c.png", "f.png"])]  # fmt: skip
    kept = _collected("segmentation", batches)
    assert kept["first"] == [("a.png", 1.0), ("b.png", 0.667)]
    assert kept["worst in-distribution"] == [("c.png", 0.0), ("b.png", 0.667)]  # lowest Dice first; c.png once
    probs = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])  # true 0, 0, 1: errors at p 0.8 and 0.6
    external = torch.tensor([[0.3, 0.7], [0.95, 0.05]])  # an external set's batch: true 0, 1, errors at 0.7, 0.95
    kept = _collected(
        "classification",
        [
            (probs, torch.tensor([0, 0, 1]), ["x.png", "y.png", "z.png"]),
            (external, torch.tensor([0, 1]), ["e.png", "g.png"], "site_b"),
        ],
    )
    # the most confident errors first, each source its own (an external report shows its own films)
    assert kept == {
        "first": [],
        "worst in-distribution": [("y.png", -0.8), ("z.png", -0.6)],
        "worst site_b": [("g.png", -0.95), ("e.png", -0.7)],
    }


def _spy(monkeypatch: pytest.MonkeyPatch, name: str) -> list:
    """Record the figures ``reports.<name>`` draws (with their arguments) while still drawing them."""
    drawn, draw = [], getattr(reports, name)
    monkeypatch.setattr(reports, name, lambda *a, **kw: drawn.append((draw(*a, **kw), a, kw)) or drawn[-1][0])
    return drawn


def test_classifier_test_and_validate_write_reports(
    classifier_ckpt: Path, demo_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    model = XRayClassifier.load_from_checkpoint(classifier_ckpt)
    dm = RadiographyDataModule(root=str(demo_root), test_fraction=0.25, image_size=64, num_workers=0, batch_size=4)
    report = EvaluationReport(num_images=3)
    trainer = _trainer(tmp_path, [report])
    drawn = _spy(monkeypatch, "error_figure")
    [logged] = trainer.test(model, dm)

    out = Path(trainer.log_dir) / "report_test"
    cm = model.confusion_matrices["test"].numpy()
    assert np.trace(cm) < cm.sum()  # the demo checkpoint errs: worst_cases.png (the most confident errors) is written
    assert {p.name for p in out.iterdir()} == CLASSIFICATION_FILES | {"worst_cases.png"}
    [(fig, (shown, names), _)] = drawn
    assert 0 < len(shown) <= 3 and all(int(e["true"]) != int(e["pred"]) for e in shown)
    assert [e["p"] for e in shown] == sorted((e["p"] for e in shown), reverse=True)  # the most confident first
    for ax, e in zip(fig.axes, shown):
        assert (
            ax.get_title().startswith(Path(e["path"]).name) and f"predicted {names[int(e['pred'])]}" in ax.get_title()
        )
    _assert_png(out / "worst_cases.png")
    for png in ("confusion_matrix.png", "roc.png", "reliability.png"):
        _assert_png(out / png)
    rows = {r["class"]: r for r in _read_csv(out / "classification_report.csv")}
    assert list(rows)[:4] == model.class_names
    n_test = len(dm.records["test"])
    assert n_test > 4  # more than one batch was collected
    assert int(rows["accuracy"]["support"]) == n_test == sum(int(rows[c]["support"]) for c in model.class_names)
    # the report agrees with the module's own torchmetrics (logged by trainer.test)
    assert float(rows["accuracy"]["f1-score"]) == pytest.approx(logged["test/acc"], abs=1e-6)
    for name in model.class_names:
        for col, key in (("precision", "precision"), ("recall", "recall"), ("f1-score", "f1")):
            assert float(rows[name][col]) == pytest.approx(logged[f"test/{key}_{metric_key(name)}"], abs=1e-6)
    cm = np.array(
        [[int(v) for k, v in r.items() if k != "true class"] for r in _read_csv(out / "confusion_matrix.csv")]
    )
    np.testing.assert_array_equal(cm, model.confusion_matrices["test"].numpy())
    auc = {r["class"]: r["auroc"] for r in _read_csv(out / "auroc.csv")}
    assert list(auc) == [*model.class_names, "macro avg", "weighted avg"]
    md = (out / "classification_report.md").read_text()
    assert "| class | precision | recall | f1-score | support | auroc |" in md and "weighted avg" in md
    assert report.results["test"][-1]["class"] == "weighted avg"
    # 95% bootstrap intervals with n, beside the point values the module logged
    intervals = {r["metric"]: r for r in _read_csv(out / "intervals.csv")}
    assert float(intervals["accuracy"]["value"]) == pytest.approx(logged["test/acc"], abs=1e-6)
    assert int(intervals["accuracy"]["n"]) == n_test
    for name in model.class_names:
        row = intervals[f"recall {name}"]
        assert float(row["value"]) == pytest.approx(logged[f"test/recall_{metric_key(name)}"], abs=1e-6)
        assert int(row["n"]) == int(rows[name]["support"]) and row["note"] == "n < 30"
    for row in intervals.values():
        if row["95% CI low"]:
            assert float(row["95% CI low"]) <= float(row["value"]) <= float(row["95% CI high"])
    assert {"balanced accuracy", "macro f1", "COVID vs Normal accuracy"} <= set(intervals)
    assert "**Warning: fewer than 30 images for COVID (n=" in md and "95% bootstrap intervals" in md
    calibration = {r["probabilities"]: r for r in _read_csv(out / "calibration.csv")}
    assert float(calibration["as given"]["ECE"]) == pytest.approx(logged["test/ece"], abs=1e-5)
    assert float(calibration["as given"]["temperature"]) == pytest.approx(float(model.temperature))

    trainer.validate(model, dm)
    val_rows = {r["class"]: r for r in _read_csv(Path(trainer.log_dir) / "report_val" / "classification_report.csv")}
    assert int(val_rows["accuracy"]["support"]) == len(dm.records["val"])
    assert set(report.written) == {"report_test", "report_val"}


def test_no_report_without_batches_or_during_fit_by_default(demo_root: Path, tmp_path: Path):
    model = XRayClassifier(pretrained=False, trainable="head", image_size=64)
    dm = RadiographyDataModule(root=str(demo_root), test_fraction=0.25, image_size=64, num_workers=0, batch_size=4)
    default, at_fit_end = EvaluationReport(), EvaluationReport(stages=("fit",))
    trainer = _trainer(tmp_path, [default, at_fit_end], max_epochs=2, limit_train_batches=1, limit_val_batches=1)
    trainer.fit(model, dm)
    assert default.written == {}
    assert set(at_fit_end.written) == {"report_val"}
    rows = {r["class"]: r for r in _read_csv(Path(trainer.log_dir) / "report_val" / "classification_report.csv")}
    assert int(rows["accuracy"]["support"]) == 4  # the last validation epoch only (one batch), no sanity check

    trainer = _trainer(tmp_path / "empty", [default], limit_test_batches=0)
    trainer.test(model, dm)
    assert default.written == {} and not (Path(trainer.log_dir) / "report_test").exists()


def test_segmenter_test_writes_report(
    segmenter_ckpt: Path, demo_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    model = LungSegmenter.load_from_checkpoint(segmenter_ckpt)
    dm = LungSegmentationDataModule(root=str(demo_root), test_fraction=0.25, image_size=64, num_workers=0, batch_size=4)
    report = EvaluationReport(num_images=3)
    trainer = _trainer(tmp_path, [report])
    drawn = _spy(monkeypatch, "overlay_figure")
    [logged] = trainer.test(model, dm)

    out = Path(trainer.log_dir) / "report_test"
    files = {"segmentation_report.md", "segmentation_report.csv", "overlays.png", "worst_cases.png", "intervals.csv"}
    assert {p.name for p in out.iterdir()} == files
    for png in ("overlays.png", "worst_cases.png"):
        assert min(_assert_png(out / png)) > 3 * 64  # a figure of titled panels, not a bare grid of pixels
    (first, *_), (worst, *_) = drawn  # overlays.png, then worst_cases.png
    test_names = {r.path.name for r in dm.records["test"]}
    titles = {fig: [ax.get_title() for ax in fig.axes] for fig in (first, worst)}
    dice = {fig: {t.split("\n")[0]: float(t.split("Dice ")[1][:5]) for t in titles[fig]} for fig in (first, worst)}
    assert len(dice[first]) == len(dice[worst]) == 3 and set(dice[worst]) <= test_names
    assert list(dice[worst].values()) == sorted(dice[worst].values())  # the lowest per-image Dice first
    assert all(d >= max(dice[worst].values()) for name, d in dice[first].items() if name not in dice[worst])
    legend = [t.get_text() for t in worst.legends[0].get_texts()]
    assert legend == ["truth", "prediction"]
    values = {r["metric"]: float(r["value"]) for r in _read_csv(out / "segmentation_report.csv")}
    for key in ("iou", "dice", "precision", "recall", "accuracy", "dice_per_image"):
        assert values[key] == pytest.approx(logged[f"test/{key}"], abs=1e-6)
    assert values["images"] == len(dm.records["test"]) and values["threshold"] == model.threshold
    md = (out / "segmentation_report.md").read_text()
    assert "IoU (Jaccard)" in md and "mean per-image Dice" in md
    intervals = {r["metric"]: r for r in _read_csv(out / "intervals.csv")}
    dice = intervals["mean per-image Dice"]
    assert float(dice["value"]) == pytest.approx(logged["test/dice_per_image"], abs=1e-5)
    assert float(dice["95% CI low"]) <= float(dice["value"]) <= float(dice["95% CI high"])
    assert int(dice["n"]) == len(dm.records["test"]) and "mean per-image IoU" in intervals
