"""Compute the frozen part of the classifier once per image and train only the trainable suffix."""

from __future__ import annotations

import logging
import time
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import BaseFinetuning
from torch.utils.data import DataLoader, IterableDataset

from covid_lightning.data.datasets import FeatureDataset

log = logging.getLogger(__name__)


class FrozenFeatureCache(L.Callback):
    """At fit start, run the frozen prefix of the network once over the train and val images and train every epoch
    on these cached activations; off, with a log line, where that cannot be exact (augmentation, unfreezing).

    Args:
        dtype: storage type of the activations (``float16`` halves the memory; ``float32`` is bit-exact).
        batch_size: batch size of the one pass over the images.
    """

    def __init__(self, dtype: Literal["float32", "float16", "bfloat16"] = "float32", batch_size: int = 64) -> None:
        self.dtype = getattr(torch, dtype)
        self.batch_size = batch_size
        self.seconds: float | None = None
        self._images: dict[str, Any] = {}

    def _reason_off(self, trainer: L.Trainer, pl_module: L.LightningModule) -> str | None:
        net, dm = getattr(pl_module, "net", None), trainer.datamodule
        if not hasattr(net, "can_split") or not hasattr(dm, "datasets"):
            return "needs an XRayClassifier trained with a covid-lightning DataModule"
        if any(isinstance(cb, BaseFinetuning) for cb in trainer.callbacks):
            return "staged unfreezing changes which layers are frozen during the run"
        if net.trainable == "all" or not net.can_split():
            return f"regime {net.trainable!r} on {type(net.backbone).__name__} has no frozen prefix to cache"
        if dm.hparams.augment != "none":
            return f"train-time augmentation ({dm.hparams.augment!r}) makes the frozen prefix's output vary"
        return None

    @torch.no_grad()
    def _features(self, pl_module: Any, dataset: Any, workers: int) -> FeatureDataset:
        if isinstance(dataset, IterableDataset):  # a stream: every item on every rank, then sharded once as files
            dataset, workers = dataset.whole_split(), 0
        net, chunks, labels, paths = pl_module.net, [], [], []
        was_training = net.training
        net.eval()
        for batch in DataLoader(dataset, batch_size=self.batch_size, num_workers=workers):
            images = pl_module.to_input(batch["image"].to(pl_module.device))
            chunks.append(net.forward_prefix(images).to(self.dtype).cpu())
            labels += batch["label"].tolist()
            paths += list(batch["path"])
        net.train(was_training)
        return FeatureDataset(torch.cat(chunks), labels, paths)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        reason = self._reason_off(trainer, pl_module)
        if reason is not None:
            log.info("FrozenFeatureCache is off: %s.", reason)
            return
        dm, started = trainer.datamodule, time.perf_counter()
        workers = dm.hparams.num_workers or 0
        self._images = {s: dm.datasets[s] for s in ("train", "val") if len(dm.datasets.get(s, ()))}
        dm.datasets.update({s: self._features(pl_module, d, workers) for s, d in self._images.items()})
        self.seconds = time.perf_counter() - started
        train = dm.datasets["train"]
        log.info(
            "FrozenFeatureCache: %s prefix of %d train + %d val images computed once in %.1f s (%s per image, %s).",
            pl_module.net.trainable, len(train), len(dm.datasets.get("val", ())), self.seconds,
            "x".join(map(str, train.features.shape[1:])), str(self.dtype).replace("torch.", ""),
        )  # fmt: skip

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        trainer.datamodule.datasets.update(self._images)
        self._images = {}
