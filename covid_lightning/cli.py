"""The command line: LightningCLI's ``fit``/``validate``/``test``/``predict`` plus the extra commands."""

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

import torch
from jsonargparse import auto_cli
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.plugins.io import CheckpointIO

from covid_lightning.callbacks import EvaluationReport, PredictionWriter, RunCheckpoint
from covid_lightning.checkpointing import AtomicCheckpointIO, load_checkpoint_file
from covid_lightning.data.datamodules import XRayDataModule
from covid_lightning.errors import UserError
from covid_lightning.modules.base import MODEL_CLASS_KEY, XRayModule, model_class
from covid_lightning.runs import DEFAULT_ROOT, RUN_ENV, RunPlan, default_run_name, plan_run, resolve_checkpoint
from covid_lightning.runtime import device_precision, tune_cpu_allocator

log = logging.getLogger(__name__)


class CovidLightningCLI(LightningCLI):
    """LightningCLI over any :class:`XRayModule` and :class:`XRayDataModule`, defaulting what every run shares."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._started = time.monotonic()
        self.run_plan: RunPlan | None = None
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.init_args.image_size", "model.init_args.image_size")
        parser.link_arguments("data.init_args.intensity", "model.init_args.intensity")
        # the classifier's head sizes itself from the data's classes (a manifest's labels, or the Kaggle four)
        for target, compute in (("class_names", list), ("num_classes", len)):
            parser.link_arguments("data.class_names", f"model.init_args.{target}", compute, apply_on="instantiate")
        # and its loss weights from the data's (``--data.balance loss``: from the train split)
        parser.link_arguments("data.class_weights", "model.init_args.class_weights", apply_on="instantiate")
        parser.link_arguments("data.class_prior", "model.init_args.class_prior", apply_on="instantiate")
        parser.add_argument(
            "--name", type=str | None, default=None, help="Run name: the run lives in <default_root_dir>/<name>/."
        )
        parser.add_lightning_class_args(RunCheckpoint, "checkpoint")
        parser.add_lightning_class_args(LearningRateMonitor, "lr_monitor")
        parser.add_lightning_class_args(EvaluationReport, "report")
        parser.add_lightning_class_args(PredictionWriter, "predictions")

    def _parse_ckpt_path(self) -> None:
        """Resolve ``--ckpt_path``, refuse a checkpoint that does not fit the config, plan the run folder."""
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

    def _run_subcommand(self, subcommand: str) -> None:
        """Lung masks first where ``data.lung_segmenter`` asks for them (predicted once, cached); a summary after."""
        ckpt = self.datamodule.hparams.get("lung_segmenter") if self.datamodule is not None else None
        if ckpt:
            from covid_lightning.lungs import attach_lung_masks

            log.info("Lung masks of %s: %s", ckpt, attach_lung_masks(self.datamodule, ckpt, stage=subcommand))
        super()._run_subcommand(subcommand)
        log_dir = self.trainer.log_dir  # a collective in multi-process runs: every rank asks
        if self.trainer.is_global_zero:
            print(summary(self.trainer, subcommand, time.monotonic() - self._started, log_dir), flush=True)


def check_checkpoint_fits(ckpt: Path, checkpoint: dict[str, Any], model_config: Any) -> None:
    """Refuse, before anything runs, a checkpoint that is not this package's, or not the config's kind or shape."""
    hparams = checkpoint.get("hyper_parameters") or {}
    stored = checkpoint.get(MODEL_CLASS_KEY) or hparams.get("_class_path")
    if not stored:
        raise UserError(f"{ckpt} was not written by covid-lightning (it names no model class).")
    stored_cls = model_class(stored)
    if stored_cls is None:
        raise UserError(f"{ckpt} names the model class {stored}, which is not a covid-lightning model; not loading it.")
    model_config = model_config or {}
    wanted_cls = model_class(model_config.get("class_path"))
    if wanted_cls is not None and wanted_cls is not stored_cls:
        raise UserError(
            f"{ckpt} holds a {stored_cls.__name__} ({stored_cls.task}) checkpoint, but the config builds a "
            f"{wanted_cls.__name__} ({wanted_cls.task}). Use a {stored_cls.task} config with this checkpoint, "
            "or a matching checkpoint."
        )
    init_args = model_config.get("init_args") or {}
    differ = {
        key: (init_args.get(key), hparams.get(key))
        for key in stored_cls._compat_keys
        if key in init_args
        and key in hparams
        and init_args.get(key) not in (None, "auto")
        and _plain(init_args.get(key)) != _plain(hparams.get(key))
    }
    if differ:
        sides = "; ".join(f"{k}: config {c!r}, checkpoint {h!r}" for k, (c, h) in differ.items())
        raise UserError(f"{ckpt} does not fit the config ({sides}). Use the config the checkpoint was trained with.")


def _plain(value: Any) -> Any:
    """Config values (Namespaces, tuples) and checkpoint values (lists, dicts) compared as plain data."""
    value = value.as_dict() if hasattr(value, "as_dict") else value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return {k: _plain(v) for k, v in value.items()} if isinstance(value, dict) else value


def summary(trainer: Any, subcommand: str, seconds: float, log_dir: str | None) -> str:
    """What a command prints at the end: where its results are (``log_dir``: the run's), and the headline numbers."""
    if subcommand == "predict":
        paths = [str(c.csv_path) for c in trainer.callbacks if isinstance(c, PredictionWriter) and c.csv_path]
        return f"predict: written to {', '.join(paths) or log_dir} ({seconds:.1f} s)"
    if subcommand in ("validate", "test"):
        prefix = "val/" if subcommand == "validate" else "test/"
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(prefix) and v.numel() == 1}
        order = sorted(metrics, key=lambda k: (k.count("/") > 1 or "_" in k.split("/")[-1], k))[:6]
        headline = ", ".join(f"{k} {metrics[k]:.4f}" for k in order)
        return f"{subcommand}: {headline}\n  results in {log_dir} ({seconds:.1f} s)"
    lines = [f"Run folder: {log_dir}"]
    ckpt = trainer.checkpoint_callback
    if ckpt is not None and ckpt.best_model_path:
        score = "?" if ckpt.best_model_score is None else f"{float(ckpt.best_model_score):.4f}"
        lines.append(f"  best {ckpt.monitor} {score}: {ckpt.best_model_path}")
    if ckpt is not None and ckpt.last_model_path:
        lines.append(f"  last checkpoint: {ckpt.last_model_path}")
    lines.append(f"  {trainer.current_epoch} epochs done, wall time {seconds:.1f} s")
    return "\n".join(lines)


