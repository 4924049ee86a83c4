"""Keras legacy .h5 -> timm state dict: synthetic files in both layouts, and the real shared file."""

from __future__ import annotations

import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from torch import nn

from covid_lightning.models import weights
from covid_lightning.models.weights import (
    PretrainedWeightsError,
    create_timm_model,
    fetch_keras_weights,
    keras_to_timm,
    load_weights,
    read_state_dict,
)
from tests.conftest import KERAS_H5, KERAS_SAFETENSORS
from tests.helpers.silent_server import SilentServer


class Tiny(nn.Module):
    """Conv + BN, depthwise (multiplier 2) + BN, pointwise conv with bias, dense, optional classifier."""

    def __init__(self, width: int = 4, num_classes: int = 0) -> None:
        super().__init__()
        self.conv_stem = nn.Conv2d(3, width, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv_dw = nn.Conv2d(width, 2 * width, 3, groups=width, bias=False)
        self.bn2 = nn.BatchNorm2d(2 * width)
        self.conv_pw = nn.Conv2d(2 * width, 5, 1)
        self.fc = nn.Linear(5, 6)
        self.classifier = nn.Linear(6, num_classes) if num_classes else nn.Identity()
        self.pretrained_cfg = {"classifier": "classifier"}


def _keras_layers(sd: dict[str, torch.Tensor]) -> list[tuple[str, list[tuple[str, np.ndarray]]]]:
    """The Keras (layer, [(weight_name, array)]) list that corresponds to a Tiny state dict."""

    def bn(prefix: str, layer: str) -> tuple[str, list[tuple[str, np.ndarray]]]:
        names = [
            ("gamma", "weight"),
            ("beta", "bias"),
            ("moving_mean", "running_mean"),
            ("moving_variance", "running_var"),
        ]
        return layer, [(f"{layer}/{k}:0", sd[f"{prefix}.{t}"].numpy()) for k, t in names]

    dw = sd["conv_dw.weight"].numpy()  # (C*M, 1, H, W) -> (H, W, C, M)
    c = sd["bn1.weight"].numpy().shape[0]
    dw_keras = dw.reshape(c, dw.shape[0] // c, dw.shape[2], dw.shape[3]).transpose(2, 3, 0, 1)
    return [
        ("input_1", []),
        ("Conv1", [("Conv1/kernel:0", sd["conv_stem.weight"].numpy().transpose(2, 3, 1, 0))]),
        bn("bn1", "bn_Conv1"),
        ("Conv1_relu", []),
        ("dw", [("dw/depthwise_kernel:0", dw_keras)]),
        bn("bn2", "dw_bn"),
        (
            "pw",
            [
                ("pw/kernel:0", sd["conv_pw.weight"].numpy().transpose(2, 3, 1, 0)),
                ("pw/bias:0", sd["conv_pw.bias"].numpy()),
            ],
        ),
        ("dense", [("dense/kernel:0", sd["fc.weight"].numpy().T), ("dense/bias:0", sd["fc.bias"].numpy())]),
    ]


def _write_h5(path: Path, layers, *, layout: str, names: str) -> Path:
    enc = (lambda xs: np.array([x.encode() for x in xs], dtype="S")) if names == "bytes" else list
    with h5py.File(path, "w") as f:
        root = f.create_group("model_weights") if layout == "model_weights" else f
        root.attrs["layer_names"] = enc([layer for layer, _ in layers])
        for layer, weights in layers:
            group = root.create_group(layer)
            # The full-model layout nests each weight one level deeper (layer/layer/kernel:0).
            wnames = [f"{layer}/{w}" if layout == "model_weights" else w for w, _ in weights]
            group.attrs["weight_names"] = enc(wnames)
            for wname, (_, array) in zip(wnames, weights):
                group.create_dataset(wname, data=array)
    return path


def _random_sd(model: nn.Module) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    sd = {}
    for k, v in model.state_dict().items():
        sd[k] = v if not v.is_floating_point() else torch.rand(v.shape, generator=g) + 0.1
    return sd


@pytest.mark.parametrize(("layout", "names"), [("top", "bytes"), ("model_weights", "str"), ("top", "str")])
@pytest.mark.parametrize("num_classes", [0, 3])
def test_synthetic_roundtrip(tmp_path: Path, layout: str, names: str, num_classes: int) -> None:
    source = _random_sd(Tiny())
    path = _write_h5(tmp_path / "w.h5", _keras_layers(source), layout=layout, names=names)
    assert len(read_state_dict(path)) == 14
    model = Tiny(num_classes=num_classes)
    head = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("classifier.")}
    assert len(head) == (2 if num_classes else 0)
    load_weights(model, path)
    loaded = model.state_dict()
    for key, value in {**source, **head}.items():  # the backbone from the h5, the classifier left as built
        assert torch.equal(loaded[key], value), key


def _convert(path: Path, model: nn.Module) -> dict[str, torch.Tensor]:
    return keras_to_timm(read_state_dict(path), model, path)


def test_synthetic_wrong_width_names_everything(tmp_path: Path) -> None:
    path = _write_h5(tmp_path / "w.h5", _keras_layers(_random_sd(Tiny(width=4))), layout="top", names="bytes")
    with pytest.raises(PretrainedWeightsError) as err:
        _convert(path, Tiny(width=8))
    msg = str(err.value)
    assert str(path) in msg and "Conv1/kernel:0" in msg and "conv_stem.weight" in msg
    assert "(4, 3, 3, 3)" in msg and "(8, 3, 3, 3)" in msg and "alpha" in msg


def test_synthetic_count_and_role_mismatch(tmp_path: Path) -> None:
    layers = _keras_layers(_random_sd(Tiny()))
    short = _write_h5(tmp_path / "short.h5", layers[:-1], layout="top", names="str")
    with pytest.raises(PretrainedWeightsError, match=r"12 weight arrays but Tiny has 14 .*fc\.weight"):
        _convert(short, Tiny())
    # gamma/beta swapped: same shapes, so only the role check can catch it.
    name, weights = layers[2]
    layers[2] = (name, [weights[1], weights[0], *weights[2:]])
    swapped = _write_h5(tmp_path / "swapped.h5", layers, layout="top", names="str")
    with pytest.raises(PretrainedWeightsError, match=r"bn_Conv1/beta:0.*'bn1\.weight'"):
        _convert(swapped, Tiny())


def test_not_a_keras_file(tmp_path: Path) -> None:
    with pytest.raises(PretrainedWeightsError, match="does not exist"):
        _convert(tmp_path / "nope.h5", Tiny())
    with h5py.File(tmp_path / "plain.h5", "w") as f:
        f.create_dataset("x", data=np.zeros(3))
    with pytest.raises(PretrainedWeightsError, match="layer_names"):
        _convert(tmp_path / "plain.h5", Tiny())


def _keras_model(name: str = "mobilenetv2_050", **kwargs) -> nn.Module:
    import timm

    return timm.create_model(name, pad_type="same", bn_eps=1e-3, **{"num_classes": 0, **kwargs})


def test_real_h5_equals_shared_safetensors(keras_weights: Path) -> None:
    from safetensors.torch import load_file

    assert len(read_state_dict(KERAS_H5)) == 260
    reference = load_file(str(KERAS_SAFETENSORS))
    model = create_timm_model("mobilenetv2_050", pretrained_file=KERAS_H5, num_classes=0, pad_type="same", bn_eps=1e-3)
    sd = model.state_dict()
    assert len(reference) == 312 and set(sd) == set(reference)
    for key, value in reference.items():
        assert sd[key].dtype == value.dtype and torch.equal(sd[key], value), key

    with_head = _convert(KERAS_H5, _keras_model(num_classes=2))
    assert set(with_head) == {k for k in reference if not k.endswith("num_batches_tracked")}


def test_real_h5_wrong_model(keras_weights: Path) -> None:
    with pytest.raises(PretrainedWeightsError) as err:
        _convert(KERAS_H5, _keras_model("mobilenetv2_100"))
    msg = str(err.value)
    assert KERAS_H5.name in msg and "Conv1" in msg and "conv_stem.weight" in msg
    assert "(32, 3, 3, 3)" in msg and "alpha" in msg and "num_classes=0" in msg


def test_fetch_from_a_silent_server_fails_with_instructions(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The weights host accepts TCP but never answers: a read timeout, the file to supply, nothing half-written."""
    for var in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    hub = tmp_path / "torch_hub"
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))
    with SilentServer() as server:
        monkeypatch.setattr(weights, "KERAS_WEIGHTS_BASE", f"{server.url}/keras/")
        start = time.monotonic()
        with pytest.raises(PretrainedWeightsError) as err:
            fetch_keras_weights("mobilenetv2_050", hub_timeout=2.0, read_timeout=2.0)
        elapsed = time.monotonic() - start
        assert server.connections, "the download never reached the silent server"
    assert elapsed < 30, elapsed
    msg = str(err.value)
    filename = "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.5_224_no_top.h5"
    assert "sent nothing for 2 s" in msg and f"{server.url}/keras/{filename}" in msg
    assert "--model.pretrained_file PATH" in msg and str(hub / "checkpoints" / filename) in msg
    assert list((hub / "checkpoints").iterdir()) == []  # no partial .h5 left in the cache
