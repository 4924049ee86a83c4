"""DecodedCache: same pixels (and pipeline tensors) as decoding, disk reuse/invalidation, workers."""

from __future__ import annotations

import io
import os
import pickle
import shutil
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from covid_lightning.data import image_cache
from covid_lightning.data.image_cache import DecodedCache, decode_resized
from covid_lightning.data.scan import Record, scan_dataset
from covid_lightning.data.transforms import ImageReadError, build_transform, load_image, load_mask
from tests.helpers.files import rewrite_keeping_size_and_mtime


@pytest.fixture(scope="module")
def records(demo_root: Path) -> list[Record]:
    return scan_dataset(demo_root, with_masks=True)


@pytest.fixture
def data_copy(demo_root: Path, tmp_path: Path) -> list[Record]:
    """A private copy of the demo data (tests that modify files)."""
    root = tmp_path / "data"
    shutil.copytree(demo_root, root)
    return scan_dataset(root, with_masks=True)


def _reference(path: Path, size: int, kind: str) -> np.ndarray:
    """The uncached path, written out independently: decode, then cv2.resize as A.Resize does."""
    if kind == "image":
        array, interpolation = load_image(path), cv2.INTER_LINEAR
    else:
        array, interpolation = load_mask(path), cv2.INTER_NEAREST
    return array if array.shape[:2] == (size, size) else cv2.resize(array, (size, size), interpolation=interpolation)


def _paths(records: list[Record], kind: str) -> list[Path]:
    return [r.path if kind == "image" else r.mask_path for r in records]


def _cache_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


def _build_both(records: list[Record], size: int, storage: str, tmp_path: Path) -> tuple[DecodedCache, DecodedCache]:
    kw = {"storage": storage, "cache_dir": tmp_path / "cache", "workers": 2}
    return (
        DecodedCache.build(_paths(records, "image"), size, kind="image", **kw),
        DecodedCache.build(_paths(records, "mask"), size, kind="mask", **kw),
    )


# --------------------------------------------------------------------------------------------
# Same pixels, same tensors
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("storage", ["memory", "disk"])
@pytest.mark.parametrize("size", [224, 299])  # 299: the images are already that size (A.Resize is a no-op)
def test_same_arrays_as_decode_and_resize(records: list[Record], storage: str, size: int, tmp_path: Path):
    images, masks = _build_both(records, size, storage, tmp_path)
    assert len(images) == len(masks) == len(records) == 32
    assert images.shape == (32, size, size, 3) and masks.shape == (32, size, size)
    assert images.storage == masks.storage == storage
    for i, r in enumerate(records):
        image, mask = images[i], masks[i]
        assert image.dtype == mask.dtype == np.uint8
        np.testing.assert_array_equal(image, _reference(r.path, size, "image"))
        np.testing.assert_array_equal(mask, _reference(r.mask_path, size, "mask"))
        assert set(np.unique(mask)) <= {0, 1}
    np.testing.assert_array_equal(images[-1], images[len(records) - 1])
    with pytest.raises(IndexError):
        images[len(records)]
    # every demo image is gray (L, or RGB with R = G = B): one byte per pixel
    assert images.nbytes == 32 * size * size


@pytest.mark.parametrize("storage", ["memory", "disk"])
@pytest.mark.parametrize(("train", "augment"), [(False, "strong"), (True, "strong"), (True, "acquisition")])
def test_pipeline_gives_the_same_tensors(
    records: list[Record], storage: str, train: bool, augment: str, tmp_path: Path
):
    """build_transform fed cached arrays == fed decoded files, augmentation (same seed) included."""
    size = 224
    images, masks = _build_both(records, size, storage, tmp_path)
    transform = build_transform(size, train=train, augment=augment, intensity="clahe" if train else "none")
    for i, r in enumerate(records):
        transform.set_random_seed(1000 + i)
        a = transform(image=load_image(r.path), mask=load_mask(r.mask_path))
        transform.set_random_seed(1000 + i)
        b = transform(image=images[i], mask=masks[i])
        assert a["image"].shape == (3, size, size) and a["image"].dtype == torch.uint8
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])


