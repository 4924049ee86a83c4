"""Pretrained weights into timm models and smp encoders, never silently falling back to random weights."""

from __future__ import annotations

import contextlib
import difflib
import logging
import os
import socket
import tempfile
import threading
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import timm
import torch
from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url
from huggingface_hub.errors import HfHubHTTPError
from torch import nn

from covid_lightning.errors import UserError

_log = logging.getLogger(__name__)

#: Seconds any download (hub, Keras ``.h5``, Kaggle) waits to connect, or for the next bytes, before it gives up.
NETWORK_TIMEOUT = 20.0
#: Seconds the TCP probe of a weights host waits before the host counts as unreachable.
PROBE_TIMEOUT = 5.0
_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt", ".h5", ".hdf5")


class PretrainedWeightsError(UserError, RuntimeError):
    """Pretrained weights were asked for but cannot be had; the message says how to supply a file."""


def read_state_dict(path: str | Path) -> dict[str, Any]:
    """A state dict from a weights file, or for a Keras ``.h5`` its arrays in load order, keyed by HDF5 path."""
    path = Path(path)
    if not path.is_file():
        raise PretrainedWeightsError(f"Weights file {path} does not exist.")
    if path.suffix.lower() not in _SUFFIXES:
        raise PretrainedWeightsError(f"{path}: unsupported weights file type (use {', '.join(_SUFFIXES)}).")
    if path.suffix.lower() in (".h5", ".hdf5"):
        return _read_keras_h5(path)
    try:
        return timm.models.load_state_dict(str(path))
    except Exception as err:
        msg = "Save only the state dict, e.g. `safetensors.torch.save_file(model.state_dict(), path)`."
        raise PretrainedWeightsError(f"{path} is no readable state dict ({type(err).__name__}: {err}). {msg}") from err


def _listing(items: list[str]) -> str:
    return ", ".join(items[:10]) + (f" ... and {len(items) - 10} more" if len(items) > 10 else "")


def _head_prefixes(module: nn.Module) -> tuple[str, ...]:
    """State-dict prefixes of a timm model's classifier (its ``pretrained_cfg['classifier']``)."""
    heads = (getattr(module, "pretrained_cfg", None) or {}).get("classifier") or ()
    return tuple(f"{h}." for h in ((heads,) if isinstance(heads, str) else heads))


def fit_state_dict(state_dict: dict[str, Any], module: nn.Module, path: str | Path) -> dict[str, torch.Tensor]:
    """``state_dict`` as a complete state dict of ``module``, or a :class:`PretrainedWeightsError` naming the misfits.

    Keeps the best-matching wrapper prefix; a classifier head and mismatched keys keep the module's values.
    """
    target = module.state_dict()
    prefixes = {".".join(k.split(".")[:n]) + "." for k in state_dict for n in (1, 2) if k.count(".") >= n}
    prefixes = ["", *sorted(prefixes)]
    tensors = {k: v for k, v in state_dict.items() if isinstance(v, torch.Tensor)}
    subs = [{k[len(p) :]: v for k, v in tensors.items() if k.startswith(p)} for p in prefixes]
    sd = max(subs, key=lambda sub: len(sub.keys() & target.keys()))
    heads = _head_prefixes(module)
    first_conv = next((k for k, v in target.items() if v.ndim == 4), None)
    out, missing, mismatched = {}, [], []
    for key, want in target.items():
        got = sd.get(key)
        optional = key.startswith(heads) or key.endswith("num_batches_tracked")
        if got is None or (optional and got.shape != want.shape):
            out[key] = want
            if got is None and not optional:
                missing.append(key)
            continue
        if key == first_conv and got.shape != want.shape and got.ndim == 4 and got.shape[1] == 3:
            got = timm.models.adapt_input_conv(want.shape[1], got)
        if got.shape != want.shape:
            mismatched.append(f"{key}: file {tuple(got.shape)} vs model {tuple(want.shape)}")
        out[key] = got
    if missing or mismatched:
        raise PretrainedWeightsError(
            f"{path} does not fit {type(module).__name__}"
            + (f"; it lacks {len(missing)} tensors: {_listing(missing)}" if missing else "")
            + (f"; shape mismatch: {_listing(mismatched)}" if mismatched else "")
            + ". Is it for another architecture or variant (width, depth), or built with other options?"
        )
    _log.info("%s: loaded; extra keys ignored: %s", path, _listing(sorted(sd.keys() - target.keys())) or "none")
    return out


