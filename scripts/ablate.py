#!/usr/bin/env python
"""The experiment runner: rows (overrides of one config) x seeds on one split, one table (mean ± std over seeds).

The first run writes the split (``split.csv``); every other run reuses it. Each run fits through the project's
LightningCLI, keeps its best epoch by the model's monitor on val, and, when the data holds a test split, is tested
with that checkpoint. Out: ``<out>/ablation.md`` (the table) and ``<out>/runs.csv`` (every run).

    python scripts/ablate.py --config configs/classification/recipe_cpu.yaml \
        --rows scripts/ablations/classification.yaml --seeds 0 1 2 --out docs/ablations/classification \
        --data.root ../shared/data/covid_cls_sample
    python scripts/ablate.py --config configs/classification/head_only.yaml --rows scripts/ablations/regimes.yaml \
        --seeds 42 --keys train/acc val/acc train/loss val/loss --data.root DATA   # the lab's regime table

Options it does not know are passed to every run (``--data.root``, ``--trainer.max_epochs``...). A row is
``{name, args: [...], config: (optional, replaces --config)}``.
"""

from __future__ import annotations

import argparse
import csv
import logging
import statistics
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a checkout without `pip install -e .`
from covid_lightning.callbacks.reports import to_markdown, write_csv
from covid_lightning.cli import build_cli
from covid_lightning.errors import UserError
from covid_lightning.lungs import attach_lung_masks
from covid_lightning.models.classifier import count_parameters
from covid_lightning.plotting import best_epoch, read_epoch_metrics

log = logging.getLogger("ablate")

#: metrics reported per task by default (the held-out test split first); classification adds per-class recall
REPORTED = {
    "classification": ["test/acc", "test/balanced_acc", "test/acc_covid_vs_normal", "test/f1_macro", "val/acc"],
    "segmentation": ["test/dice", "test/iou", "test/dice_per_image", "val/dice"],
}
#: logged metric -> its row in a test report's intervals.csv (the 95% bootstrap interval over images)
INTERVAL_OF = {
    "test/acc": "accuracy",
    "test/balanced_acc": "balanced accuracy",
    "test/acc_covid_vs_normal": "COVID vs Normal accuracy",
    "test/f1_macro": "macro f1",
    "test/dice_per_image": "mean per-image Dice",
}
#: the external-summary metrics tabled per source (``lightning test --data.external``), their table's key prefix
EXTERNAL_METRICS = ("sensitivity (COVID)", "specificity (Normal)", "balanced COVID vs Normal accuracy")
EXTERNAL = "external/"
#: the interval columns kept per metric in runs.csv
BOUNDS = ("low", "high", "n")
#: runs.csv columns that are not metrics
RUN_COLUMNS = ("row", "seed", "trainable params", "train_time_s", "best_epoch", "log_dir")


@dataclass
class Row:
    """One line of the table: a name, the CLI overrides that make it, and optionally its own config."""

    name: str
    args: list[str] = field(default_factory=list)
    config: str | None = None


@dataclass
class Run:
    row: str
    seed: int
    metrics: dict[str, float]
    seconds: float
    best_epoch: int | None
    log_dir: str
    trainable: str = ""


def load_rows(path: str | Path) -> list[Row]:
    """Rows from a YAML list of ``{name, args, config}``."""
    rows = [
        Row(str(r["name"]), [str(a) for a in r.get("args", [])], r.get("config"))
        for r in yaml.safe_load(Path(path).read_text())
    ]
    if not rows:
        raise UserError(f"{path} lists no rows.")
    return rows


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_") or "row"


def row_args(config: str | Path | None, row: Row, common: Sequence[str]) -> list[str]:
    """The CLI arguments that make a row: its config (or the table's), the options common to every run, its own."""
    return ["--config", str(row.config or config), *common, *row.args]


