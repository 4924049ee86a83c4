"""Compute the frozen part of the network once per image and train only the trainable suffix."""

from __future__ import annotations

import logging
import time
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, IterableDataset

from covid_lightning.data.datasets import FeatureDataset

log = logging.getLogger(__name__)


class FrozenFeatureCache(L.Callback):
    """In the ``head``, ``last_conv``, ``last_2_conv`` and ``last_4_blocks`` regimes most of the backbone
    is frozen (BN in inference mode) and, without train-time augmentation, gives the same output for an image every
    epoch. This callback runs that frozen prefix once over the train and val images at the start of
    ``fit`` (in eval mode: frozen BN statistics untouched) and hands the DataModule datasets of cached
    activations (``head``: the 1280-d pooled features; otherwise the input of the first trainable layer),
    so every epoch trains only the trainable suffix and never decodes an image. The image datasets are
    put back at the end of ``fit``.

    It switches itself off, with a log line, when it cannot be exact: train-time augmentation, a regime
    with a trainable backbone (``all``, staged unfreezing), or a backbone without a known split.

    Args:
        dtype: storage type of the cached activations (``float16`` halves the memory of the
            7x7 maps of ``last_conv``/``last_2_conv``; ``float32`` keeps the path bit-exact).
        batch_size: batch size of the one pass over the images.
    """

    def __init__(self, dtype: str = "float32", batch_size: int = 64) -> None:
        if dtype not in ("float32", "float16", "bfloat16"):
            raise ValueError(f"dtype must be float32, float16 or bfloat16, not {dtype!r}.")
        self.dtype = getattr(torch, dtype)
        self.batch_size = batch_size
        self.active = False
        self._originals: dict[str, Any] = {}
        self.seconds: float | None = None

    def _reason_off(self, trainer: L.Trainer, pl_module: L.LightningModule) -> str | None:
        net = getattr(pl_module, "net", None)
        dm = trainer.datamodule
        if net is None or not hasattr(net, "can_split") or dm is None or not hasattr(dm, "datasets"):
            return "needs an XRayClassifier trained with a covid-lightning DataModule"
        if any(type(cb).__name__ == "StagedUnfreeze" for cb in trainer.callbacks):
            return "staged unfreezing changes which layers are frozen during the run"
        if net.trainable == "all" or not net.can_split():
            return f"regime {net.trainable!r} on {type(net.backbone).__name__} has no frozen prefix to cache"
        if dm.hparams.get("augment", "none") != "none":
            return f"train-time augmentation ({dm.hparams.augment!r}) makes the frozen prefix's output vary"
        return None

    @torch.no_grad()
    def _features(self, pl_module: L.LightningModule, dataset: Any, workers: int) -> FeatureDataset:
        if isinstance(dataset, IterableDataset):  # a LitData stream: read once, in order, in this process
            # every item of the split on every rank, as from files: the DataModule's sampler (train) and
            # Lightning's distributed sampler (val) then shard the features once; iterating the stream would
            # give this rank only its share, sharded a second time (half the data under 2-process DDP)
            whole = getattr(dataset, "whole_split", None)
            dataset = whole() if whole is not None else dataset
            workers = 0
        loader = DataLoader(dataset, batch_size=self.batch_size, shuffle=False, num_workers=workers)
        net, chunks, labels, paths = pl_module.net, [], [], []
        was_training = net.training
        net.eval()
        try:
            for batch in loader:
                images = pl_module.to_input(batch["image"].to(pl_module.device))
                chunks.append(net.forward_prefix(images).to(self.dtype).cpu())
                labels += batch["label"].tolist()
                paths += list(batch["path"])
        finally:
            net.train(was_training)
        return FeatureDataset(torch.cat(chunks), labels, paths)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        reason = self._reason_off(trainer, pl_module)
        if reason is not None:
            log.info("FrozenFeatureCache is off: %s.", reason)
            return
        dm = trainer.datamodule
        started = time.perf_counter()
        workers = dm.hparams.num_workers if dm.hparams.num_workers is not None else 0
        for split in ("train", "val"):
            if len(dm.datasets.get(split, ())) == 0:
                continue
            self._originals[split] = dm.datasets[split]
            dm.datasets[split] = self._features(pl_module, dm.datasets[split], workers)
        self.seconds = time.perf_counter() - started
        self.active = True
        shape = tuple(dm.datasets["train"].features.shape[1:])
        log.info(
            "FrozenFeatureCache: %s prefix of %d train + %d val images computed once in %.1f s (%s %s per image);"
            " every epoch now trains the suffix only.",
            pl_module.net.trainable, len(dm.datasets["train"]), len(dm.datasets.get("val", ())),
            self.seconds, "x".join(map(str, shape)), str(self.dtype).replace("torch.", ""),
        )  # fmt: skip

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.active:
            trainer.datamodule.datasets.update(self._originals)
            self._originals.clear()
            self.active = False
