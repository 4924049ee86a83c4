"""Checkpoints that are never left half-written, and a loader that names the bad file and what to do.

Lightning saves a local checkpoint through an fsspec transaction: the bytes go to a temp file in ``$TMPDIR``
and are moved onto the target at commit. When ``$TMPDIR`` is on another filesystem (a bind mount, NFS,
``/dev/shm``) that move is a copy over the existing ``last.ckpt``, so a kill during it leaves a truncated or
empty file. :class:`AtomicCheckpointIO` writes next to the target instead and renames it into place.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from fsspec.core import url_to_fs
from fsspec.utils import get_protocol
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO

from covid_lightning.errors import UserError

__all__ = ["AtomicCheckpointIO", "CheckpointError", "atomic_torch_save", "load_checkpoint_file"]

_TEMP_SUFFIX = ".tmp"  # not ".ckpt": Lightning's ckpt_path="last" lookup must never pick a temp file
_MAX_LISTED = 5


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()  # once, at import: reading it means setting it, which is not thread safe


class CheckpointError(UserError, ValueError):
    """A checkpoint file is missing, empty, truncated or not a checkpoint; the message says what to do."""


def _local_path(path: _PATH) -> Path | None:
    """``path`` as a local :class:`Path`, or ``None`` for a remote fsspec URL (``s3://``, ``gs://``, ...)."""
    text = os.fspath(path)
    if get_protocol(text) not in ("file", "local"):
        return None
    if "://" in text or text.startswith("local:"):
        _, text = url_to_fs(text)
    return Path(text)


def _fsync_dir(folder: Path) -> None:
    """Persist a rename in ``folder`` (POSIX); a no-op where folders cannot be opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` to a temp file in ``path``'s folder, fsync it, then ``os.replace`` it onto ``path``.

    Readers (and a later resume) see the old file or the new one, never a partial one. On any error, the
    temp file is removed; a hard kill can leave a hidden ``.<name>.*.tmp`` file behind, never a broken ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        mode = path.stat().st_mode & 0o777
    except OSError:
        mode = 0o666 & ~_UMASK
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=_TEMP_SUFFIX)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        with contextlib.suppress(OSError):  # mkstemp makes it 0600; keep what a plain save would give
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(path.parent)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's :class:`TorchCheckpointIO` with local saves made atomic by :func:`atomic_torch_save`.

    Use it as ``Trainer(plugins=[AtomicCheckpointIO()])``. Remote paths (fsspec URLs) and ``storage_options``
    go to Lightning's own implementation.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        """Write ``checkpoint`` to ``path`` so that ``path`` is never seen half-written."""
        local = _local_path(path) if storage_options is None else None
        if local is None:
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        atomic_torch_save(checkpoint, local)


# --------------------------------------------------------------------------------------------------
# Loading with a clear error
# --------------------------------------------------------------------------------------------------


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def _others(path: Path) -> str:
    """What else to use: the other ``.ckpt`` files in ``path``'s folder, ``best-*`` first, newest first."""
    folder = path.parent
    try:
        found = [p for p in folder.glob("*.ckpt") if p.is_file() and p.name != path.name]
    except OSError:
        found = []
    if not found:
        return f"use another checkpoint, e.g. the run's best-*.ckpt (there is no other .ckpt in {folder})"
    found.sort(key=lambda p: (not p.name.startswith("best"), -_mtime(p)))
    shown = ", ".join(str(p) for p in found[:_MAX_LISTED])
    more = f" and {len(found) - _MAX_LISTED} more" if len(found) > _MAX_LISTED else ""
    return f"use another checkpoint, e.g. the best-*.ckpt in the same folder; there: {shown}{more}"


def load_checkpoint_file(
    path: str | Path, *, map_location: Any = "cpu", required_keys: tuple[str, ...] = ("state_dict",)
) -> dict[str, Any]:
    """Read a checkpoint with ``torch.load(weights_only=True)``, or raise :class:`CheckpointError`.

    A missing, empty, truncated or non-checkpoint file (a dict lacking ``required_keys`` included) gets one
    clear message naming the file and saying what to do, instead of a bare ``EOFError`` or zip error.
    """
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
        raise CheckpointError(
            f"{path} is a torch file but not a checkpoint (it holds a {type(obj).__name__}); {_others(path)}."
        )
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
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    detail = f"{type(err).__name__}: {(lines or [''])[0].split('. ')[0]}"  # torch's messages run on
    if isinstance(err, PermissionError):
        return f"Checkpoint {path} cannot be read ({err}): fix its permissions, or {_others(path)}."
    refused = next((line for line in lines if "Unsupported global" in line), None)
    if refused is not None:
        return (
            f"Checkpoint {path} holds Python objects that weights-only loading refuses ({refused.split('. ')[0]}). "
            f"Use a checkpoint written by this toolkit, or {_others(path)}."
        )
    head = b""
    with contextlib.suppress(OSError), path.open("rb") as f:
        head = f.read(4)
    if head.startswith(b"PK"):  # torch's zip format: the start is there, the rest is not
        return (
            f"Checkpoint {path} is truncated or damaged ({size} bytes; {detail}): it was probably cut off while "
            f"being written or copied; {_others(path)}."
        )
    return f"{path} is not a PyTorch checkpoint ({detail}); {_others(path)}."
