"""The command line: ``lightning`` / ``covid-lightning`` / ``python -m covid_lightning``.

``fit``, ``validate``, ``test`` and ``predict`` are LightningCLI's (one YAML per experiment);
extra subcommands that do not run a Trainer are dispatched before LightningCLI parses anything.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import time
import traceback
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import torch  # noqa: E402
from lightning.pytorch.callbacks import LearningRateMonitor  # noqa: E402
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI  # noqa: E402
from lightning.pytorch.plugins.io import CheckpointIO  # noqa: E402

from covid_lightning.callbacks import EvaluationReport, PredictionWriter, RunCheckpoint  # noqa: E402
from covid_lightning.checkpointing import AtomicCheckpointIO, load_checkpoint_file  # noqa: E402
from covid_lightning.data.datamodules import XRayDataModule  # noqa: E402
from covid_lightning.errors import UserError  # noqa: E402
from covid_lightning.modules.base import MODEL_CLASS_KEY, XRayModule, model_class  # noqa: E402
from covid_lightning.runs import (  # noqa: E402
    CHECKPOINTS,
    DEFAULT_ROOT,
    LAST,
    RUN_ENV,
    RunPlan,
    latest_run,
    next_version,
    run_of_checkpoint,
)
from covid_lightning.runtime import device_precision, tune_cpu_allocator  # noqa: E402

log = logging.getLogger(__name__)


class CovidLightningCLI(LightningCLI):
    """LightningCLI over any :class:`XRayModule` and :class:`XRayDataModule` (``class_path`` in the YAML).

    What every run shares is defaulted here, so a config holds only its experiment: the run folder
    (``<trainer.default_root_dir or runs>/<name>/version_N``, CSV + TensorBoard loggers), the best/last
    checkpoints (``checkpoint``), the LR monitor, the evaluation report (``report``) and the prediction
    writer (``predictions``), each configurable under its key. ``data.image_size`` is linked to
    ``model.image_size``: the data decides the size, the checkpoint stores it for inference.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._started = time.monotonic()
        self.run_plan: RunPlan | None = None
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.init_args.image_size", "model.init_args.image_size")
        # the classifier's head sizes itself from the data's classes (a manifest's labels, or the Kaggle four)
        for target, compute in (("class_names", list), ("num_classes", len)):
            parser.link_arguments("data.class_names", f"model.init_args.{target}", compute, apply_on="instantiate")
        parser.add_argument(
            "--name", type=str | None, default=None, help="Run name: the run lives in <default_root_dir>/<name>/."
        )
        parser.add_lightning_class_args(RunCheckpoint, "checkpoint")
        parser.add_lightning_class_args(LearningRateMonitor, "lr_monitor")
        parser.add_lightning_class_args(EvaluationReport, "report")
        parser.add_lightning_class_args(PredictionWriter, "predictions")

    # run folder and checkpoint ----------------------------------------------------------------
    def _parse_ckpt_path(self) -> None:
        """Resolve ``--ckpt_path`` (``last``/``best`` = the newest run of this name), refuse a checkpoint
        that does not fit the config, plan the run folder, then let Lightning read the hyper-parameters."""
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        config = self.config[subcommand]
        name = config.get("name") or default_run_name(config)
        explicit_root = config.trainer.get("default_root_dir")
        root = Path(explicit_root or DEFAULT_ROOT)
        ckpt = resolve_checkpoint(config.get("ckpt_path"), root, name, subcommand)
        config.ckpt_path = str(ckpt) if ckpt else None
        checkpoint = load_checkpoint_file(ckpt) if ckpt is not None else None  # read once: checked, then planned
        if checkpoint is not None:
            check_checkpoint_fits(ckpt, checkpoint, config.model)
        self.run_plan = plan_run(subcommand, root, name, ckpt, checkpoint, explicit_root is not None)
        config.trainer.default_root_dir = str(root)
        super()._parse_ckpt_path()

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        config.trainer.precision = device_precision(config.trainer.precision, config.trainer.accelerator)

    def instantiate_trainer(self, **kwargs: Any) -> Any:
        trainer_config = self._get(self.config_init, "trainer", default={})
        if self.run_plan is not None and trainer_config.get("logger") in (None, True):
            kwargs["logger"] = self.run_plan.loggers(tensorboard=self.subcommand == "fit")
            os.environ[RUN_ENV] = self.run_plan.to_env()
        plugins = trainer_config.get("plugins") or []
        plugins = list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
        if not any(isinstance(p, CheckpointIO) for p in plugins):
            kwargs["plugins"] = [*plugins, AtomicCheckpointIO()]
        return super().instantiate_trainer(**kwargs)

    def _attach_lung_masks(self, stage: str) -> None:
        """``data.lung_segmenter`` set: predict (once, cached) the lung masks the DataModule will read."""
        datamodule = self.datamodule
        ckpt = datamodule.hparams.get("lung_segmenter") if datamodule is not None else None
        if ckpt:
            from covid_lightning.lungs import attach_lung_masks

            folder = attach_lung_masks(datamodule, ckpt, stage=stage)
            log.info("Lung masks of %s: %s", ckpt, folder)

    def before_fit(self) -> None:
        self._attach_lung_masks("fit")

    def before_validate(self) -> None:
        self._attach_lung_masks("validate")

    def before_test(self) -> None:
        self._attach_lung_masks("test")

    def before_predict(self) -> None:
        self._attach_lung_masks("predict")

    # what each command tells the user at the end ---------------------------------------------------
    def after_fit(self) -> None:
        self._say(fit_summary(self.trainer, time.monotonic() - self._started))

    def after_validate(self) -> None:
        self._say(evaluation_summary(self.trainer, "validate", time.monotonic() - self._started))

    def after_test(self) -> None:
        self._say(evaluation_summary(self.trainer, "test", time.monotonic() - self._started))

    def after_predict(self) -> None:
        self._say(prediction_summary(self.trainer, time.monotonic() - self._started))

    def _say(self, text: str) -> None:
        if self.trainer.is_global_zero and text:
            print(text, flush=True)


