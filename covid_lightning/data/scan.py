"""Data sources -> records: the Kaggle layout or a manifest; and the inputs of ``predict``."""

from __future__ import annotations

import csv
import errno
import logging
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from covid_lightning.constants import CLASSES, DATASET_DIRNAME
from covid_lightning.data.transforms import DICOM_SUFFIXES, is_dicom
from covid_lightning.errors import UserError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", *DICOM_SUFFIXES})
MANIFEST_SUFFIXES = frozenset({".csv", ".parquet"})
#: the class of every record of a manifest without a ``label`` column (segmentation only)
UNLABELLED = "all"


class DatasetError(UserError, ValueError):
    """The files on disk cannot be used as they are; the message names the file and the fix."""


@dataclass(frozen=True)
class Record:
    """One image: its path, class index and name, lung mask if any, and group (a patient: kept in one split)."""

    path: Path
    label: int
    mask_path: Path | None = None
    class_name: str = ""
    group: str | None = field(default=None, compare=False)  # how it is split, not which image it is


@dataclass(frozen=True)
class Source:
    """The records of one data source, their class names, their base folder and a manifest's own split, if any."""

    records: list[Record]
    class_names: tuple[str, ...]
    base: Path
    splits: list[str] | None = None
    manifest: Path | None = None


def broken_link_problem(path: Path) -> str | None:
    """Why the symlink ``path`` cannot be followed (dangling, or a loop); None when it is no broken link."""
    try:
        if path.is_symlink():
            os.stat(path)
    except OSError as err:
        if err.errno == errno.ELOOP:
            return "symlink loop (the links lead back to each other)"
        if err.errno in (errno.ENOENT, errno.ENOTDIR):
            return f"dangling symlink: its target {os.path.realpath(path)} does not exist"
    return None


def is_image_file(path: Path) -> bool:
    """A PNG/JPEG/DICOM file (not hidden), or a broken symlink named like one (for the screening to report)."""
    if path.name.startswith(".") or path.suffix.lower() not in IMAGE_SUFFIXES:
        return False
    return path.is_file() or broken_link_problem(path) is not None


def image_files(folder: Path) -> list[Path]:
    """The images of ``folder``, sorted (none when it is not a folder)."""
    return sorted(filter(is_image_file, folder.iterdir())) if folder.is_dir() else []


