#!/usr/bin/env python
r"""INT8 vs float32 ONNX of one checkpoint on a labelled split: scores on the test images and CPU speed.

python scripts/quantize_eval.py --ckpt best.ckpt --root ../shared/data/covid_cls_sample --split runs/.../split.csv

Exports the checkpoint to ONNX, quantizes it (calibrated on --calibration-images images of the manifest's train
split), scores both graphs on its test split (classifier: accuracy; segmenter: pixel Dice/IoU against the
ground-truth masks, as in validation) with torchmetrics, compares them (covid_lightning.export.agreement) and
times both at --batch (images/s, median of 5).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchmetrics import MetricCollection
from torchmetrics.classification import BinaryF1Score, BinaryJaccardIndex, MulticlassAccuracy

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a checkout without `pip install -e .`
from covid_lightning.export import agreement, calibration_batches, export_onnx, load_contract, quantize_onnx, session
from covid_lightning.inference import input_spec, preprocess


def throughput(path: str | Path, images: np.ndarray, repeats: int = 5, threads: int | None = None) -> float:
    """images/s of an exported graph on the batch ``images``: median of ``repeats`` timed runs after a warm-up."""
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
    """Scores of an exported graph against the labels of ``records``: classifier ``accuracy``; segmenter ``dice``
    and ``iou`` over every pixel, the ground-truth masks resized (nearest) to the model's size as in validation."""
    import cv2

    from covid_lightning.data.transforms import load_mask

    contract = load_contract(path)
    size, run = contract["image_size"], session(path)
    if contract["kind"] == "classifier":
        metrics = MetricCollection({"accuracy": MulticlassAccuracy(len(contract["class_names"]), average="micro")})
    else:
        metrics = MetricCollection({"dice": BinaryF1Score(zero_division=1), "iou": BinaryJaccardIndex(zero_division=1)})
    for i in range(0, len(records), batch):
        chunk = records[i : i + batch]
        probs = torch.from_numpy(
            run.run(
                ["probs"],
                {
                    contract["input_name"]: preprocess(
                        [r.path for r in chunk], size, contract.get("intensity", "none")
                    ).numpy()
                },
            )[0]
        )
        if contract["kind"] == "classifier":
            metrics.update(probs, torch.tensor([r.label for r in chunk]))
            continue
        masks = [cv2.resize(load_mask(r.mask_path), (size, size), interpolation=cv2.INTER_NEAREST) > 0 for r in chunk]
        metrics.update((probs[:, 0] > contract["threshold"]).long(), torch.from_numpy(np.stack(masks)).long())
    return {k: float(v) for k, v in metrics.compute().items()}


def main(argv: list[str] | None = None) -> int:
    from covid_lightning.data.split import select_records
    from covid_lightning.inference import load_checkpoint

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--ckpt", required=True, type=Path)
    parser.add_argument("--root", required=True, type=Path, help="the dataset the manifest was written for")
    parser.add_argument("--split", required=True, type=Path, help="split.csv with train and test rows")
    parser.add_argument("--calibration-images", type=int, default=128)
    parser.add_argument("--batch", type=int, default=64, help="batch of the speed measurement")
    args = parser.parse_args(argv)

    selection = select_records(args.root, masks=None, split_file=args.split, duplicates="none")
    train, test = selection.records("train"), selection.records("test")
    if not test:
        raise SystemExit(f"{args.split} has no test rows.")
    model = load_checkpoint(args.ckpt)
    spec = input_spec(model)
    size = spec[0]
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = export_onnx(model, Path(tmp) / "model.onnx")
        calibration = calibration_batches([r.path for r in train], spec, count=args.calibration_images)
        int8 = quantize_onnx(fp32, None, calibration)
        test_batches = calibration_batches([r.path for r in test], spec, count=len(test), batch=32)
        agree = agreement(fp32, int8, test_batches)
        speed_batch = np.concatenate(test_batches)[: args.batch]
        speed_batch = np.resize(speed_batch, (args.batch, *speed_batch.shape[1:]))  # repeat up to --batch
        threads = torch.get_num_threads()
        print(
            f"{args.ckpt} ({type(model).__name__}, {size} px): calibrated on {sum(len(b) for b in calibration)} "
            f"train images, scored on {len(test)} test images"
        )
        for name, path in (("float32", fp32), ("int8", int8)):
            figures = ", ".join(f"{k} {v:.4f}" for k, v in labelled_scores(path, test).items())
            speed = throughput(path, speed_batch, threads=threads)
            print(f"  {name:8s} {figures}; {speed:.1f} img/s at batch {args.batch}, {threads} threads")
        print("  int8 vs float32: " + ", ".join(f"{k} {v:.4g}" for k, v in agree.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
