"""timm backbone + the Keras lab's dense head, and the lab's named freezing regimes."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from covid_lightning.models.preprocess import Normalize
from covid_lightning.models.weights import create_timm_model, fetch_keras_weights, is_keras_weights_file

#: Keras MobileNetV2 layer -> timm ``mobilenetv2_*`` module: the one table of the lab's layer names.
KERAS_TO_TIMM: dict[str, str] = {
    "Conv_1": "conv_head",
    "Conv_1_bn": "bn2",
    "block_16_project": "blocks.6.0.conv_pwl",
    "block_16_project_BN": "blocks.6.0.bn3",
    "block_13": "blocks.5.0",  # whole inverted-residual blocks
    "block_14": "blocks.5.1",
    "block_15": "blocks.5.2",
    "block_16": "blocks.6.0",
}

#: Trainable backbone layers per regime, in Keras names (the head always trains); the lab's are the first three.
REGIMES: dict[str, tuple[str, ...]] = {
    "head": (),
    "last_conv": ("Conv_1", "Conv_1_bn"),
    "last_2_conv": ("block_16_project", "block_16_project_BN", "Conv_1", "Conv_1_bn"),
    "last_4_blocks": ("block_13", "block_14", "block_15", "block_16", "Conv_1", "Conv_1_bn"),  # the 7x7 stage
    "all": ("*",),
}

#: ``flavor`` -> timm options. ``keras`` reproduces Keras' MobileNetV2 (TF 'same' padding, BN eps 1e-3).
FLAVORS: dict[str, dict] = {"timm": {}, "keras": {"pad_type": "same", "bn_eps": 1e-3}}


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
    bns = [m for m in module.modules() if isinstance(m, _BatchNorm) and m.running_mean is not None]
    stats = sum(m.running_mean.numel() + m.running_var.numel() for m in bns)
    return ParamCount(trainable, sum(p.numel() for p in module.parameters()) - trainable, stats)


class XRayNet(nn.Module):
    """Normalize -> timm backbone (global average pooled) -> the lab's dense head; options as ``XRayClassifier``."""

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
        if flavor == "auto":
            flavor = "keras" if pretrained_file and is_keras_weights_file(pretrained_file) else "timm"
        if flavor not in FLAVORS:
            raise ValueError(f"Unknown flavor {flavor!r}; choose one of auto, {', '.join(FLAVORS)}.")
        self.flavor = flavor
        if flavor == "keras" and pretrained and pretrained_file is None:
            pretrained_file = str(fetch_keras_weights(backbone))
        self.backbone = create_timm_model(
            backbone, pretrained=pretrained, pretrained_file=pretrained_file, num_classes=0, global_pool="avg",
            **FLAVORS[flavor],
        )  # fmt: skip
        cfg = self.backbone.pretrained_cfg
        if normalization == "auto":
            normalization = "keras" if flavor == "keras" else "imagenet"
        self.normalize = Normalize(normalization, (cfg["mean"], cfg["std"]))
        self.normalization, self.mean, self.std = normalization, *self.normalize.mean_std
        layers: list[nn.Module] = []
        width = self.backbone.num_features
        for hidden in hidden_sizes:
            layers += [nn.Linear(width, hidden), nn.ReLU(inplace=True)] + ([nn.Dropout(dropout)] if dropout else [])
            width = hidden
        self.head = nn.Sequential(*layers, nn.Linear(width, num_classes))
        for m in self.head.modules():  # Keras Dense initialisation
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        self.set_trainable(trainable)

    def set_trainable(self, regime: str) -> None:
        """Freeze the backbone but the regime's layers (the head trains); frozen BN stays in eval mode."""
        if regime not in REGIMES:
            raise ValueError(f"Unknown trainable regime {regime!r}; choose one of {', '.join(REGIMES)}.")
        modules = []
        for keras_name in REGIMES[regime]:
            timm_name = "" if keras_name == "*" else KERAS_TO_TIMM[keras_name]
            try:
                modules.append(self.backbone.get_submodule(timm_name))
            except AttributeError as err:
                raise ValueError(
                    f"Regime {regime!r} needs the MobileNetV2 layer {keras_name} (timm {timm_name}), which "
                    f"backbone {type(self.backbone).__name__} lacks; use 'head' or 'all'."
                ) from err
        self.backbone.requires_grad_(False)
        for m in [*modules, self.head]:
            m.requires_grad_(True)
        self.trainable = regime
        self.train(self.training)

    def train(self, mode: bool = True) -> XRayNet:
        """Keras runs frozen BN in inference mode (moving statistics, never updated); so does this."""
        super().train(mode)
        for m in self.modules():
            if mode and isinstance(m, _BatchNorm) and not any(p.requires_grad for p in m.parameters()):
                m.eval()
        return self

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled backbone features (N, num_features)."""
        return self.backbone(self.normalize(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))

    # The frozen prefix of a regime, cacheable across epochs, and its trainable suffix.
    def can_split(self, regime: str | None = None) -> bool:
        """Whether :meth:`forward_prefix`/:meth:`forward_suffix` support ``regime`` on this backbone."""
        regime = regime or self.trainable
        b = self.backbone
        if regime == "head":
            return True
        if regime not in ("last_conv", "last_2_conv", "last_4_blocks") or not all(
            hasattr(b, n) for n in ("conv_stem", "bn1", "blocks", "conv_head", "bn2", "forward_head")
        ):
            return False
        if regime == "last_4_blocks":  # MobileNetV2's 7 stages, the 6th with 3 blocks (Keras block_13..15)
            return len(b.blocks) == 7 and len(b.blocks[5]) == 3 and len(b.blocks[6]) == 1
        last = b.blocks[-1]
        return regime == "last_conv" or (len(last) == 1 and hasattr(last[0], "conv_pwl") and not last[0].has_skip)

    @torch.no_grad()
    def forward_prefix(self, x: torch.Tensor, regime: str | None = None) -> torch.Tensor:
        """The frozen part of ``regime`` (eval mode): pooled features, or the input of the first trainable layer."""
        regime = regime or self.trainable
        if not self.can_split(regime):
            raise ValueError(f"No frozen prefix for regime {regime!r} on {type(self.backbone).__name__}.")
        if regime == "head":
            return self.forward_features(x)
        b = self.backbone
        x = b.bn1(b.conv_stem(self.normalize(x)))
        if regime != "last_2_conv":
            return b.blocks(x) if regime == "last_conv" else b.blocks[:5](x)
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
            z = b.blocks[-1][0].bn3(b.blocks[-1][0].conv_pwl(z))
        elif regime == "last_4_blocks":
            z = b.blocks[5:](z)
        return self.head(b.forward_head(b.bn2(b.conv_head(z))))
