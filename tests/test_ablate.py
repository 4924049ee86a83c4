"""scripts/ablate.py: rows x seeds on one split, held-out test metrics, mean ± std tables."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import yaml

from covid_lightning.ablate import Row, Run, load_rows, main, read_runs, summarize, write_outputs

REPO = Path(__file__).resolve().parents[1]


def test_summarize_is_mean_and_sample_std_over_seeds():
    runs = [Run("a", 0, {"test/acc": 0.9}, 10.0, 1, "x"), Run("a", 1, {"test/acc": 0.8}, 20.0, 2, "y")]
    (cells,) = summarize(runs, [Row("a")], ["test/acc"])
    assert cells == ["a", "0.850 ± 0.071", "15 ± 7", "2"]


@pytest.mark.parametrize("name", ["classification", "segmentation"])
def test_shipped_rows_load(name: str):
    rows = load_rows(REPO / "scripts" / "ablations" / f"{name}.yaml")
    assert len(rows) >= 3 and rows[0].args == []  # the recipe as is comes first


def test_rows_over_seeds_share_one_split_and_run_the_lung_hook(
    demo_root: Path, segmenter_ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    rows = tmp_path / "rows.yaml"
    rows.write_text(
        yaml.safe_dump(
            [{"name": "whole film"}, {"name": "lungs only", "args": ["--data.lung_segmenter", str(segmenter_ckpt)]}]
        )
    )
    out = tmp_path / "out"
    args = ["--config", str(REPO / "configs/demo/classification.yaml"), "--rows", str(rows), "--seeds", "0", "1"]
    args += ["--out", str(out), "--data.root", str(demo_root), "--data.image_size", "64", "--data.num_workers", "0"]
    args += ["--data.test_fraction", "0.25", "--trainer.max_epochs", "1", "--trainer.enable_progress_bar", "false"]
    assert main(args) == 0

    with (out / "runs.csv").open() as f:
        runs = list(csv.DictReader(f))
    assert [(r["row"], r["seed"]) for r in runs] == [
        ("whole film", "0"),
        ("whole film", "1"),
        ("lungs only", "0"),
        ("lungs only", "1"),
    ]
    assert all(0.0 <= float(r["test/acc"]) <= 1.0 for r in runs)
    splits = {(Path(r["log_dir"]) / "split.csv").read_text() for r in runs}
    assert len(splits) == 1  # every run reused the first run's split
    assert "test" in next(iter(splits))
    masks = list((tmp_path / "cache").rglob("*.png"))
    assert len(masks) == 4 * 8  # the lungs-only row computed the lung masks of every demo image once
    table = (out / "ablation.md").read_text()
    assert "| whole film | " in table and "| lungs only | " in table and " ± " in table


def test_summarize_rerenders_the_table_from_runs_csv(tmp_path: Path):
    rows_file = tmp_path / "rows.yaml"
    rows_file.write_text(yaml.safe_dump([{"name": "a"}, {"name": "b", "args": ["--x", "1"]}]))
    keys = ["test/acc", "test/acc_covid_vs_normal", "test/f1_macro", "val/acc"]
    runs = [Run(n, s, {k: 0.5 + 0.1 * s for k in keys}, 10.0 + s, 3, f"d/{n}{s}") for n in "ab" for s in (0, 1)]
    out = tmp_path / "out"
    first = write_outputs(runs, load_rows(rows_file), keys, out, "T").read_text()
    assert read_runs(out / "runs.csv", keys) == runs
    (out / "ablation.md").unlink()
    args = ["--config", "c.yaml", "--rows", str(rows_file), "--out", str(out), "--task", "classification"]
    assert main([*args, "--title", "T", "--summarize"]) == 0
    assert (out / "ablation.md").read_text() == first
    assert "| b | 0.550 ± 0.071 |" in first
