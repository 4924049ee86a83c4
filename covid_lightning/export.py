"""Export a trained model to ONNX or TorchScript, with its preprocessing contract.

The exported graph takes what the DataModules hand the model: ``uint8`` RGB images, ``N x 3 x S x S``,
0..255, already resized to the model's ``image_size``. Scaling and normalisation are inside the graph
(the model's first layer), and it returns ``logits`` and ``probs`` (softmax for the classifier,
sigmoid for the segmenter)::

    covid-lightning export --ckpt runs/.../best.ckpt --format onnx torchscript

    from covid_lightning.export import export_onnx
    export_onnx(model, "classifier.onnx")  # + classifier.onnx.json, the contract

The contract (:func:`build_contract`) is written next to each file as ``<file>.json`` (``model.onnx.json``,
``model.pt.json``: the ONNX and TorchScript files of one checkpoint can share a folder), and also into the
ONNX ``metadata_props`` (one entry per top-level key, non-strings JSON-encoded, plus ``contract``: the whole
JSON) and the TorchScript archive (``extra/covid_lightning.json``).

ONNX exporter: the ``torch.export``-based one (``dynamo=True``), the default since torch 2.9. Its graph
is verified with a symbolic batch dimension (a batch-dependent constant fails the export instead of
hiding in the graph), TF-"same" padding of the Keras-flavour backbone folds to static pads (109 nodes
against 659 from the TorchScript-based exporter), and the TorchScript-based exporter is deprecated.
Its lowest opset is 18 (asking it for 17 exports at 18 and fails to down-convert the classifier's
``ReduceMean``), so the default opset is 18 (onnxruntime >= 1.14); ``opset < 18`` falls back to the
deprecated TorchScript-based exporter for old runtimes.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

#: Lowest opset the torch.export-based ONNX exporter implements; below it the TorchScript-based one is used.
DYNAMO_MIN_OPSET = 18
DEFAULT_OPSET = 18
INPUT_NAME = "image"
OUTPUT_NAMES = ("logits", "probs")
#: Name of the contract inside a TorchScript archive (``torch.jit.load(..., _extra_files=...)``).
TORCHSCRIPT_CONTRACT = "covid_lightning.json"
FORMATS = {"onnx": ".onnx", "torchscript": ".pt"}


class _Exportable(nn.Module):
    """The model's network plus its output activation: uint8 images -> (logits, probs)."""

    def __init__(self, net: nn.Module, kind: str) -> None:
        super().__init__()
        self.net = net
        self.kind = kind

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.net(image).float()
        probs = logits.softmax(dim=-1) if self.kind == "classifier" else logits.sigmoid()
        return logits, probs


class _CheckedInput(nn.Module):
    """Rejects what a traced graph would silently get wrong (float or resized images)."""

    def __init__(self, traced: nn.Module, image_size: int) -> None:
        super().__init__()
        self.traced = traced
        self.image_size = image_size

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if image.dtype != torch.uint8:
            raise ValueError("expected uint8 images (0..255); see the contract in the .json next to the model")
        size = self.image_size
        if image.dim() != 4 or image.size(1) != 3 or image.size(2) != size or image.size(3) != size:
            raise ValueError(f"expected images of shape (N, 3, {size}, {size}) resized as the contract says")
        return self.traced(image)


def model_kind(model: nn.Module) -> str:
    """``classifier`` or ``segmenter`` (the model's own answer); TypeError for anything else."""
    from covid_lightning.modules.base import as_xray_module

    return as_xray_module(model, "export").kind


def build_contract(model: nn.Module, checkpoint: str | Path | None = None) -> dict[str, Any]:
    """What a runtime must feed the exported graph and what it returns (format-independent part)."""
    from covid_lightning import __version__

    kind = model_kind(model)
    size = int(model.hparams.image_size)
    prep = model.preprocess
    contract: dict[str, Any] = {
        "kind": kind,
        "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
    }
    if kind == "classifier":
        contract["class_names"] = list(model.class_names)
    else:
        contract["threshold"] = float(model.threshold)
    contract |= {
        "image_size": size,
        "input_name": INPUT_NAME,
        "input_shape": ["batch", 3, size, size],
        "input_dtype": "uint8",
        "input_layout": "NCHW",
        "input_range": [0, 255],
        "resize": f"bilinear to {size} x {size}, RGB (OpenCV INTER_LINEAR, aspect ratio not kept, "
        "grayscale repeated over the 3 channels), as covid_lightning.inference.preprocess",
        "normalization": model.net.normalization,
        "mean": [float(v) for v in prep["mean"]],
        "std": [float(v) for v in prep["std"]],
        "normalization_in_graph": True,
        "normalization_formula": "(x / 255 - mean) / std per channel, applied inside the graph: feed raw uint8",
        "outputs": _outputs(kind, size, contract),
        "covid_lightning_version": __version__,
        "source_checkpoint": str(Path(checkpoint).resolve()) if checkpoint is not None else None,
        "torch_version": torch.__version__,
    }
    return contract


