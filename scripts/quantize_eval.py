#!/usr/bin/env python
r"""INT8 vs float32 ONNX of one checkpoint on a labelled split: scores on the test images and CPU speed.

python scripts/quantize_eval.py --ckpt best.ckpt --root ../shared/data/covid_cls_sample --split runs/.../split.csv

Exports the checkpoint to ONNX, quantizes it (covid_lightning.quantize: calibrated on --calibration-images
images of the manifest's train split), then scores both graphs on its test split (classifier: accuracy and
top-1 agreement; segmenter: pixel Dice/IoU against the ground-truth masks and Dice between the two
graphs' masks) and times both at --batch (images/s, median of 5).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

try:
    import covid_lightning  # noqa: F401
except ModuleNotFoundError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    import numpy as np
    import torch

    from covid_lightning.data.split import read_manifest
    from covid_lightning.export import export_onnx
    from covid_lightning.inference import load_checkpoint
    from covid_lightning.quantize import agreement, calibration_batches, labelled_scores, quantize_onnx, throughput

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--ckpt", required=True, type=Path)
    parser.add_argument("--root", required=True, type=Path, help="the dataset the manifest was written for")
    parser.add_argument("--split", required=True, type=Path, help="split.csv with train and test rows")
    parser.add_argument("--calibration-images", type=int, default=128)
    parser.add_argument("--batch", type=int, default=64, help="batch of the speed measurement")
    args = parser.parse_args(argv)

    from covid_lightning.data.scan import find_dataset_root

    records, splits = read_manifest(args.split, find_dataset_root(args.root))
    train = [r for r, s in zip(records, splits, strict=True) if s == "train"]
    test = [r for r, s in zip(records, splits, strict=True) if s == "test"]
    if not test:
        raise SystemExit(f"{args.split} has no test rows.")
    model = load_checkpoint(args.ckpt)
    size = int(model.hparams.image_size)
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = export_onnx(model, Path(tmp) / "model.onnx")
        calibration = calibration_batches([r.path for r in train], size, count=args.calibration_images)
        int8 = quantize_onnx(fp32, None, calibration)
        test_batches = calibration_batches([r.path for r in test], size, count=len(test), batch=32)
        agree = agreement(fp32, int8, test_batches)
        speed_batch = np.concatenate(test_batches)[: args.batch]
        speed_batch = np.resize(speed_batch, (args.batch, *speed_batch.shape[1:]))  # repeat up to --batch
        threads = torch.get_num_threads()
        print(
            f"{args.ckpt} ({model.hparams.get('arch', type(model).__name__)}, {size} px): calibrated on "
            f"{sum(len(b) for b in calibration)} train images, scored on {len(test)} test images"
        )
        for name, path in (("float32", fp32), ("int8", int8)):
            scores = labelled_scores(path, test)
            figures = ", ".join(f"{k} {v:.4f}" for k, v in scores.items())
            print(
                f"  {name:8s} {figures}; {throughput(path, speed_batch, threads=threads):.1f} img/s at batch "
                f"{args.batch}, {threads} threads"
            )
        print("  int8 vs float32: " + ", ".join(f"{k} {v:.4g}" for k, v in agree.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
