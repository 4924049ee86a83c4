"""scripts/benchmark.py: a smoke run at tiny sizes, and its small pieces."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tests.helpers.scripts import load_script

bm = load_script("benchmark")


def _positive(value: object) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_quick_run_writes_every_section(demo_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "b.json"
    # one thread: a smoke test on a busy 2-core machine stays fast (two spinning OpenMP threads do not)
    argv = ["--quick", "--device", "cpu", "--threads", "1", "--data.root", str(demo_root)]
    threads = bm.torch.get_num_threads()
    assert bm.main([*argv, "--json", str(out), "--sections", "loader,train,infer,memory"]) == 0
    assert bm.torch.get_num_threads() == threads  # --threads applies for the run only
    result = json.loads(out.read_text())

    machine = result["machine"]
    assert machine["cpu"] and machine["torch"] and machine["lightning"]
    assert machine["torch_threads"] == 1 and machine["usable_cpus"] >= 1
    assert isinstance(machine["cpu_fast_bf16"], bool)

    sections = result["sections"]
    assert list(sections) == ["loader", "train", "infer", "memory"]

    from covid_lightning.data.datamodules import default_num_workers

    loader = {(r["datamodule"], r["workers"], r["cache"]): r for r in sections["loader"]}
    cases = [(0, "none"), (1, "none"), (default_num_workers(), "memory")]
    assert set(loader) == {(dm, *c) for dm in ("RadiographyDataModule", "LungSegmentationDataModule") for c in cases}
    assert all(_positive(r["img_s"]) and _positive(r["ms_per_batch"]) for r in loader.values())

    train = {(r["model"], r["case"], r["memory_format"], r["precision"]): r for r in sections["train"]}
    # bf16 rows exist exactly where this CPU runs bf16 natively (what the machine reports, not a fixed kind)
    precisions = bm.default_precisions(bm.torch.device("cpu"))
    assert ("bf16-mixed" in precisions) == machine["cpu_fast_bf16"]
    cases = [("classifier", "head"), ("classifier", "last_2_conv"), ("classifier", "all"), ("unet", "train")]
    assert set(train) == {(*case, "channels_last", p) for case in cases for p in precisions}
    for row in train.values():
        assert all(_positive(row[k]) for k in ("plain_ms", "step_ms", "fit_ms", "hook_ms", "fit_img_s", "first_step_s"))
        assert math.isfinite(row["overhead"]) and row["overhead"] > -1
        assert math.isfinite(row["trainer_overhead"]) and row["trainer_overhead"] > -1
        assert row["keras_ms"] is None  # not the lab's sizes
        trainable = row["case"] in ("all", "train")  # FLOPs only where the whole network trains
        assert _positive(row["fit_gflop_s"]) == _positive(row["fit_matmul_share"]) == trainable, row["case"]
    assert _positive(machine["matmul_fp32_gflops"])

    infer = {(r["model"], r["variant"], r["memory_format"]): r for r in sections["infer"]}
    for model in ("classifier", "unet"):
        for key in [
            (model, "eager", "contiguous"),
            (model, "eager", "channels_last"),
            (model, "onnxruntime", "-"),
            (model, "onnxruntime int8", "-"),
        ]:
            assert _positive(infer[key]["img_s"]), key
            assert infer[key]["gflop_s"] == pytest.approx(infer[key]["img_s"] * infer[key]["gflop_per_image"])
        assert _positive(infer[(model, "onnxruntime", "-")]["setup_s"])

    memory = {r["case"]: r for r in sections["memory"]}
    assert set(memory) == {
        "train classifier head",
        "train classifier last_2_conv",
        "train classifier all",
        "train unet",
        "infer classifier",
        "infer unet",
    }
    assert all(_positive(r["rss_peak_mib"]) for r in memory.values())
    assert all(_positive(v) for v in result["process_peak_rss_mib"].values())

    printed = capsys.readouterr().out
    for text in ("fast bf16", "memory   ", "fit ms", "+metrics ms", "img/s", "RSS peak MiB", "total"):
        assert text in printed


def test_cache_section_times_both_paths(demo_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    out = tmp_path / "c.json"
    argv = ["--quick", "--device", "cpu", "--threads", "1", "--data.root", str(demo_root), "--sections", "cache"]
    assert bm.main([*argv, "--json", str(out)]) == 0
    rows = {r["regime"]: r for r in json.loads(out.read_text())["sections"]["cache"]}
    assert set(rows) == set(bm.CACHE_REGIMES)
    for row in rows.values():
        assert row["train_images"] > 0
        assert all(_positive(row[k]) for k in ("uncached_epoch_s", "cache_build_s", "cached_epoch_s", "speedup"))
    assert list(cwd.iterdir()) == []  # no split manifest or logs left in the working directory


def test_settings_defaults_and_quick() -> None:
    full = bm.parse_settings(["--device", "cpu"])
    assert (full.classifier_batch, full.classifier_size, full.unet_batch, full.unet_size, full.infer_batch) == (
        32,
        224,
        16,
        128,
        64,
    )
    assert full.at_reference_sizes and full.memory_formats == ("channels_last", "contiguous")
    assert full.precisions == bm.default_precisions(bm.resolve_device("cpu"))
    assert full.precisions[0] == "32-true" and "16-mixed" not in full.precisions
    from covid_lightning.data.datamodules import default_num_workers

    assert default_num_workers() in full.workers and 0 in full.workers

    quick = bm.parse_settings(["--quick", "--device", "cpu", "--unet-size", "48", "--sections", "infer,train"])
    assert quick.classifier_size == bm.QUICK["classifier_size"] and quick.unet_size == 48
    assert quick.sections == ("train", "infer") and not quick.at_reference_sizes
    assert full.malloc == "heap"  # what the CLI runs with
    assert quick.malloc == "default" and bm.parse_settings(["--quick", "--malloc", "heap"]).malloc == "heap"


@pytest.mark.parametrize(
    "argv", [["--sections", "train,gpu"], ["--workers", "one"], ["--precision", "fp8"], ["--device", "tpu"]]
)
def test_bad_options_are_rejected(argv: list[str]) -> None:
    with pytest.raises(SystemExit):
        bm.parse_settings(argv)


def test_16_mixed_needs_cuda() -> None:
    with pytest.raises(SystemExit, match="CUDA"):
        bm.parse_settings(["--device", "cpu", "--precision", "32-true,16-mixed"])


def test_keras_reference_comes_from_this_machines_json_only(tmp_path: Path) -> None:
    """No Keras figure without --keras-json; with it, the figures at the lab's sizes and a speed ratio."""
    assert bm.keras_reference("train", "classifier", "all", "32-true", bm.parse_settings(["--device", "cpu"])) is None
    path = tmp_path / "k.json"
    reference = {"train/classifier/all/32-true": 800.0, "infer/unet/infer/bf16-mixed": 300.0}
    path.write_text(json.dumps({"tensorflow": "2.21", "reference": reference}))
    lab = bm.parse_settings(["--device", "cpu", "--keras-json", str(path)])
    assert bm.keras_reference("train", "classifier", "all", "32-true", lab) == 800.0
    assert bm.keras_reference("infer", "unet", "infer", "bf16-mixed", lab) == 300.0
    assert bm.keras_reference("train", "unet", "train", "32-true", lab) is None  # not measured there
    smaller = bm.parse_settings(["--device", "cpu", "--keras-json", str(path), "--classifier-size", "128"])
    assert bm.keras_reference("train", "classifier", "all", "32-true", smaller) is None
    row = {"gflop_per_step": 10.0, "fit_ms": 400.0, "keras_ms": 800.0}
    assert bm.add_compute_shares([row], matmul_rate=100.0)[0]["keras_speed"] == pytest.approx(2.0)
    path.write_text("{}")
    with pytest.raises(SystemExit, match="keras_reference"):
        bm.parse_settings(["--device", "cpu", "--keras-json", str(path)])


