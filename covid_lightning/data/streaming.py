"""LitData streaming: write a data source's records once as LitData chunks, stream them back as sample dicts.

Items hold the encoded image (and mask) bytes, ``label``, ``path`` (as bytes: LitData would treat a ``str`` naming
a file as that file) and the duplicate ``group``. On several nodes, run the same command on each with a new ``OUT``.
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import litdata
import numpy as np
import torch
from litdata import StreamingDataLoader, StreamingDataset
from litdata.streaming.sampler import ChunkedIndex
from PIL import Image

from covid_lightning.data.datasets import make_sample, sample_seed
from covid_lightning.data.image_cache import decode_resized
from covid_lightning.data.scan import DatasetError, relative_path
from covid_lightning.data.split import SPLITS, select_records, write_manifest
from covid_lightning.data.transforms import ImageReadError, decode_binary_mask, decode_rgb
from covid_lightning.errors import UserError

log = logging.getLogger(__name__)

FORMAT_VERSION = 1  # bump when the item layout or meta.json changes
FORMAT_NAME = "covid-lightning-litdata"
MANIFEST_FILE = "manifest.csv"
META_FILE = "meta.json"


def _is_url(location: str | Path) -> bool:
    return "://" in str(location)


def join_location(base: str | Path, name: str) -> str:
    """``base/name`` for a local folder or an object-store URL (kept as a URL: LitData resolves it)."""
    return str(base).rstrip("/") + "/" + name if _is_url(base) else str(Path(base).expanduser() / name)


def _fs(location: str, storage_options: dict[str, Any] | None) -> Any:
    from litdata.streaming.fs_provider import _get_fs_provider

    return _get_fs_provider(location, storage_options or {})


def _fetch(location: str, dest: Path, storage_options: dict[str, Any] | None = None) -> Path:
    """Copy the small file ``location`` (local or object store) to ``dest``."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    if _is_url(location):
        _fs(location, storage_options).download_file(location, str(dest))
    else:
        shutil.copyfile(location, dest)
    return dest


def _put(local: Path, location: str, storage_options: dict[str, Any] | None) -> None:
    if _is_url(location):
        _fs(location, storage_options).upload_file(str(local), location)
    else:
        _fetch(str(local), Path(location))