def run_once(config: str | None, row: Row, seed: int, out: Path, common: Sequence[str]) -> tuple[Run, Any]:
    """Fit one row with one seed (then test its best checkpoint); returns the run and the CLI that made it."""
    args = [*row_args(config, row, common), "--seed_everything", str(seed)]
    args += ["--trainer.logger", "lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir", str(out)]
    args += ["--trainer.logger.name", _slug(row.name), "--trainer.logger.version", f"seed{seed}"]
    with warnings.catch_warnings():  # "args and sys.argv both given": sys.argv are this script's own options
        warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter.*")
        cli = build_cli(args, run=False)
    if cli.datamodule.hparams.get("lung_segmenter"):  # what `lightning fit` does first
        attach_lung_masks(cli.datamodule, cli.datamodule.hparams.lung_segmenter)  # fit and test
    trainable = count_parameters(cli.model).trainable
    started = time.perf_counter()
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    seconds = time.perf_counter() - started
    end = count_parameters(cli.model).trainable
    epochs = read_epoch_metrics(Path(cli.trainer.log_dir) / "metrics.csv")
    selector = cli.trainer.checkpoint_callback  # the epoch of the checkpoint tested below (--checkpoint.monitor)
    best = best_epoch(epochs, selector.monitor, selector.mode)
    metrics = dict(epochs.get(best, {}))
    if cli.datamodule.has_test_split:
        tested = cli.trainer.test(cli.model, datamodule=cli.datamodule, ckpt_path="best", verbose=False)
        metrics |= {k: float(v) for test in tested for k, v in test.items()}  # one dict per test set
        metrics |= test_intervals(Path(cli.trainer.log_dir) / "report_test" / "intervals.csv")
        metrics |= external_metrics(Path(cli.trainer.log_dir) / "external_summary.csv")
    params = f"{trainable:,}" if end == trainable else f"{trainable:,} -> {end:,}"
    return Run(row.name, seed, metrics, seconds, best, str(cli.trainer.log_dir), params), cli


def test_intervals(path: Path) -> dict[str, float]:
    """``{metric}`` with its ``low`` / ``high`` / ``n`` from a test report's 95% bootstrap intervals: the point
    and its interval from one computation (the report's), so a cell never shows a mean outside its interval."""
    if not path.is_file():
        return {}
    with path.open(newline="", encoding="utf-8") as f:
        found = {r["metric"]: r for r in csv.DictReader(f)}
    names = {v: k for k, v in INTERVAL_OF.items()} | {
        m: f"test/recall_{m.split(' ', 1)[1].replace(' ', '_')}" for m in found if m.startswith("recall ")
    }
    out = {}
    for metric, key in names.items():
        row = found.get(metric)
        if row and row["95% CI low"]:
            out |= {key: float(row["value"]), f"{key} low": float(row["95% CI low"])}
            out |= {f"{key} high": float(row["95% CI high"]), f"{key} n": float(row["n"])}
    return out


def external_metrics(path: Path) -> dict[str, float]:
    """``external/<source>/<metric>`` (and its ``low``/``high``/``n``) from ``lightning test``'s external summary."""
    if not path.is_file():
        return {}
    out = {}
    with path.open(newline="", encoding="utf-8") as f:
        for r in csv.DictReader(f):
            key = f"{EXTERNAL}{r['source']}/{r['metric']}"
            if r["metric"] in EXTERNAL_METRICS and r["value"] not in ("", "nan"):
                out |= {key: float(r["value"]), f"{key} n": float(r["n"])}
                out |= {f"{key} {b}": float(r[f"95% CI {b}"]) for b in ("low", "high")}
    return out


def _mean_std(values: Sequence[float], digits: int) -> str:
    if not values:
        return ""
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.fmean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def _cell(runs: Sequence[Run], key: str) -> str:
    """Mean ± std over seeds, then the seeds' mean 95% interval over images and n, where the runs have them."""
    cell = _mean_std([r.metrics[key] for r in runs if key in r.metrics], 3)
    lows = [r.metrics[f"{key} low"] for r in runs if f"{key} low" in r.metrics]
    highs = [r.metrics[f"{key} high"] for r in runs if f"{key} high" in r.metrics]
    if cell and lows:
        n = int(runs[0].metrics.get(f"{key} n", 0))
        cell += f" [{statistics.fmean(lows):.3f}, {statistics.fmean(highs):.3f}] n={n}" + (" (n < 30)" * (n < 30))
    return cell


def summarize(runs: Sequence[Run], rows: Sequence[Row], keys: Sequence[str]) -> list[dict[str, str]]:
    """One table row per row: trainable parameters, mean ± std over seeds of every key (with the seeds' mean 95%
    bootstrap interval over test images and n), time, best epoch, seeds."""
    table = []
    for row in rows:
        mine = [r for r in runs if r.row == row.name]
        cells = {"row": row.name, "trainable params": mine[0].trainable if mine else ""}
        cells |= {k: _cell(mine, k) for k in keys}
        cells["train time (s)"] = _mean_std([r.seconds for r in mine], 0)
        cells["best epoch"] = _mean_std([r.best_epoch for r in mine if r.best_epoch is not None], 0)
        table.append(cells | {"seeds": str(len(mine))})
    return table


