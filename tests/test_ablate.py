"""scripts/ablate.py, the experiment runner: rows x seeds on one split, held-out metrics, mean ± std tables;
the lab's regime comparison is one of its tables."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import yaml

from covid_lightning.cli import build_cli
from covid_lightning.data.demo import make_demo_dataset
from tests.helpers.scripts import load_script

REPO = Path(__file__).resolve().parents[1]
ablate = load_script("ablate")
Row, Run = ablate.Row, ablate.Run


def _runs_csv(out: Path) -> list[dict[str, str]]:
    with (out / "runs.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def test_summarize_is_mean_and_sample_std_over_seeds():
    runs = [Run("a", 0, {"test/acc": 0.9}, 10.0, 1, "x", "5"), Run("a", 1, {"test/acc": 0.8}, 20.0, 2, "y", "5")]
    (cells,) = ablate.summarize(runs, [Row("a")], ["test/acc"])
    assert list(cells.values()) == ["a", "5", "0.850 ± 0.071", "15 ± 7", "2 ± 1", "2"]


def test_cells_carry_the_seeds_mean_interval_over_images_and_n():
    runs = [
        Run("a", 0, {"test/acc": 0.9, "test/acc low": 0.8, "test/acc high": 0.96, "test/acc n": 20}, 1.0, 1, "x"),
        Run("a", 1, {"test/acc": 0.8, "test/acc low": 0.7, "test/acc high": 0.9, "test/acc n": 20}, 1.0, 1, "y"),
    ]
    (cells,) = ablate.summarize(runs, [Row("a")], ["test/acc"])
    assert cells["test/acc"] == "0.850 ± 0.071 [0.750, 0.930] n=20 (n < 30)"


@pytest.mark.parametrize(
    "name",
    [
        "classification",
        "segmentation",
        "regimes",
        "imbalance",
        "imbalance_augmented",
        "generalisation",
        "source_heldout",
    ],
)
def test_shipped_rows_load(name: str):
    rows = ablate.load_rows(REPO / "scripts" / "ablations" / f"{name}.yaml")
    if name == "source_heldout":  # one row: the manifest's own split (validation on the other sample)
        assert [r.args for r in rows] == [
            ["--data.root", "runs/manifests/source_heldout.csv", "--data.split_file", "null"]
        ]
        return
    assert len(rows) >= 3
    if name == "regimes":
        assert [r.name for r in rows] == ["head", "last_conv", "last_2_conv", "all", "staged"]
        assert rows[1].args == ["--model.trainable", "last_conv"]
        staged = rows[-1].args
        assert staged[:2] == ["--model.trainable", "head"] and "StagedUnfreeze" in staged[2]
        assert '"unfreeze_at_epoch": 3' in staged[2]
    elif name == "imbalance":
        balances = ("none", "loss", "sampler", "loss_sqrt", "logit_adjust")
        assert [r.args for r in rows] == [["--data.balance", b] for b in balances]
    elif name == "imbalance_augmented":
        assert all("--data.augment" in r.args and "--data.balance" in r.args for r in rows)
    elif name == "generalisation":
        assert rows[0].args == [] and rows[-1].config == "configs/classification/head_only.yaml"
        assert ["--data.intensity", "clahe"] in [r.args for r in rows]
        assert any("acquisition" in r.args for r in rows)
    else:
        assert rows[0].args == []  # the recipe as is comes first


#: the config each shipped rows file is run with (docs/results.md, README); the others: the classification recipe
ROWS_CONFIG = {
    "regimes": "configs/classification/head_only.yaml",
    "segmentation": "configs/segmentation/recipe_cpu.yaml",
}


@pytest.mark.parametrize("name", sorted(p.stem for p in (REPO / "scripts" / "ablations").glob("*.yaml")))
def test_every_shipped_row_parses_through_the_real_cli(name: str, demo_root: Path, tmp_path: Path):
    """A row's overrides reach the CLI unchanged: an unknown or mistyped option fails here, not an hour into a run.

    A row with its own ``--data.root`` (a manifest a script writes, e.g. ``runs/manifests/source_heldout.csv``) gets
    a manifest of the demo images in the same form: the CLI reads the data when it links class weights."""
    config = ROWS_CONFIG.get(name, "configs/classification/recipe_cpu.yaml")
    offline = ["--model.pretrained", "false"] if "classification" in config else []
    images = sorted(demo_root.glob("**/images/*.png"))
    manifest = tmp_path / "manifest.csv"
    manifest.write_text(
        "path,label,split\n"
        + "".join(
            f"{p},{p.parent.parent.name},{('train', 'train', 'val', 'test')[i % 4]}\n" for i, p in enumerate(images)
        )
    )
    for row in ablate.load_rows(REPO / "scripts" / "ablations" / f"{name}.yaml"):
        row.config = row.config and str(REPO / row.config)
        row.args = [str(manifest) if before == "--data.root" else a for before, a in zip(["", *row.args], row.args)]
        args = ablate.row_args(REPO / config, row, ["--data.root", str(demo_root), *offline])
        try:
            cli = build_cli(args, run=False)
        except SystemExit as exit_:
            pytest.fail(f"{name}.yaml row {row.name!r} does not parse (exit {exit_.code}): {row.args}")
        pairs = (
            dict(zip(row.args[::2], row.args[1::2]))
            if not any(a.startswith("--trainer.callbacks+=") for a in row.args)
            else {}
        )
        for option, value in pairs.items():  # each plain data/model override landed where it says
            section, _, key = option.removeprefix("--").partition(".")
            hparams = {"data": cli.datamodule.hparams, "model": cli.model.hparams}.get(section, {})
            if key in hparams and value != "null" and not value.startswith("["):
                got = hparams[key]
                assert str(got).lower() == value.lower() or float(got) == float(value), (row.name, option, got)


def test_rows_over_seeds_share_one_split_and_run_the_lung_hook(
    demo_root: Path, segmenter_ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """Every run also scores an external set (its lung masks computed too), tabled apart with intervals."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    other = make_demo_dataset(tmp_path / "elsewhere", n_per_class=2, seed=5)
    external = tmp_path / "elsewhere.csv"
    images = [(p, c) for c in ("COVID", "Normal") for p in sorted((other / c / "images").glob("*.png"))]
    external.write_text("path,label\n" + "".join(f"{p},{c}\n" for p, c in images))
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
    assert ablate.main([*args, "--data.external", f"[{external}]"]) == 0

    runs = _runs_csv(out)
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
    assert len(masks) == 4 * 8 + 4  # the lungs-only row computed the lung masks of every image once, external too
    table = (out / "ablation.md").read_text()
    assert "| whole film | " in table and "| lungs only | " in table and " ± " in table
    n_test = int(float(runs[0]["test/acc n"]))
    assert f"] n={n_test} (n < 30)" in table  # 95% intervals over the test images, with n
    for r in runs:  # each cell's point and interval from one computation: the report's
        report = {
            row["metric"]: row for row in csv.DictReader((Path(r["log_dir"]) / "report_test" / "intervals.csv").open())
        }
        for key, metric in (
            ("test/acc", "accuracy"),
            ("test/balanced_acc", "balanced accuracy"),
            ("test/f1_macro", "macro f1"),
        ):
            assert float(r[key]) == float(report[metric]["value"])
            assert float(r[f"{key} low"]) <= float(r[key]) <= float(r[f"{key} high"])
    assert "test/balanced_acc" in runs[0] and "test/recall_Lung_Opacity" in runs[0]
    # the external set: sensitivity, specificity and their mean per run, with intervals, in their own table
    key = "external/elsewhere/balanced COVID vs Normal accuracy"
    for r in runs:
        spec = float(r["external/elsewhere/specificity (Normal)"])
        sens = float(r["external/elsewhere/sensitivity (COVID)"])
        assert float(r[key]) == pytest.approx((sens + spec) / 2) and float(r[f"{key} n"]) == 4
        assert float(r[f"{key} low"]) <= float(r[key]) <= float(r[f"{key} high"])
    external_table = table.split("External test sets")[1]
    assert f"| {key} |" in external_table.splitlines()[2] and "] n=4 (n < 30)" in external_table


