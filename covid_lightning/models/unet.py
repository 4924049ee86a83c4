"""Lung segmentation networks: the Keras lab's U-Net (``SeedUNet``) and smp architectures by name.

Every model built here maps ``(N, in_channels, H, W)`` to LOGITS ``(N, classes, H, W)`` (no sigmoid).
Input sizes: ``SeedUNet`` needs H and W divisible by 4; smp models need them divisible by the encoder's
output stride (32 for resnet/efficientnet/mobilenet encoders, 16 for DeepLabV3Plus and PAN, 8 for
DeepLabV3 and PSPNet); smp's ``Unet`` also runs on other sizes by resampling its skips.
``required_input_divisor(model)`` gives the number for a built model.

Pretrained encoder weights never fall back to random weights silently: they come either from a local
state dict (``encoder_weights_file``) or through smp's own download (``encoder_weights``), which is
checked beforehand (local cache, offline flags, a short TCP probe, then one metadata request with a read
timeout) so that an offline machine, or a network that accepts connections but never answers, gets a
``PretrainedWeightsError`` within seconds instead of hanging in retries.
"""

from __future__ import annotations

import difflib
import os
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import segmentation_models_pytorch as smp
import timm
import torch
from torch import nn

from .weights import (
    NETWORK_TIMEOUT,
    PretrainedWeightsError,
    download_url,
    find_in_hf_cache,
    hf_endpoint,
    hf_hub_silence,
    hf_hub_timeouts,
    hf_offline,
    host_reachable,
    load_state_dict_file,
)

__all__ = [
    "SEGMENTATION_ARCHS",
    "SeedUNet",
    "build_segmentation_model",
    "load_encoder_weights",
    "required_input_divisor",
]

# --------------------------------------------------------------------------------------------------
# SeedUNet: the Keras lab's network
# --------------------------------------------------------------------------------------------------


def _double_conv(in_channels: int, out_channels: int, batch_norm: bool) -> nn.Sequential:
    """Two 3x3 "same" convolutions, each followed by ReLU (and BatchNorm before it when asked)."""
    layers: list[nn.Module] = []
    for cin in (in_channels, out_channels):
        layers.append(nn.Conv2d(cin, out_channels, kernel_size=3, padding=1, bias=not batch_norm))
        if batch_norm:
            layers.append(nn.BatchNorm2d(out_channels))
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class SeedUNet(nn.Module):
    """The lab's two-level Keras U-Net, layer for layer (466,529 parameters at the defaults).

    ``enc1`` (2x conv 32) -> pool -> ``enc2`` (2x conv 64) -> pool -> ``bottleneck`` (2x conv 128)
    -> ``up2`` (ConvTranspose 2x2/2, 64) ++ enc2 -> ``dec2`` (2x conv 64)
    -> ``up1`` (ConvTranspose 2x2/2, 32) ++ enc1 -> ``dec1`` (2x conv 32) -> ``head`` (1x1 conv).

    Skips are concatenated after the upsampled tensor (Keras ``concatenate([up, skip])``), so channel
    order matches the Keras model when porting its weights. Convolutions are 3x3 with padding 1 (Keras
    ``padding="same"``) and have biases; the output is logits, apply ``sigmoid`` for probabilities.

    Initialisation follows Keras defaults: glorot (Xavier) uniform kernels and zero biases, not PyTorch's
    Kaiming-uniform defaults; this matters for reproducing the lab's training curves. Glorot is symmetric
    in fan-in/fan-out, so it is the same for ``ConvTranspose2d`` whose weight layout is (in, out, k, k).

    ``batch_norm=True`` is a variant, not the lab's model: BatchNorm2d (PyTorch defaults, not Keras'
    momentum/epsilon) after every 3x3 conv, whose bias is then dropped.
    H and W must be divisible by 4.
    """

    input_divisor: int = 4

    def __init__(
        self, in_channels: int = 3, base_channels: int = 32, classes: int = 1, batch_norm: bool = False
    ) -> None:
        super().__init__()
        c = base_channels
        self.enc1 = _double_conv(in_channels, c, batch_norm)
        self.enc2 = _double_conv(c, 2 * c, batch_norm)
        self.bottleneck = _double_conv(2 * c, 4 * c, batch_norm)
        self.pool = nn.MaxPool2d(kernel_size=2)
        self.up2 = nn.ConvTranspose2d(4 * c, 2 * c, kernel_size=2, stride=2)
        self.dec2 = _double_conv(4 * c, 2 * c, batch_norm)
        self.up1 = nn.ConvTranspose2d(2 * c, c, kernel_size=2, stride=2)
        self.dec1 = _double_conv(2 * c, c, batch_norm)
        self.head = nn.Conv2d(c, classes, kernel_size=1)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Keras defaults: glorot_uniform kernels, zero biases (BatchNorm: weight 1, bias 0)."""
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.BatchNorm2d):
                module.reset_parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, in_channels, H, W)`` -> logits ``(N, classes, H, W)``; H, W divisible by 4."""
        h, w = x.shape[-2:]
        if h % 4 or w % 4:
            raise ValueError(f"SeedUNet needs height and width divisible by 4, got {h}x{w}.")
        s1 = self.enc1(x)
        s2 = self.enc2(self.pool(s1))
        b = self.bottleneck(self.pool(s2))
        d2 = self.dec2(torch.cat([self.up2(b), s2], dim=1))
        d1 = self.dec1(torch.cat([self.up1(d2), s1], dim=1))
        return self.head(d1)


