"""The synthetic demo dataset: Kaggle layout, determinism, reuse, plausible masks, learnable classes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from covid_lightning.constants import CLASSES as DEMO_CLASSES
from covid_lightning.constants import DATASET_DIRNAME
from covid_lightning.data.demo import (
    MARKER_NAME,
    default_demo_dir,
    is_demo_dataset,
    make_demo_dataset,
    synthesize_xray,
)

N_SMALL = 6
# round(0.34 * 6) = 2 RGB images per class: both modes are guaranteed.
RGB_FRACTION = 0.34


@pytest.fixture(scope="module")
def small_demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_demo_dataset(tmp_path_factory.mktemp("demo"), n_per_class=N_SMALL, rgb_fraction=RGB_FRACTION)


def _files(dataset: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(dataset)): p.read_bytes()
        for p in sorted(dataset.rglob("*"))
        if p.is_file() and p.name != MARKER_NAME
    }


def test_layout_sizes_and_modes(small_demo: Path) -> None:
    assert small_demo.name == DATASET_DIRNAME
    assert (small_demo / "README.md.txt").is_file()
    assert "synthetic" in (small_demo / "README.md.txt").read_text().lower()
    assert sorted(p.name for p in small_demo.iterdir() if p.is_dir()) == sorted(DEMO_CLASSES)
    modes: dict[str, int] = {}
    for name in DEMO_CLASSES:
        images = sorted(p.name for p in (small_demo / name / "images").iterdir())
        masks = sorted(p.name for p in (small_demo / name / "masks").iterdir())
        assert images == sorted(f"{name}-{i}.png" for i in range(1, N_SMALL + 1))
        assert masks == images
        for file_name in images:
            with Image.open(small_demo / name / "images" / file_name) as im:
                assert im.format == "PNG" and im.size == (299, 299)
                assert im.mode in ("L", "RGB")
                modes[im.mode] = modes.get(im.mode, 0) + 1
                if im.mode == "RGB":
                    a = np.asarray(im)
                    assert np.array_equal(a[..., 0], a[..., 1]) and np.array_equal(a[..., 0], a[..., 2])
            with Image.open(small_demo / name / "masks" / file_name) as m:
                assert m.format == "PNG" and m.size == (256, 256) and m.mode == "RGB"
                a = np.asarray(m)
                assert set(np.unique(a).tolist()) == {0, 255}
                assert np.array_equal(a[..., 0], a[..., 1]) and np.array_equal(a[..., 0], a[..., 2])
    assert modes["RGB"] == 4 * round(RGB_FRACTION * N_SMALL)
    assert modes["L"] == 4 * N_SMALL - modes["RGB"]
    assert is_demo_dataset(small_demo) and is_demo_dataset(small_demo.parent)


def test_scanner_reads_the_demo(small_demo: Path) -> None:
    scan = pytest.importorskip("covid_lightning.data.scan")
    records = scan.scan_dataset(small_demo.parent, with_masks=True)
    assert len(records) == 4 * N_SMALL
    assert all(r.mask_path is not None for r in records)


def test_deterministic_and_reused(tmp_path: Path) -> None:
    a = make_demo_dataset(tmp_path / "a", n_per_class=3, seed=5, rgb_fraction=0.34)
    b = make_demo_dataset(tmp_path / "b", n_per_class=3, seed=5, rgb_fraction=0.34)
    files_a = _files(a)
    assert len(files_a) == 1 + 4 * 3 * 2
    assert files_a == _files(b)
    marker = json.loads((a / MARKER_NAME).read_text())
    assert marker["n_per_class"] == 3 and marker["seed"] == 5 and "version" in marker

    # Same arguments: a no-op, nothing rewritten.
    stamps = {p: p.stat().st_mtime_ns for p in a.rglob("*")}
    inodes = {p: p.stat().st_ino for p in a.rglob("*")}
    assert make_demo_dataset(tmp_path / "a", n_per_class=3, seed=5, rgb_fraction=0.34) == a
    assert {p: p.stat().st_mtime_ns for p in a.rglob("*")} == stamps
    assert {p: p.stat().st_ino for p in a.rglob("*")} == inodes

    # Another seed regenerates with other pixels; more images replace the old set completely.
    make_demo_dataset(tmp_path / "a", n_per_class=3, seed=6, rgb_fraction=0.34)
    files_c = _files(a)
    assert files_c.keys() == files_a.keys() and files_c != files_a
    make_demo_dataset(tmp_path / "a", n_per_class=2, seed=6, rgb_fraction=0.34)
    assert len(list((a / "COVID" / "images").iterdir())) == 2
    assert json.loads((a / MARKER_NAME).read_text())["n_per_class"] == 2
    # overwrite=True rewrites even when everything matches; the content stays the same.
    before = _files(a)
    make_demo_dataset(tmp_path / "a", n_per_class=2, seed=6, rgb_fraction=0.34, overwrite=True)
    assert _files(a) == before
    # Only the dataset folder is left in the root: no partial or old copies.
    assert [p.name for p in (tmp_path / "a").iterdir()] == [DATASET_DIRNAME]


def test_stale_or_damaged_demo_is_regenerated(tmp_path: Path) -> None:
    ds = make_demo_dataset(tmp_path, n_per_class=2)
    marker = json.loads((ds / MARKER_NAME).read_text())
    marker["version"] = -1
    (ds / MARKER_NAME).write_text(json.dumps(marker))
    make_demo_dataset(tmp_path, n_per_class=2)
    assert json.loads((ds / MARKER_NAME).read_text())["version"] != -1
    (ds / "Normal" / "images" / "Normal-1.png").unlink()
    make_demo_dataset(tmp_path, n_per_class=2)
    assert (ds / "Normal" / "images" / "Normal-1.png").is_file()


def test_accepts_dataset_folder_and_refuses_foreign_data(tmp_path: Path) -> None:
    ds = make_demo_dataset(tmp_path / DATASET_DIRNAME, n_per_class=1)
    assert ds == tmp_path / DATASET_DIRNAME
    real = tmp_path / "real" / DATASET_DIRNAME / "COVID" / "images"
    real.mkdir(parents=True)
    (real / "COVID-1.png").write_bytes(b"not ours")
    with pytest.raises(FileExistsError):
        make_demo_dataset(tmp_path / "real", n_per_class=1, overwrite=True)
    assert (real / "COVID-1.png").read_bytes() == b"not ours"


def test_interrupted_generation_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import covid_lightning.data.demo as demo

    real = demo.synthesize_xray
    calls = {"n": 0}

    def crash_after_five(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 5:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(demo, "synthesize_xray", crash_after_five)
    with pytest.raises(KeyboardInterrupt):
        make_demo_dataset(tmp_path, n_per_class=3)
    assert list(tmp_path.iterdir()) == []  # no dataset folder, no partial copy
    monkeypatch.setattr(demo, "synthesize_xray", real)
    assert is_demo_dataset(make_demo_dataset(tmp_path, n_per_class=3))


def test_stale_partial_copies_are_cleaned(tmp_path: Path) -> None:
    stale = tmp_path / f".{DATASET_DIRNAME}.partial-1-dead"
    (stale / "COVID" / "images").mkdir(parents=True)
    fresh = tmp_path / f".{DATASET_DIRNAME}.partial-2-live"
    fresh.mkdir()
    old = 1_000_000_000
    for p in (stale / "COVID" / "images", stale):
        os.utime(p, (old, old))
    make_demo_dataset(tmp_path, n_per_class=1)
    assert not stale.exists()
    assert fresh.exists()  # may belong to a generation still running


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        make_demo_dataset(tmp_path, n_per_class=0)
    with pytest.raises(ValueError):
        make_demo_dataset(tmp_path, rgb_fraction=1.5)


def test_default_dir_honours_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("COVID_LIGHTNING_DEMO_DIR", str(tmp_path / "x"))
    assert default_demo_dir() == tmp_path / "x"
    monkeypatch.delenv("COVID_LIGHTNING_DEMO_DIR")
    assert default_demo_dir() == Path.home() / ".cache" / "covid_lightning" / "demo"


def _load(dataset: Path, name: str, i: int) -> tuple[np.ndarray, np.ndarray]:
    image = np.asarray(Image.open(dataset / name / "images" / f"{name}-{i}.png").convert("L"))
    mask = np.asarray(Image.open(dataset / name / "masks" / f"{name}-{i}.png").convert("L"))
    return image, mask


def test_masks_are_plausible_lungs_aligned_with_dark_fields(small_demo: Path) -> None:
    for name in DEMO_CLASSES:
        for i in range(1, N_SMALL + 1):
            image, mask = _load(small_demo, name, i)
            lung = mask > 0
            assert 0.10 <= lung.mean() <= 0.45
            # Two lung fields (the heart does not split one in two, nothing is fragmented).
            n_components, _ = cv2.connectedComponents(lung.astype(np.uint8))
            assert n_components - 1 == 2
            # Resized to the mask size, the image is darker inside the lungs than in the body around them.
            small = cv2.resize(image, (256, 256), interpolation=cv2.INTER_AREA).astype(np.float32)
            ring = cv2.dilate(lung.astype(np.uint8), np.ones((25, 25), np.uint8)) > 0
            inside, around = small[lung].mean(), small[ring & ~lung].mean()
            assert inside < around - 10, (name, i, inside, around)


def test_mask_geometry_matches_the_image_at_any_size() -> None:
    """The 256 mask, resized to 299, overlaps the lungs drawn at 299 (same rng -> same anatomy)."""
    for label in range(len(DEMO_CLASSES)):
        _, mask = synthesize_xray(label, np.random.default_rng((9, label)))
        _, mask_299 = synthesize_xray(label, np.random.default_rng((9, label)), mask_size=299)
        resized = cv2.resize(mask, (299, 299), interpolation=cv2.INTER_NEAREST) > 0
        iou = (resized & (mask_299 > 0)).sum() / (resized | (mask_299 > 0)).sum()
        assert iou > 0.95


def test_synthesize_xray_shapes_and_label_check() -> None:
    image, mask = synthesize_xray(2, np.random.default_rng(0), image_size=128, mask_size=64)
    assert image.shape == (128, 128) and image.dtype == np.uint8
    assert mask.shape == (64, 64) and set(np.unique(mask).tolist()) == {0, 255}
    with pytest.raises(ValueError):
        synthesize_xray(4, np.random.default_rng(0))


def _lung_features(image: np.ndarray, mask: np.ndarray) -> list[float]:
    """Contrast-normalised intensity statistics inside the (eroded) lung mask."""
    lung = cv2.resize(mask, image.shape[::-1], interpolation=cv2.INTER_NEAREST) > 0
    lung = cv2.erode(lung.astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
    lo, hi = np.percentile(image, [2, 98])
    z = ((image.astype(np.float32) - lo) / (hi - lo + 1e-6)).astype(np.float32)
    detail = np.abs(cv2.Laplacian(z, cv2.CV_32F, ksize=3))
    left = np.zeros_like(lung)
    left[:, : lung.shape[1] // 2] = True
    asymmetry = abs(z[lung & left].mean() - z[lung & ~left].mean())
    return [
        z[lung].mean(),
        z[lung].std(),
        detail[lung].mean(),
        asymmetry,
        np.percentile(z[lung], 95) - np.median(z[lung]),
    ]


def test_classes_are_separable_by_simple_lung_features(tmp_path: Path) -> None:
    n = 20
    ds = make_demo_dataset(tmp_path, n_per_class=n, seed=123)
    feats, labels, index = [], [], []
    for label, name in enumerate(DEMO_CLASSES):
        for i in range(1, n + 1):
            feats.append(_lung_features(*_load(ds, name, i)))
            labels.append(label)
            index.append(i)
    x, y, idx = np.asarray(feats), np.asarray(labels), np.asarray(index)
    train, test = idx <= n // 2, idx > n // 2
    mu, sd = x[train].mean(0), x[train].std(0) + 1e-9
    z = (x - mu) / sd
    centroids = np.stack([z[train & (y == c)].mean(0) for c in range(len(DEMO_CLASSES))])
    pred = np.argmin(((z[test][:, None] - centroids[None]) ** 2).sum(-1), axis=1)
    accuracy = float((pred == y[test]).mean())
    assert accuracy >= 0.6, f"nearest-centroid accuracy {accuracy:.2f} (chance 0.25)"


def test_no_global_pixel_giveaway() -> None:
    """Whole-image pixel templates (32x32 nearest centroid) do not solve it: the cue is inside the lungs."""
    n = 12
    x, y, idx = [], [], []
    for label in range(len(DEMO_CLASSES)):
        for i in range(1, n + 1):
            image, _ = synthesize_xray(label, np.random.default_rng((0, label, i)))
            small = cv2.resize(image, (32, 32), interpolation=cv2.INTER_AREA).astype(np.float32).ravel()
            x.append((small - small.mean()) / small.std())
            y.append(label)
            idx.append(i)
    x, y, idx = np.asarray(x), np.asarray(y), np.asarray(idx)
    train, test = idx <= n // 2, idx > n // 2
    centroids = np.stack([x[train & (y == c)].mean(0) for c in range(len(DEMO_CLASSES))])
    pred = np.argmin(((x[test][:, None] - centroids[None]) ** 2).sum(-1), axis=1)
    assert float((pred == y[test]).mean()) < 0.9
