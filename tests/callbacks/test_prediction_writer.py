"""PredictionWriter: CSVs, original-size masks, Grad-CAM and contour figures, gathering the ranks, the CLI path."""

from __future__ import annotations

import csv
import sys
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

from covid_lightning import LungSegmentationDataModule, LungSegmenter, RadiographyDataModule, XRayClassifier
from covid_lightning import gradcam as gradcam_module
from covid_lightning.callbacks import prediction_writer
from covid_lightning.callbacks.prediction_writer import PredictionWriter
from covid_lightning.inference import classify, segment

REPO = Path(__file__).resolve().parents[2]

#: relative path in the predict folder -> original (H, W)
EXPECTED_SIZES = {
    "COVID/COVID-1.png": (299, 299),
    "COVID/scan two.png": (299, 299),
    "Normal/sub/Normal-1.png": (180, 240),
    "Normal-2.jpg": (299, 299),
    "Normal-2.png": (299, 299),
    "Viral Pneumonia/Viral Pneumonia-1.png": (299, 299),
}


@pytest.fixture(scope="module")
def predict_root(demo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Mixed L/RGB PNGs in sub-folders, a JPEG, a space in a name, a 180x240 image, a name clash, a non-image."""
    root = tmp_path_factory.mktemp("predict_in")

    def src(cls: str, i: int) -> Image.Image:
        return Image.open(demo_root / cls / "images" / f"{cls}-{i}.png")

    def put(rel: str, image: Image.Image) -> None:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        image.save(root / rel)

    put("COVID/COVID-1.png", src("COVID", 1))
    put("COVID/scan two.png", src("COVID", 2).convert("RGB"))
    put("Normal/sub/Normal-1.png", src("Normal", 1).resize((240, 180), Image.BILINEAR))  # (W, H)
    put("Normal-2.jpg", src("Normal", 2).convert("RGB"))
    put("Normal-2.png", src("Normal", 2))  # same stem as the JPEG: the outputs must not clash
    put("Viral Pneumonia/Viral Pneumonia-1.png", src("Viral Pneumonia", 1).convert("RGB"))
    (root / "notes.txt").write_text("not an image")
    return root


def _trainer(tmp_path: Path, writer: PredictionWriter) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        default_root_dir=tmp_path,
        callbacks=[writer],
        enable_progress_bar=False,
        enable_model_summary=False,
    )


def _read(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _titles(monkeypatch: pytest.MonkeyPatch, module: object, name: str) -> list[str]:
    """Record the panel titles of the figures ``module.<name>`` draws (still drawing them)."""
    titles, draw = [], getattr(module, name)

    def spy(*args, **kwargs):
        fig = draw(*args, **kwargs)
        titles.append(fig.axes[0].get_title())
        return fig

    monkeypatch.setattr(module, name, spy)
    return titles


def _assert_figure_png(path: Path) -> None:
    with Image.open(path) as im:  # a titled figure (not the bare image at its own size)
        assert im.mode in ("RGB", "RGBA") and min(im.size) > 300
        assert np.asarray(im.convert("L")).std() > 10


def test_classifier_csv_and_gradcam(classifier_ckpt: Path, predict_root: Path, tmp_path: Path, monkeypatch):
    model = XRayClassifier.load_from_checkpoint(classifier_ckpt)
    dm = RadiographyDataModule(predict_root=str(predict_root), image_size=64, batch_size=4, num_workers=0)
    writer = PredictionWriter(gradcam=True)
    captions = _titles(monkeypatch, gradcam_module, "gradcam_figure")
    _trainer(tmp_path, writer).predict(model, datamodule=dm, return_predictions=False)

    out = tmp_path / "predictions"  # the default: <default_root_dir>/predictions (no logger)
    assert writer.csv_path == out / "predictions.csv"
    rows = _read(out / "predictions.csv")
    assert list(rows[0]) == ["path", "predicted", *model.class_names]
    assert [r["path"] for r in rows] == sorted(EXPECTED_SIZES)  # one row per image, sorted, relative
    for row in rows:
        probs = np.array([float(row[c]) for c in model.class_names])
        assert probs.sum() == pytest.approx(1.0, abs=1e-4)
        assert row["predicted"] == model.class_names[int(probs.argmax())]
        expected = classify(model, predict_root / row["path"])  # same preprocessing as classify()
        assert probs == pytest.approx([expected[c] for c in model.class_names], abs=1e-5)

    overlays = sorted(p.relative_to(out / "gradcam").as_posix() for p in (out / "gradcam").rglob("*.png"))
    assert overlays == sorted(
        ["COVID/COVID-1.png", "COVID/scan two.png", "Normal/sub/Normal-1.png", "Normal-2.jpg.png",
         "Normal-2.png.png", "Viral Pneumonia/Viral Pneumonia-1.png"]
    )  # fmt: skip
    _assert_figure_png(out / "gradcam" / "Normal/sub/Normal-1.png")
    # each figure is captioned with its file name, the CSV's predicted class and that class's probability there
    expected = [f"{Path(r['path']).name}\npredicted {r['predicted']} (p {float(r[r['predicted']]):.3f})" for r in rows]
    assert sorted(captions) == sorted(expected)


def test_segmenter_masks_at_original_size_and_overlays(
    segmenter_ckpt: Path, predict_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    model = LungSegmenter.load_from_checkpoint(segmenter_ckpt)
    dm = LungSegmentationDataModule(predict_root=str(predict_root), image_size=64, batch_size=4, num_workers=0)
    writer = PredictionWriter(output_dir=str(tmp_path / "out"), overlays=True)
    titles = _titles(monkeypatch, prediction_writer, "overlay_figure")
    _trainer(tmp_path, writer).predict(model, datamodule=dm, return_predictions=False)

    out = tmp_path / "out"
    rows = _read(out / "lung_area.csv")
    assert list(rows[0]) == ["path", "mask_path", "lung_fraction"]
    assert [r["path"] for r in rows] == sorted(EXPECTED_SIZES)
    mask_paths = {r["path"]: r["mask_path"] for r in rows}
    assert mask_paths["Normal-2.jpg"] == "masks/Normal-2.jpg.png"  # name clash with Normal-2.png resolved
    assert mask_paths["Normal-2.png"] == "masks/Normal-2.png.png"
    assert mask_paths["COVID/scan two.png"] == "masks/COVID/scan two.png"
    assert len(list((out / "masks").rglob("*.png"))) == len(EXPECTED_SIZES)
    for row in rows:
        with Image.open(out / row["mask_path"]) as im:
            assert im.mode == "L"
            mask = np.asarray(im)
        assert mask.shape == EXPECTED_SIZES[row["path"]]
        assert set(np.unique(mask)) <= {0, 255}
        assert float(row["lung_fraction"]) == pytest.approx((mask == 255).mean(), abs=1e-6)
        # the same mask as the Python API
        expected = segment(model, predict_root / row["path"])
        assert np.mean((mask == 255) != expected) < 1e-3
    # overlays/: the predicted contour on each image, at the mask's relative path, titled with the file name only
    overlays = {p.relative_to(out).as_posix() for p in (out / "overlays").rglob("*.png")}
    assert overlays == {r["mask_path"].replace("masks/", "overlays/", 1) for r in rows}
    empty = {Path(r["path"]).name: float(r["lung_fraction"]) == 0 for r in rows}  # (the demo model finds little)
    assert sorted(titles) == sorted(f"{n}\nno lung predicted" if empty[n] else n for n in empty)
    _assert_figure_png(out / "overlays" / "Normal/sub/Normal-1.png")


def test_multi_rank_epoch_end_gathers_on_rank0(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The writer's DDP path with a stand-in trainer: rank 0 gathers every rank's rows (sorted, repeats once)."""
    parts = [[["z.png", "masks/z.png", "0.5"], ["a 1.png", "masks/a 1.png", "0.25"]],
             [["a 1.png", "masks/a 1.png", "0.25"], ["b/2.png", "masks/b/2.png", "0.75"]]]  # fmt: skip
    monkeypatch.setattr(torch.distributed, "all_gather_object", lambda out, rows: out.__setitem__(slice(None), parts))
    for rank in (1, 0):
        writer = PredictionWriter(output_dir=str(tmp_path))
        writer.out_dir, writer._task, writer._rows = tmp_path, "segmentation", parts[rank]
        writer._header = ["path", "mask_path", "lung_fraction"]
        writer.on_predict_epoch_end(SimpleNamespace(world_size=2, global_rank=rank, is_global_zero=rank == 0), None)
        assert (tmp_path / "lung_area.csv").exists() == (rank == 0)  # only rank 0 writes
    rows = _read(tmp_path / "lung_area.csv")
    assert [r["path"] for r in rows] == ["a 1.png", "b/2.png", "z.png"] and rows[1]["lung_fraction"] == "0.75"
    assert writer.csv_path == tmp_path / "lung_area.csv"


def test_gradcam_needs_a_classifier_and_overlays_a_segmenter(
    classifier_ckpt: Path, segmenter_ckpt: Path, predict_root: Path, tmp_path: Path
):
    model = LungSegmenter.load_from_checkpoint(segmenter_ckpt)
    dm = LungSegmentationDataModule(predict_root=str(predict_root), image_size=64, num_workers=0)
    with pytest.raises(ValueError, match="classifier"):
        _trainer(tmp_path, PredictionWriter(gradcam=True)).predict(model, datamodule=dm, return_predictions=False)
    model = XRayClassifier.load_from_checkpoint(classifier_ckpt)
    dm = RadiographyDataModule(predict_root=str(predict_root), image_size=64, num_workers=0)
    with pytest.raises(ValueError, match="needs a segmenter"):
        _trainer(tmp_path, PredictionWriter(overlays=True)).predict(model, datamodule=dm, return_predictions=False)


def test_lightning_predict_cli(classifier_ckpt: Path, demo_root: Path, predict_root: Path, tmp_path: Path, monkeypatch):
    from covid_lightning.cli import build_cli

    monkeypatch.chdir(tmp_path)  # nothing lands in the repository
    monkeypatch.setattr(sys, "argv", ["lightning"])  # not pytest's arguments
    # LightningCLI reads the model's hyper-parameters back from --ckpt_path (subclass mode needs
    # `_class_path`, which XRayModule.on_save_checkpoint records for checkpoints made in Python too).
    build_cli(
        [
            "predict",
            "--config",
            str(REPO / "configs/demo/classification.yaml"),
            "--ckpt_path",
            str(classifier_ckpt),
            "--data.root",
            str(demo_root),
            "--data.predict_root",
            str(predict_root),
            "--data.num_workers",
            "0",
            "--data.image_size",
            "64",
            "--trainer.logger",
            "false",
            "--trainer.default_root_dir",
            str(tmp_path / "run"),
            "--trainer.enable_progress_bar",
            "false",
        ]
    )
    rows = _read(tmp_path / "run" / "predictions" / "predictions.csv")
    assert [r["path"] for r in rows] == sorted(EXPECTED_SIZES)
    model = XRayClassifier.load_from_checkpoint(classifier_ckpt)
    expected = classify(model, predict_root / rows[0]["path"])
    assert float(rows[0]["COVID"]) == pytest.approx(expected["COVID"], abs=1e-5)
