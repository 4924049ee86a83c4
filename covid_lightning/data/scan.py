"""Turn a data source into records (image path, label, mask path or None, group): the Kaggle layout
(:func:`scan_dataset`) or a manifest CSV/Parquet (:func:`scan_manifest`), both through :func:`read_records`.
Screening, splitting, datasets and streaming take records and never ask where they came from.
"""

from __future__ import annotations

import csv
import errno
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from covid_lightning.constants import CLASSES, DATASET_DIRNAME
from covid_lightning.data.dicom import DICOM_SUFFIXES, dicom_size, is_dicom
from covid_lightning.errors import UserError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", *DICOM_SUFFIXES})
MANIFEST_SUFFIXES = frozenset({".csv", ".parquet"})
#: the columns of a manifest: ``path`` always, ``label`` (classification) and/or ``mask_path`` (segmentation),
#: optional ``split`` (train/val/test, used as is) and ``group`` (a patient: all its images in one split)
MANIFEST_COLUMNS = ("path", "label", "mask_path", "split", "group")
#: the class name of every record of a manifest without a ``label`` column (segmentation only)
UNLABELLED = "all"


class DatasetError(UserError, ValueError):
    """The files on disk cannot be used as they are; the message names the file and the fix."""


@dataclass(frozen=True)
class Record:
    """One image of the dataset: where it is, its class index and name, its lung mask if any, and its group
    (a patient from a manifest, or None: the group-aware split keeps a group in one split)."""

    path: Path
    label: int
    mask_path: Path | None = None
    class_name: str = ""
    group: str | None = field(default=None, compare=False)  # how it is split, not which image it is

    def __post_init__(self) -> None:
        if not self.class_name:  # the Kaggle layout's records: the name is the canonical one of the label
            object.__setattr__(self, "class_name", CLASSES[self.label] if 0 <= self.label < len(CLASSES) else "")


@dataclass(frozen=True)
class Source:
    """The records of one data source, the class names their labels index, the folder relative paths start
    from (written to ``split.csv``; keys the inspection cache) and, from a manifest's ``split`` column, the
    split to use as it is."""

    records: list[Record]
    class_names: tuple[str, ...]
    base: Path
    splits: list[str] | None = None
    manifest: Path | None = None

    @property
    def description(self) -> str:
        return f"manifest {self.manifest}" if self.manifest is not None else f"dataset {self.base}"


def is_image_file(path: Path) -> bool:
    """True for the image files we read (PNG/JPEG/DICOM); hidden files such as ``.DS_Store`` are not images."""
    return path.is_file() and not path.name.startswith(".") and path.suffix.lower() in IMAGE_SUFFIXES


def broken_link_problem(path: Path) -> str | None:
    """Why the symlink ``path`` cannot be followed (dangling, or a loop); None when it is no broken link."""
    if not path.is_symlink():
        return None
    try:
        os.stat(path)
    except OSError as err:
        if err.errno == errno.ELOOP:
            return "symlink loop (the links lead back to each other)"
        if err.errno in (errno.ENOENT, errno.ENOTDIR):
            return f"dangling symlink: its target {os.path.realpath(path)} does not exist"
    return None


def is_image_entry(path: Path) -> bool:
    """An image file (:func:`is_image_file`) or a broken symlink named like one.

    Listings use this rather than :func:`is_image_file` so that a dangling symlink or a symlink loop
    reaches the screening and is reported (or skipped, counted) like any unreadable file, instead of
    vanishing from the dataset unnoticed.
    """
    if path.name.startswith(".") or path.suffix.lower() not in IMAGE_SUFFIXES:
        return False
    return path.is_file() or broken_link_problem(path) is not None


