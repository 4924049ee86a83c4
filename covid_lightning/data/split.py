"""Seeded stratified, group-aware train/val/test split of records, and its CSV manifest (``split.csv``)."""

from __future__ import annotations

import csv
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from covid_lightning.data.hygiene import Screening, screen_records
from covid_lightning.data.scan import CLASSES, DatasetError, Record, relative_path

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
MANIFEST_FIELDS = ("path", "mask_path", "label", "class_name", "split")
#: optional column: the duplicate group of the image (same group = same or near-same image, same split)
GROUP_FIELD = "group"


def stratified_split(
    labels: Sequence[int],
    val_fraction: float = 0.3,
    test_fraction: float = 0.0,
    seed: int = 42,
    groups: Sequence[int] | None = None,
) -> list[str]:
    """Assign each item to ``train``/``val``/``test``, class by class, keeping each group in one split.

    Per class, the groups (by default every item is its own group) are shuffled with a generator
    seeded by ``seed`` and taken in that order: a group goes to val while val has room for it
    (``round(n * val_fraction)`` items of the class), then to test likewise, else to train. With
    singleton groups this is an exact stratified split; with duplicate groups (the same image twice)
    no group straddles two splits. A group is filed under the class of its first item.
    """
    if not 0 <= val_fraction < 1 or not 0 <= test_fraction < 1 or val_fraction + test_fraction >= 1:
        raise ValueError(
            f"val_fraction={val_fraction} and test_fraction={test_fraction} must be in [0, 1) with sum < 1."
        )
    labels = np.asarray(labels)
    groups = np.arange(len(labels)) if groups is None else np.asarray(groups)
    if len(groups) != len(labels):
        raise ValueError(f"{len(groups)} group ids for {len(labels)} items.")
    rng = np.random.default_rng(seed)
    out = np.full(len(labels), "train", dtype=object)
    members: dict[int, list[int]] = {}
    for i, g in enumerate(groups.tolist()):
        members.setdefault(g, []).append(i)
    for label in np.unique(labels):
        class_groups = [g for g in sorted(members) if labels[members[g][0]] == label]
        n = sum(len(members[g]) for g in class_groups)
        room = {"val": int(round(n * val_fraction)), "test": int(round(n * test_fraction))}
        for k in rng.permutation(len(class_groups)):
            idx = members[class_groups[k]]
            for split in ("val", "test"):
                if len(idx) <= room[split]:
                    room[split] -= len(idx)
                    out[idx] = split
                    break
    return out.tolist()


def merge_groups(duplicates: Sequence[int], patients: Sequence[str | None]) -> list[int]:
    """One group id per item joining both partitions: same duplicate group or same patient (None: no patient)
    = same group, transitively. Ids are 0, 1, ... in order of first appearance (without patients: the
    duplicate groups renumbered that way, which :func:`~covid_lightning.data.hygiene.duplicate_groups` already is)."""
    if len(duplicates) != len(patients):
        raise ValueError(f"{len(duplicates)} duplicate groups for {len(patients)} patient groups.")
    parent = list(range(len(duplicates)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first: dict[tuple[str, object], int] = {}
    for i, (dup, patient) in enumerate(zip(duplicates, patients)):
        for key in (("dup", dup), ("patient", patient)) if patient is not None else (("dup", dup),):
            j = first.setdefault(key, i)
            ri, rj = find(i), find(j)
            if ri != rj:
                parent[max(ri, rj)] = min(ri, rj)
    ids: dict[int, int] = {}
    return [ids.setdefault(find(i), len(ids)) for i in range(len(duplicates))]


def split_records(
    records: Sequence[Record],
    *,
    splits: Sequence[str] | None = None,
    val_fraction: float = 0.3,
    test_fraction: float = 0.0,
    seed: int = 42,
    on_bad_file: str = "error",
    duplicates: str = "near",
    cache_file: str | Path | None = None,
) -> tuple[Screening, list[str], list[int]]:
    """Screen ``records`` (bad files stop the run or are skipped) and give each kept record a split and a group.

    With ``splits`` (a manifest's split column, or a split file) they are used as they are; otherwise a seeded
    stratified split keeps each group in one split: duplicate images (``duplicates``) and the records' own
    groups (patients) joined. Returns the screening, the splits and the groups of the kept records.
    """
    records = list(records)
    grouping = "none" if splits is not None else duplicates  # a given split needs no duplicate groups
    screened = screen_records(records, on_bad_file=on_bad_file, duplicates=grouping, cache_file=cache_file)
    kept = screened.records
    groups = merge_groups(screened.groups, [r.group for r in kept])
    if splits is None:
        out = stratified_split(
            [r.label for r in kept], val_fraction=val_fraction, test_fraction=test_fraction, seed=seed, groups=groups
        )
        return screened, out, groups
    split_of = {r.path: s for r, s in zip(records, splits, strict=True)}
    out = [split_of[r.path] for r in kept]
    spread: dict[int, set[str]] = {}
    for g, s in zip(groups, out):
        spread.setdefault(g, set()).add(s)
    crossing = sum(1 for s in spread.values() if len(s) > 1)
    if crossing and any(r.group is not None for r in kept):
        log.warning(
            "The given split puts %d group(s) in more than one split (used as given): images of one patient in "
            "train and val/test inflate the scores. Drop the split column for a group-aware split.",
            crossing,
        )
    return screened, out, groups


def write_manifest(
    path: str | Path,
    records: Sequence[Record],
    splits: Sequence[str],
    root: Path,
    groups: Sequence[int] | None = None,
) -> Path:
    """Write one row per record: paths relative to ``root``, label, class name, split, group."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    groups = range(len(records)) if groups is None else groups
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow((*MANIFEST_FIELDS, GROUP_FIELD))
        for r, s, g in zip(records, splits, groups, strict=True):
            mask = relative_path(r.mask_path, root) if r.mask_path else ""
            w.writerow([relative_path(r.path, root), mask, r.label, r.class_name, s, g])
    return path


def read_manifest(
    path: str | Path, root: Path, class_names: Sequence[str] = CLASSES
) -> tuple[list[Record], list[str]]:
    """Read a manifest written by :func:`write_manifest`; paths are resolved against ``root``, labels checked
    against ``class_names`` (the data source's); its ``group`` column, when present, becomes the records' groups."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"Split manifest {path} does not exist.")
    class_names = list(class_names)
    records, splits = [], []
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = set(MANIFEST_FIELDS) - set(reader.fieldnames or ())
        if missing:
            raise DatasetError(f"Split manifest {path} lacks columns {sorted(missing)}.")
        for row in reader:
            if row["split"] not in SPLITS:
                raise DatasetError(f"{path}: unknown split {row['split']!r} for {row['path']}.")
            name = row["class_name"]
            if name not in class_names or class_names.index(name) != int(row["label"]):
                raise DatasetError(
                    f"{path}: label {row['label']} / class {name!r} disagree with the data's classes "
                    f"({', '.join(class_names)}). Is it the split of this data source?"
                )
            image = root / row["path"]
            if not image.is_file():
                raise DatasetError(
                    f"{path} lists {row['path']}, which is not under {root}. Is data.root (or data.manifest) the "
                    "data the split was written for?"
                )
            mask = root / row["mask_path"] if row["mask_path"] else None
            group = row.get(GROUP_FIELD) or None
            records.append(Record(image, int(row["label"]), mask, class_name=name, group=group))
            splits.append(row["split"])
    return records, splits
