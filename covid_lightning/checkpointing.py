"""Checkpoints never left half-written, and a loader that names a bad file and what to do."""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path
from typing import Any

import torch
from fsspec.core import url_to_fs
from fsspec.utils import get_protocol
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO

from covid_lightning.errors import UserError


class CheckpointError(UserError, ValueError):
    """A checkpoint file is missing, empty, truncated or not a checkpoint; the message says what to do."""


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` to a temp file in ``path``'s folder, fsync it, then ``os.replace`` it onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "xb") as f:  # created with the umask's mode, as a plain save
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    with contextlib.suppress(OSError):  # persist the rename (POSIX; folders cannot be opened on Windows)
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's :class:`TorchCheckpointIO` with local saves made atomic by :func:`atomic_torch_save`."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        if storage_options is not None or get_protocol(os.fspath(path)) not in ("file", "local"):
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_torch_save(checkpoint, url_to_fs(os.fspath(path))[1])


def _others(path: Path) -> str:
    """What to use instead: the other ``.ckpt`` files of ``path``'s folder, ``best-*`` first, newest first."""
    with contextlib.suppress(OSError):
        found = sorted(
            (p for p in path.parent.glob("*.ckpt") if p.is_file() and p.name != path.name),
            key=lambda p: (not p.name.startswith("best"), -p.stat().st_mtime),
        )
        if found:
            more = f" and {len(found) - 5} more" if len(found) > 5 else ""
            shown = ", ".join(map(str, found[:5]))
            return f"use another checkpoint, e.g. the best-*.ckpt in the same folder; there: {shown}{more}"
    return f"use another checkpoint, e.g. the run's best-*.ckpt (there is no other .ckpt in {path.parent})"


def load_checkpoint_file(
    path: str | Path, *, map_location: Any = "cpu", required_keys: tuple[str, ...] = ("state_dict",)
) -> dict[str, Any]:
    """``torch.load(weights_only=True)`` of a checkpoint, or a :class:`CheckpointError` saying what is wrong."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"Checkpoint {path} does not exist: check the path, or {_others(path)}.")
    if path.is_dir():
        raise CheckpointError(f"Checkpoint {path} is a folder, not a checkpoint file: pass a .ckpt file in it.")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(
            f"Checkpoint {path} is empty (0 bytes): it was cut off while being written; {_others(path)}."
        )
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # EOFError, zip RuntimeError, UnpicklingError, ...: all mean "cannot use this file"
        raise CheckpointError(_unreadable(path, size, err)) from err
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} is a torch file but not a checkpoint (a {type(obj).__name__}); {_others(path)}.")
    missing = [k for k in required_keys if k not in obj]
    if missing:
        keys = ", ".join(map(str, list(obj)[:8])) or "none"
        raise CheckpointError(
            f"{path} is a torch file but not a Lightning checkpoint (no {', '.join(missing)}; keys: {keys}); "
            f"{_others(path)}."
        )
    return obj


def _unreadable(path: Path, size: int, err: BaseException) -> str:
    """Why ``torch.load`` failed on ``path``, from the error and the file's first bytes, and what to do."""
    lines = [line.strip().split(". ")[0] for line in str(err).splitlines() if line.strip()]  # torch's run on
    refused = next((line for line in lines if "Unsupported global" in line), None)
    if isinstance(err, PermissionError):
        return f"Checkpoint {path} cannot be read ({err}): fix its permissions, or {_others(path)}."
    if refused is not None:
        why = f"holds Python objects that weights-only loading refuses ({refused}). Use a checkpoint written by this"
        return f"Checkpoint {path} {why} toolkit, or {_others(path)}."
    detail = f"{type(err).__name__}: {(lines or [''])[0]}"
    with path.open("rb") as f:
        zipped = f.read(2) == b"PK"  # torch's zip format: the start is there, the rest is not
    if zipped:
        cut = "it was probably cut off while being written or copied"
        return f"Checkpoint {path} is truncated or damaged ({size} bytes; {detail}): {cut}; {_others(path)}."
    return f"{path} is not a PyTorch checkpoint ({detail}); {_others(path)}."
