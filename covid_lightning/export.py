"""Export a trained model to ONNX or TorchScript with its preprocessing contract, and int8 ONNX for CPU serving.

The graph takes ``uint8`` RGB ``N x 3 x S x S`` and returns ``logits`` and ``probs``; scaling and normalisation are
inside. The contract (:func:`build_contract`) goes next to each file, into ONNX metadata and the TorchScript archive.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import io
import json
import random
import tempfile
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn
from torchmetrics.functional.classification import binary_f1_score, multiclass_accuracy

from covid_lightning import __version__
from covid_lightning.callbacks.reports import to_markdown
from covid_lightning.checkpointing import load_checkpoint_file
from covid_lightning.errors import UserError
from covid_lightning.modules.base import as_xray_module

#: lowest opset of the torch.export-based ONNX exporter (the default); below it the TorchScript-based one is used
DEFAULT_OPSET = 18
INPUT_NAME = "image"
OUTPUT_NAMES = ("logits", "probs")
#: name of the contract inside a TorchScript archive (``torch.jit.load(..., _extra_files=...)``)
TORCHSCRIPT_CONTRACT = "covid_lightning.json"
FORMATS = {"onnx": ".onnx", "torchscript": ".pt"}
#: how the int8 file is made (recorded in its contract)
QUANTIZATION = {
    "method": "onnxruntime.quantization.quantize_static", "format": "QDQ",
    "activations": "uint8, per tensor, MinMax calibration", "weights": "int8, per output channel",
}  # fmt: skip


class _Exportable(nn.Module):
    """A float32 CPU eval copy of the model's network plus its output activation: uint8 images -> (logits, probs)."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.net = copy.deepcopy(model.net).float().cpu().eval()
        self.probabilities = model.probabilities  # softmax or sigmoid: the model's own answer

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.net(image).float()
        return logits, self.probabilities(logits)


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


def build_contract(model: nn.Module, checkpoint: str | Path | None = None) -> dict[str, Any]:
    """What a runtime must feed the exported graph and what it returns (the format-independent part)."""
    info = as_xray_module(model, "export").describe()
    size, prep = info["image_size"], model.preprocess
    if info["kind"] == "classifier":
        shape = f"(batch, {len(info['class_names'])})"
        probs = f"softmax(logits / {info['temperature']:g}) (temperature scaling), in class_names order"
    else:
        shape, probs = f"(batch, 1, {size}, {size})", "sigmoid(logits); resize bilinearly, then lung where > threshold"
    return info | {
        "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
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
        "outputs": {"logits": f"float32 {shape}: scores", "probs": f"float32 {shape}: {probs}"},
        "covid_lightning_version": __version__,
        "source_checkpoint": str(Path(checkpoint).resolve()) if checkpoint is not None else None,
        "torch_version": torch.__version__,
        "model_card": model_card(checkpoint) if checkpoint is not None else None,
    }


#: what every model card says about use and limits (the data and the evaluation say the rest)
INTENDED_USE = (
    "Research and education: a baseline for chest X-ray classification / lung segmentation experiments on the "
    "COVID-19 Radiography Database. Not a medical device; not for diagnosis, triage or any clinical decision."
)
LIMITATIONS = (
    "- The database has no patient IDs: splits are by image (near-duplicates kept in one split), so images of one "
    "patient may sit on both sides.",
    "- Source confounding: the classes come from different collections with different processing; a classifier can "
    "learn the source instead of the disease (DeGrave et al. 2021, Roberts et al. 2021). In-distribution figures "
    "overstate performance on films from other hospitals: see docs/results.md for the external evaluation.",
    "- Classes with fewer than 30 test images have wide intervals; their point figures are unreliable.",
    "- Probabilities are calibrated by temperature scaling on the validation split only; recalibrate on new sites.",
)


