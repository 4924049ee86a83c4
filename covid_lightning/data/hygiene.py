"""Dataset hygiene: decode every file, find bad files, unpaired files and (near-)duplicate images.

Building blocks (used by ``covid-lightning check-data ROOT`` and by scanning/splitting):

* :func:`inspect_image` decodes one file fully and returns a :class:`FileInfo` (size, mode, a content
  hash of the 8-bit gray pixels, a 64-bit perceptual hash, mask values) or the reason it is unusable.
* :func:`inspect_files` does that for many files in a thread pool, with an optional JSON cache keyed by
  the absolute path and validated by the file's stat (size, mtime, ctime, inode: see :func:`stat_key`).
* :func:`duplicate_groups` groups exact duplicates (same pixels) and near duplicates (pHash Hamming
  distance <= ``max_distance``), transitively.
* :func:`check_dataset` / :func:`format_report` / :func:`main` make the JSON report and its text summary.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import tempfile
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

from covid_lightning.constants import MASK_SIZE
from covid_lightning.data.dicom import DICOM_SUFFIXES, MONOCHROME, is_dicom, read_dicom
from covid_lightning.data.scan import (
    CLASSES,
    DatasetError,
    Record,
    _class_image_dir,
    broken_link_problem,
    find_dataset_root,
    is_image_entry,
    is_manifest_file,
    relative_path,
    scan_manifest,
)
from covid_lightning.data.transforms import to_rgb_array
from covid_lightning.runtime import cache_dir, usable_cpus

log = logging.getLogger(__name__)

#: The Kaggle lung masks are 256x256 (the images 299x299).
#: Bump when FileInfo fields, the hashes or the cache key change: older cache files are then ignored.
CACHE_VERSION = 2
#: pHash Hamming distance up to which two images count as near duplicates. Re-encodes and small
#: resizes of one radiograph stay at <= 2 (brightness shifts <= 4); different patients in the real
#: sample start at 10, and transitive grouping over 21k images needs a margin, hence 4.
DEFAULT_MAX_DISTANCE = 4
_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I", "F")


@dataclass(frozen=True)
class FileInfo:
    """What decoding one image or mask file found.

    ``ok`` is False when the file cannot be decoded fully; ``problem`` then says why. For images,
    ``content_hash`` is the sha256 of the 8-bit gray pixels (with the size) and ``phash`` a 64-bit
    perceptual hash. For masks, ``mask_values`` lists the distinct gray values ("0,255") or, when
    there are more than four, says how many ("37 values in 0..255").
    """

    path: Path
    ok: bool
    problem: str | None = None
    width: int | None = None
    height: int | None = None
    mode: str | None = None
    format: str | None = None
    content_hash: str | None = None
    phash: int | None = None
    mask_values: str | None = None
    gray: np.ndarray | None = field(default=None, repr=False, compare=False)

    @property
    def size(self) -> str | None:
        """``"WxH"`` or None when the file could not be read."""
        return None if self.width is None else f"{self.width}x{self.height}"

    @property
    def mask_binary(self) -> bool | None:
        """For masks: True when the values are a subset of {0, 255} or of {0, 1}; None for images."""
        if self.mask_values is None:
            return None
        if "values" in self.mask_values:
            return False
        values = {int(v) for v in self.mask_values.split(",")}
        return values <= {0, 255} or values <= {0, 1}

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable fields (``gray`` left out)."""
        d = asdict(self)
        d.pop("gray")
        d["path"] = str(self.path)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], path: Path | None = None) -> FileInfo:
        """The inverse of :meth:`to_dict`; ``path`` replaces the stored path."""
        return cls(**{**d, "path": Path(d["path"]) if path is None else path})  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# One file
# --------------------------------------------------------------------------------------------


def gray_array(image: Image.Image) -> np.ndarray:
    """Any PIL image -> HxW uint8 gray (16-bit scaled as :func:`transforms.to_rgb_array` does).

    Gray stored as RGB with R=G=B gives exactly the same array as the same pixels stored as ``L``.
    """
    if image.mode == "L":
        return np.asarray(image)
    rgb = to_rgb_array(image)
    if image.mode in _SIXTEEN_BIT:
        return np.ascontiguousarray(rgb[..., 0])
    return cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)


def content_hash(gray: np.ndarray) -> str:
    """sha256 of the size and the 8-bit gray pixels: identical pixels in any lossless file -> same hash."""
    h, w = gray.shape
    return hashlib.sha256(f"{w}x{h}:".encode() + np.ascontiguousarray(gray).tobytes()).hexdigest()


def phash(gray: np.ndarray) -> int:
    """64-bit DCT perceptual hash (pHash): 32x32 area resize, 2D DCT, the 8x8 lowest frequencies without
    the DC row/column, one bit per coefficient above their median. Robust to re-encoding and resizing."""
    small = cv2.resize(gray, (32, 32), interpolation=cv2.INTER_AREA).astype(np.float32)
    low = cv2.dct(small)[1:9, 1:9].ravel()
    ranked = np.sort(low)
    bits = low > (ranked[31] + ranked[32]) / 2  # the median, without np.median's overhead
    return int(np.packbits(bits).view(">u8")[0])


