"""Benchmark: a private ``model.fit`` step on one device vs 2 replicas (MirroredStrategy on 2
logical CPU devices) vs 2 workers (MultiWorkerMirroredStrategy, 2 processes on 127.0.0.1).

Each case runs in fresh processes (logical devices and TF_CONFIG must be set before TensorFlow
starts): an MLP (64 → 256 → 256 → 10) on 8192 rows, Poisson batches of 256, 2 epochs; the step
time is the second epoch's (traced and warm) divided by its steps. On this CPU-only machine
there is no speed-up to expect — 2 replicas share the same 2 cores — the point is the overhead
of the distributed step (one all-reduce, the host feed per replica). Prints one JSON line with
milliseconds per step and ratios to one device measured in this run.

    python bench/distribute.py
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

N, FEATURES, CLASSES, BATCH = 8192, 64, 10, 256


def _child(mode: str) -> None:
    import numpy as np
    import tensorflow as tf

    if mode == "mirrored":
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)  # fmt: skip
    import keras

    import kprivacy_nb

    strategy = {
        "single": tf.distribute.get_strategy,
        "mirrored": lambda: tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]),
        "multiworker": tf.distribute.MultiWorkerMirroredStrategy,
    }[mode]()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N, FEATURES)).astype(np.float32)
    y = rng.integers(0, CLASSES, N)
    with strategy.scope():
        model = keras.Sequential([
            keras.Input((FEATURES,)), keras.layers.Dense(256, activation="relu"),
            keras.layers.Dense(256, activation="relu"), keras.layers.Dense(CLASSES),
        ])  # fmt: skip
        model.compile(
            optimizer=keras.optimizers.SGD(0.1),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        kprivacy_nb.make_private(model, noise_multiplier=1.0, delta=1e-5)
    ends: list[float] = []

    class Clock(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            ends.append(time.perf_counter())

    model.fit(x, y, batch_size=BATCH, epochs=2, verbose=0, callbacks=[Clock()])
    seconds = time.perf_counter() - ends[1]
    print("RESULT " + json.dumps({"step_ms": 1000 * seconds / (N // BATCH)}), flush=True)


def _run(mode: str, workers: int = 1) -> float:
    env = {k: v for k, v in os.environ.items() if k != "TF_CONFIG"}
    env.update(TF_CPP_MIN_LOG_LEVEL="3", KPRIVACY_NB_LEDGER_URL="")
    ports = []
    if workers > 1:
        socks = [socket.socket() for _ in range(workers)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        ports = [s.getsockname()[1] for s in socks]
        for s in socks:
            s.close()
    procs = []
    for index in range(workers):
        if ports:
            env["TF_CONFIG"] = json.dumps({
                "cluster": {"worker": [f"127.0.0.1:{p}" for p in ports]},
                "task": {"type": "worker", "index": index},
            })  # fmt: skip
        procs.append(subprocess.Popen(
            [sys.executable, __file__, "--child", mode], env=dict(env), stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True,
        ))  # fmt: skip
    times = []
    for proc in procs:
        out, err = proc.communicate(timeout=900)
        lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            raise SystemExit(f"{mode} failed:\n{err[-2000:]}")
        times.append(json.loads(lines[-1][7:])["step_ms"])
    return max(times)  # the workers wait for each other: the slowest is the step


def main() -> None:
    single = _run("single")
    mirrored = _run("mirrored")
    multiworker = _run("multiworker", workers=2)
    print(json.dumps({
        "case": f"make_private fit step, MLP 64-256-256-10, batch {BATCH}",
        "single_ms": round(single, 2), "mirrored_2_replicas_ms": round(mirrored, 2),
        "multiworker_2_workers_ms": round(multiworker, 2),
        "mirrored_ratio": round(mirrored / single, 2),
        "multiworker_ratio": round(multiworker / single, 2),
    }))  # fmt: skip


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        _child(sys.argv[2])
    else:
        main()