def test_keras_columns_only_with_a_reference() -> None:
    rows = [{"model": "unet", "fit_ms": 1.0, "keras_ms": None}]
    assert "keras" not in bm.format_section("train", rows, 1.0)
    rows[0]["keras_ms"], rows[0]["keras_speed"] = 2.0, 2.0
    assert "x keras" in bm.format_section("train", rows, 1.0)


def test_time_calls_and_median() -> None:
    calls = []
    timing = bm.time_calls(lambda: calls.append(1), warmup=2, repeats=3, device=bm.torch.device("cpu"))
    assert len(calls) == 5 and len(timing.times) == 3 and all(t >= 0 for t in timing.times)
    assert math.isnan(timing.kernel) or 0 <= timing.kernel <= 1
    assert bm.median([3.0, 1.0, 2.0]) == 2.0 and math.isnan(bm.median([]))
    assert bm.spread([1.0, 2.0, 3.0]) == 1.0


def test_format_table_aligns_and_marks_missing_values() -> None:
    columns = [bm.Column("name", "name"), bm.Column("ms", "ms", ".1f"), bm.Column("ref", "ref", ".0f")]
    text = bm.format_table([{"name": "a", "ms": 1.25, "ref": None}, {"name": "long name", "ms": 10.0}], columns)
    lines = text.splitlines()
    assert lines[0].split() == ["name", "ms", "ref"]
    assert lines[2].split() == ["a", "1.2", "-"] and lines[3].split() == ["long", "name", "10.0", "-"]
    assert len({len(line) for line in lines[:2]}) == 1  # header and rule have the same width


