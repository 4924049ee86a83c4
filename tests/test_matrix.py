"""Every shipped config with every documented option (issue 18): a combination matrix through the real CLI.

Each run goes through ``covid_lightning.cli.main`` in-process, exactly what the ``lightning`` console script
runs (0 on success, 2 for a user error), at tiny settings (32 px, batch 4, one batch per loop, one epoch) on the
session's demo data (8 images + masks per class). The grid:

* ``test_fit``: every config in ``configs/`` (``configs/trainer/`` is combined separately) x every data source:
  files (``--data.root``), ``--data.streaming`` (a LitData dataset from ``optimize``, masks included),
  ``--data.cache_images memory|disk`` and ``--data.lung_segmenter`` (classification; a segmentation config
  refuses it at start, exit 2, one message);
* ``test_validate``/``test_test``/``test_predict``/``test_resume``: every config on the files source, with the
  checkpoints of its files ``fit`` (``--ckpt_path best``, ``last`` and an explicit file);
* ``test_eval_on_a_stream``: validate and test on the streamed source (sampled: the demo configs);
* ``test_precision``: 32-true, bf16-mixed and 16-mixed (on a CPU with and without native bfloat16) on the demo
  configs and one lab config;
* ``test_two_process_ddp_on_a_stream_with_the_prefix_cached``: the lab's head_only config streamed in 2-process
  DDP (tests/test_ddp.py covers the demo configs on files with their own logger);
* ``test_refused_at_start`` (and the refused cells of ``test_fit``): what is refused by design, with its message:
  lung_segmenter with a segmentation config, a stream or an image cache (``recipe_gpu.yaml`` caches images),
  ``test`` without a test split, ``predict`` without ``data.predict_root``.

Fits assert the run folder (one ``version_0``: ``last.ckpt``, one ``best-*.ckpt``, ``metrics.csv`` with the
model's metric, ``split.csv``, ``config.yaml``, TensorBoard events) and the printed summary; validate/test the
printed folder ``<run>/validate|test/version_0`` with its ``metrics.csv`` and report; predict the CSV (and masks);
resume that version_0 continues to epoch 2 in place. About 3 minutes on 2 shared cores (one torch thread).
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
import yaml

pytest.importorskip("litdata")

from covid_lightning.cli import main
from covid_lightning.runtime import FAST_BF16_ENV

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted(
    p.relative_to(REPO).as_posix() for p in (REPO / "configs").glob("*/*.yaml") if p.parent.name != "trainer"
)
SOURCES = ["files", "streaming", "memory", "disk", "lung_segmenter"]
#: (config, source) refused by design at start (exit 2, before any lung mask or run folder): the message
REFUSED = {
    **{(c, "lung_segmenter"): "error: data.lung_segmenter applies to classification data" for c in CONFIGS
       if c.startswith(("configs/segmentation/", "configs/demo/segmentation"))},
    ("configs/classification/recipe_gpu.yaml", "lung_segmenter"):
        "error: data.cache_images memory cannot be combined with data.lung_segmenter",
}  # fmt: skip
#: the split of the files source (and of the stream): every split non-empty with 8 images per class
SPLIT = {"val_fraction": 0.25, "test_fraction": 0.25, "seed": 3}
TINY = [
    "--data.image_size", "32", "--data.batch_size", "4", "--data.num_workers", "0", "--trainer.max_epochs", "1",
    "--trainer.limit_train_batches", "1", "--trainer.limit_val_batches", "1", "--trainer.limit_test_batches", "1",
    "--trainer.limit_predict_batches", "1", "--trainer.enable_progress_bar", "false", "--model.compile_model", "false",
]  # fmt: skip


def grid(sources: list[str] | None) -> list:
    """(config[, source]) params."""
    return [(c, src) if src else c for c in CONFIGS for src in sources or [None]]


def _yaml(config: str) -> dict:
    return yaml.safe_load((REPO / config).read_text())


def kind(config: str) -> str:
    """``classification`` or ``segmentation``, from the model class the config builds."""
    return "segmentation" if _yaml(config)["model"]["class_path"].endswith("LungSegmenter") else "classification"


def run_name(config: str) -> str:
    return _yaml(config)["name"]


def offline(config: str) -> list[str]:
    """What a config needs to run without network: no pretrained download (segmentation configs ship without
    encoder weights: ``encoder_weights``/``encoder_weights_file`` null)."""
    return ["--model.pretrained", "false"] if kind(config) == "classification" else []


def metric(config: str) -> str:
    return "val/acc" if kind(config) == "classification" else "val/dice"


def cli(*args: str) -> int:
    """The console script's entry point; a parse error (SystemExit) is the same exit status."""
    try:
        return main(list(args))
    except SystemExit as err:  # jsonargparse refuses an unknown key before our code runs
        return int(err.code or 0)


