"""Getting pretrained weights into a model without ever falling back to random weights silently.

Entry point: :func:`create_timm_model`. Weights come either from a local file (``pretrained_file``:
``.safetensors``/``.pth``/``.pt``/``.bin``/``.ckpt`` state dicts or a legacy Keras ``.h5``) or, with
``pretrained=True``, from the Hugging Face hub the standard timm way, failing fast and with instructions
when the hub cannot be reached and the weights are not in the local HF cache.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import logging
import os
import re
import socket
import tempfile
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from covid_lightning.errors import UserError


class PretrainedWeightsError(UserError, RuntimeError):
    """Pretrained weights were asked for but cannot be had; the message says how to supply a file."""


#: Seconds any download (hub, Keras ``.h5``, Kaggle) waits to connect, or for the next bytes, before it gives up.
NETWORK_TIMEOUT = 20.0

_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "module", "state_dict_ema")
_STRIP_PREFIXES = ("module.", "model.", "backbone.", "encoder.", "net.", "_orig_mod.")
_TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
_MAX_LISTED = 10
_log = logging.getLogger(__name__)


def _is_tensor_dict(obj: object) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors`` or ``.pth``/``.pt``/``.bin`` (weights-only unpickling).

    A ``state_dict`` (or ``model_state_dict``/``model``/``module``/``state_dict_ema``) wrapper is unwrapped.
    """
    path = Path(path)
    if not path.is_file():
        raise PretrainedWeightsError(f"Weights file {path} does not exist.")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as err:
            raise PretrainedWeightsError(f"{path} is not a readable safetensors file: {err}") from err
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # UnpicklingError, RuntimeError for zip errors, ...
        raise PretrainedWeightsError(
            f"{path} could not be read as a weights-only torch state dict: {err}. Save only the state dict, "
            "e.g. `torch.save(model.state_dict(), path)` or `safetensors.torch.save_file(model.state_dict(), "
            "path)`."
        ) from err
    if isinstance(obj, dict) and not _is_tensor_dict(obj):
        for key in _WRAPPER_KEYS:
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict):
        raise PretrainedWeightsError(f"{path} does not hold a state dict (found {type(obj).__name__}).")
    return obj


# --------------------------------------------------------------------------------------------------
# Loading a file into a model
# --------------------------------------------------------------------------------------------------


def head_keys(model: nn.Module) -> set[str]:
    """State-dict keys of ``model``'s classifier head (timm ``pretrained_cfg['classifier']`` /
    ``get_classifier()``); empty for a model built with ``num_classes=0`` or without a known head."""
    names: set[str] = set()
    cfg = getattr(model, "pretrained_cfg", None) or {}
    classifier = cfg.get("classifier") if isinstance(cfg, dict) else None
    if isinstance(classifier, str):
        names.add(classifier)
    elif isinstance(classifier, (tuple, list)):
        names.update(c for c in classifier if isinstance(c, str))
    get_classifier = getattr(model, "get_classifier", None)
    if callable(get_classifier):
        try:
            head = get_classifier()
        except Exception:  # noqa: BLE001 - a model without a usable get_classifier has no known head
            head = None
        if isinstance(head, nn.Module):
            names.update(n for n, m in model.named_modules() if m is head and n)
    return {k for k in model.state_dict() if any(k.startswith(n + ".") for n in names)}


@dataclass
class LoadReport:
    """What :func:`load_backbone_weights` did."""

    path: str
    loaded: list[str] = field(default_factory=list)
    missing_head: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    adapted: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return (
            f"{self.path}: loaded {len(self.loaded)} tensors, head keys not loaded: "
            f"{self.missing_head or 'none'}, {len(self.unexpected)} extra keys in the file ignored"
            + (f", input conv adapted: {self.adapted}" if self.adapted else "")
        )


def _strip_prefixes(sd: dict[str, torch.Tensor], model_keys: set[str]) -> dict[str, torch.Tensor]:
    """Strip common wrapper prefixes (``module.``, ``model.``, ``backbone.``, ...) while that matches more
    model keys; keys without the prefix are kept as they are."""

    def overlap(d: dict[str, torch.Tensor]) -> int:
        return sum(k in model_keys for k in d)

    best, best_overlap = sd, overlap(sd)
    for _ in range(4):
        candidates = [
            {(k[len(p) :] if k.startswith(p) else k): v for k, v in best.items()}
            for p in _STRIP_PREFIXES
            if any(k.startswith(p) for k in best)
        ]
        scored = [(overlap(c), c) for c in candidates]
        if not scored:
            break
        top_overlap, top = max(scored, key=lambda t: t[0])
        if top_overlap <= best_overlap:
            break
        best, best_overlap = top, top_overlap
    return best


