"""LitData streaming: write the dataset once as LitData chunks, stream it back as the same sample dicts.

``covid-lightning optimize ROOT OUT`` (or :func:`optimize_dataset`) reads the records of ``ROOT`` (a Kaggle-layout
folder, or a manifest CSV/Parquet) and screens and splits them exactly as the DataModules do (``read_records`` ->
``split_records``: screening, then the manifest's own split or a group-aware ``stratified_split``, or a split
manifest), then writes one LitData dataset per non-empty split::

    OUT/train/{index.json, chunk-*.bin}   OUT/val/...   OUT/test/...   (OUT: a folder or s3://, gs://, ... URL)
    OUT/manifest.csv                      the split, in the format of data.split_file (paths relative to ROOT,
                                          or to a manifest's folder)
    OUT/meta.json                         format version, classes, counts per split (and per class), options

Each item is a dict of five leaves:

* ``image``: the image file's bytes exactly as on disk (PNG, or JPEG), or, with ``image_size``, the image
  resized once at optimize time (the first step of the pipelines, the same albumentations ``Resize``) and
  stored as a lossless PNG (mode L when R=G=B);
* ``mask``: the lung mask file's bytes (or the resized 0/255 PNG), ``b""`` when the dataset stores no masks;
* ``label``: int, the class index in meta.json's ``classes`` (the Kaggle layout's
  :data:`~covid_lightning.data.scan.CLASSES`, or a manifest's labels, sorted);
* ``path``: the path relative to the dataset root, UTF-8 **bytes** (a ``str`` leaf would be stored by
  LitData as a file's contents whenever it names an existing file relative to the working directory);
* ``group``: int, the duplicate group (same group = same or near-same image, always in one split).

Why encoded bytes and not uint8 arrays: the files are already compressed. On the real Kaggle sample an item
is 38.5 KiB stored, against 87 KiB for the decoded gray array and 262 KiB for the RGB array the pipelines
use, so chunks are 2.3-6.8x smaller to store, download and cache. And the reader decodes them with the very
code that decodes files (``transforms.decode_rgb`` / ``decode_binary_mask``, under ``load_image`` / ``load_mask``),
so streamed samples equal the folder samples bit for bit. The price is the PNG decode, ~1-3 ms per 299x299
image on one core (~0.9 ms for a 224x224 one stored with ``image_size=224``, which also makes an item
22 KiB): the same work the folder path does.

Masks (``masks=None``, the default): stored when every kept image has ``<Class>/masks/<same name>`` (the
Kaggle release with masks, the demo); then one optimized dataset serves both the classifier and the
segmenter with the same split. Otherwise no masks are stored. ``masks=True`` pairs images with masks and
skips unpaired images (as :class:`~covid_lightning.data.datamodules.LungSegmentationDataModule`);
``masks=False`` stores images only (as ``RadiographyDataModule``).

Determinism: the items of a split are written in scan order (class, then file name) whatever the number
of workers (``keep_data_ordered=True``: each worker takes a contiguous slice and the index lists the
workers' chunks in rank order), so the same inputs give the same items in the same order and the same
chunk bytes for a given ``num_workers``.

Multi-node: LitData shards :func:`litdata.optimize` over nodes through ``DATA_OPTIMIZER_NUM_NODES`` and
``DATA_OPTIMIZER_NODE_RANK`` (set them yourself outside Lightning Studio). Run the same command on every node
with the same arguments and a new, empty object-store URL as ``out``: every node scans and splits identically
(deterministic), writes its contiguous slice of each split, and the last node waits for the other nodes'
``<node>-index.json`` and merges them, in node order, into ``index.json``; node 0 writes ``manifest.csv`` and
``meta.json``. (On a shared file system LitData's last node does not wait for the others: start it last.)
Every node screens every file (the decode cache is per machine). Reading, :class:`StreamingXRayDataset` (a
LitData ``StreamingDataset``) gives each rank and each DataLoader worker its own chunks; LitData reads the
distributed environment when the dataset is built, so build it after the process group exists (in
``LightningDataModule.setup``).
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import albumentations as A  # noqa: E402
import cv2  # noqa: E402
import litdata  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from litdata import StreamingDataLoader, StreamingDataset  # noqa: E402
from litdata.streaming.sampler import ChunkedIndex  # noqa: E402
from PIL import Image  # noqa: E402

from covid_lightning.data.datasets import sample_seed  # noqa: E402
from covid_lightning.data.hygiene import inspection_cache_file  # noqa: E402
from covid_lightning.data.scan import (  # noqa: E402
    CLASSES,
    DatasetError,
    Record,
    Source,
    find_dataset_root,
    is_manifest_file,
    read_records,
    relative_path,
    scan_manifest,
)
from covid_lightning.data.split import SPLITS, read_manifest, split_records, write_manifest  # noqa: E402
from covid_lightning.data.transforms import ImageReadError, decode_binary_mask, decode_rgb  # noqa: E402

log = logging.getLogger(__name__)

#: Bump when the item layout or meta.json changes.
FORMAT_VERSION = 1
FORMAT_NAME = "covid-lightning-litdata"
MANIFEST_FILE = "manifest.csv"
META_FILE = "meta.json"
ITEM_FIELDS = ("image", "mask", "label", "path", "group")


# --------------------------------------------------------------------------------------------
# locations (local folders and object-store URLs)
# --------------------------------------------------------------------------------------------


def _is_url(location: str | Path) -> bool:
    return "://" in str(location)


def join_location(base: str | Path, name: str) -> str:
    """``base/name`` for a local folder or an object-store URL (kept as a URL: LitData resolves it)."""
    if _is_url(base):
        return str(base).rstrip("/") + "/" + name
    return str(Path(base).expanduser() / name)


def _node_rank() -> int:
    """LitData's optimize node rank (``DATA_OPTIMIZER_NODE_RANK``, 0 on a single machine)."""
    return int(os.environ.get("DATA_OPTIMIZER_NODE_RANK", 0))


