"""Run folders: a ``fit`` owns ``<root>/<name>/version_N``; what is done later with its checkpoints writes inside it.

``<root>/<name>/version_N/`` holds ``config.yaml``, ``metrics.csv``, TensorBoard events, ``split.csv`` and
``checkpoints/{best-*,last}.ckpt``; ``validate``/``test``/``predict`` of one of its checkpoints write into
``version_N/<command>/version_M/`` (reports, metrics, predictions).
"""

from __future__ import annotations

import csv
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

DEFAULT_ROOT = "runs"
CHECKPOINTS = "checkpoints"
LAST = "last.ckpt"
#: rank 0 of a multi-process run tells the ranks it launches which run folder they belong to
RUN_ENV = "COVID_LIGHTNING_RUN"
_VERSION = re.compile(r"version_(\d+)$")


def versions(folder: str | Path) -> list[int]:
    """The N of every ``version_N`` folder in ``folder``, ascending."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(int(m.group(1)) for p in folder.iterdir() if p.is_dir() and (m := _VERSION.match(p.name)))


def next_version(folder: str | Path) -> int:
    found = versions(folder)
    return found[-1] + 1 if found else 0


def latest_run(root: str | Path, name: str) -> Path | None:
    """The newest ``<root>/<name>/version_N`` that has a ``checkpoints/last.ckpt`` (what a resume continues)."""
    for version in reversed(versions(Path(root) / name)):
        run = Path(root) / name / f"version_{version}"
        if (run / CHECKPOINTS / LAST).is_file():
            return run
    return None


def run_of_checkpoint(ckpt: str | Path) -> Path | None:
    """``<run>/checkpoints/x.ckpt`` -> ``<run>`` when ``<run>`` is a ``version_N`` folder, else None."""
    path = Path(ckpt)
    if path.parent.name == CHECKPOINTS and _VERSION.match(path.parent.parent.name):
        return path.parent.parent
    return None


@dataclass
class RunPlan:
    """Where one command writes: ``<save_dir>/<name>/version_<version>``; ``resume_step`` when continuing a run."""

    save_dir: Path
    name: str
    version: int
    resume_step: int | None = None

    @property
    def folder(self) -> Path:
        return self.save_dir / self.name / f"version_{self.version}"

    def loggers(self, tensorboard: bool = True) -> list[Logger]:
        """CSV (+ TensorBoard) writing into :attr:`folder`; a resumed run keeps its earlier streams."""
        common = {"save_dir": str(self.save_dir), "name": self.name, "version": self.version}
        loggers: list[Logger] = [RunCSVLogger(**common, resume_step=self.resume_step)]
        if tensorboard:
            extra: dict[str, Any] = {"default_hp_metric": False}
            if self.resume_step is not None:
                extra["purge_step"] = self.resume_step + 1  # drop events logged after the checkpoint
            loggers.append(TensorBoardLogger(**common, **extra))
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
    """Lightning's CSV writer deletes an existing ``metrics.csv``; a resumed run keeps its rows up to the
    checkpoint's step (rows a killed run logged after it are dropped) and appends."""

    def __init__(self, log_dir: str, resume_step: int | None) -> None:
        self._resume_step = resume_step
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:
        path = Path(self.metrics_file_path)
        if self._resume_step is None or not path.is_file():
            super()._check_log_dir_exists()
            return
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            header = list(reader.fieldnames or [])
            rows = [r for r in reader if not r.get("step") or int(float(r["step"])) <= self._resume_step]
        with open(path, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=header)
            writer.writeheader()
            writer.writerows(rows)
        self.metrics_keys = sorted(header)


class RunCSVLogger(CSVLogger):
    """``CSVLogger`` that continues a resumed run's ``metrics.csv`` instead of deleting it."""

    def __init__(self, *args: Any, resume_step: int | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._resume_step = resume_step

    @property
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            from lightning.fabric.utilities.rank_zero import rank_zero_only

            if rank_zero_only.rank > 0:
                return super().experiment
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _KeepingWriter(self.log_dir, self._resume_step)
        return self._experiment
