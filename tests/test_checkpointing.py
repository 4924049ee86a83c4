"""AtomicCheckpointIO (never a half-written checkpoint, even with $TMPDIR elsewhere) and load_checkpoint_file."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from covid_lightning.checkpointing import AtomicCheckpointIO, CheckpointError, load_checkpoint_file

REPO = Path(__file__).resolve().parents[1]
SHM = Path("/dev/shm")


def _temp_files(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.name.endswith(".tmp")]


def test_plugin_writes_a_loadable_file_and_no_temp_files(tmp_path: Path) -> None:
    io = AtomicCheckpointIO()
    target = tmp_path / "sub" / "last.ckpt"
    for epoch in range(3):  # the first save creates the folder, the next ones replace the file
        io.save_checkpoint({"state_dict": {"w": torch.full((10,), float(epoch))}, "epoch": epoch}, target)
    ckpt = load_checkpoint_file(target)
    assert ckpt["epoch"] == 2 and torch.equal(ckpt["state_dict"]["w"], torch.full((10,), 2.0))
    assert sorted(p.name for p in target.parent.iterdir()) == ["last.ckpt"]
    assert io.load_checkpoint(target)["epoch"] == 2
    io.remove_checkpoint(target)
    assert not target.exists()


def test_plugin_leaves_remote_urls_to_lightning(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from covid_lightning import checkpointing

    monkeypatch.setattr(checkpointing, "atomic_torch_save", lambda *a: pytest.fail("remote path saved locally"))
    io = AtomicCheckpointIO()
    url = f"memory://{tmp_path.name}/last.ckpt"  # fsspec's in-memory filesystem stands in for s3:// etc.
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}, "epoch": 4}, url)
    assert io.load_checkpoint(url)["epoch"] == 4
    io.remove_checkpoint(url)


def test_plugin_keeps_lightning_errors_for_storage_options(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="storage_options"):
        AtomicCheckpointIO().save_checkpoint({"epoch": 0}, tmp_path / "x.ckpt", storage_options={"a": 1})


def test_plugin_removes_the_temp_file_on_error(tmp_path: Path) -> None:
    class Unpicklable:
        def __reduce__(self) -> tuple:
            raise RuntimeError("cannot pickle this")

    target = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"state_dict": {}, "epoch": 1}, target)
    with pytest.raises(RuntimeError, match="cannot pickle"):
        AtomicCheckpointIO().save_checkpoint({"state_dict": {}, "bad": Unpicklable()}, target)
    assert load_checkpoint_file(target)["epoch"] == 1  # the old checkpoint is untouched
    assert _temp_files(tmp_path) == []


SAVER = """
import sys, torch
from covid_lightning.checkpointing import AtomicCheckpointIO
io = AtomicCheckpointIO()
payload = {"state_dict": {"w": torch.randn(4_000_000)}, "epoch": 0}  # 16 MB
i = 0
while True:
    payload["epoch"] = i
    io.save_checkpoint(payload, sys.argv[1])
    i += 1
