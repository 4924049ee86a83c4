"""``covid-lightning download``: the layout check on local fakes, exit codes, and the offline failure.

No test touches the network: the download itself is replaced by a fake that writes a layout.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from covid_lightning import download as dl
from covid_lightning.cli import main
from covid_lightning.data.scan import CLASSES, DATASET_DIRNAME
from tests.helpers.silent_server import SilentServer

SMALL = {"COVID": 3, "Lung_Opacity": 4, "Normal": 5, "Viral Pneumonia": 2}


def make_fake(parent: Path, counts: dict[str, int], *, masks: bool = True) -> Path:
    """Empty ``.png`` files in the Kaggle layout under ``parent/COVID-19_Radiography_Dataset``; returns it."""
    base = parent / DATASET_DIRNAME
    for name, n in counts.items():
        for sub in ("images", "masks") if masks else ("images",):
            folder = base / name / sub
            folder.mkdir(parents=True)
            for i in range(1, n + 1):
                os.close(os.open(folder / f"{name}-{i}.png", os.O_CREAT | os.O_WRONLY, 0o644))
    (base / "COVID.metadata.xlsx").write_bytes(b"")  # non-image files of the release are ignored
    (base / "README.md.txt").write_text("readme")
    (base / "COVID" / "images" / ".DS_Store").write_bytes(b"")
    return base


@pytest.fixture(scope="module")
def full_fake(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real counts (21,165 images + 21,165 masks, empty files): the folder holding the dataset."""
    parent = tmp_path_factory.mktemp("full")
    make_fake(parent, dl.EXPECTED_COUNTS)
    return parent


