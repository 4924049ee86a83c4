"""Your own data: a manifest (path, label, mask_path, split, group) produces the same records as the Kaggle layout;
screening, splitting, datasets, streaming, check-data and the CLI (the head sized from the data's classes) follow."""

from __future__ import annotations

import csv
import json
import logging
import shutil
from pathlib import Path

import pytest
import torch

from covid_lightning import LungSegmentationDataModule, RadiographyDataModule
from covid_lightning.cli import main
from covid_lightning.data.scan import CLASSES, DatasetError, read_records, scan_dataset, scan_manifest
from covid_lightning.data.split import merge_groups

REPO = Path(__file__).resolve().parents[2]
TINY = [
    "--data.image_size", "32", "--data.batch_size", "4", "--data.num_workers", "0", "--trainer.max_epochs", "1",
    "--trainer.limit_train_batches", "1", "--trainer.limit_val_batches", "1", "--trainer.limit_predict_batches", "1",
    "--trainer.enable_progress_bar", "false", "--model.compile_model", "false",
]  # fmt: skip


@pytest.fixture(autouse=True)
def _env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Inspection and decode caches in the test's folder; one torch thread (tiny runs on shared cores)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write_csv(path: Path, rows: list[dict[str, str]], columns: list[str] | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = columns or list(rows[0])
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    return path


@pytest.fixture
def own_data(demo_root: Path, tmp_path: Path) -> Path:
    """The 32 demo X-rays (and their masks) copied to ``data/images`` and ``data/masks``: no Kaggle layout."""
    data = tmp_path / "data"
    for r in scan_dataset(demo_root, with_masks=True):
        for src, kind in ((r.path, "images"), (r.mask_path, "masks")):
            (data / kind).mkdir(parents=True, exist_ok=True)
            shutil.copy(src, data / kind / src.name)
    return data


def _images(data: Path) -> list[Path]:
    return sorted((data / "images").glob("*.png"))


def test_relative_paths_resolve_against_the_manifest_folder(own_data: Path, tmp_path: Path, caplog):
    """``../images/x.png`` from a sub-folder, a path below it and an absolute path: one source of records."""
    images = _images(own_data)
    (own_data / "lists" / "more").mkdir(parents=True)
    shutil.move(images[0], own_data / "lists" / "more" / images[0].name)
    rows = [{"path": f"more/{images[0].name}", "label": "Normal"}, {"path": str(images[1]), "label": "COVID"}]
    rows += [{"path": f"../images/{p.name}", "label": ["COVID", "Normal"][i % 2]} for i, p in enumerate(images[2:])]
    manifest = write_csv(own_data / "lists" / "m.csv", rows)
    source = read_records(manifest)
    assert source.class_names == ("COVID", "Normal") and source.base == (own_data / "lists").resolve()
    assert all(r.path.is_file() for r in source.records) and source.splits is None
    assert [r.class_name for r in source.records[:2]] == ["Normal", "COVID"] and source.records[0].label == 1
    with caplog.at_level(logging.INFO):
        dm = RadiographyDataModule(root="/no/such/dataset", manifest=str(manifest), image_size=32, num_workers=0)
        dm.setup("fit")
    assert "data.root /no/such/dataset is not used" in caplog.text
    assert dm.class_names == ("COVID", "Normal") and sum(len(v) for v in dm.records.values()) == 32
    assert dm.datasets["val"][0]["image"].shape == (3, 32, 32)
    assert dm.class_counts == {"COVID": 11, "Normal": 11}  # 70 % of 16 per class


def test_the_kaggle_classes_keep_their_order_through_a_manifest(demo_root: Path, tmp_path: Path):
    """The Kaggle four sorted are the canonical order: a manifest over the Kaggle data labels as the folders do."""
    folder = scan_dataset(demo_root)
    rows = [{"path": str(r.path), "label": r.class_name} for r in folder]
    source = scan_manifest(write_csv(tmp_path / "m.csv", rows))
    assert source.class_names == CLASSES and source.records == folder


def _patients(images: list[Path], per_patient: int = 2) -> list[dict[str, str]]:
    return [
        {"path": f"images/{p.name}", "label": f"class{i % 3}", "group": f"patient{i // per_patient}"}
        for i, p in enumerate(images)
    ]


def _split_of(dm) -> dict[str, str]:
    return {r.path.name: split for split, records in dm.records.items() for r in records}


