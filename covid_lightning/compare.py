r"""Compare the lab's freezing regimes (or segmentation configs) under identical data, split and seed.

Each run is a real ``fit`` through the project's LightningCLI (:func:`covid_lightning.cli.build_cli`),
in this process, one after the other. The first run writes ``split.csv``; the others reuse it through
``--data.split_file``, so every run sees exactly the same images. One table comes out, Markdown + CSV::

    python scripts/compare_regimes.py --data.root /path/to/COVID-19_Radiography_Dataset --max_epochs 10
    python scripts/compare_regimes.py --configs configs/segmentation/unet_seed.yaml \
        configs/segmentation/unet_resnet34.yaml --data.root ...

Values are read from each run's ``metrics.csv`` at its best epoch (the module's monitor: ``val/acc`` for
classifiers, ``val/dice`` for segmenters). Single process only: run multi-GPU experiments one by one
with ``lightning fit``.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L

from covid_lightning.cli import build_cli
from covid_lightning.models.classifier import count_parameters
from covid_lightning.plotting import best_epoch, read_epoch_metrics

log = logging.getLogger(__name__)

#: the regimes this script knows, in the lab's order (``staged`` = head first, then everything)
REGIMES = ("head", "last_conv", "last_2_conv", "all", "staged")
DEFAULT_CONFIG = "configs/classification/head_only.yaml"
#: ``staged`` unfreezes at this epoch by default, as ``configs/classification/staged_unfreeze.yaml``
DEFAULT_UNFREEZE_AT_EPOCH = 3

#: result keys per run kind: (metrics.csv column, table header, CSV column)
COLUMNS: dict[str, list[tuple[str, str, str]]] = {
    "classification": [
        ("train/acc", "train acc", "train_acc"),
        ("val/acc", "val acc", "val_acc"),
        ("train/loss", "train loss", "train_loss"),
        ("val/loss", "val loss", "val_loss"),
    ],
    "segmentation": [
        ("train/loss", "train loss", "train_loss"),
        ("val/loss", "val loss", "val_loss"),
        ("val/iou", "val IoU", "val_iou"),
        ("val/dice", "val Dice", "val_dice"),
    ],
}


@dataclass
class RunResult:
    """One run of the comparison."""

    name: str
    config: str
    kind: str
    arch: str
    trainable_params: int
    trainable_params_end: int
    train_time_s: float
    best_epoch: int | None
    values: dict[str, float] = field(default_factory=dict)
    log_dir: str = ""


class _RunProbe(L.Callback):
    """Trainable parameters when training starts and ends, and the wall-clock time of the training loop."""

    def __init__(self) -> None:
        self.trainable_start = self.trainable_end = 0
        self.seconds = 0.0
        self._t0 = 0.0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.trainable_start = count_parameters(pl_module).trainable
        self._t0 = time.perf_counter()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.seconds = time.perf_counter() - self._t0
        self.trainable_end = count_parameters(pl_module).trainable


def regime_args(regime: str, unfreeze_at_epoch: int = DEFAULT_UNFREEZE_AT_EPOCH) -> list[str]:
    """CLI overrides that turn the base config into ``regime``."""
    if regime == "staged":
        callback = {
            "class_path": "covid_lightning.callbacks.StagedUnfreeze",
            "init_args": {"unfreeze_at_epoch": unfreeze_at_epoch, "backbone_lr_factor": 0.1},
        }
        return ["--model.trainable", "head", f"--trainer.callbacks+={json.dumps(callback)}"]
    if regime not in REGIMES:
        raise ValueError(f"Unknown regime {regime!r}; choose from {', '.join(REGIMES)}.")
    return ["--model.trainable", regime]


def logger_args(out_dir: Path, name: str) -> list[str]:
    """CSV + TensorBoard loggers writing into ``out_dir/name/version_N`` (replacing the config's)."""
    loggers = [
        {"class_path": f"lightning.pytorch.loggers.{cls}", "init_args": {"save_dir": str(out_dir), "name": name}}
        for cls in ("CSVLogger", "TensorBoardLogger")
    ]
    return ["--trainer.logger", json.dumps(loggers)]


def _arch(model: L.LightningModule) -> str:
    hp = model.hparams
    if "backbone" in hp:
        return str(hp["backbone"])
    arch = str(hp.get("arch", type(model).__name__))
    return arch if arch == "seed_unet" else f"{arch}/{hp.get('encoder', '')}"


def run_one(name: str, config: str, args: Sequence[str]) -> tuple[RunResult, Path | None, type]:
    """Fit one configuration through the CLI; returns its result, split manifest and datamodule class."""
    log.info("compare: running %s", name)
    probe = _RunProbe()
    with warnings.catch_warnings():  # "args and sys.argv both given": sys.argv are this script's own options
        warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter.*")
        cli = build_cli(["--config", config, *args], run=False)
    cli.before_fit()  # what `lightning fit` runs first (e.g. lung masks for data.lung_segmenter)
    cli.trainer.callbacks.append(probe)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    model = cli.model
    kind = model.task
    log_dir = Path(cli.trainer.log_dir)
    epochs = read_epoch_metrics(log_dir / "metrics.csv") if (log_dir / "metrics.csv").is_file() else {}
    best = best_epoch(epochs, getattr(model, "monitor", "val/loss"), getattr(model, "monitor_mode", "min"))
    values = {k: epochs[best][k] for k, _, _ in COLUMNS[kind] if best is not None and k in epochs[best]}
    result = RunResult(
        name=name,
        config=config,
        kind=kind,
        arch=_arch(model),
        trainable_params=probe.trainable_start,
        trainable_params_end=probe.trainable_end,
        train_time_s=probe.seconds,
        best_epoch=best,
        values=values,
        log_dir=str(log_dir),
    )
    return result, getattr(cli.datamodule, "manifest_path", None), type(cli.datamodule)


def run_all(
    runs: Sequence[tuple[str, str, Sequence[str]]], common: Sequence[str], reuse_split: bool = True
) -> list[RunResult]:
    """Run ``(name, config, args)`` one after the other with ``common`` overrides appended.

    With ``reuse_split`` the first run's ``split.csv`` is passed to the later runs of the same
    datamodule class as ``--data.split_file``.
    """
    results: list[RunResult] = []
    split: tuple[type, Path] | None = None
    for name, config, args in runs:
        extra: list[str] = []
        if reuse_split and split is not None:
            extra = ["--data.split_file", str(split[1])]
        result, manifest, dm_class = run_one(name, config, [*args, *extra, *common])
        if split is None and manifest is not None:
            split = (dm_class, Path(manifest))
        elif split is not None and dm_class is not split[0]:
            log.warning("%s uses %s, not %s: it made its own split.", name, dm_class.__name__, split[0].__name__)
        results.append(result)
    return results


# tables --------------------------------------------------------------------------------------------------
def _params(r: RunResult) -> str:
    if r.trainable_params_end and r.trainable_params_end != r.trainable_params:
        return f"{r.trainable_params:,} -> {r.trainable_params_end:,}"
    return f"{r.trainable_params:,}"


def _kinds(results: Sequence[RunResult]) -> list[str]:
    return list(dict.fromkeys(r.kind for r in results))


def table_rows(results: Sequence[RunResult], first: str = "regime") -> tuple[list[str], list[list[str]]]:
    """Markdown header and rows: name, (arch), trainable params, metrics at the best epoch, time, best epoch."""
    kinds = _kinds(results)
    metric_cols = list(dict.fromkeys(c for k in kinds for c in COLUMNS[k]))
    with_arch = "segmentation" in kinds or first == "config"
    header = [first, *(["arch"] if with_arch else []), "trainable params"]
    header += [h for _, h, _ in metric_cols] + ["time (s)", "best epoch"]
    rows = []
    for r in results:
        row = [r.name, *([r.arch] if with_arch else []), _params(r)]
        row += [f"{r.values[k]:.4f}" if k in r.values else "" for k, _, _ in metric_cols]
        row += [f"{r.train_time_s:.1f}", "" if r.best_epoch is None else str(r.best_epoch)]
        rows.append(row)
    return header, rows


def to_markdown(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub markdown table (first column left-aligned, the rest right-aligned)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_table(results: Sequence[RunResult], out_dir: str | Path, first: str = "regime", note: str = "") -> Path:
    """``comparison.md`` and ``comparison.csv`` into ``out_dir``; returns the markdown path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    header, rows = table_rows(results, first)
    title = "Freezing regimes" if first == "regime" else "Configurations"
    md = (
        [f"# {title}", "", note, "", to_markdown(header, rows)]
        if note
        else [f"# {title}", "", to_markdown(header, rows)]
    )
    (out / "comparison.md").write_text("\n".join(md), encoding="utf-8")
    metric_cols = list(dict.fromkeys(c for k in _kinds(results) for c in COLUMNS[k]))
    fields = [first, "config_file", "arch", "trainable_params", "trainable_params_end"]
    fields += [c for _, _, c in metric_cols] + ["train_time_s", "best_epoch", "log_dir"]
    with (out / "comparison.csv").open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(fields)
        for r in results:
            row: list[Any] = [r.name, r.config, r.arch, r.trainable_params, r.trainable_params_end]
            row += [r.values.get(k, "") for k, _, _ in metric_cols]
            row += [round(r.train_time_s, 3), "" if r.best_epoch is None else r.best_epoch, r.log_dir]
            w.writerow(row)
    return out / "comparison.md"


# command line ---------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Compare freezing regimes (or configs) with identical data, split and seed; one table out. "
        "Unknown options are passed to every run (e.g. --model.pretrained_file X --data.num_workers 4).",
        allow_abbrev=False,
    )
    parser.add_argument("--data.root", dest="data_root", default=None, help="dataset folder (default: the config's)")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--regimes", nargs="+", choices=REGIMES, default=None, help=f"default: {' '.join(REGIMES)}")
    group.add_argument("--configs", nargs="+", default=None, help="compare these configs instead (e.g. segmenters)")
    parser.add_argument(
        "--config", default=DEFAULT_CONFIG, help=f"base config of the regimes (default {DEFAULT_CONFIG})"
    )
    parser.add_argument("--max_epochs", type=int, default=None, help="epochs per run (default: the config's)")
    parser.add_argument("--out", type=Path, default=Path("runs/compare"), help="runs and table go here")
    parser.add_argument(
        "--unfreeze_at_epoch",
        type=int,
        default=DEFAULT_UNFREEZE_AT_EPOCH,
        help=f"epoch at which 'staged' unfreezes the backbone (default {DEFAULT_UNFREEZE_AT_EPOCH})",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``compare_regimes`` entry point; prints the table and writes ``<out>/comparison.{md,csv}``."""
    parser = build_parser()
    opts, passthrough = parser.parse_known_args(argv)
    common: list[str] = []
    if opts.max_epochs is not None:
        common += ["--trainer.max_epochs", str(opts.max_epochs)]
    if opts.data_root is not None:
        common += ["--data.root", opts.data_root]
    common += passthrough
    reuse = not any(a.startswith("--data.split_file") for a in passthrough)

    if opts.configs:
        runs = [(Path(c).stem, c, logger_args(opts.out, Path(c).stem)) for c in opts.configs]
        first = "config"
    else:
        if "StagedUnfreeze" in Path(opts.config).read_text(encoding="utf-8"):
            parser.error(f"{opts.config} already has a StagedUnfreeze callback: give a single-regime base config.")
        regimes = opts.regimes or list(REGIMES)
        if "staged" in regimes and opts.max_epochs is not None and opts.unfreeze_at_epoch >= opts.max_epochs:
            log.warning(
                "staged: unfreeze_at_epoch %d >= max_epochs %d, it never unfreezes.",
                opts.unfreeze_at_epoch,
                opts.max_epochs,
            )
        runs = [(r, opts.config, [*regime_args(r, opts.unfreeze_at_epoch), *logger_args(opts.out, r)]) for r in regimes]
        first = "regime"
    results = run_all(runs, common, reuse_split=reuse)
    note = "Values at each run's best epoch (by val/acc for classifiers, val/dice for segmenters); "
    note += "same seed and split for every run; time = the training loop incl. validation."
    md = write_table(results, opts.out, first=first, note=note)
    print(md.read_text(encoding="utf-8"))
    print(f"Written: {md} and {md.with_suffix('.csv')}")
    return 0