def printed_folder(out: str) -> Path:
    """The folder an evaluation command says it wrote to (``  results in <folder> (1.2 s)``)."""
    match = re.search(r"^  results in (.+) \([0-9.]+ s\)$", out, re.MULTILINE)
    assert match, out
    return Path(match.group(1)).resolve()


def csv_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def finite_values(path: Path, key: str) -> list[float]:
    return [float(r[key]) for r in csv_rows(path) if r.get(key) and math.isfinite(float(r[key]))]


@pytest.fixture(scope="module", autouse=True)
def _module_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Caches (decoded images, lung masks, inspection results) in a temporary folder, not ~/.cache; one torch
    thread: at 32 px the runs are overhead-bound and two OpenMP threads on a shared 2-core machine only spin."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg_cache")))
        yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def stream(demo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo data as one LitData dataset (images + masks): it serves both kinds of config."""
    from covid_lightning.data.streaming import optimize, read_meta

    out = tmp_path_factory.mktemp("matrix_stream") / "demo"
    assert optimize(demo_root, out, **SPLIT) == 0 and read_meta(out)["counts"] == {"train": 16, "val": 8, "test": 8}
    return out


@pytest.fixture(scope="module")
def source_args(demo_root: Path, stream: Path, segmenter_ckpt: Path) -> Callable[[str], list[str]]:
    split = ["--data.val_fraction", str(SPLIT["val_fraction"]), "--data.test_fraction", str(SPLIT["test_fraction"]),
             "--data.seed", str(SPLIT["seed"])]  # fmt: skip
    files = ["--data.root", str(demo_root), *split]
    table = {
        "files": files,
        "streaming": ["--data.streaming", str(stream)],  # the config's own data.root is left as it is: unused
        "memory": [*files, "--data.cache_images", "memory"],
        "disk": [*files, "--data.cache_images", "disk"],
        "lung_segmenter": [*files, "--data.lung_segmenter", str(segmenter_ckpt)],
    }
    return table.__getitem__


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the files-source fits live (``<root>/runs``); the eval commands run from ``<root>`` like a user."""
    return tmp_path_factory.mktemp("matrix_runs")


@pytest.fixture(scope="module")
def fitted(runs_root: Path, source_args) -> Callable[[str], Path]:
    """The files-source ``fit`` of a config, once per module: its run folder (``runs/<name>/version_0``)."""
    done: dict[str, Path] = {}

    def get(config: str) -> Path:
        if config not in done:
            code = cli("fit", "--config", str(REPO / config), *offline(config), *source_args("files"), *TINY,
                       "--trainer.default_root_dir", str(runs_root / "runs"))  # fmt: skip
            assert code == 0, f"fit {config} on files: exit {code}"
            done[config] = runs_root / "runs" / run_name(config) / "version_0"
        return done[config]

    return get


def assert_refused(code: int, err: str, message: str) -> None:
    """Exit 2 and one ``error:`` paragraph holding ``message``, no traceback."""
    assert code == 2 and message in err and "Traceback" not in err, err[-3000:]
    assert len([line for line in err.splitlines() if line.startswith("error:")]) == 1, err[-3000:]


def assert_fit_run(run: Path, config: str, out: str | None) -> None:
    """What every ``fit`` writes: one version, checkpoints, metrics, the split manifest, the printed summary."""
    assert sorted(p.name for p in run.parent.iterdir()) == ["version_0"], list(run.parent.iterdir())
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert len(list((run / "checkpoints").glob("best-*.ckpt"))) == 1
    assert (run / "config.yaml").is_file() and (run / "split.csv").is_file() and list(run.glob("events.out.*"))
    assert finite_values(run / "metrics.csv", metric(config)), (run / "metrics.csv").read_text()
    if out is not None:
        assert f"Run folder: {run}" in out and "last checkpoint:" in out and "1 epochs done" in out, out


# ---------------------------------------------------------------------------------------------------------------
# config x data source, fit
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(("config", "source"), grid(SOURCES))
def test_fit(config: str, source: str, source_args, fitted, stream: Path, tmp_path: Path, capsys):
    if source == "files":  # the module's shared fit (the eval tests reuse its checkpoints)
        run = fitted(config)
        out = capsys.readouterr().out
        assert_fit_run(run, config, out if f"Run folder: {run}" in out else None)  # None: fitted by an earlier test
        return
    root = tmp_path / "runs"
    cache = Path(os.environ["XDG_CACHE_HOME"]) / "covid_lightning"
    lung_masks = lambda: sorted((cache / "lung_masks").rglob("*.png"))  # noqa: E731
    before = lung_masks()
    code = cli("fit", "--config", str(REPO / config), *offline(config), *source_args(source), *TINY,
               "--trainer.default_root_dir", str(root))  # fmt: skip
    out, err = capsys.readouterr()
    if (config, source) in REFUSED:  # by design, at start: no run folder, no lung mask computed
        assert_refused(code, err, REFUSED[config, source])
        assert not (root / run_name(config)).exists() and lung_masks() == before
        if "--data.cache_images none" not in err:
            return
        code = cli(
            "fit",
            "--config",
            str(REPO / config),
            *offline(config),
            *source_args(source),
            *TINY,
            "--trainer.default_root_dir",
            str(root),
            "--data.cache_images",
            "none",
        )  # what the message says
        out, err = capsys.readouterr()
        assert code == 0, err[-3000:]
    assert code == 0, err[-3000:]
    run = root / run_name(config) / "version_0"
    assert_fit_run(run, config, out)
    if source == "streaming":  # the run keeps the stream's split as its split.csv
        assert (run / "split.csv").read_bytes() == (stream / "manifest.csv").read_bytes()
        if _yaml(config)["data"]["init_args"].get("cache_images", "none") != "none":  # the recipe_gpu configs
            assert "data.cache_images memory does not apply to data.streaming" in err
    if source == "disk":
        assert list((cache / "decoded").glob("*.npy"))
    if source == "lung_segmenter":  # one mask per image of the dataset, computed once, reused by later runs
        assert len(lung_masks()) == 32


# ---------------------------------------------------------------------------------------------------------------
# config x command, files source: the checkpoints of its fit
# ---------------------------------------------------------------------------------------------------------------


def _in_run(runs_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Eval commands run from the folder holding ``runs/`` without default_root_dir: they write inside the run."""
    monkeypatch.chdir(runs_root)


@pytest.mark.slow
@pytest.mark.parametrize("config", grid(None))
def test_validate(config: str, fitted, source_args, runs_root: Path, monkeypatch, capsys):
    run = fitted(config)
    _in_run(runs_root, monkeypatch)
    capsys.readouterr()
    code = cli("validate", "--config", str(REPO / config), *offline(config), *source_args("files"), *TINY,
               "--ckpt_path", "best")  # fmt: skip
    out, err = capsys.readouterr()
    assert code == 0, err[-3000:]
    folder = run / "validate" / "version_0"
    assert "validate: val/" in out and printed_folder(out) == folder.resolve(), out
    assert finite_values(folder / "metrics.csv", metric(config))
    report = "classification_report.md" if kind(config) == "classification" else "segmentation_report.md"
    assert (folder / "report_val" / report).is_file()


@pytest.mark.slow
@pytest.mark.parametrize("config", grid(None))
def test_test(config: str, fitted, source_args, runs_root: Path, monkeypatch, capsys):
    run = fitted(config)
    _in_run(runs_root, monkeypatch)
    capsys.readouterr()
    code = cli("test", "--config", str(REPO / config), *offline(config), *source_args("files"), *TINY,
               "--ckpt_path", "last")  # fmt: skip
    out, err = capsys.readouterr()
    assert code == 0, err[-3000:]
    folder = run / "test" / "version_0"
    assert "test: test/" in out and printed_folder(out) == folder.resolve(), out
    assert finite_values(folder / "metrics.csv", metric(config).replace("val/", "test/"))
    report = "classification_report.md" if kind(config) == "classification" else "segmentation_report.md"
    assert (folder / "report_test" / report).is_file()


@pytest.mark.slow
@pytest.mark.parametrize("config", grid(None))
def test_predict(config: str, fitted, source_args, demo_root: Path, runs_root: Path, monkeypatch, capsys):
    run = fitted(config)
    best = next((run / "checkpoints").glob("best-*.ckpt"))
    _in_run(runs_root, monkeypatch)
    capsys.readouterr()
    code = cli("predict", "--config", str(REPO / config), *offline(config), *source_args("files"), *TINY,
               "--ckpt_path", str(best), "--data.predict_root", str(demo_root / "COVID"))  # fmt: skip
    out, err = capsys.readouterr()
    assert code == 0, err[-3000:]
    folder = run / "predict" / "version_0"
    if kind(config) == "classification":
        rows = csv_rows(folder / "predictions.csv")
        assert len(rows) == 4 and list(rows[0])[:2] == ["path", "predicted"]  # one batch of 4
        assert all(r["predicted"] in ("COVID", "Lung_Opacity", "Normal", "Viral Pneumonia") for r in rows)
        assert f"written to {folder / 'predictions.csv'}" in out, out
    else:
        rows = csv_rows(folder / "lung_area.csv")
        assert len(rows) == 4 and all(0.0 <= float(r["lung_fraction"]) <= 1.0 for r in rows)
        assert len(list((folder / "masks").rglob("*.png"))) == 4
        assert f"written to {folder / 'lung_area.csv'}" in out, out


@pytest.mark.slow
@pytest.mark.parametrize("config", grid(None))
def test_resume(config: str, fitted, source_args, runs_root: Path, capsys):
    """``fit --ckpt_path last`` continues version_0 in place: no version_1, metrics.csv continued."""
    run = fitted(config)
    capsys.readouterr()
    code = cli("fit", "--config", str(REPO / config), *offline(config), *source_args("files"), *TINY,
               "--trainer.default_root_dir", str(runs_root / "runs"), "--trainer.max_epochs", "2",
               "--ckpt_path", "last")  # fmt: skip
    out, err = capsys.readouterr()
    assert code == 0, err[-3000:]
    assert sorted(p.name for p in run.parent.iterdir()) == ["version_0"]
    assert f"Run folder: {run}" in out and "2 epochs done" in out, out
    epochs = {r["epoch"] for r in csv_rows(run / "metrics.csv") if r.get(metric(config))}
    assert epochs == {"0", "1"}, epochs
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=False, map_location="cpu")["epoch"] == 1


# ---------------------------------------------------------------------------------------------------------------
# samples of the other axes
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("config", ["configs/demo/classification.yaml", "configs/demo/segmentation.yaml"])
def test_eval_on_a_stream(config: str, stream: Path, tmp_path: Path, capsys):
    """validate and test read the stream's own val/test splits (test used to be refused: "No test split")."""
    root = tmp_path / "runs"
    common = ["--config", str(REPO / config), "--data.streaming", str(stream), *TINY,
              "--trainer.default_root_dir", str(root)]  # fmt: skip
    assert cli("fit", *common) == 0
    for command in ("validate", "test"):
        capsys.readouterr()
        code = cli(command, *common, "--ckpt_path", "last")
        out, err = capsys.readouterr()
        assert code == 0, err[-3000:]
        folder = root / run_name(config) / command / "version_0"  # explicit default_root_dir: under <root>/<name>
        prefix = "val/" if command == "validate" else "test/"
        assert finite_values(folder / "metrics.csv", metric(config).replace("val/", prefix)), out


PRECISIONS = [  # (--trainer.precision, COVID_LIGHTNING_FAST_BF16, what the CPU trains with)
    ("32-true", None, "32-true"),
    ("bf16-mixed", None, "bf16-mixed"),
    ("16-mixed", "1", "bf16-mixed"),  # a CPU with native bfloat16 kernels
    ("16-mixed", "0", "32-true"),  # a CPU without them
]


PRECISION_CONFIGS = [
    "configs/demo/classification.yaml",
    "configs/demo/segmentation.yaml",
    "configs/classification/last_conv.yaml",
]


@pytest.mark.slow
@pytest.mark.parametrize(("precision", "fast_bf16", "expected"), PRECISIONS, ids=[
    "32-true", "bf16-mixed", "16-mixed-native-bf16", "16-mixed-no-bf16"])  # fmt: skip
@pytest.mark.parametrize("config", PRECISION_CONFIGS)
def test_precision(config, precision, fast_bf16, expected, source_args, tmp_path: Path, monkeypatch, capsys):
    if fast_bf16 is not None:
        monkeypatch.setenv(FAST_BF16_ENV, fast_bf16)
    root = tmp_path / "runs"
    code = cli("fit", "--config", str(REPO / config), *offline(config), *source_args("files"), *TINY,
               "--trainer.precision", precision, "--trainer.default_root_dir", str(root))  # fmt: skip
    out, err = capsys.readouterr()
    assert code == 0, err[-3000:]
    run = root / run_name(config) / "version_0"
    assert_fit_run(run, config, out)
    assert yaml.safe_load((run / "config.yaml").read_text())["trainer"]["precision"] == expected
    assert finite_values(run / "metrics.csv", "val/loss")


@pytest.mark.slow
def test_two_process_ddp_on_a_stream_with_the_prefix_cached(stream: Path, tmp_path: Path):
    """The lab's head_only config (FrozenFeatureCache) streamed under 2-process CPU DDP with the CLI's own run
    folder: one version_0 written by rank 0, and every train/val item seen once per epoch across the ranks (the
    cached features used to be the rank's share of the stream, sharded again: half the data)."""
    probe, root = tmp_path / "probe", tmp_path / "runs"
    args = [
        sys.executable, "-m", "covid_lightning", "fit", "--config", str(REPO / "configs/classification/head_only.yaml"),
        "--model.pretrained", "false", "--data.streaming", str(stream), "--data.image_size", "32",
        "--data.batch_size", "4", "--data.num_workers", "0", "--trainer.max_epochs", "1",
        "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp",
        "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(root),
        "--trainer.callbacks+=tests.helpers.ddp_probe.RankSamples", "--trainer.callbacks.out_dir", str(probe),
    ]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", PYTHONWARNINGS="ignore")
    proc = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [json.loads((probe / f"samples{r}.json").read_text()) for r in (0, 1)]
    assert {r["world"] for r in ranks} == {2} and ranks[0]["pid"] != ranks[1]["pid"]
    manifest = csv_rows(stream / "manifest.csv")
    for split in ("train", "val"):
        seen = ranks[0][split] + ranks[1][split]
        expected = sorted(r["path"] for r in manifest if r["split"] == split)
        assert sorted(seen) == expected, (split, ranks[0][split], ranks[1][split])
    run = root / "head_only" / "version_0"
    assert sorted(p.name for p in run.parent.iterdir()) == ["version_0"]
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert "last.ckpt" in names and len([n for n in names if n.startswith("best-")]) == 1, names
    assert (run / "split.csv").is_file() and finite_values(run / "metrics.csv", "val/acc")
    assert f"Run folder: {run}" in proc.stdout


# ---------------------------------------------------------------------------------------------------------------
# refused by design: exit 2 at start, one message
# ---------------------------------------------------------------------------------------------------------------


REFUSALS = {  # case: the message of its one error paragraph
    "predict without predict_root": "error: predict needs data.predict_root",
    "test without a test split": "error: No test split: set data.test_fraction > 0",
    "test on a stream without a test split": "has no test split: optimize it with --test_fraction > 0",
    "lung_segmenter on a stream": "error: data.lung_segmenter cannot be combined with data.streaming",
    "lung_segmenter with cache_images disk": "error: data.cache_images disk cannot be combined with data.lung_",
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refused_at_start(case: str, demo_root: Path, classifier_ckpt: Path, stream: Path, tmp_path: Path, capsys):
    """Combinations refused by design: exit 2 at start (before any loop, lung mask or run folder), one message."""
    config = ["--config", str(REPO / "configs/demo/classification.yaml"), *TINY,
              "--trainer.default_root_dir", str(tmp_path / "runs")]  # fmt: skip
    files, ckpt = ["--data.root", str(demo_root)], ["--ckpt_path", str(classifier_ckpt)]
    segmenter = ["--data.lung_segmenter", str(tmp_path / "never_read.ckpt")]  # refused before it is read
    if case == "predict without predict_root":
        code = cli("predict", *config, *files, *ckpt)
    elif case == "test without a test split":
        code = cli("test", *config, *files, *ckpt)
    elif case == "test on a stream without a test split":
        from covid_lightning.data.streaming import optimize

        optimize(demo_root, tmp_path / "no_test", val_fraction=0.25)
        code = cli("test", *config, "--data.streaming", str(tmp_path / "no_test"), *ckpt)
    elif case == "lung_segmenter on a stream":
        code = cli("fit", *config, "--data.streaming", str(stream), *segmenter)
    else:
        code = cli("fit", *config, *files, "--data.cache_images", "disk", *segmenter)
    assert_refused(code, capsys.readouterr().err, REFUSALS[case])
    if case.startswith("lung_segmenter"):  # refused when the DataModule is built: nothing written
        assert not (tmp_path / "runs").exists()
    else:  # refused in the DataModule's setup, before any loop: no metrics, no predictions
        assert not [p for p in (tmp_path / "runs").rglob("*.csv") if p.name != "split.csv"]


def test_the_grid_holds_every_shipped_config():
    """A config added to configs/ joins the grid; run names are unique (the eval tests find runs by name)."""
    assert len(CONFIGS) >= 13 and {kind(c) for c in CONFIGS} == {"classification", "segmentation"}
    assert len({run_name(c) for c in CONFIGS}) == len(CONFIGS)