def _outputs(kind: str, size: int, contract: dict[str, Any]) -> dict[str, str]:
    if kind == "classifier":
        n = len(contract["class_names"])
        return {
            "logits": f"float32 (batch, {n}): class scores in class_names order",
            "probs": f"float32 (batch, {n}): softmax(logits), class probabilities in class_names order",
        }
    return {
        "logits": f"float32 (batch, 1, {size}, {size}): lung logits",
        "probs": f"float32 (batch, 1, {size}, {size}): sigmoid(logits); lung where probs > threshold; "
        "resize probs bilinearly to the original image size before thresholding",
    }


def _exportable(model: nn.Module) -> tuple[_Exportable, int]:
    """A float32 CPU eval copy of the network + activation (the caller's model is left untouched)."""
    kind = model_kind(model)
    net = copy.deepcopy(model.net).float().cpu().eval()
    return _Exportable(net, kind).eval(), int(model.hparams.image_size)


@contextlib.contextmanager
def _quiet_tracing() -> Iterator[None]:
    """Silence what tracing a fixed-size model says by design: the TorchScript deprecation notices (TorchScript
    is what was asked for) and TracerWarnings about shape checks (the input size is fixed by the graph/guard)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.\w+` is deprecated.*", category=FutureWarning)
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        yield


def _example(batch: int, image_size: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (batch, 3, image_size, image_size), dtype=torch.uint8, generator=generator)


def _write_sidecar(path: Path, contract: dict[str, Any]) -> Path:
    sidecar = sidecar_path(path)
    sidecar.write_text(json.dumps(contract, indent=2) + "\n")
    return sidecar


def sidecar_path(path: str | Path) -> Path:
    """The contract JSON next to an exported file: ``model.onnx`` -> ``model.onnx.json``."""
    path = Path(path)
    return path.with_name(path.name + ".json")


def load_contract(path: str | Path) -> dict[str, Any]:
    """The contract of an exported file, from its sidecar JSON."""
    return json.loads(sidecar_path(path).read_text())


def export_onnx(
    model: nn.Module,
    path: str | Path,
    *,
    opset: int = DEFAULT_OPSET,
    dynamic_batch: bool = True,
    checkpoint: str | Path | None = None,
) -> Path:
    """Write ``model`` as ONNX (input ``image`` uint8 N x 3 x S x S; outputs ``logits``, ``probs``) + contract.

    ``dynamic_batch=False`` fixes the batch to 1. ``checkpoint`` is recorded as the source in the contract.
    Returns the ONNX path; the contract is also in ``<path>.json`` and the model's ``metadata_props``.
    """
    import onnx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    wrapper, size = _exportable(model)
    example = _example(2 if dynamic_batch else 1, size)
    names = {"input_names": [INPUT_NAME], "output_names": list(OUTPUT_NAMES)}
    if opset >= DYNAMO_MIN_OPSET:
        exporter = "torch.onnx.export(dynamo=True)"
        dynamic_shapes = ({0: torch.export.Dim("batch")},) if dynamic_batch else None
        program = torch.onnx.export(
            wrapper,
            (example,),
            dynamo=True,
            opset_version=opset,
            dynamic_shapes=dynamic_shapes,
            external_data=False,
            verbose=False,
            **names,
        )
        proto = program.model_proto
    else:
        exporter = "torch.onnx.export(dynamo=False)"
        buffer = io.BytesIO()
        dynamic_axes = {n: {0: "batch"} for n in (INPUT_NAME, *OUTPUT_NAMES)} if dynamic_batch else None
        with _quiet_tracing():  # the exporter's own deprecation warning stays visible
            torch.onnx.export(
                wrapper, (example,), buffer, dynamo=False, opset_version=opset, dynamic_axes=dynamic_axes, **names
            )
        proto = onnx.load_from_string(buffer.getvalue())

    contract = build_contract(model, checkpoint)
    if not dynamic_batch:
        contract["input_shape"][0] = 1
    actual_opset = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    contract |= {"format": "onnx", "file": path.name, "exporter": exporter, "opset": actual_opset}
    props = {k: v if isinstance(v, str) else json.dumps(v) for k, v in contract.items()}
    props["contract"] = json.dumps(contract)
    kept = [(e.key, e.value) for e in proto.metadata_props if e.key not in props]  # the exporter's own, if any
    del proto.metadata_props[:]
    for key, value in [*kept, *props.items()]:
        proto.metadata_props.add(key=key, value=value)
    proto.doc_string = f"covid-lightning {contract['kind']}: see metadata_props 'contract'"
    onnx.save(proto, str(path))
    _write_sidecar(path, contract)
    return path


def export_torchscript(model: nn.Module, path: str | Path, *, checkpoint: str | Path | None = None) -> Path:
    """Write ``model`` as a traced TorchScript archive: ``uint8`` images -> ``(logits, probs)``, + contract.

    Traced with a uint8 example, so the archive accepts uint8 only (a guard rejects float or wrongly sized
    input). The contract is in ``<path>.json`` and in the archive (``_extra_files``, key
    :data:`TORCHSCRIPT_CONTRACT`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    wrapper, size = _exportable(model)
    contract = build_contract(model, checkpoint)
    contract |= {"format": "torchscript", "file": path.name, "exporter": "torch.jit.trace"}
    contract["outputs"] = {"tuple": "(logits, probs)", **contract["outputs"]}
    with _quiet_tracing():
        with torch.no_grad():
            traced = torch.jit.trace(wrapper, (_example(2, size),), check_trace=False)
        scripted = torch.jit.script(_CheckedInput(traced, size))
        torch.jit.save(scripted, str(path), _extra_files={TORCHSCRIPT_CONTRACT: json.dumps(contract)})
    _write_sidecar(path, contract)
    return path


def main(argv: Sequence[str]) -> int:
    """``covid-lightning export --ckpt PATH [--out DIR] [--format onnx torchscript] [--opset N]
    [--quantize int8 --calibrate DIR]``."""
    parser = argparse.ArgumentParser(
        prog="covid-lightning export",
        description="Export a covid-lightning checkpoint to ONNX and/or TorchScript, with its preprocessing "
        "contract (<file>.json next to each file).",
    )
    parser.add_argument("--ckpt", required=True, type=Path, help="checkpoint (.ckpt) of either model kind")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: the checkpoint's folder)")
    parser.add_argument(
        "--format", nargs="+", choices=list(FORMATS), default=["onnx"], help="formats to write (default: onnx)"
    )
    parser.add_argument(
        "--opset",
        type=int,
        default=DEFAULT_OPSET,
        help=f"ONNX opset (default {DEFAULT_OPSET}; below {DYNAMO_MIN_OPSET} uses the legacy TorchScript-based "
        "exporter)",
    )
    parser.add_argument(
        "--quantize",
        choices=["int8"],
        default=None,
        help="also write <stem>.int8.onnx (ONNX Runtime static quantization; needs --calibrate)",
    )
    parser.add_argument(
        "--calibrate",
        type=Path,
        default=None,
        help="folder of radiographs (e.g. the dataset root; Kaggle masks skipped) to calibrate and check int8 on",
    )
    parser.add_argument("--calibration-images", type=int, default=128, help="images to calibrate on (default 128)")
    parser.add_argument(
        "--check-images", type=int, default=64, help="other images to compare int8 with float32 on (default 64)"
    )
    args = parser.parse_args(list(argv))
    if not args.ckpt.is_file():
        parser.error(f"checkpoint not found: {args.ckpt}")
    if args.quantize and args.calibrate is None:
        parser.error("--quantize int8 needs --calibrate DIR: a folder of radiographs to measure activation ranges on")

    from covid_lightning.inference import load_checkpoint

    try:
        model = load_checkpoint(args.ckpt)
    except TypeError as err:
        parser.error(str(err))
    out = args.out if args.out is not None else args.ckpt.parent
    formats = [*args.format, "onnx"] if args.quantize else args.format
    for fmt in dict.fromkeys(formats):
        target = out / f"{args.ckpt.stem}{FORMATS[fmt]}"
        if fmt == "onnx":
            written = export_onnx(model, target, opset=args.opset, checkpoint=args.ckpt)
        else:
            written = export_torchscript(model, target, checkpoint=args.ckpt)
        print(written)
        print(sidecar_path(written))
        if fmt == "onnx" and args.quantize:
            _quantize(written, int(model.hparams.image_size), args)
    return 0


def _quantize(onnx_path: Path, image_size: int, args: argparse.Namespace) -> None:
    """``--quantize int8``: calibrate on ``--calibration-images`` images of ``--calibrate``, compare with the
    float32 graph on ``--check-images`` others, print both files and the comparison."""
    import random

    from covid_lightning.data.scan import list_predict_images
    from covid_lightning.quantize import agreement, calibration_batches, quantize_onnx

    paths = list_predict_images(args.calibrate)
    random.Random(0).shuffle(paths)
    calibration, check = paths[: args.calibration_images], paths[args.calibration_images :][: args.check_images]
    written = quantize_onnx(onnx_path, None, calibration_batches(calibration, image_size, count=len(calibration)))
    print(written)
    print(sidecar_path(written))
    if not check:
        print("int8 vs float32: no images left for the check (the calibration used them all)")
        return
    report = agreement(onnx_path, written, calibration_batches(check, image_size, count=len(check)))
    figures = ", ".join(f"{k} {v:.4g}" for k, v in report.items() if k != "images")
    print(f"int8 vs float32 on {report['images']} images not used for calibration: {figures}")
