#!/usr/bin/env python
"""Ablations over seeds (see covid_lightning/ablate.py): one ingredient added or removed per row."""

import logging
import sys

from covid_lightning.ablate import main

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    sys.exit(main())