def _listing(keys: list[str]) -> str:
    shown = ", ".join(keys[:_MAX_LISTED])
    return shown + (f" ... and {len(keys) - _MAX_LISTED} more" if len(keys) > _MAX_LISTED else "")


def _first_conv_keys(model: nn.Module) -> set[str]:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    first = cfg.get("first_conv") if isinstance(cfg, dict) else None
    if isinstance(first, str):
        first = (first,)
    return {f"{name}.weight" for name in (first or ())}


def load_backbone_weights(model: nn.Module, path: str | Path) -> LoadReport:
    """Load every backbone tensor of ``model`` from ``path`` or raise :class:`PretrainedWeightsError`.

    ``.h5`` files go through :func:`keras_h5_to_timm_state_dict`; others through
    :func:`load_state_dict_file` with common prefixes stripped. Head (classifier) keys may be missing or
    differ in shape (they are reported, not loaded); ``num_batches_tracked`` may be missing; extra keys
    in the file are ignored and reported; a 3-channel first conv is adapted to ``in_chans`` like timm does.
    """
    path = Path(path)
    model_sd = model.state_dict()
    if path.suffix.lower() in (".h5", ".hdf5"):
        from covid_lightning.models.keras_h5 import keras_h5_to_timm_state_dict

        sd = keras_h5_to_timm_state_dict(path, model)
    elif path.suffix in (".safetensors", *_TORCH_SUFFIXES):
        sd = _strip_prefixes(load_state_dict_file(path), set(model_sd))
    else:
        raise PretrainedWeightsError(
            f"{path}: unsupported weights file type '{path.suffix}' (use .safetensors, .pth, .pt, .bin, "
            ".ckpt or a legacy Keras .h5/.hdf5)."
        )

    heads = head_keys(model)
    first_convs = _first_conv_keys(model)
    report = LoadReport(path=str(path))
    to_load: dict[str, torch.Tensor] = {}
    missing: list[str] = []
    mismatched: list[str] = []
    for key, target in model_sd.items():
        if key not in sd:
            if key in heads:
                report.missing_head.append(key)
            elif not key.endswith("num_batches_tracked"):
                missing.append(key)
            continue
        value = sd[key]
        if not isinstance(value, torch.Tensor):
            mismatched.append(f"{key}: file holds a {type(value).__name__}, not a tensor")
            continue
        if value.shape != target.shape:
            if key in heads:
                report.missing_head.append(key)
                continue
            if key in first_convs and value.ndim == 4 and value.shape[0] == target.shape[0]:
                from timm.models import adapt_input_conv

                try:
                    value = adapt_input_conv(target.shape[1], value)
                    report.adapted.append(key)
                except NotImplementedError:
                    pass
            if value.shape != target.shape:
                mismatched.append(f"{key}: file {tuple(sd[key].shape)} vs model {tuple(target.shape)}")
                continue
        to_load[key] = value
    report.unexpected = [k for k in sd if k not in model_sd]

    if missing:
        sample = list(sd)[:5]
        raise PretrainedWeightsError(
            f"{path} lacks {len(missing)} backbone tensors of {type(model).__name__}: {_listing(missing)}. "
            f"The file has {len(sd)} keys (e.g. {sample}). Is it for another architecture/variant, or are "
            "its keys prefixed differently?"
        )
    if mismatched:
        raise PretrainedWeightsError(
            f"{path} does not fit {type(model).__name__}, shape mismatch: {_listing(mismatched)}. "
            "Is the file for another architecture/variant (width, depth) or built with other options?"
        )
    model.load_state_dict(to_load, strict=False)
    report.loaded = list(to_load)
    return report


# --------------------------------------------------------------------------------------------------
# Hub: the local HF cache and fail-fast reachability
# --------------------------------------------------------------------------------------------------

_HF_FILENAMES = ("model.safetensors", "pytorch_model.bin")


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def hf_hub_cache_dir() -> Path:
    """The hub cache folder, from the environment *now* (``HF_HUB_CACHE``, ``HF_HOME``/hub, ...).

    ``huggingface_hub.constants`` reads these once at import, so they are re-read here.
    """
    hub = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if not hub:
        home = os.environ.get("HF_HOME") or os.path.join(
            os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "huggingface"
        )
        hub = os.path.join(os.path.expanduser(os.path.expandvars(home)), "hub")
    return Path(os.path.expanduser(os.path.expandvars(hub)))


def hf_offline() -> bool:
    """``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) set now or when huggingface_hub was imported."""
    if _env_true("HF_HUB_OFFLINE") or _env_true("TRANSFORMERS_OFFLINE"):
        return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except ImportError:
        return False


