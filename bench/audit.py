"""One-run privacy audit (Steinke, Nasr & Jagielski 2023): the empirical ε lower bound beside the
proven ε, without DP and at ε = 1, 3, 8, with 1,000 mislabelled canaries.

Cases: ``synthetic`` (5,000 examples, 20 features, 4 Gaussian classes; MLP 20-128-4) and
``nslkdd`` (the bundled NSL-KDD 20% training split, 25,192 rows, 118 features; MLP 118-256-256-2).
The same model, optimizer and epochs are used with and without DP. Prints one JSON line per run:
``epsilon`` (proven; null = no DP), ``epsilon_lower_bound`` (95%), guesses, seconds, and
``seconds_ratio`` = this audit's time ÷ the no-DP audit's time measured in the same run.

    python bench/audit.py [synthetic nslkdd] [--canaries 1000] [--epsilons 1 3 8]
"""

from __future__ import annotations

import argparse
import json
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

from kprivacy_nb import audit  # noqa: E402

SETTINGS = {
    "synthetic": dict(epochs=30, batch_size=100, optimizer="adam", learning_rate=3e-3,
                      l2_norm_clip=5.0, delta=1e-5),
    "nslkdd": dict(epochs=10, batch_size=256, optimizer="adam", learning_rate=1e-3,
                   l2_norm_clip=5.0, delta=1e-5),
}  # fmt: skip


def data(case: str) -> tuple[np.ndarray, np.ndarray, list[int]]:
    if case == "synthetic":
        rng = np.random.default_rng(0)
        centers = rng.normal(size=(4, 20))
        y = rng.integers(0, 4, 5000)
        return (centers[y] + rng.normal(size=(5000, 20))).astype("float32"), y, [20, 128, 4]
    from kprivacy_nb.datasets import load_nsl_kdd

    d = load_nsl_kdd()
    return d.x_train, d.y_train.astype(np.int64), [d.x_train.shape[1], 256, 256, 2]


def builder(sizes: list[int]):
    def make_model() -> keras.Model:
        layers = [keras.Input((sizes[0],))]
        layers += [keras.layers.Dense(s, activation="relu") for s in sizes[1:-1]]
        model = keras.Sequential(layers + [keras.layers.Dense(sizes[-1])])
        model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        return model

    return make_model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("cases", nargs="*", default=["synthetic", "nslkdd"])
    parser.add_argument("--canaries", type=int, default=1000)
    parser.add_argument("--epsilons", type=float, nargs="*", default=[1.0, 3.0, 8.0])
    args = parser.parse_args()
    for case in args.cases:
        x, y, sizes = data(case)
        baseline = None
        for eps in [None, *args.epsilons]:
            private = {} if eps is None else {"target_epsilon": eps}
            result = audit.one_run(
                builder(sizes), x, y, canaries=args.canaries, private=eps is not None, seed=0,
                **SETTINGS[case], **private,
            )  # fmt: skip
            baseline = baseline or result.seconds
            s = result.summary()
            print(json.dumps({
                "case": case, "target_epsilon": eps, "epsilon": s["epsilon"],
                "epsilon_lower_bound": round(result.epsilon_lower_bound, 4),
                "contradicts": result.contradicts, "canaries": result.canaries,
                "guesses": s["guesses"], "correct": s["correct"], "auc": s["auc"],
                "n_train": result.n_train, "seconds": round(result.seconds, 1),
                "seconds_ratio": round(result.seconds / baseline, 2),
            }), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
