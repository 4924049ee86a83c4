"""covid_lightning.models.segmentation: SeedUNet, the smp builder, and offline-safe encoder weights."""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path

import huggingface_hub.constants
import pytest
import segmentation_models_pytorch as smp
import timm
import torch
from safetensors.torch import save_file
from torch import nn

from covid_lightning.models.segmentation import (
    SEGMENTATION_ARCHS,
    SeedUNet,
    build_segmentation_model,
    required_input_divisor,
)
from covid_lightning.models.weights import PretrainedWeightsError
from tests.helpers.silent_server import SilentServer

_PROXY_VARS = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy")


def _n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _assert_same_tensors(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(want)
    for key, tensor in want.items():
        assert torch.equal(got[key], tensor), key


@pytest.fixture
def isolated_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Empty Hugging Face and torch hub caches under tmp_path; no proxies. Returns the HF hub cache dir."""
    hub_cache = tmp_path / "hf" / "hub"
    hub_cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(hub_cache))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    # huggingface_hub reads its env vars once at import: point the live constants at tmp_path too.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub_cache))
    for var in _PROXY_VARS:
        monkeypatch.delenv(var, raising=False)
    return hub_cache


@pytest.fixture
def offline_hub(isolated_hub: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return isolated_hub


# ---------------------------------------------------------------------------------------------- SeedUNet


def test_seed_unet_has_the_keras_parameter_count() -> None:
    assert _n_params(SeedUNet()) == 466_529


@pytest.mark.parametrize(("batch", "h", "w"), [(2, 128, 128), (1, 64, 96)])
def test_seed_unet_output_shape(batch: int, h: int, w: int) -> None:
    with torch.no_grad():
        y = SeedUNet().eval()(torch.randn(batch, 3, h, w))
    assert y.shape == (batch, 1, h, w)


def test_seed_unet_returns_logits_not_probabilities() -> None:
    torch.manual_seed(0)
    model = SeedUNet().eval()
    with torch.no_grad():
        nn.init.constant_(model.head.bias, 2.0)  # a sigmoid output could never exceed 1
        y = model(torch.rand(1, 3, 64, 64))
    assert (y > 1).any()
    with torch.no_grad():
        nn.init.constant_(model.head.bias, -2.0)
        assert (model(torch.rand(1, 3, 64, 64)) < 0).any()


def test_seed_unet_uses_keras_initialisation() -> None:
    torch.manual_seed(0)
    model = SeedUNet()
    convs = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
    assert len(convs) == 13
    for conv in convs:
        assert torch.count_nonzero(conv.bias) == 0
        receptive = conv.weight[0, 0].numel()
        limit = math.sqrt(6.0 / ((conv.in_channels + conv.out_channels) * receptive))
        assert conv.weight.abs().max() <= limit
        if conv.weight.numel() > 10_000:  # uniform(-limit, limit) has std limit / sqrt(3)
            assert conv.weight.std().item() == pytest.approx(limit / math.sqrt(3), rel=0.05)


def test_seed_unet_layout_and_options() -> None:
    model = SeedUNet(in_channels=1, base_channels=16, classes=2)
    assert model.enc1[0].in_channels == 1 and model.enc1[0].out_channels == 16
    assert model.up2.in_channels == 64 and model.up2.out_channels == 32
    assert model.dec2[0].in_channels == 64  # 32 upsampled + 32 skip
    assert model.head.kernel_size == (1, 1)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert SeedUNet()(torch.zeros(1, 3, 32, 32)).shape == (1, 1, 32, 32)
    assert model(torch.zeros(1, 1, 32, 48)).shape == (1, 2, 32, 48)
    assert required_input_divisor(model) == 4
    with pytest.raises(ValueError, match="divisible by 4"):
        model(torch.zeros(1, 1, 30, 32))


def test_seed_unet_batch_norm_variant() -> None:
    model = SeedUNet(batch_norm=True)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    convs3 = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
    assert len(bns) == len(convs3) == 10
    assert all(conv.bias is None for conv in convs3)
    assert model.enc1[1] is bns[0]  # conv -> BN -> ReLU
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 1, 64, 64)


# ---------------------------------------------------------------------------------------------- builder


def test_segmentation_archs_lists_seed_unet_and_smp() -> None:
    assert SEGMENTATION_ARCHS[0] == "seed_unet"
    assert {"Unet", "UnetPlusPlus", "FPN", "DeepLabV3Plus", "Segformer", "DPT"} <= set(SEGMENTATION_ARCHS)
    assert {a.lower() for a in SEGMENTATION_ARCHS[1:]} == set(smp.MODEL_ARCHITECTURES_MAPPING)


def test_build_seed_unet() -> None:
    model = build_segmentation_model()
    assert isinstance(model, SeedUNet) and _n_params(model) == 466_529
    assert isinstance(build_segmentation_model("Seed-UNet", encoder="ignored"), SeedUNet)
    bn = build_segmentation_model("seed_unet", in_channels=1, classes=3, batch_norm=True, base_channels=8)
    assert bn(torch.zeros(1, 1, 16, 16)).shape == (1, 3, 16, 16)


@pytest.mark.parametrize(
    ("arch", "encoder", "divisor"),
    [
        ("Unet", "resnet34", 32),
        ("UnetPlusPlus", "resnet34", 32),
        ("FPN", "resnet34", 32),
        ("DeepLabV3Plus", "resnet34", 16),
        ("unet", "tu-mobilenetv2_050", 32),
    ],
)
def test_smp_archs_build_offline(arch: str, encoder: str, divisor: int, offline_hub: Path) -> None:
    model = build_segmentation_model(arch, encoder=encoder).eval()
    assert required_input_divisor(model) == divisor
    with torch.no_grad():
        y = model(torch.randn(1, 3, 64, 96))
    assert y.shape == (1, 1, 64, 96)


def test_unknown_arch_lists_valid_names() -> None:
    with pytest.raises(ValueError, match="Unknown segmentation architecture") as err:
        build_segmentation_model("UNetX")
    for name in SEGMENTATION_ARCHS:
        assert name in str(err.value)


@pytest.mark.parametrize(
    ("encoder", "suggestion"), [("resnt34", "resnet34"), ("tu-mobilenetv2_05", "tu-mobilenetv2_050")]
)
def test_unknown_encoder_lists_close_matches(encoder: str, suggestion: str) -> None:
    with pytest.raises(ValueError, match="Unknown encoder") as err:
        build_segmentation_model("Unet", encoder=encoder)
    assert suggestion in str(err.value)


def test_invalid_weight_arguments() -> None:
    with pytest.raises(ValueError, match="no encoder"):
        build_segmentation_model("seed_unet", encoder_weights="imagenet")
    with pytest.raises(ValueError, match="not both"):
        build_segmentation_model("Unet", encoder_weights="imagenet", encoder_weights_file="x.pth")
    with pytest.raises(ValueError, match="imagenet"):  # lists the weights resnet34 has
        build_segmentation_model("Unet", encoder_weights="instagram")


# ---------------------------------------------------------------------------------------------- hub weights


@pytest.mark.parametrize("encoder", ["resnet34", "tu-mobilenetv2_050"])
@pytest.mark.parametrize("network", ["hf_offline_flag", "dead_endpoint"])
def test_encoder_weights_fail_fast_offline(
    encoder: str, network: str, isolated_hub: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if network == "hf_offline_flag":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: connection refused
    start = time.monotonic()
    with pytest.raises(PretrainedWeightsError) as err:
        build_segmentation_model("Unet", encoder=encoder, encoder_weights="imagenet")
    assert time.monotonic() - start < 15
    message = str(err.value)
    assert "encoder_weights_file" in message and "torch.save(m.encoder.state_dict()" in message
    assert not list(isolated_hub.rglob("*.safetensors"))


@pytest.fixture
def online_hub(isolated_hub: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``isolated_hub`` with every offline flag off, so a download is really attempted."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    return isolated_hub


@pytest.mark.parametrize("encoder", ["resnet34", "tu-mobilenetv2_050"])
def test_encoder_weights_silent_hub_fail_with_instructions(
    encoder: str, online_hub: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The hub accepts TCP but never answers: a read timeout, then the same local-file instructions."""
    before = (huggingface_hub.constants.HF_HUB_ETAG_TIMEOUT, huggingface_hub.constants.HF_HUB_DOWNLOAD_TIMEOUT)
    with SilentServer() as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        start = time.monotonic()
        with pytest.raises(PretrainedWeightsError) as err:
            build_segmentation_model(
                "Unet", encoder=encoder, encoder_weights="imagenet", hub_timeout=2.0, read_timeout=1.0
            )
        elapsed = time.monotonic() - start
        assert server.connections, "the hub request never reached the silent server"
    assert elapsed < 30, elapsed
    message = str(err.value)
    assert server.url in message and "no answer within 1 s" in message
    assert "encoder_weights_file" in message and "torch.save(m.encoder.state_dict()" in message
    assert not list(online_hub.rglob("*.safetensors"))
    after = (huggingface_hub.constants.HF_HUB_ETAG_TIMEOUT, huggingface_hub.constants.HF_HUB_DOWNLOAD_TIMEOUT)
    assert after == before


def test_timm_url_encoder_weights_silent_host_fail_with_instructions(
    online_hub: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """timm weights at a plain URL (torch hub's download has no timeout) from a host that never answers."""
    real_cfg = timm.models.get_pretrained_cfg
    with SilentServer() as server:
        url = f"{server.url}/legacy_seresnet18.pth"

        def silent_url(name: str, *args, **kwargs):
            cfg = real_cfg(name, *args, **kwargs)
            ours = cfg is not None and name.startswith("legacy_seresnet18")
            return dataclasses.replace(cfg, url=url) if ours else cfg

        monkeypatch.setattr(timm.models, "get_pretrained_cfg", silent_url)
        start = time.monotonic()
        with pytest.raises(PretrainedWeightsError) as err:
            build_segmentation_model(
                "Unet", encoder="tu-legacy_seresnet18", encoder_weights="imagenet", hub_timeout=2.0, read_timeout=1.0
            )
        elapsed = time.monotonic() - start
        assert server.connections, "the download never reached the silent server"
    assert elapsed < 30, elapsed
    message = str(err.value)
    assert url in message and "TimeoutError" in message and "sent nothing for 1 s" in message
    assert "encoder_weights_file" in message and "torch.save(m.encoder.state_dict()" in message
    assert not [p for p in (tmp_path / "torch").rglob("*") if p.is_file()]  # no partial checkpoint


def _fake_hf_cache(hub_cache: Path, repo_id: str, files: dict[str, dict[str, torch.Tensor] | str],
                   revision: str, ref: str | None = None) -> None:  # fmt: skip
    """Lay out a Hugging Face hub cache entry the way hf_hub_download leaves it."""
    repo_dir = hub_cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo_dir / "snapshots" / revision
    snapshot.mkdir(parents=True)
    for name, content in files.items():
        if isinstance(content, str):
            (snapshot / name).write_text(content)
        else:
            save_file({k: v.contiguous() for k, v in content.items()}, str(snapshot / name))
    if ref is not None:
        (repo_dir / "refs").mkdir()
        (repo_dir / "refs" / ref).write_text(revision)


def test_encoder_weights_from_local_hf_cache_work_offline(offline_hub: Path) -> None:
    settings = smp.encoders.encoders["mobilenet_v2"]["pretrained_settings"]["imagenet"]
    torch.manual_seed(1)
    cached = {k: v.clone() for k, v in smp.encoders.get_encoder("mobilenet_v2").state_dict().items()}
    _fake_hf_cache(offline_hub, settings["repo_id"], {"config.json": "{}", "model.safetensors": cached},
                   settings["revision"])  # fmt: skip
    model = build_segmentation_model("FPN", encoder="mobilenet_v2", encoder_weights="imagenet")
    _assert_same_tensors(model.encoder.state_dict(), cached)


def test_timm_encoder_weights_from_local_hf_cache_work_offline(offline_hub: Path) -> None:
    cfg = timm.models.get_pretrained_cfg("mobilenetv2_050")
    torch.manual_seed(2)
    full = timm.create_model("mobilenetv2_050").state_dict()
    _fake_hf_cache(offline_hub, cfg.hf_hub_id, {"model.safetensors": full}, "0" * 40, ref="main")
    model = build_segmentation_model("Unet", encoder="tu-mobilenetv2_050", encoder_weights="imagenet")
    got = model.encoder.state_dict()
    assert torch.equal(got["model.conv_stem.weight"], full["conv_stem.weight"])
    assert torch.equal(got["model.blocks.6.0.conv_pwl.weight"], full["blocks.6.0.conv_pwl.weight"])


# ---------------------------------------------------------------------------------------------- weights file


@pytest.fixture(scope="module")
def resnet18_source() -> nn.Module:
    torch.manual_seed(3)
    return build_segmentation_model("Unet", encoder="resnet18")


@pytest.mark.parametrize("layout", ["encoder_pth", "encoder_prefixed_pth", "full_model_safetensors"])
def test_encoder_weights_file_loads_all_encoder_tensors(
    layout: str, resnet18_source: nn.Module, tmp_path: Path
) -> None:
    want = resnet18_source.encoder.state_dict()
    if layout == "encoder_pth":
        path = tmp_path / "resnet18_encoder.pth"
        torch.save(want, path)
    elif layout == "encoder_prefixed_pth":
        path = tmp_path / "resnet18_encoder.pth"
        torch.save({f"encoder.{k}": v for k, v in want.items()}, path)
    else:
        path = tmp_path / "unet.safetensors"
        save_file({k: v.contiguous() for k, v in resnet18_source.state_dict().items()}, str(path))
    model = build_segmentation_model("FPN", encoder="resnet18", encoder_weights_file=str(path))
    _assert_same_tensors(model.encoder.state_dict(), want)


def test_encoder_weights_file_keeps_timm_model_prefix(tmp_path: Path) -> None:
    torch.manual_seed(4)
    source = build_segmentation_model("FPN", encoder="tu-mobilenetv2_050")
    want = source.encoder.state_dict()
    assert all(k.startswith("model.") for k in want)
    path = tmp_path / "mnv2.pth"
    torch.save({f"module.{k}": v for k, v in want.items()}, path)
    model = build_segmentation_model("Unet", encoder="tu-mobilenetv2_050", encoder_weights_file=path)
    _assert_same_tensors(model.encoder.state_dict(), want)


def test_encoder_weights_file_adapts_first_conv_to_one_channel(resnet18_source: nn.Module, tmp_path: Path) -> None:
    want = resnet18_source.encoder.state_dict()
    path = tmp_path / "resnet18_encoder.pth"
    torch.save(want, path)
    model = build_segmentation_model("Unet", encoder="resnet18", encoder_weights_file=path, in_channels=1)
    got = model.encoder.state_dict()
    assert torch.allclose(got["conv1.weight"], want["conv1.weight"].sum(1, keepdim=True))
    assert torch.equal(got["layer4.1.conv2.weight"], want["layer4.1.conv2.weight"])
    assert model(torch.randn(1, 1, 64, 64)).shape == (1, 1, 64, 64)


def test_truncated_or_foreign_weights_file_fails(resnet18_source: nn.Module, tmp_path: Path) -> None:
    state = dict(resnet18_source.encoder.state_dict())
    del state["layer4.1.bn2.weight"]
    path = tmp_path / "truncated.pth"
    torch.save(state, path)
    with pytest.raises(PretrainedWeightsError, match="layer4.1.bn2.weight") as err:
        build_segmentation_model("Unet", encoder="resnet18", encoder_weights_file=path)
    assert "truncated.pth" in str(err.value)

    with pytest.raises(PretrainedWeightsError, match="does not exist"):
        build_segmentation_model("Unet", encoder="resnet18", encoder_weights_file=tmp_path / "missing.pth")
    torch.save(resnet18_source.encoder.state_dict(), tmp_path / "resnet18.pth")
    with pytest.raises(PretrainedWeightsError, match="layer1.2"):  # resnet34 has blocks resnet18 lacks
        build_segmentation_model("Unet", encoder="resnet34", encoder_weights_file=tmp_path / "resnet18.pth")


def test_timm_backbone_state_dict_loads_into_tu_encoder(keras_weights):
    """The lab's Keras MobileNetV2 (timm conversion) as the encoder of an smp U-Net."""
    import safetensors.torch as st

    path = keras_weights / "mobilenetv2_050_keras_imagenet.safetensors"
    model = build_segmentation_model(
        "Unet", encoder="tu-mobilenetv2_050", encoder_weights_file=str(path), pad_type="same", bn_eps=1e-3
    )
    saved = st.load_file(str(path))
    loaded = model.encoder.model.state_dict()
    assert len(loaded) > 300
    for key, value in loaded.items():
        if not key.endswith("num_batches_tracked"):
            assert torch.equal(value, saved[key]), key
