"""Dataset hygiene: decode every file once, find bad, unpaired and (near-)duplicate files; screen and report."""

from __future__ import annotations

import hashlib
import logging
import os
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import cache
from json import dumps, loads
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np
from PIL import Image

from covid_lightning.constants import CLASSES, MASK_SIZE
from covid_lightning.data import scan
from covid_lightning.data.image_cache import CACHE_VERSION, atomic_path, stat_key, thread_map
from covid_lightning.data.scan import DatasetError, Record, relative_path
from covid_lightning.data.transforms import decode_rgb, is_dicom, read_dicom
from covid_lightning.runtime import cache_dir

log = logging.getLogger(__name__)

#: pHash Hamming distance up to which two images are near duplicates (re-encodes, resizes, brightness shifts)
DEFAULT_MAX_DISTANCE = 4
#: correlation of 64x64 thumbnails that confirms a pHash pair: chest films are alike at low frequencies
MIN_THUMBNAIL_CORRELATION = 0.99
#: the per-class counts of :func:`check_dataset`, and the examples it lists per finding
COLUMNS, EXAMPLES = ("images", "masks", "pairs", "unpaired_images", "orphan_masks"), 10
Confirm = Callable[[int, int], bool]


@dataclass(frozen=True)
class FileInfo:
    """What decoding one file found: a ``problem``, or for an image hashes of its gray pixels, for a mask its values."""

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
    mask_binary: bool | None = None  # values within {0, 255} or {0, 1}

    @property
    def size(self) -> str | None:
        return None if self.width is None else f"{self.width}x{self.height}"


def phash(gray: np.ndarray) -> int:
    """64-bit DCT perceptual hash (8x8 lowest frequencies of a 32x32 resize); robust to re-encoding and resizing."""
    low = cv2.dct(cv2.resize(gray, (32, 32), interpolation=cv2.INTER_AREA).astype(np.float32))[1:9, 1:9].ravel()
    ranked = np.sort(low)
    return int(np.packbits(low > (ranked[31] + ranked[32]) / 2).view(">u8")[0])


def inspect_image(path: str | Path, *, mask: bool = False) -> FileInfo:
    """Decode ``path`` fully as training does and describe it; a bad file is described, never raised."""
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            return FileInfo(path, ok=False, problem="zero-byte file")
    except OSError as err:
        return FileInfo(path, ok=False, problem=scan.broken_link_problem(path) or f"cannot open: {err.strerror or err}")
    fmt = "DICOM" if is_dicom(path) else None
    try:
        if fmt:
            rgb, mode = read_dicom(path)
        else:
            with Image.open(path) as im:
                mode, fmt = im.mode, im.format
            rgb = decode_rgb(path)
    except MemoryError:
        raise
    except Exception as err:
        why = str(err).strip() or type(err).__name__
        why = f"{'truncated' if 'truncated' in why else 'corrupt'} {fmt}: {why}"
        return FileInfo(path, ok=False, problem=why if fmt else "not an image: cannot identify image file")
    gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)  # exact for gray stored as RGB
    h, w = gray.shape
    if mask:
        v = np.flatnonzero(np.bincount(gray.ravel(), minlength=256))
        text = ",".join(map(str, v)) if len(v) <= 4 else f"{len(v)} values in {v[0]}..{v[-1]}"
        found = {"mask_values": text, "mask_binary": set(v) <= {0, 255} or set(v) <= {0, 1}}
    else:
        found = {"content_hash": hashlib.sha256(f"{w}x{h}:".encode() + gray.tobytes()).hexdigest()}
        found["phash"] = phash(gray)
    return FileInfo(path, True, None, w, h, mode, fmt, **found)  # type: ignore[arg-type]


def inspection_cache_file(dataset_root: str | Path) -> Path:
    """The inspection cache of a dataset folder (in the user's cache dir: dataset folders are often read-only)."""
    return cache_dir("inspect") / f"{hashlib.sha1(str(Path(dataset_root).resolve()).encode()).hexdigest()[:16]}.json"


