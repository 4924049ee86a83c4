"""Legacy Keras 2 HDF5 weights (``.h5``) -> a timm/PyTorch state dict, mapped in layer order.

Keras loads legacy ``.h5`` weights by order, not by name, so that is what we do too: the arrays are
read in ``layer_names`` order (each layer's ``weight_names`` in turn) and paired one by one with the
model's backbone ``state_dict()`` keys (``num_batches_tracked`` and classifier keys skipped).
Every pair is checked for role (kernel/gamma/beta/moving stats vs weight/bias/running stats) and shape.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from covid_lightning.models.weights import NETWORK_TIMEOUT, PretrainedWeightsError, head_keys

# Keras weight role -> the timm/PyTorch state-dict suffix it must land on.
_ROLE_TO_SUFFIX = {
    "kernel": "weight",
    "depthwise_kernel": "weight",
    "gamma": "weight",
    "beta": "bias",
    "bias": "bias",
    "moving_mean": "running_mean",
    "moving_variance": "running_var",
}

_FIX_HINT = (
    "Likely fix: build the model that matches the file (for the Keras MobileNetV2 alpha=0.5 no-top file: "
    "timm.create_model('mobilenetv2_050', num_classes=0, pad_type='same', bn_eps=1e-3)); a wrong width "
    "multiplier (alpha) or backbone gives different shapes or counts. The h5 is no-top, so build the model "
    "with num_classes=0 or let the classifier be left unloaded."
)


def _as_str(name: object) -> str:
    return name.decode("utf8") if isinstance(name, (bytes, np.bytes_)) else str(name)


def read_keras_h5_arrays(path: str | Path) -> list[tuple[str, str, np.ndarray]]:
    """Every weight array of a legacy Keras ``.h5`` in load order, as ``(layer, weight_name, array)``.

    Handles both the full-model layout (weights under a ``model_weights`` group) and the
    ``save_weights`` layout (layer groups at the top level), and ``bytes`` or ``str`` names.
    """
    import h5py

    path = Path(path)
    if not path.is_file():
        raise PretrainedWeightsError(f"Keras weights file {path} does not exist.")
    try:
        f = h5py.File(path, "r")
    except OSError as err:
        raise PretrainedWeightsError(f"{path} is not a readable HDF5 file: {err}") from err
    with f:
        root = f["model_weights"] if "model_weights" in f else f
        if "layer_names" not in root.attrs:
            raise PretrainedWeightsError(
                f"{path} has no 'layer_names' attribute: not a legacy Keras 2 .h5 weights file "
                "(Keras 3 '.weights.h5' files are not supported; re-save with a legacy Keras or convert)."
            )
        arrays: list[tuple[str, str, np.ndarray]] = []
        for layer in (_as_str(n) for n in root.attrs["layer_names"]):
            group = root[layer]
            for weight in (_as_str(n) for n in group.attrs.get("weight_names", [])):
                arrays.append((layer, weight, np.asarray(group[weight])))
    return arrays


def _role(weight_name: str) -> str:
    """``'block/conv/depthwise_kernel:0'`` -> ``'depthwise_kernel'``."""
    return weight_name.rsplit("/", 1)[-1].split(":", 1)[0]


def _convert(role: str, array: np.ndarray) -> np.ndarray:
    """Keras layout -> PyTorch layout for one array."""
    if role == "depthwise_kernel" and array.ndim == 4:  # (H, W, C, M) -> (C*M, 1, H, W)
        h, w, c, m = array.shape
        return array.transpose(2, 3, 0, 1).reshape(c * m, 1, h, w)
    if role == "kernel" and array.ndim == 4:  # HWIO -> OIHW
        return array.transpose(3, 2, 0, 1)
    if role == "kernel" and array.ndim == 3:  # Conv1D (W, I, O) -> (O, I, W)
        return array.transpose(2, 1, 0)
    if role == "kernel" and array.ndim == 2:  # Dense (in, out) -> (out, in)
        return array.T
    return array


def keras_h5_to_timm_state_dict(path: str | Path, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Map a legacy Keras ``.h5`` (no-top) onto ``model``'s backbone keys, in order, with layout conversion.

    Returns a state dict covering every backbone key of ``model`` (``num_batches_tracked`` filled with
    zeros); classifier/head keys of ``model`` are not in it. Raises :class:`PretrainedWeightsError` naming
    the file, the h5 layer/weight and the model key on any count, role or shape mismatch.
    """
    path = Path(path)
    arrays = read_keras_h5_arrays(path)
    model_sd = model.state_dict()
    heads = head_keys(model)
    targets = [k for k in model_sd if k not in heads and not k.endswith("num_batches_tracked")]

    if len(arrays) != len(targets):
        first_extra = (
            f"first h5 array without a model key: {arrays[len(targets)][0]}/{arrays[len(targets)][1]}"
            if len(arrays) > len(targets)
            else f"first model key without an h5 array: {targets[len(arrays)]}"
        )
        raise PretrainedWeightsError(
            f"{path}: the h5 holds {len(arrays)} weight arrays but {type(model).__name__} has "
            f"{len(targets)} backbone tensors (excluding num_batches_tracked"
            f"{' and head keys ' + ', '.join(sorted(heads)) if heads else ''}); {first_extra}. {_FIX_HINT}"
        )

    out: dict[str, torch.Tensor] = {}
    for (layer, weight, array), key in zip(arrays, targets):
        role = _role(weight)
        where = f"{path}: h5 layer '{layer}' weight '{weight}' -> model key '{key}'"
        suffix = _ROLE_TO_SUFFIX.get(role)
        if suffix is None:
            raise PretrainedWeightsError(f"{where}: unrecognised Keras weight role '{role}'. {_FIX_HINT}")
        if key.rsplit(".", 1)[-1] != suffix:
            raise PretrainedWeightsError(
                f"{where}: a Keras '{role}' must land on a '.{suffix}' key; the order of the h5 and the "
                f"model differ. {_FIX_HINT}"
            )
        converted = _convert(role, array)
        expected = tuple(model_sd[key].shape)
        if tuple(converted.shape) != expected:
            raise PretrainedWeightsError(
                f"{where}: shape mismatch, h5 {tuple(array.shape)} (converted {tuple(converted.shape)}) vs "
                f"model {expected}. {_FIX_HINT}"
            )
        out[key] = torch.from_numpy(np.ascontiguousarray(converted))

    for key, value in model_sd.items():
        if key.endswith("num_batches_tracked") and key not in heads:
            out[key] = torch.zeros_like(value)
    # Return in the model's own key order.
    return {k: out[k] for k in model_sd if k in out}


