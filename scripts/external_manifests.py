"""Manifests for evaluating outside the training data (issues 15 and 17), written from the shared samples.

    python scripts/external_manifests.py --shared ../shared/data --out runs/manifests \
        [--split runs/<run>/split.csv]   # also source_heldout.csv: that run's train/test, validated elsewhere

Writes into ``--out`` (absolute paths, so they work from any folder):

- ``actualmed.csv``, ``openist.csv``: the external sample by source (``path,label,mask_path,split``; every row
  ``test``): for ``--data.external``, and OpenIST's lung masks for ``lightning test`` of a segmenter
  (``--data.root openist.csv``).
- ``kaggle_originals.csv``: the COVID and Normal originals of ``covid_radiography_sample``; a model trained on
  ``covid_cls_sample`` (whose COVID/Normal files were resized by their source) never saw this processing.
- ``source_heldout.csv`` (with ``--split``): the train and test rows of a ``covid_cls_sample`` split, and as
  validation the other sample's COVID, Normal and Viral Pneumonia originals: model selection on films processed
  differently from the training ones (Lung_Opacity left out: the two samples share those 18 files).
"""

from __future__ import annotations

import csv
from pathlib import Path

from jsonargparse import auto_cli

from covid_lightning.constants import DATASET_DIRNAME

COLUMNS = ["path", "label", "mask_path", "split"]


def _write(path: Path, rows: list[list[str]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([COLUMNS, *rows])
    print(f"{path}: {len(rows)} rows")
    return path


def _originals(dataset: Path, classes: tuple[str, ...], split: str) -> list[list[str]]:
    """Every image of ``classes`` in a Kaggle-layout folder, with its mask where one exists."""
    rows = []
    for name in classes:
        for image in sorted((dataset / name / "images").glob("*.png")):
            mask = dataset / name / "masks" / image.name
            rows.append([str(image), name, str(mask) if mask.is_file() else "", split])
    return rows


def main(shared: Path = Path("../shared/data"), out: Path = Path("runs/manifests"), split: Path | None = None) -> int:
    """Write the manifests.

    Args:
        shared: the folder holding ``external_cxr_sample``, ``covid_radiography_sample`` and ``covid_cls_sample``.
        out: where the manifests go.
        split: a ``split.csv`` of a run on ``covid_cls_sample`` (for ``source_heldout.csv``).
    """
    shared, out = shared.expanduser().resolve(), out.expanduser()
    out.mkdir(parents=True, exist_ok=True)
    external = shared / "external_cxr_sample"
    if not (external / "MANIFEST.csv").is_file():
        raise SystemExit(f"No {external}/MANIFEST.csv: give --shared, the folder that holds external_cxr_sample.")
    with (external / "MANIFEST.csv").open(newline="", encoding="utf-8") as f:
        listed = list(csv.DictReader(f))
    base = external / DATASET_DIRNAME
    for source in sorted({r["source"] for r in listed}):
        rows = [r for r in listed if r["source"] == source]
        masks = [str(base / r["mask"]) if r["mask"] else "" for r in rows]
        _write(out / f"{source}.csv", [[str(base / r["image"]), r["label"], m, "test"] for r, m in zip(rows, masks)])
    originals = shared / "covid_radiography_sample" / DATASET_DIRNAME
    _write(out / "kaggle_originals.csv", _originals(originals, ("COVID", "Normal"), "test"))
    if split is not None:
        cls = shared / "covid_cls_sample" / DATASET_DIRNAME
        with split.open(newline="", encoding="utf-8") as f:
            kept = [[str(cls / r["path"]), r["class_name"], "", r["split"]] for r in csv.DictReader(f)]
        val = _originals(originals, ("COVID", "Normal", "Viral Pneumonia"), "val")
        _write(out / "source_heldout.csv", [r for r in kept if r[3] != "val"] + [[*r[:2], "", "val"] for r in val])
    return 0


if __name__ == "__main__":
    raise SystemExit(auto_cli(main))
