"""External test sets: `lightning test --data.external`, scored apart from the in-distribution test split."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from covid_lightning import RadiographyDataModule
from covid_lightning.callbacks.reports import EvaluationReport
from covid_lightning.cli import main
from covid_lightning.constants import CLASSES
from covid_lightning.data.demo import make_demo_dataset
from covid_lightning.data.scan import read_records
from covid_lightning.inference import classify, load_checkpoint

REPO = Path(__file__).resolve().parents[1]
EXTERNAL_CXR = REPO.parent / "shared/data/external_cxr_sample"  # ../shared, beside the repository
SMALL = ["--data.image_size", "64", "--data.batch_size", "8", "--data.num_workers", "0",
         "--trainer.enable_progress_bar", "false", "--data.test_fraction", "0.25"]  # fmt: skip


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A Kaggle-layout folder (``site_a``, four classes) and a manifest (``site_b.csv``, COVID and Normal)."""
    tmp = tmp_path_factory.mktemp("external")
    folder = make_demo_dataset(tmp / "site_a", n_per_class=3, seed=1)
    other = make_demo_dataset(tmp / "other", n_per_class=4, seed=2)
    manifest = tmp / "site_b.csv"
    with manifest.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label"])
        for label in ("COVID", "Normal"):
            writer.writerows([p, label] for p in sorted((other / label / "images").glob("*.png")))
    return folder.parent, manifest


def _test(demo_root: Path, ckpt: Path, out: Path, *extra: str) -> Path:
    code = main(["test", "--config", str(REPO / "configs/demo/classification.yaml"), "--data.root", str(demo_root),
                 "--ckpt_path", str(ckpt), "--trainer.default_root_dir", str(out), *SMALL, *extra])  # fmt: skip
    assert code == 0
    (metrics,) = out.rglob("metrics.csv")
    return metrics.parent


def _test_metrics(folder: Path) -> dict[str, str]:
    return {k: v for row in _rows(folder / "metrics.csv") for k, v in row.items() if k.startswith("test/") and v}


def test_external_sets_are_reported_apart(demo_root, classifier_ckpt, sources, tmp_path):
    folder, manifest = sources
    alone = _test(demo_root, classifier_ckpt, tmp_path / "alone")
    run = _test(demo_root, classifier_ckpt, tmp_path / "both", "--data.external", f"[{folder}, {manifest}]")
    for name in ("report_test", "report_external_site_a", "report_external_site_b"):
        assert (run / name / "classification_report.md").is_file() and (run / name / "intervals.csv").is_file()
    # the in-distribution test split: the same figures as without external sets, same names
    assert _test_metrics(run) == _test_metrics(alone) and "test/acc" in _test_metrics(run)
    assert (run / "report_test" / "intervals.csv").read_text() == (alone / "report_test" / "intervals.csv").read_text()
    logged = {k for row in _rows(run / "metrics.csv") for k, v in row.items() if v}
    assert {"external/site_a/acc", "external/site_b/acc"} <= logged

    # the summary against a hand computation from each file's own prediction
    summary = _rows(run / "external_summary.csv")
    assert (run / "external_summary.md").is_file()
    model = load_checkpoint(classifier_ckpt)
    for name, source in (("site_a", folder), ("site_b", manifest)):
        paths, labels = zip(*[(r.path, r.class_name) for r in read_records(source).records])
        probs = np.array([[p[c] for c in CLASSES] for p in classify(model, list(paths))])
        y = np.array([CLASSES.index(label) for label in labels])
        pred = probs.argmax(1)
        # its own worst-cases panel (the most confident of its own errors), when it has errors
        assert (run / f"report_external_{name}" / "worst_cases.png").is_file() == bool(np.any(pred != y)), name
        covid, normal = CLASSES.index("COVID"), CLASSES.index("Normal")
        pair = np.where(probs[:, covid] >= probs[:, normal], covid, normal)
        sens, spec = np.mean(pair[y == covid] == covid), np.mean(pair[y == normal] == normal)
        expected = {
            "accuracy": (np.mean(pred == y), len(y)),
            "balanced accuracy": (np.mean([np.mean(pred[y == c] == c) for c in np.unique(y)]), len(y)),
            "sensitivity (COVID)": (sens, np.sum(y == covid)),
            "specificity (Normal)": (spec, np.sum(y == normal)),
            "balanced COVID vs Normal accuracy": ((sens + spec) / 2, np.sum((y == covid) | (y == normal))),
        }
        got = {r["metric"]: r for r in summary if r["source"] == name}
        assert set(got) == set(expected)
        for metric, (value, n) in expected.items():
            row = got[metric]
            assert float(row["value"]) == pytest.approx(value, abs=1e-9) and int(row["n"]) == n, (name, metric)
            assert float(row["95% CI low"]) <= float(row["value"]) <= float(row["95% CI high"])
    # every external film together: n adds up over the sources, the figures lie between theirs
    pooled = {r["metric"]: r for r in summary if r["source"] == "pooled"}
    by_source = {(r["source"], r["metric"]): r for r in summary}
    for metric in ("accuracy", "sensitivity (COVID)", "specificity (Normal)"):
        parts = [by_source[(name, metric)] for name in ("site_a", "site_b")]
        assert int(pooled[metric]["n"]) == sum(int(p["n"]) for p in parts)
        low, high = sorted(float(p["value"]) for p in parts)
        assert low - 1e-9 <= float(pooled[metric]["value"]) <= high + 1e-9


