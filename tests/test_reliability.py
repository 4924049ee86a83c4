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


def _fit_args(demo_root: Path, epochs: int) -> list[str]:
    """The README's demo command on the test's demo data (smaller images): no pinned logger or version."""
    return [
        "fit", "--config", str(DEMO), "--data.root", str(demo_root), "--data.image_size", "48",
        "--data.batch_size", "8", "--data.augment", "light", "--trainer.max_epochs", str(epochs),
        "--trainer.deterministic", "true", "--trainer.enable_progress_bar", "false",
    ]  # fmt: skip


RUN = Path("runs") / "demo_classification" / "version_0"


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
        root = ["--trainer.default_root_dir", str(tmp_path / name)]
        build_cli([*_fit_args(demo_root, 2), "--data.num_workers", "0", *root])
        runs.append(tmp_path / name / "demo_classification" / "version_0")
    assert _last_val(runs[0]) == _last_val(runs[1])
    _assert_same_weights(runs[0] / "checkpoints" / "last.ckpt", runs[1] / "checkpoints" / "last.ckpt")


def _console(args: list[str], cwd: Path) -> subprocess.Popen:
    exe = Path(sys.executable).with_name("lightning")
    cmd = [str(exe), *args] if exe.exists() else [sys.executable, "-m", "covid_lightning", *args]
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    cwd.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(
        cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )


def _finish(proc: subprocess.Popen) -> str:
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-2000:] + err[-3000:]
    return out


def _epoch_of(ckpt: Path) -> int:
    try:
        return int(torch.load(ckpt, map_location="cpu", weights_only=True)["epoch"])
    except (FileNotFoundError, EOFError, RuntimeError):
        return -1


@pytest.mark.slow
def test_kill_during_epoch_3_resume_validate_predict_in_one_run_folder(demo_root: Path, tmp_path: Path):
    """The README's loop as typed: fit, kill -9 in epoch 3, ``--ckpt_path last``, validate and predict the best."""
    epochs, full_dir, user = 4, tmp_path / "full", tmp_path / "user"
    started = time.perf_counter()
    full = _console([*_fit_args(demo_root, epochs), "--data.num_workers", "1"], full_dir)
    victim = _console([*_fit_args(demo_root, epochs), "--data.num_workers", "1"], user)
    last = user / RUN / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 600
    while _epoch_of(last) < 1 and victim.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)  # epochs 1 and 2 (0-based 0, 1) saved: the run is now in epoch 3
    assert _epoch_of(last) == 1, victim.communicate()[1][-2000:]
    os.killpg(victim.pid, signal.SIGKILL)
    assert victim.wait() == -signal.SIGKILL, "the run finished before it could be killed"

    out = _finish(_console([*_fit_args(demo_root, epochs), "--data.num_workers", "1", "--ckpt_path", "last"], user))
    assert f"Run folder: {RUN}" in out and "best val/acc" in out and "wall time" in out
    _finish(full)
    print(f"\nkill-and-resume test wall time: {time.perf_counter() - started:.1f} s")
    run = user / RUN
    assert sorted(p.name for p in run.parent.iterdir()) == ["version_0"], "the resume continued the same folder"
    assert _last_val(full_dir / RUN) == _last_val(run)
    _assert_same_weights(full_dir / RUN / "checkpoints" / "last.ckpt", run / "checkpoints" / "last.ckpt")
    assert torch.load(last, weights_only=True)["epoch"] == epochs - 1
    epochs_logged = [int(r["epoch"]) for r in csv.DictReader((run / "metrics.csv").open()) if r.get("val/acc")]
    assert epochs_logged == list(range(epochs)), "one validation row per epoch, none lost or repeated"

    best = next((run / "checkpoints").glob("best-*.ckpt"))
    out = _finish(_console(["validate", "--config", str(DEMO), "--data.root", str(demo_root),
                            "--data.image_size", "48", "--ckpt_path", str(best.relative_to(user))], user))  # fmt: skip
    assert f"results in {RUN / 'validate' / 'version_0'}" in out and "val/acc" in out
    assert (run / "validate" / "version_0" / "report_val" / "classification_report.md").is_file()
    images = demo_root / "COVID"
    out = _finish(_console(["predict", "--config", str(DEMO), "--data.root", str(demo_root), "--data.image_size",
                            "48", "--ckpt_path", str(best.relative_to(user)), "--data.predict_root", str(images)],
                           user))  # fmt: skip
    csv_path = RUN / "predict" / "version_0" / "predictions.csv"
    assert f"written to {csv_path}" in out and (user / csv_path).is_file()
    assert sorted(p.name for p in (user / "runs").iterdir()) == ["demo_classification"]
    assert sorted(p.name for p in run.parent.iterdir()) == ["version_0"], "evaluations wrote inside the run"


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
