"""DP-SGD overhead: DP step time ÷ the same model's plain ``model.fit`` step time.

Cases (batch 256, measured in one run on this machine): MLP 784-256-256-10, a small CNN
(2 conv + 2 dense on 28×28×1) and Embedding(10000, 32) + pooling + dense; and, at batch 64 and
T = 64, ``transformer`` (one encoder block, see :func:`transformer`) and ``lstm`` (Embedding
5000×64 → LSTM 64 → Dense 2). Each case trains a
fresh model with ``dp_fit`` (Poisson sampling, σ=1, C=1) and, interleaved with it, an identical
model with plain ``model.fit`` on the same synthetic data: after every DP epoch one plain epoch
runs (from a ``dp_fit`` callback, outside the DP epoch's timing). Interleaving matters on shared
machines, whose speed drifts by tens of percent within a minute; both sides see the same drift.
Per-step times are medians over the epochs after the first (tracing and warm-up excluded); the
ratio is the median of the per-epoch DP/plain ratios. The engine's self-check (once per run,
before the first step) is reported separately as ``self_check_s``. With ``--memory``, each case
also trains for two epochs in fresh child processes, plain and DP, and reports two peaks, each
over the process after data and model were made: the RSS growth (``memory_ratio`` = DP ÷ plain:
everything, TensorFlow's graphs and kernel caches and the self-check included) and the peak of
the tensors TensorFlow's CPU allocator holds (``tensor_ratio``: the training's working set, what
grows with the model and the batch). The children run with ``TF_CPU_ALLOCATOR_USE_BFC=true``:
TensorFlow's default CPU allocator (oneDNN's) serves allocations under 256 KiB from a pool it
does not count, which hid most of a plain LSTM's per-step tensors (a plain step of the ``lstm``
case counted 2.8 MiB instead of 9.7). ``--physical-batch-size`` runs the DP side in micro-batches
of that many rows (``make_private``'s memory knob). Prints one JSON line per case.

    python bench/dp_overhead.py [mlp cnn embedding transformer lstm] [--epochs 12] [--steps 30]
        [--path fit] [--memory] [--physical-batch-size N]

``--path fit`` measures ``make_private(model)`` + Keras' ``model.fit`` against plain ``fit``
(``dp_fit`` by default measures both).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

from kprivacy_nb.dp.trainer import dp_fit  # noqa: E402

BATCH = 256
SEQ, VOCAB = 64, 5000  # the sequence cases (transformer, lstm): T = 64, batch 64
SEQUENCE_BATCH = 64
SEQUENCE_CASES = ("transformer", "lstm")


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
    elif case == "transformer":
        return transformer(), ((SEQ,), "int")
    elif case == "lstm":
        layers = [keras.Input((SEQ,), dtype="int32"), k.Embedding(VOCAB, 64), k.LSTM(64),
                  k.Dense(2)]  # fmt: skip
        shape, kind = (SEQ,), "int"
    else:
        raise SystemExit(f"unknown case {case!r}")
    return keras.Sequential(layers), (shape, kind)


def transformer() -> keras.Model:
    """One encoder block: Embedding 5000×64, MultiHeadAttention(4 heads, key_dim 16), residual +
    LayerNormalization, FFN Dense 128 → 64, residual + LayerNormalization, mean pooling, Dense 2."""
    k = keras.layers
    ids = keras.Input((SEQ,), dtype="int32")
    h = k.Embedding(VOCAB, 64)(ids)
    h = k.LayerNormalization()(h + k.MultiHeadAttention(4, 16)(h, h))
    ffn = k.Dense(64)(k.Dense(128, activation="relu")(h))
    h = k.LayerNormalization()(h + ffn)
    return keras.Model(ids, k.Dense(2)(k.GlobalAveragePooling1D()(h)))


class EpochTimer(keras.callbacks.Callback):
    def on_epoch_begin(self, epoch, logs=None):
        self._t = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.seconds = time.perf_counter() - self._t


class Interleaved:
    """dp_fit callback: times each DP epoch, then runs and times one plain epoch."""

    def __init__(self, plain_epoch) -> None:
        self.plain_epoch = plain_epoch
        self.dp: list[float] = []
        self.plain: list[float] = []

    def on_epoch_end(self, epoch, logs):
        self.dp.append(logs["seconds"])
        self.plain.append(self.plain_epoch())


def batch_size(case: str) -> int:
    return SEQUENCE_BATCH if case in SEQUENCE_CASES else BATCH


def setup(case: str, steps: int) -> tuple:
    """The plain model (compiled), its data and loss, and a function running one timed plain
    epoch."""
    rng = np.random.default_rng(0)
    batch = batch_size(case)
    n = batch * steps
    model, (shape, kind) = build(case)
    vocab, classes = (VOCAB, 2) if case in SEQUENCE_CASES else (10000, 10)
    x = (rng.integers(0, vocab, (n, *shape)).astype("int32") if kind == "int"
         else rng.normal(size=(n, *shape)).astype("float32"))  # fmt: skip
    y = rng.integers(0, classes, n)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss=loss)

    def plain_epoch() -> float:
        timer = EpochTimer()  # the epoch itself, not fit()'s per-call set-up
        model.fit(x, y, batch_size=batch, epochs=1, verbose=0, callbacks=[timer])
        return timer.seconds

    return model, x, y, loss, batch, plain_epoch


def run_case(case: str, epochs: int, steps: int) -> dict:
    _, x, y, loss, batch, plain_epoch = setup(case, steps)
    plain_epoch()  # trace and warm up outside the measurements
    dp_model, _ = build(case)
    timer = Interleaved(plain_epoch)
    run = dp_fit(
        dp_model, x, y, epochs=epochs, batch_size=batch, noise_multiplier=1.0, l2_norm_clip=1.0,
        optimizer=keras.optimizers.SGD(0.01), loss=loss, verbose=0, callbacks=[timer],
    )  # fmt: skip
    # Poisson batches vary in size; per epoch they average `batch` over n / batch steps, as plain.
    dp_steps = run.planned_curve.steps[0]
    dp = [t / dp_steps for t in timer.dp[1:]]
    plain = [t / steps for t in timer.plain[1:]]
    return {
        "case": case, "batch_size": batch, "epochs": epochs, "steps_per_epoch": steps,
        "plain_step_ms": round(statistics.median(plain) * 1e3, 3),
        "dp_step_ms": round(statistics.median(dp) * 1e3, 3),
        "ratio": round(statistics.median(d / p for d, p in zip(dp, plain, strict=True)), 3),
        "self_check_s": round(run.self_check_seconds, 3),
        "clipping": run.clipping, "traces": run.trace_count,
    }  # fmt: skip


class KerasInterleaved(keras.callbacks.Callback):
    """Keras callback for the private ``fit``: times each DP epoch's steps (first step start to
    last step end; the per-epoch ε computation after it is excluded), then runs one plain epoch."""

    def __init__(self, plain_epoch) -> None:
        super().__init__()
        self.plain_epoch = plain_epoch
        self.dp: list[float] = []
        self.plain: list[float] = []

    def on_epoch_begin(self, epoch, logs=None):
        self._t = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        self._last = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.dp.append(self._last - self._t)
        self.plain.append(self.plain_epoch())


def run_case_fit(case: str, epochs: int, steps: int) -> dict:
    """The same comparison through ``make_private(model)`` + Keras' ``model.fit``."""
    from kprivacy_nb import make_private

    _, x, y, loss, batch, plain_epoch = setup(case, steps)
    plain_epoch()
    dp_model, _ = build(case)
    dp_model.compile(optimizer=keras.optimizers.SGD(0.01), loss=loss)
    make_private(dp_model, noise_multiplier=1.0, l2_norm_clip=1.0, delta=1e-5)
    timer = KerasInterleaved(plain_epoch)
    dp_model.fit(x, y, batch_size=batch, epochs=epochs, verbose=0, callbacks=[timer])
    card = dp_model.privacy
    dp_steps = card.steps // epochs
    dp = [t / dp_steps for t in timer.dp[1:]]
    plain = [t / steps for t in timer.plain[1:]]
    return {
        "case": case, "path": "make_private + model.fit", "batch_size": batch, "epochs": epochs,
        "steps_per_epoch": steps,
        "plain_step_ms": round(statistics.median(plain) * 1e3, 3),
        "dp_step_ms": round(statistics.median(dp) * 1e3, 3),
        "ratio": round(statistics.median(d / p for d, p in zip(dp, plain, strict=True)), 3),
        "self_check_s": round(card.self_check_seconds, 3), "clipping": card.clipping,
    }  # fmt: skip


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def memory_child(case: str, mode: str, path: str, steps: int, physical: int | None) -> None:
    """Train ``case`` for two epochs (plain, or DP by ``path``); print the peak RSS growth and
    the peak of TensorFlow's CPU tensor allocations."""
    if os.environ.get("TF_CPU_ALLOCATOR_USE_BFC") != "true":
        sys.exit("--memory-child counts every tensor only with TF_CPU_ALLOCATOR_USE_BFC=true")
    import tensorflow as tf

    from kprivacy_nb.dp import clipping, engine, private  # noqa: F401  (imports aren't training)

    model, x, y, loss, batch, _ = setup(case, steps)
    dp_model, _ = build(case)
    tf.config.experimental.reset_memory_stats("CPU:0")
    tensors = tf.config.experimental.get_memory_info("CPU:0")["current"]
    before = _rss_kib("VmRSS")
    if mode == "plain":
        model.fit(x, y, batch_size=batch, epochs=2, verbose=0)
    elif path == "fit":
        from kprivacy_nb import make_private

        dp_model.compile(optimizer=keras.optimizers.SGD(0.01), loss=loss)
        make_private(dp_model, noise_multiplier=1.0, l2_norm_clip=1.0, delta=1e-5,
                     physical_batch_size=physical)  # fmt: skip
        dp_model.fit(x, y, batch_size=batch, epochs=2, verbose=0)
    else:
        dp_fit(dp_model, x, y, epochs=2, batch_size=batch, noise_multiplier=1.0, verbose=0,
               optimizer=keras.optimizers.SGD(0.01), loss=loss,
               physical_batch_size=physical)  # fmt: skip
    peak = tf.config.experimental.get_memory_info("CPU:0")["peak"] - tensors
    print(json.dumps({"growth_mib": (_rss_kib("VmHWM") - before) / 1024,
                      "tensor_mib": peak / 2**20}))  # fmt: skip


