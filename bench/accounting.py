"""Benchmark: how long a planner redraw takes (a 100-epoch ε curve), RDP vs PLD.

Targets from the issue: a 100-epoch curve under RDP ≤ 0.1 s and under PLD ≤ 1 s. The baseline
measured in the same run is the naive curve (one full ``compute_epsilon`` per epoch, caches
cleared); ``speedup`` is naive / incremental. Prints one JSON line per case (best of --repeat).

    python bench/accounting.py [--epochs 100] [--repeat 3] [--naive-pld-epochs 20]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
import warnings
from collections.abc import Callable

os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("KPRIVACY_NB_HOME", tempfile.mkdtemp(prefix="kp-bench-"))

from kprivacy_nb.dp import accounting as acc  # noqa: E402

N, BATCH, SIGMA, DELTA = 60000, 256, 1.1, 1e-5


def best_of(repeat: int, func: Callable[[], object]) -> float:
    times = []
    for _ in range(repeat):
        acc._epsilon_cached.cache_clear()
        t = time.perf_counter()
        func()
        times.append(time.perf_counter() - t)
    return min(times)


def naive_curve(epochs: int, accountant: str) -> list[float]:
    return [
        acc.compute_epsilon(N, BATCH, k, SIGMA, DELTA, accountant=accountant)
        for k in range(1, epochs + 1)
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=100)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--naive-pld-epochs", type=int, default=20,
                    help="the naive PLD baseline is slow; compare on this many epochs")  # fmt: skip
    args = ap.parse_args()
    e = args.epochs
    from kprivacy_nb.widgets.planner import PLANNER_PLD_DISCRETIZATION, BudgetPlanner

    def emit(case: str, seconds: float, **extra: object) -> None:
        print(json.dumps({"case": case, "epochs": extra.pop("epochs", e),
                          "seconds": round(seconds, 4), **extra}), flush=True)  # fmt: skip

    # RDP: incremental vs naive, 100 epochs.
    rdp = best_of(args.repeat, lambda: acc.epsilon_curve(N, BATCH, e, SIGMA, DELTA,
                                                         accountant="rdp"))  # fmt: skip
    rdp_naive = best_of(1, lambda: naive_curve(e, "rdp"))
    emit("curve_rdp", rdp, target_seconds=0.1, ok=rdp <= 0.1, speedup=round(rdp_naive / rdp, 1))
    emit("curve_rdp_naive", rdp_naive)

    # PLD as the planner draws it (coarser, pessimistic grid) and on compute_epsilon's grid.
    pld = best_of(args.repeat, lambda: acc.epsilon_curve(
        N, BATCH, e, SIGMA, DELTA, value_discretization_interval=PLANNER_PLD_DISCRETIZATION))  # fmt: skip
    emit("curve_pld_planner_grid", pld, target_seconds=1.0, ok=pld <= 1.0,
         grid=PLANNER_PLD_DISCRETIZATION)  # fmt: skip
    fine = best_of(1, lambda: acc.epsilon_curve(N, BATCH, e, SIGMA, DELTA))
    emit("curve_pld_fine_grid", fine, grid=acc.PLD_DISCRETIZATION)

    k = args.naive_pld_epochs
    inc = best_of(1, lambda: acc.epsilon_curve(N, BATCH, k, SIGMA, DELTA))
    naive = best_of(1, lambda: naive_curve(k, "pld"))
    emit("curve_pld_fine_grid", inc, epochs=k, speedup=round(naive / inc, 1))
    emit("curve_pld_naive", naive, epochs=k)

    # A full planner redraw (accounting + matplotlib + PNG) after an epochs change.
    for accountant, target in (("rdp", 0.1), ("pld", 1.0)):
        planner = BudgetPlanner(N, BATCH, epochs=e - 1, noise_multiplier=SIGMA, delta=DELTA,
                                accountant=accountant)  # fmt: skip

        def redraw(p: BudgetPlanner = planner) -> None:
            p.epochs_slider.value = e if p.epochs_slider.value != e else e - 1

        t = best_of(args.repeat, redraw)
        emit(f"planner_redraw_{accountant}", t, target_seconds=target, ok=t <= target)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for accountant in ("rdp", "pld"):
            t = best_of(1, lambda a=accountant: acc.calibrate_noise(1.0, N, BATCH, 15, DELTA,
                                                                      accountant=a))  # fmt: skip
            emit(f"calibrate_{accountant}", t, epochs=15)


if __name__ == "__main__":
    main()