def default_run_name(config: Any) -> str:
    """The first ``--config`` file's stem, else the model class' name in lower case."""
    files = config.get("config") or []
    if files:
        first = files[0]
        return Path(str(getattr(first, "relative", first))).stem
    model = config.get("model") or {}
    class_path = model.get("class_path") if hasattr(model, "get") else None
    return (class_path or "run").rsplit(".", 1)[-1].lower()


def resolve_checkpoint(ckpt: Any, root: Path, name: str, subcommand: str) -> Path | None:
    """``last``/``best`` -> that file of the newest run of ``name``; a path -> itself (it must exist)."""
    if ckpt is None:
        return None
    if str(ckpt) in ("last", "best"):
        run = latest_run(root, name)
        if run is None:
            if subcommand == "fit" and str(ckpt) == "last":
                log.warning("No earlier run of %r under %s to resume: starting a new run.", name, root)
                return None
            raise UserError(f"--ckpt_path {ckpt}: no run of {name!r} under {root} has a {LAST}.")
        last = run / CHECKPOINTS / LAST
        return last if str(ckpt) == "last" else best_checkpoint_of(last)
    path = Path(str(ckpt)).expanduser()
    if not path.is_file():
        raise UserError(f"--ckpt_path {path}: no such checkpoint file.")
    return path


def best_checkpoint_of(last: Path) -> Path:
    """The best checkpoint ``last.ckpt``'s :class:`RunCheckpoint` state points to."""
    state = load_checkpoint_file(last).get("callbacks", {})
    for key, value in state.items():
        best = value.get("best_model_path") if isinstance(value, dict) else None
        if "Checkpoint" in str(key) and best and Path(best).is_file():
            return Path(best)
    raise UserError(f"{last} names no best checkpoint that still exists; give its path to --ckpt_path.")


