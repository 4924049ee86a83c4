"""create_timm_model: local files, a fake HF cache, fail-fast offline, Keras."""

from __future__ import annotations

import hashlib
import logging
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file

from covid_lightning.models.weights import PretrainedWeightsError, create_timm_model, download_url, hf_hub_timeouts
from tests.conftest import KERAS_H5, KERAS_SAFETENSORS
from tests.helpers.silent_server import SilentServer

ARCH = "mobilenetv2_050"
HUB_ID = "timm/mobilenetv2_050.lamb_in1k"


def _randomised(model: torch.nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """A state dict where every float tensor (BN running stats included) is random, unlike any init."""
    g = torch.Generator().manual_seed(seed)
    return {
        k: (torch.rand(v.shape, generator=g) + 0.5 if v.is_floating_point() else v.clone())
        for k, v in model.state_dict().items()
    }


def _assert_same(model: torch.nn.Module, expected: dict[str, torch.Tensor], keys=None) -> None:
    actual = model.state_dict()
    for key in keys if keys is not None else actual:
        if key.endswith("num_batches_tracked"):
            continue
        assert torch.equal(actual[key], expected[key]), key


@pytest.fixture
def hf_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty HF home/hub cache in tmp_path, no offline flag, and no proxies."""
    home = tmp_path / "hf_home"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(home / "hub"))
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HUGGINGFACE_HUB_CACHE", "HF_ENDPOINT"):
        monkeypatch.delenv(var, raising=False)
    for var in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    return home


# ----------------------------------------------------------------------------------------------- names


def test_unknown_model_lists_close_matches() -> None:
    with pytest.raises(ValueError, match=r"mobilenetv2_050") as err:
        create_timm_model("mobilenetv2_05")
    assert "Unknown timm model" in str(err.value)
    with pytest.raises(ValueError, match=r"lamb_in1k"):
        create_timm_model("mobilenetv2_050.nope")


def test_plain_build_passes_kwargs() -> None:
    model = create_timm_model(ARCH, num_classes=0, pad_type="same", bn_eps=1e-3)
    assert model.num_features == 1280 and model.bn1.eps == 1e-3


# ---------------------------------------------------------------------------------------- local files


def test_pretrained_file_safetensors_and_prefixed_pth(tmp_path: Path) -> None:
    source = _randomised(timm.create_model(ARCH, num_classes=0))
    save_file(source, str(tmp_path / "b.safetensors"))
    torch.save({"state_dict": {f"model.{k}": v for k, v in source.items()}, "epoch": 3}, tmp_path / "b.pth")

    for name in ("b.safetensors", "b.pth"):
        model = create_timm_model(ARCH, pretrained_file=tmp_path / name, num_classes=0)
        _assert_same(model, source)
        assert set(model.state_dict()) == set(source)


def test_pretrained_file_with_new_head_reports(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    full = timm.create_model(ARCH)  # 1000-class classifier in the file
    source = _randomised(full)
    source["extra.thing"] = torch.zeros(2)
    save_file({f"backbone.{k}": v for k, v in source.items()}, str(tmp_path / "full.safetensors"))

    torch.manual_seed(0)
    head_before = timm.create_model(ARCH, num_classes=3).classifier.weight
    torch.manual_seed(0)
    with caplog.at_level(logging.INFO, logger="covid_lightning.models.weights"):
        model = create_timm_model(ARCH, pretrained_file=tmp_path / "full.safetensors", num_classes=3)
    assert "extra.thing" in caplog.text  # ignored keys are reported
    assert torch.equal(model.classifier.weight, head_before)  # a head of another shape is not loaded
    _assert_same(model, source, [k for k in model.state_dict() if not k.startswith("classifier.")])

    headless = create_timm_model(ARCH, pretrained_file=tmp_path / "full.safetensors", num_classes=0)
    _assert_same(headless, source)


def test_pretrained_file_missing_backbone_key(tmp_path: Path) -> None:
    source = _randomised(timm.create_model(ARCH, num_classes=0))
    del source["blocks.3.1.conv_pw.weight"]
    save_file(source, str(tmp_path / "missing.safetensors"))
    with pytest.raises(PretrainedWeightsError) as err:
        create_timm_model(ARCH, pretrained_file=tmp_path / "missing.safetensors", num_classes=0)
    assert "blocks.3.1.conv_pw.weight" in str(err.value) and "missing.safetensors" in str(err.value)


def test_pretrained_file_shape_mismatch(tmp_path: Path) -> None:
    source = _randomised(timm.create_model(ARCH, num_classes=0))
    source["conv_head.weight"] = torch.zeros(1280, 99, 1, 1)
    torch.save(source, tmp_path / "bad.pt")
    with pytest.raises(PretrainedWeightsError) as err:
        create_timm_model(ARCH, pretrained_file=tmp_path / "bad.pt", num_classes=0)
    msg = str(err.value)
    assert "conv_head.weight" in msg and "(1280, 99, 1, 1)" in msg and "(1280, 160, 1, 1)" in msg


def test_pretrained_file_absent_or_unsupported(tmp_path: Path) -> None:
    with pytest.raises(PretrainedWeightsError, match="does not exist"):
        create_timm_model(ARCH, pretrained_file=tmp_path / "nope.safetensors", num_classes=0)
    (tmp_path / "w.onnx").write_bytes(b"x")
    with pytest.raises(PretrainedWeightsError, match="unsupported"):
        create_timm_model(ARCH, pretrained_file=tmp_path / "w.onnx", num_classes=0)


# ------------------------------------------------------------------------------------- hub, offline


@pytest.mark.parametrize("mode", ["unreachable_endpoint", "hf_hub_offline"])
def test_pretrained_offline_fails_fast(hf_env: Path, monkeypatch: pytest.MonkeyPatch, mode: str) -> None:
    if mode == "unreachable_endpoint":
        monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    else:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        monkeypatch.setattr(socket, "create_connection", _no_network)
    start = time.monotonic()
    with pytest.raises(PretrainedWeightsError) as err:
        create_timm_model(ARCH, pretrained=True, num_classes=0, hub_timeout=5.0)
    elapsed = time.monotonic() - start
    assert elapsed < 15, elapsed
    msg = str(err.value)
    assert "pretrained_file" in msg and "mobilenetv2_050.lamb_in1k" in msg and HUB_ID in msg
    assert "HF_HOME" in msg and "st.save_file" in msg


def test_pretrained_silent_hub_fails_with_instructions(hf_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The hub accepts TCP but never answers: a read timeout, then the same instructions as offline."""
    from huggingface_hub import constants

    before = (constants.HF_HUB_ETAG_TIMEOUT, constants.HF_HUB_DOWNLOAD_TIMEOUT)
    with SilentServer() as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        start = time.monotonic()
        with pytest.raises(PretrainedWeightsError) as err:
            create_timm_model(ARCH, pretrained=True, num_classes=0, hub_timeout=2.0, read_timeout=2.0)
        elapsed = time.monotonic() - start
        assert server.connections, "the hub request never reached the silent server"
    assert elapsed < 30, elapsed
    msg = str(err.value)
    assert server.url in msg and "no answer within 2 s" in msg
    assert "pretrained_file" in msg and HUB_ID in msg and "HF_HOME" in msg and "st.save_file" in msg
    assert before == (constants.HF_HUB_ETAG_TIMEOUT, constants.HF_HUB_DOWNLOAD_TIMEOUT)


def test_hf_hub_timeouts_set_and_restored(monkeypatch: pytest.MonkeyPatch) -> None:
    """huggingface_hub reads its timeout variables at import: its constants are what counts."""
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_DOWNLOAD_TIMEOUT", raising=False)
    monkeypatch.setenv("HF_HUB_ETAG_TIMEOUT", "7")  # the user's own choice wins
    monkeypatch.setattr(constants, "HF_HUB_ETAG_TIMEOUT", 7)
    before = constants.HF_HUB_DOWNLOAD_TIMEOUT
    with hf_hub_timeouts(3.0):
        assert constants.HF_HUB_DOWNLOAD_TIMEOUT == 3.0 and constants.HF_HUB_ETAG_TIMEOUT == 7
    assert before == constants.HF_HUB_DOWNLOAD_TIMEOUT
    with pytest.raises(RuntimeError), hf_hub_timeouts(3.0):
        raise RuntimeError("restored on errors too")
    assert before == constants.HF_HUB_DOWNLOAD_TIMEOUT


def test_download_url_silent_peer_times_out(tmp_path: Path) -> None:
    with SilentServer() as server:
        start = time.monotonic()
        with pytest.raises(TimeoutError, match="sent nothing for 1 s"):
            download_url(f"{server.url}/weights.pth", tmp_path / "weights.pth", timeout=1.0)
        assert time.monotonic() - start < 30
    assert list(tmp_path.iterdir()) == []  # no partial file


def _no_network(*args, **kwargs):
    raise AssertionError(f"network access attempted: {args}")


def _fake_hub_cache(hub: Path, repo_id: str, filename: str, payload: Path, ref_suffix: str = "") -> Path:
    """huggingface_hub's cache layout: blobs/<sha256>, snapshots/<commit>/<file> -> blob, refs/main."""
    repo = hub / f"models--{repo_id.replace('/', '--')}"
    data = payload.read_bytes()
    blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
    blob.parent.mkdir(parents=True)
    blob.write_bytes(data)
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = repo / "snapshots" / commit / filename
    snapshot.parent.mkdir(parents=True)
    try:
        snapshot.symlink_to(Path("..", "..", "blobs", blob.name))
    except OSError:  # no symlinks (Windows without privileges): huggingface_hub copies then
        snapshot.write_bytes(data)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit + ref_suffix)
    return snapshot