def model_card(checkpoint: str | Path) -> dict[str, Any]:
    """Training data, split sizes, the newest test (else validation) report, intended use and known limitations."""
    checkpoint = Path(checkpoint)
    data = load_checkpoint_file(checkpoint).get("datamodule_hyper_parameters") or {}
    keys = ("root", "manifest", "streaming", "split_file", "val_fraction", "test_fraction", "seed", "lung_roi")
    card: dict[str, Any] = {"training_data": {k: data.get(k) for k in keys if data.get(k) not in (None, "")}}
    # <run>/checkpoints/<file>.ckpt: the run folder holds the split and the evaluation reports
    run = checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else None
    if run is not None and (run / "split.csv").is_file():
        with (run / "split.csv").open(newline="", encoding="utf-8") as f:
            card["split_sizes"] = dict(Counter(r["split"] for r in csv.DictReader(f)))
    for split in ("test", "val") if run is not None else ():
        reports = sorted(run.glob(f"**/report_{split}/intervals.csv"), key=lambda p: p.stat().st_mtime)
        if reports:
            with reports[-1].open(newline="", encoding="utf-8") as f:
                card |= {"evaluation": f"{split} split, {reports[-1].parent}", "metrics": list(csv.DictReader(f))}
            if (reports[-1].parent / "calibration.csv").is_file():
                with (reports[-1].parent / "calibration.csv").open(newline="", encoding="utf-8") as f:
                    card["calibration"] = list(csv.DictReader(f))
            break
    return card | {"intended_use": INTENDED_USE, "limitations": list(LIMITATIONS)}


def write_model_card(contract: dict[str, Any], path: Path) -> Path:
    """The contract's model card as markdown at ``path``."""
    card = contract["model_card"] or {}
    what = ", ".join(f"{k} {contract[k]}" for k in ("kind", "image_size", "class_names", "threshold") if k in contract)
    lines = [f"# Model card: {Path(contract['source_checkpoint'] or path).name}", "", f"{contract['model_class']}: "]
    lines[-1] += f"{what}; covid-lightning {contract['covid_lightning_version']}.\n"
    lines += ["## Intended use", "", card.get("intended_use", INTENDED_USE), "", "## Training data", ""]
    lines += [f"- {k}: `{v}`" for k, v in card.get("training_data", {}).items()]
    lines += [f"- split sizes: {card['split_sizes']}" if "split_sizes" in card else "- split sizes: unknown", ""]
    lines += ["## Evaluation (95% bootstrap intervals over images)", ""]
    if card.get("metrics"):
        lines += [f"From {card['evaluation']}.", "", to_markdown(card["metrics"], 3)]
    else:
        lines += ["No evaluation report found in the run folder: run `lightning test --ckpt_path ...` first.", ""]
    if card.get("calibration"):
        lines += ["Calibration (ECE):", "", to_markdown(card["calibration"], 4)]
    lines += ["## Known limitations", "", *card.get("limitations", LIMITATIONS), ""]
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