def test_regime_table_on_demo_data(demo_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys):
    monkeypatch.chdir(tmp_path)
    rows = tmp_path / "rows.yaml"
    regimes = yaml.safe_load((REPO / "scripts/ablations/regimes.yaml").read_text())
    rows.write_text(yaml.safe_dump(regimes[:2]))  # head, last_conv
    out = tmp_path / "compare"
    argv = [
        "--config", str(REPO / "configs/classification/head_only.yaml"),
        "--rows", str(rows), "--seeds", "0", "--out", str(out),
        "--keys", "train/acc", "val/acc", "train/loss", "val/loss",
        # passed through to every run
        "--data.root", str(demo_root),
        "--trainer.max_epochs", "1",
        "--model.pretrained", "false",
        "--data.image_size", "32",
        "--data.num_workers", "0",
        "--trainer.enable_model_summary", "false",
    ]  # fmt: skip
    assert ablate.main(argv) == 0
    header = (
        "| row | trainable params | train/acc | val/acc | train/loss | val/loss | train time (s) | best epoch | seeds |"
    )
    assert header in capsys.readouterr().out

    rows = {r["row"]: r for r in _runs_csv(out)}
    assert list(rows) == ["head", "last_conv"]
    assert rows["head"]["trainable params"] == "1,838,596"
    assert rows["last_conv"]["trainable params"] == "2,045,956"
    for r in rows.values():
        assert r["best_epoch"] == "0" and float(r["train_time_s"]) > 0
        for col in ("train/acc", "val/acc", "train/loss", "val/loss"):
            assert r[col] != "", col
        assert 0 <= float(r["val/acc"]) <= 1
    md = (out / "ablation.md").read_text()
    assert "| head | 1,838,596 |" in md and "| last_conv | 2,045,956 |" in md

    # identical split: the second run read the first run's manifest
    first, second = Path(rows["head"]["log_dir"]), Path(rows["last_conv"]["log_dir"])
    assert first == out / "head" / "seed0" and second == out / "last_conv" / "seed0"
    config = yaml.safe_load((second / "config.yaml").read_text())
    assert config["data"]["init_args"]["split_file"] == str(first / "split.csv")
    assert config["model"]["init_args"]["trainable"] == "last_conv"
    assert (first / "split.csv").read_text() == (second / "split.csv").read_text()


