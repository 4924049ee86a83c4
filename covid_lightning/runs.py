"""Run folders: a ``fit`` owns ``<root>/<name>/version_N`` (config, metrics, TensorBoard events, split.csv,
``checkpoints/``); ``validate``/``test``/``predict`` of its checkpoints write into ``version_N/<command>/version_M``.
"""

from __future__ import annotations

import csv
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

from covid_lightning.checkpointing import load_checkpoint_file
from covid_lightning.errors import UserError

DEFAULT_ROOT = "runs"
CHECKPOINTS = "checkpoints"
LAST = "last.ckpt"
#: rank 0 of a multi-process run tells the ranks it launches which run folder they belong to
RUN_ENV = "COVID_LIGHTNING_RUN"
_VERSION = re.compile(r"version_(\d+)$")
log = logging.getLogger(__name__)


def next_version(folder: Path) -> int:
    """One more than the highest N of the ``version_N`` folders in ``folder`` (0 when there is none)."""
    found = [int(m.group(1)) for p in folder.glob("version_*") if p.is_dir() and (m := _VERSION.match(p.name))]
    return max(found, default=-1) + 1


def latest_run(root: str | Path, name: str) -> Path | None:
    """The newest ``<root>/<name>/version_N`` that has a ``checkpoints/last.ckpt`` (what a resume continues)."""
    runs = [p.parent.parent for p in (Path(root) / name).glob(f"version_*/{CHECKPOINTS}/{LAST}") if p.is_file()]
    runs = [run for run in runs if _VERSION.match(run.name)]
    return max(runs, key=lambda run: int(run.name.split("_")[-1]), default=None)


def run_of_checkpoint(ckpt: str | Path) -> Path | None:
    """``<run>/checkpoints/x.ckpt`` -> ``<run>`` when ``<run>`` is a ``version_N`` folder, else None."""
    path = Path(ckpt)
    return path.parent.parent if path.parent.name == CHECKPOINTS and _VERSION.match(path.parent.parent.name) else None


def default_run_name(config: Any) -> str:
    """The first ``--config`` file's stem, else the model class' name in lower case."""
    files = config.get("config") or []
    if files:
        return Path(str(getattr(files[0], "relative", files[0]))).stem
    model = config.get("model") or {}
    return str((model.get("class_path") if hasattr(model, "get") else None) or "run").rsplit(".", 1)[-1].lower()


def resolve_checkpoint(ckpt: Any, root: Path, name: str, subcommand: str) -> Path | None:
    """``last``/``best`` -> that file of the newest run of ``name``; a path -> itself (it must exist)."""
    if ckpt is None:
        return None
    if str(ckpt) in ("last", "best"):
        run = latest_run(root, name)
        if run is None and subcommand == "fit" and str(ckpt) == "last":
            log.warning("No earlier run of %r under %s to resume: starting a new run.", name, root)
            return None
        if run is None:
            raise UserError(f"--ckpt_path {ckpt}: no run of {name!r} under {root} has a {LAST}.")
        last = run / CHECKPOINTS / LAST
        return last if str(ckpt) == "last" else best_checkpoint_of(last)
    path = Path(str(ckpt)).expanduser()
    if not path.is_file():
        raise UserError(f"--ckpt_path {path}: no such checkpoint file.")
    return path


def best_checkpoint_of(last: Path) -> Path:
    """The best checkpoint that ``last.ckpt``'s :class:`RunCheckpoint` state points to."""
    for key, value in load_checkpoint_file(last).get("callbacks", {}).items():
        best = value.get("best_model_path") if isinstance(value, dict) else None
        if "Checkpoint" in str(key) and best and Path(best).is_file():
            return Path(best)
    raise UserError(f"{last} names no best checkpoint that still exists; give its path to --ckpt_path.")


def plan_run(
    subcommand: str, root: Path, name: str, ckpt: Path | None, checkpoint: dict[str, Any] | None, explicit_root: bool
) -> RunPlan:
    """Where ``subcommand`` writes (see :mod:`covid_lightning.runs`); ``checkpoint`` is ``ckpt`` loaded."""
    inherited = RunPlan.from_env()
    if inherited is not None:
        return inherited
    run = run_of_checkpoint(ckpt) if ckpt is not None else None
    if subcommand == "fit" and run is not None:  # resume: the same folder, the same version, the same streams
        step = int((checkpoint or {}).get("global_step", 0))
        return RunPlan(run.parent.parent, run.parent.name, int(run.name.split("_")[-1]), resume_step=step)
    if subcommand == "fit":
        return RunPlan(root, name, next_version(root / name))
    base = run if run is not None and not explicit_root else root / name
    return RunPlan(base, subcommand, next_version(base / subcommand))


@dataclass
class RunPlan:
    """Where one command writes: ``<save_dir>/<name>/version_<version>``; ``resume_step`` when continuing a run."""

    save_dir: Path
    name: str
    version: int
    resume_step: int | None = None

    def loggers(self, tensorboard: bool = True) -> list[Logger]:
        """CSV (+ TensorBoard) in the run folder; a resumed run keeps its streams up to the checkpoint's step."""
        common = {"save_dir": str(self.save_dir), "name": self.name, "version": self.version}
        loggers: list[Logger] = [RunCSVLogger(**common, resume_step=self.resume_step)]
        if tensorboard:
            purge = {} if self.resume_step is None else {"purge_step": self.resume_step + 1}
            loggers.append(TensorBoardLogger(**common, default_hp_metric=False, **purge))
        return loggers

    def to_env(self) -> str:
        return f"{self.version}|{self.save_dir}|{self.name}"

    @classmethod
    def from_env(cls) -> RunPlan | None:
        """The plan rank 0 chose, in a process it launched (``LOCAL_RANK`` > 0)."""
        value = os.environ.get(RUN_ENV)
        if not value or int(os.environ.get("LOCAL_RANK", "0") or 0) == 0:
            return None
        version, save_dir, name = value.split("|", 2)
        return cls(Path(save_dir), name, int(version))


class _KeepingWriter(ExperimentWriter):
    """A CSV writer that keeps a resumed run's ``metrics.csv`` rows up to the checkpoint's step and appends."""

    def __init__(self, log_dir: str, resume_step: int | None) -> None:
        self._resume_step = resume_step
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:
        path = Path(self.metrics_file_path)
        if self._resume_step is None or not path.is_file():
            return super()._check_log_dir_exists()
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            rows = [r for r in reader if not r.get("step") or int(float(r["step"])) <= self._resume_step]
        self.metrics_keys = sorted(reader.fieldnames or [])
        with open(path, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(reader.fieldnames or []))
            writer.writeheader()
            writer.writerows(rows)
        return None


class RunCSVLogger(CSVLogger):
    """``CSVLogger`` that continues a resumed run's ``metrics.csv`` instead of deleting it."""

    def __init__(self, *args: Any, resume_step: int | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._resume_step = resume_step

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _KeepingWriter(self.log_dir, self._resume_step)
        return self._experiment
