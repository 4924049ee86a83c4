import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from covid_lightning import CLASSES, LungSegmentationDataModule
from covid_lightning.data.datasets import XRayDataset
from covid_lightning.data.scan import DatasetError, Record, class_counts, scan_dataset
from covid_lightning.data.transforms import build_transform


def test_pairs_every_class(demo_root: Path):
    records = scan_dataset(demo_root, with_masks=True)
    assert class_counts(records) == dict.fromkeys(CLASSES, 8)
    assert all(r.mask_path.name == r.path.name and r.mask_path.parent.name == "masks" for r in records)


def test_unpaired_images_skipped_counted_and_logged(demo_root: Path, tmp_path: Path, caplog):
    copy = tmp_path / "COVID-19_Radiography_Dataset"
    shutil.copytree(demo_root, copy)
    for i in (1, 2, 3):
        (copy / "Normal" / "masks" / f"Normal-{i}.png").unlink()
    shutil.rmtree(copy / "COVID" / "masks")
    with caplog.at_level("WARNING"):
        records = scan_dataset(copy, with_masks=True)
    assert class_counts(records) == {"COVID": 0, "Lung_Opacity": 8, "Normal": 5, "Viral Pneumonia": 8}
    warnings = [r.getMessage() for r in caplog.records if "without a lung mask" in r.getMessage()]
    assert len(warnings) == 1 and "Skipped 11" in warnings[0] and "COVID: 8" in warnings[0]


def test_no_pairs_is_an_error(demo_root: Path, tmp_path: Path):
    copy = tmp_path / "data"
    shutil.copytree(demo_root, copy)
    for name in CLASSES:
        shutil.rmtree(copy / name / "masks")
    with pytest.raises(DatasetError, match="No image\\+mask pairs"):
        scan_dataset(copy, with_masks=True)


def test_real_sample_pairs(radiography_sample: Path):
    records = scan_dataset(radiography_sample, with_masks=True)
    assert class_counts(records) == {"COVID": 1, "Lung_Opacity": 1, "Normal": 1, "Viral Pneumonia": 100}


def test_masks_resized_nearest_binary_float(demo_root: Path):
    dm = LungSegmentationDataModule(root=str(demo_root), image_size=72, num_workers=0, augment="strong")
    dm.setup("fit")
    for split in ("train", "val"):
        sample = dm.datasets[split][0]
        assert sample["image"].shape == (3, 72, 72) and sample["image"].dtype == torch.uint8
        assert sample["mask"].shape == (1, 72, 72) and sample["mask"].dtype == torch.float32
        assert set(sample["mask"].unique().tolist()) == {0.0, 1.0}
        assert set(sample) == {"image", "mask", "label", "path"}
    batch = next(iter(dm.train_dataloader()))
    assert batch["mask"].shape == (16, 1, 72, 72)


def test_split_stratified_by_class(demo_root: Path):
    dm = LungSegmentationDataModule(root=str(demo_root), num_workers=0)
    dm.setup("fit")
    assert class_counts(dm.records["val"]) == dict.fromkeys(CLASSES, 2)  # round(8 * 0.3)


def _asymmetric_pair(tmp_path: Path) -> Record:
    """An image that is bright exactly where its (differently sized) mask is lung: an L shape."""
    from PIL import Image

    mask = np.zeros((256, 256), np.uint8)
    mask[30:200, 40:90] = 255
    mask[150:200, 40:180] = 255
    image = np.array(Image.fromarray(mask).resize((299, 299), Image.NEAREST))
    Image.fromarray(image).save(tmp_path / "img.png")
    Image.fromarray(np.stack([mask] * 3, -1)).save(tmp_path / "mask.png")
    return Record(path=tmp_path / "img.png", label=0, mask_path=tmp_path / "mask.png")


def test_image_and_mask_stay_aligned_under_augmentation(tmp_path: Path):
    rec = _asymmetric_pair(tmp_path)
    ds = XRayDataset([rec], build_transform(128, train=True, augment="strong"), masks=True)
    moved = 0
    reference = ds.transform  # same pipeline, many random draws
    for seed in range(20):
        np.random.seed(seed)
        reference.set_random_seed(seed)
        sample = ds[0]
        bright = (sample["image"][0] > 127).float()
        mask = sample["mask"][0]
        inter = (bright * mask).sum()
        iou = inter / (bright.sum() + mask.sum() - inter)
        assert iou > 0.95, f"seed {seed}: image and mask misaligned (IoU {iou:.3f})"
        moved += int(not torch.equal(mask, XRayDataset([rec], build_transform(128), masks=True)[0]["mask"][0]))
    assert moved >= 5, "the geometric augmentation should actually move the mask"
