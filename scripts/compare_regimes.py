#!/usr/bin/env python
r"""Compare the lab's freezing regimes (or segmentation configs) with identical data, split and seed.

python scripts/compare_regimes.py --data.root /path/to/COVID-19_Radiography_Dataset --max_epochs 10
python scripts/compare_regimes.py --data.root ... --regimes head last_conv --model.pretrained_file weights.h5
python scripts/compare_regimes.py --data.root ... --configs configs/segmentation/unet_seed.yaml \
    configs/segmentation/unet_resnet34.yaml

Writes <out>/comparison.md and <out>/comparison.csv (default out: runs/compare); the runs go under
<out>/<regime or config name>/version_N. Options it does not know are passed to every run.
"""

from __future__ import annotations

import sys
from pathlib import Path

try:
    from covid_lightning.compare import main
except ModuleNotFoundError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from covid_lightning.compare import main

if __name__ == "__main__":
    sys.exit(main())
