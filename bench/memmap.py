"""Private ``fit`` on an ``np.memmap`` ÷ the same ``fit`` on the same data in memory.

``make_private(model)`` gathers each Poisson batch's rows on the host, so a memmap is read row by
row as training goes instead of being loaded. This measures what that costs: the same MLP
(256-128-10, batch 1024, σ=1) trained for a few epochs on the data in memory and on a memmap of
it in a temporary folder, interleaved epoch by epoch (both see the same machine drift). Also
reports the process's anonymous-memory growth during the memmap run against the file's size.
Prints one JSON line.

    python bench/memmap.py [--rows 200000] [--epochs 4]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

from kprivacy_nb import make_private  # noqa: E402

D, BATCH = 256, 1024


def anon_mib() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
    return float("nan")


class Timer(keras.callbacks.Callback):
    def on_epoch_begin(self, epoch, logs=None):
        self._t = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        self._last = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.seconds = self._last - self._t


def model() -> keras.Model:
    m = keras.Sequential(
        [keras.Input((D,)), keras.layers.Dense(128, activation="relu"), keras.layers.Dense(10)]
    )
    m.compile(
        optimizer=keras.optimizers.SGD(0.05),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return make_private(m, noise_multiplier=1.0, delta=1e-7)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--epochs", type=int, default=4)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    y = rng.integers(0, 10, args.rows)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "x.npy")
        disk = np.lib.format.open_memmap(path, mode="w+", dtype="float32", shape=(args.rows, D))
        for start in range(0, args.rows, 50_000):
            stop = min(start + 50_000, args.rows)
            disk[start:stop] = rng.normal(size=(stop - start, D)).astype("float32")
        disk.flush()
        del disk
        mapped = np.load(path, mmap_mode="r")
        in_memory = np.array(mapped)
        a, b = model(), model()
        times: dict[str, list[float]] = {"memory": [], "memmap": []}
        growth = 0.0
        for _ in range(args.epochs):
            for name, net, x in (("memory", a, in_memory), ("memmap", b, mapped)):
                timer = Timer()
                before = anon_mib()
                net.fit(x, y, batch_size=BATCH, epochs=1, verbose=0, callbacks=[timer])
                if name == "memmap":
                    growth = max(growth, anon_mib() - before)
                times[name].append(timer.seconds)
    ratio = statistics.median(m / i for m, i in zip(times["memmap"], times["memory"], strict=True))
    print(
        json.dumps(
            {
                "case": "memmap vs in-memory, make_private + fit",
                "rows": args.rows,
                "file_mib": round(args.rows * D * 4 / 2**20),
                "batch_size": BATCH,
                "memory_epoch_s": round(statistics.median(times["memory"]), 3),
                "memmap_epoch_s": round(statistics.median(times["memmap"]), 3),
                "ratio": round(ratio, 3),
                "memmap_anon_growth_mib": round(growth, 1),
            }  # fmt: skip
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