def find_dataset_root(root: str | Path) -> Path:
    """The folder holding the class folders: ``root`` itself or ``root/COVID-19_Radiography_Dataset``."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DatasetError(
            f"Dataset root {root} does not exist or is not a folder: point at {DATASET_DIRNAME}/ or its parent."
        )
    for candidate in (root, root / DATASET_DIRNAME):
        if any((candidate / name).is_dir() for name in CLASSES):
            return candidate
    raise DatasetError(
        f"No class folders found in {root}: expected some of {', '.join(CLASSES)} (or {DATASET_DIRNAME}/)."
    )


def class_image_dir(class_dir: Path) -> Path:
    """``<Class>/images`` in the release with masks, ``<Class>`` itself in the older flat release."""
    return class_dir / "images" if (class_dir / "images").is_dir() else class_dir


def scan_dataset(root: str | Path, *, with_masks: bool | None = False) -> list[Record]:
    """Every image of the Kaggle layout, in class order, then by name, paired with masks as ``with_masks`` says."""
    base = find_dataset_root(root)
    records = [
        Record(path, label, mask if with_masks is not False and is_image_file(mask) else None, name)
        for label, name in enumerate(CLASSES)
        for path in image_files(class_image_dir(base / name))
        for mask in [base / name / "masks" / path.name]
    ]
    if with_masks:
        unpaired = Counter(r.class_name for r in records if r.mask_path is None)
        records = [r for r in records if r.mask_path is not None]
        if unpaired:
            counts = ", ".join(f"{k}: {v}" for k, v in unpaired.items())
            log.warning("Skipped %d images without a lung mask (%s).", unpaired.total(), counts)
    if not records and with_masks is not None:
        what = "image+mask pairs (<Class>/images/X.png with <Class>/masks/X.png)" if with_masks else "images"
        raise DatasetError(f"No {what} found under {base}.")
    return records


def class_counts(records: Sequence[Record], class_names: Sequence[str] = CLASSES) -> dict[str, int]:
    """Records per class name, every class of ``class_names`` listed (zero included)."""
    return {**dict.fromkeys(class_names, 0), **Counter(r.class_name for r in records)}


def relative_path(path: Path, base: Path) -> str:
    """``path`` relative to ``base`` in POSIX form (``..`` where a manifest lists files outside its folder)."""
    return Path(os.path.relpath(path, base)).as_posix()


def _read_table(path: Path) -> tuple[list[str], list[dict[str, str]], str]:
    """Columns, rows (str values, "" when empty) and how a row is named in messages (``line`` or ``row``)."""
    try:
        if path.suffix.lower() == ".parquet":
            import pandas as pd

            frame = pd.read_parquet(path).astype(object)
            frame = frame.where(frame.notna(), "").astype(str).rename(columns=lambda c: str(c).strip())
            return list(frame.columns), frame.to_dict("records"), "row"
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            reader.fieldnames = [c.strip() for c in reader.fieldnames or ()]
            return list(reader.fieldnames), [{k: v or "" for k, v in row.items() if k} for row in reader], "line"
    except ImportError as err:
        raise DatasetError(
            f"Reading {path} needs pandas and pyarrow (pip install pandas pyarrow), or save it as CSV."
        ) from err
    except (ValueError, OSError, csv.Error) as err:
        raise DatasetError(f"Cannot read the manifest {path}: {err}. Save it as UTF-8 CSV, or fix the file.") from err


def scan_manifest(manifest: str | Path, *, with_masks: bool | None = False) -> Source:
    """The records a manifest lists, paths relative to its folder; a malformed manifest raises :class:`DatasetError`."""
    path = Path(manifest).expanduser()
    how = "Columns: path, label (classification), mask_path (segmentation), optional split (train/val/test), group."
    if not path.is_file() or path.suffix.lower() not in MANIFEST_SUFFIXES:
        raise DatasetError(f"Manifest {path} is not an existing .csv or .parquet file. {how}")
    columns, rows, unit = _read_table(path)
    need = {True: ["path", "mask_path"], False: ["path", "label"], None: ["path"]}[with_masks]
    missing = [c for c in need if c not in columns]
    missing += ["label or mask_path"] if with_masks is None and not {"label", "mask_path"} & {*columns} else []
    if missing:
        task = {True: "segmentation", False: "classification", None: "a dataset"}[with_masks]
        raise DatasetError(
            f"Manifest {path} lacks the column(s) {', '.join(missing)} that {task} needs (it has: "
            f"{', '.join(columns) or 'none'}). {how}"
        )
    base = Path(os.path.abspath(path.parent))
    first_row: dict[Path, int] = {}
    labels: set[str] = set()  # of every row, skipped ones too: the class names do not depend on the task
    entries: list[tuple[Path, str, Path | None, str, str | None]] = []
    for i, row in enumerate(rows, start=2 if unit == "line" else 1):
        where, name, split = f"{path} {unit} {i}", row.get("path", "").strip(), row.get("split", "").strip().lower()
        label = row.get("label", "").strip() if "label" in columns else UNLABELLED
        image, mask_name = base / name, row.get("mask_path", "").strip()
        if not name:
            raise DatasetError(f"{where}: empty path. Every row needs the image file in its path column.")
        if image in first_row:
            raise DatasetError(f"{where}: {name} is listed twice (first at {unit} {first_row[image]}). List it once.")
        if not label and with_masks is False:
            raise DatasetError(f"{where}: {name} has no label. Give every image its class in the label column.")
        if "split" in columns and split not in ("train", "val", "test"):
            raise DatasetError(f"{where}: split {split!r} for {name}: use train, val or test, or drop the column.")
        first_row[image], label = i, label or UNLABELLED
        labels.add(label)
        mask = base / mask_name if mask_name and with_masks is not False else None
        if not (with_masks and mask is None):
            entries.append((image, label, mask, split, row.get("group", "").strip() or None))
    if len(entries) < len(rows):
        log.warning("Skipped %d row(s) of %s without a mask_path (segmentation).", len(rows) - len(entries), path)
    if not entries:
        raise DatasetError(f"Manifest {path} lists no {'image+mask pairs' if with_masks else 'images'}.")
    if not any(image.exists() or image.is_symlink() for image, *_ in entries):
        raise DatasetError(
            f"None of the {len(entries)} images listed in {path} exists (e.g. {entries[0][0]}): relative paths "
            f"resolve against the manifest's folder {base}. Fix the paths or move the manifest."
        )
    numeric = all(label.lstrip("-").isdigit() for label in labels)  # integer labels sort as numbers
    class_names = tuple(sorted(labels, key=int if numeric else None))
    records = [Record(image, class_names.index(label), mask, label, group) for image, label, mask, _, group in entries]
    log.info("Manifest %s: %d records, classes %s", path, len(records), ", ".join(class_names))
    return Source(records, class_names, base, [e[3] for e in entries] if "split" in columns else None, path)


def manifest_class_names(manifest: str | Path) -> tuple[str, ...]:
    """The class names of a manifest (the labels of all its rows, sorted)."""
    return scan_manifest(manifest, with_masks=None).class_names


def read_records(source: str | Path, *, with_masks: bool | None = False) -> Source:
    """The one way from a data source to records: a manifest (``.csv``/``.parquet``) or the Kaggle layout."""
    if Path(source).suffix.lower() in MANIFEST_SUFFIXES and Path(source).expanduser().is_file():
        return scan_manifest(source, with_masks=with_masks)
    base = find_dataset_root(source)
    return Source(scan_dataset(base, with_masks=with_masks), CLASSES, base)


def list_predict_images(root: str | Path) -> list[Path]:
    """The inputs of ``predict``: ``root`` itself, or every image under it except a dataset's lung masks."""
    root = Path(root).expanduser()
    fix = "point data.predict_root at an image file or at a folder of images."
    if root.is_file():
        if root.suffix.lower() not in IMAGE_SUFFIXES and not is_dicom(root):
            raise DatasetError(f"predict_root {root} is a file but not a PNG/JPEG/DICOM image: {fix}")
        return [root]
    if not root.is_dir():
        raise DatasetError(f"predict_root {root} {broken_link_problem(root) or 'does not exist'}: {fix}")
    paths, skipped = [], []
    for path in sorted(filter(is_image_file, root.rglob("*"))):
        parents = path.relative_to(root).parents
        masks = any(d.name == "masks" and (root / d).parent.joinpath("images").is_dir() for d in parents)
        (skipped if masks else paths).append(path)
    if skipped:
        what = f"{len(skipped)} mask files under masks folders such as {skipped[0].parent}"
        log.warning("predict: skipped %s (a dataset's lung masks; point data.predict_root at one to see them).", what)
    if not paths:
        raise DatasetError(f"No PNG/JPEG/DICOM images under {root} ({len(skipped)} mask files skipped): {fix}")
    return paths
