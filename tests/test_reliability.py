"""Reproducibility, fault tolerance and safe checkpoint loading (CPU, demo data)."""

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from covid_lightning import LungSegmenter, XRayClassifier
from covid_lightning.cli import build_cli

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "demo" / "classification.yaml"


def _fit_args(demo_root: Path, out: Path, epochs: int) -> list[str]:
    return [
        "fit", "--config", str(DEMO), "--data.root", str(demo_root), "--data.image_size", "48",
        "--data.batch_size", "8", "--data.augment", "light", "--trainer.max_epochs", str(epochs),
        "--trainer.deterministic", "true", "--trainer.enable_progress_bar", "false",
        "--trainer.logger", "lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir", str(out),
        "--trainer.logger.version", "0",
    ]  # fmt: skip


def _last_val(run: Path) -> dict[str, float]:
    rows = [r for r in csv.DictReader((run / "metrics.csv").open()) if r.get("val/acc")]
    return {k: float(v) for k, v in rows[-1].items() if k.startswith("val/") and v}


def _state(ckpt: Path) -> dict[str, torch.Tensor]:
    return torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]


def _assert_same_weights(a: Path, b: Path) -> None:
    sa, sb = _state(a), _state(b)
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_two_deterministic_runs_are_identical(demo_root: Path, tmp_path: Path):
    runs = []
    for name in ("a", "b"):
        build_cli([*_fit_args(demo_root, tmp_path / name, 2), "--data.num_workers", "0"])
        runs.append(tmp_path / name / "lightning_logs" / "version_0")
    assert _last_val(runs[0]) == _last_val(runs[1])
    _assert_same_weights(runs[0] / "checkpoints" / "last.ckpt", runs[1] / "checkpoints" / "last.ckpt")


def _console(args: list[str]) -> subprocess.Popen:
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.Popen(
        [sys.executable, "-m", "covid_lightning", *args],
        env=env,
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def test_sigkill_mid_run_then_resume_from_last_matches_uninterrupted(demo_root: Path, tmp_path: Path):
    epochs = 4
    started = time.perf_counter()
    full = _console([*_fit_args(demo_root, tmp_path / "full", epochs), "--data.num_workers", "1"])
    victim = _console([*_fit_args(demo_root, tmp_path / "killed", epochs), "--data.num_workers", "1"])
    last = tmp_path / "killed" / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    deadline = time.time() + 600
    while not last.exists() and victim.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert last.exists(), victim.stderr.read()[-2000:]
    time.sleep(1.0)  # into the next epoch
    os.killpg(victim.pid, signal.SIGKILL)
    assert victim.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    resumed = _console(
        [*_fit_args(demo_root, tmp_path / "killed", epochs), "--ckpt_path", "last", "--data.num_workers", "1"]
    )
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read()[-3000:]
    assert full.wait(timeout=600) == 0, full.stderr.read()[-3000:]
    print(f"\nkill-and-resume test wall time: {time.perf_counter() - started:.1f} s")
    run_full = tmp_path / "full" / "lightning_logs" / "version_0"
    run_killed = tmp_path / "killed" / "lightning_logs" / "version_0"
    assert _last_val(run_full) == _last_val(run_killed)
    _assert_same_weights(run_full / "checkpoints" / "last.ckpt", run_killed / "checkpoints" / "last.ckpt")
    assert torch.load(last, weights_only=True)["epoch"] == epochs - 1


SAVER = """
import sys, torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
io = TorchCheckpointIO()
payload = {"state_dict": {"w": torch.randn(2_000_000)}, "epoch": 0}
i = 0
while True:
    payload["epoch"] = i
    io.save_checkpoint(payload, sys.argv[1])
    i += 1
"""


def test_checkpoint_writes_are_atomic_under_sigkill(tmp_path: Path):
    """Kill a process while it rewrites the checkpoint over and over: the file always loads."""
    path = tmp_path / "last.ckpt"
    for attempt in range(5):
        proc = subprocess.Popen([sys.executable, "-c", SAVER, str(path)], start_new_session=True)
        while not path.exists():
            time.sleep(0.01)
        time.sleep(0.3 + 0.13 * attempt)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        ckpt = torch.load(path, weights_only=True)  # never truncated
        assert ckpt["state_dict"]["w"].numel() == 2_000_000


def test_loading_the_other_kind_names_both(classifier_ckpt: Path, segmenter_ckpt: Path):
    with pytest.raises(TypeError, match="XRayClassifier checkpoint.*LungSegmenter"):
        LungSegmenter.load_from_checkpoint(classifier_ckpt)
    with pytest.raises(TypeError, match="LungSegmenter checkpoint.*XRayClassifier"):
        XRayClassifier.load_from_checkpoint(segmenter_ckpt)


def test_incompatible_class_count_names_both_sides(classifier_ckpt: Path):
    with pytest.raises(ValueError, match="num_classes.*4.*num_classes.*3"):
        XRayClassifier.load_from_checkpoint(classifier_ckpt, num_classes=3, class_names=["a", "b", "c"])


def test_loading_is_weights_only(classifier_ckpt: Path, tmp_path: Path):
    """A checkpoint carrying an arbitrary pickled object is refused by default."""
    ckpt = torch.load(classifier_ckpt, weights_only=True)
    ckpt["evil"] = _Evil()
    bad = tmp_path / "evil.ckpt"
    torch.save(ckpt, bad)
    with pytest.raises(Exception, match="(?i)weights.only|Unsupported global"):
        XRayClassifier.load_from_checkpoint(bad)


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_non_finite_loss_stops_naming_the_step(demo_root: Path, tmp_path: Path):
    import lightning as L

    from covid_lightning import RadiographyDataModule

    model = XRayClassifier(pretrained=False, image_size=32, trainable="all")
    with torch.no_grad():
        model.net.head[-1].weight.fill_(float("nan"))
    trainer = L.Trainer(
        default_root_dir=tmp_path,
        max_epochs=1,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
    )
    dm = RadiographyDataModule(root=str(demo_root), image_size=32, batch_size=4, num_workers=0)
    with pytest.raises(FloatingPointError, match="global step 0"):
        trainer.fit(model, dm)


@pytest.mark.parametrize(
    ("args", "names"),
    [
        ({"trainable": "everything"}, "head, last_conv, last_2_conv, last_4_blocks, all"),
        ({"backbone": "mobilenetv2_05"}, "mobilenetv2_050"),
    ],
)
def test_config_errors_list_valid_names(args, names):
    with pytest.raises(ValueError, match=names):
        XRayClassifier(pretrained=False, **args)
