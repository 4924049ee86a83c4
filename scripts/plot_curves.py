#!/usr/bin/env python
"""Plot a run's training curves, train vs val per epoch (loss + accuracy, or loss + IoU + Dice).

python scripts/plot_curves.py runs/head_only/version_0                 # -> runs/head_only/version_0/curves.png
python scripts/plot_curves.py runs/unet_seed/version_0/metrics.csv --out unet_curves.png
"""

from __future__ import annotations

import sys
from pathlib import Path

from jsonargparse import auto_cli

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a checkout without `pip install -e .`
from covid_lightning.plotting import plot_curves


def main(argv: list[str] | None = None) -> int:
    print(auto_cli(plot_curves, args=argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