# --------------------------------------------------------------------------------------------------
# The Keras Applications weights: where Keras itself downloads them, and how to recognise them
# --------------------------------------------------------------------------------------------------

KERAS_WEIGHTS_BASE = "https://storage.googleapis.com/tensorflow/keras-applications/mobilenet_v2/"
#: timm MobileNetV2 name -> Keras ``alpha`` (the widths Keras Applications publishes weights for)
KERAS_ALPHAS = {
    "mobilenetv2_035": "0.35",
    "mobilenetv2_050": "0.5",
    "mobilenetv2_075": "0.75",
    "mobilenetv2_100": "1.0",
    "mobilenetv2_140": "1.4",
}
#: safetensors metadata key written by the Keras -> timm conversion of ``../shared/weights``
KERAS_METADATA_KEY = "keras_mnv2_to_timm"


def keras_weights_filename(backbone: str, rows: int = 224) -> str:
    """Keras' file name for the no-top ImageNet weights of the MobileNetV2 matching ``backbone``."""
    arch = backbone.split(".")[0]
    if arch not in KERAS_ALPHAS:
        raise PretrainedWeightsError(
            f"Keras ImageNet weights exist only for MobileNetV2 ({', '.join(KERAS_ALPHAS)}), not {backbone!r}. "
            "Use flavor 'timm' for other backbones."
        )
    return f"mobilenet_v2_weights_tf_dim_ordering_tf_kernels_{KERAS_ALPHAS[arch]}_{rows}_no_top.h5"


def fetch_keras_weights(backbone: str, timeout: float = 5.0, read_timeout: float = NETWORK_TIMEOUT) -> Path:
    """The Keras Applications ``.h5`` for ``backbone``: from torch hub's cache, else downloaded there.

    Fails fast (one TCP probe of ``timeout`` seconds) with the way to supply the file when offline; the
    download gives up when a connect or a wait for the next bytes takes over ``read_timeout`` seconds.
    """
    from covid_lightning.models.weights import download_url, host_reachable

    filename = keras_weights_filename(backbone)
    cached = Path(torch.hub.get_dir()) / "checkpoints" / filename
    if cached.is_file():
        return cached
    url = KERAS_WEIGHTS_BASE + filename
    how = (
        f"Download {url} on a machine with internet (it is the file Keras' "
        f"MobileNetV2(alpha={KERAS_ALPHAS[backbone.split('.')[0]]}, include_top=False, weights='imagenet') "
        f"fetches) and pass it as --model.pretrained_file PATH (pretrained_file: in the YAML), "
        f"or put it at {cached}."
    )
    ok, target = host_reachable(url, timeout)
    if not ok:
        raise PretrainedWeightsError(
            f"Keras ImageNet weights for {backbone} are not cached and {target} is unreachable.\n{how}"
        )
    try:
        download_url(url, cached, read_timeout)
    except Exception as err:  # network errors of every kind: never continue with random weights
        raise PretrainedWeightsError(f"Downloading {url} failed: {type(err).__name__}: {err}\n{how}") from err
    return cached


def is_keras_weights_file(path: str | Path) -> bool:
    """A Keras ``.h5`` or a safetensors file converted from one (tagged in its metadata)."""
    path = Path(path)
    if path.suffix.lower() in (".h5", ".hdf5"):
        return True
    if path.suffix == ".safetensors" and path.is_file():
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            return any("keras" in key.lower() for key in (f.metadata() or {}))
    return False