@contextlib.contextmanager
def _quiet_tracing() -> Iterator[None]:
    """Silence what tracing a fixed-size model says by design (TorchScript deprecation, shape TracerWarnings)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.\w+` is deprecated.*", category=FutureWarning)
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        yield


def _example(batch: int, image_size: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (batch, 3, image_size, image_size), dtype=torch.uint8, generator=generator)


def sidecar_path(path: str | Path) -> Path:
    """The contract JSON next to an exported file: ``model.onnx`` -> ``model.onnx.json``."""
    path = Path(path)
    return path.with_name(path.name + ".json")


def load_contract(path: str | Path) -> dict[str, Any]:
    """The contract of an exported file, from its sidecar JSON."""
    return json.loads(sidecar_path(path).read_text())


def _write_sidecar(path: Path, contract: dict[str, Any]) -> None:
    sidecar_path(path).write_text(json.dumps(contract, indent=2) + "\n")


def _save_onnx(proto: Any, path: Path, contract: dict[str, Any]) -> Path:
    """Write ``proto`` with the contract in its ``metadata_props`` and in the sidecar JSON."""
    import onnx

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


def export_onnx(
    model: nn.Module, path: str | Path, *, opset: int = DEFAULT_OPSET, dynamic_batch: bool = True,
    checkpoint: str | Path | None = None,
) -> Path:  # fmt: skip
    """Write ``model`` as ONNX with its contract; ``dynamic_batch=False`` fixes the batch to 1."""
    import onnx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    contract = build_contract(model, checkpoint)
    wrapper, size = _Exportable(model).eval(), contract["image_size"]
    example = _example(2 if dynamic_batch else 1, size)
    names = {"input_names": [INPUT_NAME], "output_names": list(OUTPUT_NAMES), "opset_version": opset}
    if opset >= DEFAULT_OPSET:
        exporter = "torch.onnx.export(dynamo=True)"
        dynamic = ({0: torch.export.Dim("batch")},) if dynamic_batch else None
        program = torch.onnx.export(
            wrapper, (example,), dynamo=True, dynamic_shapes=dynamic, external_data=False, verbose=False, **names
        )
        proto = program.model_proto
    else:
        exporter = "torch.onnx.export(dynamo=False)"
        buffer = io.BytesIO()
        axes = {n: {0: "batch"} for n in (INPUT_NAME, *OUTPUT_NAMES)} if dynamic_batch else None
        with _quiet_tracing():  # the exporter's own deprecation warning stays visible
            torch.onnx.export(wrapper, (example,), buffer, dynamo=False, dynamic_axes=axes, **names)
        proto = onnx.load_from_string(buffer.getvalue())
    if not dynamic_batch:
        contract["input_shape"][0] = 1
    actual = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    contract |= {"format": "onnx", "file": path.name, "exporter": exporter, "opset": actual}
    return _save_onnx(proto, path, contract)


def export_torchscript(model: nn.Module, path: str | Path, *, checkpoint: str | Path | None = None) -> Path:
    """Write ``model`` as a traced TorchScript archive (uint8 input only) with its contract inside and beside it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    contract = build_contract(model, checkpoint)
    contract |= {"format": "torchscript", "file": path.name, "exporter": "torch.jit.trace"}
    contract["outputs"] = {"tuple": "(logits, probs)", **contract["outputs"]}
    with _quiet_tracing(), torch.no_grad():
        traced = torch.jit.trace(_Exportable(model).eval(), (_example(2, contract["image_size"]),), check_trace=False)
        scripted = torch.jit.script(_CheckedInput(traced, contract["image_size"]))
        torch.jit.save(scripted, str(path), _extra_files={TORCHSCRIPT_CONTRACT: json.dumps(contract)})
    _write_sidecar(path, contract)
    return path


def int8_path(onnx_path: str | Path) -> Path:
    """``model.onnx`` -> ``model.int8.onnx``."""
    path = Path(onnx_path)
    return path.with_name(f"{path.stem}.int8{path.suffix}")


def calibration_batches(
    paths: Sequence[Path], spec: tuple[int, str], count: int = 128, batch: int = 16, seed: int = 0
) -> list[np.ndarray]:
    """``count`` images drawn (seeded) from ``paths``, preprocessed as in validation for the model whose
    :func:`~covid_lightning.inference.input_spec` is ``spec``: uint8 ``(N, 3, S, S)`` batches."""
    from covid_lightning.inference import preprocess

    if not paths:
        raise UserError("No calibration images: give a folder with PNG/JPEG radiographs.")
    chosen = random.Random(seed).sample(list(paths), min(count, len(paths)))
    return [preprocess(chosen[i : i + batch], *spec).numpy() for i in range(0, len(chosen), batch)]


def quantize_onnx(
    onnx_path: str | Path, out_path: str | Path | None, batches: Sequence[np.ndarray], per_channel: bool = True
) -> Path:
    """Write the int8 version of an :func:`export_onnx` file, calibrated on ``batches``, with its contract."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter([{contract["input_name"]: b} for b in batches])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.items, None)

    out = Path(out_path) if out_path is not None else int8_path(onnx_path)
    contract = load_contract(onnx_path)
    with tempfile.TemporaryDirectory(prefix="covid_lightning_int8_") as tmp:
        prepared = str(Path(tmp) / "prepared.onnx")
        quant_pre_process(str(onnx_path), prepared)  # shape inference + graph clean-up, as ONNX Runtime advises
        quantize_static(prepared, str(out), Reader(), quant_format=QuantFormat.QDQ, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8, per_channel=per_channel)  # fmt: skip
    images = sum(len(b) for b in batches)
    quantization = QUANTIZATION | {"per_channel": per_channel, "calibration_images": images}
    return _save_onnx(onnx.load(str(out)), out, contract | {"file": out.name, "quantization": quantization})


def session(path: str | Path, threads: int | None = None, cuda: bool = False) -> Any:
    """An ONNX Runtime session on the CPU (``threads``: intra-op threads, default ONNX Runtime's; one inter-op
    thread), or on CUDA first where ``cuda`` and that provider is installed."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.inter_op_num_threads = 1
    if threads:
        options.intra_op_num_threads = threads
    providers = ["CPUExecutionProvider"]
    if cuda and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    return ort.InferenceSession(str(path), options, providers=providers)


