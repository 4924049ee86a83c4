"""Record selection (source -> screening -> split), the seeded stratified group-aware split, and ``split.csv``."""

from __future__ import annotations

import csv
import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from covid_lightning.data.hygiene import Screening, inspection_cache_file, screen_records
from covid_lightning.data.scan import CLASSES, DatasetError, Record, Source, read_records, relative_path

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
MANIFEST_FIELDS = ("path", "mask_path", "label", "class_name", "split", "group")


def stratified_split(
    labels: Sequence[int],
    val_fraction: float = 0.3,
    test_fraction: float = 0.0,
    seed: int = 42,
    groups: Sequence[int] | None = None,
) -> list[str]:
    """``train``/``val``/``test`` per item, class by class, each group (default: each item) in one split.

    Per class the shuffled groups fill val, then test, then train; a group goes under its first item's class.
    """
    if not 0 <= val_fraction < 1 or not 0 <= test_fraction < 1 or val_fraction + test_fraction >= 1:
        raise ValueError(
            f"val_fraction={val_fraction} and test_fraction={test_fraction} must be in [0, 1) with sum < 1."
        )
    labels = np.asarray(labels)
    groups = np.arange(len(labels)) if groups is None else np.asarray(groups)
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
    """One group id per item (0, 1, ...): same duplicate group or same patient = same group, transitively."""
    parent = list(range(len(duplicates)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first: dict[tuple[str, object], int] = {}
    for i, (dup, patient) in enumerate(zip(duplicates, patients, strict=True)):
        for key in (("dup", dup), ("patient", patient)) if patient is not None else (("dup", dup),):
            ri, rj = find(i), find(first.setdefault(key, i))
            parent[max(ri, rj)] = min(ri, rj)
    ids: dict[int, int] = {}
    return [ids.setdefault(find(i), len(ids)) for i in range(len(duplicates))]


@dataclass
class Selection:
    """The records a run (or a stream) uses: the source, the screening, each kept record's split and group."""

    source: Source
    screening: Screening
    splits: list[str]
    groups: list[int]
    masks: bool  # records carry their lung masks
    given_split: bool  # the manifest's split column was used as it is

    def records(self, split: str) -> list[Record]:
        return [r for r, s in zip(self.screening.records, self.splits) if s == split]


def select_records(
    root: str | Path,
    *,
    masks: bool | None = False,
    split_file: str | Path | None = None,
    val_fraction: float = 0.3,
    test_fraction: float = 0.0,
    seed: int = 42,
    on_bad_file: str = "error",
    duplicates: str = "near",
) -> Selection:
    """The one way from a data source to split records, shared by the DataModules and ``optimize``: read, screen,
    then split (a split file, the manifest's split column, or a stratified split keeping duplicates together).
    """
    source = read_records(root, with_masks=None if split_file else masks)  # type: ignore[arg-type]
    records, splits = source.records, source.splits
    if masks is None and source.manifest is None and split_file is None:
        candidates = [r.path.parent.parent / "masks" / r.path.name for r in records]
        if all(r.path.parent.name == "images" and m.is_file() for r, m in zip(records, candidates)):
            records = [replace(r, mask_path=m) for r, m in zip(records, candidates)]
    if split_file is not None:
        records, splits = read_manifest(split_file, source.base, source.class_names)
        if masks and any(r.mask_path is None for r in records):
            raise DatasetError(f"{split_file} has rows without a mask_path; it is not a segmentation split.")
    if masks is None:
        masks = all(r.mask_path is not None for r in records)
        if not masks:
            log.info("Not every image has a lung mask: storing images only (masks=True pairs and skips).")
    if not masks:
        records = [replace(r, mask_path=None) for r in records]
    given = splits is not None
    screened = screen_records(
        records,
        on_bad_file=on_bad_file,
        duplicates="none" if given else duplicates,  # a given split needs no duplicate groups
        cache_file=inspection_cache_file(source.base),
    )
    kept = screened.records
    groups = merge_groups(screened.groups, [r.group for r in kept])
    if not given:
        out = stratified_split([r.label for r in kept], val_fraction, test_fraction, seed, groups)
        return Selection(source, screened, out, groups, masks, False)
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
    return Selection(source, screened, out, groups, masks, split_file is None)


def write_manifest(
    path: str | Path, records: Sequence[Record], splits: Sequence[str], root: Path, groups: Sequence[int] | None = None
) -> Path:
    """One row per record: paths relative to ``root``, label, class name, split, group."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    groups = range(len(records)) if groups is None else groups
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(MANIFEST_FIELDS)
        for r, s, g in zip(records, splits, groups, strict=True):
            mask = relative_path(r.mask_path, root) if r.mask_path else ""
            w.writerow([relative_path(r.path, root), mask, r.label, r.class_name, s, g])
    return path


def read_manifest(path: str | Path, root: Path, class_names: Sequence[str] = CLASSES) -> tuple[list[Record], list[str]]:
    """Read a :func:`write_manifest` file: paths resolved against ``root``, labels checked against ``class_names``."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"Split manifest {path} does not exist.")
    class_names = list(class_names)
    records, splits = [], []
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = set(MANIFEST_FIELDS[:-1]) - set(reader.fieldnames or ())
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
            if not (root / row["path"]).is_file():
                raise DatasetError(
                    f"{path} lists {row['path']}, which is not under {root}. Is data.root (or data.manifest) the "
                    "data the split was written for?"
                )
            mask = root / row["mask_path"] if row["mask_path"] else None
            records.append(Record(root / row["path"], int(row["label"]), mask, name, row.get("group") or None))
            splits.append(row["split"])
    return records, splits
