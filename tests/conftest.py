"""Shared fixtures: the real samples in ../shared (skipped with a reason when absent)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("COVID_LIGHTNING_SHARED", REPO.parent / "shared"))
RADIOGRAPHY_SAMPLE = SHARED / "data" / "covid_radiography_sample"
CLS_SAMPLE = SHARED / "data" / "covid_cls_sample"
WEIGHTS = SHARED / "weights"
KERAS_H5 = WEIGHTS / "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.5_224_no_top.h5"
KERAS_SAFETENSORS = WEIGHTS / "mobilenetv2_050_keras_imagenet.safetensors"


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"real data not present: {path} (set COVID_LIGHTNING_SHARED to the shared folder)")
    return path


@pytest.fixture(scope="session")
def radiography_sample() -> Path:
    return _need(RADIOGRAPHY_SAMPLE)


@pytest.fixture(scope="session")
def cls_sample() -> Path:
    return _need(CLS_SAMPLE)


@pytest.fixture(scope="session")
def keras_weights() -> Path:
    _need(KERAS_H5)
    return _need(WEIGHTS)


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic dataset in the Kaggle layout (8 images + masks per class)."""
    from covid_lightning.data.demo import make_demo_dataset

    return make_demo_dataset(tmp_path_factory.mktemp("demo"), n_per_class=8, seed=0)


@pytest.fixture(autouse=True)
def _demo_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Runs that default to the demo data (root: null) generate it once per session, not in ~/.cache."""
    monkeypatch.setenv("COVID_LIGHTNING_DEMO_DIR", str(tmp_path_factory.getbasetemp() / "demo_default"))


def _quick_checkpoint(model, datamodule, path: Path) -> Path:
    import lightning as L

    trainer = L.Trainer(
        default_root_dir=path.parent,
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        limit_train_batches=2,
        limit_val_batches=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(model, datamodule)
    trainer.save_checkpoint(path)
    return path


@pytest.fixture(scope="session")
def classifier_ckpt(demo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A briefly trained XRayClassifier checkpoint (64 px, demo data)."""
    from covid_lightning import RadiographyDataModule, XRayClassifier

    model = XRayClassifier(pretrained=False, trainable="all", image_size=64)
    dm = RadiographyDataModule(root=str(demo_root), image_size=64, batch_size=8, num_workers=0)
    return _quick_checkpoint(model, dm, tmp_path_factory.mktemp("ckpt") / "classifier.ckpt")


@pytest.fixture(scope="session")
def segmenter_ckpt(demo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A briefly trained LungSegmenter checkpoint (SeedUNet, 64 px, demo data)."""
    from covid_lightning import LungSegmentationDataModule, LungSegmenter

    model = LungSegmenter(image_size=64)
    dm = LungSegmentationDataModule(root=str(demo_root), image_size=64, batch_size=8, num_workers=0)
    return _quick_checkpoint(model, dm, tmp_path_factory.mktemp("ckpt") / "segmenter.ckpt")


@pytest.fixture(autouse=True)
def _plain_argv(monkeypatch: pytest.MonkeyPatch) -> None:
    """In-process CLI runs get their arguments explicitly, never pytest's own."""
    import sys

    monkeypatch.setattr(sys, "argv", [sys.argv[0]])
