#!/usr/bin/env python
r"""Speed and memory of covid-lightning: data loading, training, inference, peak memory, as one table per section.

python scripts/benchmark.py                                        # the lab's sizes, demo data, ~5 min on 2 cores
python scripts/benchmark.py --data.root /path/to/COVID-19_Radiography_Dataset --json bench.json
python scripts/benchmark.py --sections train,infer --precision 32-true,bf16-mixed --compile
python scripts/benchmark.py --quick                                # tiny sizes (seconds)

Every figure is the median of --repeats timed repetitions after --warmup untimed ones; see
covid_lightning/benchmark.py for what each section measures. --help lists the options.
"""

from __future__ import annotations

import sys
from pathlib import Path

try:
    from covid_lightning.benchmark import main
except ModuleNotFoundError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from covid_lightning.benchmark import main

if __name__ == "__main__":
    sys.exit(main())
