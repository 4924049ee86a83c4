"""LitData streaming: optimize the demo data, stream it back, get exactly the folder path's records, samples,
batches and validation metrics."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

pytest.importorskip("litdata")

import lightning as L
from litdata import StreamingDataset

from covid_lightning import LungSegmentationDataModule, LungSegmenter, RadiographyDataModule, XRayClassifier
from covid_lightning.cli import main
from covid_lightning.data.datasets import XRayDataset
from covid_lightning.data.scan import DatasetError, find_dataset_root
from covid_lightning.data.split import SPLITS, read_manifest
from covid_lightning.data.streaming import (
    StreamingXRayDataset,
    join_location,
    optimize,
    read_meta,
    streaming_datasets,
    streaming_loader,
)
from covid_lightning.data.transforms import build_transform, eval_transform

SPLIT_ARGS = {"val_fraction": 0.25, "test_fraction": 0.25, "seed": 3}
SIZE = 48


@pytest.fixture(scope="module")
def optimized(demo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("litdata") / "demo"
    assert optimize(demo_root, out, **SPLIT_ARGS) == 0
    assert read_meta(out)["counts"] == {"train": 16, "val": 8, "test": 8}
    return out


@pytest.fixture(scope="module")
def folder_dm(demo_root: Path) -> LungSegmentationDataModule:
    dm = LungSegmentationDataModule(root=str(demo_root), image_size=SIZE, batch_size=4, num_workers=0, **SPLIT_ARGS)
    dm.setup("fit")
    return dm


def _raw_items(url: Path, split: str) -> list[dict]:
    ds = StreamingDataset(str(url / split))
    return [ds[i] for i in range(len(ds))]


def test_records_and_splits_equal_the_datamodules(demo_root: Path, optimized: Path, folder_dm):
    base = find_dataset_root(demo_root)
    cls_dm = RadiographyDataModule(root=str(demo_root), num_workers=0, **SPLIT_ARGS)
    cls_dm.setup("fit")
    group_of = {r.path: g for r, g in zip(cls_dm.selection.screening.records, cls_dm.selection.groups)}
    for split in SPLITS:
        streamed = [(bytes(it["path"]).decode(), it["label"], it["group"]) for it in _raw_items(optimized, split)]
        folder = [(r.path.relative_to(base).as_posix(), r.label, group_of[r.path]) for r in cls_dm.records[split]]
        assert set(streamed) == set(folder) and len(streamed) == len(folder) > 0
        assert streamed == folder  # same order too: scan order within the split
        seg = [(r.path.relative_to(base).as_posix(), r.label) for r in folder_dm.records[split]]
        assert [s[:2] for s in streamed] == seg
    records, splits = read_manifest(optimized / "manifest.csv", base)
    assert {(r.path, s) for r, s in zip(records, splits)} == {(r.path, s) for s in SPLITS for r in cls_dm.records[s]}
    meta = read_meta(optimized)
    assert meta["counts"] == {"train": 16, "val": 8, "test": 8} and meta["masks"] is True
    assert meta["class_counts"]["val"] == {"COVID": 2, "Lung_Opacity": 2, "Normal": 2, "Viral Pneumonia": 2}
    # the stored image is the file itself
    first = _raw_items(optimized, "val")[0]
    assert bytes(first["image"]) == (base / bytes(first["path"]).decode()).read_bytes()


def test_eval_samples_equal_xray_dataset(demo_root: Path, optimized: Path, folder_dm):
    base = find_dataset_root(demo_root)
    for split in SPLITS:
        folder = XRayDataset(folder_dm.records[split], eval_transform(SIZE), masks=True)
        stream = StreamingXRayDataset(optimized, split, eval_transform(SIZE), masks=True, path_root=base)
        for i in range(len(folder)):
            a, b = folder[i], stream[i]
            assert a.keys() == b.keys() == {"image", "mask", "label", "path"}
            assert torch.equal(a["image"], b["image"]) and a["image"].dtype == torch.uint8
            assert torch.equal(a["mask"], b["mask"]) and b["mask"].dtype == torch.float32
            assert (a["label"], a["path"]) == (b["label"], b["path"])
    plain = StreamingXRayDataset(optimized, "val", eval_transform(SIZE))
    assert set(plain[0]) == {"image", "label", "path"} and not Path(plain[0]["path"]).is_absolute()


def test_augmented_samples_follow_seed_epoch_index(optimized: Path, folder_dm):
    records = folder_dm.records["train"]
    folder = XRayDataset(records, build_transform(SIZE, train=True, augment="strong"), masks=True, seed=7)
    stream = StreamingXRayDataset(
        optimized, "train", build_transform(SIZE, train=True, augment="strong"), masks=True, augment_seed=7
    )
    stream.set_epoch(2)  # LitData counts epochs from 1: the folder path's epoch 1
    for i in (0, 5, 15):
        a, b = folder[len(records) + i], stream[i]
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])


def test_pre_resized_dataset_gives_the_same_samples(demo_root: Path, optimized: Path, tmp_path: Path, folder_dm):
    out = tmp_path / "resized"
    optimize(demo_root, out, image_size=SIZE, **SPLIT_ARGS)
    assert read_meta(out)["image_size"] == SIZE
    folder = XRayDataset(folder_dm.records["val"], eval_transform(SIZE), masks=True)
    stream = StreamingXRayDataset(out, "val", eval_transform(SIZE), masks=True)
    for i in range(len(folder)):
        assert torch.equal(folder[i]["image"], stream[i]["image"])
        assert torch.equal(folder[i]["mask"], stream[i]["mask"])
    assert 0 < _chunk_bytes(out / "val") < _chunk_bytes(optimized / "val") / 5


def _chunk_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.bin"))


def test_deterministic_whatever_the_workers(demo_root: Path, optimized: Path, tmp_path: Path):
    again = tmp_path / "again"
    optimize(demo_root, again, **SPLIT_ARGS)
    assert (again / "train" / "chunk-0-0.bin").read_bytes() == (optimized / "train" / "chunk-0-0.bin").read_bytes()
    two = tmp_path / "two_workers"
    optimize(demo_root, two, workers=2, **SPLIT_ARGS)
    assert len(list((two / "train").glob("*.bin"))) == 2
    assert [bytes(it["path"]) for it in _raw_items(two, "train")] == [
        bytes(it["path"]) for it in _raw_items(optimized, "train")
    ]


def test_two_nodes_merge_into_one_index(demo_root: Path, optimized: Path, tmp_path: Path, monkeypatch):
    out = tmp_path / "nodes"
    monkeypatch.setenv("DATA_OPTIMIZER_NUM_NODES", "2")
    for rank in (0, 1):  # on one machine the last node must run last (it merges without waiting)
        monkeypatch.setenv("DATA_OPTIMIZER_NODE_RANK", str(rank))
        optimize(demo_root, out, **SPLIT_ARGS)
    monkeypatch.delenv("DATA_OPTIMIZER_NUM_NODES")
    monkeypatch.delenv("DATA_OPTIMIZER_NODE_RANK")
    index = json.loads((out / "train" / "index.json").read_text())
    assert [c["filename"] for c in index["chunks"]] == ["chunk-0-0.bin", "chunk-1-0.bin"]
    assert [it["path"] for it in _raw_items(out, "train")] == [it["path"] for it in _raw_items(optimized, "train")]


def test_loader_shuffles_train_per_seed_and_keeps_eval_order(optimized: Path):
    def epoch_paths(seed: int, split: str = "train", workers: int = 0) -> list[str]:
        ds = streaming_datasets(optimized, transforms={split: eval_transform(32)}, masks=False, seed=seed)[split]
        return [p for batch in streaming_loader(ds, batch_size=4, num_workers=workers) for p in batch["path"]]

    a, b, c = epoch_paths(1), epoch_paths(1, workers=2), epoch_paths(2)
    assert sorted(a) == sorted(b) == sorted(c) and len(set(a)) == 16
    assert a != sorted(a) and a != c
    assert epoch_paths(1) == a
    val = epoch_paths(1, "val")
    assert val == [bytes(it["path"]).decode() for it in _raw_items(optimized, "val")]


def test_streaming_datasets_splits_and_mask_errors(demo_root: Path, optimized: Path, tmp_path: Path):
    dsets = streaming_datasets(
        optimized, transforms={"train": eval_transform(32), "val": eval_transform(32)}, masks=True, seed=0
    )
    assert set(dsets) == {"train", "val"} and dsets["train"].shuffle and not dsets["val"].shuffle
    out = tmp_path / "no_masks"
    optimize(demo_root, out, masks=False)
    assert read_meta(out)["counts"]["test"] == 0 and not (out / "test").exists()
    assert set(
        streaming_datasets(out, transforms={"val": eval_transform(32), "test": eval_transform(32)}, masks=False, seed=0)
    ) == {"val"}
    with pytest.raises(DatasetError, match="without lung masks"):
        streaming_datasets(out, transforms={"val": eval_transform(32)}, masks=True, seed=0)
    with pytest.raises(DatasetError, match="without lung masks"):
        StreamingXRayDataset(out, "val", eval_transform(32), masks=True)[0]
    with pytest.raises(DatasetError, match="meta.json"):
        read_meta(tmp_path / "nowhere")
    assert join_location("s3://bucket/covid/", "train") == "s3://bucket/covid/train"


class StreamingDM(L.LightningDataModule):
    """What the DataModules' ``streaming`` option amounts to."""

    def __init__(self, url: Path, masks: bool, batch_size: int = 4) -> None:
        super().__init__()
        self.url, self.masks, self.batch_size = url, masks, batch_size

    def setup(self, stage: str | None = None) -> None:
        transforms = {"train": build_transform(SIZE, train=True, augment="light"), "val": eval_transform(SIZE)}
        self.datasets = streaming_datasets(self.url, transforms=transforms, masks=self.masks, seed=42)

    def train_dataloader(self):
        return streaming_loader(self.datasets["train"], self.batch_size)

    def val_dataloader(self):
        return streaming_loader(self.datasets["val"], self.batch_size)


