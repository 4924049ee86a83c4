"""scripts/gpu_check.py on a CPU: every CUDA step skipped with its reason, the summary written, and each
command it would run on a GPU machine accepted by its parser."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers.scripts import load_script


def _load():
    return load_script("gpu_check")


def test_without_cuda_every_step_is_skipped_and_summarised(tmp_path: Path, monkeypatch, capsys):
    gpu_check = _load()
    monkeypatch.setattr(gpu_check, "cuda_devices", lambda: 0)
    assert gpu_check.main(["--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert [s["name"] for s in result["steps"]] == ["benchmark", "ddp", "recipe"]
    assert all(s["status"].startswith("skipped: needs") for s in result["steps"])
    assert result["machine"] == "no CUDA device"
    md = (tmp_path / "gpu_check.md").read_text()
    assert "| benchmark | skipped" in md and "| ddp | skipped" in md


def test_summary_reads_the_benchmark_json(tmp_path: Path):
    gpu_check = _load()
    rows = [
        {"model": "classifier", "precision": "16-mixed", "memory_format": "channels_last", "compile": True,
         "fit_img_s": 3500.0},
        {"model": "classifier", "precision": "32-true", "memory_format": "contiguous", "compile": False,
         "fit_img_s": 1200.0},
    ]  # fmt: skip
    (tmp_path / "b.json").write_text(json.dumps({"sections": {"train": rows, "infer": []}}))
    figures = gpu_check.benchmark_figures(tmp_path / "b.json")
    assert figures["best_train_img_s"] == 3500.0
    assert figures["train_img_s"] == {"16-mixed channels_last compiled": 3500.0, "32-true contiguous": 1200.0}
    result = {"machine": "1 x H100", "steps": [{"name": "benchmark", "status": "ok", "wall_s": 90.0,
                                                "figures": figures}]}  # fmt: skip
    md = gpu_check.summary_markdown(result)
    assert "3,500" in md and "reached" in md and "not reached" not in md


def test_the_gpu_commands_parse(tmp_path: Path, capsys):
    """What the script runs on a GPU machine: the benchmark's options and both fits' configs are valid."""
    gpu_check = _load()
    from covid_lightning.cli import build_cli

    benchmark = load_script("benchmark")

    steps = {s.name: s for s in gpu_check.plan(tmp_path, batch=256, epochs=3)}
    bench_args = steps["benchmark"].command[2:]
    with pytest.raises(SystemExit, match="CUDA"):  # parses up to the device check, which needs CUDA here
        benchmark.parse_settings([a if a != "cuda" else "cpu" for a in bench_args])
    for name in ("ddp", "recipe"):
        command = steps[name].command
        args = command[command.index("fit") :]
        with pytest.raises(SystemExit) as exit_info:
            build_cli([*args, "--print_config"])
        assert exit_info.value.code in (0, None), name
    capsys.readouterr()
