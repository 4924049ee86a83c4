"""Two-process CPU DDP (gloo) through the console script: every rank reports the same validation metrics."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # subprocess runs of the real command

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("config", ["configs/demo/classification.yaml", "configs/demo/segmentation.yaml"])
def test_two_process_ddp_fit_agrees_across_ranks(config: str, demo_root: Path, tmp_path: Path):
    probe = tmp_path / "ranks"
    args = [
        sys.executable, "-m", "covid_lightning", "fit", "--config", str(REPO / config),
        "--data.root", str(demo_root), "--data.image_size", "32", "--data.batch_size", "4", "--data.num_workers", "0",
        "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp",
        "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.enable_progress_bar", "false",
        "--trainer.logger", "lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir", str(tmp_path / "logs"),
        "--trainer.callbacks+=tests.helpers.ddp_probe.RankMetrics", "--trainer.callbacks.out_dir", str(probe),
    ]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", PYTHONWARNINGS="ignore")
    proc = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    records = [json.loads((probe / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert {r["world"] for r in records} == {2} and records[0]["pid"] != records[1]["pid"]
    assert records[0]["metrics"] and records[0]["metrics"] == records[1]["metrics"]
    # checkpoints and the split manifest are written once, by rank 0
    run = tmp_path / "logs" / "lightning_logs" / "version_0"
    assert (run / "split.csv").is_file()
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert "last.ckpt" in names and len([n for n in names if n.startswith("best-")]) == 1, names
    assert not [n for n in names if "-v1" in n], f"a second rank wrote its own checkpoint: {names}"
