"""``python -m covid_lightning`` = the ``covid-lightning`` command."""

import sys

from covid_lightning.cli import main

sys.exit(main())