def hf_endpoint() -> str:
    """``HF_ENDPOINT`` now, else huggingface_hub's import-time endpoint, else ``https://huggingface.co``."""
    endpoint = os.environ.get("HF_ENDPOINT")
    if not endpoint:
        try:
            from huggingface_hub import constants

            endpoint = constants.ENDPOINT
        except ImportError:
            endpoint = "https://huggingface.co"
    return endpoint.rstrip("/")


def find_in_hf_cache(
    repo_id: str, filenames: tuple[str, ...] = _HF_FILENAMES, revision: str | None = None
) -> Path | None:
    """The first of ``filenames`` cached locally for ``repo_id`` (no network), else ``None``."""
    from huggingface_hub import try_to_load_from_cache

    cache_dir = hf_hub_cache_dir()
    revisions: list[str | None] = [revision]
    ref_file = cache_dir / f"models--{repo_id.replace('/', '--')}" / "refs" / (revision or "main")
    if ref_file.is_file():  # huggingface_hub does not strip the ref; tolerate a trailing newline
        raw = ref_file.read_text()
        if raw.strip() and raw.strip() != raw:
            revisions.append(raw.strip())
    for rev in revisions:
        for filename in filenames:
            found = try_to_load_from_cache(repo_id, filename, cache_dir=cache_dir, revision=rev)
            if isinstance(found, str) and os.path.isfile(found):
                return Path(found)
    return None


def host_reachable(url: str, timeout: float) -> tuple[bool, str]:
    """Whether a TCP connection to ``url``'s host (or its HTTPS proxy) opens within ``timeout`` seconds.

    DNS resolution runs inside the same deadline (in a daemon thread), so this never blocks much longer.
    """
    parsed = urllib.parse.urlsplit(url)
    host = parsed.hostname or ""
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    proxies = urllib.request.getproxies()
    proxy = proxies.get(parsed.scheme) or proxies.get("all")
    if proxy and not urllib.request.proxy_bypass(host):
        p = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        host, port = p.hostname or host, p.port or 80
    target = f"{host}:{port}"
    result: dict[str, object] = {}

    def attempt() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result["ok"] = True
        except OSError as err:
            result["err"] = err

    thread = threading.Thread(target=attempt, daemon=True)
    thread.start()
    thread.join(timeout)
    if result.get("ok"):
        return True, target
    if "err" in result:
        return False, f"{target} ({result['err']})"
    return False, f"{target} (no connection within {timeout:g} s)"


def _is_timeout(err: BaseException) -> bool:
    return isinstance(err, TimeoutError) or (
        isinstance(err, urllib.error.URLError) and isinstance(err.reason, TimeoutError)
    )