def inspect_files(
    paths: Sequence[str | Path],
    *,
    masks: bool | Sequence[bool] = False,
    workers: int | None = None,
    cache_file: str | Path | None = None,
) -> list[FileInfo]:
    """:func:`inspect_image` over many files, in order, in threads; ``cache_file`` reuses unchanged files' results."""
    kinds = [masks] * len(paths) if isinstance(masks, bool) else list(masks)
    keys = [stat_key(p) if cache_file is not None else None for p in paths]
    names = [f"{'mask' if m else 'image'}:{k[0]}" if k else "" for m, k in zip(kinds, keys)]
    try:
        cache = loads(Path(cache_file).read_text(encoding="utf-8")) if cache_file is not None else {}
        cache = cache["files"] if cache and cache["version"] == CACHE_VERSION else {}
    except (OSError, ValueError, KeyError, TypeError):  # none yet, or broken: start afresh
        cache = {}
    results = [
        FileInfo(Path(p), **entry["info"]) if key and (entry := cache.get(name)) and entry["stat"] == key[1] else None
        for p, key, name in zip(paths, keys, names)
    ]
    todo = [i for i, r in enumerate(results) if r is None]
    log.info("Inspecting %d files (%d from cache).", len(todo), len(paths) - len(todo))
    for i, info in zip(todo, thread_map(lambda i: inspect_image(paths[i], mask=kinds[i]), todo, workers)):
        results[i] = info
        if keys[i] and not (info.problem or "").startswith("cannot open"):  # unreadable by permission: ask again
            stored = {k: v for k, v in vars(info).items() if v is not None and k != "path"}
            cache[names[i]] = {"stat": keys[i][1], "info": stored}
    if cache_file is not None and (todo or not Path(cache_file).exists()):
        files = {k: v for k, v in cache.items() if os.path.lexists(k.split(":", 1)[1])}  # forget deleted files
        with atomic_path(Path(cache_file)) as tmp:
            tmp.write_text(dumps({"version": CACHE_VERSION, "files": files}, separators=(",", ":")), encoding="utf-8")
    return results  # type: ignore[return-value]


def link_groups(n: int, pairs: Iterable[tuple[int, int]]) -> list[int]:
    """Group ids of ``n`` items joined by ``pairs``, transitively: 0, 1, ... in order of first appearance."""
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = i = parent[parent[i]]
        return i

    for a, b in pairs:
        ra, rb = find(a), find(b)
        parent[max(ra, rb)] = min(ra, rb)
    ids: dict[int, int] = {}
    return [ids.setdefault(find(i), len(ids)) for i in range(n)]


def duplicate_groups(
    infos: Sequence[FileInfo],
    max_distance: int = DEFAULT_MAX_DISTANCE,
    *,
    chunk: int = 256,
    confirm: Confirm | None = None,
) -> list[int]:
    """A group id per file: exact and near (pHash distance <= ``max_distance``) duplicates, transitively."""
    bits = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)  # per byte, for numpy < 2
    popcount = getattr(np, "bitwise_count", lambda x: bits[x.view(np.uint8)].reshape(*x.shape, 8).sum(-1))

    def pairs() -> Iterator[tuple[int, int]]:
        first: dict[str, int] = {}
        yield from ((first.setdefault(f.content_hash, i), i) for i, f in enumerate(infos) if f.content_hash)
        index = np.array([i for i, info in enumerate(infos) if info.phash is not None], dtype=np.int64)
        if max_distance < 0 or len(index) < 2:
            return
        hashes = np.array([infos[i].phash for i in index], dtype=np.uint64)
        uniq, first_of, inverse = np.unique(hashes, return_index=True, return_inverse=True)
        rep = index[first_of]  # one file per distinct hash
        candidates = [(rep[u], index[k]) for k, u in enumerate(inverse) if rep[u] != index[k]]  # same pHash
        for start in range(0, len(uniq), chunk):
            dist = popcount(uniq[start : start + chunk, None] ^ uniq[None, start:])
            rows, cols = np.divmod(np.flatnonzero(dist <= max_distance), dist.shape[1])
            keep = cols > rows  # upper triangle, no self
            candidates += zip(rep[rows[keep] + start], rep[cols[keep] + start])
        yield from ((int(a), int(b)) for a, b in candidates if confirm is None or confirm(int(a), int(b)))

    return link_groups(len(infos), pairs())


def thumbnail_confirmer(infos: Sequence[FileInfo], min_corr: float = MIN_THUMBNAIL_CORRELATION) -> Confirm:
    """``confirm`` for :func:`duplicate_groups`: the files' 64x64 gray thumbnails correlate >= ``min_corr``."""

    @cache
    def thumb(i: int) -> np.ndarray:
        try:
            gray = cv2.cvtColor(decode_rgb(infos[i].path), cv2.COLOR_RGB2GRAY)
        except OSError:
            return np.zeros((64, 64))
        small = cv2.resize(gray, (64, 64), interpolation=cv2.INTER_AREA).astype(np.float64)
        small -= small.mean()
        return small / max(float(np.linalg.norm(small)), 1e-9)  # a flat or unreadable image matches nothing

    return lambda i, j: float((thumb(i) * thumb(j)).sum()) >= min_corr