def _mask_values(gray: np.ndarray) -> str:
    values = np.flatnonzero(np.bincount(gray.ravel(), minlength=256))
    if len(values) <= 4:
        return ",".join(str(int(v)) for v in values)
    return f"{len(values)} values in {int(values[0])}..{int(values[-1])}"


def _problem(err: BaseException, fmt: str | None) -> str:
    """A short human reason for a decoding failure (no file path: the caller has it)."""
    if isinstance(err, UnidentifiedImageError):
        return "not an image: cannot identify image file"
    msg = str(err).strip() or type(err).__name__
    kind = fmt or "image"
    if "truncated" in msg:
        return f"truncated {kind}: {msg}"
    return f"corrupt {kind}: {msg}"


def decode_gray(path: Path) -> tuple[np.ndarray, dict[str, Any]]:
    """Decode a file fully -> (HxW uint8 gray, its width, height, mode and format). PIL for images, the DICOM
    display pipeline (:func:`covid_lightning.data.dicom.read_dicom`, as training sees it) for DICOM files."""
    if path.suffix.lower() not in DICOM_SUFFIXES:
        try:
            with Image.open(path) as im:
                im.load()
                return gray_array(im), {"width": im.width, "height": im.height, "mode": im.mode, "format": im.format}
        except UnidentifiedImageError:
            if not is_dicom(path):  # a DICOM without .dcm in its name is recognised by its contents
                raise
    image = read_dicom(path)
    rgb = image.rgb
    if image.photometric in MONOCHROME:
        gray = np.ascontiguousarray(rgb[..., 0])
    else:
        gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    return gray, {"width": rgb.shape[1], "height": rgb.shape[0], "mode": image.mode, "format": "DICOM"}


def _format_of(path: Path) -> str | None:
    """The file's format as far as its header tells (for messages about a file that failed to decode)."""
    if is_dicom(path):
        return "DICOM"
    try:
        with Image.open(path) as im:
            return im.format
    except Exception:  # noqa: BLE001 - no readable header: no format to name
        return None


def inspect_image(path: str | Path, *, mask: bool = False, keep_gray: bool = False) -> FileInfo:
    """Decode ``path`` fully (truncated files are caught) and describe it; never raises for a bad file.

    Args:
        path: an image or mask file.
        mask: describe it as a lung mask (``mask_values``) instead of hashing it.
        keep_gray: also return the decoded HxW uint8 gray array in ``FileInfo.gray``.
    """
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            return FileInfo(path, ok=False, problem="zero-byte file")
    except OSError as err:
        return FileInfo(path, ok=False, problem=broken_link_problem(path) or f"cannot open: {err.strerror or err}")
    try:
        gray, info = decode_gray(path)
    except MemoryError:
        raise
    except Exception as err:  # noqa: BLE001 - any decoder failure is a property of the file
        return FileInfo(path, ok=False, problem=_problem(err, _format_of(path)))
    if mask:
        info["mask_values"] = _mask_values(gray)
    else:
        info["content_hash"] = content_hash(gray)
        info["phash"] = phash(gray)
    return FileInfo(path, ok=True, gray=gray if keep_gray else None, **info)


# --------------------------------------------------------------------------------------------
# Many files: pool + cache
# --------------------------------------------------------------------------------------------


def default_workers() -> int:
    """The CPU cores this process may use (at most 16)."""
    return max(1, min(16, usable_cpus()))


#: the stat fields a cache entry must match (see :func:`stat_key`)
STAT_FIELDS: tuple[str, ...] = ("size", "mtime_ns", "ctime_ns", "ino")


def stat_key(path: Path) -> tuple[str, dict[str, int]] | None:
    """The cache key of ``path`` (its absolute path) and the stat fields its entry must match; None if it
    cannot be stat'ed. Shared by every per-file cache (this inspection cache, the decoded-image cache).

    Size and mtime alone can be fooled: a same-size rewrite whose mtime is put back (``os.utime``, copy tools
    that keep timestamps) would keep a stale "readable" verdict (failing mid-epoch) or stale decoded pixels.
    The kernel sets ``st_ctime_ns`` on every write and ``os.utime`` cannot restore it; ``st_ino`` changes when
    another file is renamed over this one. A stat, not a hash of the bytes: hashing would read the whole
    dataset on every run, the cost the cache exists to save. (On Windows ``st_ctime`` is the creation time.)
    """
    try:
        st = os.stat(path)
    except OSError:
        return None
    return os.path.abspath(path), {
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "ctime_ns": st.st_ctime_ns,
        "ino": st.st_ino,
    }


