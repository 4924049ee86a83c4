"""timm backbone + the Keras lab's dense head, and the lab's named freezing regimes.

The one table of the lab's layer names lives here: :data:`KERAS_TO_TIMM` and :data:`REGIMES`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import timm
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from covid_lightning.models.keras_h5 import fetch_keras_weights, is_keras_weights_file
from covid_lightning.models.preprocess import NORMALIZATIONS, Normalize
from covid_lightning.models.weights import create_timm_model

#: Keras MobileNetV2 layer -> timm ``mobilenetv2_*`` module (EfficientNet-family naming).
KERAS_TO_TIMM: dict[str, str] = {
    "Conv_1": "conv_head",
    "Conv_1_bn": "bn2",
    "block_16_project": "blocks.6.0.conv_pwl",
    "block_16_project_BN": "blocks.6.0.bn3",
    # whole inverted-residual blocks (expand, depthwise, project and their BN)
    "block_13": "blocks.5.0",
    "block_14": "blocks.5.1",
    "block_15": "blocks.5.2",
    "block_16": "blocks.6.0",
}

#: Trainable backbone layers per regime, in Keras names (the head is always trainable).
#: ``all`` trains the whole backbone. The lab's three regimes are the first three.
REGIMES: dict[str, tuple[str, ...]] = {
    "head": (),
    "last_conv": ("Conv_1", "Conv_1_bn"),
    "last_2_conv": ("block_16_project", "block_16_project_BN", "Conv_1", "Conv_1_bn"),
    # beyond the lab: the last four inverted-residual blocks (the 7x7 stage) + Conv_1; still cacheable
    "last_4_blocks": ("block_13", "block_14", "block_15", "block_16", "Conv_1", "Conv_1_bn"),
    "all": ("*",),
}

#: ``flavor`` -> timm options. ``keras`` reproduces Keras' MobileNetV2 (TF 'same' padding, BN eps 1e-3).
FLAVORS: dict[str, dict] = {"timm": {}, "keras": {"pad_type": "same", "bn_eps": 1e-3}}


def resolve_flavor(flavor: str, pretrained_file: str | None) -> str:
    """``auto`` -> ``keras`` for Keras weights (an ``.h5``, or a safetensors converted from one), else ``timm``."""
    if flavor == "auto":
        return "keras" if pretrained_file and is_keras_weights_file(pretrained_file) else "timm"
    if flavor not in FLAVORS:
        raise ValueError(f"Unknown flavor {flavor!r}; choose one of auto, {', '.join(FLAVORS)}.")
    return flavor


def resolve_normalization(normalization: str, flavor: str, backbone: str) -> tuple[str, list[float], list[float]]:
    """Name, mean and std of the input normalisation; ``auto`` follows the weights in use."""
    if normalization == "auto":
        normalization = "keras" if flavor == "keras" else "imagenet"
    if normalization == "imagenet":
        cfg = timm.get_pretrained_cfg(backbone)
        mean, std = (cfg.mean, cfg.std) if cfg is not None else NORMALIZATIONS["imagenet"]
        return normalization, list(mean), list(std)
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"Unknown normalization {normalization!r}; choose one of auto, {', '.join(NORMALIZATIONS)}.")
    mean, std = NORMALIZATIONS[normalization]
    return normalization, list(mean), list(std)


def build_head(in_features: int, hidden_sizes: Sequence[int], num_classes: int, dropout: float = 0.0) -> nn.Sequential:
    """The lab's dense head: (Dense + ReLU [+ Dropout]) per hidden size, then a linear classifier.

    Initialised like Keras Dense (Glorot uniform weights, zero bias).
    """
    layers: list[nn.Module] = []
    for width in hidden_sizes:
        layers += [nn.Linear(in_features, width), nn.ReLU(inplace=True)]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        in_features = width
    layers.append(nn.Linear(in_features, num_classes))
    head = nn.Sequential(*layers)
    for m in head.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)
    return head


@dataclass(frozen=True)
class ParamCount:
    """Parameter counts the way Keras reports them (BN moving stats count as non-trainable)."""

    trainable: int
    frozen: int
    bn_stats: int

    @property
    def total(self) -> int:
        return self.trainable + self.frozen + self.bn_stats


def count_parameters(module: nn.Module) -> ParamCount:
    """Trainable parameters, frozen parameters and BN running mean/var values of ``module``."""
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in module.parameters() if not p.requires_grad)
    stats = sum(
        m.running_mean.numel() + m.running_var.numel()
        for m in module.modules()
        if isinstance(m, _BatchNorm) and m.running_mean is not None
    )
    return ParamCount(trainable, frozen, stats)


def set_requires_grad(module: nn.Module, flag: bool) -> None:
    for p in module.parameters():
        p.requires_grad_(flag)


def keep_frozen_bn_in_eval(module: nn.Module) -> None:
    """Put every BatchNorm whose parameters are all frozen into eval mode, as Keras does.

    Keras runs frozen BN in inference mode: it normalises with the moving statistics and never
    updates them. (Lightning's ``BaseFinetuning.freeze(train_bn=False)`` instead switches off
    ``track_running_stats``, which normalises with batch statistics in training and moving
    statistics in evaluation, so train and eval disagree.)
    """
    for m in module.modules():
        if isinstance(m, _BatchNorm) and not any(p.requires_grad for p in m.parameters()):
            m.eval()


class XRayNet(nn.Module):
    """Normalize -> timm backbone (global average pooled) -> dense head.

    Args:
        backbone: any timm model name; ``mobilenetv2_050`` is the PyTorch twin of Keras alpha=0.5.
        num_classes: outputs of the last dense layer.
        hidden_sizes: the head's hidden Dense widths (the lab: 1024, 512).
        dropout: dropout after each hidden Dense.
        pretrained: load ImageNet weights: the timm way (HF hub + cache) for flavor ``timm``, Keras
            Applications' ``.h5`` (torch hub cache) for flavor ``keras``; fails fast offline.
        pretrained_file: local ``.safetensors``/``.pth``/Keras ``.h5`` backbone weights.
        flavor: ``keras`` = the lab's Keras MobileNetV2: Keras weights, Keras-equivalent layers (same
            padding, BN eps 1e-3) and, with ``normalization: auto``, x/127.5-1 inputs; ``auto`` picks
            it for Keras weight files.
        normalization: ``auto`` follows the weights (``keras``: x/127.5-1, ``imagenet``: the
            backbone's timm mean/std); ``unit`` is the lab's x/255.
        trainable: the freezing regime, a key of :data:`REGIMES`.
    """

    def __init__(
        self,
        backbone: str = "mobilenetv2_050",
        num_classes: int = 4,
        hidden_sizes: Sequence[int] = (1024, 512),
        dropout: float = 0.0,
        pretrained: bool = False,
        pretrained_file: str | None = None,
        flavor: str = "auto",
        normalization: str = "auto",
        trainable: str = "all",
    ) -> None:
        super().__init__()
        self.flavor = resolve_flavor(flavor, pretrained_file)
        self.normalization, mean, std = resolve_normalization(normalization, self.flavor, backbone)
        self.normalize = Normalize(mean, std)
        if self.flavor == "keras" and pretrained and pretrained_file is None:
            pretrained_file = str(fetch_keras_weights(backbone))
        self.backbone = create_timm_model(
            backbone,
            pretrained=pretrained,
            pretrained_file=pretrained_file,
            num_classes=0,
            global_pool="avg",
            **FLAVORS[self.flavor],
        )
        self.head = build_head(self.backbone.num_features, hidden_sizes, num_classes, dropout)
        self.set_trainable(trainable)

    @property
    def mean(self) -> list[float]:
        return self.normalize.mean.flatten().tolist()

    @property
    def std(self) -> list[float]:
        return self.normalize.std.flatten().tolist()

    def backbone_modules(self, regime: str) -> list[nn.Module]:
        """The backbone modules a regime trains (resolved from the Keras names in :data:`REGIMES`)."""
        if regime not in REGIMES:
            raise ValueError(f"Unknown trainable regime {regime!r}; choose one of {', '.join(REGIMES)}.")
        names = REGIMES[regime]
        if names == ("*",):
            return [self.backbone]
        modules = []
        for keras_name in names:
            timm_name = KERAS_TO_TIMM[keras_name]
            try:
                modules.append(self.backbone.get_submodule(timm_name))
            except AttributeError as err:
                raise ValueError(
                    f"Regime {regime!r} needs the MobileNetV2 layer {keras_name} (timm {timm_name}), which "
                    f"backbone {type(self.backbone).__name__} does not have; use 'head' or 'all'."
                ) from err
        return modules

    def set_trainable(self, regime: str) -> None:
        """Freeze the backbone but the regime's layers; the head stays trainable; frozen BN -> eval."""
        modules = self.backbone_modules(regime)
        set_requires_grad(self.backbone, False)
        for m in modules:
            set_requires_grad(m, True)
        set_requires_grad(self.head, True)
        self.trainable = regime
        self.train(self.training)

    def train(self, mode: bool = True) -> XRayNet:
        super().train(mode)
        if mode:
            keep_frozen_bn_in_eval(self)
        return self

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled backbone features (N, num_features)."""
        return self.backbone(self.normalize(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))

    # frozen prefix / trainable suffix -----------------------------------------------------------
    def can_split(self, regime: str | None = None) -> bool:
        """Whether :meth:`forward_prefix`/:meth:`forward_suffix` support ``regime`` on this backbone."""
        regime = regime or self.trainable
        if regime == "head":
            return True
        needs = ("conv_stem", "bn1", "blocks", "conv_head", "bn2", "forward_head")
        if regime not in ("last_conv", "last_2_conv", "last_4_blocks") or not all(
            hasattr(self.backbone, n) for n in needs
        ):
            return False
        blocks = self.backbone.blocks
        if regime == "last_4_blocks":  # MobileNetV2's 7 stages, the 6th with 3 blocks (Keras block_13..15)
            return len(blocks) == 7 and len(blocks[5]) == 3 and len(blocks[6]) == 1
        last = blocks[-1]
        return regime == "last_conv" or (len(last) == 1 and hasattr(last[0], "conv_pwl") and not last[0].has_skip)

    @torch.no_grad()
    def forward_prefix(self, x: torch.Tensor, regime: str | None = None) -> torch.Tensor:
        """The frozen part of ``regime``: its output is the input of the first trainable layer.

        ``head``: pooled features (N, 1280); ``last_conv``: the input of Keras ``Conv_1`` (N, 160, 7, 7);
        ``last_2_conv``: the input of ``block_16_project`` (N, 480, 7, 7); ``last_4_blocks``: the input of
        ``block_13`` (N, 48, 14, 14) (MobileNetV2-050 at 224 px).
        Run in eval mode, it is a pure function of the image: cacheable across epochs.
        """
        regime = regime or self.trainable
        if not self.can_split(regime):
            raise ValueError(f"No frozen prefix for regime {regime!r} on {type(self.backbone).__name__}.")
        if regime == "head":
            return self.forward_features(x)
        b = self.backbone
        x = b.bn1(b.conv_stem(self.normalize(x)))
        if regime == "last_conv":
            return b.blocks(x)
        if regime == "last_4_blocks":
            return b.blocks[:5](x)
        x = b.blocks[:-1](x)
        blk = b.blocks[-1][0]
        if getattr(blk, "conv_s2d", None) is not None:
            x = blk.bn_s2d(blk.conv_s2d(x))
        return blk.se(blk.aa(blk.bn2(blk.conv_dw(blk.bn1(blk.conv_pw(x))))))

    def forward_suffix(self, z: torch.Tensor, regime: str | None = None) -> torch.Tensor:
        """Logits from :meth:`forward_prefix`'s output: the trainable rest of the network."""
        regime = regime or self.trainable
        if regime == "head":
            return self.head(z)
        b = self.backbone
        if regime == "last_2_conv":
            blk = b.blocks[-1][0]
            z = blk.bn3(blk.conv_pwl(z))
        elif regime == "last_4_blocks":
            z = b.blocks[5:](z)
        return self.head(b.forward_head(b.bn2(b.conv_head(z))))
