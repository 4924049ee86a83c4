"""A callback for the DDP test: every rank writes the validation metrics it sees to its own JSON file."""

import json
import os
from pathlib import Path

import lightning as L


class RankMetrics(L.Callback):
    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        self.out_dir.mkdir(parents=True, exist_ok=True)
        record = {"rank": trainer.global_rank, "world": trainer.world_size, "pid": os.getpid(), "metrics": metrics}
        (self.out_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))