def load_weights(module: nn.Module, path: str | Path) -> None:
    """Load the weights file ``path`` (``.safetensors``/``.pth``/..., or a Keras ``.h5``) into ``module``."""
    state_dict = read_state_dict(path)
    if Path(path).suffix.lower() in (".h5", ".hdf5"):
        state_dict = keras_to_timm(state_dict, module, path)
    module.load_state_dict(fit_state_dict(state_dict, module, path))  # the module's own load (smp encoders)


#: Keras weight role -> the PyTorch state-dict suffix it must land on.
_ROLE_TO_SUFFIX = {"kernel": "weight", "depthwise_kernel": "weight", "gamma": "weight", "beta": "bias", "bias": "bias",
                   "moving_mean": "running_mean", "moving_variance": "running_var"}  # fmt: skip
_FIX_HINT = (
    "Build the model that matches the file, e.g. for Keras' no-top MobileNetV2 alpha=0.5: timm.create_model("
    "'mobilenetv2_050', num_classes=0, pad_type='same', bn_eps=1e-3); another alpha or backbone differs."
)
KERAS_WEIGHTS_BASE = "https://storage.googleapis.com/tensorflow/keras-applications/mobilenet_v2/"
#: timm MobileNetV2 names whose Keras Applications twin (alpha = the suffix / 100) has published weights.
KERAS_BACKBONES = ("mobilenetv2_035", "mobilenetv2_050", "mobilenetv2_075", "mobilenetv2_100", "mobilenetv2_140")


def _read_keras_h5(path: Path) -> dict[str, np.ndarray]:
    """Both legacy Keras 2 layouts: the full model's ``model_weights`` group, or ``save_weights``'s top level."""
    import h5py

    def text(name: object) -> str:
        return name.decode() if isinstance(name, bytes) else str(name)

    try:
        f = h5py.File(path, "r")
    except OSError as err:
        raise PretrainedWeightsError(f"{path} is not a readable HDF5 file: {err}") from err
    with f:
        root = f.get("model_weights", f)
        if "layer_names" not in root.attrs:
            raise PretrainedWeightsError(f"{path} has no 'layer_names': not a legacy Keras 2 .h5 weights file.")
        return {
            f"{layer}/{weight}": np.asarray(root[layer][weight])
            for layer in map(text, root.attrs["layer_names"])
            for weight in map(text, root[layer].attrs.get("weight_names", []))
        }


def keras_to_timm(arrays: dict[str, np.ndarray], model: nn.Module, path: str | Path) -> dict[str, torch.Tensor]:
    """Keras arrays paired in order with ``model``'s backbone keys, checked and transposed to PyTorch's layout."""
    target = model.state_dict()
    heads = _head_prefixes(model)
    keys = [k for k in target if not k.startswith(heads) and not k.endswith("num_batches_tracked")]
    names = list(arrays)
    if len(names) != len(keys):
        first = f"h5 array {names[len(keys)]}" if len(names) > len(keys) else f"model key {keys[len(names)]}"
        size = f"{len(names)} weight arrays but {type(model).__name__} has {len(keys)} backbone tensors"
        raise PretrainedWeightsError(f"{path}: the h5 holds {size}; the first unpaired is {first}. {_FIX_HINT}")
    out = {}
    for name, key in zip(names, keys):
        array, role = arrays[name], name.rsplit("/", 1)[-1].split(":")[0]
        where = f"{path}: h5 weight '{name}' -> model key '{key}'"
        if _ROLE_TO_SUFFIX.get(role) != key.rsplit(".", 1)[-1]:
            raise PretrainedWeightsError(f"{where}: a Keras '{role}' cannot land there; the orders differ. {_FIX_HINT}")
        value = array
        if role == "depthwise_kernel":  # (H, W, C, M) -> (C*M, 1, H, W)
            value = array.transpose(2, 3, 0, 1).reshape(-1, 1, *array.shape[:2])
        elif role == "kernel":  # HWIO -> OIHW; Conv1D (W, I, O) and Dense (in, out) reversed
            value = array.transpose(3, 2, 0, 1) if array.ndim == 4 else array.transpose(*reversed(range(array.ndim)))
        if value.shape != (want := tuple(target[key].shape)):
            raise PretrainedWeightsError(f"{where}: h5 {array.shape} -> {value.shape} vs model {want}. {_FIX_HINT}")
        out[key] = torch.from_numpy(np.ascontiguousarray(value))
    return out


def is_keras_weights_file(path: str | Path) -> bool:
    """A Keras ``.h5``, or a safetensors file converted from one (tagged ``keras...`` in its metadata)."""
    path = Path(path)
    if path.suffix != ".safetensors" or not path.is_file():
        return path.suffix.lower() in (".h5", ".hdf5")
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return any("keras" in key.lower() for key in f.metadata() or {})


