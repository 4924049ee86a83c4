"""The full-size measurement tools, run on a small fraction of the database's counts."""

from pathlib import Path

import pytest

from covid_lightning.constants import CLASSES, DATASET_DIRNAME
from tests.helpers.scripts import load_script


@pytest.mark.slow
def test_make_scale_dataset_and_scale_check_on_a_fraction(tmp_path: Path):
    make = load_script("make_scale_dataset")
    make.make_scale_dataset(tmp_path / "data", workers=1, fraction=0.004)
    dataset = tmp_path / "data" / DATASET_DIRNAME
    counts = {c: len(list((dataset / c / "images").glob("*.png"))) for c in CLASSES}
    assert counts == {c: max(1, round(n * 0.004)) for c, n in make.KAGGLE_COUNTS.items()}
    assert all(len(list((dataset / c / "masks").glob("*.png"))) == counts[c] for c in CLASSES)

    results = load_script("scale_check").scale_check(str(dataset), out=str(tmp_path / "work"))
    assert results["setup_cold"]["images"] == results["setup_warm"]["images"] == sum(counts.values())
    assert results["head"]["epoch2_s"] > 0 and results["optimize"]["exit_code"] == 0
    assert all(r["peak_mib"] > 0 for r in results.values() if isinstance(r, dict))
    assert (tmp_path / "work" / "stream" / "train").is_dir()