def group_members(groups: Sequence[int]) -> list[list[int]]:
    """The indices of each group with more than one member, in order of first appearance."""
    members: dict[int, list[int]] = defaultdict(list)
    for i, g in enumerate(groups):
        members[g].append(i)
    return [m for m in members.values() if len(m) > 1]


def summarize_groups(groups: Sequence[int], labels: Sequence[Any]) -> dict[str, int]:
    """Groups with more than one member, their images, those spanning several labels, the largest size."""
    multi = group_members(groups)
    return {
        "groups": len(multi),
        "images": sum(map(len, multi)),
        "cross_class_groups": sum(len({labels[i] for i in m}) > 1 for m in multi),
        "largest": max(map(len, multi), default=0),
    }


@dataclass
class Screening:
    """What :func:`screen_records` kept, their duplicate groups and the groups' summary."""

    records: list[Record]
    groups: list[int]
    duplicates: dict[str, int]


def screen_records(
    records: Sequence[Record],
    *,
    on_bad_file: Literal["error", "skip"] = "error",
    duplicates: Literal["near", "exact", "none"] = "near",
    max_distance: int = DEFAULT_MAX_DISTANCE,
    workers: int | None = None,
    cache_file: str | Path | None = None,
) -> Screening:
    """Decode every image (and mask) once, before training: drop or refuse bad files, group duplicates for the split."""
    masks = [r.mask_path for r in records if r.mask_path is not None]
    kinds = [False] * len(records) + [True] * len(masks)
    infos = inspect_files([r.path for r in records] + masks, masks=kinds, workers=workers, cache_file=cache_file)
    mask_info = dict(zip(masks, infos[len(records) :]))
    problems = [[f for f in (info, mask_info.get(r.mask_path)) if f and not f.ok] for r, info in zip(records, infos)]
    bad = [f for found in problems for f in found]
    listing = "".join(f"\n  {f.path}: {f.problem}" for f in bad)
    if bad and on_bad_file == "error":
        raise DatasetError(
            f"{len(bad)} unreadable file(s):{listing}\nRemove or replace them, or set data.on_bad_file: skip to train "
            "without them (`covid-lightning check-data DATA`, a folder or a manifest, lists every problem)."
        )
    if bad:
        log.warning("Skipped %d unreadable file(s) (on_bad_file=skip):%s", len(bad), listing)
    non_binary = [m.path for m in mask_info.values() if m.ok and not m.mask_binary]
    if non_binary:
        log.warning("%d mask(s) with values other than 0/255, read as lung > 127: %s", len(non_binary), non_binary)
    kept = [(r, info) for r, info, found in zip(records, infos, problems) if not found]
    infos = [info for _, info in kept]
    distance = {"near": max_distance, "exact": -1}.get(duplicates)
    confirm = thumbnail_confirmer(infos)
    groups = list(range(len(kept))) if distance is None else duplicate_groups(infos, distance, confirm=confirm)
    summary = summarize_groups(groups, [r.label for r, _ in kept])
    if summary["groups"]:
        log.info(
            "%d duplicate group(s) (%d images, %d across classes, largest %d) each kept in one split.",
            *summary.values(),
        )
    return Screening([r for r, _ in kept], groups, summary)


