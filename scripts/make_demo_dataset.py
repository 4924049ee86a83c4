#!/usr/bin/env python
"""Generate the synthetic demo dataset (Kaggle COVID-19 Radiography layout; not medical data).

python scripts/make_demo_dataset.py                     # into $COVID_LIGHTNING_DEMO_DIR or ~/.cache/...
python scripts/make_demo_dataset.py --out data/demo --n-per-class 200 --seed 1
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

try:
    from covid_lightning.constants import CLASSES
    from covid_lightning.data.demo import default_demo_dir, make_demo_dataset
except ModuleNotFoundError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from covid_lightning.data.demo import CLASSES, default_demo_dir, make_demo_dataset


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help=f"folder to write COVID-19_Radiography_Dataset/ into (default: {default_demo_dir()})",
    )
    parser.add_argument("--n-per-class", type=int, default=50, help="images (and masks) per class (default: 50)")
    parser.add_argument("--seed", type=int, default=0, help="base seed (default: 0)")
    parser.add_argument("--rgb-fraction", type=float, default=0.15, help="share of images saved as RGB (default: 0.15)")
    parser.add_argument("--overwrite", action="store_true", help="regenerate even if a matching demo exists")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    try:
        dataset = make_demo_dataset(
            args.out,
            n_per_class=args.n_per_class,
            seed=args.seed,
            rgb_fraction=args.rgb_fraction,
            overwrite=args.overwrite,
        )
    except (ValueError, FileExistsError) as err:
        parser.error(str(err))
    elapsed = time.perf_counter() - start

    print(dataset)
    total = 0
    for name in CLASSES:
        images = sum(1 for p in (dataset / name / "images").glob("*.png"))
        masks = sum(1 for p in (dataset / name / "masks").glob("*.png"))
        total += images
        print(f"  {name:<16} {images:>6} images  {masks:>6} masks")
    print(f"  {'total':<16} {total:>6} images  ({elapsed:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