def test_group_keeps_each_patient_in_one_split(own_data: Path):
    rows = _patients(_images(own_data))
    kw = dict(image_size=32, num_workers=0, val_fraction=0.25, test_fraction=0.25, seed=1)
    grouped = RadiographyDataModule(manifest=str(write_csv(own_data / "grouped.csv", rows)), **kw)
    grouped.setup("fit")
    plain = RadiographyDataModule(manifest=str(write_csv(own_data / "plain.csv", rows, ["path", "label"])), **kw)
    plain.setup("fit")
    for dm, crossing in ((grouped, False), (plain, True)):
        split = _split_of(dm)
        spans = {}
        for row in rows:
            spans.setdefault(row["group"], set()).add(split[Path(row["path"]).name])
        assert any(len(s) > 1 for s in spans.values()) is crossing, spans
    assert all(len(v) > 0 for v in grouped.records.values())


def test_patient_and_duplicate_groups_are_joined():
    # items 0 and 3 are duplicates; 0 and 2 one patient, 3 and 4 another: 0, 2, 3, 4 in one group
    assert merge_groups([0, 1, 2, 0, 3, 4], ["a", "b", "a", "c", "c", None]) == [0, 1, 0, 0, 0, 2]
    assert merge_groups([0, 1, 0, 2], [None] * 4) == [0, 1, 0, 2]


def test_a_given_split_is_used_as_is(own_data: Path, caplog):
    images = _images(own_data)
    rows = [
        {"path": f"images/{p.name}", "label": f"c{i % 2}", "split": ["train", "train", "val", "test"][i % 4],
         "group": "same" if i in (0, 2) else ""}
        for i, p in enumerate(images)
    ]  # fmt: skip
    with caplog.at_level(logging.WARNING):
        dm = RadiographyDataModule(manifest=str(write_csv(own_data / "m.csv", rows)), image_size=32, num_workers=0)
        dm.setup("fit")
    assert _split_of(dm) == {Path(r["path"]).name: r["split"] for r in rows}
    assert "puts 1 group(s) in more than one split" in caplog.text  # used as given, but said


@pytest.mark.parametrize(
    ("rows", "columns", "message"),
    [
        ([{"path": "images/a.png"}], ["path"], r"lacks the column\(s\) label that classification needs"),
        ([{"path": "images/a.png", "label": ""}], None, r"m\.csv line 2: images/a\.png has no label"),
        ([{"path": "", "label": "x"}], None, r"m\.csv line 2: empty path"),
        ([{"path": "images/a.png", "label": "x", "split": "training"}], None, r"line 2: split 'training'"),
        ([{"path": "images/a.png", "label": "x"}] * 2, None, r"line 3: images/a\.png is listed twice \(first at"),
        ([{"path": "nowhere/a.png", "label": "x"}], None, r"None of the 1 images listed in .*m\.csv exists"),
    ],
    ids=["no label column", "empty label", "empty path", "bad split", "listed twice", "nothing exists"],
)
def test_a_malformed_manifest_is_named(own_data: Path, rows, columns, message):
    shutil.copy(_images(own_data)[0], own_data / "images" / "a.png")
    manifest = write_csv(own_data / "m.csv", rows, columns)
    with pytest.raises(DatasetError, match=message):
        RadiographyDataModule(manifest=str(manifest), num_workers=0).setup("fit")


def test_missing_and_bad_files_are_named_or_skipped(own_data: Path, caplog):
    images = _images(own_data)
    images[3].write_bytes(b"not a png")
    rows = [{"path": f"images/{p.name}", "label": "x"} for p in images] + [{"path": "images/gone.png", "label": "x"}]
    manifest = str(write_csv(own_data / "m.csv", rows))
    with pytest.raises(DatasetError, match=r"(?s)2 unreadable file\(s\):.*gone\.png: cannot open"):
        RadiographyDataModule(manifest=manifest, num_workers=0).setup("fit")
    with caplog.at_level(logging.WARNING):
        dm = RadiographyDataModule(manifest=manifest, num_workers=0, on_bad_file="skip")
        dm.setup("fit")
    assert "Skipped 2 unreadable file(s)" in caplog.text and sum(len(v) for v in dm.records.values()) == 31


def test_parquet_needs_pandas_or_reads(own_data: Path):
    rows = [{"path": f"images/{p.name}", "label": "x"} for p in _images(own_data)]
    try:
        import pandas as pd

        pd.DataFrame(rows).to_parquet(own_data / "m.parquet")
    except ImportError:
        (own_data / "m.parquet").write_bytes(b"PAR1")
        with pytest.raises(DatasetError, match="needs pandas and pyarrow.*or save it as CSV"):
            scan_manifest(own_data / "m.parquet")
        return
    assert [r.path for r in scan_manifest(own_data / "m.parquet").records] == _images(own_data)


