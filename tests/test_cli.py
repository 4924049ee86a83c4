"""Every YAML parses through the real CLI; fit runs through the real console script."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from covid_lightning import XRayClassifier
from covid_lightning.cli import build_cli

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").rglob("*.yaml"))
EXPERIMENTS = [c for c in CONFIGS if c.parent.name != "trainer"]


def test_configs_exist():
    names = {c.relative_to(REPO / "configs").as_posix() for c in CONFIGS}
    for lab in ("head_only", "last_conv", "last_2_conv", "full_finetune", "staged_unfreeze"):
        assert f"classification/{lab}.yaml" in names
    assert "demo/classification.yaml" in names


@pytest.mark.parametrize("config", EXPERIMENTS, ids=lambda p: p.relative_to(REPO / "configs").as_posix())
def test_config_parses_through_cli(config: Path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_cli(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["class_path"].startswith("covid_lightning.")
    assert printed["data"]["class_path"].startswith("covid_lightning.")


@pytest.mark.parametrize("config", sorted((REPO / "configs" / "trainer").glob("*.yaml")), ids=lambda p: p.name)
def test_trainer_config_combines_with_an_experiment(config: Path, capsys):
    with pytest.raises(SystemExit):
        build_cli(
            [
                "fit",
                "--config",
                str(REPO / "configs/demo/classification.yaml"),
                "--config",
                str(config),
                "--print_config",
            ]
        )
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["trainer"]["strategy"] == yaml.safe_load(config.read_text())["trainer"]["strategy"]


def test_lab_config_values():
    cfg = yaml.safe_load((REPO / "configs/classification/head_only.yaml").read_text())
    model, data = cfg["model"]["init_args"], cfg["data"]["init_args"]
    assert model["backbone"] == "mobilenetv2_050" and model["trainable"] == "head"
    assert model["normalization"] == "unit" and data["image_size"] == 224 and data["val_fraction"] == 0.3
    assert cfg["name"] == "head_only"


def test_standard_callbacks_watch_the_models_metric(demo_root: Path, tmp_path: Path):
    """Best/last checkpoints, LR monitor, report and prediction writer come from the CLI, once."""
    from lightning.pytorch.callbacks import LearningRateMonitor

    from covid_lightning.callbacks import EvaluationReport, PredictionWriter, RunCheckpoint

    cli = build_cli(
        ["--config", str(REPO / "configs/classification/head_only.yaml"), "--model.pretrained", "false",
         "--data.root", str(demo_root), "--trainer.default_root_dir", str(tmp_path)],
        run=False,
    )  # fmt: skip
    kinds = [type(c) for c in cli.trainer.callbacks]
    for kind in (RunCheckpoint, LearningRateMonitor, EvaluationReport, PredictionWriter):
        assert kinds.count(kind) == 1, kind
    ckpt = cli.trainer.checkpoint_callback
    ckpt.setup(cli.trainer, cli.model, "fit")
    assert (ckpt.monitor, ckpt.mode, ckpt.save_last) == ("val/acc", "max", True)


def _console(*args: str, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("lightning")
    cmd = [str(exe), *args] if exe.exists() else [sys.executable, "-m", "covid_lightning", *args]
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_console_script_fit_demo_fast_dev_run(tmp_path: Path):
    """The demo config with its embedded default (root: null -> synthetic data generated on first use)."""
    _console(
        "fit",
        "--config",
        str(REPO / "configs/demo/classification.yaml"),
        "--trainer.fast_dev_run",
        "true",
        "--data.demo_size",
        "8",
        "--data.num_workers",
        "0",
        cwd=tmp_path,
    )


@pytest.mark.slow
def test_console_script_fit_real_sample_leaves_best_and_last(radiography_sample: Path, tmp_path: Path):
    _console(
        "fit",
        "--config",
        str(REPO / "configs/classification/head_only.yaml"),
        "--data.root",
        str(radiography_sample),
        "--model.pretrained",
        "false",
        "--trainer.max_epochs",
        "1",
        "--trainer.limit_train_batches",
        "2",
        "--data.num_workers",
        "0",
        "--data.image_size",
        "128",
        "--trainer.callbacks+=lightning.pytorch.callbacks.ModelSummary",
        cwd=tmp_path,
    )
    run = tmp_path / "runs" / "head_only" / "version_0"
    assert (run / "split.csv").is_file() and (run / "metrics.csv").is_file() and (run / "config.yaml").is_file()
    assert list(run.glob("events.out.tfevents.*")), "TensorBoard and CSV logs share one run folder"
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert "last.ckpt" in ckpts and any(n.startswith("best-") for n in ckpts)
    best = next((run / "checkpoints").glob("best-*.ckpt"))
    model = XRayClassifier.load_from_checkpoint(best)  # nothing else needed, no weight download
    assert model.hparams.image_size == 128 and model.net.flavor == "keras" and model.net.normalization == "unit"
    assert model.net.trainable == "head"


def test_python_dash_m_help():
    proc = subprocess.run(
        [sys.executable, "-m", "covid_lightning", "--help"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0 and "fit" in proc.stdout and "predict" in proc.stdout


SEGMENTATION_CONFIGS = sorted((REPO / "configs").glob("*/*.yaml"))
SEGMENTATION_CONFIGS = [c for c in SEGMENTATION_CONFIGS if "LungSegmenter" in c.read_text()]


def test_segmentation_configs_found():
    names = {c.relative_to(REPO / "configs").as_posix() for c in SEGMENTATION_CONFIGS}
    assert {"segmentation/unet_seed.yaml", "segmentation/unet_resnet34.yaml", "demo/segmentation.yaml"} <= names


@pytest.mark.slow
@pytest.mark.parametrize("config", SEGMENTATION_CONFIGS, ids=lambda p: p.relative_to(REPO / "configs").as_posix())
def test_console_script_fit_segmentation_fast_dev_run(config: Path, demo_root: Path, tmp_path: Path):
    """Every segmentation config trains through the console script (16-mixed becomes bf16-mixed on CPU)."""
    _console(
        "fit",
        "--config",
        str(config),
        "--trainer.fast_dev_run",
        "true",
        "--data.root",
        str(demo_root),
        "--data.num_workers",
        "0",
        "--data.batch_size",
        "4",
        "--model.compile_model",
        "false",  # the GPU recipes compile; not worth ~20 s per test on a CPU
        cwd=tmp_path,
    )


@pytest.mark.parametrize(
    ("precision", "accelerator", "fast_bf16", "expected"),
    [
        ("16-mixed", "cpu", True, "bf16-mixed"),
        ("16-mixed", "cpu", False, "32-true"),
        ("bf16-mixed", "cpu", False, "bf16-mixed"),
        ("32-true", "cpu", True, "32-true"),
        ("16-mixed", "gpu", False, "16-mixed"),
    ],
)
def test_precision_suited_to_device(monkeypatch, precision, accelerator, fast_bf16, expected):
    from covid_lightning import runtime

    monkeypatch.setenv(runtime.FAST_BF16_ENV, str(int(fast_bf16)))
    assert runtime.cpu_has_fast_bf16() is fast_bf16
    assert runtime.device_precision(precision, accelerator) == expected


@pytest.mark.parametrize("config", EXPERIMENTS, ids=lambda p: p.relative_to(REPO / "configs").as_posix())
def test_configs_hold_only_the_experiment(config: Path):
    """No config repeats the loggers or the standard callbacks (the CLI defaults them); each names its run."""
    cfg = yaml.safe_load(config.read_text())
    assert cfg.get("name"), "every experiment names its run folder"
    trainer = cfg.get("trainer") or {}
    assert "logger" not in trainer and "default_root_dir" not in trainer
    standard = ("ModelCheckpoint", "LearningRateMonitor", "EvaluationReport", "PredictionWriter", "RichProgressBar")
    for callback in trainer.get("callbacks") or []:
        assert not callback["class_path"].endswith(standard), callback
