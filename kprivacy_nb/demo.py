"""``make demo``: run the quickstart notebook end to end and keep what it produced.

Executes ``example_notebooks/01_quickstart.ipynb`` in a real Jupyter kernel with ``demo-output/``
as its working folder, keeps the executed notebook there next to the ε plot, the encrypted model
and ``summary.json`` (all written by the notebook), then prints their paths and the final ε and
accuracies. The notebook's keys live in ``demo-output/kprivacy-home/`` (never the user's own).

    python -m kprivacy_nb.demo [--out DIR] [--small]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "example_notebooks" / "01_quickstart.ipynb"
EXECUTED_NAME = "01_quickstart.executed.ipynb"


def kernel_env(small: bool) -> dict[str, str]:
    """The kernel's environment: full size unless ``small`` (KPRIVACY_NB_CI=1); the kernel picks
    its own inline matplotlib backend, so an inherited MPLBACKEND (e.g. Agg) is dropped."""
    env = {k: v for k, v in os.environ.items() if k not in ("KPRIVACY_NB_CI", "MPLBACKEND")}
    if small:
        env["KPRIVACY_NB_CI"] = "1"
    return env


def report(out_dir: Path, executed: Path) -> list[str]:
    """The lines printed at the end: where things are and the numbers from summary.json."""
    summary_file = out_dir / "summary.json"
    if not summary_file.exists():
        return [f"  executed notebook: {executed}", f"  (no {summary_file.name} was written)"]
    summary = json.loads(summary_file.read_text())
    lines = [
        f"  executed notebook: {executed}",
        f"  ε plot:            {summary.get('epsilon_plot')}",
        f"  encrypted model:   {summary.get('encrypted_model')}",
        f"  summary:           {summary_file}",
        f"  ε = {summary['epsilon']:.4f} at δ = {summary['delta']:g}; test accuracy "
        f"{summary['dp_accuracy']:.4f} with DP, {summary['non_dp_accuracy']:.4f} without",
    ]
    key = out_dir / "kprivacy-home" / "keys" / "analyst.key"
    if key.exists() and summary.get("encrypted_model"):
        lines.append(
            f"  open it with the age CLI: age -d -i {key} {summary['encrypted_model']} > model.kpc"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m kprivacy_nb.demo",
        description="Run the quickstart notebook in a Jupyter kernel and keep its outputs.",
    )
    parser.add_argument(
        "--out",
        default=os.environ.get("KPRIVACY_NB_DEMO_OUT", str(ROOT / "demo-output")),
        help="output folder (default: demo-output/ in the repository)",
    )
    parser.add_argument(
        "--small", action="store_true", help="CI size (KPRIVACY_NB_CI=1): fewer epochs, faster"
    )
    args = parser.parse_args(argv)
    try:
        import nbformat
        from nbclient import NotebookClient
        from nbclient.exceptions import CellExecutionError
    except ImportError:
        print("the demo needs nbclient and ipykernel: pip install -e '.[dev]'", file=sys.stderr)
        return 2
    if not NOTEBOOK.exists():
        print(f"{NOTEBOOK} not found: run the demo from a source checkout", file=sys.stderr)
        return 2

    out_dir = Path(args.out).expanduser().resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    nb = nbformat.read(NOTEBOOK, as_version=4)
    executed = out_dir / EXECUTED_NAME
    size = "CI size" if args.small else "full size"
    print(f"Running {NOTEBOOK.relative_to(ROOT)} ({size}) in a Jupyter kernel, in {out_dir} …")
    start = time.perf_counter()
    client = NotebookClient(
        nb, timeout=1800, kernel_name="python3", resources={"metadata": {"path": str(out_dir)}}
    )
    try:
        client.execute(env=kernel_env(args.small))
    except CellExecutionError as exc:
        nbformat.write(nb, executed)
        first = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        print(f"demo failed: {first}\n  partial notebook: {executed}", file=sys.stderr)
        return 1
    nbformat.write(nb, executed)
    print(f"Done in {time.perf_counter() - start:.0f} s.")
    for line in report(out_dir, executed):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
