#!/usr/bin/env python
"""The first-GPU-machine check, one command: speed, multi-GPU and a real recipe, in one JSON + markdown summary.

    python scripts/gpu_check.py --out gpu_check            # on a CUDA machine, under 10 minutes

Steps (each bounded by its own timeout; a failed step is recorded and the next one runs):

1. ``benchmark``: ``scripts/benchmark.py --device cuda`` train + infer sections for MobileNetV2-050 at 224 px
   (regime ``all``, batch ``--batch``), 32-true and 16-mixed, channels_last and contiguous, ``torch.compile``
   on and off: training img/s is the ``fit img/s`` column (target: >= 3,000 img/s on one H100-class GPU).
2. ``ddp``: a 2-process DDP ``fit`` of the demo classifier, when two or more GPUs exist.
3. ``recipe``: a short ``configs/classification/recipe_gpu.yaml`` fit (``--epochs``) on the shared
   classification sample with the lab's weights, when present.

Without CUDA every step is recorded as skipped (so the script and its summary are testable on a CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
CLS_SAMPLE = SHARED / "data" / "covid_cls_sample"
KERAS_H5 = SHARED / "weights" / "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.5_224_no_top.h5"
TRAIN_IMG_S_TARGET = 3000.0


@dataclass
class Step:
    name: str
    command: list[str]
    timeout_s: int
    needs_devices: int = 1
    needs: list[Path] = field(default_factory=list)
    status: str = "pending"
    wall_s: float | None = None
    output_tail: str = ""
    figures: dict[str, Any] = field(default_factory=dict)


def cuda_devices() -> int:
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except ImportError:
        return 0


def lightning_command() -> list[str]:
    exe = Path(sys.executable).with_name("lightning")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "covid_lightning"]


def plan(out: Path, batch: int, epochs: int) -> list[Step]:
    root = ["--trainer.default_root_dir", str(out / "runs")]
    return [
        Step(
            "benchmark",
            [
                sys.executable,
                str(REPO / "scripts" / "benchmark.py"),
                "--device",
                "cuda",
                "--sections",
                "train,infer",
                "--regimes",
                "all",
                "--precision",
                "32-true,16-mixed",
                "--compile",
                "--classifier-batch",
                str(batch),
                "--infer-batch",
                str(batch),
                "--json",
                str(out / "benchmark.json"),
            ],
            timeout_s=300,
        ),  # fmt: skip
        Step(
            "ddp",
            [
                *lightning_command(),
                "fit",
                "--config",
                str(REPO / "configs/demo/classification.yaml"),
                "--trainer.devices",
                "2",
                "--trainer.strategy",
                "ddp",
                "--trainer.max_epochs",
                "2",
                *root,
            ],
            timeout_s=150,
            needs_devices=2,
        ),  # fmt: skip
        Step(
            "recipe",
            [
                *lightning_command(),
                "fit",
                "--config",
                str(REPO / "configs/classification/recipe_gpu.yaml"),
                "--data.root",
                str(CLS_SAMPLE),
                "--model.pretrained_file",
                str(KERAS_H5),
                "--trainer.max_epochs",
                str(epochs),
                *root,
            ],
            timeout_s=150,
            needs=[CLS_SAMPLE, KERAS_H5],
        ),  # fmt: skip
    ]


def run_step(step: Step, devices: int) -> None:
    """Run one step unless the machine cannot (recorded as skipped, with the reason)."""
    if devices < step.needs_devices:
        step.status = f"skipped: needs {step.needs_devices} CUDA device(s), this machine has {devices}"
        return
    missing = [str(p) for p in step.needs if not p.exists()]
    if missing:
        step.status = f"skipped: missing {', '.join(missing)}"
        return
    started = time.monotonic()
    try:
        proc = subprocess.run(step.command, capture_output=True, text=True, timeout=step.timeout_s, cwd=REPO)
        step.status = "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
        step.output_tail = (proc.stdout + proc.stderr)[-3000:]
    except subprocess.TimeoutExpired as err:
        step.status = f"failed (timeout {step.timeout_s} s)"
        step.output_tail = str(err.stdout or "")[-3000:]
    step.wall_s = round(time.monotonic() - started, 1)


def benchmark_figures(path: Path) -> dict[str, Any]:
    """Best training img/s per precision / compile, and inference img/s, from the benchmark's JSON."""
    if not path.is_file():
        return {}
    sections = json.loads(path.read_text())["sections"]
    train = [r for r in sections.get("train", []) if r.get("model") == "classifier" and r.get("fit_img_s")]
    best = max(train, key=lambda r: r["fit_img_s"], default=None)
    return {
        "train_img_s": {
            f"{r['precision']} {r['memory_format']}{' compiled' if r.get('compile') else ''}": r["fit_img_s"]
            for r in train
        },
        "best_train_img_s": best["fit_img_s"] if best else None,
        "target_train_img_s": TRAIN_IMG_S_TARGET,
        "infer_img_s": {
            f"{r['model']} {r['variant']} {r['precision']}": r["img_s"]
            for r in sections.get("infer", [])
            if r.get("img_s")
        },
    }


def summary_markdown(result: dict[str, Any]) -> str:
    lines = [
        "# GPU check",
        "",
        f"machine: {result['machine']}",
        "",
        "| step | status | wall s |",
        "|---|---|---|",
    ]
    for step in result["steps"]:
        wall = "-" if step["wall_s"] is None else f"{step['wall_s']:.1f}"
        lines.append(f"| {step['name']} | {step['status']} | {wall} |")
    bench = next((s["figures"] for s in result["steps"] if s["name"] == "benchmark"), {})
    if bench.get("train_img_s"):
        lines += ["", "| MobileNetV2-050 training, 224 px | img/s |", "|---|---|"]
        lines += [f"| {k} | {v:,.0f} |" for k, v in bench["train_img_s"].items()]
        reached = (bench["best_train_img_s"] or 0) >= TRAIN_IMG_S_TARGET
        lines += ["", f"best {bench['best_train_img_s']:,.0f} img/s (target {TRAIN_IMG_S_TARGET:,.0f}: "
                  f"{'reached' if reached else 'not reached'})"]  # fmt: skip
    return "\n".join(lines) + "\n"


def machine_line(devices: int) -> str:
    if not devices:
        return "no CUDA device"
    import torch

    names = {torch.cuda.get_device_name(i) for i in range(devices)}
    return f"{devices} x {', '.join(sorted(names))}, torch {torch.__version__}, CUDA {torch.version.cuda}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("gpu_check"), help="folder for gpu_check.{json,md}")
    parser.add_argument("--batch", type=int, default=256, help="training/inference batch of the benchmark")
    parser.add_argument("--epochs", type=int, default=3, help="epochs of the recipe_gpu fit")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    devices = cuda_devices()
    steps = plan(args.out, args.batch, args.epochs)
    for step in steps:
        run_step(step, devices)
        if step.name == "benchmark" and step.status == "ok":
            step.figures = benchmark_figures(args.out / "benchmark.json")
        print(f"{step.name}: {step.status}" + (f" ({step.wall_s} s)" if step.wall_s is not None else ""), flush=True)
    result = {"machine": machine_line(devices), "cuda_devices": devices, "steps": [asdict(s) for s in steps]}
    (args.out / "gpu_check.json").write_text(json.dumps(result, indent=1, default=str))
    (args.out / "gpu_check.md").write_text(summary_markdown(result))
    print(f"summary: {args.out / 'gpu_check.md'}", flush=True)
    return 0 if all(s.status == "ok" or s.status.startswith("skipped") for s in steps) else 1


if __name__ == "__main__":
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    sys.exit(main())
