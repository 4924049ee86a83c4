"""Process-level settings: the CPU allocator, bf16 detection, precision per device, cache dirs, usable CPUs."""

from __future__ import annotations

import ctypes
import logging
import os
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

#: forces :func:`cpu_has_fast_bf16` (``0`` or ``1``)
FAST_BF16_ENV = "COVID_LIGHTNING_FAST_BF16"


def keep_freed_memory() -> bool:
    """glibc ``mallopt`` so freed memory is reused instead of faulting in fresh pages; False without glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(-4, 0)) and bool(libc.mallopt(-1, 1 << 30))  # M_MMAP_MAX, M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        return False


def tune_cpu_allocator() -> bool:
    """:func:`keep_freed_memory` unless ``COVID_LIGHTNING_MALLOC=default``."""
    return os.environ.get("COVID_LIGHTNING_MALLOC", "heap") != "default" and keep_freed_memory()


def cpu_has_fast_bf16() -> bool:
    """Whether oneDNN has native bfloat16 kernels on this CPU (``COVID_LIGHTNING_FAST_BF16=0|1`` overrides)."""
    forced = os.environ.get(FAST_BF16_ENV, "").strip().lower()
    if forced in ("0", "1", "false", "true", "no", "yes"):
        return forced in ("1", "true", "yes")
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def device_precision(precision: Any, accelerator: Any) -> Any:
    """On a CPU, ``16-mixed`` becomes ``bf16-mixed`` where the CPU has native bf16 kernels, else ``32-true``."""
    on_cpu = accelerator == "cpu" or (accelerator in (None, "auto") and not torch.cuda.is_available())
    if not on_cpu:
        return precision
    fast_bf16 = cpu_has_fast_bf16()
    if str(precision) in ("16-mixed", "16"):
        new = "bf16-mixed" if fast_bf16 else "32-true"
        log.warning("precision %s needs a GPU; training on the CPU with %s instead.", precision, new)
        return new
    if str(precision) in ("bf16-mixed", "bf16") and not fast_bf16:
        log.warning("This CPU has no native bfloat16 kernels: %s will be much slower than 32-true.", precision)
    return precision


def cache_dir(*parts: str) -> Path:
    """``$XDG_CACHE_HOME/covid_lightning/<parts>`` (``~/.cache/...`` by default): every cache of the package."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").joinpath("covid_lightning", *parts)


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask; ``os.cpu_count()`` where there is none)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1