def test_segmentation_manifest(own_data: Path, caplog):
    images = _images(own_data)
    rows = [{"path": f"images/{p.name}", "mask_path": f"masks/{p.name}" if i % 8 else ""} for i, p in enumerate(images)]
    with caplog.at_level(logging.WARNING):
        dm = LungSegmentationDataModule(manifest=str(write_csv(own_data / "m.csv", rows)), image_size=32, num_workers=0)
        dm.setup("fit")
    assert "Skipped 4 row(s)" in caplog.text and "without a mask_path" in caplog.text
    sample = dm.datasets["train"][0]
    assert sample["mask"].shape == (1, 32, 32) and 0 < sample["mask"].mean() < 1
    with pytest.raises(DatasetError, match="lacks the column.*mask_path that segmentation needs"):
        LungSegmentationDataModule(manifest=str(write_csv(own_data / "c.csv", rows, ["path"]))).setup("fit")


def test_check_data_on_a_manifest(own_data: Path, tmp_path: Path, capsys):
    images = _images(own_data)
    rows = [
        {"path": f"images/{p.name}", "label": f"c{i % 5}", "mask_path": f"masks/{p.name}", "group": f"p{i // 4}"}
        for i, p in enumerate(images)
    ]
    manifest = write_csv(own_data / "m.csv", rows)
    out = tmp_path / "report.json"
    assert main(["check-data", str(manifest), "--json", str(out), "--workers", "1"]) == 0
    text = capsys.readouterr().out
    assert f"Manifest: {manifest}" in text and "Patient groups: 8" in text and "Trainable: yes" in text
    report = json.loads(out.read_text())
    assert report["class_names"] == ["c0", "c1", "c2", "c3", "c4"]
    assert report["classes"]["c0"] == {"images": 7, "masks": 7, "pairs": 7, "unpaired_images": 0, "orphan_masks": 0}
    assert report["images"]["readable"] == 32 and report["masks"]["readable"] == 32
    images[5].write_bytes(b"garbage")
    assert main(["check-data", str(manifest), "--workers", "1"]) == 1
    text = capsys.readouterr().out
    assert f"images/{images[5].name} (image): not an image" in text and "Trainable: NO" in text
    assert main(["check-data", str(tmp_path / "nope.csv")]) == 2


def test_streaming_takes_a_manifest(own_data: Path, tmp_path: Path):
    pytest.importorskip("litdata")
    from covid_lightning.data.streaming import optimize, read_meta

    rows = [{"path": f"images/{p.name}", "label": f"c{i % 5}"} for i, p in enumerate(_images(own_data))]
    manifest = write_csv(own_data / "m.csv", rows)
    out = tmp_path / "stream"
    assert optimize(manifest, out, val_fraction=0.25) == 0
    meta = read_meta(out)
    assert sum(meta["counts"].values()) == 32
    assert meta["classes"] == ["c0", "c1", "c2", "c3", "c4"] and meta["masks"] is False
    dm = RadiographyDataModule(streaming=str(out), image_size=32, num_workers=0)
    assert dm.class_names == ("c0", "c1", "c2", "c3", "c4")
    dm.setup("fit")
    assert set(dm.class_counts) == set(meta["classes"])
    with pytest.raises(DatasetError, match="two data sources.*covid-lightning optimize"):
        RadiographyDataModule(streaming=str(out), manifest=str(manifest))