def _trainer(root: Path, **kwargs) -> L.Trainer:
    return L.Trainer(
        default_root_dir=root,
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        limit_train_batches=2,
        **kwargs,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )


@pytest.mark.parametrize("task", ["classifier", "segmenter"])
def test_training_and_validation_metrics_equal_the_folder_path(task, demo_root, optimized, tmp_path):
    torch.manual_seed(0)
    if task == "classifier":
        model_cls, dm_cls, masks = XRayClassifier, RadiographyDataModule, False
        model = XRayClassifier(pretrained=False, trainable="all", image_size=SIZE)
    else:
        model_cls, dm_cls, masks = LungSegmenter, LungSegmentationDataModule, True
        model = LungSegmenter(image_size=SIZE)
    trainer = _trainer(tmp_path, limit_val_batches=0)  # validated below, on both paths
    trainer.fit(model, datamodule=StreamingDM(optimized, masks))
    assert trainer.global_step == 2
    ckpt = tmp_path / "model.ckpt"
    trainer.save_checkpoint(ckpt)

    stream_dm = StreamingDM(optimized, masks)
    stream_dm.setup("validate")
    folder_dm = dm_cls(root=str(demo_root), image_size=SIZE, batch_size=4, num_workers=0, **SPLIT_ARGS)
    folder_dm.setup("validate")
    validator, restored = _trainer(tmp_path), model_cls.load_from_checkpoint(ckpt)
    results = [
        validator.validate(restored, dataloaders=dl)[0]
        for dl in (stream_dm.val_dataloader(), folder_dm.val_dataloader())
    ]
    assert results[0].keys() == results[1].keys() and "val/loss" in results[0]
    assert results[0] == results[1], results  # same batches in the same order: bit-identical


