"""Lung masks predicted once per image by a segmenter checkpoint and cached."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from covid_lightning import lungs
from covid_lightning.cli import main
from covid_lightning.data.roi import LungRoi, roi_mask_name
from covid_lightning.inference import load_checkpoint, segment
from covid_lightning.lungs import attach_lung_masks, checkpoint_key, predict_lung_masks
from covid_lightning.modules.segmenter import LungSegmenter


@pytest.fixture
def images(demo_root: Path, tmp_path: Path) -> list[Path]:
    """Three demo images in a nested folder of their own (one resized to a non-square size)."""
    folder = tmp_path / "imgs" / "sub"
    folder.mkdir(parents=True)
    out = []
    for cls in ("COVID", "Normal", "Viral Pneumonia"):
        src = sorted((demo_root / cls / "images").glob("*.png"))[0]
        out.append(Path(shutil.copy(src, folder / src.name)))
    with Image.open(out[1]) as im:
        im.resize((180, 140)).save(out[1])
    return out


@pytest.fixture
def count_forward(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Batch sizes seen by LungSegmenter.forward."""
    seen: list[int] = []
    forward = LungSegmenter.forward

    def counting(self: LungSegmenter, x: torch.Tensor) -> torch.Tensor:
        seen.append(len(x))
        return forward(self, x)

    monkeypatch.setattr(LungSegmenter, "forward", counting)
    return seen


def test_masks_once_per_image_at_original_size(
    segmenter_ckpt: Path, images: list[Path], tmp_path: Path, count_forward: list[int]
) -> None:
    folder = predict_lung_masks(segmenter_ckpt, [*images, images[0]], cache_root=tmp_path / "cache", batch_size=2)
    assert folder == tmp_path / "cache" / checkpoint_key(segmenter_ckpt)
    assert len(checkpoint_key(segmenter_ckpt)) == 16
    assert count_forward == [2, 1]  # the duplicate is computed once
    assert sorted(p.name for p in folder.glob("*.png")) == sorted(roi_mask_name(p) for p in images)
    model = load_checkpoint(segmenter_ckpt)
    for path in images:
        with Image.open(folder / roi_mask_name(path)) as m, Image.open(path) as im:
            assert m.size == im.size
            mask = np.asarray(m)
        assert set(np.unique(mask)) <= {0, 255}
        expected = segment(model, path).astype(np.uint8) * 255  # same computation as inference.segment
        assert (mask != expected).mean() < 1e-3  # batched vs single forward: float noise at most