def write_outputs(runs: Sequence[Run], rows: Sequence[Row], keys: Sequence[str], out: Path, title: str) -> Path:
    """``ablation.md`` (the table and each row's overrides) and ``runs.csv`` (every run) under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    inside = [k for k in keys if not k.startswith(EXTERNAL)]
    lines = [f"# {title}", "", to_markdown(summarize(runs, rows, inside))]
    external = [k for k in keys if k.startswith(EXTERNAL)] or sorted(
        {k for r in runs for k in r.metrics if k.startswith(EXTERNAL) and k.split("/", 2)[-1] in EXTERNAL_METRICS}
    )
    if external:  # one column per source and metric; COVID vs Normal by the larger of the two probabilities
        found = summarize(runs, rows, external)
        lines += ["External test sets (`data.external`; never used for selection):", "", to_markdown(found)]
    keys = [*inside, *external]
    lines += ["Overrides per row:", ""]
    for r in rows:
        shown = " ".join(["--config", r.config, *r.args] if r.config else r.args)
        lines.append(f"- **{r.name}**: `{shown or '(the config as is)'}`")
    (out / "ablation.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    extra = [f"{k} {s}" for k in keys for s in BOUNDS if any(f"{k} {s}" in r.metrics for r in runs)]
    values = (
        [r.row, r.seed, r.trainable, *(r.metrics.get(k) for k in [*keys, *extra])]
        + [round(r.seconds, 1), r.best_epoch, r.log_dir]
        for r in runs
    )
    columns = [*RUN_COLUMNS[:3], *keys, *extra, *RUN_COLUMNS[3:]]
    write_csv(out / "runs.csv", [dict(zip(columns, v)) for v in values])
    return out / "ablation.md"


def read_runs(path: Path) -> tuple[list[Run], list[str]]:
    """The runs and metric keys of a ``runs.csv`` written by :func:`write_outputs` (to re-render the table)."""
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        columns = [k for k in reader.fieldnames or [] if k not in RUN_COLUMNS]
        runs = [
            Run(
                r["row"],
                int(r["seed"]),
                {k: float(r[k]) for k in columns if r[k]},
                float(r["train_time_s"]),
                int(r["best_epoch"]) if r["best_epoch"] else None,
                r["log_dir"],
                r.get("trainable params", ""),
            )
            for r in reader
        ]
    return runs, [k for k in columns if k.rpartition(" ")[2] not in BOUNDS]


def run_table(
    config: str | None,
    rows: Sequence[Row],
    seeds: Sequence[int],
    out: Path,
    common: Sequence[str],
    keys: Sequence[str] | None,
    title: str,
) -> None:
    """Every row with every seed, the first run's split reused by the others; the table rewritten after each run."""
    runs: list[Run] = []
    split: list[str] = []
    for row in rows:
        for seed in seeds:
            run, cli = run_once(config, row, seed, out, [*common, *split])
            runs.append(run)
            if not keys:
                recalls = [f"test/recall_{str(c).replace(' ', '_')}" for c in getattr(cli.model, "class_names", [])]
                keys = [*REPORTED[cli.model.task][:-1], *recalls, REPORTED[cli.model.task][-1]]
            if not split and cli.datamodule.manifest_path is not None:
                split = ["--data.split_file", str(cli.datamodule.manifest_path)]
            log.info("ablate: %s seed %d: %s (%.0f s)", row.name, seed, run.metrics, run.seconds)
            write_outputs(runs, rows, keys, out, title)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="the config every row starts from (a row's own config replaces it)")
    parser.add_argument("--rows", required=True, help="YAML list of {name, args, config} rows")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=Path("runs/ablate"), help="logs, ablation.md and runs.csv")
    parser.add_argument("--keys", nargs="+", help="metrics to report (default: the task's held-out ones)")
    parser.add_argument("--title", default=None)
    parser.add_argument("--summarize", action="store_true", help="train nothing: re-render the table from runs.csv")
    args, common = parser.parse_known_args(argv)
    rows = load_rows(args.rows)
    title = args.title or f"Ablation of {args.config or args.rows}"
    if args.summarize:
        runs, keys = read_runs(args.out / "runs.csv")
        write_outputs(runs, rows, args.keys or keys, args.out, title)
    else:
        run_table(args.config, rows, args.seeds, args.out, common, args.keys, title)
    print((args.out / "ablation.md").read_text())
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    sys.exit(main())