def fetch_keras_weights(
    backbone: str, hub_timeout: float = PROBE_TIMEOUT, read_timeout: float = NETWORK_TIMEOUT
) -> Path:
    """Keras Applications' no-top ImageNet ``.h5`` of the MobileNetV2 ``backbone``, from torch hub's cache."""
    arch = backbone.split(".")[0]
    if arch not in KERAS_BACKBONES:
        msg = f"Keras ImageNet weights exist only for {', '.join(KERAS_BACKBONES)}, not {backbone!r}: use flavor timm."
        raise PretrainedWeightsError(msg)
    url = f"{KERAS_WEIGHTS_BASE}mobilenet_v2_weights_tf_dim_ordering_tf_kernels_{int(arch[-3:]) / 100:g}_224_no_top.h5"
    how = f"Download {url} elsewhere; pass it as --model.pretrained_file PATH or put it at {_hub_checkpoint(url)}."
    what = f"Keras ImageNet weights for {backbone}"
    return hub_weights(what, how, url=url, hub_timeout=hub_timeout, read_timeout=read_timeout)  # type: ignore[return-value]


def host_reachable(url: str, timeout: float) -> tuple[bool, str]:
    """Whether a TCP connection to ``url``'s host (or its proxy) opens within ``timeout`` s (DNS included)."""
    parsed = urllib.parse.urlsplit(url)
    host, port = parsed.hostname or "", parsed.port or (443 if parsed.scheme == "https" else 80)
    proxies = urllib.request.getproxies()
    proxy = proxies.get(parsed.scheme) or proxies.get("all")
    if proxy and not urllib.request.proxy_bypass(host):
        p = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        host, port = p.hostname or host, p.port or 80
    result: list[object] = [f"no connection within {timeout:g} s"]

    def attempt() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result[0] = True
        except OSError as err:
            result[0] = err

    thread = threading.Thread(target=attempt, daemon=True)  # a thread, so a hanging DNS lookup is bounded too
    thread.start()
    thread.join(timeout)
    return result[0] is True, f"{host}:{port}" + ("" if result[0] is True else f" ({result[0]})")


def download_url(url: str, dest: str | Path, timeout: float = NETWORK_TIMEOUT) -> Path:
    """Download ``url`` to ``dest`` with ``timeout`` for the connection and each read; no partial file is left."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    try:
        request = urllib.request.Request(url, headers={"User-Agent": "covid-lightning"})
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(request, timeout=timeout) as response:
            while chunk := response.read(1 << 20):
                out.write(chunk)
        os.replace(tmp, dest)
    except BaseException as err:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(err, TimeoutError) or isinstance(getattr(err, "reason", None), TimeoutError):
            raise TimeoutError(f"{urllib.parse.urlsplit(url).netloc} sent nothing for {timeout:g} s ({err})") from err
        raise
    return dest


def _hub_checkpoint(url: str) -> Path:
    """Where torch hub (and so timm) keeps the file of ``url``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(urllib.parse.urlsplit(url).path).name


def hf_hub_cache_dir() -> Path:
    """The Hugging Face hub cache as the environment says *now* (huggingface_hub reads it once, at import)."""
    env = os.environ
    cache = env.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    hub = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE")
    home = env.get("HF_HOME") or os.path.join(cache, "huggingface")
    return Path(os.path.expanduser(hub or os.path.join(home, "hub")))


def hf_cached(repo_id: str, filename: str, revision: str | None = None) -> Path | None:
    """``filename`` of ``repo_id`` in the local hub cache (a ref file's trailing newline tolerated), else None."""
    repo = hf_hub_cache_dir() / f"models--{repo_id.replace('/', '--')}"
    ref = repo / "refs" / (revision or "main")
    commit = ref.read_text().strip() if ref.is_file() else revision
    path = repo / "snapshots" / str(commit) / filename
    return path if commit and path.is_file() else None


def hf_hub_timeouts(timeout: float = NETWORK_TIMEOUT) -> contextlib.AbstractContextManager:
    """huggingface_hub's timeouts set to ``timeout`` s for a ``with`` block; a variable the user set wins."""
    values = {n: timeout for n in ("HF_HUB_ETAG_TIMEOUT", "HF_HUB_DOWNLOAD_TIMEOUT") if n not in os.environ}
    return mock.patch.multiple(constants, **values) if values else contextlib.nullcontext()


