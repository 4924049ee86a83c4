import logging
from pathlib import Path

import lightning as L
import pytest
import torch

from covid_lightning import RadiographyDataModule, XRayClassifier
from covid_lightning.callbacks import FrozenFeatureCache
from covid_lightning.data.datasets import FeatureDataset, XRayDataset


def _fit(demo_root: Path, tmp_path: Path, regime: str, cache: bool, augment: str = "none"):
    L.seed_everything(3)
    model = XRayClassifier(pretrained=False, trainable=regime, image_size=64)
    dm = RadiographyDataModule(root=str(demo_root), image_size=64, batch_size=8, num_workers=0, augment=augment)
    callbacks = [FrozenFeatureCache()] if cache else []
    trainer = L.Trainer(
        default_root_dir=tmp_path,
        max_epochs=2,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        deterministic=True,
        callbacks=callbacks,
    )
    stats = {k: v.clone() for k, v in model.state_dict().items() if "running_" in k}
    trainer.fit(model, dm)
    return model, dm, trainer, stats


@pytest.mark.parametrize("regime", ["head", "last_2_conv", "last_4_blocks"])
def test_cached_path_matches_uncached(demo_root: Path, tmp_path: Path, regime: str):
    plain, _, plain_trainer, _ = _fit(demo_root, tmp_path / "plain", regime, cache=False)
    cached, dm, trainer, stats = _fit(demo_root, tmp_path / "cached", regime, cache=True)
    cache = trainer.callbacks[0]
    assert cache.seconds is not None  # it ran
    for key in ("val/acc", "val/loss", "train/loss_epoch"):
        torch.testing.assert_close(
            trainer.callback_metrics[key], plain_trainer.callback_metrics[key], rtol=1e-4, atol=1e-5
        )
    for (k, a), b in zip(cached.state_dict().items(), plain.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=k)
    frozen = "blocks.0.0.bn1.running_mean"  # a frozen BN layer in every regime here
    key = next(k for k in stats if k.endswith(frozen))
    assert torch.equal(stats[key], cached.state_dict()[key])
    assert isinstance(dm.datasets["train"], XRayDataset)  # image datasets are back after fit


def test_feature_datasets_used_during_fit(demo_root: Path, tmp_path: Path):
    seen = {}

    class Probe(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen["keys"] = set(batch)
            seen["dataset"] = type(trainer.datamodule.datasets["train"])
            seen["workers"] = trainer.train_dataloader.num_workers

    model = XRayClassifier(pretrained=False, trainable="last_conv", image_size=64)
    dm = RadiographyDataModule(root=str(demo_root), image_size=64, batch_size=8, num_workers=2, augment="none")
    trainer = L.Trainer(
        default_root_dir=tmp_path,
        max_epochs=1,
        limit_train_batches=1,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        callbacks=[FrozenFeatureCache(dtype="float16"), Probe()],
    )
    trainer.fit(model, dm)
    # in-memory activations are served without worker processes (they would only add IPC)
    assert seen == {"keys": {"features", "label", "path"}, "dataset": FeatureDataset, "workers": 0}


@pytest.mark.parametrize(
    ("regime", "augment", "why"),
    [
        ("head", "light", "augmentation"),
        ("all", "none", "no frozen prefix"),
    ],
)
def test_switches_itself_off_with_a_log_line(demo_root, tmp_path, caplog, regime, augment, why):
    with caplog.at_level(logging.INFO):
        _, dm, trainer, _ = _fit(demo_root, tmp_path, regime, cache=True, augment=augment)
    assert trainer.callbacks[0].seconds is None
    assert any("FrozenFeatureCache is off" in r.getMessage() and why in r.getMessage() for r in caplog.records)
