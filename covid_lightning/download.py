"""``covid-lightning download [DEST]``: fetch the Kaggle COVID-19 Radiography Database and check its layout.

Where the data lands: kagglehub (>= 0.3.x) downloads straight into an output folder, so the archive is
unpacked into ``DEST`` itself (``DEST/COVID-19_Radiography_Dataset/<Class>/{images,masks}``, plus kagglehub's
``DEST/.complete/`` marker, which makes a second run a no-op). kagglehub only fills an *empty* output folder
(and would wipe a non-empty one with ``force_download``, which is never passed here), so when ``DEST`` already
holds other files the dataset goes to kagglehub's cache (``$KAGGLEHUB_CACHE``, default
``~/.cache/kagglehub``) and ``DEST/COVID-19_Radiography_Dataset`` becomes a symlink to it (a copy where
symlinks are not allowed). Existing files are never deleted or overwritten.

A dataset that is already complete in ``DEST`` is not downloaded again. Without a connection to Kaggle the
command fails within seconds (a TCP probe before kagglehub is called) with the manual steps;
``--verify-only`` checks a folder without any download (how a manual download is checked).

Exit status: 0 the layout matches the expected release, 1 it does not, 2 the download cannot happen.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from covid_lightning.data.scan import CLASSES, DATASET_DIRNAME, DatasetError, find_dataset_root, is_image_file
from covid_lightning.errors import UserError
from covid_lightning.models.weights import NETWORK_TIMEOUT, host_reachable

KAGGLE_HANDLE = "tawsifurrahman/covid19-radiography-database"
DATASET_URL = f"https://www.kaggle.com/datasets/{KAGGLE_HANDLE}"
#: What the probe connects to before kagglehub is called (kagglehub's own API host is reached the same way).
KAGGLE_URL = "https://www.kaggle.com"
DEFAULT_DEST = "data"
PROBE_TIMEOUT = 5.0

#: Images per class of the current release (the one with lung masks: one mask per image).
EXPECTED_COUNTS: dict[str, int] = {"COVID": 3616, "Lung_Opacity": 6012, "Normal": 10192, "Viral Pneumonia": 1345}
EXPECTED_TOTAL = sum(EXPECTED_COUNTS.values())  # 21,165
_EXAMPLES = 3


class DownloadError(UserError, RuntimeError):
    """The dataset cannot be downloaded; the message says why and gives the manual steps."""


# --------------------------------------------------------------------------------------------------
# Layout check (no decoding)
# --------------------------------------------------------------------------------------------------


def _image_names(folder: Path) -> set[str]:
    """Names of the image files directly in ``folder`` (empty when it is not a folder)."""
    if not folder.is_dir():
        return set()
    return {p.name for p in folder.iterdir() if is_image_file(p)}


def _examples(names: set[str]) -> str:
    shown = sorted(names)[:_EXAMPLES]
    return ", ".join(shown) + (", ..." if len(names) > _EXAMPLES else "")


def verify_layout(
    root: str | Path, expected: Mapping[str, int] = EXPECTED_COUNTS, *, check_masks: bool = True
) -> dict[str, Any]:
    """Count the files of each class in ``<Class>/images`` and ``<Class>/masks`` and compare with ``expected``.

    ``root`` is the dataset folder or a folder containing ``COVID-19_Radiography_Dataset/``. Files are only
    listed (``scan.is_image_file``), never decoded. Returns ``{"root": dataset folder or None, "images":
    {class: n}, "masks": {class: n}, "expected": {...}, "total_images", "total_masks", "ok", "problems"}``;
    the problems name missing class/images/masks folders, count mismatches and images without a mask (or
    masks without an image). ``check_masks=False`` skips everything about masks.
    """
    expected = dict(expected)
    report: dict[str, Any] = {
        "root": None,
        "images": dict.fromkeys(CLASSES, 0),
        "masks": dict.fromkeys(CLASSES, 0),
        "expected": expected,
        "total_images": 0,
        "total_masks": 0,
        "ok": False,
        "problems": [],
    }
    problems: list[str] = report["problems"]
    try:
        base = find_dataset_root(root)
    except DatasetError as err:
        problems.append(str(err))
        return report
    report["root"] = str(base)

    for name in CLASSES:
        want = expected.get(name)
        class_dir = base / name
        if not class_dir.is_dir():
            if want:
                problems.append(f"missing class folder {class_dir}")
            continue
        images_dir, masks_dir = class_dir / "images", class_dir / "masks"
        images = _image_names(images_dir)
        if not images_dir.is_dir():
            flat = len(_image_names(class_dir))
            hint = f" ({flat} images directly in {name}/: the older release without masks?)" if flat else ""
            problems.append(f"{name}: missing folder {images_dir}{hint}")
        report["images"][name] = len(images)
        if want is not None and len(images) != want:
            problems.append(f"{name}: {len(images)} images, expected {want} ({len(images) - want:+d})")
        if not check_masks:
            continue
        masks = _image_names(masks_dir)
        report["masks"][name] = len(masks)
        if not masks_dir.is_dir():
            problems.append(f"{name}: missing folder {masks_dir}")
            continue
        if want is not None and len(masks) != want:
            problems.append(f"{name}: {len(masks)} masks, expected {want} ({len(masks) - want:+d})")
        no_mask, no_image = images - masks, masks - images
        if no_mask:
            problems.append(f"{name}: {len(no_mask)} images without a mask in masks/ ({_examples(no_mask)})")
        if no_image:
            problems.append(f"{name}: {len(no_image)} masks without an image in images/ ({_examples(no_image)})")

    report["total_images"] = sum(report["images"].values())
    report["total_masks"] = sum(report["masks"].values())
    report["ok"] = not problems
    return report


def format_report(report: Mapping[str, Any], *, check_masks: bool = True) -> str:
    """The counts table, the verdict and the ``--data.root`` to use."""
    if report["root"] is None:
        return "No dataset found:\n  - " + "\n  - ".join(report["problems"])
    expected = report["expected"]
    lines = [f"COVID-19 Radiography Database at {report['root']}", f"{'class':<17}{'images':>8}"]
    if check_masks:
        lines[-1] += f"{'masks':>8}"
    lines[-1] += f"{'expected':>10}"
    for name in CLASSES:
        row = f"{name:<17}{report['images'][name]:>8}"
        if check_masks:
            row += f"{report['masks'][name]:>8}"
        lines.append(row + f"{expected.get(name, '-'):>10}")
    total = f"{'total':<17}{report['total_images']:>8}"
    if check_masks:
        total += f"{report['total_masks']:>8}"
    lines.append(total + f"{sum(expected.values()):>10}")
    if report["ok"]:
        lines.append("Layout OK.")
    else:
        lines.append(f"The layout differs from the expected release ({len(report['problems'])} problems):")
        lines += [f"  - {p}" for p in report["problems"]]
    lines.append(f"Use: --data.root {data_root_arg(Path(report['root']))}")
    return "\n".join(lines)


def data_root_arg(base: Path) -> str:
    """The exact ``--data.root`` value for a dataset folder: its absolute path (the dataset folder itself)."""
    return str(base.absolute())


# --------------------------------------------------------------------------------------------------
# Download
# --------------------------------------------------------------------------------------------------


def manual_steps(dest: str | Path) -> str:
    """How to get credentials, or to download and check the dataset by hand."""
    dest = str(dest)
    return "\n".join(
        [
            "To download with kagglehub, make sure Kaggle is reachable and, if it asks for them, give credentials "
            "(the dataset is public; kagglehub also tries without):",
            '  * ~/.kaggle/kaggle.json with {"username": ..., "key": ...} (Kaggle > Settings > API > '
            "Create New Token; chmod 600 it),",
            "  * or the environment variables KAGGLE_USERNAME and KAGGLE_KEY (or an API token in KAGGLE_API_TOKEN),",
            '  * or run once: python -c "import kagglehub; kagglehub.login()"',
            f"  then run again: covid-lightning download {dest}",
            "Or download it by hand (here or on another machine, then copy the folder over):",
            f"  1. open {DATASET_URL} (signed in) and click Download (a zip archive);",
            f"  2. unzip it into {dest}:  mkdir -p {dest} && unzip archive.zip -d {dest}",
            f"     so that {os.path.join(dest, DATASET_DIRNAME, 'COVID', 'images')} exists;",
            f"  3. check it:  covid-lightning download {dest} --verify-only",
        ]
    )


def _import_kagglehub(dest: str | Path) -> Any:
    try:
        import kagglehub
    except ImportError as err:
        raise DownloadError(f"kagglehub is not installed ({err}): pip install kagglehub\n{manual_steps(dest)}") from err
    return kagglehub


def _is_kagglehub_output(dest: Path) -> bool:
    """Whether ``dest`` was filled by kagglehub for this dataset (its completion marker folder)."""
    return (dest / ".complete" / "datasets" / KAGGLE_HANDLE).is_dir()


def _explain_kagglehub_error(err: BaseException, read_timeout: float | None = None) -> str:
    """One line saying what a kagglehub failure most likely means."""
    status = getattr(getattr(err, "response", None), "status_code", None)
    name = type(err).__name__
    timed_out = isinstance(err, TimeoutError) or "timeout" in name.lower() or "timed out" in str(err).lower()
    if read_timeout is not None and timed_out:
        return (
            f"Kaggle sent nothing for {read_timeout:g} s: the connection opens but no answer comes back "
            "(a firewall or proxy that swallows traffic?)."
        )
    if status in (401, 403) or name in ("UnauthenticatedError", "CredentialError"):
        return "Kaggle refused the request: sign in with valid credentials (and accept the dataset's terms)."
    if status == 404:  # noqa: PLR2004
        return f"Kaggle does not know {KAGGLE_HANDLE} (or it is not visible to these credentials)."
    if isinstance(err, FileExistsError):
        return "kagglehub refused to write into a non-empty folder; choose an empty DEST."
    if isinstance(err, ValueError) and "credentials" in str(err).lower():
        return "The Kaggle credentials file is invalid."
    text = f"{name} {err}".lower()
    if any(w in text for w in ("connection", "timeout", "timed out", "resolve", "ssl", "proxy", "network")):
        return "The connection to Kaggle failed."
    return "kagglehub failed."


@contextlib.contextmanager
def requests_timeout(timeout: float = NETWORK_TIMEOUT) -> Iterator[None]:
    """Give every ``requests`` call in the ``with`` block that has no timeout a (connect, read) of ``timeout`` s.

    kagglehub sends its Kaggle API calls, the download included, through ``kagglesdk``, which passes no
    timeout to ``requests`` (so a silent peer blocks forever) and offers no setting for one; its own calls
    that do set one are left as they are.
    """
    from requests.adapters import HTTPAdapter

    original = HTTPAdapter.send

    def send(self: HTTPAdapter, request: Any, *args: Any, **kwargs: Any) -> Any:
        if len(args) < 2 and kwargs.get("timeout") is None:  # send(request, stream, timeout, ...)
            kwargs["timeout"] = (timeout, timeout)
        return original(self, request, *args, **kwargs)

    HTTPAdapter.send = send  # type: ignore[method-assign]
    try:
        yield
    finally:
        HTTPAdapter.send = original  # type: ignore[method-assign]


def _link_into(dest: Path, downloaded: Path) -> Path:
    """Make ``dest/COVID-19_Radiography_Dataset`` point at the downloaded dataset (symlink, else a copy)."""
    source = downloaded / DATASET_DIRNAME if (downloaded / DATASET_DIRNAME).is_dir() else downloaded
    target = dest / DATASET_DIRNAME
    if target.is_symlink() and target.resolve() == source.resolve():
        return target
    if target.exists() or target.is_symlink():
        raise DownloadError(
            f"The dataset was downloaded to {source}, but {target} already exists and is left alone. Use "
            f"--data.root {data_root_arg(source)}, or move {target} away and run this command again."
        )
    dest.mkdir(parents=True, exist_ok=True)
    try:
        target.symlink_to(source.absolute(), target_is_directory=True)
    except OSError:
        shutil.copytree(source, target)
    return target


def download(
    dest: str | Path = DEFAULT_DEST, *, probe_timeout: float = PROBE_TIMEOUT, read_timeout: float = NETWORK_TIMEOUT
) -> Path:
    """Download the dataset with kagglehub so that ``dest/COVID-19_Radiography_Dataset`` exists; return ``dest``.

    Empty (or absent, or earlier kagglehub-filled) ``dest``: kagglehub's ``output_dir=dest``. Any other
    ``dest``: kagglehub's cache, then a symlink (or copy) at ``dest/COVID-19_Radiography_Dataset``.
    Raises :class:`DownloadError` (with the manual steps) when Kaggle cannot be reached within
    ``probe_timeout`` seconds, when it sends nothing for ``read_timeout`` seconds, or when kagglehub fails.
    """
    dest = Path(dest).expanduser()
    if dest.exists() and not dest.is_dir():
        raise DownloadError(f"{dest} is a file, not a folder.\n{manual_steps(dest)}")
    kagglehub = _import_kagglehub(dest)
    ok, target = host_reachable(KAGGLE_URL, probe_timeout)
    if not ok:
        raise DownloadError(
            f"Cannot download the COVID-19 Radiography Database ({DATASET_URL}): no connection to {target}.\n"
            f"{manual_steps(dest)}"
        )
    direct = not dest.exists() or not any(dest.iterdir()) or _is_kagglehub_output(dest)
    where = f"into {dest}" if direct else "into kagglehub's cache (DEST is not empty), then linking it"
    print(f"Downloading {KAGGLE_HANDLE} {where} ...", flush=True)
    try:
        with requests_timeout(read_timeout):
            if direct:
                path = kagglehub.dataset_download(KAGGLE_HANDLE, output_dir=str(dest))
            else:
                path = kagglehub.dataset_download(KAGGLE_HANDLE)
    except Exception as err:  # kagglehub raises requests, auth, HTTP, OS and value errors
        raise DownloadError(
            f"kagglehub could not download {KAGGLE_HANDLE}: {type(err).__name__}: {err}\n"
            f"{_explain_kagglehub_error(err, read_timeout)}\n{manual_steps(dest)}"
        ) from err
    if not direct:
        _link_into(dest, Path(path))
    return dest


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """``covid-lightning download [DEST] [--verify-only] [--no-masks] [--timeout S]``.

    Exit status: 0 the layout matches, 1 it does not (the differences are printed), 2 no download possible.
    """
    parser = argparse.ArgumentParser(
        prog="covid-lightning download",
        description=f"Download the Kaggle COVID-19 Radiography Database ({KAGGLE_HANDLE}) with kagglehub into "
        f"DEST, check its layout and counts ({EXPECTED_TOTAL:,} images + masks) and print the --data.root to use.",
    )
    parser.add_argument(
        "dest", nargs="?", default=DEFAULT_DEST, help=f"where {DATASET_DIRNAME}/ goes (default: ./{DEFAULT_DEST})"
    )
    parser.add_argument(
        "--verify-only", action="store_true", help="no download: only check DEST (e.g. after a manual download)"
    )
    parser.add_argument("--no-masks", action="store_true", help="do not check the masks/ folders")
    parser.add_argument(
        "--timeout", type=float, default=PROBE_TIMEOUT, help="seconds to wait for a connection to Kaggle"
    )
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    check_masks = not args.no_masks

    report = verify_layout(args.dest, EXPECTED_COUNTS, check_masks=check_masks)
    if not args.verify_only:
        if report["ok"]:
            print(f"Already downloaded: {report['root']}")
        else:
            try:
                download(args.dest, probe_timeout=args.timeout)
            except DownloadError as err:
                print(f"download: {err}", file=sys.stderr)
                return 2
            report = verify_layout(args.dest, EXPECTED_COUNTS, check_masks=check_masks)
    print(format_report(report, check_masks=check_masks))
    if report["root"] is None:
        print(manual_steps(args.dest), file=sys.stderr)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