def test_second_call_decodes_nothing_and_changed_images_are_recomputed(
    segmenter_ckpt: Path, images: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "cache"
    folder = predict_lung_masks(segmenter_ckpt, images, cache_root=cache)
    stamps = {p: p.stat().st_mtime_ns for p in folder.glob("*.png")}

    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("the segmenter ran on a cached image")

    with monkeypatch.context() as m:
        m.setattr(LungSegmenter, "forward", fail)
        m.setattr(lungs, "load_checkpoint", fail)
        m.setattr(lungs, "load_image", fail)
        assert predict_lung_masks(segmenter_ckpt, images, cache_root=cache) == folder
    assert {p: p.stat().st_mtime_ns for p in folder.glob("*.png")} == stamps

    # one image changes: only its mask is recomputed
    changed = images[0]
    with Image.open(images[2]) as im:
        im.save(changed)
    old_mask = folder / roi_mask_name(changed)
    earlier = changed.stat().st_mtime_ns - 2_000_000_000  # the image was rewritten after its mask
    os.utime(old_mask, ns=(earlier, earlier))
    stamps[old_mask] = earlier
    seen: list[int] = []
    forward = LungSegmenter.forward
    monkeypatch.setattr(LungSegmenter, "forward", lambda self, x: seen.append(len(x)) or forward(self, x))
    predict_lung_masks(segmenter_ckpt, images, cache_root=cache)
    assert seen == [1]
    after = {p: p.stat().st_mtime_ns for p in folder.glob("*.png")}
    assert after[old_mask] >= changed.stat().st_mtime_ns
    assert {p: t for p, t in after.items() if p.name != roi_mask_name(changed)} == {
        p: t for p, t in stamps.items() if p.name != roi_mask_name(changed)
    }
    predict_lung_masks(segmenter_ckpt, images, cache_root=cache)
    assert seen == [1]  # fresh again

    # an image replaced by a copy that keeps an older modification time (cp -p, unzip): recomputed too
    replaced = images[1]
    with Image.open(images[2]) as im:
        im.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(replaced)
    os.utime(replaced, ns=(earlier - 10**10, earlier - 10**10))
    predict_lung_masks(segmenter_ckpt, images, cache_root=cache)
    assert seen == [1, 1]
    assert LungRoi(folder, "crop")(np.zeros((299, 299, 3), np.uint8), changed).ndim == 3  # readable by the loader


def test_main_prints_the_folder(segmenter_ckpt: Path, images: list[Path], tmp_path: Path, capsys) -> None:
    root = images[0].parents[1]
    assert main(["lungmasks", str(segmenter_ckpt), str(root), "--out", str(tmp_path / "c")]) == 0
    folder = Path(capsys.readouterr().out.strip().splitlines()[-1])
    assert folder == tmp_path / "c" / checkpoint_key(segmenter_ckpt)
    assert len(list(folder.glob("*.png"))) == len(images)
    assert main(["lungmasks", str(segmenter_ckpt), str(tmp_path / "nowhere")]) == 2
    assert "nowhere" in capsys.readouterr().err


def test_attach_lung_masks_covers_the_dataset(
    segmenter_ckpt: Path, demo_root: Path, images: list[Path], tmp_path: Path
) -> None:
    from covid_lightning import RadiographyDataModule
    from covid_lightning.data.scan import scan_dataset

    dm = RadiographyDataModule(root=str(demo_root), image_size=64, predict_root=str(images[0].parents[1]))
    folder = attach_lung_masks(dm, segmenter_ckpt, cache_root=tmp_path / "cache", stage="fit")
    assert dm.hparams.lung_masks == str(folder)
    records = scan_dataset(demo_root)
    assert {p.name for p in folder.glob("*.png")} == {roi_mask_name(r.path) for r in records}  # no GT masks
    attach_lung_masks(dm, segmenter_ckpt, cache_root=tmp_path / "cache", stage="predict")
    assert len(list(folder.glob("*.png"))) == len(records) + len(images)


def test_a_lungs_only_model_keeps_its_region(demo_root: Path, segmenter_ckpt: Path, tmp_path: Path, capsys) -> None:
    """A classifier trained on lung crops records the region in its checkpoint: whole-image inference refuses it,
    and ``test`` on whole films (or another region) is refused naming both; with the same region it runs."""
    from covid_lightning.errors import UserError
    from covid_lightning.inference import classify

    repo = Path(__file__).resolve().parents[1]
    base = ["--config", str(repo / "configs/demo/classification.yaml"), "--data.root", str(demo_root),
            "--data.image_size", "32", "--data.num_workers", "0", "--data.test_fraction", "0.25",
            "--trainer.enable_progress_bar", "false"]  # fmt: skip
    lungs_args = ["--data.lung_segmenter", str(segmenter_ckpt)]
    fit = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "1", "--trainer.limit_val_batches", "1"]
    assert main(["fit", *base, *lungs_args, *fit, "--trainer.default_root_dir", str(tmp_path / "fit")]) == 0
    ckpt = next((tmp_path / "fit").rglob("last.ckpt"))
    model = load_checkpoint(ckpt)
    assert model.describe() | {"lung_roi": "crop", "lung_margin": 0.1} == model.describe()
    with pytest.raises(UserError, match="trained on lung regions"):
        classify(model, next(demo_root.rglob("*.png")))

    capsys.readouterr()
    test = ["test", *base, "--ckpt_path", str(ckpt), "--trainer.default_root_dir", str(tmp_path / "test")]
    assert main(test) == 2
    assert "trained on lung regions (lung_roi crop, lung_margin 0.1); the data gives it whole films" in (
        capsys.readouterr().err
    )
    assert main([*test, *lungs_args, "--data.lung_roi", "mask"]) == 2
    assert "the data gives it lung regions (lung_roi mask" in capsys.readouterr().err
    assert main([*test, *lungs_args]) == 0
    predict = ["predict", *base, *lungs_args, "--ckpt_path", str(ckpt), "--data.predict_root", str(demo_root / "COVID")]
    assert main([*predict, "--trainer.default_root_dir", str(tmp_path / "p1")]) == 0  # the lung-region predictions
    assert len(list((tmp_path / "p1").rglob("predictions.csv"))) == 1
    capsys.readouterr()
    gradcam = [*predict, "--predictions.gradcam", "true", "--trainer.default_root_dir", str(tmp_path / "p2")]
    assert main(gradcam) == 2 and "--predictions.gradcam explains whole images" in capsys.readouterr().err

    # a checkpoint written before regions were recorded: unknown, nothing refused (it behaves as it did)
    old = torch.load(ckpt, map_location="cpu", weights_only=False)
    del old["covid_lightning_lung_region"]
    torch.save(old, tmp_path / "old.ckpt")
    assert load_checkpoint(tmp_path / "old.ckpt").describe()["lung_roi"] == "unknown"
    assert main([*test[:-3], str(tmp_path / "old.ckpt"), *test[-2:]]) == 0
