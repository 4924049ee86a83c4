"""Bad input: every case either works correctly, stops before training naming the file, or is skipped
and counted (on_bad_file: skip). Nothing is dropped silently."""

import io
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from covid_lightning import CLASSES, LungSegmentationDataModule, RadiographyDataModule
from covid_lightning.data.scan import DatasetError


@pytest.fixture
def data(demo_root: Path, tmp_path: Path) -> Path:
    root = tmp_path / "COVID-19_Radiography_Dataset"
    shutil.copytree(demo_root, root)
    return root


def _setup(root: Path, cls=RadiographyDataModule, **kw):
    dm = cls(root=str(root), image_size=32, batch_size=4, num_workers=0, **kw)
    dm.setup("fit")
    return dm


def _png_bytes(path: Path) -> bytes:
    return path.read_bytes()


BAD_FILES = {
    "corrupt": lambda p: p.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 50),
    "truncated": lambda p: p.write_bytes(_png_bytes(p)[: len(_png_bytes(p)) // 2]),
    "zero-byte": lambda p: p.write_bytes(b""),
}


@pytest.mark.parametrize("kind", list(BAD_FILES))
def test_bad_image_stops_before_training_naming_the_file(data: Path, kind: str):
    bad = data / "Normal" / "images" / "Normal-2.png"
    BAD_FILES[kind](bad)
    with pytest.raises(DatasetError, match=r"Normal-2\.png.*\n.*on_bad_file: skip"):
        _setup(data)


@pytest.mark.parametrize("kind", list(BAD_FILES))
def test_bad_image_skipped_counted_and_logged_once(data: Path, kind: str, caplog):
    bad = data / "COVID" / "images" / "COVID-3.png"
    BAD_FILES[kind](bad)
    with caplog.at_level(logging.WARNING):
        dm = _setup(data, on_bad_file="skip")
    total = sum(len(v) for v in dm.records.values())
    assert total == 4 * 8 - 1
    assert all(r.path != bad for v in dm.records.values() for r in v)
    messages = [r.getMessage() for r in caplog.records if "unreadable" in r.getMessage()]
    assert len(messages) == 1 and "COVID-3.png" in messages[0] and "Skipped 1" in messages[0]


def test_bad_mask_stops_segmentation(data: Path):
    (data / "Lung_Opacity" / "masks" / "Lung_Opacity-4.png").write_bytes(b"")
    with pytest.raises(DatasetError, match="Lung_Opacity-4.png"):
        _setup(data, LungSegmentationDataModule)
    dm = _setup(data, LungSegmentationDataModule, on_bad_file="skip")
    assert sum(len(v) for v in dm.records.values()) == 31


def test_odd_modes_load_as_rgb(data: Path):
    """16-bit gray, RGBA and palette PNGs are read correctly (16-bit scaled, not clipped)."""
    src = np.asarray(Image.open(data / "Normal" / "images" / "Normal-1.png").convert("L"))
    Image.fromarray(src.astype(np.uint16) * 257).save(data / "Normal" / "images" / "Normal-1.png")
    Image.open(data / "COVID" / "images" / "COVID-1.png").convert("RGBA").save(
        data / "COVID" / "images" / "COVID-1.png"
    )
    Image.open(data / "COVID" / "images" / "COVID-2.png").convert("P").save(data / "COVID" / "images" / "COVID-2.png")
    dm = _setup(data, RadiographyDataModule, duplicates="none")
    from covid_lightning.data.transforms import load_image

    sixteen = load_image(data / "Normal" / "images" / "Normal-1.png")
    assert sixteen.dtype == np.uint8 and sixteen.shape == (299, 299, 3)
    assert np.abs(sixteen[..., 0].astype(int) - src).max() <= 1
    for path in ("COVID-1.png", "COVID-2.png"):
        assert load_image(data / "COVID" / "images" / path).shape == (299, 299, 3)
    assert sum(len(v) for v in dm.records.values()) == 32


def test_mask_of_other_size_and_non_binary_mask(data: Path, caplog):
    mask_path = data / "COVID" / "masks" / "COVID-1.png"
    mask = np.asarray(Image.open(mask_path).convert("L"))
    Image.fromarray(mask).resize((512, 512), Image.NEAREST).save(mask_path)  # other size: resized, still aligned
    soft = data / "Normal" / "masks" / "Normal-1.png"
    smooth = np.asarray(
        Image.open(soft).convert("L").resize((64, 64), Image.BILINEAR).resize((256, 256), Image.BILINEAR)
    )
    Image.fromarray(smooth).save(soft)  # anti-aliased edges: values other than 0/255
    with caplog.at_level(logging.WARNING):
        dm = LungSegmentationDataModule(root=str(data), image_size=64, num_workers=0, val_fraction=0.25)
        dm.setup("fit")
    assert any("values other than 0/255" in r.getMessage() for r in caplog.records)
    for split in ("train", "val"):
        for i, rec in enumerate(dm.records[split]):
            if rec.mask_path in (mask_path, soft):
                sample = dm.datasets[split][i]
                assert set(sample["mask"].unique().tolist()) <= {0.0, 1.0}
                assert 0.1 < sample["mask"].mean() < 0.45


def test_missing_masks_and_empty_class_folder(data: Path, caplog):
    shutil.rmtree(data / "Lung_Opacity" / "images")
    (data / "Lung_Opacity" / "images").mkdir()  # an empty class folder
    (data / "Normal" / "masks" / "Normal-5.png").unlink()
    with caplog.at_level(logging.WARNING):
        dm = _setup(data, LungSegmentationDataModule)
    counts = {c: sum(r.class_name == c for v in dm.records.values() for r in v) for c in CLASSES}
    assert counts == {"COVID": 8, "Lung_Opacity": 0, "Normal": 7, "Viral Pneumonia": 8}
    assert any("Skipped 1 images without a lung mask" in r.getMessage() for r in caplog.records)


def test_roots_that_cannot_work(tmp_path: Path):
    with pytest.raises(DatasetError, match="does not exist"):
        _setup(tmp_path / "missing")
    (tmp_path / "unrelated").mkdir()
    with pytest.raises(DatasetError, match="No class folders"):
        _setup(tmp_path)


def test_extra_folders_and_unusual_names(data: Path):
    (data / "Extra_Class" / "images").mkdir(parents=True)
    shutil.copy(data / "COVID" / "images" / "COVID-1.png", data / "Extra_Class" / "images" / "x.png")
    (data / "COVID" / "images" / "backup").mkdir()
    shutil.copy(data / "COVID" / "images" / "COVID-1.png", data / "COVID" / "images" / "backup" / "COVID-1.png")
    for name in ("Röntgen bild 1.png", "胸部 2.png"):
        img = Image.open(data / "Normal" / "images" / "Normal-1.png")
        img.rotate(90).save(data / "Normal" / "images" / name)  # distinct pixels: not a duplicate
        Image.open(data / "Normal" / "masks" / "Normal-1.png").rotate(90).save(data / "Normal" / "masks" / name)
    dm = _setup(data, LungSegmentationDataModule)
    names = {r.path.name for v in dm.records.values() for r in v}
    assert {"Röntgen bild 1.png", "胸部 2.png"} <= names and "x.png" not in names
    assert sum(len(v) for v in dm.records.values()) == 34
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape[1:] == (3, 32, 32)


def test_predict_bad_files(data: Path, tmp_path: Path, caplog):
    folder = tmp_path / "incoming"
    (folder / "sub").mkdir(parents=True)
    shutil.copy(data / "COVID" / "images" / "COVID-1.png", folder / "good.png")
    Image.open(data / "COVID" / "images" / "COVID-2.png").convert("RGB").save(folder / "sub" / "good.jpg")
    (folder / "broken.png").write_bytes(b"not a png")
    dm = RadiographyDataModule(predict_root=str(folder), image_size=32, num_workers=0)
    with pytest.raises(DatasetError, match="broken.png"):
        dm.setup("predict")
    dm = RadiographyDataModule(predict_root=str(folder), image_size=32, num_workers=0, on_bad_file="skip")
    with caplog.at_level(logging.WARNING):
        dm.setup("predict")
    assert sorted(p.name for p in dm.datasets["predict"].paths) == ["good.jpg", "good.png"]
    assert any("broken.png" in r.getMessage() for r in caplog.records)


def _reencoded_copy(src: Path, dst: Path) -> None:
    """The same film re-encoded as JPEG and resized, saved as PNG: a near duplicate."""
    buf = io.BytesIO()
    Image.open(src).convert("L").resize((256, 256), Image.BILINEAR).save(buf, "JPEG", quality=90)
    Image.open(io.BytesIO(buf.getvalue())).save(dst)


def test_planted_duplicates_never_straddle_the_split(data: Path, tmp_path: Path):
    for i in range(1, 9):  # a re-encoded, resized copy of every Lung_Opacity image
        src = data / "Lung_Opacity" / "images" / f"Lung_Opacity-{i}.png"
        _reencoded_copy(src, data / "Lung_Opacity" / "images" / f"Lung_Opacity-copy{i}.png")

    def straddling(dm) -> int:
        split_of = {r.path.name: s for s, recs in dm.records.items() for r in recs}
        return sum(split_of[f"Lung_Opacity-{i}.png"] != split_of[f"Lung_Opacity-copy{i}.png"] for i in range(1, 9))

    naive = [straddling(_setup(data, duplicates="none", seed=s)) for s in range(3)]
    assert sum(naive) > 0, "without grouping, the copies should land in other splits than their originals"
    for seed in range(3):
        dm = _setup(data, seed=seed)
        assert straddling(dm) == 0
        assert dm.selection.screening.duplicates["groups"] >= 8
    # the manifest records the groups
    import lightning as L

    dm = RadiographyDataModule(root=str(data), image_size=32, num_workers=0)
    trainer = L.Trainer(default_root_dir=tmp_path / "run", logger=False)
    dm.trainer = trainer
    dm.setup("fit")
    import csv

    rows = list(csv.DictReader(dm.manifest_path.open()))
    group = {Path(r["path"]).name: r["group"] for r in rows}
    assert all(group[f"Lung_Opacity-{i}.png"] == group[f"Lung_Opacity-copy{i}.png"] for i in range(1, 9))


# ---------------------------------------------------------------------------------------------- classes


@pytest.mark.parametrize("how", ["empty", "missing"])
def test_class_without_images_warns_at_fit(data: Path, caplog, how: str):
    """An empty or missing class folder trains (the class gets no loss weight) but says so at setup."""
    shutil.rmtree(data / "Lung_Opacity" if how == "missing" else data / "Lung_Opacity" / "images")
    if how == "empty":
        (data / "Lung_Opacity" / "images").mkdir()
    with caplog.at_level(logging.WARNING):
        dm = _setup(data)
    assert dm.class_counts["Lung_Opacity"] == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    messages = [m for m in warnings if "Lung_Opacity" in m]
    assert len(messages) == 1, messages
    assert str(data / "Lung_Opacity") in messages[0] and "no images" in messages[0]


def test_class_without_training_image_is_an_error(data: Path):
    """Two COVID images with val and test fractions of 0.3: one to val, one to test, none left to train on."""
    for path in sorted((data / "COVID" / "images").glob("*.png"))[2:]:
        path.unlink()
    with pytest.raises(ValueError, match="no training image") as err:
        _setup(data, val_fraction=0.3, test_fraction=0.3, duplicates="none")
    assert "COVID" in str(err.value) and str(data) in str(err.value) and "test_fraction" in str(err.value)
    dm = _setup(data, val_fraction=0.3, test_fraction=0.0, duplicates="none")  # the fix the message names
    assert dm.class_counts["COVID"] == 1


def test_class_without_training_image_from_a_split_file(data: Path, tmp_path: Path):
    """A reused manifest that files every Normal image under val fails the same way."""
    import csv

    import lightning as L

    dm = RadiographyDataModule(root=str(data), image_size=32, num_workers=0, duplicates="none")
    dm.trainer = L.Trainer(default_root_dir=tmp_path / "run", logger=False)
    dm.setup("fit")
    rows = list(csv.DictReader(dm.manifest_path.open(encoding="utf-8")))
    for row in rows:
        if row["class_name"] == "Normal":
            row["split"] = "val"
    edited = tmp_path / "split.csv"
    with edited.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with pytest.raises(ValueError, match=r"(?s)Normal.*no training image.*split\.csv"):
        _setup(data, split_file=str(edited))


# ---------------------------------------------------------------------------------------------- symlinks


def _plant_bad_links(folder: Path) -> list[Path]:
    """A dangling symlink and a two-link loop among the images of ``folder``."""
    dangling, loop_a, loop_b = folder / "dangling.png", folder / "loop-a.png", folder / "loop-b.png"
    os.symlink(folder / "deleted-long-ago.png", dangling)
    os.symlink(loop_b, loop_a)
    os.symlink(loop_a, loop_b)
    return [dangling, loop_a, loop_b]


def test_bad_symlinks_stop_training_naming_each(data: Path):
    links = _plant_bad_links(data / "Normal" / "images")
    with pytest.raises(DatasetError) as err:
        _setup(data)
    message = str(err.value)
    assert message.startswith("3 unreadable file(s)")
    for link in links:
        assert link.name in message
    assert "dangling symlink" in message and "symlink loop" in message


def test_bad_symlinks_skipped_and_counted(data: Path, caplog):
    _plant_bad_links(data / "Normal" / "images")
    with caplog.at_level(logging.WARNING):
        dm = _setup(data, on_bad_file="skip")
    assert sum(len(v) for v in dm.records.values()) == 32
    messages = [r.getMessage() for r in caplog.records if "unreadable" in r.getMessage()]
    assert len(messages) == 1 and messages[0].startswith("Skipped 3 unreadable file(s)")


def test_dangling_mask_symlink_is_unreadable_not_unpaired(data: Path):
    mask = data / "COVID" / "masks" / "COVID-2.png"
    mask.unlink()
    os.symlink(data / "nowhere.png", mask)
    with pytest.raises(DatasetError, match=r"COVID-2\.png: dangling symlink"):
        _setup(data, LungSegmentationDataModule)