def test_optimize_command_exit_codes(demo_root: Path, tmp_path: Path, capsys):
    out = tmp_path / "cli"
    argv = [str(demo_root), str(out), "--masks", "false", "--val_fraction", "0.25", "--test_fraction", "0.25"]
    assert main(["optimize", *argv, "--seed", "1"]) == 0
    assert "train=16, val=8, test=8" in capsys.readouterr().out
    meta = json.loads((out / "meta.json").read_text())
    assert meta["masks"] is False and meta["split"]["seed"] == 1 and (out / "manifest.csv").is_file()
    assert "DATA_OPTIMIZER_NUM_WORKERS" not in os.environ  # LitData's leak into this process is undone
    assert main(["optimize", str(demo_root), str(out)]) == 2  # already there: a user error
    assert "error: " in (err := capsys.readouterr().err) and "already holds" in err
    assert main(["optimize", str(demo_root), str(out), "--overwrite", "true", "--masks", "true", "--workers", "2"]) == 0
    assert read_meta(out)["masks"] is True and not (out / "test").exists()  # no stale split left behind
    assert main(["optimize", str(tmp_path / "missing"), str(tmp_path / "x")]) == 2
    assert main(["optimize", str(demo_root), str(tmp_path / "y"), "--split_file", str(out / "manifest.csv")]) == 0
    assert read_meta(tmp_path / "y")["counts"] == read_meta(out)["counts"]
    with pytest.raises(SystemExit) as err:
        main(["optimize", str(demo_root)])
    assert err.value.code == 2