def read_meta(url: str | Path, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """``meta.json`` of an optimized dataset (local folder or object-store URL)."""
    try:
        with tempfile.TemporaryDirectory() as tmp:
            meta = json.loads(_fetch(join_location(url, META_FILE), Path(tmp) / META_FILE, storage_options).read_text())
    except (OSError, ValueError) as err:
        raise DatasetError(
            f"No readable {META_FILE} at {url}: {err}. Write the dataset with `covid-lightning optimize ROOT {url}`."
        ) from err
    if meta.get("format") != FORMAT_NAME or meta.get("version") != FORMAT_VERSION:
        raise DatasetError(
            f"{url} is not a {FORMAT_NAME} v{FORMAT_VERSION} dataset (found {meta.get('format')} "
            f"v{meta.get('version')}); optimize the data again."
        )
    return meta


def copy_manifest(url: str | Path, dest: str | Path, storage_options: dict[str, Any] | None = None) -> Path:
    """Copy the stream's split (``manifest.csv``) to ``dest``: a run on a stream keeps its ``split.csv`` too."""
    try:
        return _fetch(join_location(url, MANIFEST_FILE), Path(dest), storage_options)
    except OSError as err:
        raise DatasetError(f"No readable {MANIFEST_FILE} at {url}: {err}. Optimize the data again.") from err


def _encode_png(array: np.ndarray) -> bytes:
    """Lossless PNG of an HxW or HxWx3 uint8 array (mode L when the three channels are equal)."""
    if array.ndim == 3 and (array[..., 0] == array[..., 1]).all() and (array[..., 0] == array[..., 2]).all():
        array = array[..., 0]
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


class _ItemEncoder:
    """``fn`` of :func:`litdata.optimize`: item index -> the stored dict (picklable for the writer processes)."""

    def __init__(self, items: list[tuple[str, str, int, str, int]], image_size: int | None) -> None:
        self.items, self.image_size = items, image_size  # (image path, mask path or "", label, relative path, group)

    def __call__(self, index: int) -> dict[str, Any]:
        image_path, mask_path, label, rel, group = self.items[index]
        size = self.image_size
        if size is None:
            image, mask = Path(image_path).read_bytes(), Path(mask_path).read_bytes() if mask_path else b""
        else:  # resized once as the pipelines' first step resizes, stored losslessly
            image = _encode_png(decode_resized(Path(image_path), size, "image"))
            mask = _encode_png(decode_resized(Path(mask_path), size, "mask") * 255) if mask_path else b""
        return {"image": image, "mask": mask, "label": int(label), "path": rel.encode("utf-8"), "group": int(group)}


def optimize(
    root: str,
    out: str,
    masks: bool | None = None,
    image_size: int | None = None,
    val_fraction: float = 0.3,
    test_fraction: float = 0.0,
    seed: int = 42,
    split_file: str | None = None,
    workers: int = 1,
    chunk_bytes: str = "64MB",
    on_bad_file: Literal["error", "skip"] = "error",
    duplicates: Literal["near", "exact", "none"] = "near",
    overwrite: bool = False,
    storage_options: dict[str, Any] | None = None,
) -> int:
    """Write a dataset (or a manifest's files) as LitData chunks per split; train on it with --data.streaming OUT.

    Args:
        root: the dataset folder, a folder containing COVID-19_Radiography_Dataset/, or a manifest .csv/.parquet.
        out: output folder or object-store URL (s3://bucket/prefix, gs://...).
        masks: true: store lung masks (pairs only); false: images only; default: masks when every image has one.
        image_size: resize once to this size (lossless PNG); default: store the files' own bytes.
        val_fraction: share of each class for validation.
        test_fraction: share of each class held out for testing.
        seed: seed of the split.
        split_file: reuse the split of this manifest (a run's split.csv, or a stream's manifest.csv).
        workers: LitData writer processes per node.
        chunk_bytes: target chunk size.
        on_bad_file: ``error`` stops naming each unreadable file; ``skip`` drops, counts and logs them.
        duplicates: duplicate images (``near``: exact + perceptual hash) are kept within one split.
        overwrite: replace an existing optimized dataset at OUT.
        storage_options: options of the object store's client (LitData's).
    """
    rank = int(os.environ.get("DATA_OPTIMIZER_NODE_RANK", 0))  # LitData's optimize node rank (0 on one machine)
    nodes = max(1, int(os.environ.get("DATA_OPTIMIZER_NUM_NODES", 1)))
    if nodes > 1 and overwrite:
        raise UserError("overwrite works on one node only: on several nodes, write to a new (empty) output.")
    indexes = [join_location(join_location(out, s), "index.json") for s in SPLITS]
    if not overwrite and any(_fs(i, storage_options).exists(i) if _is_url(i) else Path(i).exists() for i in indexes):
        raise UserError(f"{out} already holds an optimized dataset; choose another output or pass --overwrite true.")
    select = dict(masks=masks, split_file=split_file, val_fraction=val_fraction, test_fraction=test_fraction,
                  seed=seed, on_bad_file=on_bad_file, duplicates=duplicates)  # fmt: skip
    t0, sel = time.perf_counter(), select_records(root, **select)
    base, class_names, records = sel.source.base, sel.source.class_names, sel.screening.records
    counts, per_class = {}, {}
    for split in SPLITS:
        location = join_location(out, split)
        items = [
            (str(r.path), str(r.mask_path or ""), r.label, relative_path(r.path, base), g)
            for r, s, g in zip(records, sel.splits, sel.groups, strict=True)
            if s == split
        ]
        counts[split] = len(items)
        per_class[split] = {name: sum(1 for it in items if it[2] == k) for k, name in enumerate(class_names)}
        if not items:
            if overwrite and not _is_url(location):  # an earlier dataset's split must not outlive this one
                shutil.rmtree(location, ignore_errors=True)
            elif overwrite and not _fs(location, storage_options).is_empty(location):
                _fs(location, storage_options).delete_file_or_directory(location)
            continue
        leaked = os.environ.get("DATA_OPTIMIZER_NUM_WORKERS")  # LitData sets it in the calling process
        try:
            litdata.optimize(
                fn=_ItemEncoder(items, image_size),
                inputs=list(range(len(items))),
                output_dir=location,
                chunk_bytes=chunk_bytes,
                num_workers=max(1, workers),
                keep_data_ordered=True,
                reorder_files=False,
                # several nodes must not clear the output LitData-style (the other nodes' chunks)
                mode="overwrite" if overwrite else "append" if nodes > 1 else None,
                storage_options=storage_options or {},
                verbose=False,
                start_method="fork" if sys.platform == "linux" else None,  # a spawned writer re-imports torch
            )
        finally:
            if leaked is None:
                os.environ.pop("DATA_OPTIMIZER_NUM_WORKERS", None)
            else:
                os.environ["DATA_OPTIMIZER_NUM_WORKERS"] = leaked
        index = Path(location) / "index.json"  # LitData reports a failing writer but does not raise
        if not _is_url(location) and rank == nodes - 1:  # the last node holds the merged index
            written = sum(c["chunk_size"] for c in json.loads(index.read_text())["chunks"]) if index.is_file() else 0
            if written != len(items):
                raise RuntimeError(f"LitData wrote {written} of {len(items)} items to {location}; see its messages.")
    if rank == 0:
        meta = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "classes": list(class_names), "counts": counts,
                "class_counts": per_class, "masks": sel.masks, "image_size": image_size, "split": select,
                "root": str(base)}  # fmt: skip
        with tempfile.TemporaryDirectory() as tmp:
            manifest = write_manifest(Path(tmp) / MANIFEST_FILE, records, sel.splits, base, sel.groups)
            _put(manifest, join_location(out, MANIFEST_FILE), storage_options)
            (Path(tmp) / META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
            _put(Path(tmp) / META_FILE, join_location(out, META_FILE), storage_options)
    written = ", ".join(f"{s}={n}" for s, n in counts.items())
    print(f"optimize: wrote {written} items to {out} in {time.perf_counter() - t0:.1f} s (masks: {sel.masks})")
    return 0


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

    Build it in ``setup`` (LitData reads the distributed environment then); ``kwargs`` go to ``StreamingDataset``.
    """

    def __init__(
        self,
        url: str | Path,
        split: str,
        transform: Callable[..., dict],
        *,
        masks: bool = False,
        augment_seed: int | None = None,
        path_root: str | Path | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(join_location(url, split), **kwargs)
        self.url, self.split, self.masks, self.augment_seed = str(url), split, masks, augment_seed
        self.xray_transform = transform  # not ``transform``: StreamingDataset would apply it to the raw item
        self.path_root = None if path_root is None else Path(path_root)

    def __getitem__(self, index: ChunkedIndex | int) -> dict[str, Any]:  # type: ignore[override]
        item = super().__getitem__(index)
        rel = bytes(item["path"]).decode("utf-8")
        path = rel if self.path_root is None else str(self.path_root / rel)
        if self.augment_seed is not None:
            epoch = max(int(self.current_epoch) - 1, 0)  # LitData counts epochs from 1
            position = index.index if isinstance(index, ChunkedIndex) else int(index)
            self.xray_transform.set_random_seed(sample_seed(self.augment_seed, epoch, position))
        mask = None
        if self.masks:
            if len(item["mask"]) == 0:
                raise DatasetError(
                    f"{self.url} was optimized without lung masks ({rel}); optimize it again with masks."
                )
            mask = decode_mask(item["mask"], rel)
        return make_sample(self.xray_transform, decode_image(item["image"], rel), mask, int(item["label"]), path)

    def whole_split(self) -> torch.utils.data.Dataset:
        """Every item of the split, map-style, read in this process (not this rank's and worker's share)."""
        total = int(read_meta(self.url, getattr(self, "storage_options", None))["counts"][self.split])
        return torch.utils.data.Subset(self, range(total))


def streaming_datasets(
    url: str | Path, *, transforms: dict[str, Callable[..., dict]], masks: bool, seed: int, **kwargs: Any
) -> dict[str, StreamingXRayDataset]:
    """One :class:`StreamingXRayDataset` per split in ``transforms`` that has items (``train`` shuffled)."""
    meta = read_meta(url, kwargs.get("storage_options"))
    if masks and not meta["masks"]:
        raise DatasetError(
            f"{url} was optimized without lung masks: run `covid-lightning optimize ROOT OUT --masks true`."
        )
    return {
        split: StreamingXRayDataset(
            url, split, transform, masks=masks, shuffle=split == "train", seed=seed,
            augment_seed=seed if split == "train" else None, drop_last=None if split == "train" else False, **kwargs,
        )
        for split, transform in transforms.items()
        if meta["counts"].get(split)
    }  # fmt: skip


def streaming_loader(
    dataset: StreamingDataset, batch_size: int, num_workers: int = 0, **kwargs: Any
) -> StreamingDataLoader:
    """LitData's ``StreamingDataLoader`` (epochs handed to the dataset, ``state_dict`` for mid-epoch resume)."""
    kwargs.setdefault("pin_memory", torch.cuda.is_available())
    return StreamingDataLoader(dataset, batch_size=batch_size, num_workers=num_workers, **kwargs)
