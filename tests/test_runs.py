"""The everyday loop through the console script, as the README types it: where a run lives, what a command
prints, which checkpoints it refuses, how a user mistake reads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from covid_lightning.modules.base import MODEL_CLASS_KEY

pytestmark = pytest.mark.slow  # subprocess runs of the real command

REPO = Path(__file__).resolve().parents[1]
DEMO_CLS = REPO / "configs" / "demo" / "classification.yaml"
DEMO_SEG = REPO / "configs" / "demo" / "segmentation.yaml"
NOISE = ("Traceback", "💡 Tip", "GPU available: False", "TPU available: False", "LeafSpec")


def lightning(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("lightning")
    cmd = [str(exe), *args] if exe.exists() else [sys.executable, "-m", "covid_lightning", *args]
    cwd.mkdir(parents=True, exist_ok=True)
    full_env = {**os.environ, **(env or {})}
    full_env.pop("PYTHONWARNINGS", None)  # what a user sees, warnings included
    return subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=600)


def _quiet(proc: subprocess.CompletedProcess) -> None:
    text = proc.stdout + proc.stderr
    for noise in NOISE:
        assert noise not in text, (noise, text[-3000:])


SMALL = ["--data.image_size", "32", "--data.batch_size", "8", "--data.num_workers", "0"]


def test_default_root_dir_moves_the_whole_run(demo_root: Path, tmp_path: Path):
    """Point 2: checkpoints, CSV and TensorBoard logs follow --trainer.default_root_dir; nothing in ./runs."""
    elsewhere = tmp_path / "elsewhere"
    proc = lightning("fit", "--config", str(DEMO_CLS), "--data.root", str(demo_root), *SMALL,
                     "--trainer.max_epochs", "1", "--trainer.default_root_dir", str(elsewhere),
                     "--name", "mine", cwd=tmp_path / "cwd")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    _quiet(proc)
    run = elsewhere / "mine" / "version_0"
    assert (run / "metrics.csv").is_file() and list(run.glob("events.out.tfevents.*"))
    assert (run / "checkpoints" / "last.ckpt").is_file() and list((run / "checkpoints").glob("best-*.ckpt"))
    assert (run / "config.yaml").is_file() and (run / "split.csv").is_file()
    assert list((tmp_path / "cwd").iterdir()) == []
    assert f"Run folder: {run}" in proc.stdout and "best val/acc" in proc.stdout and "wall time" in proc.stdout


def test_checkpoint_of_the_other_kind_is_refused_before_any_loop(
    classifier_ckpt: Path, segmenter_ckpt: Path, demo_root: Path, tmp_path: Path
):
    """Point 5: the config decides the kind; a mismatch names both sides, exit 2, no traceback, no run folder."""
    proc = lightning("validate", "--config", str(DEMO_SEG), "--data.root", str(demo_root),
                     "--ckpt_path", str(classifier_ckpt), cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 2 and "XRayClassifier" in proc.stderr and "LungSegmenter" in proc.stderr
    assert "val/" not in proc.stdout and not (tmp_path / "runs").exists()
    _quiet(proc)
    proc = lightning("validate", "--config", str(DEMO_CLS), "--data.root", str(demo_root),
                     "--ckpt_path", str(segmenter_ckpt), cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 2 and "LungSegmenter" in proc.stderr and "XRayClassifier" in proc.stderr
    assert "KeyError" not in proc.stderr


def test_checkpoint_of_another_backbone_is_refused(classifier_ckpt: Path, demo_root: Path, tmp_path: Path):
    proc = lightning("test", "--config", str(DEMO_CLS), "--data.root", str(demo_root),
                     "--model.backbone", "resnet18", "--ckpt_path", str(classifier_ckpt), cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 2 and "backbone" in proc.stderr
    assert "resnet18" in proc.stderr and "mobilenetv2_050" in proc.stderr


def test_checkpoint_naming_a_foreign_class_is_not_imported(classifier_ckpt: Path, demo_root: Path, tmp_path: Path):
    marker = tmp_path / "imported"
    (tmp_path / "foreign_pkg.py").write_text(f"open({str(marker)!r}, 'w').close()\nclass Model: pass\n")
    ckpt = torch.load(classifier_ckpt, weights_only=True)
    ckpt[MODEL_CLASS_KEY] = ckpt["hyper_parameters"]["_class_path"] = "foreign_pkg.Model"
    torch.save(ckpt, tmp_path / "foreign.ckpt")
    proc = lightning("validate", "--config", str(DEMO_CLS), "--data.root", str(demo_root),
                     "--ckpt_path", str(tmp_path / "foreign.ckpt"), cwd=tmp_path,
                     env={"PYTHONPATH": str(tmp_path)})  # fmt: skip
    assert proc.returncode == 2 and "foreign_pkg.Model" in proc.stderr and "not a covid-lightning model" in proc.stderr
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["empty", "truncated"])
def test_damaged_checkpoint_is_named(classifier_ckpt: Path, demo_root: Path, tmp_path: Path, damage: str):
    bad = tmp_path / "bad.ckpt"
    data = classifier_ckpt.read_bytes()
    bad.write_bytes(b"" if damage == "empty" else data[: len(data) // 2])
    proc = lightning("validate", "--config", str(DEMO_CLS), "--data.root", str(demo_root),
                     "--ckpt_path", str(bad), cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 2 and str(bad) in proc.stderr and "EOFError" not in proc.stderr
    _quiet(proc)


def test_predict_never_overwrites_silently(classifier_ckpt: Path, demo_root: Path, tmp_path: Path):
    """Point 7: a second predict into one output_dir refuses; --predictions.overwrite replaces it all."""
    out = tmp_path / "preds"
    args = ["predict", "--config", str(DEMO_CLS), "--data.root", str(demo_root), *SMALL,
            "--ckpt_path", str(classifier_ckpt), "--data.predict_root", str(demo_root / "COVID"),
            "--predictions.output_dir", str(out)]  # fmt: skip
    first = lightning(*args, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    assert f"written to {out / 'predictions.csv'}" in first.stdout
    assert "skipped 8 mask files" in first.stderr  # the Kaggle class folder's masks/ are not X-rays
    rows = (out / "predictions.csv").read_text().splitlines()
    assert len(rows) == 1 + 8 and all("/masks/" not in r for r in rows)
    stale = out / "gradcam" / "old.png"
    stale.parent.mkdir()
    stale.write_bytes(b"")
    second = lightning(*args, cwd=tmp_path)
    assert second.returncode == 2 and "already holds predictions" in second.stderr and "overwrite" in second.stderr
    assert (out / "predictions.csv").read_text().splitlines() == rows
    third = lightning(*args, "--predictions.overwrite", "true", cwd=tmp_path)
    assert third.returncode == 0, third.stderr[-3000:]
    assert not stale.exists() and len((out / "predictions.csv").read_text().splitlines()) == 1 + 8


def test_predict_one_file(classifier_ckpt: Path, demo_root: Path, tmp_path: Path):
    image = next((demo_root / "Normal" / "images").glob("*.png"))
    proc = lightning("predict", "--config", str(DEMO_CLS), "--data.root", str(demo_root), *SMALL,
                     "--ckpt_path", str(classifier_ckpt), "--data.predict_root", str(image), cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    csv_path = next((tmp_path / "runs").rglob("predictions.csv"))
    lines = csv_path.read_text().splitlines()
    assert len(lines) == 2 and lines[1].startswith(image.name)


def test_missing_data_root_is_one_paragraph(tmp_path: Path):
    """Point 9: a user mistake reads as one message naming the path, exit 2, no traceback (--debug shows it)."""
    missing = tmp_path / "nowhere"
    proc = lightning("fit", "--config", str(DEMO_CLS), "--data.root", str(missing), cwd=tmp_path)
    assert proc.returncode == 2 and str(missing) in proc.stderr and "\nerror: " in "\n" + proc.stderr
    assert len(proc.stderr.strip().splitlines()) <= 6
    _quiet(proc)
    debug = lightning("fit", "--config", str(DEMO_CLS), "--data.root", str(missing), "--debug", cwd=tmp_path)
    assert debug.returncode != 0 and "Traceback" in debug.stderr


def test_offline_pretrained_weights_are_one_paragraph(tmp_path: Path, demo_root: Path):
    proc = lightning("fit", "--config", str(REPO / "configs/classification/head_only.yaml"),
                     "--data.root", str(demo_root), cwd=tmp_path,
                     env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})  # fmt: skip
    assert proc.returncode == 2 and "\nerror: " in "\n" + proc.stderr and "pretrained_file" in proc.stderr
    assert "Union" not in proc.stderr and "Namespace(" not in proc.stderr
    _quiet(proc)


def test_export_writes_a_model_card_from_the_runs_own_test_report(demo_root: Path, tmp_path: Path):
    """fit -> test -> export: the card carries the training data, split sizes, the test report's 95% intervals and
    calibration, intended use and limitations; the JSON contract carries the same card."""
    common = ["--config", str(DEMO_CLS), "--data.root", str(demo_root), *SMALL, "--data.test_fraction", "0.25"]
    fit = lightning("fit", *common, "--trainer.max_epochs", "1", cwd=tmp_path)
    assert fit.returncode == 0, fit.stderr[-3000:]
    test = lightning("test", *common, "--ckpt_path", "best", cwd=tmp_path)
    assert test.returncode == 0, test.stderr[-3000:]
    [best] = (tmp_path / "runs").glob("*/version_0/checkpoints/best-*.ckpt")
    export = lightning("export", str(best), cwd=tmp_path)
    assert export.returncode == 0, export.stderr[-3000:]
    card_md = best.with_name(f"{best.stem}.model_card.md").read_text()
    for heading in ("## Intended use", "## Training data", "## Evaluation", "## Known limitations"):
        assert heading in card_md
    assert "Not a medical device" in card_md and "| accuracy |" in card_md and "ECE" in card_md
    card = json.loads(best.with_name(f"{best.stem}.onnx.json").read_text())["model_card"]
    assert card["training_data"]["root"] == str(demo_root) and card["evaluation"].startswith("test split")
    n_test = {r["metric"]: int(r["n"]) for r in card["metrics"]}["accuracy"]
    assert card["split_sizes"]["test"] == n_test
    assert {c["probabilities"] for c in card["calibration"]} == {"temperature 1 (uncalibrated)", "as given"}
