"""Write a synthetic dataset with the full Kaggle database's size and class counts (21,165 images + masks, 299 px
images, 256 px masks, the same layout), for measuring setup, screening, caching and epochs at scale.

    python scripts/make_scale_dataset.py OUT [--workers N] [--fraction F]

Images come from the demo generator (``covid_lightning.data.demo.synthesize_xray``), seeded per file, so the
output is deterministic; files already present are kept (an interrupted run resumes).
"""

from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from jsonargparse import auto_cli
from PIL import Image

from covid_lightning.constants import CLASSES, DATASET_DIRNAME
from covid_lightning.data.demo import synthesize_xray

#: images per class in the Kaggle COVID-19 Radiography Database
KAGGLE_COUNTS = {"COVID": 3616, "Lung_Opacity": 6012, "Normal": 10192, "Viral Pneumonia": 1345}
RGB_EVERY = 7  # some files RGB (R=G=B), as in the database


def _write(job: tuple[Path, int, int, int]) -> int:
    dataset, label, start, stop = job
    name = CLASSES[label]
    for i in range(start, stop):
        image_path = dataset / name / "images" / f"{name}-{i}.png"
        mask_path = dataset / name / "masks" / f"{name}-{i}.png"
        if image_path.exists() and mask_path.exists():
            continue
        image, mask = synthesize_xray(label, np.random.default_rng((7, label, i)))
        if i % RGB_EVERY == 0:
            image = np.repeat(image[:, :, None], 3, axis=2)
        Image.fromarray(np.ascontiguousarray(image)).save(image_path, compress_level=3)
        Image.fromarray(mask).save(mask_path, compress_level=3)
    return stop - start


def make_scale_dataset(out: Path, workers: int = 0, fraction: float = 1.0, chunk: int = 250) -> int:
    """Write the dataset under ``OUT/COVID-19_Radiography_Dataset``.

    Args:
        out: parent folder of the dataset.
        workers: writer processes (0: every usable CPU).
        fraction: share of each class's Kaggle count to write (1.0: the full 21,165 images).
        chunk: files per job.
    """
    dataset = Path(out) / DATASET_DIRNAME
    jobs = []
    for label, name in enumerate(CLASSES):
        for sub in ("images", "masks"):
            (dataset / name / sub).mkdir(parents=True, exist_ok=True)
        n = max(1, round(KAGGLE_COUNTS[name] * fraction))
        jobs += [(dataset, label, s, min(s + chunk, n + 1)) for s in range(1, n + 1, chunk)]
    with ProcessPoolExecutor(workers or len(os.sched_getaffinity(0))) as pool:
        total = sum(pool.map(_write, jobs))
    print(f"{total} images + masks in {dataset}")
    return 0


if __name__ == "__main__":
    raise SystemExit(auto_cli(make_scale_dataset))
