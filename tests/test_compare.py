"""compare_regimes: real fits through the CLI on the demo data, one table out."""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

import pytest
import yaml

from covid_lightning.compare import RunResult, regime_args, table_rows, write_table

REPO = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("compare_regimes_script", REPO / "scripts" / "compare_regimes.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_compare_two_regimes_on_demo_data(demo_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "compare"
    argv = [
        "--data.root", str(demo_root),
        "--regimes", "head", "last_conv",
        "--config", str(REPO / "configs/classification/head_only.yaml"),
        "--max_epochs", "1",
        "--out", str(out),
        # passed through to every run
        "--model.pretrained", "false",
        "--data.image_size", "32",
        "--data.num_workers", "0",
        "--trainer.enable_model_summary", "false",
    ]  # fmt: skip
    from covid_lightning.compare import main

    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert (
        "| regime | trainable params | train acc | val acc | train loss | val loss | time (s) | best epoch |" in printed
    )

    with (out / "comparison.csv").open(newline="") as f:
        rows = {r["regime"]: r for r in csv.DictReader(f)}
    assert list(rows) == ["head", "last_conv"]
    assert int(rows["head"]["trainable_params"]) == 1_838_596
    assert int(rows["last_conv"]["trainable_params"]) == 2_045_956
    for r in rows.values():
        assert r["best_epoch"] == "0" and float(r["train_time_s"]) > 0
        for col in ("train_acc", "val_acc", "train_loss", "val_loss"):
            assert r[col] != "", col
        assert 0 <= float(r["val_acc"]) <= 1
    md = (out / "comparison.md").read_text()
    assert "| head | 1,838,596 |" in md and "| last_conv | 2,045,956 |" in md

    # identical split: the second run read the first run's manifest
    first, second = Path(rows["head"]["log_dir"]), Path(rows["last_conv"]["log_dir"])
    assert first == out / "head" / "version_0" and second == out / "last_conv" / "version_0"
    config = yaml.safe_load((second / "config.yaml").read_text())
    assert config["data"]["init_args"]["split_file"] == str(first / "split.csv")
    assert config["model"]["init_args"]["trainable"] == "last_conv"
    assert (first / "split.csv").read_text() == (second / "split.csv").read_text()


def test_regime_args_and_staged():
    assert regime_args("last_2_conv") == ["--model.trainable", "last_2_conv"]
    staged = regime_args("staged", unfreeze_at_epoch=2)
    assert staged[:2] == ["--model.trainable", "head"] and "StagedUnfreeze" in staged[2]
    assert '"unfreeze_at_epoch": 2' in staged[2]
    with pytest.raises(ValueError):
        regime_args("everything")


def test_staged_base_config_is_refused(capsys):
    with pytest.raises(SystemExit):
        _script().main(["--config", str(REPO / "configs/classification/staged_unfreeze.yaml")])
    assert "StagedUnfreeze" in capsys.readouterr().err


def test_segmentation_table(tmp_path: Path):
    results = [
        RunResult("unet_seed", "a.yaml", "segmentation", "seed_unet", 466_529, 466_529, 12.34, 3,
                  {"train/loss": 0.2, "val/loss": 0.25, "val/iou": 0.82, "val/dice": 0.9}),
        RunResult("unet_resnet34", "b.yaml", "segmentation", "Unet/resnet34", 24_436_369, 24_436_369, 99.0, None, {}),
    ]  # fmt: skip
    header, rows = table_rows(results, first="config")
    assert header == [
        "config", "arch", "trainable params", "train loss", "val loss", "val IoU", "val Dice", "time (s)", "best epoch"
    ]  # fmt: skip
    assert rows[0] == ["unet_seed", "seed_unet", "466,529", "0.2000", "0.2500", "0.8200", "0.9000", "12.3", "3"]
    assert rows[1][-1] == "" and rows[1][3] == ""
    md = write_table(results, tmp_path, first="config")
    assert md.read_text().count("\n|") >= 3
    with (tmp_path / "comparison.csv").open(newline="") as f:
        assert next(csv.reader(f))[:4] == ["config", "config_file", "arch", "trainable_params"]