@pytest.mark.parametrize(("cache_var", "ref_suffix"), [("HF_HUB_CACHE", ""), ("HF_HOME", "\n")])
def test_pretrained_from_fake_hf_cache(
    hf_env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cache_var: str, ref_suffix: str
) -> None:
    source = _randomised(timm.create_model(ARCH), seed=1)  # with the 1000-class head, like the real file
    save_file(source, str(tmp_path / "model.safetensors"))
    if cache_var == "HF_HOME":
        monkeypatch.delenv("HF_HUB_CACHE")
        hub = hf_env / "hub"
    else:
        hub = tmp_path / "elsewhere" / "hub"
        monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    _fake_hub_cache(hub, HUB_ID, "model.safetensors", tmp_path / "model.safetensors", ref_suffix)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(socket, "create_connection", _no_network)

    model = create_timm_model(ARCH, pretrained=True)
    _assert_same(model, source)
    headless = create_timm_model(f"{ARCH}.lamb_in1k", pretrained=True, num_classes=0, bn_eps=1e-3)
    _assert_same(headless, source, [k for k in headless.state_dict() if not k.startswith("classifier")])
    assert headless.bn1.eps == 1e-3


# ------------------------------------------------------------------------------------------- Keras


def _reference_input(folder: Path) -> torch.Tensor:
    from PIL import Image

    rgb = np.asarray(Image.open(folder / "reference_input_COVID-1_224.png").convert("RGB"), dtype=np.float32)
    return torch.from_numpy(rgb / 127.5 - 1.0).permute(2, 0, 1).unsqueeze(0).contiguous()