#: The memory children's environment: every tensor through an allocator that counts it.
COUNT_EVERY_TENSOR = {**os.environ, "TF_CPU_ALLOCATOR_USE_BFC": "true"}


def peak_memory(case: str, path: str, steps: int, physical: int | None = None) -> dict:
    """Peak RSS growth and peak tensor memory of plain and DP training, each in a fresh
    process."""
    out = {}
    for mode in ("plain", "dp"):
        extra = ["--physical-batch-size", str(physical)] if physical else []
        child = subprocess.run(
            [sys.executable, __file__, case, "--memory-child", mode, "--path", path,
             "--steps", str(steps), *extra],
            capture_output=True, text=True, check=True, env=COUNT_EVERY_TENSOR,
        )  # fmt: skip
        out[mode] = json.loads(child.stdout.strip().splitlines()[-1])
    plain, dp = out["plain"], out["dp"]
    return {
        "plain_peak_mib": round(plain["growth_mib"], 1), "dp_peak_mib": round(dp["growth_mib"], 1),
        "memory_ratio": round(dp["growth_mib"] / max(plain["growth_mib"], 1.0), 2),
        "plain_tensor_mib": round(plain["tensor_mib"], 1),
        "dp_tensor_mib": round(dp["tensor_mib"], 1),
        "tensor_ratio": round(dp["tensor_mib"] / max(plain["tensor_mib"], 0.1), 2),
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cases", nargs="*", default=["mlp", "cnn", "embedding"])
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--steps", type=int, default=30, help="steps per epoch")
    parser.add_argument(
        "--path", choices=["dp_fit", "fit", "both"], default="both",
        help="dp_fit(), make_private + model.fit, or both",
    )  # fmt: skip
    parser.add_argument("--memory", action="store_true", help="also measure peak memory")
    parser.add_argument(
        "--physical-batch-size", type=int, default=None,
        help="with --memory: the DP side in micro-batches of this many rows",
    )  # fmt: skip
    parser.add_argument("--memory-child", choices=["plain", "dp"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        memory_child(
            args.cases[0], args.memory_child, args.path, args.steps, args.physical_batch_size
        )
        return
    for case in args.cases:
        for path, run in (("dp_fit", run_case), ("fit", run_case_fit)):
            if args.path not in (path, "both"):
                continue
            out = run(case, args.epochs, args.steps)
            if args.memory:
                out.update(peak_memory(case, path, args.steps, args.physical_batch_size))
            print(json.dumps(out, ensure_ascii=False), flush=True)


if __name__ == "__main__":
    main()
