"""INT8 ONNX for CPU serving: ONNX Runtime static quantization, calibrated on real images, checked against float32.

::

    covid-lightning export --ckpt best.ckpt --quantize int8 --calibrate COVID-19_Radiography_Dataset

    from covid_lightning.quantize import quantize_onnx, calibration_batches, agreement
    batches = calibration_batches(list_predict_images(root), image_size=224, count=128)
    quantize_onnx("model.onnx", "model.int8.onnx", batches)

Static quantization (:func:`onnxruntime.quantization.quantize_static`) in ONNX Runtime's recommended CPU
form: QDQ graph, uint8 activations with ranges measured on the calibration images (MinMax), int8 weights
per output channel. The float32 graph's contract travels along with a ``quantization`` entry, so a runtime
feeds the int8 file exactly what it fed the float32 one (uint8 images, normalisation in the graph).

Quantization changes the numbers: :func:`agreement` runs both graphs on images *not* used for calibration
and reports how far they differ (classifier: top-1 agreement and largest probability change; segmenter:
Dice between the two masks), and ``covid-lightning export`` prints it. On an AVX2 CPU without VNNI the
lab's U-Net serves ~1.5x faster in int8 and the MobileNetV2 classifier ~1.1x (depthwise convolutions gain
little); CPUs with AVX512-VNNI / AMX gain more.
"""

from __future__ import annotations

import json
import random
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from covid_lightning.export import load_contract, sidecar_path

#: How the int8 file is made (recorded in its contract).
QUANTIZATION = {
    "method": "onnxruntime.quantization.quantize_static",
    "format": "QDQ",
    "activations": "uint8, per tensor, MinMax calibration",
    "weights": "int8, per output channel",
}


def int8_path(onnx_path: str | Path) -> Path:
    """``model.onnx`` -> ``model.int8.onnx``."""
    path = Path(onnx_path)
    return path.with_name(f"{path.stem}.int8{path.suffix}")


def load_batch(paths: Sequence[Path], image_size: int) -> np.ndarray:
    """Image files, decoded and resized as in validation, in order: a uint8 ``(N, 3, S, S)`` array."""
    from covid_lightning.inference import preprocess

    return preprocess(list(paths), image_size).numpy()


def calibration_batches(
    paths: Sequence[Path], image_size: int, count: int = 128, batch: int = 16, seed: int = 0
) -> list[np.ndarray]:
    """``count`` images drawn (seeded) from ``paths`` as uint8 ``(N, 3, S, S)`` batches (:func:`load_batch`)."""
    if not paths:
        raise ValueError("No calibration images: give a folder with PNG/JPEG radiographs.")
    chosen = random.Random(seed).sample(list(paths), min(count, len(paths)))
    return [load_batch(chosen[i : i + batch], image_size) for i in range(0, len(chosen), batch)]


def _reader(batches: Sequence[np.ndarray], input_name: str) -> Any:
    from onnxruntime.quantization import CalibrationDataReader

    class Batches(CalibrationDataReader):
        def __init__(self) -> None:
            self._items: Iterator[dict[str, np.ndarray]] = iter([{input_name: b} for b in batches])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._items, None)

    return Batches()


def quantize_onnx(
    onnx_path: str | Path, out_path: str | Path | None, batches: Sequence[np.ndarray], per_channel: bool = True
) -> Path:
    """Write the int8 version of an :func:`~covid_lightning.export.export_onnx` file, calibrated on ``batches``
    (uint8 ``(N, 3, S, S)`` arrays), with the float32 file's contract plus ``quantization``. Returns its path."""
    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    onnx_path = Path(onnx_path)
    out = Path(out_path) if out_path is not None else int8_path(onnx_path)
    contract = load_contract(onnx_path)
    with tempfile.TemporaryDirectory(prefix="covid_lightning_int8_") as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(onnx_path), str(prepared))  # shape inference + graph clean-up, as ORT advises
        quantize_static(
            str(prepared),
            str(out),
            _reader(batches, contract["input_name"]),
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            per_channel=per_channel,
        )
    images = sum(len(b) for b in batches)
    contract |= {
        "file": out.name,
        "quantization": QUANTIZATION | {"per_channel": per_channel, "calibration_images": images},
    }
    proto = onnx.load(str(out))
    del proto.metadata_props[:]
    for key, value in contract.items():
        proto.metadata_props.add(key=key, value=value if isinstance(value, str) else json.dumps(value))
    proto.metadata_props.add(key="contract", value=json.dumps(contract))
    onnx.save(proto, str(out))
    sidecar_path(out).write_text(json.dumps(contract, indent=2) + "\n")
    return out


