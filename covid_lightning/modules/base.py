"""What both LightningModules share: injectable optimisation, per-stage metrics, checkpoint hygiene."""

from __future__ import annotations

import copy
import importlib
import logging
import time
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torchmetrics import MetricCollection
from typing_extensions import Self

from covid_lightning.data.roi import UNKNOWN_REGION, WHOLE_FILM, cut_to_lungs
from covid_lightning.errors import UserError

log = logging.getLogger(__name__)

MEMORY_FORMATS = {"channels_last": torch.channels_last, "contiguous": torch.contiguous_format}
#: checkpoint key naming the model class that wrote it (``covid_lightning.inference.load_checkpoint``)
MODEL_CLASS_KEY = "covid_lightning_model"

#: checkpoint key of the lung region a model was trained on (:attr:`XRayDataModule.lung_region`)
LUNG_REGION_KEY = "covid_lightning_lung_region"

#: Hyper-parameters that only matter when a model is first built (weights come from the checkpoint after).
_BUILD_ONLY = {"pretrained": False, "pretrained_file": None, "encoder_weights": None, "encoder_weights_file": None}


class InputMismatchError(UserError, ValueError):
    """The data is prepared differently (size, intensity) from what the model was built to take."""


def as_xray_module(model: Any, action: str = "use") -> XRayModule:
    """``model`` itself when it is a covid-lightning model, else a TypeError naming what ``action`` needed."""
    if not isinstance(model, XRayModule) or model.task not in XRayModule.KINDS:
        raise TypeError(f"Cannot {action} a {type(model).__name__}: expected an XRayClassifier or a LungSegmenter.")
    return model


def model_class(class_path: str | None) -> type[XRayModule] | None:
    """The :class:`XRayModule` subclass ``class_path`` names, imported only from this package; None otherwise."""
    module_name, _, name = str(class_path or "").rpartition(".")
    if module_name.split(".")[0] != "covid_lightning":
        return None
    try:
        cls = getattr(importlib.import_module(module_name), name, None)
    except ImportError:
        return None
    return cls if isinstance(cls, type) and issubclass(cls, XRayModule) else None


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def default_optimizer(params: Any) -> torch.optim.Optimizer:
    """Adam with lr 1e-3, the Keras default the lab used; ``fused``: much faster than the per-tensor loop on CPU."""
    return torch.optim.Adam(params, lr=1e-3, fused=True)


