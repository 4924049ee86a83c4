from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from covid_lightning import LungSegmentationDataModule, LungSegmenter
from covid_lightning.callbacks import SegmentationOverlays
from covid_lightning.callbacks.overlays import overlay_figure
from covid_lightning.inference import load_checkpoint, segment
from tests.helpers.trainers import quiet_trainer

_trainer = quiet_trainer


def _dm(root: Path, **kw) -> LungSegmentationDataModule:
    opts = dict(root=str(root), image_size=64, batch_size=8, num_workers=0)
    opts.update(kw)
    return LungSegmentationDataModule(**opts)


def test_fast_dev_run(demo_root: Path, tmp_path: Path):
    _trainer(tmp_path, fast_dev_run=True).fit(LungSegmenter(image_size=64), _dm(demo_root))


def test_bf16_mixed_on_cpu_is_finite(demo_root: Path, tmp_path: Path):
    # small images: CPUs without native bf16 kernels run bf16 convolutions very slowly
    model = LungSegmenter(image_size=32, loss="bce_dice")
    trainer = _trainer(tmp_path, precision="bf16-mixed", max_epochs=1, limit_train_batches=2, limit_val_batches=1)
    trainer.fit(model, _dm(demo_root, image_size=32))
    logged = trainer.callback_metrics
    for key in (
        "train/loss",
        "val/loss",
        "val/iou",
        "val/dice",
        "val/precision",
        "val/recall",
        "val/accuracy",
        "val/dice_per_image",
    ):
        assert key in logged and torch.isfinite(logged[key]), key


def test_metrics_match_hand_computation():
    model = LungSegmenter(image_size=8)
    target = torch.zeros(2, 1, 4, 4)
    target[0, 0, :2, :] = 1  # 8 lung pixels in image 0
    target[1, 0, :, :1] = 1  # 4 lung pixels in image 1
    logits = torch.full((2, 1, 4, 4), -5.0)
    logits[0, 0, :1, :] = 5.0  # image 0: 4 predicted, all right
    logits[0, 0, 3, :2] = 5.0  # image 0: 2 false positives
    logits[1, 0, :, :2] = 5.0  # image 1: 8 predicted, 4 right
    metrics = model.val_metrics
    probs = logits.sigmoid()
    for name, metric in metrics.items(keep_base=True):
        metric.update((probs > 0.5).long() if "per_image" in name else probs, target.long())
    values = {k.split("/")[1]: v.item() for k, v in metrics.compute().items()}
    tp, fp, fn, n = 4 + 4, 2 + 4, 4 + 0, 32
    assert values["iou"] == pytest.approx(tp / (tp + fp + fn))
    assert values["dice"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    assert values["precision"] == pytest.approx(tp / (tp + fp))
    assert values["recall"] == pytest.approx(tp / (tp + fn))
    assert values["accuracy"] == pytest.approx((n - fp - fn) / n)
    dice0, dice1 = 2 * 4 / (6 + 8), 2 * 4 / (8 + 4)
    assert values["dice_per_image"] == pytest.approx((dice0 + dice1) / 2)


def test_loss_is_float32_under_autocast():
    model = LungSegmenter(image_size=32)
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(x)
        loss = model.compute_loss(logits, torch.ones(2, 1, 32, 32))
    assert logits.dtype == torch.bfloat16 and loss.dtype == torch.float32


def test_unknown_loss_and_arch_list_valid_names():
    with pytest.raises(ValueError, match="bce, bce_dice"):
        LungSegmenter(loss="focal")
    with pytest.raises(ValueError, match="seed_unet"):
        LungSegmenter(arch="Unet3D")


def test_overlay_figure_titles_dice_and_legend():
    image = torch.zeros(3, 8, 8, dtype=torch.uint8)
    truth = torch.zeros(1, 8, 8)
    truth[0, 2:6, 2:6] = 1  # 16 pixels
    pred = torch.zeros(1, 8, 8)
    pred[0, 2:6, 2:4] = 1  # 8 of them: Dice 2 * 8 / 24
    fig = overlay_figure([image, image], [pred, truth], [truth, truth], names=["/data/COVID-12.png", "b.png"])
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == ["/data/COVID-12.png\nDice 0.667", "b.png\nDice 1.000"]
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["truth", "prediction"]
    assert all(len(ax.collections) == 2 for ax in fig.axes)  # a contour each for the truth and the prediction
    fig = overlay_figure([image, image], [pred, 0 * pred], names=["COVID-12.png", "b.png"])  # predict: no truth
    assert [ax.get_title() for ax in fig.axes] == ["COVID-12.png", "b.png\nno lung predicted"]
    assert [len(ax.collections) for ax in fig.axes] == [1, 0]
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["prediction"]


def test_checkpoint_round_trip_identical_masks(demo_root: Path, tmp_path: Path):
    overlays = SegmentationOverlays(num_images=3)
    model = LungSegmenter(image_size=64, model_kwargs={"batch_norm": True})
    trainer = _trainer(tmp_path, max_epochs=1, limit_train_batches=2, limit_val_batches=1, callbacks=[overlays])
    dm = _dm(demo_root)
    trainer.fit(model, dm)
    assert overlays.last_path is not None and overlays.last_path.is_file()
    with Image.open(overlays.last_path) as im:  # 3 titled panels side by side, a legend below
        assert im.mode in ("RGB", "RGBA") and im.size[0] > im.size[1] > 3 * 64
    path = tmp_path / "seg.ckpt"
    trainer.save_checkpoint(path)
    loaded = LungSegmenter.load_from_checkpoint(path).eval()
    model.eval()
    batch = next(iter(dm.val_dataloader()))
    with torch.no_grad():
        torch.testing.assert_close(loaded(batch["image"]), model(batch["image"]), rtol=0, atol=0)
    assert type(load_checkpoint(path)) is LungSegmenter
    image_path = Path(batch["path"][0])
    mask, probs = segment(loaded, image_path, return_probs=True)
    assert mask.shape == (299, 299) == probs.shape and mask.dtype == bool
    assert np.array_equal(mask, segment(model, Image.open(image_path)))
