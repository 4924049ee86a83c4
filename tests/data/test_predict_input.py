"""What ``predict_root`` lists: a folder (recursive) without the ground-truth masks of a Kaggle-layout
dataset (skipped, counted, logged once), or one image file."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import pytest

from covid_lightning import LungSegmentationDataModule, RadiographyDataModule
from covid_lightning.data.scan import DatasetError


def _predict_paths(root: Path, cls: type = RadiographyDataModule, **kw: object) -> list[Path]:
    dm = cls(predict_root=str(root), image_size=32, num_workers=0, **kw)
    dm.setup("predict")
    return list(dm.datasets["predict"].paths)


def _skip_messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "mask files" in r.getMessage()]


@pytest.mark.parametrize("cls", [RadiographyDataModule, LungSegmentationDataModule])
def test_dataset_root_lists_images_not_kaggle_masks(demo_root: Path, caplog: pytest.LogCaptureFixture, cls: type):
    """The Kaggle root as predict_root: the 32 X-rays, not the 32 lung masks; one log line says so."""
    with caplog.at_level(logging.INFO):
        paths = _predict_paths(demo_root.parent, cls)  # the folder holding COVID-19_Radiography_Dataset/
    assert len(paths) == 32 and all(p.parent.name == "images" for p in paths)
    messages = _skip_messages(caplog)
    assert len(messages) == 1, messages
    assert messages[0].startswith("predict: skipped 32 mask files under") and "masks" in messages[0]


def test_masks_folder_without_images_sibling_is_kept(demo_root: Path, tmp_path: Path, caplog):
    """Only ``masks`` folders next to an ``images`` folder are a dataset's ground truth; others are inputs."""
    (tmp_path / "incoming" / "masks").mkdir(parents=True)
    shutil.copy(demo_root / "COVID" / "images" / "COVID-1.png", tmp_path / "incoming" / "masks" / "a.png")
    shutil.copy(demo_root / "COVID" / "images" / "COVID-2.png", tmp_path / "incoming" / "b.png")
    with caplog.at_level(logging.INFO):
        paths = _predict_paths(tmp_path / "incoming")
    assert sorted(p.name for p in paths) == ["a.png", "b.png"]
    assert _skip_messages(caplog) == []


def test_single_image_file(demo_root: Path, tmp_path: Path):
    image = demo_root / "Normal" / "images" / "Normal-3.png"
    assert _predict_paths(image) == [image]
    jpeg = tmp_path / "scan.JPG"
    from PIL import Image

    Image.open(image).convert("RGB").save(jpeg, format="JPEG")
    assert _predict_paths(jpeg) == [jpeg]


def test_single_file_that_cannot_be_predicted(demo_root: Path, tmp_path: Path):
    notes = tmp_path / "notes.txt"
    notes.write_text("not an image")
    with pytest.raises(DatasetError, match=r"notes\.txt.*PNG/JPEG"):
        _predict_paths(notes)
    with pytest.raises(DatasetError, match=r"missing\.png.*does not exist"):
        _predict_paths(tmp_path / "missing.png")
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(DatasetError, match=r"broken\.png"):
        _predict_paths(broken)


def test_dangling_symlink_in_predict_folder_is_named(demo_root: Path, tmp_path: Path, caplog):
    folder = tmp_path / "incoming"
    folder.mkdir()
    shutil.copy(demo_root / "COVID" / "images" / "COVID-1.png", folder / "good.png")
    os.symlink(tmp_path / "gone.png", folder / "dangling.png")
    with pytest.raises(DatasetError, match=r"dangling\.png"):
        _predict_paths(folder)
    with caplog.at_level(logging.WARNING):
        assert [p.name for p in _predict_paths(folder, on_bad_file="skip")] == ["good.png"]
    assert any("Skipped 1 unreadable" in r.getMessage() and "dangling.png" in r.getMessage() for r in caplog.records)


def test_real_sample_root(radiography_sample: Path, caplog: pytest.LogCaptureFixture):
    """The real sample (158 X-rays, 103 masks): 158 inputs, 103 masks skipped."""
    with caplog.at_level(logging.INFO):
        paths = _predict_paths(radiography_sample)
    assert len(paths) == 158 and not any(p.parent.name == "masks" for p in paths)
    messages = _skip_messages(caplog)
    assert len(messages) == 1 and messages[0].startswith("predict: skipped 103 mask files under")