def session(path: str | Path, threads: int | None = None) -> Any:
    """A CPU ONNX Runtime session (``threads``: intra-op threads, default ONNX Runtime's)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def agreement(float_path: str | Path, int8_path_: str | Path, batches: Sequence[np.ndarray]) -> dict[str, Any]:
    """How the int8 graph's outputs differ from the float32 graph's on ``batches`` (images *not* used for
    calibration). Classifier: ``top1_agreement`` and ``max_prob_diff``; segmenter: ``mask_dice`` (pooled over
    every pixel) and ``max_prob_diff``."""
    contract = load_contract(float_path)
    name = contract["input_name"]
    fp32, int8 = session(float_path), session(int8_path_)
    pairs = [(fp32.run(["probs"], {name: b})[0], int8.run(["probs"], {name: b})[0]) for b in batches]
    ref = np.concatenate([p[0] for p in pairs])
    got = np.concatenate([p[1] for p in pairs])
    result: dict[str, Any] = {"images": len(ref), "max_prob_diff": float(np.abs(ref - got).max())}
    if contract["kind"] == "classifier":
        result["top1_agreement"] = float((ref.argmax(1) == got.argmax(1)).mean())
    else:
        a, b = ref > contract["threshold"], got > contract["threshold"]
        total = a.sum() + b.sum()
        result["mask_dice"] = float(2 * (a & b).sum() / total) if total else 1.0
    return result


def throughput(path: str | Path, images: np.ndarray, repeats: int = 5, threads: int | None = None) -> float:
    """images/s of ``path`` on the batch ``images``: median of ``repeats`` timed runs after one warm-up."""
    import statistics
    import time

    run = session(path, threads)
    feed = {load_contract(path)["input_name"]: images}
    run.run(None, feed)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run.run(None, feed)
        times.append(time.perf_counter() - start)
    return len(images) / statistics.median(times)


def labelled_scores(path: str | Path, records: Sequence[Any], batch: int = 32) -> dict[str, float]:
    """Scores of an exported graph against the labels of ``records`` (:class:`~covid_lightning.data.scan.Record`):
    classifier ``accuracy``; segmenter ``dice`` and ``iou`` pooled over every pixel, ground-truth masks resized
    (nearest) to the model's size as in validation."""
    import cv2

    from covid_lightning.data.transforms import load_mask

    contract = load_contract(path)
    size, name, run = contract["image_size"], contract["input_name"], session(path)
    correct = inter = total = union = 0
    for i in range(0, len(records), batch):
        chunk = records[i : i + batch]
        images = load_batch([r.path for r in chunk], size)
        probs = run.run(["probs"], {name: images})[0]
        if contract["kind"] == "classifier":
            correct += int((probs.argmax(1) == np.array([r.label for r in chunk])).sum())
            continue
        pred = probs[:, 0] > contract["threshold"]
        truth = np.stack(
            [cv2.resize(load_mask(r.mask_path), (size, size), interpolation=cv2.INTER_NEAREST) > 0 for r in chunk]
        )
        inter += int((pred & truth).sum())
        total += int(pred.sum() + truth.sum())
        union += int((pred | truth).sum())
    if contract["kind"] == "classifier":
        return {"accuracy": correct / len(records)}
    return {"dice": 2 * inter / total if total else 1.0, "iou": inter / union if union else 1.0}
