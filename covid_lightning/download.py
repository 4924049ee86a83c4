"""``covid-lightning download``: the Kaggle COVID-19 Radiography Database through kagglehub, its layout checked."""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from unittest import mock

from jsonargparse.typing import PositiveFloat

from covid_lightning.data.scan import CLASSES, DATASET_DIRNAME, DatasetError, find_dataset_root, is_image_file
from covid_lightning.errors import UserError
from covid_lightning.models.weights import NETWORK_TIMEOUT, host_reachable

KAGGLE_HANDLE = "tawsifurrahman/covid19-radiography-database"
DATASET_URL = f"https://www.kaggle.com/datasets/{KAGGLE_HANDLE}"
#: what the probe connects to before kagglehub is called
KAGGLE_URL = "https://www.kaggle.com"
PROBE_TIMEOUT = 5.0
#: images per class of the current release (the one with lung masks: one mask per image)
EXPECTED_COUNTS: dict[str, int] = {"COVID": 3616, "Lung_Opacity": 6012, "Normal": 10192, "Viral Pneumonia": 1345}
EXPECTED_TOTAL = sum(EXPECTED_COUNTS.values())


class DownloadError(UserError, RuntimeError):
    """The dataset cannot be downloaded; the message says why and gives the manual steps."""


def _names(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir() if is_image_file(p)} if folder.is_dir() else set()


def _examples(names: set[str]) -> str:
    return ", ".join(sorted(names)[:3]) + (", ..." if len(names) > 3 else "")


def verify_layout(
    root: str | Path, expected: Mapping[str, int] = EXPECTED_COUNTS, *, check_masks: bool = True
) -> dict[str, Any]:
    """Count the files of the dataset at (or in) ``root``, compare with ``expected`` and name the problems."""
    report: dict[str, Any] = {"root": None, "images": dict.fromkeys(CLASSES, 0), "masks": dict.fromkeys(CLASSES, 0)}
    report.update(expected=dict(expected), total_images=0, total_masks=0, ok=False, problems=[])
    problems: list[str] = report["problems"]
    try:
        base = find_dataset_root(root)
    except DatasetError as err:
        problems.append(str(err))
        return report
    report["root"] = str(base)
    for name in CLASSES:
        want, folder = expected.get(name), base / name
        if not folder.is_dir():
            if want:
                problems.append(f"missing class folder {folder}")
            continue
        images = _names(folder / "images")
        if not (folder / "images").is_dir():
            flat = len(_names(folder))
            hint = f" ({flat} images directly in {name}/: the older release without masks?)" if flat else ""
            problems.append(f"{name}: missing folder {folder / 'images'}{hint}")
        kinds = {"images": images}
        if check_masks and (folder / "masks").is_dir():
            kinds["masks"] = masks = _names(folder / "masks")
            lonely = {
                "images without a mask in masks/": images - masks,
                "masks without an image in images/": masks - images,
            }
        elif check_masks:
            problems.append(f"{name}: missing folder {folder / 'masks'}")
        for kind, names in kinds.items():
            report[kind][name] = len(names)
            if want is not None and len(names) != want:
                problems.append(f"{name}: {len(names)} {kind}, expected {want} ({len(names) - want:+d})")
        if "masks" in kinds:
            problems += [f"{name}: {len(v)} {what} ({_examples(v)})" for what, v in lonely.items() if v]
    report["total_images"], report["total_masks"] = sum(report["images"].values()), sum(report["masks"].values())
    report["ok"] = not problems
    return report


def format_report(report: Mapping[str, Any], *, check_masks: bool = True) -> str:
    """The counts table, the verdict and the ``--data.root`` to use."""
    if report["root"] is None:
        return "No dataset found:\n  - " + "\n  - ".join(report["problems"])
    expected = report["expected"]

    def row(name: Any, images: Any, masks: Any, want: Any) -> str:
        return f"{name:<17}{images:>8}" + (f"{masks:>8}" if check_masks else "") + f"{want:>10}"

    lines = [f"COVID-19 Radiography Database at {report['root']}", row("class", "images", "masks", "expected")]
    lines += [row(n, report["images"][n], report["masks"][n], expected.get(n, "-")) for n in CLASSES]
    lines.append(row("total", report["total_images"], report["total_masks"], sum(expected.values())))
    if report["ok"]:
        lines.append("Layout OK.")
    else:
        lines.append(f"The layout differs from the expected release ({len(report['problems'])} problems):")
        lines += [f"  - {p}" for p in report["problems"]]
    lines.append(f"Use: --data.root {Path(report['root']).absolute()}")
    return "\n".join(lines)


def manual_steps(dest: str | Path) -> str:
    """How to give kagglehub credentials, or to download and check the dataset by hand."""
    return f"""To download with kagglehub, make sure Kaggle is reachable and, if it asks for them, give credentials \
(the dataset is public; kagglehub also tries without):
  * ~/.kaggle/kaggle.json with {{"username": ..., "key": ...}} (Kaggle > Settings > API > Create New Token; chmod 600 \
it),
  * or the environment variables KAGGLE_USERNAME and KAGGLE_KEY (or an API token in KAGGLE_API_TOKEN),
  * or run once: python -c "import kagglehub; kagglehub.login()"
  then run again: covid-lightning download --dest {dest}
Or download it by hand (here or on another machine, then copy the folder over):
  1. open {DATASET_URL} (signed in) and click Download (a zip archive);
  2. unzip it into {dest}:  mkdir -p {dest} && unzip archive.zip -d {dest}
     so that {os.path.join(dest, DATASET_DIRNAME, "COVID", "images")} exists;
  3. check it:  covid-lightning download --dest {dest} --verify_only true"""