def download_url(url: str, dest: str | Path, timeout: float = NETWORK_TIMEOUT) -> Path:
    """Download ``url`` to ``dest`` (a temp file in its folder, renamed when complete); return ``dest``.

    ``timeout`` bounds the connection and every wait for the next bytes (urllib has neither by default, nor
    ``torch.hub.download_url_to_file``), so a peer that accepts but never answers fails with
    :class:`TimeoutError` instead of hanging. A failed download leaves no partial ``dest``.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    host = urllib.parse.urlsplit(url).netloc or url
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out:
            request = urllib.request.Request(url, headers={"User-Agent": "covid-lightning"})
            with urllib.request.urlopen(request, timeout=timeout) as response:
                while chunk := response.read(1 << 20):
                    out.write(chunk)
        os.replace(tmp_name, dest)
    except BaseException as err:
        with contextlib.suppress(OSError):
            os.unlink(tmp_name)
        if isinstance(err, Exception) and _is_timeout(err):
            raise TimeoutError(f"{host} sent nothing for {timeout:g} s ({err})") from err
        raise
    return dest


_HF_TIMEOUT_VARS = ("HF_HUB_ETAG_TIMEOUT", "HF_HUB_DOWNLOAD_TIMEOUT")


@contextlib.contextmanager
def hf_hub_timeouts(timeout: float = NETWORK_TIMEOUT) -> Iterator[None]:
    """huggingface_hub's metadata and download timeouts set to ``timeout`` seconds for the ``with`` block.

    They are its ``HF_HUB_ETAG_TIMEOUT``/``HF_HUB_DOWNLOAD_TIMEOUT``, which it reads once at import into
    ``huggingface_hub.constants``; so the constants are set (and restored after). A variable the user set in
    the environment is left to win.
    """
    try:
        from huggingface_hub import constants
    except ImportError:
        yield
        return
    saved = {name: getattr(constants, name) for name in _HF_TIMEOUT_VARS if name not in os.environ}
    for name in saved:
        setattr(constants, name, timeout)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(constants, name, value)


def hf_hub_silence(
    repo_id: str, filename: str, revision: str | None, timeout: float = NETWORK_TIMEOUT, endpoint: str | None = None
) -> str | None:
    """``None`` when the hub answers a metadata request for the file within ``timeout`` s (any HTTP status), else why.

    One request, no retries: huggingface_hub itself retries a timed-out request several times with a longer
    timeout, which is how a silent network hangs a download for minutes.
    """
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.errors import HfHubHTTPError

    endpoint = endpoint or hf_endpoint()
    url = hf_hub_url(repo_id, filename, revision=revision, endpoint=endpoint)
    try:
        get_hf_file_metadata(url, timeout=timeout)
    except HfHubHTTPError:
        return None  # it answered (404, 401, 5xx, ...): the download reports that itself
    except Exception as err:  # httpx timeouts and network errors, SSL, proxies, ...
        name = type(err).__name__
        if "timeout" in name.lower():
            return f"{endpoint} accepted the connection but sent no answer within {timeout:g} s ({name})"
        return f"no answer from {endpoint}: {name}: {err}"
    return None


# --------------------------------------------------------------------------------------------------
# create_timm_model
# --------------------------------------------------------------------------------------------------


def _close_matches(name: str, pool: list[str]) -> list[str]:
    matches = difflib.get_close_matches(name, pool, n=8, cutoff=0.6)
    parts = sorted((p for p in re.split(r"[^a-z0-9]+", name.lower()) if len(p) >= 3), key=len, reverse=True)
    for part in parts[:2]:
        matches += [m for m in pool if part in m.lower()]
    return list(dict.fromkeys(matches))[:12]


def _check_model_name(name: str) -> None:
    import timm
    from timm.models import get_arch_pretrained_cfgs, split_model_name_tag

    arch, tag = split_model_name_tag(name)
    if not timm.is_model(arch):
        close = _close_matches(arch, timm.list_models())
        hint = f" Close matches: {', '.join(close)}." if close else ""
        raise ValueError(f"Unknown timm model '{name}'.{hint} See timm.list_models('*part*').")
    if tag:
        tagged = list(get_arch_pretrained_cfgs(arch))
        if name not in tagged:
            raise ValueError(
                f"Unknown pretrained tag '{tag}' for timm model '{arch}'. Known: {', '.join(tagged) or 'none'}."
            )


def _how_to_supply(name: str, tagged: str, hf_hub_id: str | None, hf_filename: str) -> str:
    arch = tagged.split(".", 1)[0]
    out = f"{arch}.safetensors"
    lines = [
        "Supply the weights as a local file instead:",
        "  * on a machine with internet run",
        f"      python -c \"import timm, safetensors.torch as st; m = timm.create_model('{tagged}', "
        f"pretrained=True, num_classes=0); st.save_file(m.state_dict(), '{out}')\"",
    ]
    if hf_hub_id:
        lines.append(f"    or download https://huggingface.co/{hf_hub_id}/resolve/main/{hf_filename} as {out};")
    lines += [
        f"  * then pass `--model.pretrained_file {out}` (or `pretrained_file: {out}` in the YAML config);",
        "  * or copy a populated Hugging Face cache (its `hub/models--"
        + (hf_hub_id or "timm/<model>").replace("/", "--")
        + "` folder) to this machine and set HF_HOME (or HF_HUB_CACHE) to it.",
    ]
    return "\n".join(lines)


def _create_pretrained_from_hub(
    name: str, hub_timeout: float, read_timeout: float, kwargs: dict[str, Any]
) -> nn.Module:
    import timm
    from timm.models import get_pretrained_cfg

    overlay = dict(kwargs.pop("pretrained_cfg_overlay", None) or {})
    cfg = get_pretrained_cfg(name)
    if cfg is not None and overlay:
        cfg = dataclasses.replace(cfg, **{k: v for k, v in overlay.items() if hasattr(cfg, k)})
    if cfg is None or not (cfg.hf_hub_id or cfg.url or cfg.file):
        raise PretrainedWeightsError(
            f"timm has no pretrained weights for '{name}'; use pretrained=False or pass pretrained_file."
        )
    tagged = f"{cfg.architecture}.{cfg.tag}" if cfg.tag else str(cfg.architecture)
    hf_hub_id, revision = (cfg.hf_hub_id.split("@", 1) + [None])[:2] if cfg.hf_hub_id else (None, None)
    filenames = (cfg.hf_hub_filename,) if cfg.hf_hub_filename else _HF_FILENAMES
    how = _how_to_supply(name, tagged, hf_hub_id, filenames[0])
    what = f"Pretrained weights for timm model '{name}' (pretrained tag '{tagged}'"
    what += f", HF hub repo '{hf_hub_id}')" if hf_hub_id else f", {cfg.url or cfg.file})"

    cached: Path | None = None
    if hf_hub_id:
        cached = find_in_hf_cache(hf_hub_id, filenames, revision)
    elif cfg.url:
        candidate = Path(torch.hub.get_dir()) / "checkpoints" / Path(urllib.parse.urlsplit(cfg.url).path).name
        cached = candidate if candidate.is_file() else None
    if cached is None and cfg.file:
        if not Path(cfg.file).is_file():
            raise PretrainedWeightsError(f"{what}: the pretrained cfg's file {cfg.file} does not exist.\n{how}")
        cached = Path(cfg.file)
    if cached is not None:
        try:
            return timm.create_model(
                name, pretrained=True, pretrained_cfg_overlay={**overlay, "file": str(cached)}, **kwargs
            )
        except Exception as err:
            raise PretrainedWeightsError(
                f"{what} were found in the local cache ({cached}) but failed to load: {err}\n{how}"
            ) from err

    cache_dir = hf_hub_cache_dir()
    if hf_hub_id and hf_offline():
        raise PretrainedWeightsError(
            f"{what} are not in the local Hugging Face cache ({cache_dir}) and HF_HUB_OFFLINE is set, so "
            f"they cannot be downloaded.\n{how}"
        )
    url = hf_endpoint() if hf_hub_id else str(cfg.url)
    ok, target = host_reachable(url, hub_timeout)
    if not ok:
        raise PretrainedWeightsError(
            f"{what} are not in the local cache ({cache_dir if hf_hub_id else torch.hub.get_dir()}) and "
            f"cannot be downloaded: no connection to {target} within {hub_timeout:g} s.\n{how}"
        )
    if not hf_hub_id:  # a plain URL: fetched here with timeouts into torch hub's cache, then loaded from there
        dest = Path(torch.hub.get_dir()) / "checkpoints" / Path(urllib.parse.urlsplit(str(cfg.url)).path).name
        try:
            download_url(str(cfg.url), dest, read_timeout)
        except Exception as err:
            raise PretrainedWeightsError(f"{what} could not be downloaded: {type(err).__name__}: {err}\n{how}") from err
        try:
            return timm.create_model(
                name, pretrained=True, pretrained_cfg_overlay={**overlay, "file": str(dest)}, **kwargs
            )
        except Exception as err:
            raise PretrainedWeightsError(f"{what} were downloaded to {dest} but failed to load: {err}\n{how}") from err
    silence = hf_hub_silence(hf_hub_id, filenames[0], revision, read_timeout, endpoint=url)
    if silence is not None:
        raise PretrainedWeightsError(
            f"{what} are not in the local cache ({cache_dir}) and cannot be downloaded: {silence}.\n{how}"
        )
    try:
        with hf_hub_timeouts(read_timeout):
            return timm.create_model(
                name, pretrained=True, pretrained_cfg_overlay=overlay or None, cache_dir=cache_dir, **kwargs
            )
    except Exception as err:
        raise PretrainedWeightsError(f"{what} could not be downloaded: {type(err).__name__}: {err}\n{how}") from err


def create_timm_model(
    name: str,
    *,
    pretrained: bool = False,
    pretrained_file: str | Path | None = None,
    hub_timeout: float = 5.0,
    read_timeout: float = NETWORK_TIMEOUT,
    **kwargs: Any,
) -> nn.Module:
    """Build a timm model, with pretrained weights from ``pretrained_file`` or (``pretrained=True``) the hub.

    ``kwargs`` go to ``timm.create_model`` (``num_classes``, ``pad_type``, ``bn_eps``, ``drop_rate``, ...).
    Never returns random weights when weights were asked for: raises :class:`PretrainedWeightsError`
    (with instructions to supply a local file) instead. An unknown ``name`` raises ``ValueError``.
    ``hub_timeout`` bounds the connection probe; ``read_timeout`` each connect of, and each wait for bytes
    from, the download itself (a hub that accepts connections but never answers fails in that time).
    """
    import timm

    _check_model_name(name)
    if pretrained_file is not None:
        model = timm.create_model(name, pretrained=False, **kwargs)
        _log.info("%s", load_backbone_weights(model, pretrained_file))
        return model
    if pretrained:
        return _create_pretrained_from_hub(name, hub_timeout, read_timeout, dict(kwargs))
    return timm.create_model(name, pretrained=False, **kwargs)
