"""Find the dataset on disk and list its records (image path, mask path or None, label)."""

from __future__ import annotations

import errno
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from covid_lightning.errors import UserError

log = logging.getLogger(__name__)

#: The four classes of the COVID-19 Radiography Database, in the canonical order (label = index).
CLASSES: tuple[str, ...] = ("COVID", "Lung_Opacity", "Normal", "Viral Pneumonia")
DATASET_DIRNAME = "COVID-19_Radiography_Dataset"
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg"})


class DatasetError(UserError, ValueError):
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


def class_counts(records: list[Record]) -> dict[str, int]:
    """Number of records per class name, every class listed (zero included)."""
    counts = dict.fromkeys(CLASSES, 0)
    for r in records:
        counts[r.class_name] += 1
    return counts


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
    """The inputs of ``predict``: ``root`` itself when it is one image file, else every PNG/JPEG under it.

    A folder is listed recursively (hidden files excluded, broken symlinks kept for the screening to
    report), without the files of any ``masks`` folder that has an ``images`` sibling, so that a
    dataset root predicts its X-rays and not its lung masks; the skipped files are counted and logged
    in one line. Raises :class:`DatasetError`, naming the path and the fix, when nothing can be listed.
    """
    root = Path(root).expanduser()
    if root.is_file():
        if root.suffix.lower() not in IMAGE_SUFFIXES:
            raise DatasetError(
                f"predict_root {root} is a file but not a PNG/JPEG image: point data.predict_root at an image "
                "file or at a folder of images."
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
            f"No PNG/JPEG images under {root}{also}: point data.predict_root at an image file or a folder of images."
        )
    return paths
