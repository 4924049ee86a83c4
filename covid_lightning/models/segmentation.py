"""Lung segmentation networks: the Keras lab's U-Net (``SeedUNet``) or an smp architecture, returning logits."""

from __future__ import annotations

import contextlib
import difflib
from pathlib import Path
from typing import Any

import segmentation_models_pytorch as smp
import timm
import torch
from torch import nn

from covid_lightning.models.preprocess import Normalize
from covid_lightning.models.weights import (
    NETWORK_TIMEOUT,
    PROBE_TIMEOUT,
    PretrainedWeightsError,
    check_timm_name,
    hf_hub_timeouts,
    hub_weights,
    load_weights,
    local_file_help,
)


def _double_conv(in_channels: int, out_channels: int, batch_norm: bool) -> nn.Sequential:
    """Two 3x3 "same" convolutions, each followed by ReLU (BatchNorm before it when asked)."""
    layers: list[nn.Module] = []
    for cin in (in_channels, out_channels):
        layers.append(nn.Conv2d(cin, out_channels, kernel_size=3, padding=1, bias=not batch_norm))
        layers += [nn.BatchNorm2d(out_channels)] if batch_norm else []
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class SeedUNet(nn.Module):
    """The lab's two-level Keras U-Net, layer for layer (466,529 parameters at the defaults); H, W divisible by 4."""

    input_divisor: int = 4

    def __init__(self, in_channels: int = 3, base_channels: int = 32, classes: int = 1, batch_norm: bool = False):
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
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2] % 4 or x.shape[-1] % 4:
            raise ValueError(f"SeedUNet needs height and width divisible by 4, got {x.shape[-2]}x{x.shape[-1]}.")
        s1 = self.enc1(x)
        s2 = self.enc2(self.pool(s1))
        d2 = self.dec2(torch.cat([self.up2(self.bottleneck(self.pool(s2))), s2], dim=1))
        return self.head(self.dec1(torch.cat([self.up1(d2), s1], dim=1)))


def required_input_divisor(model: nn.Module) -> int:
    """What H and W should be divisible by: SeedUNet 4, smp models their encoder's output stride."""
    return getattr(model, "input_divisor", None) or int(getattr(getattr(model, "encoder", None), "output_stride", 1))


#: Valid ``arch`` values (matched ignoring case, ``_`` and ``-``): ``seed_unet`` plus smp's architectures.
SEGMENTATION_ARCHS: tuple[str, ...] = ("seed_unet", *(c.__name__ for c in smp.MODEL_ARCHITECTURES_MAPPING.values()))


def _norm(name: str) -> str:
    return str(name).lower().replace("_", "").replace("-", "")


def _check_encoder(encoder: str) -> None:
    names = smp.encoders.get_encoder_names()
    if encoder.startswith("tu-"):
        with contextlib.suppress(ValueError):
            return check_timm_name(encoder[3:])
        names = [f"tu-{n}" for n in timm.list_models()]
    elif encoder in names:
        return
    close = difflib.get_close_matches(encoder, names, n=5)
    raise ValueError(
        f"Unknown encoder {encoder!r}. Close matches: {', '.join(close) or 'none'}. Any timm model works as "
        "'tu-<timm name>' (e.g. 'tu-mobilenetv2_050'); smp.encoders.get_encoder_names() lists smp's own."
    )