def _num_nodes() -> int:
    """LitData's optimize node count (``DATA_OPTIMIZER_NUM_NODES``, 1 on a single machine)."""
    return max(1, int(os.environ.get("DATA_OPTIMIZER_NUM_NODES", 1)))


def _exists(location: str, storage_options: dict[str, Any] | None) -> bool:
    if _is_url(location):
        from litdata.streaming.fs_provider import _get_fs_provider

        return _get_fs_provider(location, storage_options or {}).exists(location)
    return Path(location).exists()


def _put_file(local: Path, location: str, storage_options: dict[str, Any] | None) -> None:
    """Copy a small local file to ``location`` (a local path or an object-store URL)."""
    if _is_url(location):
        from litdata.streaming.fs_provider import _get_fs_provider

        _get_fs_provider(location, storage_options or {}).upload_file(str(local), location)
    else:
        Path(location).parent.mkdir(parents=True, exist_ok=True)
        Path(location).write_bytes(local.read_bytes())


def _remove(location: str, storage_options: dict[str, Any] | None) -> None:
    """Delete a split folder (local or object store) when it exists."""
    if _is_url(location):
        from litdata.streaming.fs_provider import _get_fs_provider

        provider = _get_fs_provider(location, storage_options or {})
        if not provider.is_empty(location):
            provider.delete_file_or_directory(location)
    elif Path(location).is_dir():
        shutil.rmtree(location)


