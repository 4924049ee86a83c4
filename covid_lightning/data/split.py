"""Seeded stratified train/val/test split and its CSV manifest."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from covid_lightning.data.scan import CLASSES, DatasetError, Record

SPLITS = ("train", "val", "test")
MANIFEST_FIELDS = ("path", "mask_path", "label", "class_name", "split")


def stratified_split(
    labels: Sequence[int], val_fraction: float = 0.3, test_fraction: float = 0.0, seed: int = 42
) -> list[str]:
    """Assign each item to ``train``/``val``/``test``, class by class.

    Per class, the items are shuffled with a generator seeded by ``seed`` and the first
    ``round(n * val_fraction)`` go to val, the next ``round(n * test_fraction)`` to test, the rest to
    train; so every class keeps the requested proportions and the result depends only on the seed.
    """
    if not 0 <= val_fraction < 1 or not 0 <= test_fraction < 1 or val_fraction + test_fraction >= 1:
        raise ValueError(
            f"val_fraction={val_fraction} and test_fraction={test_fraction} must be in [0, 1) with sum < 1."
        )
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    out = np.full(len(labels), "train", dtype=object)
    for label in np.unique(labels):
        idx = np.flatnonzero(labels == label)
        idx = idx[rng.permutation(len(idx))]
        n_val = int(round(len(idx) * val_fraction))
        n_test = int(round(len(idx) * test_fraction))
        out[idx[:n_val]] = "val"
        out[idx[n_val : n_val + n_test]] = "test"
    return out.tolist()


def write_manifest(path: str | Path, records: Sequence[Record], splits: Sequence[str], root: Path) -> Path:
    """Write one row per record: paths relative to ``root``, label, class name, split."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(MANIFEST_FIELDS)
        for r, s in zip(records, splits, strict=True):
            mask = r.mask_path.relative_to(root).as_posix() if r.mask_path else ""
            w.writerow([r.path.relative_to(root).as_posix(), mask, r.label, r.class_name, s])
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
