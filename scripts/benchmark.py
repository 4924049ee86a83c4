#!/usr/bin/env python
r"""Speed and memory benchmarks: data loading, training (``Trainer.fit`` vs a plain loop), inference, peak memory.

::

    python scripts/benchmark.py                                   # every section, the lab's sizes, demo data
    python scripts/benchmark.py --data.root /path/to/COVID-19_Radiography_Dataset --json bench.json
    python scripts/benchmark.py --sections train,infer --compile   # + torch.compile rows
    python scripts/benchmark.py --malloc default                  # glibc's default allocator (CLI: heap)
    python scripts/benchmark.py --quick                           # tiny sizes, seconds (the smoke test)

Every figure is the median of ``--repeats`` timed repetitions after ``--warmup`` untimed ones. The header
names the machine (CPU model and flags, usable threads, GPU, versions, fast bf16, allocator); each section
title gives its wall time and the cores the main process actually used (well below torch's thread count
means a busy machine: its numbers are noise). ``sys`` columns are the kernel's share of the CPU time, in
practice page faults of freshly ``mmap``-ed tensor memory: ``--malloc heap``, the default as in the CLI
(:func:`covid_lightning.runtime.tune_cpu_allocator`), removes them.

Sections:

``loader``
    The DataModules' train loaders end to end (decode, resize, augment, collate), per worker count,
    images/s over windows of ``--loader-batches`` batches after the warm-up batches; epochs are cycled
    with persistent workers (spawned once, their start-up is the ``first batch`` column). The last row
    of each DataModule serves the decoded-image cache (``data.cache_images: memory``, built in ``setup``,
    untimed) with the worker count the configs pick.
``train``
    ms/step and images/s of both models, the same model class, batch, precision (autocast) and memory
    format three ways: ``fit``, ``Trainer.fit``; ``loop``, a plain PyTorch step computing ``shared_step``'s
    loss (no metrics, no logging) on a twin model, run right after each fit step on the same batch (paired:
    both see the same moment of a noisy machine); ``+metrics``, a plain loop calling ``model.shared_step``
    itself (first memory format only). All read the same pre-made in-memory batches: the Trainer gets a
    DataLoader over them (``batch_size=None``: no decoding, no collation), so its number is compute plus
    Lightning and the data cost is the ``loader`` section's. ``fit ms`` is a whole fit cycle (batch fetch,
    hooks, forward, backward, optimizer step: from the end of the previous paired plain step to
    ``on_train_batch_end``), ``hook ms`` the ``on_train_batch_start`` -> ``on_train_batch_end`` part.
    ``overhead`` = the median over steps of fit / loop - 1 (target <= 5%), ``trainer`` = fit / +metrics - 1
    (Lightning's own share; the rest is the metrics). ``1st step s`` is the case's first (cold) step:
    allocations, oneDNN kernel creation, compilation.
``cache``
    The frozen-backbone regimes (``head``, ``last_4_blocks``) trained through ``Trainer.fit`` on the
    train split twice: reading images every epoch, and with :class:`FrozenFeatureCache` (the frozen prefix
    run once at the start of ``fit``: ``cache build s``). Median seconds per epoch after the first, no
    validation; ``speedup`` = uncached / cached epoch.
``infer``
    images/s at ``--infer-batch``: eager contiguous and channels_last (float32), autocast rows for each
    mixed precision asked for, ``torch.compile`` (``--compile``; compile time in ``setup s``), ONNX Runtime
    on the graph :func:`covid_lightning.export.export_onnx` writes (export time in ``setup s``; intra-op
    threads = torch's; on CUDA it is fed from host memory, the eager rows from the GPU), and its int8 version
    (:mod:`covid_lightning.export`; calibrated on the timed batch, so a speed figure only: what int8 costs
    in accuracy is measured per model by ``scripts/quantize_eval.py``).
``GFLOP/s`` and ``% matmul`` (train and infer)
    The model's convolution and matmul FLOPs (``torch.utils.flop_counter`` on one forward pass; a training
    step of a fully trainable model = 3 x forward x batch) per second, and that rate over the float32 matmul
    rate measured on the same device at start (the header's ``compute`` line). It says how close a row is
    to what the hardware delivers, and ``keras % matmul`` what a Keras reference figure would need here:
    well above 100% is beyond this machine in float32, whatever the framework.
``memory``
    Peak resident memory per case (a few training steps, or inference batches): on Linux the RSS
    high-water mark is reset before each case (``/proc/self/clear_refs``, after ``malloc_trim``), so
    ``peak`` is the case's own and ``delta`` what the case added to the process; elsewhere the
    process-wide ``ru_maxrss`` is reported (marked). On CUDA also ``torch.cuda.max_memory_allocated``.
    The JSON also has the process-wide peak after each section.

The models are built as the lab's configs build them (Keras-flavour MobileNetV2, x/255 inputs, random
weights: speed does not depend on them). ``--keras-json FILE`` (written by ``scripts/keras_reference.py``
on the same machine) adds the lab's Keras figures next to the rows measured at the lab's sizes, and
``x keras`` = covid-lightning's speed over Keras' (> 1: faster); without it there is no Keras column,
since a figure from another machine says nothing about this one.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import functools
import gc
import json
import logging
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from covid_lightning.runtime import keep_freed_memory, usable_cpus

SECTIONS = ("loader", "train", "cache", "infer", "memory")
PRECISIONS = ("32-true", "bf16-mixed", "16-mixed")
MEMORY_FORMATS = ("channels_last", "contiguous")
CLASSIFIER_REGIMES = ("head", "last_2_conv", "all")
#: regimes of the ``cache`` section (FrozenFeatureCache): the lab's winner and the CPU recipe's
CACHE_REGIMES = ("head", "last_4_blocks")
MIB = 1024 * 1024

#: The sizes the Keras figures were measured at.
REFERENCE_SIZES = {
    "classifier_batch": 32,
    "classifier_size": 224,
    "unet_batch": 16,
    "unet_size": 128,
    "infer_batch": 64,
}

DEFAULTS: dict[str, Any] = {
    "classifier_batch": 32,
    "classifier_size": 224,
    "unet_batch": 16,
    "unet_size": 128,
    "infer_batch": 64,
    "warmup": 2,
    "repeats": 5,
    "loader_batches": 4,
    "onnx_opset": 18,
}
#: ``--quick``: tiny sizes; ONNX through the TorchScript-based exporter (opset 17, ~2 s instead of ~20 s).
QUICK: dict[str, Any] = {
    "classifier_batch": 4,
    "classifier_size": 64,
    "unet_batch": 2,
    "unet_size": 32,
    "infer_batch": 4,
    "warmup": 1,
    "repeats": 2,
    "loader_batches": 2,
    "onnx_opset": 17,
}

Row = dict[str, Any]


@dataclass
class Settings:
    """What to run, at which sizes (see :func:`build_parser` for the meaning of each)."""

    data_root: str | None = None
    device: str = "cpu"
    sections: tuple[str, ...] = SECTIONS
    classifier_batch: int = 32
    classifier_size: int = 224
    unet_batch: int = 16
    unet_size: int = 128
    infer_batch: int = 64
    workers: tuple[int, ...] = (0,)
    precisions: tuple[str, ...] = ("32-true",)
    regimes: tuple[str, ...] = CLASSIFIER_REGIMES
    memory_formats: tuple[str, ...] = MEMORY_FORMATS
    compile: bool = False
    warmup: int = 2
    repeats: int = 5
    loader_batches: int = 4
    augment: str = "none"
    onnx_opset: int = 18
    threads: int | None = None
    malloc: str = "default"
    quick: bool = False
    json_path: str | None = None
    #: the lab's Keras figures measured on this machine: "section/model/case/precision" -> ms/step or img/s
    keras: dict[str, float] = field(default_factory=dict)
    keras_json: str | None = None

    @property
    def at_reference_sizes(self) -> bool:
        return all(getattr(self, k) == v for k, v in REFERENCE_SIZES.items())


# ---------------------------------------------------------------------------------------------
# machine
# ---------------------------------------------------------------------------------------------


def cpu_model() -> str:
    """The CPU's marketing name from ``/proc/cpuinfo`` (``platform.processor()`` elsewhere)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    """The vector-extension flags that matter for convolution speed (AVX2, AVX-512, bf16, AMX)."""
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                return [f for f in wanted if f in flags]
    return []