"""


def _wait_for(predicate, deadline_s: float, what: str) -> None:
    deadline = time.monotonic() + deadline_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {deadline_s:g} s waiting for {what}")
        time.sleep(0.01)


def test_sigkill_with_tmpdir_on_another_filesystem_never_breaks_last(tmp_path: Path) -> None:
    """Kill -9 a process that rewrites last.ckpt in a loop, with $TMPDIR on another filesystem."""
    if not SHM.is_dir() or not os.access(SHM, os.W_OK):
        pytest.skip("/dev/shm is not a writable folder here: no second filesystem to put $TMPDIR on")
    if SHM.stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip("/dev/shm is on the same filesystem as tmp_path: the cross-filesystem case cannot happen")
    tmpdir = SHM / f"covid_lightning_test_{os.getpid()}"
    tmpdir.mkdir(exist_ok=True)
    env = {**os.environ, "TMPDIR": str(tmpdir), "PYTHONPATH": str(REPO)}
    path = tmp_path / "last.ckpt"
    try:
        for attempt in range(5):
            proc = subprocess.Popen([sys.executable, "-c", SAVER, str(path)], env=env, start_new_session=True)
            try:
                _wait_for(lambda proc=proc: path.exists() or proc.poll() is not None, 120, "the first checkpoint")
                assert proc.poll() is None, f"the saver exited with {proc.returncode}"
                start = load_checkpoint_file(path)["epoch"]
                _wait_for(lambda start=start: load_checkpoint_file(path)["epoch"] > start, 60, "a rewrite")
                time.sleep(0.05 + 0.07 * attempt)  # kill at different moments of a write
            finally:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
            assert path.stat().st_size > 16_000_000
            ckpt = load_checkpoint_file(path)  # never empty, never truncated
            assert ckpt["state_dict"]["w"].numel() == 4_000_000
            assert all(p.name.startswith(".last.ckpt.") for p in _temp_files(tmp_path))  # only what a kill left
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def test_trainer_fit_writes_last_through_the_plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.demos.boring_classes import BoringModel

    from covid_lightning import checkpointing

    saved: list[Path] = []
    real_save = checkpointing.atomic_torch_save

    def spy(obj: object, path: str | Path) -> None:
        saved.append(Path(path))
        real_save(obj, path)

    monkeypatch.setattr(checkpointing, "atomic_torch_save", spy)
    plugin = AtomicCheckpointIO()
    ckpt_dir = tmp_path / "ckpts"
    trainer = L.Trainer(
        default_root_dir=tmp_path,
        plugins=[plugin],
        callbacks=[ModelCheckpoint(dirpath=ckpt_dir, save_last=True)],
        max_epochs=2,
        limit_train_batches=2,
        limit_val_batches=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    assert trainer.strategy.checkpoint_io is plugin
    trainer.fit(BoringModel())
    last = ckpt_dir / "last.ckpt"
    assert last in saved
    ckpt = load_checkpoint_file(last)
    assert ckpt["epoch"] == 1 and "layer.weight" in ckpt["state_dict"]
    assert _temp_files(ckpt_dir) == []


# --------------------------------------------------------------------------------------------- loading


@pytest.fixture
def real_ckpt(tmp_path: Path) -> Path:
    path = tmp_path / "ckpts" / "best-epoch03.ckpt"
    AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.randn(50_000)}, "epoch": 3}, path)
    return path


def test_load_zero_byte_file(real_ckpt: Path) -> None:
    empty = real_ckpt.parent / "last.ckpt"
    empty.touch()
    with pytest.raises(CheckpointError) as err:
        load_checkpoint_file(empty)
    msg = str(err.value)
    assert str(empty) in msg and "empty (0 bytes)" in msg and "cut off while being written" in msg
    assert str(real_ckpt) in msg  # the checkpoint to use instead


def test_load_truncated_file(real_ckpt: Path) -> None:
    data = real_ckpt.read_bytes()
    half = real_ckpt.parent / "last.ckpt"
    half.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as err:
        load_checkpoint_file(half)
    msg = str(err.value)
    assert str(half) in msg and "truncated" in msg and str(real_ckpt) in msg


def test_load_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "last.ckpt"
    with pytest.raises(CheckpointError, match="does not exist") as err:
        load_checkpoint_file(missing)
    assert str(missing) in str(err.value)
    assert isinstance(err.value, ValueError)


def test_load_non_checkpoint_files(tmp_path: Path) -> None:
    text = tmp_path / "notes.ckpt"
    text.write_text("not a checkpoint\n")
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint") as err:
        load_checkpoint_file(text)
    assert str(text) in str(err.value)

    weights = tmp_path / "weights.ckpt"
    torch.save({"w": torch.zeros(2)}, weights)  # a bare state dict, not a Lightning checkpoint
    with pytest.raises(CheckpointError, match="not a Lightning checkpoint.*state_dict"):
        load_checkpoint_file(weights)
    assert load_checkpoint_file(weights, required_keys=())["w"].shape == (2,)

    with pytest.raises(CheckpointError, match="is a folder"):
        load_checkpoint_file(tmp_path)

    pickled = tmp_path / "objects.ckpt"
    torch.save({"state_dict": {}, "obj": _Custom()}, pickled)
    with pytest.raises(CheckpointError, match="weights-only loading refuses") as err:
        load_checkpoint_file(pickled)
    assert str(pickled) in str(err.value)


class _Custom:
    """An arbitrary pickled object: weights-only loading must refuse it."""