def required_input_divisor(model: nn.Module) -> int:
    """What H and W must be divisible by for ``model`` (SeedUNet: 4; smp: the encoder's output stride).

    smp's ``Unet`` accepts other sizes too (it resamples), but divisible sizes avoid that.
    """
    divisor = getattr(model, "input_divisor", None)
    if isinstance(divisor, int):
        return divisor
    encoder = getattr(model, "encoder", None)
    stride = getattr(encoder, "output_stride", None)
    return int(stride) if stride else 1


# --------------------------------------------------------------------------------------------------
# Architecture and encoder names
# --------------------------------------------------------------------------------------------------

_SMP_FALLBACK_ARCHS = (
    "Unet", "UnetPlusPlus", "MAnet", "Linknet", "FPN", "PSPNet", "DeepLabV3", "DeepLabV3Plus", "PAN",
    "UPerNet", "Segformer", "DPT",
)  # fmt: skip


def _smp_arch_names() -> tuple[str, ...]:
    mapping = getattr(smp, "MODEL_ARCHITECTURES_MAPPING", None)
    if isinstance(mapping, Mapping) and mapping:
        return tuple(cls.__name__ for cls in mapping.values())
    return tuple(name for name in _SMP_FALLBACK_ARCHS if hasattr(smp, name))


SEGMENTATION_ARCHS: tuple[str, ...] = ("seed_unet", *_smp_arch_names())
"""Valid ``arch`` values (matched ignoring case, ``_`` and ``-``): ``seed_unet`` plus smp's classes."""


def _norm(name: str) -> str:
    return name.lower().replace("_", "").replace("-", "")