def check_checkpoint_fits(ckpt: Path, checkpoint: dict[str, Any], model_config: Any) -> None:
    """Refuse, before anything runs, a checkpoint (``ckpt``, loaded as ``checkpoint``) that is not this package's,
    or not the config's kind or shape."""
    hparams = checkpoint.get("hyper_parameters") or {}
    stored = checkpoint.get(MODEL_CLASS_KEY) or hparams.get("_class_path")
    if not stored:
        raise UserError(f"{ckpt} was not written by covid-lightning (it names no model class).")
    stored_cls = model_class(stored)
    if stored_cls is None:
        raise UserError(f"{ckpt} names the model class {stored}, which is not a covid-lightning model; not loading it.")
    wanted = model_config.get("class_path") if model_config is not None else None
    wanted_cls = model_class(wanted) if wanted else None
    if wanted_cls is not None and wanted_cls is not stored_cls:
        raise UserError(
            f"{ckpt} holds a {stored_cls.__name__} ({getattr(stored_cls, 'task', '?')}) checkpoint, but the config "
            f"builds a {wanted_cls.__name__} ({getattr(wanted_cls, 'task', '?')}). Use a "
            f"{getattr(stored_cls, 'task', stored_cls.__name__)} config with this checkpoint, or a matching checkpoint."
        )
    init_args = (model_config.get("init_args") if model_config is not None else None) or {}
    differ = {
        key: (init_args.get(key), hparams.get(key))
        for key in stored_cls._compat_keys
        if key in init_args and key in hparams and init_args.get(key) not in (None, "auto")
        and _plain(init_args.get(key)) != _plain(hparams.get(key))
    }
    if differ:
        sides = "; ".join(f"{k}: config {c!r}, checkpoint {h!r}" for k, (c, h) in differ.items())
        raise UserError(f"{ckpt} does not fit the config ({sides}). Use the config the checkpoint was trained with.")


def _plain(value: Any) -> Any:
    """Config values (Namespaces, tuples) and checkpoint values (lists, dicts) compared as plain data."""
    if hasattr(value, "as_dict"):
        value = value.as_dict()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def plan_run(
    subcommand: str,
    root: Path,
    name: str,
    ckpt: Path | None,
    checkpoint: dict[str, Any] | None,
    explicit_root: bool,
) -> RunPlan:
    """Where ``subcommand`` writes (see :mod:`covid_lightning.runs`); ``checkpoint`` is ``ckpt`` loaded."""
    inherited = RunPlan.from_env()
    if inherited is not None:
        return inherited
    run = run_of_checkpoint(ckpt) if ckpt is not None else None
    if subcommand == "fit":
        if run is not None:  # resume: the same folder, the same version, the same streams
            step = int((checkpoint or {}).get("global_step", 0))
            return RunPlan(run.parent.parent, run.parent.name, int(run.name.split("_")[-1]), resume_step=step)
        return RunPlan(root, name, next_version(root / name))
    base = run if run is not None and not explicit_root else root / name
    return RunPlan(base, subcommand, next_version(base / subcommand))


def fit_summary(trainer: Any, seconds: float) -> str:
    lines = [f"Run folder: {trainer.log_dir}"]
    ckpt = trainer.checkpoint_callback
    if ckpt is not None and getattr(ckpt, "best_model_path", ""):
        score = ckpt.best_model_score
        value = f"{float(score):.4f}" if score is not None else "?"
        lines.append(f"  best {ckpt.monitor} {value}: {ckpt.best_model_path}")
    if ckpt is not None and getattr(ckpt, "last_model_path", ""):
        lines.append(f"  last checkpoint: {ckpt.last_model_path}")
    lines.append(f"  {trainer.current_epoch} epochs done, wall time {seconds:.1f} s")
    return "\n".join(lines)


def _headline(trainer: Any, prefix: str) -> str:
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(prefix) and v.numel() == 1}
    order = sorted(metrics, key=lambda k: (k.count("/") > 1 or "_" in k.split("/")[-1], k))
    return ", ".join(f"{k} {metrics[k]:.4f}" for k in order[:6])


def evaluation_summary(trainer: Any, stage: str, seconds: float) -> str:
    prefix = "val/" if stage == "validate" else "test/"
    return f"{stage}: {_headline(trainer, prefix)}\n  results in {trainer.log_dir} ({seconds:.1f} s)"


