"""Ablations over seeds: one ingredient added or removed per row, mean ± std of held-out metrics.

Protocol: the first run writes the split (train/val/test, seeded, stratified, duplicate groups kept
together); every other run reuses that exact ``split.csv``. Each run trains with its own
``seed_everything``, keeps the best epoch by the model's monitor on **val**, and is then evaluated
once on the held-out **test** split with that checkpoint.

    python scripts/ablate.py --config configs/classification/recipe_cpu.yaml \
        --rows scripts/ablations/classification.yaml --seeds 0 1 2 --out docs/ablations/classification \
        --data.root ../shared/data/covid_cls_sample
"""

from __future__ import annotations

import argparse
import csv
import logging
import statistics
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from covid_lightning.cli import build_cli

log = logging.getLogger(__name__)

#: metrics reported per task (test split first: the held-out numbers)
REPORTED = {
    "classification": ["test/acc", "test/acc_covid_vs_normal", "test/f1_macro", "val/acc"],
    "segmentation": ["test/dice", "test/iou", "test/dice_per_image", "val/dice"],
}


@dataclass
class Row:
    """One line of the ablation table: a name and the CLI overrides that make it."""

    name: str
    args: list[str] = field(default_factory=list)


@dataclass
class Run:
    row: str
    seed: int
    metrics: dict[str, float]
    seconds: float
    best_epoch: int | None
    log_dir: str


def config_task(config: str | Path) -> str:
    """The task of the model a config builds (asked of the model class, not guessed from the text)."""
    from covid_lightning.modules.base import model_class

    class_path = (yaml.safe_load(Path(config).read_text()).get("model") or {}).get("class_path")
    cls = model_class(class_path)
    if cls is None:
        raise SystemExit(f"{config}: model.class_path {class_path!r} is not a covid-lightning model.")
    return cls.task


def load_rows(path: str | Path) -> list[Row]:
    """Rows from a YAML list of ``{name: ..., args: [...]}``."""
    rows = [Row(str(r["name"]), [str(a) for a in r.get("args", [])]) for r in yaml.safe_load(Path(path).read_text())]
    if not rows:
        raise ValueError(f"{path} lists no rows.")
    return rows


def run_once(config: str, row: Row, seed: int, out: Path, common: Sequence[str], split_file: Path | None) -> Run:
    """Fit one row with one seed, then test its best checkpoint on the held-out split."""
    args = ["--config", config, *common, *row.args, "--seed_everything", str(seed)]
    args += ["--trainer.logger", "lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir", str(out)]
    args += ["--trainer.logger.name", _slug(row.name), "--trainer.logger.version", f"seed{seed}"]
    if split_file is not None:
        args += ["--data.split_file", str(split_file)]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter.*")
        cli = build_cli(args, run=False)
    cli.before_fit()  # what `lightning fit` runs first (e.g. lung masks for data.lung_segmenter)
    started = time.perf_counter()
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    seconds = time.perf_counter() - started
    best = cli.trainer.checkpoint_callback
    best_path = best.best_model_path if best is not None and best.best_model_path else None
    val = {k: float(v) for k, v in cli.trainer.callback_metrics.items() if k.startswith("val/")}
    if best is not None and best.best_model_score is not None:
        val[best.monitor] = float(best.best_model_score)
    test = cli.trainer.test(cli.model, datamodule=cli.datamodule, ckpt_path=best_path or "last", verbose=False)
    metrics = {**val, **{k: float(v) for k, v in (test[0] if test else {}).items()}}
    epoch = _epoch_of(best_path)
    return Run(row.name, seed, metrics, seconds, epoch, str(cli.trainer.log_dir))


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_") or "row"


def _epoch_of(path: str | None) -> int | None:
    if not path:
        return None
    digits = Path(path).stem.split("epoch")[-1][:2]
    return int(digits) if digits.isdigit() else None


def summarize(runs: Sequence[Run], rows: Sequence[Row], keys: Sequence[str]) -> list[list[str]]:
    """One line per row: mean ± std over seeds of every key, training time, seeds."""
    table = []
    for row in rows:
        mine = [r for r in runs if r.row == row.name]
        cells = [row.name]
        for key in keys:
            values = [r.metrics[key] for r in mine if key in r.metrics]
            cells.append(_mean_std(values, 3))
        cells.append(_mean_std([r.seconds for r in mine], 0))
        cells.append(str(len(mine)))
        table.append(cells)
    return table


def _mean_std(values: Sequence[float], digits: int) -> str:
    if not values:
        return ""
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def write_outputs(runs: Sequence[Run], rows: Sequence[Row], keys: Sequence[str], out: Path, title: str) -> Path:
    """``ablation.md`` (mean ± std) and ``runs.csv`` (every run) under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    header = ["row", *keys, "train time (s)", "seeds"]
    lines = [f"# {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cells) + " |" for cells in summarize(runs, rows, keys)]
    lines += ["", "Overrides per row:", ""] + [
        f"- **{r.name}**: `{' '.join(r.args) or '(the config as is)'}`" for r in rows
    ]
    md = out / "ablation.md"
    md.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with (out / "runs.csv").open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["row", "seed", *keys, "train_time_s", "best_epoch", "log_dir"])
        for r in runs:
            w.writerow(
                [r.row, r.seed, *(r.metrics.get(k, "") for k in keys), f"{r.seconds:.1f}", r.best_epoch, r.log_dir]
            )
    return md


def read_runs(path: str | Path, keys: Sequence[str]) -> list[Run]:
    """The runs of a ``runs.csv`` written by :func:`write_outputs` (to re-render tables without training)."""
    with Path(path).open(newline="", encoding="utf-8") as f:
        return [
            Run(
                r["row"],
                int(r["seed"]),
                {k: float(r[k]) for k in keys if r.get(k)},
                float(r["train_time_s"]),
                int(r["best_epoch"]) if r.get("best_epoch") else None,
                r["log_dir"],
            )
            for r in csv.DictReader(f)
        ]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ablate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="the recipe config every row starts from")
    parser.add_argument("--rows", required=True, help="YAML list of {name, args} rows")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default="runs/ablate", help="folder for logs, ablation.md and runs.csv")
    parser.add_argument("--task", choices=sorted(REPORTED), default=None, help="default: from the config's model")
    parser.add_argument("--title", default=None)
    parser.add_argument(
        "--summarize", action="store_true", help="train nothing: re-render ablation.md from --out's runs.csv"
    )
    args, common = parser.parse_known_args(argv)
    rows = load_rows(args.rows)
    task = args.task or config_task(args.config)
    out = Path(args.out)
    title = args.title or f"Ablation of {args.config}"
    if args.summarize:
        write_outputs(read_runs(out / "runs.csv", REPORTED[task]), rows, REPORTED[task], out, title)
        print((out / "ablation.md").read_text())
        return 0
    runs: list[Run] = []
    split_file: Path | None = None
    for row in rows:
        for seed in args.seeds:
            run = run_once(args.config, row, seed, out, common, split_file)
            runs.append(run)
            if split_file is None and (Path(run.log_dir) / "split.csv").is_file():
                split_file = Path(run.log_dir) / "split.csv"
            log.info("ablate: %s seed %d: %s (%.0f s)", row.name, seed, run.metrics, run.seconds)
            write_outputs(runs, rows, REPORTED[task], out, title)
    print((out / "ablation.md").read_text())
    return 0