@pytest.mark.parametrize("storage", ["memory", "disk"])
def test_color_images_kept_in_full(data_copy: list[Record], storage: str, tmp_path: Path):
    rng = np.random.default_rng(0)
    tinted = data_copy[3].path
    Image.fromarray(rng.integers(0, 256, (299, 299, 3), dtype=np.uint8), "RGB").save(tinted)
    cache = DecodedCache.build(_paths(data_copy, "image"), 224, storage=storage, cache_dir=tmp_path / "c", workers=2)
    assert cache.nbytes == 32 * 224 * 224 * 3  # not every image gray: full RGB rows
    for i, r in enumerate(data_copy):
        np.testing.assert_array_equal(cache[i], _reference(r.path, 224, "image"))
    if storage == "disk":
        clone = pickle.loads(pickle.dumps(cache))
        np.testing.assert_array_equal(clone[3], _reference(tinted, 224, "image"))


def test_items_are_writable_copies(records: list[Record], tmp_path: Path):
    for storage in ("memory", "disk"):
        cache = DecodedCache.build(_paths(records, "image")[:4], 64, storage=storage, cache_dir=tmp_path)
        item = cache[0]
        expected = item.copy()
        item[:] = 7  # an in-place augmentation must not corrupt the cache
        np.testing.assert_array_equal(cache[0], expected)


def test_empty_and_bad_arguments(records: list[Record], tmp_path: Path):
    empty = DecodedCache.build([], 64, storage="disk", cache_dir=tmp_path)
    assert len(empty) == 0 and empty.shape == (0, 64, 64, 3)
    with pytest.raises(ValueError, match="kind"):
        DecodedCache.build(_paths(records, "image"), 64, kind="rgb")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="storage"):
        DecodedCache.build(_paths(records, "image"), 64, storage="gpu")  # type: ignore[arg-type]


def test_bad_file_raises_image_read_error_naming_it(data_copy: list[Record], tmp_path: Path):
    broken = data_copy[5].path
    broken.write_bytes(broken.read_bytes()[:200])  # a truncated PNG
    for storage in ("memory", "disk"):
        with pytest.raises(ImageReadError, match=broken.name):
            DecodedCache.build(_paths(data_copy, "image"), 64, storage=storage, cache_dir=tmp_path / "c", workers=2)
    assert not [n for n in _cache_files(tmp_path / "c") if n.endswith(".npy")]  # nothing committed
    broken.unlink()
    with pytest.raises(ImageReadError, match=broken.name):
        DecodedCache.build(_paths(data_copy, "image"), 64)


# --------------------------------------------------------------------------------------------
# Disk: reuse, invalidation, interrupted builds, default folder
# --------------------------------------------------------------------------------------------


def test_disk_cache_reused_without_decoding(records: list[Record], tmp_path: Path, monkeypatch):
    first = DecodedCache.build(_paths(records, "image"), 128, storage="disk", cache_dir=tmp_path, workers=2)
    files = _cache_files(tmp_path)
    assert files == [first.path.name]

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded again although the cache matches")

    monkeypatch.setattr(image_cache, "decode_resized", no_decoding)
    start = time.perf_counter()
    second = DecodedCache.build(_paths(records, "image"), 128, storage="disk", cache_dir=tmp_path, workers=2)
    reuse_ms = (time.perf_counter() - start) * 1e3
    assert second.key == first.key and second.path == first.path and _cache_files(tmp_path) == files
    for i in range(len(records)):
        np.testing.assert_array_equal(second[i], first[i])
    print(f"\n[image_cache] reopening a 32-image disk cache: {reuse_ms:.1f} ms")
    # another size is another cache (and does decode): the patched decoder fails, naming nothing cached
    with pytest.raises(AssertionError, match="decoded again"):
        DecodedCache.build(_paths(records, "image"), 64, storage="disk", cache_dir=tmp_path, workers=1)


