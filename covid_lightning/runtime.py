"""Process-level tuning for CPU training and inference."""

from __future__ import annotations

import ctypes
import logging
import os
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

#: glibc ``mallopt`` parameters
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
#: environment variable that forces :func:`cpu_has_fast_bf16` (``0`` or ``1``)
FAST_BF16_ENV = "COVID_LIGHTNING_FAST_BF16"


def keep_freed_memory() -> bool:
    """glibc: serve every allocation from the heap and keep freed memory there (``mallopt``: no mmap, trim
    threshold 1 GiB). By default each tensor above 32 MiB is a fresh ``mmap``, and its pages fault in (are
    zeroed by the kernel) at every use: on a CPU that can be most of an eager step at the lab's batch sizes.
    The process keeps its peak memory instead. False where glibc is not the allocator."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30))
    except (OSError, AttributeError):
        return False


def tune_cpu_allocator() -> bool:
    """:func:`keep_freed_memory` unless ``COVID_LIGHTNING_MALLOC=default`` (measured: up to ~2x faster eager
    CPU steps at the lab's batch sizes, at the cost of keeping the peak memory)."""
    if os.environ.get("COVID_LIGHTNING_MALLOC", "heap") == "default":
        return False
    return keep_freed_memory()


def cpu_has_fast_bf16() -> bool:
    """Whether oneDNN has native bfloat16 kernels on this CPU (AVX512-BF16/AMX); without them a bf16
    convolution is many times slower than float32. ``COVID_LIGHTNING_FAST_BF16=0|1`` overrides the
    detection (to run the suite as another CPU kind would)."""
    forced = os.environ.get(FAST_BF16_ENV, "").strip().lower()
    if forced in ("0", "1", "false", "true", "no", "yes"):
        return forced in ("1", "true", "yes")
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def device_precision(precision: Any, accelerator: Any) -> Any:
    """Mixed precision suited to the device that will train.

    ``16-mixed`` (float16 AMP) is a GPU feature: on the CPU it becomes ``bf16-mixed`` where the CPU has
    native bfloat16 kernels, else ``32-true``. An explicit ``bf16-mixed`` on a CPU without them is kept,
    with a warning. One config then serves every machine.
    """
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
    """``$XDG_CACHE_HOME/covid_lightning/<parts>`` (``~/.cache/covid_lightning/...`` by default): the one place
    every cache of the package (inspections, decoded images, lung masks, the demo data) lives under."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base.joinpath("covid_lightning", *parts)


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask; ``os.cpu_count()`` where there is none)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1