def find_dataset_root(root: str | Path) -> Path:
    """Return the folder that holds the class folders.

    Accepts the dataset folder itself or any folder containing ``COVID-19_Radiography_Dataset/``
    (as the Kaggle archive unpacks).
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DatasetError(
            f"Dataset root {root} does not exist or is not a folder. Point data.root at the folder that "
            f"holds {DATASET_DIRNAME}/ (or at {DATASET_DIRNAME}/ itself)."
        )
    for candidate in (root, root / DATASET_DIRNAME):
        if any((candidate / name).is_dir() for name in CLASSES):
            return candidate
    raise DatasetError(
        f"No class folders found in {root}: expected some of {', '.join(CLASSES)} "
        f"(directly or under {DATASET_DIRNAME}/)."
    )


def _class_image_dir(class_dir: Path) -> Path:
    """``<Class>/images`` in the release with masks, ``<Class>`` itself in the older flat release."""
    images = class_dir / "images"
    return images if images.is_dir() else class_dir


def _check_readable(path: Path) -> None:
    """Open the file header; raise DatasetError naming the file when it is not a readable image."""
    link = broken_link_problem(path)
    if link is not None:
        raise DatasetError(f"Cannot read image {path}: {link}. Remove the link or restore its target.")
    try:
        if path.suffix.lower() in DICOM_SUFFIXES:
            dicom_size(path)
            return
        with Image.open(path) as im:
            im.size  # noqa: B018 - reading the header is the check
    except (UnidentifiedImageError, OSError) as err:
        raise DatasetError(f"Cannot read image {path}: {err}. Remove or replace the file.") from err


def scan_dataset(root: str | Path, *, with_masks: bool = False, check_files: bool = True) -> list[Record]:
    """List every image of the dataset in canonical class order, then by file name.

    Args:
        root: the dataset folder or a folder containing it.
        with_masks: pair each image with ``<Class>/masks/<same name>``; images without a mask are
            skipped, counted and logged once. No pair at all is an error.
        check_files: open every image header so an unreadable file fails here, naming the file.

    Broken symlinks named like images are listed (and fail ``check_files``), never dropped unseen.
    """
    base = find_dataset_root(root)
    records: list[Record] = []
    unpaired: dict[str, int] = {}
    for label, name in enumerate(CLASSES):
        class_dir = base / name
        if not class_dir.is_dir():
            continue
        for path in sorted(p for p in _class_image_dir(class_dir).iterdir() if is_image_entry(p)):
            mask_path = None
            if with_masks:
                mask_path = class_dir / "masks" / path.name
                if not is_image_entry(mask_path):  # a broken mask link is paired: screening reports it
                    unpaired[name] = unpaired.get(name, 0) + 1
                    continue
            if check_files:
                _check_readable(path)
                if mask_path is not None:
                    _check_readable(mask_path)
            records.append(Record(path=path, label=label, mask_path=mask_path))
    if unpaired:
        log.warning(
            "Skipped %d images without a lung mask (%s).",
            sum(unpaired.values()),
            ", ".join(f"{k}: {v}" for k, v in unpaired.items()),
        )
    if not records:
        what = "image+mask pairs (<Class>/images/X.png with <Class>/masks/X.png)" if with_masks else "images"
        raise DatasetError(f"No {what} found under {base}.")
    return records


def class_counts(records: Sequence[Record], class_names: Sequence[str] = CLASSES) -> dict[str, int]:
    """Number of records per class name, every class of ``class_names`` listed (zero included)."""
    counts = dict.fromkeys(class_names, 0)
    for r in records:
        counts[r.class_name] = counts.get(r.class_name, 0) + 1
    return counts


def relative_path(path: Path, base: Path) -> str:
    """``path`` relative to ``base`` in POSIX form (``..`` where a manifest lists files outside its folder)."""
    try:
        return Path(os.path.relpath(path, base)).as_posix()
    except ValueError:  # another drive (Windows): keep it absolute
        return Path(path).as_posix()


# --------------------------------------------------------------------------------------------
# Manifests: your own data
# --------------------------------------------------------------------------------------------


def is_manifest_file(path: str | Path) -> bool:
    """A manifest: an existing ``.csv`` or ``.parquet`` file."""
    path = Path(path).expanduser()
    return path.suffix.lower() in MANIFEST_SUFFIXES and path.is_file()


def _read_table(path: Path) -> tuple[list[str], list[dict[str, str]], str]:
    """Columns, rows (str values, "" when empty) and how a row is named in messages (``line`` or ``row``)."""
    if path.suffix.lower() == ".parquet":
        try:
            import pandas as pd
        except ImportError as err:
            raise DatasetError(
                f"Reading the Parquet manifest {path} needs pandas and pyarrow (pip install pandas pyarrow); "
                "or save it as CSV."
            ) from err
        try:
            frame = pd.read_parquet(path)
        except (ImportError, ValueError, OSError) as err:
            raise DatasetError(f"Cannot read the manifest {path}: {err}. Save it as CSV, or fix the file.") from err
        columns = [str(c).strip() for c in frame.columns]
        frame.columns = columns
        rows = [
            {k: "" if v is None or (isinstance(v, float) and v != v) else str(v) for k, v in row.items()}
            for row in frame.to_dict("records")
        ]
        return columns, rows, "row"
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            columns = [c.strip() for c in reader.fieldnames or ()]
            reader.fieldnames = columns
            rows = [{k: (v or "") for k, v in row.items() if k is not None} for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise DatasetError(f"Cannot read the manifest {path}: {err}. Save it as UTF-8 CSV.") from err
    return columns, rows, "line"


def _sorted_labels(labels: set[str]) -> tuple[str, ...]:
    """Class names in label order: sorted (numerically when every label is an integer)."""
    if labels and all(label.lstrip("-").isdigit() for label in labels):
        return tuple(sorted(labels, key=int))
    return tuple(sorted(labels))


def scan_manifest(manifest: str | Path, *, with_masks: bool | None = False) -> Source:
    """The records a manifest lists, in its row order.

    Columns: ``path`` (required), ``label`` (required for classification: the class names are the labels,
    sorted), ``mask_path`` (required for segmentation; rows without one are skipped, counted and logged),
    ``split`` (``train``/``val``/``test``: used as it is) and ``group`` (a patient: all its images in one
    split). Relative paths resolve against the manifest's folder. ``with_masks``: False reads it for
    classification (labels required, masks left out), True for segmentation, None as it is (masks where given,
    labels if any: for check-data and optimize). A malformed manifest raises :class:`DatasetError` naming the
    file, the line and the fix; missing or unreadable images are left to the screening (a named error, or a
    counted skip).
    """
    path = Path(manifest).expanduser()
    if not path.is_file():
        raise DatasetError(
            f"Manifest {path} does not exist or is not a file. Point data.manifest at a CSV (or .parquet) file "
            f"with the columns {', '.join(MANIFEST_COLUMNS)} (see the README, 'Your own data')."
        )
    if path.suffix.lower() not in MANIFEST_SUFFIXES:
        raise DatasetError(f"Manifest {path} is not a .csv or .parquet file: save it as CSV.")
    columns, rows, unit = _read_table(path)
    need = {True: ("path", "mask_path"), False: ("path", "label"), None: ("path",)}[with_masks]
    missing = [c for c in need if c not in columns]
    if with_masks is None and "label" not in columns and "mask_path" not in columns:
        missing.append("label or mask_path")
    if missing:
        task = {True: "segmentation", False: "classification", None: "a dataset"}[with_masks]
        raise DatasetError(
            f"Manifest {path} lacks the column(s) {', '.join(missing)} that {task} needs (it has: "
            f"{', '.join(columns) or 'none'}). Columns: path, label (classification), mask_path (segmentation), "
            "optional split (train/val/test) and group (patient)."
        )
    base = Path(os.path.abspath(path.parent))
    has_labels, has_splits = "label" in columns, "split" in columns
    first_row: dict[Path, int] = {}
    labels: set[str] = set()  # of every row, also those skipped: the class names do not depend on the task
    entries: list[tuple[Path, str, Path | None, str | None, str | None]] = []
    unpaired = 0
    for i, row in enumerate(rows, start=2 if unit == "line" else 1):
        where = f"{path} {unit} {i}"
        name = row.get("path", "").strip()
        if not name:
            raise DatasetError(f"{where}: empty path. Every row needs the image file in its path column.")
        image = base / name
        if image in first_row:
            raise DatasetError(
                f"{where}: {name} is listed twice (first at {unit} {first_row[image]}). List each image once."
            )
        first_row[image] = i
        label = row.get("label", "").strip() if has_labels else UNLABELLED
        if not label:
            if with_masks is False:
                raise DatasetError(f"{where}: {name} has no label. Give every image its class in the label column.")
            label = UNLABELLED
        split = row.get("split", "").strip().lower() if has_splits else None
        if has_splits and split not in ("train", "val", "test"):
            raise DatasetError(
                f"{where}: split {row.get('split', '')!r} for {name}; use train, val or test (or drop the split "
                "column for a seeded stratified split)."
            )
        labels.add(label)
        mask_name = row.get("mask_path", "").strip()
        mask = base / mask_name if mask_name else None
        if with_masks and mask is None:
            unpaired += 1
            continue
        group = row.get("group", "").strip() or None
        entries.append((image, label, None if with_masks is False else mask, split, group))
    if unpaired:
        log.warning(
            "Skipped %d row(s) of %s without a mask_path (segmentation needs image+mask pairs).",
            unpaired,
            path,
        )
    if not entries:
        what = "image+mask pairs (rows with a mask_path)" if with_masks else "images"
        raise DatasetError(f"Manifest {path} lists no {what}.")
    if not any(image.exists() or image.is_symlink() for image, *_ in entries):
        raise DatasetError(
            f"None of the {len(entries)} images listed in {path} exists (e.g. {entries[0][0]}): relative paths "
            f"resolve against the manifest's folder {base}. Fix the paths or move the manifest."
        )
    class_names = _sorted_labels(labels)
    index = {name: k for k, name in enumerate(class_names)}
    records = [
        Record(path=image, label=index[label], mask_path=mask, class_name=label, group=group)
        for image, label, mask, _, group in entries
    ]
    splits = [str(split) for *_, split, _ in entries] if has_splits else None
    log.info("Manifest %s: %d records, classes %s", path, len(records), ", ".join(class_names))
    return Source(records, class_names, base, splits, path)


def manifest_class_names(manifest: str | Path) -> tuple[str, ...]:
    """The class names of a manifest (the labels of all its rows, sorted), read from the file."""
    return scan_manifest(manifest, with_masks=None).class_names


def read_records(
    root: str | Path | None = None, *, manifest: str | Path | None = None, with_masks: bool = False
) -> Source:
    """The one way from a data source to records: a manifest (``manifest``, or ``root`` naming a ``.csv`` /
    ``.parquet`` file) or the Kaggle layout under ``root`` (the four :data:`CLASSES`)."""
    if manifest is None and root is not None and is_manifest_file(root):
        manifest = root
    if manifest is not None:
        return scan_manifest(manifest, with_masks=with_masks)
    if root is None:
        raise DatasetError("No data source: set data.root (a dataset folder) or data.manifest (a CSV file).")
    base = find_dataset_root(root)
    return Source(scan_dataset(base, with_masks=with_masks, check_files=False), CLASSES, base)


def _in_dataset_masks_folder(path: Path, root: Path, verdicts: dict[Path, bool]) -> bool:
    """True when a folder between ``root`` (excluded) and the file ``path`` is a ``masks`` folder with an
    ``images`` sibling: the ground-truth lung masks of a Kaggle-layout dataset, not X-rays. ``verdicts``
    remembers each ``masks`` folder's answer."""
    for folder in path.relative_to(root).parents:
        if folder.name != "masks":
            continue
        absolute = root / folder
        if absolute not in verdicts:
            verdicts[absolute] = (absolute.parent / "images").is_dir()
        if verdicts[absolute]:
            return True
    return False