@pytest.fixture
def five_classes(own_data: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A 5-class manifest of PNGs and DICOMs (every fourth image a MONOCHROME1 12-bit DICOM), and a folder of
    images to predict (PNG and DICOM)."""
    pytest.importorskip("pydicom")
    from tests.helpers.dicom import dicom_from_png

    rows = []
    for i, png in enumerate(_images(own_data)):
        path = png
        if i % 4 == 0:
            path = dicom_from_png(png, png.with_suffix(".dcm"), photometric="MONOCHROME1", rescale=(1.0, 0.0))
        rows.append({"path": f"images/{path.name}", "label": f"finding_{i % 5}", "group": f"patient{i // 2}"})
    predict = tmp_path / "to_predict"
    predict.mkdir()
    for row in rows[:3]:
        shutil.copy(own_data / row["path"], predict)
    return write_csv(own_data / "manifest.csv", rows), predict


def test_five_classes_fit_and_predict_through_the_cli(five_classes: tuple[Path, Path], tmp_path: Path, capsys):
    """The real entry point: the head has 5 outputs, named by the manifest's labels; predict writes 5 columns and
    reads DICOMs; a checkpoint is refused, naming both sides, against data of other classes."""
    manifest, predict = five_classes
    config = str(REPO / "configs/demo/classification.yaml")
    root = tmp_path / "runs"
    common = ["--config", config, *TINY, "--trainer.default_root_dir", str(root)]
    code = main(["fit", *common, "--model.pretrained", "false", "--data.manifest", str(manifest),
                 "--data.val_fraction", "0.25", "--data.cache_images", "memory"])  # fmt: skip
    out, err = capsys.readouterr()
    assert code == 0, err[-3000:]
    run = root / "demo_classification" / "version_0"
    assert f"Run folder: {run}" in out
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    names = [f"finding_{k}" for k in range(5)]
    assert ckpt["hyper_parameters"]["class_names"] == names and ckpt["hyper_parameters"]["num_classes"] == 5
    head = [v for k, v in ckpt["state_dict"].items() if k.startswith("net.head.") and k.endswith(".weight")][-1]
    assert head.shape[0] == 5
    with (run / "split.csv").open(newline="") as f:
        split = list(csv.DictReader(f))
    assert {r["class_name"] for r in split} == set(names) and all(r["path"].startswith("images/") for r in split)
    assert sum(r["path"].endswith(".dcm") for r in split) == 8
    by_patient: dict[str, set[str]] = {}
    with manifest.open(newline="") as f:
        patient = {r["path"]: r["group"] for r in csv.DictReader(f)}
    for r in split:
        by_patient.setdefault(patient[r["path"]], set()).add(r["split"])
    assert all(len(s) == 1 for s in by_patient.values())
    again = RadiographyDataModule(manifest=str(manifest), split_file=str(run / "split.csv"), num_workers=0)
    again.setup("fit")  # the run's split.csv reused over the same manifest
    assert {r.path.name: s for s, rs in again.records.items() for r in rs} == {
        Path(r["path"]).name: r["split"] for r in split
    }

    code = main(["predict", *common, "--data.manifest", str(manifest), "--ckpt_path", "last",
                 "--data.predict_root", str(predict)])  # fmt: skip
    out, err = capsys.readouterr()
    assert code == 0, err[-3000:]
    written = next((root / "demo_classification" / "predict").rglob("predictions.csv"))
    with written.open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["path", "predicted", *names] and len(rows) == 3
    assert any(r["path"].endswith(".dcm") for r in rows) and all(r["predicted"] in names for r in rows)

    code = main(["predict", *common, "--ckpt_path", "last", "--data.predict_root", str(predict)])
    err = capsys.readouterr().err
    assert code == 2 and "num_classes 5 (finding_0" in err and "num_classes 4 (COVID" in err, err[-3000:]


def test_segmentation_fit_and_validate_through_the_cli(own_data: Path, tmp_path: Path, capsys):
    """The class-names link skips the segmenter (its data has no class_names): its checkpoint holds no classes."""
    rows = [{"path": f"images/{p.name}", "mask_path": f"masks/{p.name}"} for p in _images(own_data)]
    manifest = write_csv(own_data / "seg.csv", rows)
    common = ["--config", str(REPO / "configs/demo/segmentation.yaml"), *TINY[:-2], "--data.manifest", str(manifest),
              "--trainer.default_root_dir", str(tmp_path / "runs")]  # fmt: skip
    code = main(["fit", *common])
    out, err = capsys.readouterr()
    assert code == 0, err[-3000:]
    assert "best val/dice" in out
    ckpt = torch.load(tmp_path / "runs/demo_segmentation/version_0/checkpoints/last.ckpt", weights_only=True)
    assert "class_names" not in ckpt["hyper_parameters"] and "num_classes" not in ckpt["hyper_parameters"]
    code = main(["validate", *common, "--ckpt_path", "last"])
    out, err = capsys.readouterr()
    assert code == 0 and "val/dice" in out, err[-3000:]


def test_lung_masks_of_a_manifest(own_data: Path, segmenter_ckpt: Path):
    """``lung_segmenter`` computes the masks of the manifest's images (not of a data.root)."""
    from covid_lightning.lungs import attach_lung_masks

    rows = [{"path": f"images/{p.name}", "label": f"c{i % 2}"} for i, p in enumerate(_images(own_data))]
    manifest = write_csv(own_data / "m.csv", rows)
    dm = RadiographyDataModule(
        manifest=str(manifest), lung_segmenter=str(segmenter_ckpt), image_size=32, num_workers=0, lung_roi="mask"
    )
    folder = attach_lung_masks(dm, segmenter_ckpt, stage="fit")
    assert len(list(Path(folder).rglob("*.png"))) == 32
    dm.setup("fit")
    assert dm.datasets["train"][0]["image"].shape == (3, 32, 32)
