"""Find the dataset on disk and list its records (image path, mask path or None, label)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

log = logging.getLogger(__name__)

#: The four classes of the COVID-19 Radiography Database, in the canonical order (label = index).
CLASSES: tuple[str, ...] = ("COVID", "Lung_Opacity", "Normal", "Viral Pneumonia")
DATASET_DIRNAME = "COVID-19_Radiography_Dataset"
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg"})


class DatasetError(ValueError):
    """The files on disk cannot be used as they are; the message names the file and the fix."""


@dataclass(frozen=True)
class Record:
    """One image of the dataset: where it is, its class index and, if any, its lung mask."""

    path: Path
    label: int
    mask_path: Path | None = None

    @property
    def class_name(self) -> str:
        return CLASSES[self.label]


def is_image_file(path: Path) -> bool:
    """True for the image files we read (PNG/JPEG); hidden files such as ``.DS_Store`` are not images."""
    return path.is_file() and not path.name.startswith(".") and path.suffix.lower() in IMAGE_SUFFIXES


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
    try:
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
    """
    base = find_dataset_root(root)
    records: list[Record] = []
    unpaired: dict[str, int] = {}
    for label, name in enumerate(CLASSES):
        class_dir = base / name
        if not class_dir.is_dir():
            continue
        for path in sorted(p for p in _class_image_dir(class_dir).iterdir() if is_image_file(p)):
            mask_path = None
            if with_masks:
                mask_path = class_dir / "masks" / path.name
                if not mask_path.is_file():
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


def class_counts(records: list[Record]) -> dict[str, int]:
    """Number of records per class name, every class listed (zero included)."""
    counts = dict.fromkeys(CLASSES, 0)
    for r in records:
        counts[r.class_name] += 1
    return counts
