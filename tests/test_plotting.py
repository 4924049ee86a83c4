"""plot_curves on a real (tiny) run's metrics.csv, the segmentation layout, and the script."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
from lightning.pytorch.loggers import CSVLogger
from PIL import Image

from covid_lightning import LungSegmenter, RadiographyDataModule, XRayClassifier
from covid_lightning.plotting import (
    best_epoch,
    find_metrics_csv,
    plot_curves,
    read_epoch_metrics,
    run_kind,
    run_monitor,
)
from tests.helpers.scripts import load_script


@pytest.fixture(scope="module")
def classifier_run(demo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-epoch classifier run logged with CSVLogger; returns its run folder."""
    root = tmp_path_factory.mktemp("run")
    trainer = L.Trainer(
        default_root_dir=root,
        accelerator="cpu",
        devices=1,
        max_epochs=2,
        limit_train_batches=2,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        log_every_n_steps=1,
        logger=CSVLogger(root, name="tiny"),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    model = XRayClassifier(pretrained=False, trainable="head", image_size=32)
    trainer.fit(model, RadiographyDataModule(root=str(demo_root), image_size=32, batch_size=8, num_workers=0))
    return Path(trainer.log_dir)


def _png_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as im:
        assert im.format == "PNG"
        im.load()
        return im.size


def test_read_epoch_metrics_of_a_real_run(classifier_run: Path):
    epochs = read_epoch_metrics(classifier_run / "metrics.csv")
    assert sorted(epochs) == [0, 1]
    for values in epochs.values():
        assert {"train/loss", "val/loss", "train/acc", "val/acc"} <= set(values)
        assert not any(k.endswith("_step") for k in values)
    assert run_kind(epochs) == "classification"
    assert best_epoch(epochs, "val/acc") in (0, 1)


def test_plot_curves_classification(classifier_run: Path, tmp_path: Path):
    out = plot_curves(classifier_run, tmp_path / "curves.png")  # a run folder is enough
    assert out == tmp_path / "curves.png"
    width, height = _png_size(out)
    assert width > height  # two panels side by side
    default = plot_curves(classifier_run / "metrics.csv")
    assert default == classifier_run / "curves.png" and default.is_file()
    assert find_metrics_csv(classifier_run.parent) == classifier_run / "metrics.csv"  # a folder of runs


def test_plot_curves_segmentation_columns(tmp_path: Path):
    csv_path = tmp_path / "metrics.csv"
    lines = ["epoch,step,train/loss_step,train/loss_epoch,train/iou,train/dice,val/loss,val/iou,val/dice"]
    for e in range(3):
        lines.append(f"{e},{e * 2},0.5,,,,,,")
        lines.append(f"{e},{e * 2 + 1},,,,,{0.6 - 0.1 * e},{0.5 + 0.1 * e},{0.6 + 0.1 * e}")
        lines.append(f"{e},{e * 2 + 1},,{0.7 - 0.1 * e},{0.4 + 0.1 * e},{0.5 + 0.1 * e},,,")
    csv_path.write_text("\n".join(lines) + "\n")
    epochs = read_epoch_metrics(csv_path)
    assert run_kind(epochs) == "segmentation" and best_epoch(epochs, "val/dice") == 2
    assert epochs[1]["train/loss"] == pytest.approx(0.6)
    seg = _png_size(plot_curves(csv_path, tmp_path / "seg.png"))
    assert seg[0] > 2.5 * seg[1]  # three panels


def test_plot_curves_errors(tmp_path: Path):
    with pytest.raises(FileNotFoundError):
        plot_curves(tmp_path)
    (tmp_path / "metrics.csv").write_text("epoch,step,lr-Adam\n0,0,0.001\n")
    with pytest.raises(ValueError, match="no per-epoch"):
        plot_curves(tmp_path)


def test_script(classifier_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture):
    assert load_script("plot_curves").main([str(classifier_run / "metrics.csv"), "--out", str(tmp_path / "x.png")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "x.png")
    _png_size(tmp_path / "x.png")


def test_run_monitor_is_the_runs_own_checkpoint_choice(tmp_path: Path):
    csv_path = tmp_path / "metrics.csv"
    assert run_monitor(csv_path, "segmentation") == (LungSegmenter.monitor, LungSegmenter.monitor_mode)
    assert run_monitor(csv_path, "classification") == (XRayClassifier.monitor, XRayClassifier.monitor_mode)
    (tmp_path / "config.yaml").write_text("checkpoint:\n  monitor: null\n  mode: null\n")
    assert run_monitor(csv_path, "classification") == ("val/acc", "max")  # what the CLI writes by default
    (tmp_path / "config.yaml").write_text("checkpoint:\n  monitor: val/loss\n  mode: min\n")
    assert run_monitor(csv_path, "classification") == ("val/loss", "min")
    (tmp_path / "config.yaml").write_text("checkpoint:\n  monitor: val/balanced_acc\n")
    assert run_monitor(csv_path, "classification") == ("val/balanced_acc", "min")  # ModelCheckpoint's default mode
