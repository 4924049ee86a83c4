"""Seeded stratified train/val/test split and its CSV manifest."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from covid_lightning.data.scan import CLASSES, DatasetError, Record

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


def write_manifest(
    path: str | Path,
    records: Sequence[Record],
    splits: Sequence[str],
    root: Path,
    groups: Sequence[int] | None = None,
) -> Path:
    """Write one row per record: paths relative to ``root``, label, class name, split, duplicate group."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    groups = range(len(records)) if groups is None else groups
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow((*MANIFEST_FIELDS, GROUP_FIELD))
        for r, s, g in zip(records, splits, groups, strict=True):
            mask = r.mask_path.relative_to(root).as_posix() if r.mask_path else ""
            w.writerow([r.path.relative_to(root).as_posix(), mask, r.label, r.class_name, s, g])
    return path


def read_manifest(path: str | Path, root: Path) -> tuple[list[Record], list[str]]:
    """Read a manifest written by :func:`write_manifest`; paths are resolved against ``root``."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"Split manifest {path} does not exist.")
    records, splits = [], []
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = set(MANIFEST_FIELDS) - set(reader.fieldnames or ())
        if missing:
            raise DatasetError(f"Split manifest {path} lacks columns {sorted(missing)}.")
        for row in reader:
            if row["split"] not in SPLITS:
                raise DatasetError(f"{path}: unknown split {row['split']!r} for {row['path']}.")
            if row["class_name"] not in CLASSES or CLASSES.index(row["class_name"]) != int(row["label"]):
                raise DatasetError(f"{path}: label {row['label']} / class {row['class_name']!r} disagree.")
            image = root / row["path"]
            if not image.is_file():
                raise DatasetError(
                    f"{path} lists {row['path']}, which is not under {root}. Is data.root the dataset the "
                    "manifest was written for?"
                )
            mask = root / row["mask_path"] if row["mask_path"] else None
            records.append(Record(path=image, label=int(row["label"]), mask_path=mask))
            splits.append(row["split"])
    return records, splits