@pytest.fixture
def small(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Make the command expect the small counts."""
    monkeypatch.setattr(dl, "EXPECTED_COUNTS", dict(SMALL))
    return SMALL


@pytest.fixture
def no_download(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if the probe or kagglehub is called."""

    def boom(*args: object, **kwargs: object) -> None:
        raise AssertionError("no network call expected")

    monkeypatch.setattr(dl, "host_reachable", boom)
    import kagglehub

    monkeypatch.setattr(kagglehub, "dataset_download", boom)


def test_expected_counts_total() -> None:
    assert dl.EXPECTED_TOTAL == 21165
    assert tuple(dl.EXPECTED_COUNTS) == CLASSES


# ---------------------------------------------------------------------------------------------- layout


def test_verify_small_fake_both_roots(tmp_path: Path) -> None:
    base = make_fake(tmp_path, SMALL)
    for root in (tmp_path, base):
        report = dl.verify_layout(root, SMALL)
        assert report["ok"], report["problems"]
        assert report["root"] == str(base)
        assert report["images"] == SMALL and report["masks"] == SMALL
        assert report["total_images"] == report["total_masks"] == 14


def test_verify_real_counts(full_fake: Path) -> None:
    start = time.perf_counter()
    report = dl.verify_layout(full_fake)
    assert time.perf_counter() - start < 10
    assert report["ok"], report["problems"]
    assert report["images"] == dl.EXPECTED_COUNTS == report["masks"]
    assert report["total_images"] == report["total_masks"] == 21165


def test_verify_missing_class(tmp_path: Path) -> None:
    make_fake(tmp_path, {k: v for k, v in SMALL.items() if k != "Viral Pneumonia"})
    report = dl.verify_layout(tmp_path, SMALL)
    assert not report["ok"]
    assert any("missing class folder" in p and "Viral Pneumonia" in p for p in report["problems"])


def test_verify_count_off_by_one(tmp_path: Path) -> None:
    make_fake(tmp_path, {**SMALL, "Normal": 6})
    report = dl.verify_layout(tmp_path, SMALL)
    assert not report["ok"]
    assert report["images"]["Normal"] == 6
    assert "Normal: 6 images, expected 5 (+1)" in report["problems"]
    assert "Normal: 6 masks, expected 5 (+1)" in report["problems"]
    assert len(report["problems"]) == 2  # images and masks still pair up


def test_verify_images_vs_masks(tmp_path: Path) -> None:
    base = make_fake(tmp_path, SMALL)
    (base / "COVID" / "masks" / "COVID-2.png").unlink()
    (base / "Normal" / "masks" / "Normal-1.png").rename(base / "Normal" / "masks" / "Normal-99.png")
    report = dl.verify_layout(tmp_path, SMALL)
    assert not report["ok"]
    problems = "\n".join(report["problems"])
    assert "COVID: 2 masks, expected 3 (-1)" in problems
    assert "COVID: 1 images without a mask in masks/ (COVID-2.png)" in problems
    assert "Normal: 1 images without a mask in masks/ (Normal-1.png)" in problems
    assert "Normal: 1 masks without an image in images/ (Normal-99.png)" in problems
    assert "Normal: 5 masks" not in problems  # same count, only the names differ


def test_verify_missing_masks_and_flat_release(tmp_path: Path) -> None:
    base = make_fake(tmp_path, SMALL, masks=False)
    report = dl.verify_layout(tmp_path, SMALL)
    assert not report["ok"]
    assert sum("missing folder" in p and p.endswith("masks") for p in report["problems"]) == 4
    assert dl.verify_layout(tmp_path, SMALL, check_masks=False)["ok"]

    (base / "COVID" / "images").rename(base / "COVID" / "flat")
    for p in (base / "COVID" / "flat").iterdir():
        p.rename(base / "COVID" / p.name)
    problems = "\n".join(dl.verify_layout(tmp_path, SMALL, check_masks=False)["problems"])
    assert "3 images directly in COVID/" in problems and "COVID: 0 images, expected 3" in problems


def test_verify_no_dataset(tmp_path: Path) -> None:
    report = dl.verify_layout(tmp_path / "nowhere", SMALL)
    assert not report["ok"] and report["root"] is None and "does not exist" in report["problems"][0]


# ------------------------------------------------------------------------------------------ verify-only


def test_verify_only_real_counts_prints_data_root(
    full_fake: Path, no_download: None, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["download", "--dest", str(full_fake), "--verify_only", "true"]) == 0
    out = capsys.readouterr().out
    assert "Layout OK." in out
    assert f"Use: --data.root {full_fake.absolute() / DATASET_DIRNAME}" in out
    assert "21165" in out


def test_verify_only_dataset_folder_itself(
    tmp_path: Path, small: dict[str, int], no_download: None, capsys: pytest.CaptureFixture[str]
) -> None:
    base = make_fake(tmp_path, SMALL)
    assert main(["download", "--dest", str(base), "--verify_only", "true"]) == 0
    assert f"Use: --data.root {base.absolute()}" in capsys.readouterr().out


def test_verify_only_mismatch_exit_1(
    tmp_path: Path, small: dict[str, int], no_download: None, capsys: pytest.CaptureFixture[str]
) -> None:
    make_fake(tmp_path, {**SMALL, "COVID": 2})
    assert main(["download", "--dest", str(tmp_path), "--verify_only", "true"]) == 1
    out = capsys.readouterr().out
    assert "The layout differs" in out and "COVID: 2 images, expected 3 (-1)" in out


def test_verify_only_nothing_there_exit_1(
    tmp_path: Path, no_download: None, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["download", "--dest", str(tmp_path / "data"), "--verify_only", "true"]) == 1
    captured = capsys.readouterr()
    assert "No dataset found" in captured.out and dl.DATASET_URL in captured.err


# --------------------------------------------------------------------------------------------- download


def _check_manual_steps(message: str, dest: Path) -> None:
    for needle in (
        dl.DATASET_URL,
        "~/.kaggle/kaggle.json",
        "KAGGLE_USERNAME",
        "KAGGLE_KEY",
        "kagglehub.login()",
        f"unzip archive.zip -d {dest}",
        str(dest / DATASET_DIRNAME / "COVID" / "images"),
        f"covid-lightning download --dest {dest} --verify_only true",
    ):
        assert needle in message, needle


def test_offline_fails_fast_with_manual_steps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import kagglehub

    calls: list[tuple[str, float]] = []

    def unreachable(url: str, timeout: float) -> tuple[bool, str]:
        calls.append((url, timeout))
        return False, "www.kaggle.com:443 (no connection within 5 s)"

    def never(*args: object, **kwargs: object) -> str:
        raise AssertionError("kagglehub must not be called when Kaggle is unreachable")

    monkeypatch.setattr(dl, "host_reachable", unreachable)
    monkeypatch.setattr(kagglehub, "dataset_download", never)
    dest = tmp_path / "data"
    start = time.perf_counter()
    assert main(["download", "--dest", str(dest)]) == 2
    assert time.perf_counter() - start < 15
    assert calls == [("https://www.kaggle.com", 5.0)]
    err = capsys.readouterr().err
    assert "no connection to www.kaggle.com:443" in err
    _check_manual_steps(err, dest)
    assert not dest.exists()


def test_offline_real_probe_is_fast(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The real probe against a closed local port (or a proxy), then kagglehub failing: exit 2 in seconds."""
    import kagglehub

    def fail(*args: object, **kwargs: object) -> str:
        raise ConnectionError("no network in tests")

    monkeypatch.setattr(dl, "KAGGLE_URL", "https://127.0.0.1:9")
    monkeypatch.setattr(kagglehub, "dataset_download", fail)
    start = time.perf_counter()
    assert main(["download", "--dest", str(tmp_path / "data"), "--timeout", "2"]) == 2
    assert time.perf_counter() - start < 15
    _check_manual_steps(capsys.readouterr().err, tmp_path / "data")


def test_silent_kaggle_fails_with_manual_steps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Kaggle accepts TCP but never answers: the real kagglehub call times out and the manual steps follow."""
    from kagglesdk import kaggle_env

    for var in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    for var in ("KAGGLE_USERNAME", "KAGGLE_KEY", "KAGGLE_API_TOKEN", "KAGGLE_KERNEL_RUN_TYPE", "TBE_RUNTIME_ADDR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(tmp_path / "no_credentials"))
    monkeypatch.setenv("KAGGLEHUB_CACHE", str(tmp_path / "kagglehub_cache"))
    dest = tmp_path / "data"
    with SilentServer() as server:
        # kagglehub's API calls go through kagglesdk, whose host is picked by KAGGLE_API_ENVIRONMENT
        monkeypatch.setenv("KAGGLE_API_ENVIRONMENT", "TEST")
        monkeypatch.setitem(kaggle_env._env_to_endpoint, kaggle_env.KaggleEnv.TEST, server.url)
        monkeypatch.setattr(dl, "KAGGLE_URL", server.url)
        start = time.perf_counter()
        with pytest.raises(dl.DownloadError) as err:
            dl.fetch(dest, probe_timeout=2.0, read_timeout=2.0)
        elapsed = time.perf_counter() - start
        assert server.connections, "kagglehub never reached the silent server"
    assert elapsed < 30, elapsed
    msg = str(err.value)
    assert "Kaggle sent nothing for 2 s" in msg
    _check_manual_steps(msg, dest)


class _Response:
    status_code = 401
    url = "https://api.kaggle.com/..."


@pytest.mark.parametrize(
    ("error", "explanation"),
    [
        ("unauthenticated", "Kaggle refused the request"),
        ("http401", "Kaggle refused the request"),
        ("connection", "The connection to Kaggle failed."),
    ],
)
def test_kagglehub_errors_are_wrapped(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    error: str,
    explanation: str,
) -> None:
    import kagglehub
    import requests
    from kagglehub.exceptions import KaggleApiHTTPError, UnauthenticatedError

    exc = {
        "unauthenticated": UnauthenticatedError(),
        "http401": KaggleApiHTTPError("401 Client Error.", response=_Response()),  # type: ignore[arg-type]
        "connection": requests.ConnectionError("Max retries exceeded"),
    }[error]

    def raise_it(*args: object, **kwargs: object) -> str:
        raise exc

    monkeypatch.setattr(dl, "host_reachable", lambda url, timeout: (True, "www.kaggle.com:443"))
    monkeypatch.setattr(kagglehub, "dataset_download", raise_it)
    dest = tmp_path / "data"
    assert main(["download", "--dest", str(dest)]) == 2
    err = capsys.readouterr().err
    assert f"kagglehub could not download {dl.KAGGLE_HANDLE}: {type(exc).__name__}" in err
    assert explanation in err
    _check_manual_steps(err, dest)


def test_download_into_empty_dest(
    tmp_path: Path, small: dict[str, int], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import kagglehub

    seen: dict[str, object] = {}

    def fake_download(handle: str, path: str | None = None, **kwargs: object) -> str:
        seen.update(handle=handle, path=path, **kwargs)
        out = Path(str(kwargs["output_dir"]))
        make_fake(out, SMALL)
        return str(out)

    monkeypatch.setattr(dl, "host_reachable", lambda url, timeout: (True, "www.kaggle.com:443"))
    monkeypatch.setattr(kagglehub, "dataset_download", fake_download)
    dest = tmp_path / "data"
    assert main(["download", "--dest", str(dest)]) == 0
    assert seen == {"handle": dl.KAGGLE_HANDLE, "path": None, "output_dir": str(dest)}
    out = capsys.readouterr().out
    assert "Layout OK." in out and f"Use: --data.root {dest.absolute() / DATASET_DIRNAME}" in out


def test_download_non_empty_dest_links_from_cache(
    tmp_path: Path, small: dict[str, int], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import kagglehub

    cache = tmp_path / "cache" / "versions" / "5"

    def fake_download(handle: str, path: str | None = None, **kwargs: object) -> str:
        assert "output_dir" not in kwargs  # never into (let alone force-clearing) a non-empty folder
        make_fake(cache, SMALL)
        return str(cache)

    monkeypatch.setattr(dl, "host_reachable", lambda url, timeout: (True, "www.kaggle.com:443"))
    monkeypatch.setattr(kagglehub, "dataset_download", fake_download)
    dest = tmp_path / "data"
    dest.mkdir()
    (dest / "notes.txt").write_text("keep me")
    assert main(["download", "--dest", str(dest)]) == 0
    assert (dest / "notes.txt").read_text() == "keep me"
    linked = dest / DATASET_DIRNAME
    assert linked.is_symlink() and linked.resolve() == (cache / DATASET_DIRNAME).resolve()
    assert f"Use: --data.root {linked.absolute()}" in capsys.readouterr().out


def test_already_downloaded_needs_no_network(
    tmp_path: Path, small: dict[str, int], no_download: None, capsys: pytest.CaptureFixture[str]
) -> None:
    make_fake(tmp_path, SMALL)
    assert main(["download", "--dest", str(tmp_path)]) == 0
    assert "Already downloaded" in capsys.readouterr().out


def test_download_then_mismatch_exit_1(
    tmp_path: Path, small: dict[str, int], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import kagglehub

    def fake_download(handle: str, path: str | None = None, **kwargs: object) -> str:
        make_fake(Path(str(kwargs["output_dir"])), {**SMALL, "Lung_Opacity": 3})
        return str(kwargs["output_dir"])

    monkeypatch.setattr(dl, "host_reachable", lambda url, timeout: (True, "www.kaggle.com:443"))
    monkeypatch.setattr(kagglehub, "dataset_download", fake_download)
    assert main(["download", "--dest", str(tmp_path / "data")]) == 1
    assert "Lung_Opacity: 3 images, expected 4 (-1)" in capsys.readouterr().out
