"""The lab's own ImageNet backbone, through the project's code path, reproduces Keras' features."""

from pathlib import Path

import numpy as np
import pytest
import torch

from covid_lightning import XRayClassifier
from covid_lightning.inference import preprocess
from covid_lightning.models.weights import PretrainedWeightsError

FILES = [
    "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.5_224_no_top.h5",
    "mobilenetv2_050_keras_imagenet.safetensors",
]


@pytest.mark.parametrize("name", FILES)
def test_lab_weights_reproduce_keras_features(keras_weights: Path, name: str):
    model = XRayClassifier(pretrained_file=str(keras_weights / name)).eval()  # flavor/normalization: auto
    assert model.net.flavor == "keras" and model.net.normalization == "keras"
    batch = preprocess([keras_weights / "reference_input_COVID-1_224.png"], model.hparams.image_size)
    with torch.no_grad():
        features = model.net.forward_features(batch)[0].numpy()
    reference = np.load(keras_weights / "reference_features_COVID-1_224.npy")
    assert np.abs(features - reference).max() < 1e-4


def test_lab_scaling_on_purpose_differs(keras_weights: Path):
    """normalization: unit (the lab's x/255) is honoured even with Keras weights, and changes the features."""
    model = XRayClassifier(pretrained_file=str(keras_weights / FILES[0]), normalization="unit").eval()
    batch = preprocess([keras_weights / "reference_input_COVID-1_224.png"], 224)
    with torch.no_grad():
        features = model.net.forward_features(batch)[0].numpy()
    reference = np.load(keras_weights / "reference_features_COVID-1_224.npy")
    assert np.abs(features - reference).max() > 0.1


def test_keras_pretrained_offline_fails_fast_with_instructions(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    monkeypatch.setattr("covid_lightning.models.weights.host_reachable", lambda url, timeout: (False, "no network"))
    with pytest.raises(PretrainedWeightsError, match="pretrained_file"):
        XRayClassifier(flavor="keras", pretrained=True)


def test_keras_weights_found_in_torch_hub_cache(keras_weights: Path, tmp_path, monkeypatch):
    """Keras Applications' file in torch hub's cache is used offline, no download attempted."""
    import shutil

    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    shutil.copy(keras_weights / FILES[0], tmp_path / "hub" / "checkpoints" / FILES[0])
    monkeypatch.setattr("covid_lightning.models.weights.host_reachable", lambda *a: pytest.fail("network used"))
    model = XRayClassifier(flavor="keras", pretrained=True)
    reference = XRayClassifier(pretrained_file=str(keras_weights / FILES[1]))
    for (k, a), b in zip(model.net.backbone.state_dict().items(), reference.net.backbone.state_dict().values()):
        assert torch.equal(a, b), k
