"""Time and peak memory of the data path at the full database's size (issue: "scale to the full dataset").

    python scripts/make_scale_dataset.py /data/scale            # 21,165 synthetic images + masks, Kaggle layout
    python scripts/scale_check.py /data/scale --weights W.h5    # the table below, as markdown and JSON

Each stage runs in a fresh process (its own peak RSS, child processes included), as a user runs it:
``setup`` is ``RadiographyDataModule.setup("fit")`` (read, decode-screen every file, duplicate grouping, split)
with an empty cache, then again with the inspection cache warm; ``head`` is ``lightning fit`` of
``configs/classification/head_only.yaml`` (FrozenFeatureCache) for 2 epochs, timed per epoch; ``optimize`` is
``covid-lightning optimize ROOT OUT``.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from jsonargparse import auto_cli


def _peak_mib() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, children) / 1024


def stage_setup(root: str) -> dict[str, Any]:
    import covid_lightning.data.hygiene as hygiene
    from covid_lightning import RadiographyDataModule

    timings: dict[str, float] = {}
    for name in ("inspect_files", "duplicate_groups"):
        original = getattr(hygiene, name)

        def timed(*args: Any, _f: Any = original, _n: str = name, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return _f(*args, **kwargs)
            finally:
                timings[_n] = timings.get(_n, 0.0) + time.perf_counter() - started

        setattr(hygiene, name, timed)
    dm = RadiographyDataModule(root=root, image_size=224, val_fraction=0.15, test_fraction=0.15)
    started = time.perf_counter()
    dm.setup("fit")
    total = time.perf_counter() - started
    screening = dm.selection.screening
    return {
        "setup_s": total,
        "decode_screen_s": timings.get("inspect_files", 0.0),
        "duplicates_s": timings.get("duplicate_groups", 0.0),
        "images": len(screening.records),
        "duplicate_groups": screening.duplicates,
        "splits": {s: len(dm.selection.records(s)) for s in ("train", "val", "test")},
    }


def stage_head(root: str, weights: str, out: str) -> dict[str, Any]:
    import lightning as L

    from covid_lightning.cli import build_cli

    marks: dict[str, float] = {}

    class EpochTimes(L.Callback):
        def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
            marks["fit_start"] = time.perf_counter()

        def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
            marks[f"epoch{trainer.current_epoch + 1}"] = time.perf_counter()

    config = Path(__file__).resolve().parents[1] / "configs" / "classification" / "head_only.yaml"
    args = ["--config", str(config), "--data.root", root, "--trainer.max_epochs", "2"]
    args += ["--trainer.default_root_dir", out, "--trainer.enable_progress_bar", "false"]
    args += ["--model.init_args.pretrained_file", weights] if weights else ["--model.init_args.pretrained", "false"]
    started = time.perf_counter()
    cli = build_cli(args, run=False)
    built = time.perf_counter()
    cli.trainer.callbacks.append(EpochTimes())
    cli.trainer.fit(cli.model, cli.datamodule)
    done = time.perf_counter()
    return {
        "build_s": built - started,
        "setup_and_cache_to_epoch1_end_s": marks["epoch1"] - built,
        "epoch1_from_fit_start_s": marks["epoch1"] - marks["fit_start"],
        "epoch2_s": marks["epoch2"] - marks["epoch1"],
        "fit_total_s": done - started,
        "val_acc": float(cli.trainer.callback_metrics.get("val/acc", float("nan"))),
    }


def stage_optimize(root: str, out: str) -> dict[str, Any]:
    from covid_lightning.cli import main

    started = time.perf_counter()
    code = main(["optimize", root, out])
    return {"optimize_s": time.perf_counter() - started, "exit_code": code}


def _run_stage(stage: str, env: dict[str, str], *args: str) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--stage", stage, *args]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"stage {stage} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def scale_check(root: str, weights: str = "", out: str = "", stages: list[str] | None = None) -> dict[str, Any]:
    """Run the stages and print a markdown table (and the JSON) of time and peak memory.

    Args:
        root: the generated dataset (or any Kaggle-layout folder).
        weights: the lab's ImageNet MobileNetV2-050 (Keras .h5 or timm file) for the head stage; none: random.
        out: where runs, caches and the optimized stream go (default: a temporary folder).
        stages: any of setup, head, optimize (default: all).
    """
    work = Path(out or tempfile.mkdtemp(prefix="scale-"))
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "XDG_CACHE_HOME": str(work / "cache")}  # cold caches, kept apart from the user's
    results: dict[str, Any] = {"cpus": len(os.sched_getaffinity(0))}
    for stage in stages or ["setup", "head", "optimize"]:
        if stage == "setup":
            results["setup_cold"] = _run_stage("setup", env, root)
            results["setup_warm"] = _run_stage("setup", env, root)
        elif stage == "head":
            results["head"] = _run_stage("head", env, root, weights, str(work / "runs"))
        elif stage == "optimize":
            results["optimize"] = _run_stage("optimize", env, root, str(work / "stream"))
        print(json.dumps(results), flush=True)
    rows = [(k, v.get("peak_mib")) for k, v in results.items() if isinstance(v, dict)]
    print("\n| stage | seconds | peak memory (MiB) |\n|---|---:|---:|")
    for key, peak in rows:
        seconds = {k: round(v, 1) for k, v in results[key].items() if k.endswith("_s")}
        print(f"| {key} | {seconds} | {peak:.0f} |")
    return results


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--stage":
        stage, rest = sys.argv[2], sys.argv[3:]
        result = {"setup": stage_setup, "head": stage_head, "optimize": stage_optimize}[stage](*rest)
        result["peak_mib"] = _peak_mib()
        print(json.dumps(result), flush=True)
    else:
        auto_cli(scale_check)
