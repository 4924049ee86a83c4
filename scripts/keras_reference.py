"""Time the lab's Keras models on this machine: the "Keras" column of the benchmark, measured here.

The benchmark shows Keras figures only from a JSON this script wrote on the same machine, so every
comparison is like for like. It needs TensorFlow, which covid-lightning does not depend on; use a
separate environment:

    python -m venv /tmp/tf && /tmp/tf/bin/pip install "tensorflow-cpu==2.21.*"
    /tmp/tf/bin/python scripts/keras_reference.py [--weights ../shared/weights/<keras .h5>] --json k.json
    python scripts/benchmark.py --keras-json k.json

On a CPU with native bfloat16 (AVX512-BF16 or AMX) the U-Net rows are also measured under Keras'
``mixed_bfloat16`` policy (the lab's mixed precision on a CPU).

Figures are medians of ``--repeats`` timed calls after ``--warmup`` untimed ones, as in
``scripts/benchmark.py``: ms per training step (``train_on_batch``) and images/s for ``predict_on_batch``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _median_ms(fn: Callable[[], object], warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def cpu_flags() -> set[str]:
    """The CPU's feature flags (``/proc/cpuinfo``; empty elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def classifier(keras: Any, trainable: str, weights: str | None) -> Any:
    """The lab's MobileNetV2 alpha=0.5 + GAP -> 1024 -> 512 -> 4, in one of the lab's regimes."""
    base = keras.applications.MobileNetV2(input_shape=(224, 224, 3), alpha=0.5, include_top=False, weights=weights)
    base.trainable = trainable == "all"
    if trainable == "last_2_conv":
        for name in ("Conv_1", "Conv_1_bn", "block_16_project", "block_16_project_BN"):
            base.get_layer(name).trainable = True
    inputs = keras.Input((224, 224, 3))
    x = base(inputs, training=False)  # frozen BN in inference mode, as the lab
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dense(1024, activation="relu")(x)
    x = keras.layers.Dense(512, activation="relu")(x)
    model = keras.Model(inputs, keras.layers.Dense(4, activation="softmax")(x))
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    return model


def unet(keras: Any) -> Any:
    """The lab's U-Net: 466,529 parameters."""
    layers = keras.layers

    def block(x: Any, filters: int) -> Any:
        x = layers.Conv2D(filters, 3, padding="same", activation="relu")(x)
        return layers.Conv2D(filters, 3, padding="same", activation="relu")(x)

    inputs = keras.Input((128, 128, 3))
    c1 = block(inputs, 32)
    c2 = block(layers.MaxPooling2D()(c1), 64)
    c3 = block(layers.MaxPooling2D()(c2), 128)
    u2 = block(layers.Concatenate()([layers.Conv2DTranspose(64, 2, strides=2)(c3), c2]), 64)
    u1 = block(layers.Concatenate()([layers.Conv2DTranspose(32, 2, strides=2)(u2), c1]), 32)
    model = keras.Model(inputs, layers.Conv2D(1, 1, activation="sigmoid")(u1))
    model.compile(optimizer="adam", loss="binary_crossentropy")
    return model


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", default=None, help="the lab's Keras .h5 (default: random init, same speed)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    import numpy as np
    import tensorflow as tf

    keras = tf.keras
    rng = np.random.default_rng(0)
    rows: list[dict[str, Any]] = []
    reference: dict[str, float] = {}

    def add(case: str, value: float, unit: str, key: str) -> None:
        """``key``: section/model/case/precision, as scripts/benchmark.py --keras-json reads it."""
        rows.append({"case": case, "value": round(value, 1), "unit": unit, "key": key})
        reference[key] = round(value, 1)
        print(f"{case:<45} {value:9.1f} {unit}", flush=True)

    print(f"TensorFlow {tf.__version__}, {cpu_name()}, {os.cpu_count()} CPUs")
    x = rng.random((32, 224, 224, 3), dtype=np.float32)
    y = rng.integers(0, 4, 32)
    for regime in ("head", "last_2_conv", "all"):
        model = classifier(keras, regime, args.weights)
        add(
            f"classifier train {regime}, batch 32, 224 px",
            _median_ms(lambda m=model: m.train_on_batch(x, y), args.warmup, args.repeats),
            "ms/step",
            f"train/classifier/{regime}/32-true",
        )
    xi = rng.random((64, 224, 224, 3), dtype=np.float32)
    add(
        "classifier inference, batch 64",
        64000 / _median_ms(lambda: model.predict_on_batch(xi), args.warmup, args.repeats),
        "img/s",
        "infer/classifier/infer/32-true",
    )

    xs = rng.random((16, 128, 128, 3), dtype=np.float32)
    ys = (rng.random((16, 128, 128, 1)) > 0.5).astype(np.float32)
    xsi = rng.random((64, 128, 128, 3), dtype=np.float32)
    flags = cpu_flags()
    precisions = ["32-true"] + (["bf16-mixed"] if {"avx512_bf16", "amx_bf16"} & flags else [])
    for precision in precisions:
        keras.mixed_precision.set_global_policy("mixed_bfloat16" if precision == "bf16-mixed" else "float32")
        seg = unet(keras)
        assert seg.count_params() == 466_529, seg.count_params()
        add(
            f"U-Net train {precision}, batch 16, 128 px",
            _median_ms(lambda m=seg: m.train_on_batch(xs, ys), args.warmup, args.repeats),
            "ms/step",
            f"train/unet/train/{precision}",
        )
        add(
            f"U-Net inference {precision}, batch 64",
            64000 / _median_ms(lambda m=seg: m.predict_on_batch(xsi), args.warmup, args.repeats),
            "img/s",
            f"infer/unet/infer/{precision}",
        )
    keras.mixed_precision.set_global_policy("float32")
    if args.json:
        machine = {"cpu": cpu_name(), "cpus": os.cpu_count(), "bf16_flags": sorted({"avx512_bf16", "amx_bf16"} & flags)}
        out = {"tensorflow": tf.__version__, "machine": machine, "reference": reference, "rows": rows}
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