def test_staged_row_on_a_staged_config_is_refused(tmp_path: Path):
    rows = tmp_path / "rows.yaml"
    rows.write_text(yaml.safe_dump(yaml.safe_load((REPO / "scripts/ablations/regimes.yaml").read_text())[-1:]))
    argv = ["--config", str(REPO / "configs/classification/staged_unfreeze.yaml"), "--rows", str(rows)]
    with pytest.raises(RuntimeError, match="more than one stateful callback of type `StagedUnfreeze`"):  # Lightning's
        ablate.main([*argv, "--out", str(tmp_path / "out"), "--model.pretrained", "false"])


def test_summarize_rerenders_the_table_from_runs_csv(tmp_path: Path):
    rows_file = tmp_path / "rows.yaml"
    rows_file.write_text(
        yaml.safe_dump([{"name": "a"}, {"name": "b", "args": ["--x", "1"]}, {"name": "c", "config": "other.yaml"}])
    )
    keys = ["test/acc", "test/acc_covid_vs_normal", "test/f1_macro", "val/acc"]
    runs = [Run(n, s, {k: 0.5 + 0.1 * s for k in keys}, 10.0 + s, 3, f"d/{n}{s}", "7") for n in "abc" for s in (0, 1)]
    out = tmp_path / "out"
    first = ablate.write_outputs(runs, ablate.load_rows(rows_file), keys, out, "T").read_text()
    assert ablate.read_runs(out / "runs.csv") == (runs, keys)
    (out / "ablation.md").unlink()
    assert ablate.main(["--rows", str(rows_file), "--out", str(out), "--title", "T", "--summarize"]) == 0
    assert (out / "ablation.md").read_text() == first
    assert "| b | 7 | 0.550 ± 0.071 |" in first and "- **c**: `--config other.yaml`" in first


def test_the_val_row_is_the_epoch_of_the_tested_checkpoint(demo_root: Path, tmp_path: Path, monkeypatch):
    """With ``--checkpoint.monitor`` overriding the model's monitor, the table's val figures and best epoch are
    those of the checkpoint the runner tests (the checkpoint callback's choice), not the model default's."""
    from covid_lightning.plotting import best_epoch, read_epoch_metrics

    monkeypatch.chdir(tmp_path)
    rows = tmp_path / "rows.yaml"
    rows.write_text(yaml.safe_dump([{"name": "head"}]))
    out = tmp_path / "by_loss"
    argv = ["--config", str(REPO / "configs/classification/head_only.yaml"), "--rows", str(rows), "--seeds", "0",
            "--out", str(out), "--keys", "val/acc", "val/loss", "--data.root", str(demo_root),
            "--trainer.max_epochs", "3", "--model.pretrained", "false", "--data.image_size", "32",
            "--data.num_workers", "0", "--data.test_fraction", "0.2", "--trainer.enable_model_summary", "false",
            "--checkpoint.monitor", "val/loss", "--checkpoint.mode", "min"]  # fmt: skip
    assert ablate.main(argv) == 0
    [run] = _runs_csv(out)
    epochs = read_epoch_metrics(Path(run["log_dir"]) / "metrics.csv")
    by_loss = best_epoch(epochs, "val/loss", "min")
    assert int(run["best_epoch"]) == by_loss
    assert float(run["val/loss"]) == pytest.approx(epochs[by_loss]["val/loss"])
    [best] = (Path(run["log_dir"]) / "checkpoints").glob("best-*.ckpt")
    assert best.name.startswith(f"best-epoch{by_loss:02d}-loss")