def test_disk_cache_invalidated_when_a_file_changes(data_copy: list[Record], tmp_path: Path):
    cache_dir = tmp_path / "cache"
    paths = _paths(data_copy, "image")
    old = DecodedCache.build(paths, 96, storage="disk", cache_dir=cache_dir, workers=2)
    other_size = DecodedCache.build(paths, 64, storage="disk", cache_dir=cache_dir, workers=2)
    old_content = old[7]

    changed = paths[7]
    inverted = 255 - np.asarray(Image.open(changed).convert("L"))
    Image.fromarray(inverted).save(changed)
    st = changed.stat()
    os.utime(changed, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a later mtime even on coarse clocks

    new = DecodedCache.build(paths, 96, storage="disk", cache_dir=cache_dir, workers=2)
    assert new.key != old.key and new.path != old.path
    np.testing.assert_array_equal(new[7], _reference(changed, 96, "image"))
    assert not np.array_equal(new[7], old_content)
    np.testing.assert_array_equal(new[6], old[6])  # the old memmap stays readable in this process
    # policy: the other-key cache of the same file list is deleted, other sizes are kept
    assert not old.path.exists() and new.path.exists() and other_size.path.exists()
    assert len([n for n in _cache_files(cache_dir) if n.endswith(".npy")]) == 2
    # touching alone (same bytes, new mtime) also gives a new key: stat-based, no hashing of pixels
    os.utime(changed, ns=(st.st_atime_ns, st.st_mtime_ns + 2 * 10**9))
    assert DecodedCache.build(paths, 96, storage="disk", cache_dir=cache_dir).key != new.key
    # a reordered list is another cache too (indices would not match)
    assert DecodedCache.build(paths[::-1], 96, storage="memory").key != new.key


def _png_bytes(pixels: np.ndarray) -> bytes:
    """An uncompressed PNG: its length depends only on the shape and mode, not on the pixels."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", compress_level=0)
    return buffer.getvalue()


@pytest.mark.parametrize("replace", [False, True], ids=["in-place", "rename-over"])
def test_disk_cache_not_fooled_by_same_size_rewrite_with_restored_mtime(
    data_copy: list[Record], tmp_path: Path, replace: bool
):
    """A file rewritten with other pixels, the same size and its old mtime put back is decoded again."""
    cache_dir = tmp_path / "cache"
    paths = _paths(data_copy, "image")
    changed = paths[7]
    pixels = np.asarray(Image.open(changed).convert("L"))
    changed.write_bytes(_png_bytes(pixels))  # uncompressed, so that other pixels give the same file size
    old = DecodedCache.build(paths, 96, storage="disk", cache_dir=cache_dir, workers=2)
    old_content = old[7]

    rewrite_keeping_size_and_mtime(changed, _png_bytes(255 - pixels), replace=replace)

    new = DecodedCache.build(paths, 96, storage="disk", cache_dir=cache_dir, workers=2)
    assert new.key != old.key and new.path != old.path
    np.testing.assert_array_equal(new[7], _reference(changed, 96, "image"))
    assert not np.array_equal(new[7], old_content)
    np.testing.assert_array_equal(new[6], old[6])


def test_interrupted_build_never_reused(records: list[Record], tmp_path: Path, monkeypatch):
    paths = _paths(records, "image")
    calls = {"n": 0}

    def dies_midway(path: Path, size: int, kind: str) -> np.ndarray:
        calls["n"] += 1
        if calls["n"] == 10:
            raise KeyboardInterrupt  # Ctrl-C in the middle of the build
        return decode_resized(path, size, kind)

    monkeypatch.setattr(image_cache, "decode_resized", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        DecodedCache.build(paths, 80, storage="disk", cache_dir=tmp_path, workers=1)
    assert _cache_files(tmp_path) == []  # temp files removed, nothing committed
    monkeypatch.undo()

    # a killed build (no cleanup) leaves a temp file of the right shape: never picked up, swept once stale
    path = DecodedCache.build(paths, 80, storage="disk", cache_dir=tmp_path).path
    path.unlink()
    temp = tmp_path / f".{path.name}.123-abcd.tmp"
    with open(temp, "wb") as f:
        np.save(f, np.zeros((len(paths), 80, 80), np.uint8))
    decoded = {"n": 0}

    def counting(path: Path, size: int, kind: str) -> np.ndarray:
        decoded["n"] += 1
        return decode_resized(path, size, kind)

    monkeypatch.setattr(image_cache, "decode_resized", counting)
    cache = DecodedCache.build(paths, 80, storage="disk", cache_dir=tmp_path, workers=2)
    assert decoded["n"] == len(paths)  # rebuilt, not reused
    for i, p in enumerate(paths):
        np.testing.assert_array_equal(cache[i], _reference(p, 80, "image"))
    # the fresh temp file of the "killed" build is kept (it might be a live build); old ones are swept
    assert temp.exists()
    os.utime(temp, (time.time() - 2 * image_cache.STALE_TEMP_SECONDS,) * 2)
    cache.path.unlink()  # force a rebuild, which sweeps
    DecodedCache.build(paths, 80, storage="disk", cache_dir=tmp_path, workers=2)
    assert not temp.exists()


def test_default_cache_dir_follows_xdg(records: list[Record], tmp_path: Path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    cache = DecodedCache.build(_paths(records, "mask")[:3], 32, kind="mask", storage="disk")
    assert cache.path.parent == tmp_path / "xdg" / "covid_lightning" / "decoded"
    assert cache.path.name.startswith("mask32-")


# --------------------------------------------------------------------------------------------
# DataLoader workers
# --------------------------------------------------------------------------------------------


def test_disk_cache_pickles_paths_only_and_reopens(records: list[Record], tmp_path: Path):
    cache = DecodedCache.build(_paths(records, "image"), 64, storage="disk", cache_dir=tmp_path, workers=2)
    blob = pickle.dumps(cache)
    assert len(blob) < 4096  # paths and the key, never the pixels (32 x 64 x 64 bytes)
    clone = pickle.loads(blob)
    assert clone.array is None and clone.key == cache.key and len(clone) == len(cache)
    for i in range(len(cache)):
        np.testing.assert_array_equal(clone[i], cache[i])  # reopened lazily by path
    assert isinstance(clone.array, np.memmap)
    memory = DecodedCache.build(_paths(records, "image")[:4], 64)
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(memory))[3], memory[3])  # memory: pickles the pixels


def _check_loader(cache: DecodedCache, context: str) -> None:
    expected = torch.from_numpy(np.stack([cache[i] for i in range(len(cache))]))
    loader = DataLoader(cache, batch_size=5, num_workers=2, multiprocessing_context=context)
    got = torch.cat(list(loader))
    assert got.dtype == torch.uint8 and torch.equal(got, expected)


@pytest.mark.parametrize("storage", ["memory", "disk"])
def test_cache_in_forked_dataloader_workers(records: list[Record], tmp_path: Path, storage: str):
    """fork (the Linux default) shares the arrays or memmaps with the workers as they are."""
    cache = DecodedCache.build(_paths(records, "image"), 64, storage=storage, cache_dir=tmp_path, workers=2)
    _check_loader(cache, "fork")


# --------------------------------------------------------------------------------------------
# Micro-benchmark (printed with -s)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", ["RadiographyDataModule", "LungSegmentationDataModule"])
def test_datamodule_cache_gives_the_same_batches(demo_root: Path, tmp_path: Path, monkeypatch, cls):
    import covid_lightning

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    make = getattr(covid_lightning, cls)
    plain = make(root=str(demo_root), image_size=40, batch_size=6, num_workers=0, augment="light")
    cached = make(root=str(demo_root), image_size=40, batch_size=6, num_workers=0, augment="light", cache_images="disk")
    for dm in (plain, cached):
        dm.setup("fit")
    assert cached.datasets["train"].image_cache is not None
    for loader in ("train_dataloader", "val_dataloader"):
        a, b = next(iter(getattr(plain, loader)())), next(iter(getattr(cached, loader)()))
        assert a["path"] == b["path"]
        assert torch.equal(a["image"], b["image"])  # augmentation included: seeded per sample
        if "mask" in a:
            assert torch.equal(a["mask"], b["mask"])
