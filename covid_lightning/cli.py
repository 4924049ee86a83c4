"""The command line: ``lightning`` / ``covid-lightning`` / ``python -m covid_lightning``.

``fit``, ``validate``, ``test`` and ``predict`` are LightningCLI's (one YAML per experiment);
extra subcommands that do not run a Trainer are dispatched before LightningCLI parses anything.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import torch  # noqa: E402
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI  # noqa: E402
from lightning.pytorch.loggers import Logger  # noqa: E402

from covid_lightning.data.datamodules import XRayDataModule  # noqa: E402
from covid_lightning.modules.base import XRayModule  # noqa: E402
from covid_lightning.runtime import tune_cpu_allocator  # noqa: E402

log = logging.getLogger(__name__)


class CovidLightningCLI(LightningCLI):
    """LightningCLI over any :class:`XRayModule` and :class:`XRayDataModule` (``class_path`` in the YAML).

    ``data.image_size`` is linked to ``model.image_size``: the data decides the size, the model stores
    it in the checkpoint so inference resizes the same way.
    """

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.init_args.image_size", "model.init_args.image_size")

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        config.trainer.precision = device_precision(config.trainer.precision, config.trainer.accelerator)

    def after_instantiate_classes(self) -> None:
        share_logger_version(self.trainer.loggers)

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


def cpu_has_fast_bf16() -> bool:
    """Whether oneDNN has native bfloat16 kernels on this CPU (AVX512-BF16/AMX); without them a bf16
    convolution is ~30-50x slower than float32 (measured on an AVX2-only CPU)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def device_precision(precision: Any, accelerator: Any) -> Any:
    """Mixed precision suited to the device that will train.

    ``16-mixed`` (float16 AMP) is a GPU feature: on the CPU it becomes ``bf16-mixed`` where the CPU has
    native bfloat16 kernels, else ``32-true``. An explicit ``bf16-mixed`` on a CPU without them is kept,
    with a warning. One config then serves every machine.
    """
    on_cpu = accelerator == "cpu" or (accelerator in (None, "auto") and not torch.cuda.is_available())
    if not on_cpu:
        return precision
    fast_bf16 = cpu_has_fast_bf16()
    if str(precision) in ("16-mixed", "16"):
        new = "bf16-mixed" if fast_bf16 else "32-true"
        log.warning("precision %s needs a GPU; training on the CPU with %s instead.", precision, new)
        return new
    if str(precision) in ("bf16-mixed", "bf16") and not fast_bf16:
        log.warning("This CPU has no native bfloat16 kernels: %s will be much slower than 32-true.", precision)
    return precision


def share_logger_version(loggers: Sequence[Logger]) -> None:
    """Give loggers writing under the same ``save_dir/name`` the first one's version.

    Each logger otherwise picks "the next free version" on its own and a CSV + TensorBoard pair ends
    up in ``version_0`` and ``version_1``; one run should be one folder.
    """
    if len(loggers) < 2:
        return
    first = loggers[0]
    for other in loggers[1:]:
        same_place = (other.save_dir, other.name) == (first.save_dir, first.name)
        if same_place and getattr(other, "_version", 0) is None:
            other._version = first.version


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


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console scripts."""
    args = list(sys.argv[1:] if argv is None else argv)
    tune_cpu_allocator()
    if args and args[0] in EXTRA_COMMANDS:
        return run_extra_command(args[0], args[1:])
    if args and args[0] in ("-h", "--help"):
        extra = ", ".join(EXTRA_COMMANDS)
        print(f"Extra commands (each with its own --help): {extra}. Trainer commands follow.\n", flush=True)
    build_cli(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