def _load_cache(cache_file: Path) -> dict[str, dict[str, Any]]:
    try:
        data = json.loads(cache_file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as err:
        log.warning("Ignoring unreadable cache file %s: %s", cache_file, err)
        return {}
    if not isinstance(data, dict) or data.get("version") != CACHE_VERSION:
        return {}
    files = data.get("files")
    return files if isinstance(files, dict) else {}


def _save_cache(cache_file: Path, files: dict[str, dict[str, Any]]) -> None:
    """Write atomically (temporary file + rename) so an interrupted run never leaves half a cache."""
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{cache_file.name}.", dir=cache_file.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump({"version": CACHE_VERSION, "files": files}, f, separators=(",", ":"))
        os.replace(tmp, cache_file)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _inspect_task(item: tuple[Path, bool]) -> FileInfo:
    return inspect_image(item[0], mask=item[1])


def _inspect_many(
    items: Sequence[tuple[Path, bool]],
    *,
    workers: int | None = None,
    cache_file: str | Path | None = None,
    processes: bool = False,
) -> list[FileInfo]:
    """Inspect ``(path, is_mask)`` items, in order, reusing and updating the cache.

    ``processes=True`` uses a process pool instead of threads (kept for benchmarking: on the real sample
    it was no faster, and spawned workers would re-import the whole package).
    """
    items = [(p if isinstance(p, Path) else Path(p), bool(m)) for p, m in items]
    results: list[FileInfo | None] = [None] * len(items)
    cache = _load_cache(Path(cache_file)) if cache_file is not None else {}
    keys: list[tuple[str, dict[str, int]] | None] = [None] * len(items)
    todo: list[int] = []
    for i, (path, is_mask) in enumerate(items):
        if cache_file is not None:
            keys[i] = key = stat_key(path)
            entry = cache.get(("mask:" if is_mask else "image:") + key[0]) if key else None
            if entry and all(entry.get(name) == key[1][name] for name in STAT_FIELDS):
                results[i] = FileInfo.from_dict(entry["info"], path)
                continue
        todo.append(i)
    n_workers = default_workers() if workers is None else max(1, workers)
    n_workers = min(n_workers, max(1, len(todo)))
    log.info("Inspecting %d files with %d workers (%d from cache).", len(todo), n_workers, len(items) - len(todo))
    work = [items[i] for i in todo]
    if n_workers == 1:
        done = [_inspect_task(item) for item in work]
    elif processes:
        with ProcessPoolExecutor(n_workers) as pool:
            done = list(pool.map(_inspect_task, work, chunksize=max(1, len(work) // (n_workers * 8))))
    else:
        with ThreadPoolExecutor(n_workers) as pool:
            done = list(pool.map(_inspect_task, work))
    for i, info in zip(todo, done):
        results[i] = info
    if cache_file is not None and (todo or not Path(cache_file).exists()):
        for i in todo:
            key, info = keys[i], results[i]
            if key is None or info is None or (info.problem or "").startswith("cannot open"):
                continue  # vanished / unreadable-by-permission files are looked at again next time
            stored = {k: v for k, v in info.to_dict().items() if v is not None and k != "path"}
            kind = "mask:" if items[i][1] else "image:"
            cache[kind + key[0]] = {**key[1], "info": stored}
        cache = {k: v for k, v in cache.items() if os.path.lexists(k.split(":", 1)[1])}  # forget deleted files
        _save_cache(Path(cache_file), cache)
    return [r for r in results if r is not None]


def inspect_files(
    paths: Iterable[str | Path],
    *,
    masks: bool = False,
    workers: int | None = None,
    cache_file: str | Path | None = None,
) -> list[FileInfo]:
    """:func:`inspect_image` over many files in a thread pool, results in the order of ``paths``.

    Args:
        paths: image (or, with ``masks=True``, mask) files.
        workers: threads (default: the usable CPU cores, at most 16; 0 or 1 = in this thread).
        cache_file: a JSON file of earlier results keyed by absolute path and checked against the file's
            size, mtime, ctime and inode; only new or changed files are decoded again, and the file is updated.
    """
    return _inspect_many([(p, masks) for p in paths], workers=workers, cache_file=cache_file)


# --------------------------------------------------------------------------------------------
# Duplicates
# --------------------------------------------------------------------------------------------

_POPCOUNT8 = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def _popcount(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Bits set in each uint64 as uint8 (``np.bitwise_count`` on numpy >= 2, a byte table before)."""
    if hasattr(np, "bitwise_count"):
        return np.bitwise_count(x, out=out)
    return _POPCOUNT8[x.view(np.uint8)].reshape(*x.shape, 8).sum(axis=-1, dtype=np.uint8, out=out)


def hamming(a: int, b: int) -> int:
    """Hamming distance between two 64-bit hashes."""
    return (a ^ b).bit_count()


class _UnionFind:
    def __init__(self, n: int) -> None:
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        parent = self.parent
        root = i
        while parent[root] != root:
            root = parent[root]
        while parent[i] != root:  # path compression
            parent[i], i = root, parent[i]
        return root

    def union(self, i: int, j: int) -> None:
        ri, rj = self.find(i), self.find(j)
        if ri != rj:
            self.parent[max(ri, rj)] = min(ri, rj)


def duplicate_groups(
    infos: Sequence[FileInfo],
    max_distance: int = DEFAULT_MAX_DISTANCE,
    *,
    chunk: int = 256,
    confirm: Callable[[int, int], bool] | None = None,
) -> list[int]:
    """A group id per file: same id = exact duplicates (same ``content_hash``) or near duplicates (pHash
    Hamming distance <= ``max_distance``), transitively. Ids are 0, 1, ... in order of first appearance;
    a file without duplicates (or unreadable) has an id of its own. ``max_distance < 0``: exact only.

    ``confirm(i, j)``, when given, must also accept each pHash pair before it is joined (see
    :func:`thumbnail_confirmer`): chest films are alike at low frequencies, so a hash alone chains
    different patients into large groups. The pairwise distances are computed in blocks of ``chunk``
    rows (``chunk x n`` uint64 at a time).
    """
    n = len(infos)
    uf = _UnionFind(n)
    first: dict[str, int] = {}
    for i, info in enumerate(infos):
        if info.content_hash is not None:
            uf.union(first.setdefault(info.content_hash, i), i)
    index = np.array([i for i, info in enumerate(infos) if info.phash is not None], dtype=np.int64)
    if max_distance >= 0 and len(index) > 1:
        hashes = np.array([infos[i].phash for i in index], dtype=np.uint64)
        uniq, first_of, inverse = np.unique(hashes, return_index=True, return_inverse=True)
        for k, u in enumerate(inverse):  # identical pHash: distance 0
            a, b = int(index[first_of[u]]), int(index[k])
            if a != b and (confirm is None or confirm(a, b)):
                uf.union(a, b)
        rep = index[first_of]  # one file per distinct hash
        m = len(uniq)
        xor_buf, dist_buf = np.empty(min(chunk, m) * m, np.uint64), np.empty(min(chunk, m) * m, np.uint8)
        for start in range(0, m, chunk):
            block = uniq[start : start + chunk]
            shape = (len(block), m - start)
            xor = np.bitwise_xor(block[:, None], uniq[None, start:], out=xor_buf[: shape[0] * shape[1]].reshape(shape))
            dist = _popcount(xor, out=dist_buf[: shape[0] * shape[1]].reshape(shape))
            rows, cols = np.divmod(np.flatnonzero(dist <= max_distance), shape[1])  # 2D np.nonzero is much slower
            keep = cols > rows  # columns are offset by ``start`` like the rows: upper triangle, no self
            for a, b in zip(rep[rows[keep] + start], rep[cols[keep] + start]):
                if confirm is None or confirm(int(a), int(b)):
                    uf.union(int(a), int(b))
    ids: dict[int, int] = {}
    return [ids.setdefault(uf.find(i), len(ids)) for i in range(n)]


#: Pearson correlation of 64x64 thumbnails above which a pHash pair is a real near duplicate. Re-encodes,
#: resizes and brightness shifts of one film correlate at >= 0.999; different films lower.
MIN_THUMBNAIL_CORRELATION = 0.99


def thumbnail_confirmer(
    infos: Sequence[FileInfo], min_corr: float = MIN_THUMBNAIL_CORRELATION
) -> Callable[[int, int], bool]:
    """``confirm`` for :func:`duplicate_groups`: both files' 64x64 gray thumbnails correlate >= ``min_corr``.

    Thumbnails are decoded lazily (only files in candidate pairs) and kept for the call.
    """
    thumbs: dict[int, np.ndarray | None] = {}

    def thumb(i: int) -> np.ndarray | None:
        if i not in thumbs:
            try:
                gray, _ = decode_gray(Path(infos[i].path))
                small = cv2.resize(gray, (64, 64), interpolation=cv2.INTER_AREA).astype(np.float64)
                small -= small.mean()
                norm = np.linalg.norm(small)
                thumbs[i] = small / norm if norm > 0 else None
            except OSError:
                thumbs[i] = None
        return thumbs[i]

    def confirm(i: int, j: int) -> bool:
        a, b = thumb(i), thumb(j)
        return a is not None and b is not None and float((a * b).sum()) >= min_corr

    return confirm


def group_members(groups: Sequence[int]) -> list[list[int]]:
    """The indices of each group with more than one member, in order of first appearance."""
    members: dict[int, list[int]] = defaultdict(list)
    for i, g in enumerate(groups):
        members[g].append(i)
    return [m for m in members.values() if len(m) > 1]


def summarize_groups(groups: Sequence[int], labels: Sequence[Any]) -> dict[str, int]:
    """Counts for :func:`duplicate_groups`: groups with more than one member, the images in them, the
    groups spanning several labels and the largest group size."""
    multi = group_members(groups)
    return {
        "groups": len(multi),
        "images": sum(len(m) for m in multi),
        "cross_class_groups": sum(1 for m in multi if len({labels[i] for i in m}) > 1),
        "largest": max((len(m) for m in multi), default=0),
    }


# --------------------------------------------------------------------------------------------
# Screening the records a DataModule is about to train on
# --------------------------------------------------------------------------------------------


@dataclass
class Screening:
    """What :func:`screen_records` kept, dropped and grouped."""

    records: list[Record]
    groups: list[int]
    bad: list[tuple[Path, str]]
    non_binary_masks: list[Path]
    duplicates: dict[str, int]


def screen_records(
    records: Sequence[Record],
    *,
    on_bad_file: str = "error",
    duplicates: str = "near",
    max_distance: int = DEFAULT_MAX_DISTANCE,
    workers: int | None = None,
    cache_file: str | Path | None = None,
) -> Screening:
    """Decode every image (and mask) once, before training: bad files stop the run or are skipped.

    Args:
        on_bad_file: ``error`` raises :class:`DatasetError` listing every unreadable file and why;
            ``skip`` drops them (and the pair they belong to), counted and logged once.
        duplicates: ``near`` groups exact and perceptual-hash duplicates, ``exact`` only identical
            pixels, ``none`` no grouping. The groups feed the group-aware split.
    """
    if on_bad_file not in ("error", "skip"):
        raise ValueError(f"on_bad_file must be 'error' or 'skip', not {on_bad_file!r}.")
    if duplicates not in ("near", "exact", "none"):
        raise ValueError(f"duplicates must be one of near, exact, none, not {duplicates!r}.")
    records = list(records)
    images = inspect_files([r.path for r in records], workers=workers, cache_file=cache_file)
    with_masks = [r for r in records if r.mask_path is not None]
    masks = dict(
        zip(
            (r.mask_path for r in with_masks),
            inspect_files([r.mask_path for r in with_masks], masks=True, workers=workers, cache_file=cache_file),
        )
    )
    bad: list[tuple[Path, str]] = []
    kept: list[tuple[Record, FileInfo]] = []
    non_binary: list[Path] = []
    for rec, info in zip(records, images):
        problems = [(rec.path, info.problem)] if not info.ok else []
        mask = masks.get(rec.mask_path) if rec.mask_path is not None else None
        if mask is not None and not mask.ok:
            problems.append((rec.mask_path, mask.problem))
        elif mask is not None and mask.mask_binary is False:
            non_binary.append(rec.mask_path)
        if problems:
            bad.extend(problems)
        else:
            kept.append((rec, info))
    if bad and on_bad_file == "error":
        listing = "\n".join(f"  {path}: {problem}" for path, problem in bad)
        raise DatasetError(
            f"{len(bad)} unreadable file(s):\n{listing}\nRemove or replace them, or set data.on_bad_file: skip "
            "to train without them (`covid-lightning check-data ROOT`, or `--manifest FILE`, lists every problem)."
        )
    if bad:
        log.warning(
            "Skipped %d unreadable file(s) (on_bad_file=skip): %s",
            len(bad),
            "; ".join(f"{p} ({why})" for p, why in bad),
        )
    if non_binary:
        log.warning(
            "%d mask(s) hold values other than 0/255; they are binarised (> 127 = lung), e.g. %s",
            len(non_binary),
            non_binary[0],
        )
    kept_records = [r for r, _ in kept]
    if duplicates == "none":
        groups = list(range(len(kept)))
    else:
        infos = [i for _, i in kept]
        near = duplicates == "near"
        groups = duplicate_groups(infos, max_distance if near else -1, confirm=thumbnail_confirmer(infos))
    summary = summarize_groups(groups, [r.label for r in kept_records])
    if summary["groups"]:
        log.info(
            "%d duplicate group(s) (%d images, %d across classes) are each kept within one split.",
            summary["groups"],
            summary["images"],
            summary["cross_class_groups"],
        )
    return Screening(kept_records, groups, bad, non_binary, summary)


# --------------------------------------------------------------------------------------------
# The dataset report
# --------------------------------------------------------------------------------------------


def _image_files(folder: Path) -> list[Path]:
    """Images of ``folder``, broken symlinks included (they are reported as unreadable, not left out)."""
    return sorted(p for p in folder.iterdir() if is_image_entry(p)) if folder.is_dir() else []


def _subdirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []


def _examples(items: Sequence[Any], n: int) -> dict[str, Any]:
    return {"count": len(items), "examples": list(items[:n])}


@dataclass
class _Layout:
    """What a data source lists, before any file is decoded: the input of :func:`check_dataset`."""

    base: Path
    class_names: tuple[str, ...]
    images: list[tuple[Path, int]]
    masks: list[tuple[Path, int]]
    per_class: dict[str, dict[str, int]]
    unpaired: list[str]
    orphans: list[str]
    extra: list[str]
    missing: list[str]
    source: dict[str, Any]


def _kaggle_layout(root: str | Path) -> _Layout:
    """The Kaggle layout under ``root``: ``<Class>/images`` and ``<Class>/masks`` of the four classes."""
    base = find_dataset_root(root)
    rel = lambda p: p.relative_to(base).as_posix()  # noqa: E731

    extra = [p.name for p in _subdirs(base) if p.name not in CLASSES]
    images: list[tuple[Path, int]] = []
    masks: list[tuple[Path, int]] = []
    per_class: dict[str, dict[str, int]] = {}
    unpaired: list[str] = []
    orphans: list[str] = []
    for label, name in enumerate(CLASSES):
        class_dir = base / name
        if not class_dir.is_dir():
            continue
        image_dir, mask_dir = _class_image_dir(class_dir), class_dir / "masks"
        extra += [rel(p) for p in _subdirs(class_dir) if p not in (image_dir, mask_dir)]
        extra += [rel(p) for d in {image_dir, mask_dir} if d != class_dir for p in _subdirs(d)]
        class_images, class_masks = _image_files(image_dir), _image_files(mask_dir)
        image_names = {p.name for p in class_images}
        mask_names = {p.name for p in class_masks}
        class_unpaired = [rel(p) for p in class_images if p.name not in mask_names]
        class_orphans = [rel(p) for p in class_masks if p.name not in image_names]
        per_class[name] = {
            "images": len(class_images),
            "masks": len(class_masks),
            "pairs": len(image_names & mask_names),
            "unpaired_images": len(class_unpaired),
            "orphan_masks": len(class_orphans),
        }
        unpaired += class_unpaired
        orphans += class_orphans
        images += [(p, label) for p in class_images]
        masks += [(p, label) for p in class_masks]
    missing = [c for c in CLASSES if c not in per_class]
    return _Layout(base, CLASSES, images, masks, per_class, unpaired, orphans, extra, missing, {"kind": "kaggle"})


def _manifest_layout(manifest: str | Path) -> _Layout:
    """The rows of a manifest (:func:`~covid_lightning.data.scan.scan_manifest` as it is: a row's ``mask_path``
    pairs its image with that mask)."""
    path = Path(manifest).expanduser()
    columns_source = scan_manifest(path, with_masks=None)
    base, names = columns_source.base, columns_source.class_names
    per_class = {name: {"images": 0, "masks": 0, "pairs": 0, "unpaired_images": 0, "orphan_masks": 0} for name in names}
    images: list[tuple[Path, int]] = []
    masks: list[tuple[Path, int]] = []
    unpaired: list[str] = []
    for r in columns_source.records:
        row = per_class[r.class_name]
        row["images"] += 1
        images.append((r.path, r.label))
        mask = r.mask_path
        if mask is None:
            row["unpaired_images"] += 1
            unpaired.append(relative_path(r.path, base))
        else:
            row["masks"] += 1
            row["pairs"] += 1
            masks.append((mask, r.label))
    splits = columns_source.splits
    groups = {r.group for r in columns_source.records if r.group is not None}
    source = {
        "kind": "manifest",
        "manifest": str(path),
        "splits": dict(Counter(splits)) if splits is not None else None,
        "patient_groups": len(groups) if groups else None,
    }
    return _Layout(base, names, images, masks, per_class, unpaired, [], [], [], source)


def check_dataset(
    root: str | Path | None = None,
    *,
    manifest: str | Path | None = None,
    max_distance: int = DEFAULT_MAX_DISTANCE,
    workers: int | None = None,
    cache_file: str | Path | None = None,
    examples: int = 10,
) -> dict[str, Any]:
    """Decode every image and mask of the dataset and report what stands in the way of training.

    The data is the Kaggle layout under ``root``, or a manifest (``manifest``, or ``root`` naming a ``.csv`` /
    ``.parquet`` file). Raises :class:`DatasetError` when ``root`` does not exist or holds no class folder, or
    the manifest is malformed. The report (a JSON-serialisable dict, paths relative to the dataset folder or
    the manifest's folder) has ``trainable`` and the ``blocking`` reasons: no image at all, or any unreadable
    image or mask (training stops on bad files). Everything else (duplicates, unpaired files, odd masks,
    missing classes) is a ``warning``.
    """
    if manifest is None and root is not None and is_manifest_file(root):
        manifest = root
    if manifest is not None:
        layout = _manifest_layout(manifest)
    elif root is not None:
        layout = _kaggle_layout(root)
    else:
        raise DatasetError("check-data needs a dataset folder (ROOT) or a manifest (--manifest FILE).")
    base, class_names = layout.base, layout.class_names
    images, masks, per_class = layout.images, layout.masks, layout.per_class
    unpaired, orphans, extra, missing = layout.unpaired, layout.orphans, layout.extra, layout.missing
    rel = lambda p: relative_path(p, base)  # noqa: E731
    expected_mask_size = (MASK_SIZE, MASK_SIZE) if layout.source["kind"] == "kaggle" else None

    infos = _inspect_many(
        [(p, False) for p, _ in images] + [(p, True) for p, _ in masks], workers=workers, cache_file=cache_file
    )
    image_infos, mask_infos = infos[: len(images)], infos[len(images) :]
    labels = [label for _, label in images]

    def stats(group: Sequence[FileInfo]) -> dict[str, Any]:
        good = [i for i in group if i.ok]
        return {
            "total": len(group),
            "readable": len(good),
            "sizes": dict(Counter(i.size for i in good).most_common()),
            "modes": dict(Counter(i.mode for i in good).most_common()),
            "formats": dict(Counter(i.format for i in good).most_common()),
        }

    unreadable = [
        {"path": rel(i.path), "kind": kind, "problem": i.problem}
        for kind, group in (("image", image_infos), ("mask", mask_infos))
        for i in group
        if not i.ok
    ]
    good_masks = [i for i in mask_infos if i.ok]
    non_binary = [f"{rel(i.path)} ({i.mask_values})" for i in good_masks if not i.mask_binary]
    zero_one = [rel(i.path) for i in good_masks if i.mask_values in ("0,1", "1")]
    wrong_size = [
        f"{rel(i.path)} ({i.size})"
        for i in good_masks
        if expected_mask_size is not None and (i.width, i.height) != expected_mask_size
    ]

    groups = duplicate_groups(image_infos, max_distance=max_distance, confirm=thumbnail_confirmer(image_infos))
    multi = sorted(
        group_members(groups),
        key=lambda m: (-(len({labels[i] for i in m}) > 1), -len(m), m[0]),
    )
    dup_examples = []
    for m in multi[:examples]:
        hashes = [image_infos[i].phash for i in m]
        dup_examples.append(
            {
                "classes": [class_names[k] for k in sorted({labels[i] for i in m})],
                "exact": len({image_infos[i].content_hash for i in m}) == 1,
                "max_phash_distance": max(hamming(a, b) for a in hashes for b in hashes),
                "paths": [rel(image_infos[i].path) for i in m],
            }
        )
    duplicates = {"max_distance": max_distance, **summarize_groups(groups, labels), "examples": dup_examples}

    blocking: list[str] = []
    warnings: list[str] = []
    bad_images = sum(1 for u in unreadable if u["kind"] == "image")
    bad_masks = len(unreadable) - bad_images
    if not images:
        blocking.append(f"no images found under {base} (expected <Class>/images/*.png)")
    if bad_images:
        blocking.append(f"{bad_images} unreadable image file(s): training stops on bad files; remove or replace them")
    if bad_masks:
        blocking.append(f"{bad_masks} unreadable mask file(s): segmentation stops on bad files; remove or replace them")
    if missing:
        warnings.append(f"missing class folder(s): {', '.join(missing)}")
    empty = [c for c, v in per_class.items() if v["images"] == 0]
    if empty:
        warnings.append(f"class folder(s) without images: {', '.join(empty)}")
    if images and not any(v["pairs"] for v in per_class.values()):
        warnings.append("no image+mask pairs: segmentation cannot be trained")
    if non_binary:
        warnings.append(f"{len(non_binary)} mask(s) with values other than 0/255 (read as lung where > 127)")
    if zero_one:
        warnings.append(f"{len(zero_one)} mask(s) with values 0/1: load_mask reads them as empty (lung = > 127)")
    if wrong_size:
        warnings.append(f"{len(wrong_size)} mask(s) not {MASK_SIZE}x{MASK_SIZE}")  # Kaggle layout only
    if orphans:
        warnings.append(f"{len(orphans)} mask(s) without an image")
    if duplicates["groups"]:
        warnings.append(
            f"{duplicates['groups']} duplicate group(s) ({duplicates['images']} images, "
            f"{duplicates['cross_class_groups']} across classes): split by group to avoid leakage"
        )

    return {
        "root": str(base),
        "source": layout.source,
        "class_names": list(class_names),
        "classes": per_class,
        "missing_classes": missing,
        "extra_folders": extra,
        "images": stats(image_infos),
        "masks": {
            **stats(mask_infos),
            "expected_size": f"{MASK_SIZE}x{MASK_SIZE}" if expected_mask_size else None,
            "non_binary": _examples(non_binary, examples),
            "zero_one": _examples(zero_one, examples),
            "wrong_size": _examples(wrong_size, examples),
        },
        "unpaired_images": _examples(unpaired, examples),
        "orphan_masks": _examples(orphans, examples),
        "unreadable": unreadable,
        "duplicates": duplicates,
        "trainable": not blocking,
        "blocking": blocking,
        "warnings": warnings,
    }


def _counts(d: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in d.items()) or "-"


def format_report(report: dict[str, Any]) -> str:
    """A readable text summary of :func:`check_dataset`'s report."""
    source = report.get("source") or {"kind": "kaggle"}
    if source["kind"] == "manifest":
        lines = [f"Manifest: {source['manifest']} (paths relative to {report['root']})"]
        if source.get("splits"):
            lines.append(f"Split given by the manifest: {_counts(source['splits'])}")
        if source.get("patient_groups"):
            lines.append(f"Patient groups: {source['patient_groups']} (each kept within one split)")
        lines.append("")
    else:
        lines = [f"Dataset: {report['root']}", ""]
    cols = ("images", "masks", "pairs", "unpaired_images", "orphan_masks")
    heads = ("images", "masks", "pairs", "unpaired", "orphan masks")
    lines.append(f"{'class':<16}" + "".join(f"{h:>14}" for h in heads))
    totals = dict.fromkeys(cols, 0)
    for name in report.get("class_names", CLASSES):
        row = report["classes"].get(name)
        if row is None:
            lines.append(f"{name:<16}{'(missing)':>14}")
            continue
        lines.append(f"{name:<16}" + "".join(f"{row[c]:>14}" for c in cols))
        for c in cols:
            totals[c] += row[c]
    lines.append(f"{'total':<16}" + "".join(f"{totals[c]:>14}" for c in cols))
    lines.append("")
    for kind in ("images", "masks"):
        s = report[kind]
        lines.append(
            f"{kind.capitalize()}: {s['readable']} of {s['total']} readable; sizes: {_counts(s['sizes'])}; "
            f"modes: {_counts(s['modes'])}; formats: {_counts(s['formats'])}"
        )
    m = report["masks"]
    for key, what in (
        ("non_binary", "values other than 0/255"),
        ("zero_one", "values 0/1"),
        ("wrong_size", f"size not {m['expected_size']}"),
    ):
        if m[key]["count"]:
            lines.append(f"  masks with {what}: {m[key]['count']} (e.g. {', '.join(m[key]['examples'])})")
    for key, what in (("unpaired_images", "Images without a mask"), ("orphan_masks", "Masks without an image")):
        e = report[key]
        lines.append(f"{what}: {e['count']}" + (f" (e.g. {', '.join(e['examples'][:5])})" if e["count"] else ""))
    lines.append(f"Unreadable files: {len(report['unreadable'])}")
    lines += [f"  {u['path']} ({u['kind']}): {u['problem']}" for u in report["unreadable"]]
    d = report["duplicates"]
    lines.append(
        f"Duplicate groups (same pixels or pHash distance <= {d['max_distance']}): {d['groups']} groups, "
        f"{d['images']} images, {d['cross_class_groups']} across classes"
    )
    for g in d["examples"]:
        how = "exact" if g["exact"] else f"pHash distance <= {g['max_phash_distance']}"
        lines.append(f"  [{'/'.join(g['classes'])}; {how}] {', '.join(g['paths'])}")
    if d["groups"] > len(d["examples"]):
        lines.append(f"  ... {d['groups'] - len(d['examples'])} more group(s) in the JSON report")
    if report["extra_folders"]:
        lines.append(f"Ignored folders: {', '.join(report['extra_folders'])}")
    if report["missing_classes"]:
        lines.append(f"Missing classes: {', '.join(report['missing_classes'])}")
    lines.append("")
    lines += [f"Warning: {w}" for w in report["warnings"]]
    lines += [f"BLOCKING: {b}" for b in report["blocking"]]
    lines.append("Trainable: " + ("yes" if report["trainable"] else "NO"))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """``covid-lightning check-data ROOT|--manifest FILE [--json OUT] [--max-distance N] [--workers N] [--cache FILE]``.

    Exit status: 0 trainable, 1 not trainable (bad files, no images), 2 no dataset at ``ROOT`` (or a malformed
    manifest).
    """
    parser = argparse.ArgumentParser(
        prog="covid-lightning check-data",
        description="Decode every image and mask of a COVID-19 Radiography Database folder, or of the files a "
        "manifest lists, and report bad, unpaired and duplicate files.",
    )
    parser.add_argument(
        "root",
        nargs="?",
        help="the dataset folder, a folder containing COVID-19_Radiography_Dataset/, or a manifest .csv/.parquet",
    )
    parser.add_argument("--manifest", type=Path, metavar="FILE", help="a manifest (path, label, mask_path, ...)")
    parser.add_argument("--json", type=Path, metavar="OUT", help="also write the full report as JSON here")
    parser.add_argument(
        "--max-distance", type=int, default=DEFAULT_MAX_DISTANCE, help="pHash Hamming distance of near duplicates"
    )
    parser.add_argument("--workers", type=int, default=None, help="decoding threads (default: CPU cores)")
    parser.add_argument("--cache", type=Path, metavar="FILE", help="JSON cache of per-file results for re-runs")
    parser.add_argument("--examples", type=int, default=10, help="examples listed per finding")
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    if (args.root is None) == (args.manifest is None):
        parser.error("give the dataset folder (ROOT) or --manifest FILE, one of them")
    try:
        report = check_dataset(
            args.root,
            manifest=args.manifest,
            max_distance=args.max_distance,
            workers=args.workers,
            cache_file=args.cache,
            examples=args.examples,
        )
    except DatasetError as err:
        print(f"check-data: {err}", file=sys.stderr)
        return 2
    print(format_report(report))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return 0 if report["trainable"] else 1


def inspection_cache_file(dataset_root: str | Path) -> Path:
    """Where the per-file inspection results of a dataset folder are cached (the user's cache dir:
    dataset folders are often read-only)."""
    base = cache_dir("inspect")
    key = hashlib.sha1(str(Path(dataset_root).resolve()).encode()).hexdigest()[:16]
    return base / f"{key}.json"


if __name__ == "__main__":
    sys.exit(main())
