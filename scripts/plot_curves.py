#!/usr/bin/env python
"""Plot a run's training curves, train vs val per epoch (loss + accuracy, or loss + IoU + Dice).

python scripts/plot_curves.py runs/head_only/version_0                 # -> runs/head_only/version_0/curves.png
python scripts/plot_curves.py runs/unet_seed/version_0/metrics.csv --out unet_curves.png
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

try:
    from covid_lightning.plotting import plot_curves
except ModuleNotFoundError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from covid_lightning.plotting import plot_curves


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="a run folder (CSVLogger version_N), a folder of runs, or metrics.csv")
    parser.add_argument("--out", type=Path, default=None, help="PNG to write (default: curves.png next to metrics.csv)")
    args = parser.parse_args(argv)
    print(plot_curves(args.run, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
