"""Benchmark: the ledger's reserve+settle latency and throughput, PostgreSQL vs SQLite.

Writers are separate processes (as kernels are), each running ``cycles`` reserve+settle pairs
through the public :class:`Ledger` API, all on one budget (``shared``: they take turns on its
row lock) or each on its own (``separate``: PostgreSQL's row locks let them overlap; SQLite's
file lock does not). PostgreSQL is a throwaway local cluster on a Unix socket with fsync on;
SQLite is a file in a temp folder (its defaults). Budgets use the RDP accountant so the
accounting inside each reservation stays small next to the storage being measured. Each case
prints one JSON line; ``ratio_to_sqlite`` compares throughput with the same case on SQLite
measured in this run.

    python bench/ledger.py [--writers 8] [--cycles 20]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import sys
import tempfile
import time
from pathlib import Path

import dp_accounting

from kprivacy_nb.dp.ledger import Ledger
from kprivacy_nb.dp.pg_local import LocalPostgres

EVENT = dp_accounting.GaussianDpEvent(50.0)  # a small spend: the cap is never the limit


def _writer(location: str, budget: str, cycles: int, barrier, queue) -> None:
    with Ledger(location) as led:
        led.budget(budget)  # connect and warm up before the clock starts
        barrier.wait()
        latencies = []
        for _ in range(cycles):
            start = time.perf_counter()
            led.reserve(budget, EVENT).settle()
            latencies.append(time.perf_counter() - start)
    queue.put(latencies)


def run_case(location: str, writers: int, cycles: int, shared: bool) -> dict:
    names = ["shared"] if shared else [f"w{i}" for i in range(writers)]
    with Ledger(location) as led:
        for name in names:
            led.create(name, 1e6, 1e-5, accountant="rdp", exist_ok=True)
    ctx = multiprocessing.get_context("fork")
    barrier, queue = ctx.Barrier(writers + 1), ctx.Queue()
    procs = [
        ctx.Process(target=_writer, args=(location, names[i % len(names)], cycles, barrier, queue))
        for i in range(writers)
    ]
    for p in procs:
        p.start()
    barrier.wait()
    start = time.perf_counter()
    latencies = [x for _ in procs for x in queue.get(timeout=600)]
    wall = time.perf_counter() - start
    for p in procs:
        p.join(timeout=60)
    with Ledger(location) as led:
        recorded = sum(led.budget(name).runs for name in names)
        for name in names:
            led.delete(name)
    assert recorded == writers * cycles, (recorded, writers * cycles)
    ms = sorted(x * 1000 for x in latencies)
    return {
        "writers": writers,
        "budgets": len(names),
        "cycles": len(ms),
        "p50_ms": round(statistics.median(ms), 2),
        "p95_ms": round(ms[int(0.95 * (len(ms) - 1))], 2),
        "throughput_per_s": round(len(ms) / wall, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--writers", type=int, default=8)
    parser.add_argument("--cycles", type=int, default=20, help="reserve+settle pairs per writer")
    args = parser.parse_args(argv)
    cases = [("1_writer", 1, True), (f"{args.writers}_writers_shared", args.writers, True),
             (f"{args.writers}_writers_separate", args.writers, False)]  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp, LocalPostgres(fsync=True) as pg:
        locations = {"sqlite": str(Path(tmp) / "ledger.sqlite3"), "postgres": pg.url()}
        baseline: dict[str, float] = {}
        for backend in ("sqlite", "postgres"):
            for case, writers, shared in cases:
                result = run_case(locations[backend], writers, args.cycles, shared)
                if backend == "sqlite":
                    baseline[case] = result["throughput_per_s"]
                ratio = result["throughput_per_s"] / baseline[case]
                line = {"case": f"{backend}_{case}", **result, "ratio_to_sqlite": round(ratio, 2)}
                print(json.dumps(line), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