class XRayModule(L.LightningModule):
    """Base of :class:`~covid_lightning.XRayClassifier` and :class:`~covid_lightning.LungSegmenter`.

    Subclasses build ``self.net``, call :meth:`_init_metrics` and implement ``shared_step``.
    """

    #: what the model does: "classification" or "segmentation" (the one answer to "which kind is this?")
    task: str = ""
    #: the public name of each task (export contract, server answers)
    KINDS = {"classification": "classifier", "segmentation": "segmenter"}
    #: hyper-parameters that decide the network's shape (named in checkpoint mismatch errors)
    _compat_keys: tuple[str, ...] = ()
    #: metric that ModelCheckpoint/EarlyStopping watch by default
    monitor: str = "val/loss"
    monitor_mode: str = "min"

    def __init__(
        self,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        scheduler_interval: str = "epoch",
        memory_format: str = "channels_last",
        compile_model: bool = False,
    ) -> None:
        super().__init__()
        self.optimizer_factory = optimizer or default_optimizer
        self.scheduler_factory = lr_scheduler
        if scheduler_interval not in ("epoch", "step"):
            raise ValueError(f"scheduler_interval must be 'epoch' or 'step', not {scheduler_interval!r}.")
        self.scheduler_interval = scheduler_interval
        if memory_format not in (*MEMORY_FORMATS, "auto"):
            choices = ", ".join([*MEMORY_FORMATS, "auto"])
            raise ValueError(f"memory_format must be one of {choices}, not {memory_format!r}.")
        self.auto_memory_format = memory_format == "auto"
        self.memory_format = MEMORY_FORMATS["channels_last" if self.auto_memory_format else memory_format]
        self.compile_model = compile_model
        #: the lung region the model was trained on (whole films unless the data cut them): set at fit from the
        #: DataModule, checkpointed, checked at test/predict, reported by :meth:`describe`
        self.lung_region: dict[str, Any] = dict(WHOLE_FILM)

    def setup(self, stage: str) -> None:
        """Refuse a DataModule that prepares images differently from what this model takes: the checkpoint
        records the model's size and intensity step, and inference, serving and export follow it (the CLI
        links them; a Python user wiring both by hand may not)."""
        dm = self.trainer.datamodule if self._trainer is not None else None
        data, model = getattr(dm, "hparams", {}), self.hparams
        for key in ("image_size", "intensity"):
            if key in data and key in model and data[key] != model[key]:
                raise InputMismatchError(
                    f"The data's {key} ({data[key]}) is not the model's ({model[key]}): build the model with "
                    f"{key}={data[key]!r} (the CLI links data.{key} to the model), or the data with {model[key]!r}."
                )
        if stage == "fit" and hasattr(dm, "lung_region"):
            self.lung_region = dict(dm.lung_region)

    def _check_lung_region(self) -> None:
        """Refuse data cut to another lung region than the model was trained on (runs after a checkpoint loads)."""
        dm = self.trainer.datamodule if self._trainer is not None else None
        region = getattr(dm, "lung_region", None)
        if region is not None and self.lung_region != UNKNOWN_REGION and region != self.lung_region:
            raise InputMismatchError(
                f"This model was trained on {_region_text(self.lung_region)}; the data gives it "
                f"{_region_text(region)}. Set data.lung_segmenter (or data.lung_masks), data.lung_roi and "
                "data.lung_margin as in training: the run's config.yaml holds them."
            )

    def on_validation_start(self) -> None:
        self._check_lung_region()

    def on_test_start(self) -> None:
        self._check_lung_region()

    def on_predict_start(self) -> None:
        self._check_lung_region()

    @property
    def kind(self) -> str:
        """``classifier`` or ``segmenter``: the model's task as the export contract and the server name it."""
        return self.KINDS[self.task]

    def describe(self) -> dict[str, Any]:
        """Kind, input size and what outputs mean (class names or mask threshold): for /info, contracts, reports."""
        info = {"kind": self.kind, "task": self.task, "image_size": int(self.hparams.get("image_size", 0))}
        return info | {"intensity": str(self.hparams.get("intensity", "none"))} | self.lung_region

    @property
    def preprocess(self) -> dict[str, Any]:
        """What inference must feed the network (from :meth:`describe`, plus the normalisation inside it):
        stored in the checkpoint, the input part of the export contract."""
        info = self.describe()
        keys = ("image_size", "intensity", "lung_roi", "lung_margin")
        return {k: info[k] for k in keys if k in info} | {"mean": self.net.mean, "std": self.net.std}

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Network output -> probabilities (softmax over classes, or per-pixel sigmoid)."""
        raise NotImplementedError

    def postprocess(self, probs: torch.Tensor, sizes: Sequence[tuple[int, int]] | None = None) -> list[Any]:
        """Probabilities of a batch -> what a user gets for each image, at the image's own ``sizes`` (H, W)."""
        raise NotImplementedError

    def _finish_net(self) -> None:
        """Lay the network out in the chosen memory format (subclasses call it once ``self.net`` exists)."""
        self.net.to(memory_format=self.memory_format)

    def to_input(self, images: torch.Tensor) -> torch.Tensor:
        """Images in the network's memory format (channels_last: NHWC strides, what fast convolutions prefer)."""
        return images.contiguous(memory_format=self.memory_format) if images.dim() == 4 else images

    def on_fit_start(self) -> None:
        if self.auto_memory_format:
            self.pick_memory_format()

    def pick_memory_format(self, steps: int = 2) -> dict[str, float]:
        """Time ``steps`` training steps of each layout and keep the faster; returns ms per step by layout."""
        timings = {name: self.time_layout(layout, steps) for name, layout in MEMORY_FORMATS.items()}
        best = min(timings, key=timings.__getitem__)
        self.memory_format = MEMORY_FORMATS[best]
        self.net.to(memory_format=self.memory_format)
        log.info(
            "memory_format auto: %s (ms per step: %s).", best, ", ".join(f"{k} {v:.0f}" for k, v in timings.items())
        )
        return timings

    def time_layout(self, layout: torch.memory_format, steps: int = 2) -> float:
        """Best ms of ``steps`` forward + backward passes of a copy of the network in ``layout`` (weights untouched)."""
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        batch = int(getattr(getattr(datamodule, "hparams", None), "batch_size", 8) or 8)
        size = int(self.hparams.get("image_size", 128))
        x = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, device=self.device)
        x = x.contiguous(memory_format=layout)
        context = self.trainer.precision_plugin.forward_context if self._trainer is not None else nullcontext
        net = copy.deepcopy(self.net).to(memory_format=layout)  # same train/eval modes as the run
        times = []
        for step in range(steps + 1):
            _synchronize(self.device)
            started = time.perf_counter()
            with context():  # a fresh context each step (generator-based ones are single-use)
                out = net(x)
                loss = (out if isinstance(out, torch.Tensor) else out[0]).float().mean()
            if loss.requires_grad:
                loss.backward()
            _synchronize(self.device)
            if step:  # the first is a warm-up (kernel selection, allocations)
                times.append((time.perf_counter() - started) * 1000)
        return min(times)

    def configure_model(self) -> None:
        """``compile_model: true`` compiles the network in place (state-dict keys unchanged)."""
        if self.compile_model and not getattr(self.net, "_compiled_call_impl", None):
            self.net.compile()

    def _init_metrics(self, metrics: MetricCollection) -> None:
        """One clone of ``metrics`` per stage, prefixed ``train/``, ``val/``, ``test/``."""
        self.train_metrics = metrics.clone(prefix="train/")
        self.val_metrics = metrics.clone(prefix="val/")
        self.test_metrics = metrics.clone(prefix="test/")

    def stage_metrics(self, stage: str) -> MetricCollection:
        return getattr(self, f"{stage}_metrics")

    def _log_epoch_metrics(self, stage: str) -> None:
        metrics = self.stage_metrics(stage)
        values = metrics.compute()
        # torchmetrics already synchronised the states across ranks: the values agree everywhere.
        self.log_dict({k: v.float() for k, v in values.items()}, sync_dist=False)
        metrics.reset()

    def on_train_epoch_end(self) -> None:
        self._log_epoch_metrics("train")

    def on_validation_epoch_end(self) -> None:
        self._log_epoch_metrics("val")

    def on_test_epoch_end(self) -> None:
        self._log_epoch_metrics("test")

    def shared_step(self, batch: dict[str, Any], stage: str) -> dict[str, torch.Tensor]:
        """Loss, metric updates and logging for one batch; returns ``{"loss", "probs", "target"}`` for callbacks."""
        raise NotImplementedError

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, torch.Tensor]:
        return self.shared_step(batch, "train")

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, torch.Tensor]:
        return self.shared_step(batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, torch.Tensor]:
        return self.shared_step(batch, "test")

    def _check_finite(self, loss: torch.Tensor, stage: str) -> None:
        """Stop at the first non-finite loss, naming the step, instead of training on NaNs."""
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"Non-finite {stage} loss ({loss.item()}) at epoch {self.current_epoch}, global step "
                f"{self.global_step}. Lower the learning rate, check the inputs, or train in 32-true precision."
            )

    def _log_loss(self, stage: str, loss: torch.Tensor, batch_size: int) -> None:
        # add_dataloader_idx=False: one name, also beside external test sets
        self.log(
            f"{stage}/loss", loss, on_step=stage == "train", on_epoch=True, prog_bar=True, batch_size=batch_size,
            sync_dist=stage != "train", add_dataloader_idx=False,
        )  # fmt: skip

    def param_groups(self) -> list[dict[str, Any]]:
        """Parameter groups for the optimizer; a group's ``lr_factor`` scales the optimizer's lr for it."""
        return [{"params": [p for p in self.parameters() if p.requires_grad]}]

    def configure_optimizers(self) -> Any:
        groups = self.param_groups()
        factors = [g.pop("lr_factor", 1.0) for g in groups]
        optimizer = self.optimizer_factory(groups)
        for group, factor in zip(optimizer.param_groups, factors):
            group["lr"] *= factor
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        config = {"scheduler": scheduler, "interval": self.scheduler_interval}
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            config["monitor"] = self.monitor
        return {"optimizer": optimizer, "lr_scheduler": config}

    @classmethod
    def load_from_checkpoint(
        cls, checkpoint_path: str | Path, map_location: Any = None, hparams_file: str | Path | None = None,
        strict: bool | None = None, weights_only: bool | None = True, **kwargs: Any,
    ) -> Self:  # fmt: skip
        """Lightning's ``load_from_checkpoint`` with weights-only unpickling by default and errors naming both sides."""
        checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=weights_only is not False)
        stored = checkpoint.get(MODEL_CLASS_KEY) or checkpoint.get("hyper_parameters", {}).get("_class_path")
        wanted = f"{cls.__module__}.{cls.__qualname__}"
        if stored and stored.rsplit(".", 1)[-1] != cls.__qualname__:
            raise TypeError(
                f"{checkpoint_path} holds a {stored.rsplit('.', 1)[-1]} checkpoint; it cannot be loaded as "
                f"{cls.__qualname__}. Use {stored.rsplit('.', 1)[-1]}.load_from_checkpoint(...) or "
                "covid_lightning.inference.load_checkpoint(...)."
            )
        try:
            return super().load_from_checkpoint(
                checkpoint_path, map_location, hparams_file, strict, weights_only=weights_only, **kwargs
            )
        except RuntimeError as err:
            if "size mismatch" not in str(err) and "Missing key" not in str(err) and "Unexpected key" not in str(err):
                raise
            saved = {k: checkpoint.get("hyper_parameters", {}).get(k) for k in cls._compat_keys}
            asked = {k: v for k, v in kwargs.items() if k in cls._compat_keys}
            raise ValueError(
                f"{checkpoint_path} does not fit {wanted}: the checkpoint has {saved}, the model was asked "
                f"for {asked or 'the same'}. Load it without overriding these hyper-parameters."
            ) from err

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Record the model class; reloading must not fetch pretrained weights again (they are in here)."""
        checkpoint[MODEL_CLASS_KEY] = f"{type(self).__module__}.{type(self).__qualname__}"
        checkpoint[LUNG_REGION_KEY] = dict(self.lung_region)
        checkpoint["preprocess"] = self.preprocess
        hparams = checkpoint.get("hyper_parameters")
        if hparams is not None:
            # LightningCLI (subclass mode) reads it back for `--ckpt_path`, also for checkpoints made in Python
            hparams.setdefault("_class_path", checkpoint[MODEL_CLASS_KEY])
            for key, value in _BUILD_ONLY.items():
                if key in hparams:
                    hparams[key] = value

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # checkpoints written before the region was recorded: unknown, not checked (they behave as they did)
        self.lung_region = dict(checkpoint.get(LUNG_REGION_KEY, UNKNOWN_REGION))


def _region_text(region: dict[str, Any]) -> str:
    if not cut_to_lungs(region):
        return "whole films"
    return f"lung regions (lung_roi {region['lung_roi']}, lung_margin {region.get('lung_margin')})"