def _explain(err: BaseException, read_timeout: float) -> str:
    """One line saying what a kagglehub failure most likely means."""
    status = getattr(getattr(err, "response", None), "status_code", None)
    text = f"{type(err).__name__} {err}".lower()
    if isinstance(err, TimeoutError) or "timeout" in text or "timed out" in text:
        return (
            f"Kaggle sent nothing for {read_timeout:g} s: the connection opens but no answer comes back "
            "(a firewall or proxy that swallows traffic?)."
        )
    if status in (401, 403) or type(err).__name__ in ("UnauthenticatedError", "CredentialError"):
        return "Kaggle refused the request: sign in with valid credentials (and accept the dataset's terms)."
    if status == 404:
        return f"Kaggle does not know {KAGGLE_HANDLE} (or it is not visible to these credentials)."
    if any(w in text for w in ("connection", "resolve", "ssl", "proxy", "network")):
        return "The connection to Kaggle failed."
    return "kagglehub failed."


def fetch(dest: str | Path, *, probe_timeout: float = PROBE_TIMEOUT, read_timeout: float = NETWORK_TIMEOUT) -> Path:
    """Download the dataset into ``dest``, or raise :class:`DownloadError` with the manual steps."""
    dest = Path(dest).expanduser()
    if dest.exists() and not dest.is_dir():
        raise DownloadError(f"{dest} is a file, not a folder.\n{manual_steps(dest)}")
    try:
        import kagglehub
    except ImportError as err:
        raise DownloadError(f"kagglehub is not installed ({err}): pip install kagglehub\n{manual_steps(dest)}") from err
    ok, target = host_reachable(KAGGLE_URL, probe_timeout)
    if not ok:
        raise DownloadError(
            f"Cannot download the COVID-19 Radiography Database ({DATASET_URL}): no connection to {target}.\n"
            f"{manual_steps(dest)}"
        )
    kagglehub_output = (dest / ".complete" / "datasets" / KAGGLE_HANDLE).is_dir()
    direct = not dest.exists() or not any(dest.iterdir()) or kagglehub_output  # kagglehub fills empty folders only
    where = f"into {dest}" if direct else "into kagglehub's cache (DEST is not empty), then linking it"
    print(f"Downloading {KAGGLE_HANDLE} {where} ...", flush=True)
    from requests.adapters import HTTPAdapter

    send = HTTPAdapter.send

    def send_with_timeout(self: HTTPAdapter, request: Any, *args: Any, **kwargs: Any) -> Any:
        if len(args) < 2 and kwargs.get("timeout") is None:  # kagglesdk passes none: a silent peer would block forever
            kwargs["timeout"] = (read_timeout, read_timeout)
        return send(self, request, *args, **kwargs)

    try:
        with mock.patch.object(HTTPAdapter, "send", send_with_timeout):
            path = Path(kagglehub.dataset_download(KAGGLE_HANDLE, **({"output_dir": str(dest)} if direct else {})))
    except Exception as err:  # kagglehub raises requests, auth, HTTP, OS and value errors
        raise DownloadError(
            f"kagglehub could not download {KAGGLE_HANDLE}: {type(err).__name__}: {err}\n"
            f"{_explain(err, read_timeout)}\n{manual_steps(dest)}"
        ) from err
    source, target = (path / DATASET_DIRNAME if (path / DATASET_DIRNAME).is_dir() else path), dest / DATASET_DIRNAME
    if direct or (target.is_symlink() and target.resolve() == source.resolve()):
        return dest
    if target.exists() or target.is_symlink():
        raise DownloadError(
            f"The dataset was downloaded to {source}, but {target} already exists and is left alone. Use "
            f"--data.root {source.absolute()}, or move {target} away and run this command again."
        )
    try:
        target.symlink_to(source.absolute(), target_is_directory=True)
    except OSError:
        shutil.copytree(source, target)
    return dest


def download(
    dest: Path = Path("data"), verify_only: bool = False, masks: bool = True, timeout: PositiveFloat = PROBE_TIMEOUT
) -> int:
    """Download the Kaggle dataset into DEST, check its layout, print the --data.root to use (exit 1/2: mismatch/none).

    Args:
        dest: where COVID-19_Radiography_Dataset/ goes.
        verify_only: no download: only check DEST (e.g. after a manual download).
        masks: also check the masks/ folders.
        timeout: seconds to wait for a connection to Kaggle.
    """
    report = verify_layout(dest, EXPECTED_COUNTS, check_masks=masks)
    if not verify_only and report["ok"]:
        print(f"Already downloaded: {report['root']}")
    elif not verify_only:
        fetch(dest, probe_timeout=timeout)
        report = verify_layout(dest, EXPECTED_COUNTS, check_masks=masks)
    print(format_report(report, check_masks=masks))
    if report["root"] is None:
        print(manual_steps(dest), file=sys.stderr)
    return 0 if report["ok"] else 1
