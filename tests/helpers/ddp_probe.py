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


class RankSamples(L.Callback):
    """Every rank writes the sample paths it trained and validated on (epoch 0) to its own JSON file."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)
        self.seen: dict[str, list[str]] = {"train": [], "val": []}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.current_epoch == 0:
            self.seen["train"] += [str(p) for p in batch["path"]]

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if not trainer.sanity_checking and trainer.current_epoch == 0:
            self.seen["val"] += [str(p) for p in batch["path"]]

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        record = {"rank": trainer.global_rank, "world": trainer.world_size, "pid": os.getpid(), **self.seen}
        (self.out_dir / f"samples{trainer.global_rank}.json").write_text(json.dumps(record))