def read_meta(url: str | Path, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """``meta.json`` of an optimized dataset (local folder or object-store URL)."""
    location = join_location(url, META_FILE)
    try:
        if _is_url(url):
            from litdata.streaming.fs_provider import _get_fs_provider

            with tempfile.TemporaryDirectory() as tmp:
                local = Path(tmp) / META_FILE
                _get_fs_provider(location, storage_options or {}).download_file(location, str(local))
                meta = json.loads(local.read_text(encoding="utf-8"))
        else:
            meta = json.loads(Path(location).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise DatasetError(
            f"No readable {META_FILE} at {url}: {err}. Write the dataset with `covid-lightning optimize ROOT {url}`."
        ) from err
    if meta.get("format") != FORMAT_NAME or meta.get("version") != FORMAT_VERSION:
        raise DatasetError(
            f"{location} is not a {FORMAT_NAME} v{FORMAT_VERSION} dataset (found {meta.get('format')} "
            f"v{meta.get('version')}); optimize the data again."
        )
    return meta


def copy_manifest(url: str | Path, dest: str | Path, storage_options: dict[str, Any] | None = None) -> Path:
    """Copy ``manifest.csv`` of an optimized dataset (the split it holds, in the format of ``data.split_file``)
    to ``dest``: a run on a stream keeps its ``split.csv`` as a run on files does."""
    location, dest = join_location(url, MANIFEST_FILE), Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        if _is_url(url):
            from litdata.streaming.fs_provider import _get_fs_provider

            _get_fs_provider(location, storage_options or {}).download_file(location, str(dest))
        else:
            dest.write_bytes(Path(location).read_bytes())
    except OSError as err:
        raise DatasetError(
            f"No readable {MANIFEST_FILE} at {url}: {err}. "
            f"Write the dataset with `covid-lightning optimize ROOT {url}`."
        ) from err
    return dest


# --------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------


def _encode_png(array: np.ndarray) -> bytes:
    """Lossless PNG of an HxW or HxWx3 uint8 array (mode L when the three channels are equal)."""
    if array.ndim == 3 and (array[..., 0] == array[..., 1]).all() and (array[..., 0] == array[..., 2]).all():
        array = array[..., 0]
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


class _ItemEncoder:
    """``fn`` of :func:`litdata.optimize`: item index -> the stored dict (picklable for spawned workers)."""

    def __init__(self, items: list[tuple[str, str, int, str, int]], image_size: int | None) -> None:
        self.items = items  # (image path, mask path or "", label, relative path, group)
        self.image_size = image_size

    def __call__(self, index: int) -> dict[str, Any]:
        image_path, mask_path, label, rel, group = self.items[index]
        if self.image_size is None:
            image = Path(image_path).read_bytes()
            mask = Path(mask_path).read_bytes() if mask_path else b""
        else:
            image, mask = self._resized(image_path, mask_path)
        return {"image": image, "mask": mask, "label": int(label), "path": rel.encode("utf-8"), "group": int(group)}

    def _resized(self, image_path: str, mask_path: str) -> tuple[bytes, bytes]:
        """The first step of every pipeline (``build_transform``'s ``Resize``), applied once, stored losslessly."""
        from covid_lightning.data.transforms import load_image, load_mask

        size = self.image_size
        resize = A.Compose(
            [A.Resize(size, size, interpolation=cv2.INTER_LINEAR, mask_interpolation=cv2.INTER_NEAREST)],
            is_check_shapes=False,
        )
        if mask_path:
            out = resize(image=load_image(image_path), mask=load_mask(mask_path))
            return _encode_png(out["image"]), _encode_png(out["mask"].astype(np.uint8) * 255)
        return _encode_png(resize(image=load_image(image_path))["image"]), b""


def _select(
    root: str | Path,
    *,
    masks: bool | None,
    val_fraction: float,
    test_fraction: float,
    seed: int,
    split_file: str | Path | None,
    on_bad_file: str,
    duplicates: str,
) -> tuple[Source, list[Record], list[str], list[int], bool]:
    """The source, its kept records, their splits and groups, and whether masks are stored: the DataModules'
    read_records -> screen -> split (:func:`~covid_lightning.data.split.split_records`)."""
    manifest = Path(root).expanduser() if is_manifest_file(root) else None
    if split_file is not None:  # the split file lists the records: the source gives its folder and class names
        if manifest is not None:
            source = replace(scan_manifest(manifest, with_masks=None), splits=None)
        else:
            source = Source([], CLASSES, find_dataset_root(root))
        records, splits = read_manifest(split_file, source.base, source.class_names)
    elif manifest is not None:
        source = scan_manifest(manifest, with_masks=masks)
    elif masks is None:
        source = read_records(root, with_masks=False)
        candidates = [r.path.parent.parent / "masks" / r.path.name for r in source.records]
        if all(r.path.parent.name == "images" and m.is_file() for r, m in zip(source.records, candidates)):
            source = replace(source, records=[replace(r, mask_path=m) for r, m in zip(source.records, candidates)])
    else:
        source = read_records(root, with_masks=masks)
    if split_file is None:
        records, splits = source.records, source.splits
    have_masks = all(r.mask_path is not None for r in records)
    if masks and not have_masks:
        raise DatasetError(f"{split_file} has rows without a mask_path; it is not a segmentation split.")
    store_masks = have_masks if masks is None else masks
    if masks is None and not store_masks:
        log.info("Not every image has a lung mask: storing images only (pass masks=True to pair and skip).")
    if not store_masks:
        records = [replace(r, mask_path=None) for r in records]
    screened, splits, groups = split_records(
        records,
        splits=splits,
        val_fraction=val_fraction,
        test_fraction=test_fraction,
        seed=seed,
        on_bad_file=on_bad_file,
        duplicates=duplicates,
        cache_file=inspection_cache_file(source.base),
    )
    return source, screened.records, splits, groups, store_masks


def _check_written(location: str, expected: int) -> None:
    """A local split must list ``expected`` items: LitData reports a failing writer but does not raise.

    Checked where the complete index is known: on the only node, or on the last one (it merges the index).
    """
    if _is_url(location) or _node_rank() != _num_nodes() - 1:
        return
    index = Path(location) / "index.json"
    written = sum(c["chunk_size"] for c in json.loads(index.read_text())["chunks"]) if index.is_file() else 0
    if written != expected:
        raise RuntimeError(f"LitData wrote {written} of {expected} items to {location}; see its messages above.")


def optimize_dataset(
    root: str | Path,
    out: str | Path,
    *,
    masks: bool | None = None,
    image_size: int | None = None,
    val_fraction: float = 0.3,
    test_fraction: float = 0.0,
    seed: int = 42,
    num_workers: int = 1,
    chunk_bytes: int | str = "64MB",
    split_file: str | Path | None = None,
    on_bad_file: str = "error",
    duplicates: str = "near",
    overwrite: bool = False,
    storage_options: dict[str, Any] | None = None,
    verbose: bool = False,
    start_method: str | None = "fork" if sys.platform == "linux" else None,
) -> dict[str, int]:
    """Write ``root`` as one LitData dataset per split under ``out/<split>/`` (+ ``manifest.csv``, ``meta.json``).

    Args:
        root: the dataset folder, a folder containing ``COVID-19_Radiography_Dataset``, or a manifest
            (``.csv``/``.parquet``: ``path``, ``label``, ``mask_path``, ``split``, ``group``).
        out: a local folder or an object-store URL (``s3://bucket/prefix``, ``gs://...``), passed to LitData.
        masks: None stores masks when every image has one; True pairs and skips unpaired images; False none.
        image_size: resize once here (same ``Resize`` as the pipelines) and store lossless PNGs of that size;
            read them back with the same ``image_size``. None stores the files' own bytes.
        val_fraction, test_fraction, seed: the split, as in the DataModules (ignored with ``split_file``).
        num_workers: LitData writer processes per node.
        chunk_bytes: target chunk size.
        split_file: a manifest (``split.csv`` of a run, or ``manifest.csv`` of this function) to reuse.
        on_bad_file, duplicates: screening, as in the DataModules (``duplicates`` ignored with ``split_file``).
        overwrite: replace an existing optimized dataset at ``out`` (else an error).
        start_method: of LitData's writer processes. ``fork`` on Linux: a spawned writer re-imports torch and
            albumentations (~10 s per split and worker on a small machine) to run a function that needs neither.

    Returns:
        The number of items per split (``train``, ``val``, ``test``; 0 for an empty split, which is not written).
    """
    if image_size is not None and image_size < 1:
        raise ValueError(f"image_size must be positive, not {image_size}.")
    multi_node = _num_nodes() > 1
    if multi_node and overwrite:
        raise ValueError("overwrite works on one node only: on several nodes, write to a new (empty) output.")
    if not overwrite:
        indexes = (join_location(join_location(out, s), "index.json") for s in SPLITS)
        if any(_exists(index, storage_options) for index in indexes):
            raise FileExistsError(
                f"{out} already holds an optimized dataset; choose another output or pass overwrite=True (--overwrite)."
            )
    # Several nodes: no node may clear the output LitData-style (it would delete the chunks other nodes have
    # uploaded). "append" skips that clean-up; with no index.json there (checked above, before this node wrote
    # anything, and no split can be merged without this node) it starts the chunk numbering afresh.
    mode = "overwrite" if overwrite else "append" if multi_node else None
    t0 = time.perf_counter()
    source, records, splits, groups, store_masks = _select(
        root,
        masks=masks,
        val_fraction=val_fraction,
        test_fraction=test_fraction,
        seed=seed,
        split_file=split_file,
        on_bad_file=on_bad_file,
        duplicates=duplicates,
    )
    base, class_names = source.base, source.class_names
    counts = dict.fromkeys(SPLITS, 0)
    per_class = {s: dict.fromkeys(class_names, 0) for s in SPLITS}
    for split in SPLITS:
        items = [
            (
                str(r.path),
                str(r.mask_path) if store_masks and r.mask_path is not None else "",
                r.label,
                relative_path(r.path, base),
                g,
            )
            for r, s, g in zip(records, splits, groups, strict=True)
            if s == split
        ]
        counts[split] = len(items)
        for item in items:
            per_class[split][class_names[item[2]]] += 1
        if not items:
            if overwrite:  # an earlier dataset's split must not outlive this one
                _remove(join_location(out, split), storage_options)
            continue
        leaked = os.environ.get("DATA_OPTIMIZER_NUM_WORKERS")  # LitData sets it in the calling process
        try:
            litdata.optimize(
                fn=_ItemEncoder(items, image_size),
                inputs=list(range(len(items))),
                output_dir=join_location(out, split),
                chunk_bytes=chunk_bytes,
                num_workers=max(1, num_workers),
                keep_data_ordered=True,
                reorder_files=False,
                mode=mode,
                storage_options=storage_options or {},
                verbose=verbose,
                start_method=start_method,
            )
        finally:
            if leaked is None:
                os.environ.pop("DATA_OPTIMIZER_NUM_WORKERS", None)
            else:
                os.environ["DATA_OPTIMIZER_NUM_WORKERS"] = leaked
        _check_written(join_location(out, split), len(items))
    if _node_rank() == 0:
        meta = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "classes": list(class_names),
            "counts": counts,
            "class_counts": per_class,
            "masks": store_masks,
            "image_size": image_size,
            "image_encoding": "source-bytes" if image_size is None else "png",
            "fields": list(ITEM_FIELDS),
            "split": {
                "split_file": str(split_file) if split_file is not None else None,
                "val_fraction": val_fraction,
                "test_fraction": test_fraction,
                "seed": seed,
                "duplicates": "none" if split_file is not None else duplicates,
                "on_bad_file": on_bad_file,
            },
            "root": str(base),
            "litdata": litdata.__version__,
        }
        with tempfile.TemporaryDirectory() as tmp:
            local_manifest = write_manifest(Path(tmp) / MANIFEST_FILE, records, splits, base, groups)
            _put_file(local_manifest, join_location(out, MANIFEST_FILE), storage_options)
            local_meta = Path(tmp) / META_FILE
            local_meta.write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
            _put_file(local_meta, join_location(out, META_FILE), storage_options)
    log.info(
        "Optimized %s -> %s in %.1f s: %s (masks: %s)",
        base,
        out,
        time.perf_counter() - t0,
        ", ".join(f"{s}={n}" for s, n in counts.items()),
        "yes" if store_masks else "no",
    )
    return counts


# --------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------


def decode_image(data: bytes | memoryview, name: str = "image") -> np.ndarray:
    """Encoded image bytes -> HxWx3 uint8 RGB, as :func:`~covid_lightning.data.transforms.load_image` decodes a file."""
    try:
        return decode_rgb(data)
    except OSError as err:
        raise ImageReadError(f"Cannot decode image {name}: {err}.") from err


def decode_mask(data: bytes | memoryview, name: str = "mask") -> np.ndarray:
    """Encoded mask bytes -> HxW uint8 {0, 1}, thresholded as :func:`~covid_lightning.data.transforms.load_mask`."""
    try:
        return decode_binary_mask(data)
    except OSError as err:
        raise ImageReadError(f"Cannot decode mask of {name}: {err}.") from err


class StreamingXRayDataset(StreamingDataset):
    """``<url>/<split>`` streamed by LitData as the sample dicts of :class:`~covid_lightning.data.datasets.XRayDataset`.

    Samples: ``{"image": uint8 (3, S, S), "label": int, "path": str}`` plus, with ``masks=True``, ``"mask"``:
    float (1, S, S) in {0, 1}. ``path`` is relative to the dataset root, or ``path_root / path`` when
    ``path_root`` is given (the folder path's ``path`` when it is that dataset root).

    Ranks and DataLoader workers each read their own chunks (LitData detects the distributed environment when
    the dataset is built: build it in ``setup``; with several ranks LitData drops the last uneven items unless
    ``drop_last=False``). ``shuffle`` is LitData's chunk + in-chunk shuffle seeded by ``seed`` and the epoch.
    With ``augment_seed`` the transform is reseeded per sample from (seed, epoch, index) as
    :class:`XRayDataset` does, so augmentation does not depend on the number of workers.

    Args:
        url: the ``out`` of :func:`optimize_dataset` (a folder or an object-store URL).
        split: ``train``, ``val`` or ``test``.
        transform: an albumentations pipeline (``build_transform`` / ``eval_transform``).
        masks: return ``mask`` (the dataset must have been optimized with masks).
        max_cache_size: LitData's local chunk cache budget (``"50GB"``, a fraction of free disk, bytes).
        cache_dir: where remote chunks are cached (LitData's default cache otherwise).
    """

    def __init__(
        self,
        url: str | Path,
        split: str,
        transform: Callable[..., dict],
        *,
        masks: bool = False,
        shuffle: bool = False,
        seed: int = 42,
        augment_seed: int | None = None,
        drop_last: bool | None = None,
        max_cache_size: int | float | str | None = None,
        cache_dir: str | None = None,
        storage_options: dict[str, Any] | None = None,
        path_root: str | Path | None = None,
        max_pre_download: int = 2,
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"Unknown split {split!r}; choose one of {', '.join(SPLITS)}.")
        self.url = str(url)
        self.split = split
        super().__init__(
            join_location(url, split),
            cache_dir=cache_dir,
            shuffle=shuffle,
            drop_last=drop_last,
            seed=seed,
            max_cache_size=max_cache_size,
            storage_options=storage_options,
            max_pre_download=max_pre_download,
        )
        # not ``self.transform``: StreamingDataset would apply it to the raw item itself
        self.xray_transform = transform
        self.masks = masks
        self.augment_seed = augment_seed
        self.path_root = None if path_root is None else Path(path_root)

    def __getitem__(self, index: ChunkedIndex | int) -> dict[str, Any]:  # type: ignore[override]
        if isinstance(index, ChunkedIndex):
            position = index.index
        elif isinstance(index, (int, np.integer)):
            position = int(index)
        else:
            raise TypeError(f"{type(self).__name__} takes an int index, not {type(index).__name__}.")
        return self.to_sample(super().__getitem__(index), position)

    def to_sample(self, item: dict[str, Any], position: int) -> dict[str, Any]:
        """A stored item (the ``position``-th of its split) -> the sample dict, through the transform."""
        rel = bytes(item["path"]).decode("utf-8")
        path = rel if self.path_root is None else str(self.path_root / rel)
        if self.augment_seed is not None:
            epoch = max(int(self.current_epoch) - 1, 0)  # LitData counts epochs from 1
            self.xray_transform.set_random_seed(sample_seed(self.augment_seed, epoch, position))
        image = decode_image(item["image"], rel)
        label = int(item["label"])
        if self.masks:
            if len(item["mask"]) == 0:
                raise DatasetError(
                    f"{self.url} was optimized without lung masks ({rel}); optimize it again with masks."
                )
            out = self.xray_transform(image=image, mask=decode_mask(item["mask"], rel))
            mask = out["mask"].to(torch.float32).unsqueeze(0)
            return {"image": out["image"], "mask": mask, "label": label, "path": path}
        out = self.xray_transform(image=image)
        return {"image": out["image"], "label": label, "path": path}

    def whole_split(self) -> torch.utils.data.Dataset:
        """Every item of the split, map-style, in stored order, read in this process: not the share of this rank
        (and DataLoader worker) that iterating the stream gives. For a pass every rank needs in full, e.g. the
        frozen-prefix features the DataModule then shards like a folder dataset (``FrozenFeatureCache``)."""
        total = int(read_meta(self.url, getattr(self, "storage_options", None))["counts"][self.split])
        return _WholeSplit(self, total)


class _WholeSplit(torch.utils.data.Dataset):
    """A :class:`StreamingXRayDataset` read by global index (LitData maps an int index to its chunk)."""

    def __init__(self, stream: StreamingXRayDataset, total: int) -> None:
        self.stream, self.total = stream, total

    def __len__(self) -> int:
        return self.total

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < self.total:
            raise IndexError(f"index {index} out of range for {self.total} items")
        return self.stream[int(index)]


def streaming_datasets(
    url: str | Path,
    *,
    transforms: dict[str, Callable[..., dict]],
    masks: bool,
    seed: int,
    max_cache_size: int | float | str | None = None,
    cache_dir: str | None = None,
    storage_options: dict[str, Any] | None = None,
    path_root: str | Path | None = None,
) -> dict[str, StreamingXRayDataset]:
    """One :class:`StreamingXRayDataset` per split that has items and a transform in ``transforms``.

    ``train`` is shuffled (LitData, seeded by ``seed``) and its augmentation reseeded per sample from ``seed``;
    ``val``/``test`` keep the stored order and every item (``drop_last=False``, also with several ranks).
    """
    meta = read_meta(url, storage_options)
    if masks and not meta["masks"]:
        raise DatasetError(f"{url} was optimized without lung masks: run `covid-lightning optimize ROOT OUT --masks`.")
    out: dict[str, StreamingXRayDataset] = {}
    for split, transform in transforms.items():
        if split not in SPLITS:
            raise ValueError(f"Unknown split {split!r}; choose among {', '.join(SPLITS)}.")
        if not meta["counts"].get(split):
            continue
        train = split == "train"
        out[split] = StreamingXRayDataset(
            url,
            split,
            transform,
            masks=masks,
            shuffle=train,
            seed=seed,
            augment_seed=seed if train else None,
            drop_last=None if train else False,
            max_cache_size=max_cache_size,
            cache_dir=cache_dir,
            storage_options=storage_options,
            path_root=path_root,
        )
    return out


def streaming_loader(
    dataset: StreamingDataset,
    batch_size: int,
    num_workers: int = 0,
    shuffle: bool | None = None,
    **kwargs: Any,
) -> StreamingDataLoader:
    """LitData's ``StreamingDataLoader``: epochs handed to the dataset, ``state_dict`` for mid-epoch resume.

    ``shuffle`` None keeps the dataset's own setting. ``pin_memory`` defaults to CUDA availability.
    """
    kwargs.setdefault("pin_memory", torch.cuda.is_available())
    return StreamingDataLoader(dataset, batch_size=batch_size, num_workers=num_workers, shuffle=shuffle, **kwargs)


# --------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """``covid-lightning optimize ROOT OUT [--masks|--no-masks] [--image-size N] [--val-fraction F] ...``.

    Exit status: 0 written, 1 not written (the output exists, LitData failed), 2 no usable dataset at ``ROOT``
    (bad files, no images, a bad split file). Usage errors exit 2 (argparse).
    """
    parser = argparse.ArgumentParser(
        prog="covid-lightning optimize",
        description="Write a COVID-19 Radiography Database folder (or the files a manifest lists) as LitData "
        "streaming chunks, one dataset per "
        "split (OUT/train, OUT/val[, OUT/test]) with OUT/manifest.csv and OUT/meta.json.",
    )
    parser.add_argument(
        "root", help="the dataset folder, a folder containing COVID-19_Radiography_Dataset/, or a manifest .csv"
    )
    parser.add_argument("out", help="output folder or object-store URL (s3://bucket/prefix, gs://...)")
    parser.add_argument(
        "--masks",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="store lung masks (pairs only); --no-masks: images only; default: masks when every image has one",
    )
    parser.add_argument("--image-size", type=int, default=None, help="resize once here (lossless PNG of that size)")
    parser.add_argument("--val-fraction", type=float, default=0.3)
    parser.add_argument("--test-fraction", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=42, help="seed of the split")
    parser.add_argument("--split-file", default=None, help="reuse the split of this manifest CSV")
    parser.add_argument("--workers", type=int, default=1, help="LitData writer processes per node")
    parser.add_argument("--chunk-bytes", default="64MB")
    parser.add_argument("--on-bad-file", choices=("error", "skip"), default="error")
    parser.add_argument("--duplicates", choices=("near", "exact", "none"), default="near")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing optimized dataset at OUT")
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        counts = optimize_dataset(
            args.root,
            args.out,
            masks=args.masks,
            image_size=args.image_size,
            val_fraction=args.val_fraction,
            test_fraction=args.test_fraction,
            seed=args.seed,
            num_workers=args.workers,
            chunk_bytes=args.chunk_bytes,
            split_file=args.split_file,
            on_bad_file=args.on_bad_file,
            duplicates=args.duplicates,
            overwrite=args.overwrite,
        )
    except DatasetError as err:
        print(f"optimize: {err}", file=sys.stderr)
        return 2
    except (FileExistsError, RuntimeError, ValueError, OSError) as err:
        print(f"optimize: {err}", file=sys.stderr)
        return 1
    print(f"optimize: wrote {', '.join(f'{s}={n}' for s, n in counts.items())} items to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