def test_json_is_strict(tmp_path: Path) -> None:
    path = tmp_path / "r.json"
    bm.write_json({"a": float("nan"), "b": (1, float("inf")), "c": 1.5}, str(path))
    assert json.loads(path.read_text()) == {"a": None, "b": [1, None], "c": 1.5}


def test_forward_flops() -> None:
    """The fully convolutional U-Net's FLOPs grow 4x for twice the side; MobileNetV2-050 at 224 px is the
    published ~97 M multiply-adds (timm: 0.1 GMACs) plus the lab's 1.84 M-parameter head."""
    small, large = bm.forward_gflop("unet", 32), bm.forward_gflop("unet", 64)
    assert small > 0 and large == pytest.approx(4 * small, rel=1e-6)
    assert bm.forward_gflop("classifier", 224) == pytest.approx(2 * (0.097 + 0.00184), rel=0.05)
    assert bm.train_gflop("classifier", "head", 32, 64) is None
    assert bm.train_gflop("unet", "train", 2, 32) == pytest.approx(3 * 2 * bm.forward_gflop("unet", 32))


def test_compute_shares() -> None:
    rows = [
        {"gflop_per_step": 10.0, "fit_ms": 500.0, "keras_ms": 50.0},
        {"gflop_per_step": None, "fit_ms": 500.0, "keras_ms": None},
        {"gflop_per_image": 2.0, "img_s": 25.0, "keras_img_s": None},
    ]
    step, frozen, infer = bm.add_compute_shares(rows, matmul_rate=100.0)
    assert step["fit_gflop_s"] == pytest.approx(20.0) and step["fit_matmul_share"] == pytest.approx(0.2)
    assert step["keras_matmul_share"] == pytest.approx(2.0)  # Keras' speed would need 2x this machine's matmul
    assert frozen["fit_gflop_s"] is None and frozen["keras_matmul_share"] is None
    assert infer["gflop_s"] == pytest.approx(50.0) and infer["matmul_share"] == pytest.approx(0.5)
    assert infer["keras_matmul_share"] is None


def test_machine_info_has_the_header_fields() -> None:
    info = bm.machine_info(bm.torch.device("cpu"), n=256)
    header = bm.format_header(info, bm.Settings())
    assert info["cpu"] in header and f"torch {info['torch_threads']}" in header and info["gpu"] is None


def test_compiled_inference_rows_match_eager_per_precision() -> None:
    """--compile: one inductor-frozen row per precision the machine runs, with the eager module's outputs."""
    import torch

    settings = bm.parse_settings(["--quick", "--device", "cpu", "--compile", "--precision", "32-true"])
    images = bm.make_batches("unet", 1, 2, 32, seed=1)[0]["image"]
    [row] = bm.compiled_rows("unet", images, settings)
    assert (row["variant"], row["precision"], row["memory_format"]) == ("torch.compile", "32-true", "channels_last")
    assert _positive(row["img_s"]) and _positive(row["setup_s"]) and "freezing" in row["note"]
    eager = bm.ModelCase("unet").build(32).eval()
    compiled = bm.ModelCase("unet", compile=True).build(32).eval()
    compiled.configure_model()
    import torch._inductor.config as inductor

    with torch.inference_mode(), inductor.patch(freezing=True):
        torch.testing.assert_close(compiled(images), eager(images), rtol=1e-4, atol=1e-4)
    torch._dynamo.reset()