@pytest.mark.parametrize("which", ["h5", "safetensors"])
def test_keras_weights_reproduce_reference_features(keras_weights: Path, which: str) -> None:
    path = KERAS_H5 if which == "h5" else KERAS_SAFETENSORS
    model = create_timm_model(ARCH, pretrained_file=path, num_classes=0, pad_type="same", bn_eps=1e-3).eval()
    expected = np.load(keras_weights / "reference_features_COVID-1_224.npy")
    with torch.no_grad():
        features = model(_reference_input(keras_weights))
    assert features.shape == (1, 1280)
    diff = np.abs(features[0].numpy() - expected).max()
    assert diff < 1e-4, diff


def test_keras_h5_into_model_with_head(keras_weights: Path) -> None:
    from safetensors.torch import load_file

    torch.manual_seed(0)
    built = timm.create_model(ARCH, num_classes=2, pad_type="same", bn_eps=1e-3).classifier.state_dict()
    torch.manual_seed(0)
    model = create_timm_model(ARCH, pretrained_file=KERAS_H5, num_classes=2, pad_type="same", bn_eps=1e-3)
    reference = load_file(str(KERAS_SAFETENSORS))
    _assert_same(model, reference, list(reference))  # the backbone; the h5 is no-top, the head stays as built
    _assert_same(model.classifier, built)
    with pytest.raises(PretrainedWeightsError, match="alpha"):
        create_timm_model("mobilenetv2_100", pretrained_file=KERAS_H5, num_classes=0)
