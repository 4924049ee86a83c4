from collections import Counter
from pathlib import Path

import pytest

from covid_lightning import RadiographyDataModule
from covid_lightning.data.demo import make_demo_dataset
from covid_lightning.data.scan import DatasetError, scan_dataset
from covid_lightning.data.split import read_manifest, stratified_split, write_manifest


def test_stratified_exactly():
    labels = [0] * 100 + [1] * 50 + [2] * 10 + [3] * 7
    splits = stratified_split(labels, val_fraction=0.3, seed=1)
    per = Counter(zip(labels, splits))
    assert per[(0, "val")] == 30 and per[(1, "val")] == 15 and per[(2, "val")] == 3 and per[(3, "val")] == 2
    assert per[(0, "train")] == 70 and per[(3, "train")] == 5


def test_test_fraction_and_disjoint():
    labels = [i % 4 for i in range(200)]
    splits = stratified_split(labels, val_fraction=0.2, test_fraction=0.1, seed=0)
    c = Counter(splits)
    assert c == {"train": 140, "val": 40, "test": 20}
    # one split per item -> train/val/test are disjoint by construction; check no index appears twice
    assert len(splits) == len(labels)


def test_deterministic_per_seed():
    labels = [i % 3 for i in range(90)]
    assert stratified_split(labels, seed=5) == stratified_split(labels, seed=5)
    assert stratified_split(labels, seed=5) != stratified_split(labels, seed=6)


def test_bad_fractions():
    with pytest.raises(ValueError):
        stratified_split([0, 1], val_fraction=0.7, test_fraction=0.4)


def test_manifest_round_trip(demo_root: Path, tmp_path: Path):
    records = scan_dataset(demo_root, with_masks=True)
    splits = stratified_split([r.label for r in records], seed=3)
    path = write_manifest(tmp_path / "split.csv", records, splits, demo_root)
    records2, splits2 = read_manifest(path, demo_root)
    assert records2 == records and splits2 == splits
    train = {r.path for r, s in zip(records2, splits2) if s == "train"}
    val = {r.path for r, s in zip(records2, splits2) if s == "val"}
    assert train and val and not train & val


def test_balanced_sampler_draws_each_class_equally_seeded_per_epoch(tmp_path):
    root = make_demo_dataset(tmp_path / "demo", n_per_class=40)
    # drop most Viral Pneumonia images: 4 of 40 left, a 10x minority
    for path in sorted((root / "Viral Pneumonia" / "images").glob("*.png"))[4:]:
        path.unlink()
        (root / "Viral Pneumonia" / "masks" / path.name).unlink()
    dm = RadiographyDataModule(root=str(root), image_size=32, val_fraction=0.25, balance="sampler", num_workers=0)
    dm.setup("fit")
    loader = dm.train_dataloader()
    labels = [r.label for r in dm.records["train"]]
    first = [i % len(labels) for i in loader.sampler]
    assert len(first) == len(labels)  # an epoch is as long as the train split
    drawn = Counter(labels[i] for i in first)
    assert min(drawn.values()) > 0.5 * len(labels) / 4  # the 3-image class is drawn about a quarter of the time
    assert [i % len(labels) for i in loader.sampler] == first  # same epoch, same draw
    plain = RadiographyDataModule(root=str(root), image_size=32, val_fraction=0.25, num_workers=0)
    plain.setup("fit")
    assert sorted(i % len(labels) for i in plain.train_dataloader().sampler) == list(range(len(labels)))
    with pytest.raises(DatasetError, match="balance sampler"):
        RadiographyDataModule(streaming=str(tmp_path / "stream"), balance="sampler")
