"""``make demo``: run the quickstart notebook end to end and keep what it produced.

Executes ``example_notebooks/01_quickstart.ipynb`` in a real Jupyter kernel with ``demo-output/``
as its working folder, keeps the executed notebook there next to the ε plot, the encrypted model
and ``summary.json`` (all written by the notebook), then prints their paths and the final ε and
accuracies. The notebook's keys live in ``demo-output/kprivacy-home/`` (never the user's own).

The terminal shows only the demo's own progress (one line per section of the notebook) and
summary. What the kernel process itself prints (TensorFlow's C++ log lines reach it, not the
cells) goes to ``demo-output/kernel.log``; only lines quiet mode would not hold back (real errors)
are also shown, prefixed ``kernel:``. The kernel listens on local IPC sockets, not TCP.

    python -m kprivacy_nb.demo [--out DIR] [--small]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .quiet.fdfilter import filtered_pipe
from .quiet.filter import HeldBack, LineFilter, strip_ansi

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "example_notebooks" / "01_quickstart.ipynb"
EXECUTED_NAME = "01_quickstart.executed.ipynb"
KERNEL_LOG_NAME = "kernel.log"


def kernel_env(small: bool) -> dict[str, str]:
    """The kernel's environment: full size unless ``small`` (KPRIVACY_NB_CI=1); the kernel picks
    its own inline matplotlib backend, so an inherited MPLBACKEND (e.g. Agg) is dropped."""
    env = {k: v for k, v in os.environ.items() if k not in ("KPRIVACY_NB_CI", "MPLBACKEND")}
    if small:
        env["KPRIVACY_NB_CI"] = "1"
    return env


def section_titles(nb: Any) -> dict[int, str]:
    """Code cell index → the ``##`` heading it is the first code cell under."""
    titles: dict[int, str] = {}
    heading = None
    for index, cell in enumerate(nb.cells):
        if cell.cell_type == "markdown":
            m = re.search(r"^##\s+(.+)$", cell.source, re.MULTILINE)
            if m:
                heading = re.sub(r"[`*]", "", m.group(1)).strip()
        elif cell.cell_type == "code" and heading:
            titles[index], heading = heading, None
    return titles


def progress_hook(nb: Any) -> Callable[..., None]:
    """nbclient's ``on_cell_start``: one ``[i/n] heading`` line per section of the notebook."""
    titles = section_titles(nb)
    order = {index: n for n, index in enumerate(sorted(titles), start=1)}

    def on_cell_start(cell: Any = None, cell_index: int = -1, **_: Any) -> None:
        on_cell_start.cell = cell_index  # type: ignore[attr-defined]
        if cell_index in titles:
            on_cell_start.section = titles[cell_index]  # type: ignore[attr-defined]
            print(f"  [{order[cell_index]}/{len(titles)}] {titles[cell_index]}", flush=True)

    on_cell_start.cell = -1  # type: ignore[attr-defined]  # the cell running now (for errors)
    on_cell_start.section = ""  # type: ignore[attr-defined]
    return on_cell_start


def failure_line(exc: Exception, cell: int, section: str) -> str:
    """The one line a failed demo prints: where (cell number, section) and the error's last
    line, without terminal colour codes (it may go to a log or a pipe)."""
    text = strip_ansi(str(exc)).strip()
    first = text.splitlines()[-1] if text else type(exc).__name__
    where = f" in cell {cell + 1}" + (f" ({section})" if section else "") if cell >= 0 else ""
    return f"demo failed{where}: {first}"


def kernel_output(log: Any, held: HeldBack) -> tuple[int, Callable[[], None]]:
    """A pipe for the kernel's stdout/stderr: everything to ``log``; lines quiet mode keeps (real
    errors) also to our stderr, prefixed ``kernel:``."""
    at_line_start = True

    def to_terminal(text: str) -> None:
        nonlocal at_line_start
        for piece in text.splitlines(keepends=True):
            sys.stderr.write(("  kernel: " if at_line_start else "") + piece)
            at_line_start = piece.endswith("\n")
        sys.stderr.flush()

    held.start_cell("kernel")
    return filtered_pipe(LineFilter("kernel", to_terminal, held, lambda: True), log=log)


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


def demo_arguments(prog: str, description: str, small_help: str) -> argparse.ArgumentParser:
    """The parser every demo shares: ``--out`` (default demo-output/ or $KPRIVACY_NB_DEMO_OUT)
    and ``--small``."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument(
        "--out",
        default=os.environ.get("KPRIVACY_NB_DEMO_OUT", str(ROOT / "demo-output")),
        help="output folder (default: demo-output/ in the repository)",
    )
    parser.add_argument("--small", action="store_true", help=small_help)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = demo_arguments(
        "python -m kprivacy_nb.demo",
        "Run the quickstart notebook in a Jupyter kernel and keep its outputs.",
        "CI size (KPRIVACY_NB_CI=1): fewer epochs, faster",
    ).parse_args(argv)
    try:
        import nbformat
        from nbclient import NotebookClient
        from nbclient.exceptions import CellExecutionError
        from traitlets.config import Config
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
    kernel_log = out_dir / KERNEL_LOG_NAME
    size = "CI size" if args.small else "full size"
    print(f"Running {NOTEBOOK.relative_to(ROOT)} ({size}) in a Jupyter kernel, in {out_dir} …")
    start = time.perf_counter()
    held = HeldBack(max_cells=1)
    with (
        tempfile.TemporaryDirectory(prefix="kp-demo-") as sockets,
        open(kernel_log, "wb") as log,
    ):
        hook = progress_hook(nb)
        config = Config({"KernelManager": {"transport": "ipc", "ip": str(Path(sockets) / "k")}})
        client = NotebookClient(
            nb,
            timeout=1800,
            kernel_name="python3",
            resources={"metadata": {"path": str(out_dir)}},
            on_cell_start=hook,
            config=config,
        )
        pipe, close_pipe = kernel_output(log, held)
        try:
            client.execute(env=kernel_env(args.small), stdout=pipe, stderr=pipe)
        except CellExecutionError as exc:
            close_pipe()
            nbformat.write(nb, executed)
            print(
                f"{failure_line(exc, hook.cell, hook.section)}\n  partial notebook: {executed}\n"
                f"  kernel log: {kernel_log}",
                file=sys.stderr,
            )
            return 1
        close_pipe()
    nbformat.write(nb, executed)
    print(f"Done in {time.perf_counter() - start:.0f} s.")
    for line in report(out_dir, executed):
        print(line)
    print(f"  kernel log:        {kernel_log} ({held.count()} line(s) of library noise)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