def _resolve_arch(arch: str) -> str:
    by_norm = {_norm(name): name for name in SEGMENTATION_ARCHS}
    if isinstance(arch, str) and _norm(arch) in by_norm:
        return by_norm[_norm(arch)]
    close = difflib.get_close_matches(str(arch), SEGMENTATION_ARCHS, n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise ValueError(f"Unknown segmentation architecture {arch!r}.{hint} Valid names: {', '.join(SEGMENTATION_ARCHS)}.")


def _timm_name(encoder: str) -> str | None:
    """The timm model name behind ``encoder`` if smp builds it through timm, else None."""
    if encoder.startswith("tu-"):
        return encoder[3:]
    is_equivalent = getattr(smp.encoders, "is_equivalent_to_timm_universal", None)
    if encoder.startswith("timm-") and callable(is_equivalent) and is_equivalent(encoder):
        # smp itself maps these deprecated names onto timm (see smp.encoders.get_encoder).
        name = encoder[len("timm-") :]
        return f"tf_{name}" if "mobilenetv3" in name else name
    return None


def _timm_knows(name: str) -> bool:
    """Whether timm has model ``name`` (with its pretrained tag, if the name has one)."""
    if not timm.is_model(name):
        return False
    if "." not in name:
        return True
    try:
        return timm.models.get_pretrained_cfg(name) is not None
    except RuntimeError:  # "Invalid pretrained tag"
        return False


def _validate_encoder(encoder: str) -> None:
    smp_names = smp.encoders.get_encoder_names()
    if encoder in smp_names:
        return
    timm_name = _timm_name(encoder) if isinstance(encoder, str) else None
    if timm_name is not None:
        if _timm_knows(timm_name):
            return
        close = difflib.get_close_matches(timm_name, timm.list_models(pretrained="." in timm_name), n=5)
        close = [f"tu-{name}" for name in close]
        where = "timm does not know it"
    else:
        close = difflib.get_close_matches(str(encoder), smp_names, n=5)
        where = "not an smp encoder"
    hint = f" Close matches: {', '.join(close)}." if close else f" smp encoders: {', '.join(smp_names)}."
    raise ValueError(
        f"Unknown encoder {encoder!r} ({where}).{hint} Any timm model works as 'tu-<timm name>' "
        "(e.g. 'tu-mobilenetv2_050'); see smp.encoders.get_encoder_names() for smp's own encoders."
    )


# --------------------------------------------------------------------------------------------------
# Building
# --------------------------------------------------------------------------------------------------

_Factory = Callable[..., nn.Module]


def build_segmentation_model(
    arch: str = "seed_unet",
    encoder: str = "resnet34",
    encoder_weights: str | None = None,
    encoder_weights_file: str | Path | None = None,
    in_channels: int = 3,
    classes: int = 1,
    hub_timeout: float | None = None,
    read_timeout: float = NETWORK_TIMEOUT,
    **kwargs: Any,
) -> nn.Module:
    """Build a segmentation network returning logits ``(N, classes, H, W)``.

    Args:
        arch: one of ``SEGMENTATION_ARCHS`` (case-insensitive): ``seed_unet`` or an smp architecture.
        encoder: smp encoder name or ``tu-<timm model>[.<tag>]``; ignored by ``seed_unet``.
        encoder_weights: smp's pretrained encoder weights (e.g. ``"imagenet"``; for ``tu-`` encoders
            ``"imagenet"``/``"timm"`` mean timm's weights for the name's tag). smp downloads them from
            the Hugging Face hub (or timm's URL); raises ``PretrainedWeightsError`` quickly when they are
            neither cached nor reachable.
        encoder_weights_file: a local ``.pth``/``.safetensors`` state dict of the encoder (e.g.
            ``torch.save(model.encoder.state_dict(), path)``); prefixes such as ``encoder.``/``model.``/
            ``module.`` are stripped as needed, loading is strict. A 3-channel first conv is adapted to
            ``in_channels`` like smp does (summed for 1 channel).
        in_channels: input channels.
        classes: output channels (logits).
        hub_timeout: seconds the TCP probe of the weights host waits (default ``HUB_PROBE_TIMEOUT_S``).
        read_timeout: seconds the download of ``encoder_weights`` waits to connect or for the next bytes;
            a host that accepts connections but never answers fails in about that time.
        **kwargs: passed on to ``SeedUNet`` (``base_channels``, ``batch_norm``) or ``smp.create_model``.
    """
    name = _resolve_arch(arch)
    if name == "seed_unet":
        if encoder_weights is not None or encoder_weights_file is not None:
            raise ValueError("seed_unet has no encoder: encoder_weights and encoder_weights_file must be None for it.")
        return SeedUNet(in_channels=in_channels, classes=classes, **kwargs)

    if encoder_weights is not None and encoder_weights_file is not None:
        raise ValueError("Give either encoder_weights or encoder_weights_file, not both.")
    _validate_encoder(encoder)

    def create(weights: str | bool | None) -> nn.Module:
        return smp.create_model(
            name, encoder_name=encoder, encoder_weights=weights, in_channels=in_channels, classes=classes,
            **kwargs,
        )  # fmt: skip

    if encoder_weights_file is not None:
        if not Path(encoder_weights_file).is_file():  # before spending time on building the model
            raise PretrainedWeightsError(f"Encoder weights file {encoder_weights_file} does not exist.")
        model = create(None)
        load_encoder_weights(model, encoder_weights_file, in_channels=in_channels)
        return model
    if encoder_weights is not None:
        probe = HUB_PROBE_TIMEOUT_S if hub_timeout is None else hub_timeout
        return _build_with_hub_weights(create, encoder, encoder_weights, hub_timeout=probe, read_timeout=read_timeout)
    return create(None)


# --------------------------------------------------------------------------------------------------
# Encoder weights from a local file
# --------------------------------------------------------------------------------------------------

_PREFIXES = ("encoder.", "model.", "module.", "_orig_mod.", "net.")


def _strip_prefixes(state: dict[str, torch.Tensor], target: set[str]) -> dict[str, torch.Tensor]:
    """Select the sub-dict (under up to 3 nested prefixes) whose keys best match ``target``."""
    best, best_score = state, len(state.keys() & target)
    frontier = [state]
    for _ in range(3):
        nxt = []
        for sd in frontier:
            for prefix in _PREFIXES:
                sub = {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
                if not sub:
                    continue
                nxt.append(sub)
                score = len(sub.keys() & target)
                if score > best_score:
                    best, best_score = sub, score
        frontier = nxt
    return best


def _adapt_input_conv(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    """A 3-channel first-conv kernel for ``in_channels`` inputs, as smp's ``patch_first_conv`` does."""
    if in_channels == 1:
        return weight.sum(1, keepdim=True)
    idx = torch.arange(in_channels) % weight.shape[1]
    return weight[:, idx] * (weight.shape[1] / in_channels)


def _short(keys: Iterable[str], limit: int = 10) -> str:
    keys = sorted(keys)
    more = f" ... ({len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def load_encoder_weights(model: nn.Module, path: str | Path, in_channels: int = 3) -> None:
    """Load the state dict in ``path`` into ``model.encoder`` strictly, or raise PretrainedWeightsError."""
    encoder = getattr(model, "encoder", None)
    if not isinstance(encoder, nn.Module):
        raise TypeError(f"{type(model).__name__} has no .encoder module to load weights into.")
    state = load_state_dict_file(path)
    # smp's timm encoders ("tu-...") wrap the timm model as ``encoder.model``: a plain timm backbone
    # state dict (e.g. the lab's Keras MobileNetV2 converted to timm) loads into that.
    candidates = [encoder]
    if isinstance(getattr(encoder, "model", None), nn.Module):
        candidates.append(encoder.model)
    scored = []
    for module in candidates:
        keys = set(module.state_dict())
        sub = dict(_strip_prefixes(state, keys))
        scored.append((len(sub.keys() & keys) / max(len(keys), 1), module, sub))
    _, encoder, sd = max(scored, key=lambda t: t[0])
    target = encoder.state_dict()
    dropped = set(sd) - set(target)
    if dropped and encoder is not model.encoder:  # a full backbone's head (conv_head, classifier) is not used
        sd = {k: v for k, v in sd.items() if k in target}

    mismatched = {
        k: (tuple(v.shape), tuple(target[k].shape))
        for k, v in sd.items()
        if k in target and tuple(v.shape) != tuple(target[k].shape)
    }
    if in_channels != 3 and len(mismatched) == 1:
        key, (got, want) = next(iter(mismatched.items()))
        same_rest = (got[0], *got[2:]) == (want[0], *want[2:])
        if len(got) == 4 and got[1] == 3 and want[1] == in_channels and same_rest:
            sd[key] = _adapt_input_conv(sd[key], in_channels)
            del mismatched[key]
    missing = {k for k in set(target) - set(sd) if not k.endswith("num_batches_tracked")}
    if missing or mismatched:
        parts = []
        if missing:
            parts.append(f"missing keys: {_short(missing)}")
        if mismatched:
            shapes = (f"{k} {got} vs {want}" for k, (got, want) in mismatched.items())
            parts.append(f"shape mismatches (file vs model): {_short(shapes)}")
        raise PretrainedWeightsError(
            f"Encoder weights file {path} does not fit encoder {type(encoder).__name__}: {'; '.join(parts)}. "
            "It must hold the encoder's state dict, e.g. torch.save(model.encoder.state_dict(), path) "
            "from a model with the same encoder."
        )
    unexpected = set(sd) - set(target)
    try:
        encoder.load_state_dict(sd)  # the encoder's own override may drop e.g. classifier keys
    except RuntimeError as err:
        raise PretrainedWeightsError(
            f"Could not load encoder weights file {path} into {type(encoder).__name__} "
            f"(unexpected keys: {_short(unexpected) or 'none'}): {err}"
        ) from err


# --------------------------------------------------------------------------------------------------
# Encoder weights through smp's download, failing fast offline
# --------------------------------------------------------------------------------------------------

HUB_PROBE_TIMEOUT_S = 5.0
"""Seconds to wait for a TCP connection to the weights host before declaring it unreachable."""


@dataclass(frozen=True)
class _WeightsSource:
    description: str  # human readable, e.g. "Hugging Face hub repo smp-hub/resnet34.imagenet"
    url: str  # a URL on the host that will be contacted (the hub endpoint, or the file's URL)
    cached: bool  # found in the local cache: smp will not need the network
    huggingface: bool  # governed by HF_HUB_OFFLINE
    repo_id: str | None = None  # Hugging Face: the repo, the first file fetched and its revision
    filename: str | None = None
    revision: str | None = None


def _hf_cached(repo_id: str, filename: str, revision: str | None) -> bool:
    return find_in_hf_cache(repo_id, (filename,), revision) is not None


def _weights_source(encoder: str, weights: str) -> tuple[_WeightsSource, str | bool]:
    """Where smp will fetch ``weights`` for ``encoder`` from, and the value to pass smp as encoder_weights."""
    timm_name = _timm_name(encoder)
    if timm_name is None:
        settings = smp.encoders.encoders[encoder]["pretrained_settings"]
        if weights not in settings:
            raise ValueError(
                f"No pretrained weights {weights!r} for encoder {encoder!r}; available: {', '.join(settings)}."
            )
        repo_id, revision = settings[weights]["repo_id"], settings[weights]["revision"]
        # smp downloads config.json and model.safetensors with hf_hub_download at a pinned commit.
        cached = all(_hf_cached(repo_id, f, revision) for f in ("config.json", "model.safetensors"))
        source = _WeightsSource(
            f"Hugging Face hub repo {repo_id}", hf_endpoint(), cached, True, repo_id, "config.json", revision
        )
        return source, weights

    if weights not in ("imagenet", "timm"):
        raise ValueError(
            f"For timm encoders ({encoder!r}) the pretrained weights are chosen by the name's tag "
            f"('tu-<model>.<tag>'); use encoder_weights='imagenet' (or 'timm'), got {weights!r}."
        )
    if not timm.models.is_model_pretrained(timm_name):
        raise ValueError(f"timm has no pretrained weights for {timm_name!r}; use encoder_weights=None.")
    cfg = timm.models.get_pretrained_cfg(timm_name)
    if cfg is None:
        raise ValueError(f"timm has no pretrained config for {timm_name!r}; use encoder_weights=None.")
    if cfg.state_dict is not None or cfg.file or cfg.source == "local-dir":
        return _WeightsSource(f"timm local weights for {timm_name}", "", True, False), True
    if cfg.hf_hub_id:
        repo_id, _, revision = cfg.hf_hub_id.partition("@")
        files = [cfg.hf_hub_filename] if cfg.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]
        cached = any(_hf_cached(repo_id, f, revision or None) for f in files)
        source = _WeightsSource(
            f"Hugging Face hub repo {repo_id}", hf_endpoint(), cached, True, repo_id, files[0], revision or None
        )
        return source, True
    if cfg.url:
        cached = _url_checkpoint(cfg.url).is_file()
        return _WeightsSource(f"URL {cfg.url}", cfg.url, cached, False), True
    raise ValueError(f"timm lists no download location for {timm_name!r}; use encoder_weights=None.")


def _probe(url: str, timeout: float = HUB_PROBE_TIMEOUT_S) -> str | None:
    """None if the host of ``url`` (or its proxy) accepts a TCP connection within ``timeout``, else why not."""
    ok, target = host_reachable(url, timeout)
    return None if ok else f"cannot connect to {target}"


def _weights_help(encoder: str, weights: str, reason: str, source: _WeightsSource) -> str:
    filename = f"{encoder.replace('/', '_')}_encoder.pth"
    weights_arg = "True" if _timm_name(encoder) is not None else repr(weights)
    return (
        f"Cannot get pretrained encoder weights {weights!r} for encoder {encoder!r} from "
        f"{source.description}: {reason}. They are not in the local cache, and this toolkit never "
        "continues with random weights instead. Supply the encoder's weights as a local file: "
        f"encoder_weights_file='/path/to/{filename}' with encoder_weights=None. Make that file on a machine "
        'with internet: python -c "import segmentation_models_pytorch as smp, torch; '
        f"m = smp.Unet('{encoder}', encoder_weights={weights_arg}); "
        f"torch.save(m.encoder.state_dict(), '{filename}')\". "
        "(Alternatives: copy a populated Hugging Face/torch hub cache here, "
        "or train with encoder_weights=None.)"
    )


def _url_checkpoint(url: str) -> Path:
    """Where torch hub (and so timm) caches the file of ``url``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urllib.parse.urlsplit(url).path)


def _build_with_hub_weights(
    create: _Factory,
    encoder: str,
    weights: str,
    *,
    hub_timeout: float = HUB_PROBE_TIMEOUT_S,
    read_timeout: float = NETWORK_TIMEOUT,
) -> nn.Module:
    """``create(weights)`` with smp's download bounded: ``hub_timeout`` for the TCP probe, ``read_timeout`` for
    each connect of, and each wait for bytes from, the hub or URL (neither smp, timm nor torch hub set one)."""
    source, smp_weights = _weights_source(encoder, weights)
    if not source.cached:
        if source.huggingface and hf_offline():
            reason = "Hugging Face hub offline mode is on (HF_HUB_OFFLINE)"
        else:
            reason = _probe(source.url, hub_timeout)
        if reason is not None:
            raise PretrainedWeightsError(_weights_help(encoder, weights, reason, source))
    create(None)  # configuration errors surface as themselves, not as weight download failures
    if not source.cached and source.huggingface and source.repo_id and source.filename:
        # one request without retries: huggingface_hub retries a timed-out one for minutes
        silence = hf_hub_silence(source.repo_id, source.filename, source.revision, read_timeout, endpoint=source.url)
        if silence is not None:
            raise PretrainedWeightsError(_weights_help(encoder, weights, silence, source))
    elif not source.cached and source.url:  # a plain URL: fetched here with timeouts into torch hub's cache
        try:
            download_url(source.url, _url_checkpoint(source.url), read_timeout)
        except Exception as err:  # TimeoutError, URLError, HTTPError, OSError
            reason = f"download failed with {type(err).__name__}: {err}"
            raise PretrainedWeightsError(_weights_help(encoder, weights, reason, source)) from err
    try:
        with hf_hub_timeouts(read_timeout):
            return create(smp_weights)
    except Exception as err:  # huggingface_hub, httpx, urllib, torch.load and safetensors errors
        raise PretrainedWeightsError(
            _weights_help(encoder, weights, f"download failed with {type(err).__name__}: {err}", source)
        ) from err
