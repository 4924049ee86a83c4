from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from covid_lightning import CLASSES
from covid_lightning.data.datasets import XRayDataset
from covid_lightning.data.scan import DatasetError, class_counts, find_dataset_root, scan_dataset
from covid_lightning.data.transforms import eval_transform


def test_classes_canonical_order():
    assert CLASSES == ("COVID", "Lung_Opacity", "Normal", "Viral Pneumonia")


def test_root_or_parent_accepted(demo_root: Path):
    assert find_dataset_root(demo_root) == demo_root
    assert find_dataset_root(demo_root.parent) == demo_root


def test_bad_roots(tmp_path: Path):
    with pytest.raises(DatasetError, match="does not exist"):
        find_dataset_root(tmp_path / "nope")
    (tmp_path / "something").mkdir()
    with pytest.raises(DatasetError, match="No class folders"):
        find_dataset_root(tmp_path)


def test_every_class_found_and_non_images_ignored(demo_root: Path, tmp_path: Path):
    records = scan_dataset(demo_root)
    assert class_counts(records) == dict.fromkeys(CLASSES, 8)
    # non-image files anywhere in the layout are ignored silently
    import shutil

    copy = tmp_path / "COVID-19_Radiography_Dataset"
    shutil.copytree(demo_root, copy)
    (copy / "COVID.metadata.xlsx").write_bytes(b"PK\x03\x04 not an image")
    (copy / "COVID" / "images" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (copy / "Normal" / "images" / "notes.txt").write_text("hello")
    assert [r.path.name for r in scan_dataset(copy)] == [r.path.name for r in records]


def test_flat_release_layout(tmp_path: Path):
    """The older release keeps images directly in <Class>/."""
    for name in CLASSES:
        (tmp_path / name).mkdir()
        Image.fromarray(np.zeros((20, 20), np.uint8)).save(tmp_path / name / f"{name}-1.png")
    assert class_counts(scan_dataset(tmp_path)) == dict.fromkeys(CLASSES, 1)


def test_l_and_rgb_both_load_as_3x224x224(demo_root: Path):
    records = scan_dataset(demo_root)
    modes = {Image.open(r.path).mode for r in records}
    assert modes == {"L", "RGB"}
    ds = XRayDataset(records, eval_transform(224))
    for i in range(len(ds)):
        sample = ds[i]
        assert sample["image"].shape == (3, 224, 224)
        assert sample["image"].dtype.is_floating_point is False
        assert set(sample) == {"image", "label", "path"}
        assert sample["label"] == records[i].label


def test_gray_image_channels_identical(demo_root: Path):
    rec = next(r for r in scan_dataset(demo_root) if Image.open(r.path).mode == "L")
    img = XRayDataset([rec], eval_transform(64))[0]["image"]
    assert (img[0] == img[1]).all() and (img[1] == img[2]).all()