def cgroup_cpu_quota() -> float | None:
    """The container's CPU limit in cores (cgroup v2 ``cpu.max``), None when unlimited or unknown."""
    with contextlib.suppress(OSError, ValueError):
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            return int(quota) / int(period)
    return None


def gpu_name(device: torch.device) -> str | None:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else None


def machine_info(device: torch.device, n: int = 2048) -> dict[str, Any]:
    """Everything a reader needs to compare two benchmark runs (``n``: the matmul size of the compute ceiling)."""
    import lightning

    from covid_lightning.runtime import cpu_has_fast_bf16

    return {
        "cpu": cpu_model(),
        "cpu_flags": cpu_flags(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": usable_cpus(),
        "cgroup_cpu_quota": cgroup_cpu_quota(),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "cpu_fast_bf16": cpu_has_fast_bf16(),
        "device": str(device),
        "gpu": gpu_name(device),
        "cuda_available": torch.cuda.is_available(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "onnxruntime": _version_of("onnxruntime"),
        "allocator": allocator_info(),
        "platform": platform.platform(),
        "matmul_fp32_gflops": matmul_gflops(device, n=n),
    }


def matmul_gflops(device: torch.device, n: int = 2048, repeats: int = 10) -> float:
    """Measured float32 matmul GFLOP/s (``n`` x ``n``, torch's threads, the best of ``repeats``: a ceiling, and
    a busy machine only ever slows it down): the yardstick the training and inference rows' GFLOP/s are read
    against (on CUDA without TF32, torch's default)."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    timing = time_calls(lambda: a @ b, warmup=2, repeats=repeats, device=device)
    return 2 * n**3 / min(timing.times) / 1e9


@functools.cache
def forward_gflop(model: str, size: int) -> float:
    """GFLOP of one image's forward pass (``torch.utils.flop_counter``: convolutions and matmuls)."""
    from torch.utils.flop_counter import FlopCounterMode

    module = ModelCase(model).build(size).eval()
    image = torch.zeros(1, 3, size, size, dtype=torch.uint8)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        module(image)
    return counter.get_total_flops() / 1e9


def train_gflop(model: str, regime: str, batch: int, size: int) -> float | None:
    """GFLOP of one training step of a fully trainable model, 3 x forward (backward: input and weight
    gradients); None for frozen regimes, whose backward stops early. (``FlopCounterMode`` itself is not
    used for the backward: it counts a grouped convolution's backward ``groups`` times over.)"""
    if model == "classifier" and regime != "all":
        return None
    return 3 * forward_gflop(model, size) * batch


def _version_of(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except ImportError:
        return None


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu; ``cuda`` without a GPU is an error."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA GPU is visible to torch.")
    return torch.device(name)


def default_precisions(device: torch.device) -> tuple[str, ...]:
    """32-true, + bf16-mixed on a CPU with native bf16 kernels or a bf16-capable GPU, + 16-mixed on CUDA."""
    from covid_lightning.runtime import cpu_has_fast_bf16

    if device.type == "cuda":
        return ("32-true", "bf16-mixed", "16-mixed") if torch.cuda.is_bf16_supported() else ("32-true", "16-mixed")
    return ("32-true", "bf16-mixed") if cpu_has_fast_bf16() else ("32-true",)


def default_workers() -> tuple[int, ...]:
    """0, 1, 2 and the worker count the configs pick (:func:`default_num_workers`)."""
    from covid_lightning.data.datamodules import default_num_workers

    return tuple(sorted({0, 1, 2, default_num_workers()}))


# ---------------------------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cpu_usage() -> tuple[float, float]:
    """(user, system) CPU seconds this process has used so far, all threads (zeros where unknown)."""
    try:
        import resource
    except ImportError:  # not Unix
        return 0.0, 0.0
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime, usage.ru_stime


def kernel_share(start: tuple[float, float], end: tuple[float, float]) -> float:
    """Share of the CPU time between two :func:`cpu_usage` snapshots spent in the kernel (mostly page
    faults of freshly mapped tensors, see ``--malloc``); NaN when no CPU time was recorded."""
    user, system = end[0] - start[0], end[1] - start[1]
    return system / (user + system) if user + system > 0 else float("nan")


@dataclass
class Timing:
    """Seconds of each timed call, and the kernel's share of the CPU time they used."""

    times: list[float]
    kernel: float = float("nan")


def time_calls(fn: Callable[[], Any], warmup: int, repeats: int, device: torch.device) -> Timing:
    """Times of ``repeats`` calls of ``fn`` after ``warmup`` untimed ones (device-synchronised)."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    usage = cpu_usage()
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return Timing(times, kernel_share(usage, cpu_usage()))


def median(values: Iterable[float]) -> float:
    values = list(values)
    return statistics.median(values) if values else float("nan")


def spread(values: Sequence[float]) -> float:
    """(max - min) / median of ``values``: how noisy a measurement was (0 = perfectly steady)."""
    mid = median(values)
    return (max(values) - min(values)) / mid if values and mid > 0 else float("nan")


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """The autocast Lightning's ``precision`` uses (``32-true``: none)."""
    if precision == "bf16-mixed":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if precision == "16-mixed":
        return torch.autocast(device.type, dtype=torch.float16)
    return contextlib.nullcontext()


# ---------------------------------------------------------------------------------------------
# memory
# ---------------------------------------------------------------------------------------------


def _proc_status_mib(key: str) -> float | None:
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024  # kB
    return None


def current_rss_mib() -> float | None:
    """Resident memory now (``VmRSS``), None off Linux."""
    return _proc_status_mib("VmRSS")


def process_peak_rss_mib() -> float:
    """The process-wide RSS high-water mark (``ru_maxrss``: kB on Linux, bytes on macOS)."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / MIB if sys.platform == "darwin" else peak / 1024


def release_memory() -> None:
    """Collect garbage and hand freed heap memory back to the OS (glibc ``malloc_trim``), so RSS is honest."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def reset_peak_rss() -> bool:
    """Reset this process's RSS high-water mark (``VmHWM``) to its current RSS; False where unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return _proc_status_mib("VmHWM") is not None


def peak_rss_mib() -> float | None:
    """``VmHWM``: the RSS high-water mark since the last :func:`reset_peak_rss`."""
    return _proc_status_mib("VmHWM")


MALLOC_MODES = ("default", "heap")


def allocator_info() -> str:
    """Which allocator and malloc tuning this process runs with (LD_PRELOAD, glibc tunables, MALLOC_* env)."""
    preload = [Path(p).name for p in os.environ.get("LD_PRELOAD", "").split() if p]
    tuning = [f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith("MALLOC_") or k == "GLIBC_TUNABLES"]
    return ", ".join([*preload, *tuning]) or ("glibc malloc" if sys.platform.startswith("linux") else "system malloc")


# ---------------------------------------------------------------------------------------------
# tables
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Column:
    """One table column: row key, header, format spec (``None`` values and NaN print as ``-``)."""

    key: str
    header: str
    fmt: str = ""


def format_cell(value: Any, fmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float) and fmt:
        return format(value, fmt)
    return str(value)


def format_table(rows: Sequence[Row], columns: Sequence[Column]) -> str:
    """A plain-text table, numbers right-aligned, text left-aligned."""
    cells = [[format_cell(row.get(c.key), c.fmt) for c in columns] for row in rows]
    widths = [max([len(c.header), *(len(r[i]) for r in cells)]) for i, c in enumerate(columns)]
    numeric = [all(isinstance(row.get(c.key), (int, float)) or row.get(c.key) is None for row in rows) for c in columns]

    def line(values: Sequence[str]) -> str:
        return "  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)).rstrip()

    out = [line([c.header for c in columns]), line(["-" * w for w in widths])]
    out += [line(r) for r in cells]
    return "\n".join(out)


TABLES: dict[str, list[Column]] = {
    "cache": [
        Column("regime", "regime"),
        Column("train_images", "images"),
        Column("batch", "batch"),
        Column("size", "size"),
        Column("workers", "workers"),
        Column("uncached_epoch_s", "uncached epoch s", ".2f"),
        Column("cache_build_s", "cache build s", ".1f"),
        Column("cached_epoch_s", "cached epoch s", ".3f"),
        Column("speedup", "speedup", ".0f"),
    ],
    "loader": [
        Column("datamodule", "datamodule"),
        Column("cache", "image cache"),
        Column("workers", "workers"),
        Column("batch", "batch"),
        Column("size", "size"),
        Column("first_batch_s", "first batch s", ".2f"),
        Column("ms_per_batch", "ms/batch", ".1f"),
        Column("img_s", "img/s", ".1f"),
        Column("spread", "spread", ".0%"),
    ],
    "train": [
        Column("model", "model"),
        Column("case", "case"),
        Column("memory_format", "format"),
        Column("precision", "precision"),
        Column("compile", "compile"),
        Column("batch", "batch"),
        Column("size", "size"),
        Column("plain_ms", "loop ms", ".1f"),
        Column("step_ms", "+metrics ms", ".1f"),
        Column("fit_ms", "fit ms", ".1f"),
        Column("hook_ms", "hook ms", ".1f"),
        Column("overhead", "overhead", "+.1%"),
        Column("trainer_overhead", "trainer", "+.1%"),
        Column("fit_img_s", "fit img/s", ".1f"),
        Column("fit_gflop_s", "GFLOP/s", ".0f"),
        Column("fit_matmul_share", "% matmul", ".0%"),
        Column("fit_kernel", "sys", ".0%"),
        Column("first_step_s", "1st step s", ".2f"),
        Column("keras_ms", "keras ms", ".0f"),
        Column("keras_speed", "x keras", ".2f"),
        Column("keras_matmul_share", "keras % matmul", ".0%"),
    ],
    "infer": [
        Column("model", "model"),
        Column("variant", "variant"),
        Column("memory_format", "format"),
        Column("precision", "precision"),
        Column("batch", "batch"),
        Column("size", "size"),
        Column("ms_per_batch", "ms/batch", ".1f"),
        Column("img_s", "img/s", ".1f"),
        Column("gflop_s", "GFLOP/s", ".0f"),
        Column("matmul_share", "% matmul", ".0%"),
        Column("spread", "spread", ".0%"),
        Column("kernel", "sys", ".0%"),
        Column("setup_s", "setup s", ".1f"),
        Column("keras_img_s", "keras img/s", ".0f"),
        Column("keras_speed", "x keras", ".2f"),
        Column("keras_matmul_share", "keras % matmul", ".0%"),
        Column("note", "note"),
    ],
    "memory": [
        Column("case", "case"),
        Column("precision", "precision"),
        Column("batch", "batch"),
        Column("size", "size"),
        Column("rss_start_mib", "RSS start MiB", ".0f"),
        Column("rss_peak_mib", "RSS peak MiB", ".0f"),
        Column("rss_delta_mib", "delta MiB", ".0f"),
        Column("cuda_peak_mib", "CUDA peak MiB", ".0f"),
        Column("scope", "scope"),
    ],
}

TITLES = {
    "loader": "Data loading: train DataLoader end to end (decode, resize, augment, collate)",
    "train": "Training: Trainer.fit vs a plain PyTorch loop (same model, batch, precision, memory format)",
    "cache": "Frozen-prefix cache: one training epoch of a frozen-backbone regime, images vs FrozenFeatureCache",
    "infer": "Inference",
    "memory": "Peak memory",
}


def format_header(machine: dict[str, Any], settings: Settings) -> str:
    quota = machine["cgroup_cpu_quota"]
    lines = [
        f"CPU      {machine['cpu']} ({', '.join(machine['cpu_flags']) or 'no AVX2'}); "
        f"fast bf16: {'yes' if machine['cpu_fast_bf16'] else 'no'}",
        f"threads  torch {machine['torch_threads']} (inter-op {machine['torch_interop_threads']}), "
        f"usable CPUs {machine['usable_cpus']} of {machine['logical_cpus']}"
        + (f", cgroup quota {quota:g} cores" if quota else ""),
        f"device   {machine['device']}" + (f" ({machine['gpu']})" if machine["gpu"] else ""),
        f"compute  float32 matmul {machine['matmul_fp32_gflops']:.0f} GFLOP/s measured (the '% matmul' columns' "
        "yardstick)",
        f"memory   {machine['allocator']}"
        + ("; freed memory kept in the heap (--malloc heap)" if settings.malloc == "heap" else ""),
        f"versions python {machine['python']}, torch {machine['torch']}, lightning {machine['lightning']}, "
        f"onnxruntime {machine['onnxruntime'] or '-'}",
        f"settings {'quick, ' if settings.quick else ''}warmup {settings.warmup}, "
        f"repeats {settings.repeats} (medians); "
        f"classifier batch {settings.classifier_batch} @ {settings.classifier_size} px, U-Net batch "
        f"{settings.unet_batch} @ {settings.unet_size} px, inference batch {settings.infer_batch}; "
        f"precisions {', '.join(settings.precisions)}",
    ]
    return "\n".join(lines)


def format_notes(result: dict[str, Any]) -> str:
    """What the columns mean, and the total time."""
    notes = []
    if "train" in result["sections"]:
        notes.append(
            "train: fit = Trainer.fit over pre-made batches in memory, one whole cycle per step; loop = a plain step "
            "computing shared_step's loss (no metrics, no logging) on a twin model, run after each fit step on the "
            "same batch; +metrics = a plain loop calling model.shared_step; hook = on_train_batch_start -> end; "
            "overhead = median over steps of fit / loop - 1; trainer = fit / +metrics - 1 (Lightning's own share)."
        )
    if result["settings"].get("keras") and {"train", "infer"} & set(result["sections"]):
        notes.append(
            f"keras = the lab's Keras measured on this machine by scripts/keras_reference.py "
            f"({result['settings'].get('keras_json')}), at the lab's sizes only; x keras > 1: faster than Keras."
        )
    if {"train", "infer"} & set(result["sections"]):
        notes.append(
            "GFLOP/s = the model's convolution/matmul FLOPs per second (training: 3 x forward, fully trainable "
            "rows only); % matmul = that over the float32 matmul rate measured in the header (near 100%: as "
            "compute-bound as this machine's BLAS; a tuned convolution can exceed it a little, int8 rows count the "
            "same operations in int8). keras % matmul "
            "well above 100%: the Keras reference's speed needs more float32 compute than this machine delivers."
        )
        fix = "" if result["settings"].get("malloc") == "heap" else "; try --malloc heap"
        notes.append(f"sys = kernel share of the CPU time (page faults of fresh tensor memory{fix}).")
    notes.append(f"total {sum(result['elapsed_s'].values()):.0f} s")
    return "\n".join(notes)


def format_section(
    name: str, rows: Sequence[Row], elapsed_s: float, cpu_s: float | None = None, threads: int | None = None
) -> str:
    """Title (wall time; CPU time / wall time: well below torch's thread count = a busy machine) + table."""
    load = ""
    if cpu_s is not None and elapsed_s > 0:
        cores = cpu_s / elapsed_s
        load = f", main process used {cores:.1f} cores"
        threads = threads or torch.get_num_threads()
        if name != "loader" and cores < 0.75 * threads:
            load += f" of its {threads} threads: a busy machine? (try --threads)"
    columns = [c for c in TABLES[name] if not c.key.startswith("keras") or any(r.get(c.key) for r in rows)]
    return f"== {TITLES[name]} ({elapsed_s:.0f} s{load})\n{format_table(rows, columns)}"


def format_report(result: dict[str, Any]) -> str:
    """The whole printed report of a :func:`run` result (header, one table per section, notes)."""
    settings = Settings(**{k: tuple(v) if isinstance(v, list) else v for k, v in result["settings"].items()})
    parts = [format_header(result["machine"], settings)]
    threads = result["machine"]["torch_threads"]
    parts += [
        format_section(n, rows, result["elapsed_s"][n], result["cpu_s"].get(n), threads)
        for n, rows in result["sections"].items()
    ]
    return "\n\n".join([*parts, format_notes(result)])


# ---------------------------------------------------------------------------------------------
# models and batches
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelCase:
    """One model configuration: ``classifier`` (with a freezing regime) or ``unet`` (the lab's SeedUNet)."""

    model: str
    regime: str = "all"
    memory_format: str = "channels_last"
    compile: bool = False

    def build(self, size: int) -> Any:
        """The LightningModule, as the lab's configs build it (Keras-flavour backbone, x/255 inputs)."""
        from covid_lightning import LungSegmenter, XRayClassifier

        torch.manual_seed(0)
        if self.model == "classifier":
            return XRayClassifier(
                pretrained=False,
                flavor="keras",
                normalization="unit",
                trainable=self.regime,
                image_size=size,
                memory_format=self.memory_format,
                compile_model=self.compile,
            )
        return LungSegmenter(
            arch="seed_unet",
            normalization="unit",
            image_size=size,
            memory_format=self.memory_format,
            compile_model=self.compile,
        )


def make_batches(model: str, count: int, batch: int, size: int, seed: int = 0) -> list[dict[str, Any]]:
    """``count`` distinct batches shaped like the DataModules' (uint8 images, int64 labels, {0,1} masks)."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for i in range(count):
        item: dict[str, Any] = {
            "image": torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=generator),
            "label": torch.randint(0, 4, (batch,), generator=generator),
            "path": [f"synthetic/{i}/{j}.png" for j in range(batch)],
        }
        if model == "unet":
            item["mask"] = torch.randint(0, 2, (batch, 1, size, size), generator=generator).float()
        batches.append(item)
    return batches


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def plain_loss(module: Any, batch: dict[str, Any]) -> torch.Tensor:
    """``shared_step``'s training loss without its metric updates and logging."""
    logits = module(batch["image"]).float()
    if "mask" in batch:
        return module.compute_loss(logits, batch["mask"])
    weight = getattr(module, "class_weight", None)
    return F.cross_entropy(logits, batch["label"], weight=weight, label_smoothing=module.label_smoothing)


class InMemoryBatches(torch.utils.data.Dataset):
    """``length`` items cycling over pre-made batches (use with ``DataLoader(batch_size=None)``)."""

    def __init__(self, batches: Sequence[dict[str, Any]], length: int) -> None:
        self.batches = list(batches)
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.batches[index % len(self.batches)]


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence Lightning's start-up banners and the warnings a synthetic benchmark triggers by design."""
    loggers = [logging.getLogger(n) for n in ("lightning.pytorch", "lightning.fabric", "lightning")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*does not have many workers.*")
            warnings.filterwarnings("ignore", message=".*self.log.*")
            warnings.filterwarnings("ignore", message=".*bfloat16.*")
            warnings.filterwarnings("ignore", message=".*number of training batches.*")
            warnings.filterwarnings("ignore", message=".*GPU available but not used.*")
            warnings.filterwarnings("ignore", message=".*no `val_dataloader`.*")
            warnings.filterwarnings("ignore", category=FutureWarning)
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


# ---------------------------------------------------------------------------------------------
# section 1: data loading
# ---------------------------------------------------------------------------------------------


def _cycle(loader: Iterable) -> Iterator[Any]:
    while True:
        yield from loader


def loader_throughput(datamodule: Any, settings: Settings) -> Row:
    """images/s of ``datamodule``'s train loader: median over windows of ``loader_batches`` batches (images
    counted, so an epoch's short last batch counts as what it holds)."""
    datamodule.prepare_data()
    datamodule.setup("fit")
    loader = datamodule.train_dataloader()
    start = time.perf_counter()
    batches = _cycle(loader)
    next(batches)  # spawns the (persistent) workers
    first = time.perf_counter() - start
    for _ in range(max(0, settings.warmup - 1)):
        next(batches)
    windows, rates = [], []
    for _ in range(settings.repeats):
        start, images = time.perf_counter(), 0
        for _ in range(settings.loader_batches):
            images += len(next(batches)["image"])
        elapsed = time.perf_counter() - start
        windows.append(elapsed / settings.loader_batches)
        rates.append(images / elapsed)
    del batches, loader
    gc.collect()
    return {
        "datamodule": type(datamodule).__name__,
        "workers": datamodule.hparams.num_workers,
        "batch": datamodule.hparams.batch_size,
        "size": datamodule.hparams.image_size,
        "first_batch_s": first,
        "ms_per_batch": median(windows) * 1000,
        "img_s": median(rates),
        "spread": spread(rates),
        "train_images": len(datamodule.datasets["train"]),
    }


def bench_loader(settings: Settings) -> list[Row]:
    from covid_lightning import LungSegmentationDataModule, RadiographyDataModule
    from covid_lightning.data.datamodules import default_num_workers

    rows = []
    specs = [
        (RadiographyDataModule, settings.classifier_size, settings.classifier_batch),
        (LungSegmentationDataModule, settings.unet_size, settings.unet_batch),
    ]
    cases = [(w, "none") for w in settings.workers] + [(default_num_workers(), "memory")]
    for cls, size, batch in specs:
        for workers, cache in cases:
            dm = cls(
                root=settings.data_root,
                image_size=size,
                batch_size=batch,
                num_workers=workers,
                augment=settings.augment,
                cache_images=cache,
            )
            rows.append(loader_throughput(dm, settings) | {"cache": cache})
    return rows


def bench_trainer(device: torch.device, callbacks: list[Any], **kwargs: Any) -> Any:
    """A one-device ``Trainer`` that only trains: no validation, logger, checkpoint, progress bar or summary."""
    import lightning as L

    return L.Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu",
        devices=1,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
        **kwargs,
    )


def _epoch_timer() -> Any:
    from lightning.pytorch.callbacks import Callback

    class EpochTimer(Callback):
        """Seconds of every training epoch (``on_train_epoch_start`` -> ``on_train_epoch_end``)."""

        def __init__(self) -> None:
            self.seconds: list[float] = []

        def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
            self._start = time.perf_counter()

        def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
            self.seconds.append(time.perf_counter() - self._start)

    return EpochTimer()


def cache_row(regime: str, settings: Settings) -> Row:
    """Training epochs of ``regime`` on the train split read from images, then with FrozenFeatureCache
    (``cache build s``: its one pass over the train and val images at the start of ``fit``). Epochs are
    timed without validation; each figure is the median of ``repeats`` epochs after the first."""
    from covid_lightning import RadiographyDataModule, XRayClassifier
    from covid_lightning.callbacks import FrozenFeatureCache

    device, epochs = torch.device(settings.device), 1 + min(settings.repeats, 3)
    epoch_s: dict[bool, float] = {}
    cache = FrozenFeatureCache()
    for cached in (False, True):
        dm = RadiographyDataModule(
            root=settings.data_root,
            image_size=settings.classifier_size,
            batch_size=settings.classifier_batch,
            augment="none",
        )
        model = XRayClassifier(
            pretrained=False,
            flavor="keras",
            normalization="unit",
            trainable=regime,
            image_size=settings.classifier_size,
        )
        timer = _epoch_timer()
        # the Trainer's root takes the split manifest: a scratch folder, no litter in the working directory
        with tempfile.TemporaryDirectory(prefix="covid_lightning_bench_") as scratch, quiet():
            callbacks = [timer, cache] if cached else [timer]
            trainer = bench_trainer(device, callbacks, max_epochs=epochs, default_root_dir=scratch)
            trainer.fit(model, dm)
        epoch_s[cached] = median(timer.seconds[1:])
        del trainer, model
        gc.collect()
    return {
        "regime": regime,
        "train_images": len(dm.datasets["train"]),
        "batch": settings.classifier_batch,
        "size": settings.classifier_size,
        "workers": dm.hparams.num_workers if dm.hparams.num_workers is not None else "auto",
        "uncached_epoch_s": epoch_s[False],
        "cache_build_s": cache.seconds,
        "cached_epoch_s": epoch_s[True],
        "speedup": epoch_s[False] / epoch_s[True] if epoch_s[True] > 0 else None,
    }


def bench_cache(settings: Settings) -> list[Row]:
    return [cache_row(regime, settings) for regime in CACHE_REGIMES]


# ---------------------------------------------------------------------------------------------
# section 2: training
# ---------------------------------------------------------------------------------------------


def _step_timer(device: torch.device, paired: PlainStepper) -> Any:
    from lightning.pytorch.callbacks import Callback

    class StepTimer(Callback):
        """``time.perf_counter()`` at every ``on_train_batch_start``/``on_train_batch_end`` (device-synced),
        and the process's CPU usage at every batch end. Every batch end then runs one plain step of the twin
        model ``paired`` on the same batch (timed on its own, outside the fit's cycle), so each fit
        step has a plain step next to it: the two see the same moment of a noisy machine."""

        def __init__(self) -> None:
            self.starts: list[float] = []
            self.ends: list[float] = []
            self.resumes: list[float] = []  # where the next fit cycle starts (after the paired step)
            self.plain: list[float] = []
            self.usage: list[tuple[float, float]] = []

        def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
            synchronize(device)
            self.starts.append(time.perf_counter())

        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            synchronize(device)
            self.ends.append(time.perf_counter())
            self.usage.append(cpu_usage())
            self.plain.append(paired.step(batch))
            self.resumes.append(time.perf_counter())

    return StepTimer()


class PlainStepper:
    """A hand-written training step of one model case: batch to device, autocast forward + ``loss_fn``,
    backward, optimizer step (a GradScaler for 16-mixed, as Lightning). ``step(batch)`` returns its seconds."""

    def __init__(
        self,
        case: ModelCase,
        size: int,
        precision: str,
        device: torch.device,
        loss_fn: Callable[[Any, dict[str, Any]], torch.Tensor] = plain_loss,
    ) -> None:
        self.device, self.precision, self.loss_fn = device, precision, loss_fn
        self.model = case.build(size).to(device)
        self.model.configure_model()
        self.model.train()
        self.optimizer = self.model.configure_optimizers()
        self.scaler = torch.amp.GradScaler(device.type) if precision == "16-mixed" else None

    def step(self, batch: dict[str, Any]) -> float:
        synchronize(self.device)
        start = time.perf_counter()
        with torch.enable_grad():
            batch = to_device(batch, self.device)
            with autocast(self.device, self.precision):
                loss = self.loss_fn(self.model, batch)
            self.optimizer.zero_grad(set_to_none=True)
            if self.scaler is None:
                loss.backward()
                self.optimizer.step()
            else:
                self.scaler.scale(loss).backward()
                self.scaler.step(self.optimizer)
                self.scaler.update()
        synchronize(self.device)
        return time.perf_counter() - start


@dataclass
class StepTimes:
    """Per-step seconds of the timed steps of one training run; ``first`` is the first step (compilation,
    allocations), ``kernel`` the kernel's share of the CPU time of the timed steps."""

    cycle: list[float]
    hook: list[float]
    first: float
    kernel: float


def fit_step_times(
    case: ModelCase, batches: Sequence[dict], precision: str, settings: Settings
) -> tuple[StepTimes, StepTimes]:
    """Steps of ``Trainer.fit`` over in-memory batches (warm-up steps then ``repeats`` timed ones), and the
    plain steps of a twin model run between them (:class:`PlainStepper`, see :func:`_step_timer`)."""
    device = torch.device(settings.device)
    steps, size = settings.warmup + settings.repeats, batches[0]["image"].shape[-1]
    model = case.build(size)
    timer = _step_timer(device, PlainStepper(case, size, precision, device))
    loader = torch.utils.data.DataLoader(InMemoryBatches(batches, steps), batch_size=None, shuffle=False)
    with quiet():
        trainer = bench_trainer(device, [timer], precision=precision, max_epochs=1, limit_train_batches=steps)
        trainer.fit(model, train_dataloaders=loader)
    starts, ends, resumes, w = timer.starts, timer.ends, timer.resumes, settings.warmup
    fit = StepTimes(
        cycle=[ends[i] - resumes[i - 1] for i in range(w, steps)],
        hook=[ends[i] - starts[i] for i in range(w, steps)],
        first=ends[0] - starts[0],
        kernel=kernel_share(timer.usage[w - 1], timer.usage[-1]),
    )
    plain = timer.plain[w:]
    return fit, StepTimes(cycle=plain, hook=plain, first=timer.plain[0], kernel=float("nan"))


def module_step_loss(module: Any, batch: dict[str, Any]) -> torch.Tensor:
    """The module's own ``shared_step`` (loss + metric updates; ``self.log`` is a no-op without a Trainer)."""
    return module.shared_step(batch, "train")["loss"]


def plain_step_times(
    case: ModelCase,
    batches: Sequence[dict],
    precision: str,
    settings: Settings,
    loss_fn: Callable[[Any, dict[str, Any]], torch.Tensor] = plain_loss,
) -> StepTimes:
    """The same steps as :func:`fit_step_times` in a hand-written loop (:class:`PlainStepper`)."""
    stepper = PlainStepper(case, batches[0]["image"].shape[-1], precision, torch.device(settings.device), loss_fn)
    times, usage = [], cpu_usage()
    with quiet():  # shared_step's self.log warns without a Trainer
        for i in range(settings.warmup + settings.repeats):
            if i == settings.warmup:
                usage = cpu_usage()
            times.append(stepper.step(batches[i % len(batches)]))
    timed = times[settings.warmup :]
    return StepTimes(cycle=timed, hook=timed, first=times[0], kernel=kernel_share(usage, cpu_usage()))


def train_cases(settings: Settings) -> list[tuple[ModelCase, str]]:
    """(model case, precision) rows: classifier regimes and the U-Net, per memory format and precision;
    ``--compile`` adds compiled rows in the first memory format."""
    cases = []
    for precision in settings.precisions:
        for fmt in settings.memory_formats:
            cases += [(ModelCase("classifier", r, fmt), precision) for r in settings.regimes]
            cases.append((ModelCase("unet", "train", fmt), precision))
        if settings.compile:
            fmt = settings.memory_formats[0]
            cases += [(ModelCase("classifier", r, fmt, compile=True), precision) for r in settings.regimes]
            cases.append((ModelCase("unet", "train", fmt, compile=True), precision))
    return cases


def keras_key(section: str, model: str, case: str, precision: str) -> str:
    """The key of one Keras figure in ``scripts/keras_reference.py``'s JSON."""
    return f"{section}/{model}/{case}/{precision}"


def load_keras_reference(path: str) -> dict[str, float]:
    """``{"reference": {keras_key: value}}`` as ``scripts/keras_reference.py --json`` writes it."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        reference = {str(k): float(v) for k, v in data["reference"].items() if v is not None}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise SystemExit(f"--keras-json {path}: not a scripts/keras_reference.py --json file ({err}).") from err
    bad = [k for k in reference if k.count("/") != 3]
    if bad:
        raise SystemExit(f"--keras-json {path}: unexpected keys {bad} (section/model/case/precision).")
    return reference


def keras_reference(section: str, model: str, case: str, precision: str, settings: Settings) -> float | None:
    """The lab's Keras figure for this row (from ``--keras-json``), when it was measured at these sizes."""
    if not settings.at_reference_sizes:
        return None
    return settings.keras.get(keras_key(section, model, case, precision))


def train_row(case: ModelCase, precision: str, settings: Settings) -> Row:
    """One model configuration three ways: plain loop over ``shared_step`` (first memory format only), then
    Trainer.fit with a paired plain step (loss only) after each of its steps. ``overhead_of_min`` compares
    the fastest steps."""
    size = settings.classifier_size if case.model == "classifier" else settings.unet_size
    batch = settings.classifier_batch if case.model == "classifier" else settings.unet_batch
    batches = make_batches(case.model, min(4, settings.warmup + settings.repeats), batch, size)
    metrics = None
    if case.memory_format == settings.memory_formats[0]:  # the metrics' cost does not depend on the layout
        metrics = plain_step_times(case, batches, precision, settings, loss_fn=module_step_loss)
        release_memory()
    step_ms = median(metrics.cycle) * 1000 if metrics else float("nan")
    fit, plain = fit_step_times(case, batches, precision, settings)
    release_memory()
    plain_ms, fit_ms = median(plain.cycle) * 1000, median(fit.cycle) * 1000
    return {
        "model": case.model,
        "case": case.regime,
        "memory_format": case.memory_format,
        "precision": precision,
        "compile": case.compile,
        "batch": batch,
        "size": size,
        "plain_ms": plain_ms,
        "step_ms": step_ms,
        "fit_ms": fit_ms,
        "hook_ms": median(fit.hook) * 1000,
        "overhead": median(f / p for f, p in zip(fit.cycle, plain.cycle, strict=True)) - 1,
        "trainer_overhead": fit_ms / step_ms - 1,
        "overhead_of_min": min(fit.cycle) / min(plain.cycle) - 1,
        "plain_img_s": batch / plain_ms * 1000,
        "fit_img_s": batch / fit_ms * 1000,
        "plain_spread": spread(plain.cycle),
        "fit_spread": spread(fit.cycle),
        "fit_kernel": fit.kernel,
        # the cold step (the case's first): allocations, oneDNN kernel creation, compilation
        "first_step_s": metrics.first if metrics else fit.first,
        "fit_first_step_s": fit.first,
        "keras_ms": keras_reference("train", case.model, case.regime, precision, settings),
        "gflop_per_step": train_gflop(case.model, case.regime, batch, size),
    }


def bench_train(settings: Settings) -> list[Row]:
    return [train_row(case, precision, settings) for case, precision in train_cases(settings)]


# ---------------------------------------------------------------------------------------------
# section 3: inference
# ---------------------------------------------------------------------------------------------


def _infer_row(model: str, variant: str, fmt: str, precision: str, batch: int, size: int, timing: Timing) -> Row:
    per_batch = median(timing.times)
    return {
        "model": model,
        "variant": variant,
        "memory_format": fmt,
        "precision": precision,
        "batch": batch,
        "size": size,
        "ms_per_batch": per_batch * 1000,
        "img_s": batch / per_batch,
        "spread": spread(timing.times),
        "kernel": timing.kernel,
        "setup_s": None,
        "keras_img_s": None,
        "note": "",
    }


def eager_timing(module: Any, images: torch.Tensor, precision: str, settings: Settings) -> Timing:
    """``module(images)`` calls under ``inference_mode`` (and autocast for mixed precision)."""
    device = torch.device(settings.device)

    def call() -> None:
        with torch.inference_mode(), autocast(device, precision):
            module(images)

    return time_calls(call, settings.warmup, settings.repeats, device)


def compiled_rows(model: str, images: torch.Tensor, settings: Settings) -> list[Row]:
    """``torch.compile`` of the network for inference (channels_last), per precision, with inductor's
    ``freezing`` (weights folded in as constants and pre-packed for oneDNN, conv + activation fused: the
    CPU inference setting PyTorch documents); the first call's time is ``setup_s``."""
    import torch._inductor.config as inductor

    device = torch.device(settings.device)
    rows = []
    for precision in settings.precisions:
        torch._dynamo.reset()
        module = ModelCase(model, compile=True).build(images.shape[-1]).to(device).eval()
        module.configure_model()
        with inductor.patch(freezing=True):
            start = time.perf_counter()
            with torch.inference_mode(), autocast(device, precision):
                module(images)
            synchronize(device)
            compile_s = time.perf_counter() - start
            timing = eager_timing(module, images, precision, settings)
        row = _infer_row(model, "torch.compile", "channels_last", precision, images.shape[0], images.shape[-1], timing)
        rows.append(row | {"setup_s": compile_s, "note": "inductor freezing; setup = compile + first call"})
        del module
        release_memory()
    torch._dynamo.reset()
    return rows


def onnx_rows(model: str, images: torch.Tensor, settings: Settings) -> list[Row]:
    """ONNX Runtime on :func:`covid_lightning.export.export_onnx`'s graph (intra-op threads = torch's), fed the
    uint8 batch from host memory (``setup_s``: the export), then its int8 version
    (:mod:`covid_lightning.export`, calibrated on the timed batch: a speed figure only; ``setup_s``: the
    quantization). Accuracy of int8 is a model's question: ``scripts/quantize_eval.py``."""
    batch, size = images.shape[0], images.shape[-1]
    try:
        import onnxruntime  # noqa: F401
    except ImportError as err:
        return [
            _infer_row(model, "onnxruntime", "-", "32-true", batch, size, Timing([float("nan")]))
            | {"note": f"skipped: {err}"}
        ]
    from covid_lightning.export import export_onnx, quantize_onnx
    from covid_lightning.export import session as ort_session

    feed = {"image": images.cpu().contiguous().numpy()}
    rows = []
    with tempfile.TemporaryDirectory() as tmp, quiet():
        start = time.perf_counter()
        path = export_onnx(ModelCase(model).build(size), Path(tmp) / f"{model}.onnx", opset=settings.onnx_opset)
        variants = [("onnxruntime", "32-true", path, time.perf_counter() - start)]
        start = time.perf_counter()
        int8 = quantize_onnx(path, None, [feed["image"]])
        variants.append(("onnxruntime int8", "int8", int8, time.perf_counter() - start))
        for variant, precision, file, setup_s in variants:
            session = ort_session(file, torch.get_num_threads(), cuda=settings.device.startswith("cuda"))
            timing = time_calls(
                lambda s=session: s.run(None, feed), settings.warmup, settings.repeats, torch.device("cpu")
            )
            provider = session.get_providers()[0].replace("ExecutionProvider", "")
            what = "export" if precision == "32-true" else "quantize (QDQ, calibrated on this batch)"
            row = _infer_row(model, variant, "-", precision, batch, size, timing)
            rows.append(row | {"setup_s": setup_s, "note": f"{provider}, opset {settings.onnx_opset}, setup = {what}"})
            del session
    return rows


def infer_rows(model: str, settings: Settings) -> list[Row]:
    device = torch.device(settings.device)
    size = settings.classifier_size if model == "classifier" else settings.unet_size
    batch = settings.infer_batch
    images = make_batches(model, 1, batch, size, seed=1)[0]["image"].to(device)
    rows = []
    for fmt in ("contiguous", "channels_last"):
        module = ModelCase(model, memory_format=fmt).build(size).to(device).eval()
        mixed = [p for p in settings.precisions if p != "32-true"] if fmt == "channels_last" else []
        for precision in ["32-true", *mixed]:
            timing = eager_timing(module, images, precision, settings)
            rows.append(_infer_row(model, "eager", fmt, precision, batch, size, timing))
        del module
        release_memory()
    if settings.compile:
        rows += compiled_rows(model, images, settings)
    rows += onnx_rows(model, images, settings)
    release_memory()
    gflop = forward_gflop(model, size)
    for row in rows:
        row["gflop_per_image"] = gflop
        if row["variant"] in ("eager", "onnxruntime", "torch.compile"):
            row["keras_img_s"] = keras_reference("infer", model, "infer", row["precision"], settings)
    return rows


def bench_infer(settings: Settings) -> list[Row]:
    return infer_rows("classifier", settings) + infer_rows("unet", settings)


# ---------------------------------------------------------------------------------------------
# section 4: peak memory
# ---------------------------------------------------------------------------------------------


def _train_steps(case: ModelCase, batch: dict[str, Any], precision: str, steps: int, device: torch.device) -> None:
    model = case.build(batch["image"].shape[-1]).to(device)
    model.train()
    optimizer = model.configure_optimizers()
    batch = to_device(batch, device)
    for _ in range(steps):
        with autocast(device, precision):
            loss = plain_loss(model, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    synchronize(device)


def _infer_steps(case: ModelCase, images: torch.Tensor, precision: str, steps: int, device: torch.device) -> None:
    model = case.build(images.shape[-1]).to(device).eval()
    images = images.to(device)
    with torch.inference_mode(), autocast(device, precision):
        for _ in range(steps):
            model(images)
    synchronize(device)


def measure_peak(run: Callable[[], None], device: torch.device) -> dict[str, Any]:
    """Peak memory of ``run()``: its own RSS high-water mark where it can be reset, else the process's."""
    release_memory()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    start = current_rss_mib()
    own = reset_peak_rss()
    run()
    peak = peak_rss_mib() if own else process_peak_rss_mib()
    row = {
        "rss_start_mib": start,
        "rss_peak_mib": peak,
        "rss_delta_mib": peak - start if (own and start is not None and peak is not None) else None,
        "cuda_peak_mib": torch.cuda.max_memory_allocated(device) / MIB if device.type == "cuda" else None,
        "scope": "this case" if own else "process (ru_maxrss)",
    }
    release_memory()
    return row


@dataclass(frozen=True)
class MemoryCase:
    """One peak-memory measurement: a few training steps or inference batches of one model."""

    kind: str  # train | infer
    model: ModelCase
    precision: str = "32-true"

    @property
    def name(self) -> str:
        regime = f" {self.model.regime}" if self.kind == "train" and self.model.model == "classifier" else ""
        return f"{self.kind} {self.model.model}{regime}"


def memory_cases(settings: Settings) -> list[MemoryCase]:
    """Classifier training per regime, U-Net training and inference per precision, classifier inference."""
    cases = [MemoryCase("train", ModelCase("classifier", r)) for r in settings.regimes]
    cases += [MemoryCase("train", ModelCase("unet"), p) for p in settings.precisions]
    cases += [MemoryCase("infer", ModelCase("classifier"))]
    cases += [MemoryCase("infer", ModelCase("unet"), p) for p in settings.precisions]
    return cases


def memory_row(case: MemoryCase, settings: Settings) -> Row:
    device = torch.device(settings.device)
    steps = settings.warmup + 1
    size = settings.classifier_size if case.model.model == "classifier" else settings.unet_size
    if case.kind == "train":
        batch = settings.classifier_batch if case.model.model == "classifier" else settings.unet_batch
        data = make_batches(case.model.model, 1, batch, size)[0]
        peak = measure_peak(lambda: _train_steps(case.model, data, case.precision, steps, device), device)
    else:
        batch = settings.infer_batch
        images = make_batches(case.model.model, 1, batch, size)[0]["image"]
        peak = measure_peak(lambda: _infer_steps(case.model, images, case.precision, steps, device), device)
    return {"case": case.name, "precision": case.precision, "batch": batch, "size": size} | peak


def bench_memory(settings: Settings) -> list[Row]:
    return [memory_row(case, settings) for case in memory_cases(settings)]


# ---------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------

RUNNERS: dict[str, Callable[[Settings], list[Row]]] = {
    "loader": bench_loader,
    "train": bench_train,
    "cache": bench_cache,
    "infer": bench_infer,
    "memory": bench_memory,
}


def _csv(kind: Callable[[str], Any], choices: Sequence[Any] | None = None) -> Callable[[str], tuple]:
    def parse(text: str) -> tuple:
        values = tuple(kind(v.strip()) for v in text.split(",") if v.strip())
        bad = [v for v in values if choices is not None and v not in choices]
        if bad or not values:
            raise argparse.ArgumentTypeError(f"{text!r}: expected a comma-separated list of {', '.join(choices or [])}")
        return values

    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="benchmark.py",
        description="Speed and memory of covid-lightning: data loading, training (Trainer.fit vs a plain PyTorch "
        "loop), inference (eager, mixed precision, torch.compile, ONNX Runtime), peak memory. Every figure is the "
        "median of --repeats timed repetitions after --warmup untimed ones.",
    )
    add = parser.add_argument
    add("--data.root", dest="data_root", default=None, help="dataset for the loader section (default: demo data)")
    add("--device", choices=("cpu", "cuda", "auto"), default="auto", help="default: cuda when available")
    add("--sections", type=_csv(str, SECTIONS), default=SECTIONS, help="subset of " + ",".join(SECTIONS))
    add("--quick", action="store_true", help="tiny sizes and few repeats (seconds; the smoke test)")
    for key, what in [
        ("classifier_batch", "classifier train batch"),
        ("classifier_size", "classifier image size"),
        ("unet_batch", "U-Net train batch"),
        ("unet_size", "U-Net image size"),
        ("infer_batch", "inference batch (both models)"),
        ("warmup", "untimed repetitions (train: steps) before timing"),
        ("repeats", "timed repetitions (train: steps); figures are their median"),
        ("loader_batches", "batches per timed loader window"),
        ("onnx_opset", "ONNX opset (< 18: TorchScript-based exporter)"),
    ]:
        add(
            f"--{key.replace('_', '-')}",
            type=int,
            default=None,
            help=f"{what} (default {DEFAULTS[key]}, quick {QUICK[key]})",
        )
    add("--workers", type=_csv(int), default=None, help="loader worker counts (default 0,1,2 + the configs' default)")
    add(
        "--precision",
        dest="precisions",
        type=_csv(str, PRECISIONS),
        default=None,
        help="default: 32-true, + bf16-mixed on a CPU with native bf16 or a GPU, + 16-mixed on CUDA",
    )
    add(
        "--regimes",
        type=_csv(str, CLASSIFIER_REGIMES + ("last_conv",)),
        default=CLASSIFIER_REGIMES,
        help="classifier freezing regimes of the train/memory sections",
    )
    add(
        "--memory-formats",
        type=_csv(str, MEMORY_FORMATS),
        default=None,
        help="train section layouts (default channels_last,contiguous; quick: channels_last)",
    )
    add("--augment", choices=("none", "light", "strong"), default="none", help="loader augmentation (lab: none)")
    add("--compile", action="store_true", help="add torch.compile rows (train and infer)")
    add("--threads", type=int, default=None, help="torch intra-op threads (default: torch's, = usable CPUs)")
    add(
        "--malloc",
        choices=MALLOC_MODES,
        default=None,
        help="heap: glibc keeps freed memory (no mmap per big tensor, no page faults; see the 'sys' columns)."
        " Default: heap, as the covid-lightning CLI runs (COVID_LIGHTNING_MALLOC=default: glibc's default);"
        " quick: default (the smoke test leaves the process's allocator alone)",
    )
    add("--json", dest="json_path", default=None, help="also write the results as JSON here ('-': stdout)")
    add(
        "--keras-json",
        default=None,
        help="the lab's Keras figures measured on this machine (scripts/keras_reference.py --json FILE): adds the"
        " keras and 'x keras' (speed ratio) columns",
    )
    return parser


def parse_settings(argv: Sequence[str] | None = None) -> Settings:
    args = vars(build_parser().parse_args(argv))
    sizes = QUICK if args["quick"] else DEFAULTS
    for key, value in sizes.items():
        if args[key] is None:
            args[key] = value
    device = resolve_device(args["device"])
    args["device"] = str(device)
    if args["workers"] is None:
        args["workers"] = (0, 1) if args["quick"] else default_workers()
    if args["malloc"] is None:
        cli_default = os.environ.get("COVID_LIGHTNING_MALLOC", "heap") != "default"
        args["malloc"] = "heap" if cli_default and not args["quick"] else "default"
    if args["memory_formats"] is None:
        args["memory_formats"] = MEMORY_FORMATS[:1] if args["quick"] else MEMORY_FORMATS
    if args["precisions"] is None:
        args["precisions"] = default_precisions(device)
    if "16-mixed" in args["precisions"] and device.type != "cuda":
        raise SystemExit("--precision 16-mixed needs a CUDA device (on a CPU use bf16-mixed).")
    if args["warmup"] < 1 or args["repeats"] < 1:
        raise SystemExit("--warmup and --repeats must be at least 1.")
    args["sections"] = tuple(s for s in SECTIONS if s in args["sections"])
    args["keras"] = load_keras_reference(args["keras_json"]) if args["keras_json"] else {}
    return Settings(**args)


def run(settings: Settings, echo: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the chosen sections; ``echo`` receives the header and each section's table as soon as it is done.

    ``settings.threads`` applies for the run only; ``--malloc heap`` changes the process's allocator for good.
    """
    if settings.malloc == "heap" and not keep_freed_memory():
        raise SystemExit("--malloc heap needs glibc (Linux).")
    threads = torch.get_num_threads()
    torch.set_num_threads(settings.threads or threads)
    gc.collect()
    gc.freeze()  # the imported world is permanent: later collections (one per case) take ms, not ~1 s
    try:
        return _run_sections(settings, echo)
    finally:
        gc.unfreeze()
        torch.set_num_threads(threads)


def _run_sections(settings: Settings, echo: Callable[[str], None] | None) -> dict[str, Any]:
    machine = machine_info(torch.device(settings.device), n=1024 if settings.quick else 2048)
    result: dict[str, Any] = {
        "machine": machine,
        "settings": asdict(settings),
        "keras_reference": dict(settings.keras),
        "sections": {},
        "elapsed_s": {},
        "cpu_s": {},
        "process_peak_rss_mib": {},
    }
    if echo:
        echo(format_header(machine, settings))
    for name in settings.sections:
        start, cpu_start = time.perf_counter(), time.process_time()
        rows = add_compute_shares(RUNNERS[name](settings), machine["matmul_fp32_gflops"])
        result["sections"][name] = rows
        result["elapsed_s"][name] = elapsed = time.perf_counter() - start
        result["cpu_s"][name] = cpu = time.process_time() - cpu_start
        result["process_peak_rss_mib"][name] = process_peak_rss_mib()
        if echo:
            echo("\n" + format_section(name, rows, elapsed, cpu, machine["torch_threads"]))
    return result


def _share(gflop: float | None, seconds: float | None, peak: float) -> tuple[float | None, float | None]:
    if gflop is None or not seconds or not math.isfinite(seconds):
        return None, None
    rate = gflop / seconds
    return rate, rate / peak


def add_compute_shares(rows: list[Row], matmul_rate: float) -> list[Row]:
    """GFLOP/s of the training and inference rows, and their share of the measured matmul rate; the same
    share for the Keras reference (well above 100%: that speed needs more compute than this machine delivers)."""
    for row in rows:
        if "gflop_per_step" in row:
            fit_ms, keras_ms = row.get("fit_ms"), row.get("keras_ms")
            row["fit_gflop_s"], row["fit_matmul_share"] = _share(
                row["gflop_per_step"], fit_ms and fit_ms / 1000, matmul_rate
            )
            row["keras_matmul_share"] = _share(row["gflop_per_step"], keras_ms and keras_ms / 1000, matmul_rate)[1]
            row["keras_speed"] = keras_ms / fit_ms if keras_ms and fit_ms else None
        elif "gflop_per_image" in row:
            img_s, keras = row.get("img_s"), row.get("keras_img_s")
            row["gflop_s"], row["matmul_share"] = _share(row["gflop_per_image"], img_s and 1 / img_s, matmul_rate)
            row["keras_matmul_share"] = _share(row["gflop_per_image"], keras and 1 / keras, matmul_rate)[1]
            row["keras_speed"] = img_s / keras if keras and img_s else None
    return rows


def _json_ready(value: Any) -> Any:
    """NaN/inf -> None (strict JSON), tuples -> lists."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    return value


def write_json(result: dict[str, Any], path: str) -> None:
    text = json.dumps(_json_ready(result), indent=2, allow_nan=False) + "\n"
    if path == "-":
        sys.stdout.write(text)
    else:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text)


def main(argv: Sequence[str] | None = None) -> int:
    """``python scripts/benchmark.py [options]``: print the tables, optionally write ``--json``."""
    settings = parse_settings(argv)
    stream = sys.stderr if settings.json_path == "-" else sys.stdout  # keep stdout clean for the JSON

    def echo(text: str) -> None:
        print(text, file=stream, flush=True)

    from covid_lightning.data.scan import DatasetError

    try:
        result = run(settings, echo=echo)
    except DatasetError as err:
        raise SystemExit(f"benchmark: {err}") from None
    echo("\n" + format_notes(result))
    if settings.json_path:
        write_json(result, settings.json_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