def _kaggle_extras(base: Path, paired: set[Path]) -> tuple[list[str], list[tuple[Path, str]]]:
    """The folders the Kaggle layout does not read, and the masks without an image (with their class)."""

    def subdirs(folder: Path) -> list[Path]:
        return sorted(p for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []

    extra = [p.name for p in subdirs(base) if p.name not in CLASSES]
    orphans: list[tuple[Path, str]] = []
    for name in CLASSES:
        class_dir = base / name
        image_dir, mask_dir = scan.class_image_dir(class_dir), class_dir / "masks"
        unused = [p for p in subdirs(class_dir) if p not in (image_dir, mask_dir)]
        unused += [p for d in {image_dir, mask_dir} - {class_dir} for p in subdirs(d)]
        extra += [relative_path(p, base) for p in unused]
        orphans += [(p, name) for p in scan.image_files(mask_dir) if p not in paired]
    return extra, orphans


def check_dataset(
    root: str | Path,
    *,
    max_distance: int = DEFAULT_MAX_DISTANCE,
    workers: int | None = None,
    cache_file: str | Path | None = None,
) -> dict[str, Any]:
    """Decode every image and mask of a dataset and report, as a JSON-ready dict, what stands in the way of training
    (``blocking``) and ``warnings``; per-file results are cached (shared with training)."""
    source = scan.read_records(root, with_masks=None)
    base, class_names, records = source.base, source.class_names, source.records
    kaggle, rel = source.manifest is None, lambda p: relative_path(p, base)
    examples = lambda items: {"count": len(items), "examples": list(items[:EXAMPLES])}  # noqa: E731
    extra, orphans = _kaggle_extras(base, {r.mask_path for r in records}) if kaggle else ([], [])
    missing = [c for c in CLASSES if not (base / c).is_dir()] if kaggle else []
    keys = {True: ("images", "masks", "pairs"), False: ("images", "unpaired_images")}
    counts = Counter((r.class_name, k) for r in records for k in keys[r.mask_path is not None])
    counts.update((name, k) for _, name in orphans for k in ("masks", "orphan_masks"))
    masks = [r.mask_path for r in records if r.mask_path] + [p for p, _ in orphans]
    paths, kinds = [r.path for r in records] + masks, [False] * len(records) + [True] * len(masks)
    infos = inspect_files(paths, masks=kinds, workers=workers, cache_file=cache_file or inspection_cache_file(base))
    images, good_masks = infos[: len(records)], [i for i in infos[len(records) :] if i.ok]
    labels = [r.label for r in records]

    def stats(group: Sequence[FileInfo]) -> dict[str, Any]:
        good = [i for i in group if i.ok]
        found = {f"{k}s": dict(Counter(getattr(i, k) for i in good).most_common()) for k in ("size", "mode", "format")}
        return {"total": len(group), "readable": len(good), **found}

    unreadable = [{"path": rel(i.path), "kind": "mask" if m else "image", "problem": i.problem}
                  for i, m in zip(infos, kinds) if not i.ok]  # fmt: skip
    non_binary = [f"{rel(i.path)} ({i.mask_values})" for i in good_masks if not i.mask_binary]
    zero_one = [rel(i.path) for i in good_masks if i.mask_values in ("0,1", "1")]
    size = f"{MASK_SIZE}x{MASK_SIZE}" if kaggle else None
    wrong_size = [f"{rel(i.path)} ({i.size})" for i in good_masks if size and i.size != size]
    groups = duplicate_groups(images, max_distance=max_distance, confirm=thumbnail_confirmer(images))
    multi = sorted(group_members(groups), key=lambda m: (-(len({labels[i] for i in m}) > 1), -len(m), m[0]))
    dups = {"max_distance": max_distance, **summarize_groups(groups, labels), "examples": [
        {
            "classes": [class_names[k] for k in sorted({labels[i] for i in m})],
            "exact": len({images[i].content_hash for i in m}) == 1,
            "max_phash_distance": max((images[a].phash ^ images[b].phash).bit_count() for a in m for b in m),
            "paths": [rel(images[i].path) for i in m],
        }
        for m in multi[:EXAMPLES]
    ]}  # fmt: skip
    bad_images = sum(u["kind"] == "image" for u in unreadable)
    bad_masks, stops = len(unreadable) - bad_images, "stops on bad files; remove or replace them"
    empty = [c for c in class_names if c not in missing and not counts[c, "images"]]
    blocking = [
        (not records, f"no images found under {base} (expected <Class>/images/*.png)"),
        (bad_images, f"{bad_images} unreadable image file(s): training {stops}"),
        (bad_masks, f"{bad_masks} unreadable mask file(s): segmentation {stops}"),
    ]
    warnings = [
        (missing, f"missing class folder(s): {', '.join(missing)}"),
        (empty, f"class folder(s) without images: {', '.join(empty)}"),
        (records and not any(r.mask_path for r in records), "no image+mask pairs: segmentation cannot be trained"),
        (non_binary, f"{len(non_binary)} mask(s) with values other than 0/255 (read as lung where > 127)"),
        (zero_one, f"{len(zero_one)} mask(s) with values 0/1: load_mask reads them as empty (lung = > 127)"),
        (wrong_size, f"{len(wrong_size)} mask(s) not {size}"),
        (orphans, f"{len(orphans)} mask(s) without an image"),
        (dups["groups"], f"{dups['groups']} duplicate group(s) ({dups['images']} images, "
         f"{dups['cross_class_groups']} across classes): split by group to avoid leakage"),
    ]  # fmt: skip
    patients = {r.group for r in records if r.group is not None}
    splits = dict(Counter(source.splits)) if source.splits is not None else None
    manifest = {"kind": "manifest", "manifest": str(source.manifest), "splits": splits, "patient_groups": len(patients)}
    return {
        "root": str(base),
        "source": {"kind": "kaggle"} if kaggle else manifest,
        "class_names": list(class_names),
        "classes": {n: {k: counts[n, k] for k in COLUMNS} for n in class_names if n not in missing},
        "missing_classes": missing,
        "extra_folders": extra,
        "images": stats(images),
        "masks": {
            **stats(infos[len(records) :]),
            "expected_size": size,
            "non_binary": examples(non_binary),
            "zero_one": examples(zero_one),
            "wrong_size": examples(wrong_size),
        },  # fmt: skip
        "unpaired_images": examples([rel(r.path) for r in records if r.mask_path is None]),
        "orphan_masks": examples([rel(p) for p, _ in orphans]),
        "unreadable": unreadable,
        "duplicates": dups,
        "trainable": not any(found for found, _ in blocking),
        "blocking": [message for found, message in blocking if found],
        "warnings": [message for found, message in warnings if found],
    }


def format_report(report: dict[str, Any]) -> str:
    """The text summary of :func:`check_dataset`'s report (the JSON report lists every example)."""
    source, counts = report["source"], lambda d: ", ".join(f"{k} {v}" for k, v in d.items()) or "-"
    lines = [f"Dataset: {report['root']}"]
    if source["kind"] == "manifest":
        lines = [f"Manifest: {source['manifest']} (paths relative to {report['root']})"]
        if source["splits"]:
            lines.append(f"Split given by the manifest: {counts(source['splits'])}")
        if source["patient_groups"]:
            lines.append(f"Patient groups: {source['patient_groups']} (each kept within one split)")
    rows = [(name, report["classes"].get(name)) for name in report["class_names"]]
    rows.append(("total", {c: sum(row[c] for row in report["classes"].values()) for c in COLUMNS}))
    heads = ("images", "masks", "pairs", "unpaired", "orphan masks")
    lines += ["", f"{'class':<16}" + "".join(f"{h:>14}" for h in heads)]
    lines += [f"{n:<16}" + ("".join(f"{r[c]:>14}" for c in COLUMNS) if r else f"{'(missing)':>14}") for n, r in rows]
    for kind in ("images", "masks"):
        s = report[kind]
        found = "; ".join(f"{k}: {counts(s[k])}" for k in ("sizes", "modes", "formats"))
        lines.append(f"{kind.capitalize()}: {s['readable']} of {s['total']} readable; {found}")
    lines += [f"Unreadable: {u['path']} ({u['kind']}): {u['problem']}" for u in report["unreadable"]]
    d = report["duplicates"]
    lines.append(f"Duplicate groups (same pixels or pHash distance <= {d['max_distance']}): {d['groups']}")
    lines += [f"  [{'/'.join(g['classes'])}] {', '.join(g['paths'])}" for g in d["examples"]]
    if report["extra_folders"]:
        lines.append(f"Ignored folders: {', '.join(report['extra_folders'])}")
    lines += ["", *(f"Warning: {w}" for w in report["warnings"]), *(f"BLOCKING: {b}" for b in report["blocking"])]
    return "\n".join([*lines, "Trainable: " + ("yes" if report["trainable"] else "NO")])


def check_data(
    root: Path, json: Path | None = None, max_distance: int = DEFAULT_MAX_DISTANCE, workers: int | None = None
) -> int:
    """Report a dataset's counts, unreadable, unpaired and duplicate files; exit status 1 if it cannot be trained.

    Args:
        root: the dataset folder, a folder holding COVID-19_Radiography_Dataset/, or a manifest (.csv/.parquet).
        json: also write the full report as JSON to this file.
        max_distance: pHash Hamming distance up to which two images are near duplicates.
        workers: decoding threads (default: the usable CPUs).
    """
    report = check_dataset(root, max_distance=max_distance, workers=workers)
    print(format_report(report), flush=True)
    if json is not None:
        json.parent.mkdir(parents=True, exist_ok=True)
        json.write_text(dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return 0 if report["trainable"] else 1