def agreement(float_path: str | Path, int8_path_: str | Path, batches: Sequence[np.ndarray]) -> dict[str, Any]:
    """How the int8 graph's ``probs`` differ from the float32 graph's: max difference, top-1 agreement or Dice."""
    contract = load_contract(float_path)
    feeds = [{contract["input_name"]: b} for b in batches]
    ref, got = (
        torch.from_numpy(np.concatenate([session(p).run(["probs"], f)[0] for f in feeds]))
        for p in (float_path, int8_path_)
    )
    result: dict[str, Any] = {"images": len(ref), "max_prob_diff": float((ref - got).abs().max())}
    if contract["kind"] == "classifier":
        top1 = multiclass_accuracy(got.argmax(1), ref.argmax(1), num_classes=ref.shape[1], average="micro")
        result["top1_agreement"] = float(top1)
    else:
        masks = [(p > contract["threshold"]).long() for p in (got, ref)]
        result["mask_dice"] = float(binary_f1_score(*masks, zero_division=1))
    return result


def export(
    ckpt: Path,
    out: Path | None = None,
    format: Sequence[Literal["onnx", "torchscript"]] = ("onnx",),
    opset: int = DEFAULT_OPSET,
    quantize: Literal["int8"] | None = None,
    calibrate: Path | None = None,
    calibration_images: int = 128,
    check_images: int = 64,
) -> int:
    """Export a checkpoint to ONNX and/or TorchScript, each with its preprocessing contract (<file>.json).

    Args:
        ckpt: checkpoint (.ckpt) of either model kind.
        out: output folder (default: the checkpoint's folder).
        format: formats to write.
        opset: ONNX opset (below 18: the legacy TorchScript-based exporter).
        quantize: also write <stem>.int8.onnx (ONNX Runtime static quantization; needs --calibrate).
        calibrate: folder of radiographs (e.g. the dataset root) to calibrate int8 on and check it against float32.
        calibration_images: images to calibrate on.
        check_images: other images to compare int8 with float32 on.
    """
    from covid_lightning.data.scan import list_predict_images
    from covid_lightning.inference import input_spec, load_checkpoint

    ckpt = Path(ckpt)
    if not ckpt.is_file():
        raise UserError(f"checkpoint not found: {ckpt}")
    if quantize and calibrate is None:
        raise UserError(
            "--quantize int8 needs --calibrate DIR: a folder of radiographs to measure activation ranges on"
        )
    model = load_checkpoint(ckpt)
    folder = Path(out) if out is not None else ckpt.parent
    for fmt in dict.fromkeys([*format, "onnx"] if quantize else format):
        target = folder / f"{ckpt.stem}{FORMATS[fmt]}"
        if fmt == "onnx":
            written = export_onnx(model, target, opset=opset, checkpoint=ckpt)
        else:
            written = export_torchscript(model, target, checkpoint=ckpt)
        print(written, sidecar_path(written), sep="\n")
    print(write_model_card(load_contract(written), folder / f"{ckpt.stem}.model_card.md"))
    if not quantize:
        return 0
    paths = list_predict_images(calibrate)
    random.Random(0).shuffle(paths)
    calibration, check = paths[:calibration_images], paths[calibration_images:][:check_images]
    spec = input_spec(model)
    fp32 = folder / f"{ckpt.stem}.onnx"
    int8 = quantize_onnx(fp32, None, calibration_batches(calibration, spec, count=len(calibration)))
    print(int8, sidecar_path(int8), sep="\n")
    if not check:
        print("int8 vs float32: no images left for the check (the calibration used them all)")
        return 0
    report = agreement(fp32, int8, calibration_batches(check, spec, count=len(check)))
    figures = ", ".join(f"{k} {v:.4g}" for k, v in report.items() if k != "images")
    print(f"int8 vs float32 on {report['images']} images not used for calibration: {figures}")
    return 0