def prediction_summary(trainer: Any, seconds: float) -> str:
    writers = [c for c in trainer.callbacks if isinstance(c, PredictionWriter)]
    paths = [str(w.csv_path) for w in writers if getattr(w, "csv_path", None)]
    where = ", ".join(paths) if paths else str(trainer.log_dir)
    return f"predict: written to {where} ({seconds:.1f} s)"


#: Subcommands that do not run a Trainer: name -> "module:function" taking argv and returning an exit code.
EXTRA_COMMANDS: dict[str, str] = {
    "check-data": "covid_lightning.data.hygiene:main",
    "download": "covid_lightning.download:main",
    "export": "covid_lightning.export:main",
    "lungmasks": "covid_lightning.lungs:main",
    "optimize": "covid_lightning.data.streaming:main",
    "serve": "covid_lightning.serve:main",
}


def run_extra_command(name: str, argv: Sequence[str]) -> int:
    module, _, function = EXTRA_COMMANDS[name].partition(":")
    return int(getattr(importlib.import_module(module), function)(list(argv)) or 0)


def build_cli(args: Sequence[str] | None = None, run: bool = True) -> CovidLightningCLI:
    """Build (and by default run) the LightningCLI; ``args`` defaults to ``sys.argv[1:]``."""
    return CovidLightningCLI(
        XRayModule,
        XRayDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        auto_configure_optimizers=False,
        save_config_kwargs={"overwrite": True},
        args=list(args) if args is not None else None,
        run=run,
    )


#: third-party lines that say nothing about this run (matched at the start of the message)
NOISE = ("💡 Tip:", "GPU available: False", "TPU available: False", "HPU available: False")
DEBUG_ENV = "COVID_LIGHTNING_DEBUG"


class _CurrentStderr(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at each record (in-process runs under capture, then without)."""

    @property
    def stream(self) -> Any:  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith(NOISE)


def setup_console() -> None:
    """Our INFO lines (where files went, what was skipped) on stderr; known third-party noise filtered."""
    package = logging.getLogger("covid_lightning")
    if not package.handlers:
        handler = _CurrentStderr()
        handler.setFormatter(logging.Formatter("%(message)s"))
        package.addHandler(handler)
        package.setLevel(logging.INFO)
        package.propagate = False
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).addFilter(_DropNoise())
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
    warnings.filterwarnings("ignore", message=r"The dirpath has changed from")  # evaluating a run's checkpoint


def user_error(err: BaseException) -> BaseException | None:
    """The mistake a user can fix behind ``err``, if any: our :class:`UserError`, a missing file, or a
    ``ValueError``/``TypeError`` raised by this package's own checks; followed through the exceptions that
    wrap it (jsonargparse reports a failed ``__init__`` inside its own error)."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, (UserError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)):
            return err
        if isinstance(err, (ValueError, TypeError)):
            frames = traceback.extract_tb(err.__traceback__)
            if frames and f"{os.sep}covid_lightning{os.sep}" in frames[-1].filename:
                return err
        err = err.__cause__ or err.__context__
    return None


def release_process_group() -> None:
    """Destroy a multi-process run's process group before the interpreter exits: left to interpreter
    teardown, gloo's threads can abort the process (``terminate called without an active exception``)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console scripts: a user error is one paragraph and exit code 2, no traceback."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    args = [a for a in args if a != "--debug"]
    tune_cpu_allocator()
    setup_console()
    try:
        if args and args[0] in EXTRA_COMMANDS:
            return run_extra_command(args[0], args[1:])
        if args and args[0] in ("-h", "--help"):
            extra = ", ".join(EXTRA_COMMANDS)
            print(f"Extra commands (each with its own --help): {extra}. Trainer commands follow.\n", flush=True)
        if argv is None:
            sys.argv[1:] = args  # LightningCLI reads sys.argv itself (without --debug)
        build_cli(args if argv is not None else None)
        release_process_group()
    except Exception as err:  # noqa: BLE001 - sorted into user errors and bugs right here
        mistake = user_error(err)
        if debug or mistake is None:
            raise
        print(f"error: {mistake}\n(for the full traceback: --debug or {DEBUG_ENV}=1)", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
