"""Benchmark: age encryption/decryption, ours vs the reference Go ``age`` CLI (and rage), plus the
cost of post-quantum (ML-KEM-768 + X25519) key wrapping.

Every throughput case is a fresh subprocess reading and writing files in one temp folder (same
filesystem), on the same plaintext (default 512 MiB):

* ``ours_encrypt|decrypt``: ``kprivacy_nb.crypto.age`` streaming file to file, in-process timing,
  threads chosen as by default (one thread below 4 CPUs); ``*_2threads``: the pipeline forced;
* ``ours_cli_*``: the whole ``python -m kprivacy_nb encrypt|decrypt -o OUT IN`` process, timed
  like ``age`` (interpreter start included);
* ``age_*``: ``/usr/bin/age -r … -o OUT IN`` / ``age -d -i KEY -o OUT IN``;
* ``rage_*``: pyrage (rage's Rust code) in-process, when installed.

Runs are interleaved (the order rotates each round) and each case reports its **median** over
``--repeat`` rounds, its ratio to age's median (``ratio_vs_age``, > 1 = faster than age) and to
rage's, and its peak RSS (whole process; for in-process cases also the growth during the
operation — it must not grow with the file). Then ``pq_wrap`` / ``pq_unwrap`` give the median
microseconds to wrap / unwrap one file key for an ``age1pq1…`` recipient, and their ratio to
X25519's. One JSON line per case.

    python bench/crypto.py [--mib 512] [--repeat 5] [--verbose]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
AGE = shutil.which("age") or "/usr/bin/age"


def _have_pyrage() -> bool:
    try:
        import pyrage  # noqa: F401
    except ImportError:
        return False
    return True


def cases() -> tuple[str, ...]:
    out = [
        "ours_encrypt",
        "ours_decrypt",
        "ours_encrypt_2threads",
        "ours_decrypt_2threads",
        "ours_cli_encrypt",
        "ours_cli_decrypt",
        "age_encrypt",
        "age_decrypt",
    ]
    if _have_pyrage():
        out += ["rage_encrypt", "rage_decrypt"]
    return tuple(out)


def _rss_mib() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def _peak_mib(who: int = resource.RUSAGE_SELF) -> float:
    return resource.getrusage(who).ru_maxrss / 1024


def _child(cmd: list[str]) -> float:
    """Seconds the command ``cmd`` takes (the process's peak RSS is read by the caller)."""
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    return time.perf_counter() - t0


def run_case(case: str, folder: str) -> dict:
    plain = os.path.join(folder, "plain.bin")
    encrypted = os.path.join(folder, "ref.age")  # one file for every decrypt case
    key_file = os.path.join(folder, "key.txt")
    out = os.path.join(folder, f"{case}.out")
    size = os.path.getsize(plain)
    with open(key_file) as f:
        secret = f.read().strip()
    recipient = open(os.path.join(folder, "recipient.txt")).read().strip()
    decrypt = "decrypt" in case
    growth = None
    if case.startswith("ours_cli"):
        py = [sys.executable, "-m", "kprivacy_nb"]
        args = ["decrypt", "-i", key_file] if decrypt else ["encrypt", "-r", recipient]
        dt = _child([*py, *args, "-o", out, encrypted if decrypt else plain])
        peak = _peak_mib(resource.RUSAGE_CHILDREN)
    elif case.startswith("age"):
        args = ["-d", "-i", key_file] if decrypt else ["-r", recipient]
        dt = _child([AGE, *args, "-o", out, encrypted if decrypt else plain])
        peak = _peak_mib(resource.RUSAGE_CHILDREN)
    elif case.startswith("ours"):
        sys.path.insert(0, ROOT)
        from kprivacy_nb.crypto import age

        ident = age.X25519Identity.parse(secret)
        threads = True if case.endswith("2threads") else None  # None: auto, what users get
        base, t0 = _rss_mib(), time.perf_counter()
        with open(encrypted if decrypt else plain, "rb") as src, open(out, "wb") as dst:
            if decrypt:
                age.decrypt_stream(src, dst, [ident], threads=threads)
            else:
                age.encrypt_stream(src, dst, [ident.recipient()], threads=threads)
        dt = time.perf_counter() - t0
        peak = _peak_mib()
        growth = max(0.0, peak - base)
    else:
        import pyrage

        ident = pyrage.x25519.Identity.from_str(secret)
        base, t0 = _rss_mib(), time.perf_counter()
        with open(encrypted if decrypt else plain, "rb") as src, open(out, "wb") as dst:
            if decrypt:
                pyrage.decrypt_io(src, dst, [ident])
            else:
                pyrage.encrypt_io(src, dst, [ident.to_public()])
        dt = time.perf_counter() - t0
        peak = _peak_mib()
        growth = max(0.0, peak - base)
    if decrypt:
        assert os.path.getsize(out) == size, "decrypted size differs"
    os.unlink(out)
    res = {"case": case, "bytes": size, "seconds": round(dt, 3), "peak_rss_mib": round(peak, 1)}
    if growth is not None:
        res["peak_rss_growth_mib"] = round(growth, 1)
    return res


def pq_cost(rounds: int = 200) -> list[dict]:
    """Median µs to wrap/unwrap a file key: post-quantum hybrid vs X25519 (one recipient)."""
    sys.path.insert(0, ROOT)
    from kprivacy_nb.crypto import age

    file_key = os.urandom(age.FILE_KEY_LEN)
    kinds = {"x25519": age.X25519Identity.generate(), "pq": age.HybridIdentity.generate()}
    times: dict[str, list[float]] = {f"{k}_{op}": [] for k in kinds for op in ("wrap", "unwrap")}
    for _ in range(rounds):  # interleaved, like the throughput cases
        for kind, ident in kinds.items():
            recipient = ident.recipient()
            t0 = time.perf_counter()
            stanzas = recipient.wrap(file_key)
            t1 = time.perf_counter()
            assert ident.unwrap(stanzas[0]) == file_key
            t2 = time.perf_counter()
            times[f"{kind}_wrap"].append(t1 - t0)
            times[f"{kind}_unwrap"].append(t2 - t1)
    med = {k: statistics.median(v) * 1e6 for k, v in times.items()}
    header = {
        k: len(age.encode_header(ident.recipient().wrap(file_key), file_key))
        for k, ident in kinds.items()
    }
    return [
        {
            "case": f"pq_{op}",
            "microseconds": round(med[f"pq_{op}"], 1),
            "x25519_microseconds": round(med[f"x25519_{op}"], 1),
            "ratio_vs_x25519": round(med[f"pq_{op}"] / med[f"x25519_{op}"], 2),
            "header_bytes": header["pq"],
            "x25519_header_bytes": header["x25519"],
            "rounds": rounds,
        }
        for op in ("wrap", "unwrap")
    ]


def prepare(folder: str, mib: int) -> None:
    sys.path.insert(0, ROOT)
    from kprivacy_nb.crypto import age

    block = os.urandom(1 << 20)
    with open(os.path.join(folder, "plain.bin"), "wb") as f:
        for _ in range(mib):
            f.write(block)
    ident = age.X25519Identity.generate()
    with open(os.path.join(folder, "key.txt"), "w") as f:
        f.write(ident.reveal() + "\n")
    os.chmod(os.path.join(folder, "key.txt"), 0o600)
    with open(os.path.join(folder, "recipient.txt"), "w") as f:
        f.write(f"{ident.recipient()}\n")
    # age's own output is what every decrypt case reads (ours, rage and age alike).
    subprocess.run(
        [AGE, "-r", str(ident.recipient()), "-o", os.path.join(folder, "ref.age")]
        + [os.path.join(folder, "plain.bin")],
        check=True,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=512)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--pq-rounds", type=int, default=200)
    ap.add_argument("--verbose", action="store_true", help="every run on stderr")
    ap.add_argument("--case", help=argparse.SUPPRESS)
    ap.add_argument("--folder", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case, args.folder)))
        return
    if not os.path.exists(AGE):
        sys.exit("bench/crypto.py: the age CLI is not installed (apt-get install age)")
    all_cases = cases()
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as folder:
        prepare(folder, args.mib)
        runs: dict[str, list[dict]] = {c: [] for c in all_cases}
        for rep in range(args.repeat):
            # Rotate the order each round so no case always runs first (cold caches).
            shift = rep % len(all_cases)
            for case in all_cases[shift:] + all_cases[:shift]:
                os.sync()  # start each case without dirty pages from the previous one
                proc = subprocess.run(
                    [sys.executable, __file__, "--case", case, "--folder", folder],
                    check=True,
                    capture_output=True,
                    text=True,
                )
                res = json.loads(proc.stdout.strip().splitlines()[-1])
                if args.verbose:
                    print(json.dumps(res), file=sys.stderr)
                runs[case].append(res)
        median = {c: statistics.median(r["seconds"] for r in runs[c]) for c in all_cases}
        for case in all_cases:
            kind = "decrypt" if "decrypt" in case else "encrypt"
            size = runs[case][0]["bytes"]
            res = {
                "case": case,
                "bytes": size,
                "median_seconds": round(median[case], 3),
                "gb_per_s": round(size / median[case] / 1e9, 3),
                "runs": len(runs[case]),
                "ratio_vs_age": round(median[f"age_{kind}"] / median[case], 2),
                "peak_rss_mib": max(r["peak_rss_mib"] for r in runs[case]),
            }
            if f"rage_{kind}" in median:
                res["ratio_vs_rage"] = round(median[f"rage_{kind}"] / median[case], 2)
            if "peak_rss_growth_mib" in runs[case][0]:
                res["peak_rss_growth_mib"] = max(r["peak_rss_growth_mib"] for r in runs[case])
            print(json.dumps(res), flush=True)
    for res in pq_cost(args.pq_rounds):
        print(json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