def build_segmentation_model(
    arch: str = "seed_unet",
    encoder: str = "resnet34",
    encoder_weights: str | None = None,
    encoder_weights_file: str | Path | None = None,
    in_channels: int = 3,
    classes: int = 1,
    hub_timeout: float = PROBE_TIMEOUT,
    read_timeout: float = NETWORK_TIMEOUT,
    **kwargs: Any,
) -> nn.Module:
    """A network returning logits ``(N, classes, H, W)``: ``seed_unet`` or an smp ``arch`` with ``encoder``."""
    by_norm = {_norm(name): name for name in SEGMENTATION_ARCHS}
    if _norm(arch) not in by_norm:
        close = difflib.get_close_matches(str(arch), SEGMENTATION_ARCHS, n=3, cutoff=0.5)
        raise ValueError(
            f"Unknown segmentation architecture {arch!r}. Did you mean {', '.join(close) or '-'}? "
            f"Valid names: {', '.join(SEGMENTATION_ARCHS)}."
        )
    name = by_norm[_norm(arch)]
    if name == "seed_unet":
        if encoder_weights is not None or encoder_weights_file is not None:
            raise ValueError("seed_unet has no encoder: encoder_weights and encoder_weights_file must be None for it.")
        return SeedUNet(in_channels=in_channels, classes=classes, **kwargs)
    if encoder_weights is not None and encoder_weights_file is not None:
        raise ValueError("Give either encoder_weights or encoder_weights_file, not both.")
    _check_encoder(encoder)
    options = {"encoder_name": encoder, "in_channels": in_channels, "classes": classes, **kwargs}
    if encoder_weights is None:
        model = smp.create_model(name, encoder_weights=None, **options)  # smp's default is imagenet
        if encoder_weights_file is not None:
            enc = model.encoder
            load_weights(enc.model if isinstance(enc, smp.encoders.TimmUniversalEncoder) else enc, encoder_weights_file)
        return model

    timm_name = encoder[3:] if encoder.startswith("tu-") else None
    out = f"{encoder.replace('/', '_')}_encoder.pth"
    how = local_file_help(
        f"import segmentation_models_pytorch as smp, torch; m = smp.Unet('{encoder}', encoder_weights="
        f"{'True' if timm_name else repr(encoder_weights)}); torch.save(m.encoder.state_dict(), '{out}')",
        f"--model.encoder_weights_file {out}` with `--model.encoder_weights null",
    )
    what = f"Pretrained encoder weights {encoder_weights!r} for encoder {encoder!r}"
    timeouts = {"hub_timeout": hub_timeout, "read_timeout": read_timeout}
    if timm_name is None:
        settings = smp.encoders.encoders[encoder]["pretrained_settings"]
        if encoder_weights not in settings:
            raise ValueError(f"No weights {encoder_weights!r} for {encoder!r}; available: {', '.join(settings)}.")
        source = settings[encoder_weights]
        files = ("config.json", "model.safetensors")  # what smp downloads, at a pinned revision
        hub_weights(what, how, repo=source["repo_id"], files=files, revision=source["revision"], **timeouts)
    elif encoder_weights in ("imagenet", "timm"):
        path = hub_weights(what, how, timm_name=timm_name, **timeouts)
        options.update(pretrained_cfg_overlay={"file": str(path)} if path else {})
    else:
        raise ValueError(f"tu- encoders take their tag's weights (encoder_weights imagenet), not {encoder_weights!r}.")
    try:
        with hf_hub_timeouts(read_timeout):
            return smp.create_model(name, encoder_weights=True if timm_name else encoder_weights, **options)
    except Exception as err:  # huggingface_hub, httpx, torch.load and safetensors errors
        raise PretrainedWeightsError(f"{what} failed to download or load: {type(err).__name__}: {err}\n{how}") from err


class SegmentationNet(nn.Module):
    """uint8 or [0, 1] images (N, 3, H, W) -> lung logits (N, 1, H, W); the options are ``LungSegmenter``'s."""

    def __init__(
        self,
        arch: str = "seed_unet",
        encoder: str = "resnet34",
        encoder_weights: str | None = None,
        encoder_weights_file: str | None = None,
        normalization: str = "auto",
        model_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if normalization == "auto":
            normalization = "unit" if encoder_weights is None and encoder_weights_file is None else "imagenet"
        self.normalize = Normalize(normalization)
        self.normalization, self.mean, self.std = normalization, *self.normalize.mean_std
        kwargs = model_kwargs or {}
        self.model = build_segmentation_model(arch, encoder, encoder_weights, encoder_weights_file, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(self.normalize(x))