def test_unknown_class_is_a_named_error(demo_root, classifier_ckpt, sources, tmp_path, capsys):
    image = next((sources[0] / "COVID-19_Radiography_Dataset" / "COVID" / "images").glob("*.png"))
    manifest = tmp_path / "cats.csv"
    manifest.write_text(f"path,label\n{image},Cat\n")
    capsys.readouterr()
    code = main(["test", "--config", str(REPO / "configs/demo/classification.yaml"), "--data.root", str(demo_root),
                 "--ckpt_path", str(classifier_ckpt), "--trainer.default_root_dir", str(tmp_path / "run"), *SMALL,
                 "--data.external", f"[{manifest}]"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and err.count("error:") == 1
    assert "cats.csv has images of class(es) Cat" in err and "Traceback" not in err


def test_summary_on_the_real_external_sample(classifier_ckpt, demo_root, tmp_path):
    """The real external films (Actualmed + OpenIST), scored by a demo checkpoint: counts per class and source."""
    if not EXTERNAL_CXR.is_dir():
        pytest.skip(f"real external data not present: {EXTERNAL_CXR}")
    import lightning as L

    dm = RadiographyDataModule(root=str(demo_root), image_size=64, num_workers=0, external=[str(EXTERNAL_CXR)])
    report = EvaluationReport(stages=("test",))
    trainer = L.Trainer(accelerator="cpu", logger=False, callbacks=[report], default_root_dir=tmp_path,
                        enable_progress_bar=False, enable_checkpointing=False)  # fmt: skip
    trainer.test(load_checkpoint(classifier_ckpt), dm)
    assert dm.test_sources == ["external_cxr_sample"]  # no test split here: the external set alone
    rows = {r["metric"]: r for r in report.results["external_summary"]}
    assert rows["accuracy"]["n"] == 181 and rows["sensitivity (COVID)"]["n"] == 26
    assert rows["specificity (Normal)"]["n"] == 155 == 18 + 137
    table = {r["class"]: r["support"] for r in report.results["external/external_cxr_sample"]}
    assert table["COVID"] == 26 and table["Normal"] == 155 and table["Lung_Opacity"] == 0
    normal = [r.path.name for r in dm.datasets["external/external_cxr_sample"].records if r.class_name == "Normal"]
    assert sum("actualmed" in n for n in normal) == 18 and sum("openist" in n for n in normal) == 137
    assert (tmp_path / "report_external_external_cxr_sample" / "classification_report.md").is_file()


def test_manifests_of_the_shared_samples(tmp_path):
    """scripts/external_manifests.py: one manifest per external source, the other sample's originals, and a
    source-held-out validation manifest that keeps a run's train and test rows."""
    shared = REPO.parent / "shared/data"
    if not (EXTERNAL_CXR.is_dir() and (shared / "covid_radiography_sample").is_dir()):
        pytest.skip(f"real samples not present under {shared}")
    from tests.helpers.scripts import load_script

    split = tmp_path / "split.csv"
    split.write_text("path,mask_path,label,class_name,split,group\n"
                     "COVID/images/COVID-100.png,,0,COVID,test,0\nNormal/images/Normal-1.png,,2,Normal,train,1\n"
                     "Normal/images/Normal-10.png,,2,Normal,val,2\n")  # fmt: skip
    assert load_script("external_manifests").main(shared, tmp_path / "m", split) == 0
    rows = {name: _rows(tmp_path / "m" / f"{name}.csv") for name in ("actualmed", "openist", "kaggle_originals")}
    assert [len(v) for v in rows.values()] == [44, 137, 40]
    assert all(Path(r["path"]).is_file() and r["split"] == "test" for v in rows.values() for r in v)
    assert all(Path(r["mask_path"]).is_file() for r in rows["openist"])
    assert sorted({r["label"] for r in rows["actualmed"]}) == ["COVID", "Normal"]
    heldout = _rows(tmp_path / "m" / "source_heldout.csv")
    assert [r["split"] for r in heldout[:2]] == ["test", "train"] and len(heldout) == 2 + 140
    assert {r["label"] for r in heldout[2:]} == {"COVID", "Normal", "Viral Pneumonia"}
    assert all("covid_radiography_sample" in r["path"] and r["split"] == "val" for r in heldout[2:])
