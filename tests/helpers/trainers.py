"""A quiet CPU Trainer for module-level tests (no logger, no progress bar, no summary)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L


def quiet_trainer(tmp_path: Path, **kw: Any) -> L.Trainer:
    opts: dict[str, Any] = dict(
        default_root_dir=tmp_path,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    opts.update(kw)
    return L.Trainer(**opts)