#: Subcommands that do not run a Trainer: name -> "module:function". The function's signature and docstring are the
#: command's options (jsonargparse, as for the trainer commands: ``--help``, ``--config``, ``--print_config``); a
#: parameter without a default is positional; the return value is the exit code.
EXTRA_COMMANDS: dict[str, str] = {
    "check-data": "covid_lightning.data.hygiene:check_data",
    "download": "covid_lightning.download:download",
    "export": "covid_lightning.export:export",
    "lungmasks": "covid_lightning.lungs:lungmasks",
    "optimize": "covid_lightning.data.streaming:optimize",
    "serve": "covid_lightning.serve:serve",
}


def run_extra_command(name: str, argv: Sequence[str]) -> int:
    module, _, function = EXTRA_COMMANDS[name].partition(":")
    command = getattr(importlib.import_module(module), function)
    return int(auto_cli(command, args=list(argv), prog=f"covid-lightning {name}") or 0)


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

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


def _not_noise(record: logging.LogRecord) -> bool:
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
        logging.getLogger(name).addFilter(_not_noise)
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
    warnings.filterwarnings("ignore", message=r"The dirpath has changed from")  # evaluating a run's checkpoint


def user_error(err: BaseException | None) -> BaseException | None:
    """The mistake a user can fix behind ``err`` (or an exception wrapping it), if any."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, (UserError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)):
            return err
        frames = traceback.extract_tb(err.__traceback__)
        if (
            isinstance(err, (ValueError, TypeError))
            and frames
            and f"{os.sep}covid_lightning{os.sep}" in frames[-1].filename
        ):
            return err
        err = err.__cause__ or err.__context__
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console scripts: a user error is one ``error:`` paragraph and exit code 2."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    args = [a for a in args if a != "--debug"]
    tune_cpu_allocator()
    setup_console()
    try:
        if args and args[0] in EXTRA_COMMANDS:
            return run_extra_command(args[0], args[1:])
        if args and args[0] in ("-h", "--help"):
            print(f"Extra commands (each with its own --help): {', '.join(EXTRA_COMMANDS)}. Trainer commands follow.\n")
        if argv is None:
            sys.argv[1:] = args  # LightningCLI reads sys.argv itself (without --debug)
        build_cli(args if argv is not None else None)
        # a multi-process run's group, destroyed before interpreter teardown, where gloo's threads can abort
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    except Exception as err:
        mistake = user_error(err)
        if debug or mistake is None:
            raise
        print(f"error: {mistake}\n(for the full traceback: --debug or {DEBUG_ENV}=1)", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
