"""One process of tests/test_dp_distribute.py (not a test module): trains under a strategy and
prints one JSON line of measurements.

``python tests/distribute_worker.py mirrored LEDGER_PATH`` — 2 logical CPU devices, one process
(it also runs the single-device reference). ``... multiworker LEDGER_PATH`` — one worker of a
``MultiWorkerMirroredStrategy`` cluster described by ``TF_CONFIG``.
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

MODE, LEDGER_PATH = sys.argv[1], sys.argv[2]
if MODE == "mirrored":
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

import keras  # noqa: E402

import kprivacy_nb  # noqa: E402
from kprivacy_nb.dp.ledger import Ledger  # noqa: E402

if MODE == "mirrored":
    STRATEGY = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
else:
    STRATEGY = tf.distribute.MultiWorkerMirroredStrategy()
CLIP, LR = 0.3, 1.0


def private_model(layers, loss, strategy=STRATEGY, **dp):
    with strategy.scope():
        model = keras.Sequential(layers)
        model.compile(optimizer=keras.optimizers.SGD(LR), loss=loss)
        kprivacy_nb.make_private(model, **dp)
    return model


def noise_ratio() -> float:
    """Zero inputs, no bias: every gradient is 0, so one step's update is -lr · noise / B."""
    n, d, units, sigma, clip = 64, 128, 32, 2.0, 1.5
    model = private_model(
        [keras.Input((d,)), keras.layers.Dense(units, use_bias=False)], "mse",
        noise_multiplier=sigma, l2_norm_clip=clip, delta=1e-5,
    )  # fmt: skip
    before = model.get_weights()[0]
    x, y = np.zeros((n, d), np.float32), np.zeros((n, units), np.float32)
    model.fit(x, y, batch_size=n, epochs=1, verbose=0)  # q = 1: one step of all n rows
    update = model.get_weights()[0] - before
    return float(update.std() / (LR * sigma * clip / n))


def small(seed: int = 0):
    keras.utils.set_random_seed(seed)
    return [keras.Input((5,)), keras.layers.Dense(4, activation="tanh"), keras.layers.Dense(1)]


def naive_update(weights, x, y, sample_weight) -> list[np.ndarray]:
    """-lr · Σ clip(per-example gradient) / B, one example at a time, on one device."""
    model = keras.Sequential(small())
    model.set_weights(weights)
    total = [np.zeros_like(w) for w in weights]
    for i in range(len(x)):
        with tf.GradientTape() as tape:
            loss = keras.losses.mean_squared_error(y[i : i + 1], model(x[i : i + 1]))[0]
        grads = [g.numpy() for g in tape.gradient(loss, model.trainable_variables)]
        norm = np.sqrt(sum(float((g**2).sum()) for g in grads))
        factor = sample_weight[i] * min(1.0, CLIP / max(norm, 1e-12))
        total = [t + factor * g for t, g in zip(total, grads, strict=True)]
    return [-LR * t / len(x) for t in total]


def clipped_steps() -> dict:
    """σ = 0, q = 1 (every row in the one step): the update equals the naive clipped mean; with
    one example removed (weight 0) it moves by at most lr · C / B."""
    rng = np.random.default_rng(1)
    n = 32
    x = rng.normal(size=(n, 5)).astype(np.float32) * 3
    y = rng.normal(size=(n, 1)).astype(np.float32) * 3
    start = keras.Sequential(small()).get_weights()
    updates = []
    for weights in (np.ones(n, np.float32), np.where(np.arange(n) == 5, 0.0, 1.0)):
        model = private_model(small(), "mse", noise_multiplier=0.0, l2_norm_clip=CLIP)
        model.set_weights(start)
        model.fit(x, y, batch_size=n, epochs=1, verbose=0, sample_weight=weights)
        updates.append([a - b for a, b in zip(model.get_weights(), start, strict=True)])
    naive = naive_update(start, x, y, np.ones(n))
    flat = [np.concatenate([u.ravel() for u in upd]) for upd in updates]
    diffs = [np.abs(a - b).max() for a, b in zip(updates[0], naive, strict=True)]
    return {
        "naive_max_diff": float(max(diffs)),
        "naive_scale": float(np.abs(np.concatenate([u.ravel() for u in naive])).max()),
        "removal_change": float(np.linalg.norm(flat[0] - flat[1])),
        "removal_bound": LR * CLIP / n,
    }


def ledger_run(name: str, strategy) -> dict:
    rng = np.random.default_rng(2)
    n, batch = 256, 32
    x = rng.normal(size=(n, 5)).astype(np.float32)
    y = rng.normal(size=(n, 1)).astype(np.float32)
    ledger = Ledger(LEDGER_PATH)
    model = private_model(
        small(), "mse", strategy=strategy, noise_multiplier=1.0, l2_norm_clip=CLIP,
        ledger=(name, ledger),
    )  # fmt: skip
    history = model.fit(x, y, batch_size=batch, epochs=2, verbose=0)
    return {
        "epsilon": model.privacy.epsilon,
        "history_epsilon": history.history["epsilon"],
        "steps": model.privacy.steps,
        "weights_sum": float(sum(float(np.sum(w)) for w in model.get_weights())),
    }


def main() -> None:
    out = {"replicas": STRATEGY.num_replicas_in_sync, "noise_ratio": noise_ratio()}
    out.update(clipped_steps())
    out["distributed"] = ledger_run("team", STRATEGY)
    if MODE == "mirrored":  # the same run on one device, for comparison
        out["single"] = ledger_run("single", tf.distribute.get_strategy())
    print("RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