def list_predict_images(root: str | Path) -> list[Path]:
    """The inputs of ``predict``: ``root`` itself when it is one image file, else every PNG/JPEG/DICOM under it.

    A folder is listed recursively (hidden files excluded, broken symlinks kept for the screening to
    report), without the files of any ``masks`` folder that has an ``images`` sibling, so that a
    dataset root predicts its X-rays and not its lung masks; the skipped files are counted and logged
    in one line. Raises :class:`DatasetError`, naming the path and the fix, when nothing can be listed.
    """
    root = Path(root).expanduser()
    if root.is_file():
        if root.suffix.lower() not in IMAGE_SUFFIXES and not is_dicom(root):
            raise DatasetError(
                f"predict_root {root} is a file but not a PNG/JPEG/DICOM image: point data.predict_root at an "
                "image file or at a folder of images."
            )
        return [root]
    if not root.is_dir():
        why = broken_link_problem(root) or "does not exist"
        raise DatasetError(
            f"predict_root {root} {why}: point data.predict_root at an image file or at a folder of images."
        )
    verdicts: dict[Path, bool] = {}
    paths: list[Path] = []
    skipped: list[Path] = []
    for path in sorted(p for p in root.rglob("*") if is_image_entry(p)):
        (skipped if _in_dataset_masks_folder(path, root, verdicts) else paths).append(path)
    if skipped:
        masks_folders = sorted(folder for folder, is_dataset_masks in verdicts.items() if is_dataset_masks)
        log.warning(
            "predict: skipped %d mask files under %d masks folder(s) next to an images folder (lung masks of a "
            "dataset, not X-rays), e.g. %s; point data.predict_root at such a masks folder to predict them anyway.",
            len(skipped),
            len(masks_folders),
            masks_folders[0],
        )
    if not paths:
        also = f" ({len(skipped)} mask files skipped)" if skipped else ""
        raise DatasetError(
            f"No PNG/JPEG/DICOM images under {root}{also}: point data.predict_root at an image file or a folder of "
            "images."
        )
    return paths