def hub_weights(
    what: str,
    how: str,
    *,
    timm_name: str | None = None,
    repo: str | None = None,
    files: tuple[str, ...] = ("model.safetensors",),
    revision: str | None = None,
    url: str | None = None,
    hub_timeout: float = PROBE_TIMEOUT,
    read_timeout: float = NETWORK_TIMEOUT,
) -> Path | None:
    """The cached file of hub weights, a URL's file downloaded now, or None when the library may download them.

    Fails fast with ``how`` when offline or the hub does not answer (huggingface_hub retries for minutes).
    """
    if timm_name:
        cfg = timm.models.get_pretrained_cfg(timm_name)
        if cfg is None or not (cfg.hf_hub_id or cfg.url):
            raise PretrainedWeightsError(f"timm has no downloadable pretrained weights for '{timm_name}'.")
        repo, _, revision = (cfg.hf_hub_id or "").partition("@")
        repo, files, revision, url = repo or None, (cfg.hf_hub_filename or files[0],), revision or None, cfg.url
    fail = f"{what} ({f'Hugging Face hub repo {repo}' if repo else url}) are not cached and cannot be downloaded"
    endpoint = (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")
    if repo:
        cached = [hf_cached(repo, f, revision) for f in files]
        if all(cached):
            return cached[-1]
        if constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}:
            raise PretrainedWeightsError(f"{fail}: HF_HUB_OFFLINE is set (cache: {hf_hub_cache_dir()}).\n{how}")
    elif _hub_checkpoint(str(url)).is_file():
        return _hub_checkpoint(str(url))
    ok, target = host_reachable(endpoint if repo else str(url), hub_timeout)
    if not ok:
        raise PretrainedWeightsError(f"{fail}: no connection to {target} within {hub_timeout:g} s.\n{how}")
    try:
        if not repo:
            return download_url(str(url), _hub_checkpoint(str(url)), read_timeout)
        get_hf_file_metadata(hf_hub_url(repo, files[0], revision=revision, endpoint=endpoint), timeout=read_timeout)
    except HfHubHTTPError:
        pass  # the hub answered; the download reports the status itself
    except Exception as err:  # timeouts, network and proxy errors
        silent = repo and "timeout" in type(err).__name__.lower()
        reason = f"{endpoint} accepted the connection but sent no answer within {read_timeout:g} s " if silent else ""
        raise PretrainedWeightsError(f"{fail}: {reason}({type(err).__name__}: {err})\n{how}") from err
    return None


def local_file_help(python: str, option: str) -> str:
    """How to do without the network: make the file elsewhere with ``python``, then pass ``option``."""
    return (
        f'Supply the weights as a local file: on a machine with internet run\n  python -c "{python}"\nthen pass '
        f"`{option}`, or copy a populated Hugging Face cache here and set HF_HOME (or HF_HUB_CACHE) to it."
    )


def check_timm_name(name: str) -> None:
    """``ValueError`` with close matches for a model (or pretrained tag) timm does not know."""
    arch, tag = timm.models.split_model_name_tag(name)
    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=8)
        raise ValueError(f"Unknown timm model '{name}'. Close matches: {', '.join(close) or 'none'}.")
    tags = list(timm.models.get_arch_pretrained_cfgs(arch))
    if tag and name not in tags:
        raise ValueError(f"Unknown pretrained tag '{tag}' for timm model '{arch}'. Known: {', '.join(tags) or 'none'}.")


def create_timm_model(
    name: str,
    *,
    pretrained: bool = False,
    pretrained_file: str | Path | None = None,
    hub_timeout: float = PROBE_TIMEOUT,
    read_timeout: float = NETWORK_TIMEOUT,
    **kwargs: Any,
) -> nn.Module:
    """``timm.create_model(name, **kwargs)`` with weights from ``pretrained_file`` or (``pretrained``) the hub.

    Raises :class:`PretrainedWeightsError` rather than return random weights.
    """
    check_timm_name(name)
    if pretrained_file is not None:
        model = timm.create_model(name, **kwargs)
        load_weights(model, pretrained_file)
        return model
    if not pretrained:
        return timm.create_model(name, **kwargs)
    out = f"{name.split('.')[0]}.safetensors"
    how = local_file_help(
        f"import timm, safetensors.torch as st; m = timm.create_model('{name}', pretrained=True, num_classes=0); "
        f"st.save_file(m.state_dict(), '{out}')",
        f"--model.pretrained_file {out}",
    )
    what = f"Pretrained weights for timm model '{name}'"
    path = hub_weights(what, how, timm_name=name, hub_timeout=hub_timeout, read_timeout=read_timeout)
    overlay, cache = ({"file": str(path)} if path else None), hf_hub_cache_dir()
    try:
        with hf_hub_timeouts(read_timeout):
            return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, cache_dir=cache, **kwargs)
    except Exception as err:
        raise PretrainedWeightsError(f"{what} failed to download or load: {type(err).__name__}: {err}\n{how}") from err
