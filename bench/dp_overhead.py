"""DP-SGD overhead: DP step time ÷ the same model's plain ``model.fit`` step time.

Cases (batch 256, measured in one run on this machine): MLP 784-256-256-10, a small CNN
(2 conv + 2 dense on 28×28×1) and Embedding(10000, 32) + pooling + dense. Each case trains the
plain model with ``model.fit`` and a fresh copy with ``dp_fit`` (Poisson sampling, σ=1, C=1) on
the same synthetic data; per-step times are the median over epochs after the first (tracing and
warm-up excluded). Prints one JSON line per case.

    python bench/dp_overhead.py [mlp cnn embedding] [--epochs 4] [--steps 30]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

from kprivacy_nb.dp.trainer import dp_fit  # noqa: E402

BATCH = 256


def build(case: str) -> tuple[keras.Model, np.ndarray]:
    k = keras.layers
    if case == "mlp":
        layers = [keras.Input((784,)), k.Dense(256, activation="relu"),
                  k.Dense(256, activation="relu"), k.Dense(10)]  # fmt: skip
        shape, kind = (784,), "float"
    elif case == "cnn":
        layers = [keras.Input((28, 28, 1)), k.Conv2D(16, 3, activation="relu"), k.MaxPooling2D(),
                  k.Conv2D(32, 3, activation="relu"), k.MaxPooling2D(), k.Flatten(),
                  k.Dense(64, activation="relu"), k.Dense(10)]  # fmt: skip
        shape, kind = (28, 28, 1), "float"
    elif case == "embedding":
        layers = [keras.Input((100,), dtype="int32"), k.Embedding(10000, 32),
                  k.GlobalAveragePooling1D(), k.Dense(10)]  # fmt: skip
        shape, kind = (100,), "int"
    else:
        raise SystemExit(f"unknown case {case!r}")
    return keras.Sequential(layers), (shape, kind)


class EpochTimer(keras.callbacks.Callback):
    def __init__(self) -> None:
        super().__init__()
        self.times: list[float] = []

    def on_epoch_begin(self, epoch, logs=None):
        self._t = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.times.append(time.perf_counter() - self._t)


class DPTimer:
    def __init__(self) -> None:
        self.times: list[float] = []

    def on_epoch_end(self, epoch, logs):
        self.times.append(logs["seconds"])


def run_case(case: str, epochs: int, steps: int) -> dict:
    rng = np.random.default_rng(0)
    n = BATCH * steps
    model, (shape, kind) = build(case)
    x = (rng.integers(0, 10000, (n, *shape)).astype("int32") if kind == "int"
         else rng.normal(size=(n, *shape)).astype("float32"))  # fmt: skip
    y = rng.integers(0, 10, n)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss=loss)
    plain = EpochTimer()
    model.fit(x, y, batch_size=BATCH, epochs=epochs, verbose=0, callbacks=[plain])
    base = statistics.median(plain.times[1:]) / steps

    dp_model, _ = build(case)
    dp = DPTimer()
    run = dp_fit(
        dp_model, x, y, epochs=epochs, batch_size=BATCH, noise_multiplier=1.0, l2_norm_clip=1.0,
        optimizer=keras.optimizers.SGD(0.01), loss=loss, verbose=0, callbacks=[dp],
    )  # fmt: skip
    dp_step = statistics.median(dp.times[1:]) / run.planned_curve.steps[0]
    return {
        "case": case, "batch_size": BATCH, "plain_step_ms": round(base * 1e3, 3),
        "dp_step_ms": round(dp_step * 1e3, 3), "ratio": round(dp_step / base, 3),
        "clipping": run.clipping, "traces": run.trace_count,
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cases", nargs="*", default=["mlp", "cnn", "embedding"])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--steps", type=int, default=30, help="steps per epoch")
    args = parser.parse_args()
    for case in args.cases:
        print(json.dumps(run_case(case, args.epochs, args.steps), ensure_ascii=False), flush=True)


if __name__ == "__main__":
    main()