def test_datamodule_streaming_option_matches_folder(demo_root, tmp_path):
    """`data.streaming` reads the optimized dataset: same splits and the same eval samples as `data.root`."""
    from covid_lightning import RadiographyDataModule

    optimize(demo_root, tmp_path / "opt")
    folder = RadiographyDataModule(root=str(demo_root), image_size=32, batch_size=4, num_workers=0)
    stream = RadiographyDataModule(streaming=str(tmp_path / "opt"), image_size=32, batch_size=4, num_workers=0)
    folder.setup("fit")
    stream.setup("fit")
    assert stream.class_counts == folder.class_counts
    a, b = next(iter(folder.val_dataloader())), next(iter(stream.val_dataloader()))
    assert [p.split("/")[-1] for p in a["path"]] == [p.split("/")[-1] for p in b["path"]]
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
    assert len(next(iter(stream.train_dataloader()))["image"]) == 4


def test_frozen_regime_config_trains_on_a_stream_with_the_prefix_cached(optimized: Path, tmp_path: Path, caplog):
    """The lab's head_only config (FrozenFeatureCache) on ``data.streaming``: the frozen prefix is computed once
    over the stream and the suffix trains from memory (it used to die inside LitData's loader)."""
    from covid_lightning.callbacks import FrozenFeatureCache
    from covid_lightning.cli import build_cli

    config = Path(__file__).resolve().parents[2] / "configs" / "classification" / "head_only.yaml"
    cli = build_cli(
        ["fit", "--config", str(config), "--data.streaming", str(optimized), "--data.root", "null",
         "--model.pretrained", "false", "--data.image_size", "32", "--data.batch_size", "8",
         "--data.num_workers", "0", "--trainer.max_epochs", "2", "--trainer.enable_progress_bar", "false",
         "--trainer.default_root_dir", str(tmp_path)]
    )  # fmt: skip
    cache = next(c for c in cli.trainer.callbacks if isinstance(c, FrozenFeatureCache))
    assert cache.seconds is not None and cli.trainer.current_epoch == 2
    run = tmp_path / "head_only" / "version_0"
    assert (run / "checkpoints" / "last.ckpt").is_file()
    rows = [r for r in (run / "metrics.csv").read_text().splitlines()[1:] if r]
    assert len(rows) >= 2
