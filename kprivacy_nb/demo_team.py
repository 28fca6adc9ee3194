"""``make demo-team``: two Jupyter kernels charge one privacy budget on a PostgreSQL ledger.

Starts a throwaway PostgreSQL cluster (:class:`~kprivacy_nb.dp.pg_local.LocalPostgres`, Unix
socket only), creates the budget ``patients`` with an ε cap that one run fits and two identical
runs do not (the cap is half-way between the ε of one run and of two composed, both computed by
the accountant), then starts two real kernels, A and B, each with ``KPRIVACY_NB_LEDGER_URL``
pointing at the cluster and its own temporary ``KPRIVACY_NB_HOME``. Both load the extension and
the bundled NSL-KDD data, wait for each other, then run the same
``%dp_fit … --ledger patients`` at the same moment. The ledger decides who trains: the demo prints
each kernel's outcome (charged, or refused with the ledger's message) and the budget as
``kprivacy-nb ledger show patients`` prints it, and writes ``team-summary.json``.

As in ``make demo``, the terminal shows only the demo's progress and summary; each kernel's own
output (TensorFlow's log lines) goes to ``demo-output/kernel-A.log`` / ``kernel-B.log``, and the
executed notebooks are kept next to them. The cluster is stopped and deleted at the end, whatever
happens.

    python -m kprivacy_nb.demo_team [--out DIR] [--small]
"""

from __future__ import annotations

import asyncio
import json
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .demo import demo_arguments, failure_line, kernel_env, kernel_output
from .errors import KPrivacyError
from .quiet.filter import HeldBack, strip_ansi

BUDGET = "patients"
DELTA = 1e-5
BATCH_SIZE = 256
NOISE_MULTIPLIER = 1.0
SMALL_ROWS = 6000  # --small: the first rows of the training split (about 23 steps)
KERNELS = ("A", "B")
SUMMARY_NAME = "team-summary.json"

SETUP = """\
import json
%load_ext kprivacy_nb"""

DATA = """\
import keras
from kprivacy_nb.datasets import load_nsl_kdd

data = load_nsl_kdd()
x, y = data.x_train[:{rows}], data.y_train[:{rows}]
keras.utils.set_random_seed(0)
model = keras.Sequential(
    [keras.Input(shape=(x.shape[1],)), keras.layers.Dense(64, activation="relu"), keras.layers.Dense(2)]
)
model.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))"""

FIT = (
    f"%dp_fit model x y --epochs 1 --batch-size {BATCH_SIZE} "
    f"--noise-multiplier {NOISE_MULTIPLIER} --delta {DELTA} --ledger {BUDGET} --quiet -o run"
)

RESULT = """\
print(json.dumps({"epsilon": run.epsilon, "steps": run.steps} if "run" in globals() else None))"""

# Code cell index → the progress line printed when a kernel starts it.
STEPS = {0: "extension loaded", 1: "data and model ready", 2: f"%dp_fit … --ledger {BUDGET}"}
FIT_CELL = 2


@dataclass
class Outcome:
    """What one kernel's ``%dp_fit`` did: ``charged`` (ε, steps) or ``refused`` (the message)."""

    kernel: str
    outcome: str
    message: str = ""
    epsilon: float | None = None
    steps: int | None = None
    kernel_log: str = ""
    notebook: str = ""


def team_notebook(rows: int | None) -> Any:
    """The cells each kernel runs; the ``%dp_fit`` cell may raise (a refusal is an outcome)."""
    import nbformat.v4 as v4

    cells = [
        v4.new_code_cell(SETUP),
        v4.new_code_cell(DATA.format(rows="" if rows is None else rows)),
        v4.new_code_cell(FIT, metadata={"tags": ["raises-exception"]}),
        v4.new_code_cell(RESULT),
    ]
    return v4.new_notebook(cells=cells)


def plan_cap(n: int) -> tuple[float, float, float]:
    """(ε of one run, ε of two identical runs composed, the cap half-way between them)."""
    from . import compute_epsilon

    one, two = (
        compute_epsilon(n, BATCH_SIZE, epochs, NOISE_MULTIPLIER, DELTA) for epochs in (1, 2)
    )
    return one, two, (one + two) / 2


class StartLine:
    """Holds each kernel before ``%dp_fit`` until all have arrived (or one has failed), so the
    two runs reach the ledger together."""

    def __init__(self, parties: int) -> None:
        self.parties = parties
        self.arrived = 0
        self.go = asyncio.Event()

    async def wait(self) -> None:
        self.arrived += 1
        if self.arrived >= self.parties:
            self.go.set()
        await self.go.wait()

    def release(self) -> None:
        self.go.set()


def progress(label: str, start_line: StartLine) -> Callable[..., Any]:
    """nbclient's ``on_cell_start`` for kernel ``label``: a progress line per step; waits at the
    start line before the ``%dp_fit`` cell."""

    async def on_cell_start(cell_index: int = -1, **_: Any) -> None:
        on_cell_start.cell = cell_index  # type: ignore[attr-defined]
        if cell_index == FIT_CELL:
            await start_line.wait()
        if cell_index in STEPS:
            print(f"  kernel {label}: {STEPS[cell_index]}", flush=True)

    on_cell_start.cell = -1  # type: ignore[attr-defined]
    return on_cell_start


def read_outcome(label: str, nb: Any) -> Outcome:
    """Charged, refused or failed, from the executed cells: a magic's ``UsageError`` (how
    ``%dp_fit`` shows a refusal) is a stderr line, any other exception an error output; a run
    that trained printed its ε in the result cell."""
    for output in nb.cells[FIT_CELL].get("outputs", []):
        if output.get("output_type") == "error":
            message = strip_ansi(output.get("evalue", "")).strip()
            return Outcome(label, "failed", f"{output.get('ename')}: {message}")
        text = strip_ansi(output.get("text", "")) if output.get("name") == "stderr" else ""
        if text.startswith("UsageError: "):
            return Outcome(label, "refused", text.removeprefix("UsageError: ").strip())
    texts = [
        o.get("text", "") for o in nb.cells[-1].get("outputs", []) if o.get("name") == "stdout"
    ]
    result = json.loads("".join(texts).strip().splitlines()[-1]) if texts else None
    if not result:
        return Outcome(label, "failed", "%dp_fit neither trained nor said why")
    return Outcome(label, "charged", epsilon=result["epsilon"], steps=result["steps"])


async def run_kernel(
    label: str, url: str, rows: int | None, out_dir: Path, sockets: str, start_line: StartLine
) -> Outcome:
    """Run the team notebook in kernel ``label`` (its output to ``kernel-LABEL.log``)."""
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError
    from traitlets.config import Config

    nb = team_notebook(rows)
    log_path = out_dir / f"kernel-{label}.log"
    executed = out_dir / f"team-{label}.executed.ipynb"
    hook = progress(label, start_line)
    config = Config({"KernelManager": {"transport": "ipc", "ip": str(Path(sockets) / label)}})
    client = NotebookClient(
        nb, timeout=900, kernel_name="python3", config=config, on_cell_start=hook,
        resources={"metadata": {"path": str(out_dir)}},
    )  # fmt: skip
    held = HeldBack(max_cells=1)
    with (
        tempfile.TemporaryDirectory(prefix=f"kp-home-{label}-") as home,
        open(log_path, "wb") as log,
    ):
        env = kernel_env(small=False)
        env.update(KPRIVACY_NB_LEDGER_URL=url, KPRIVACY_NB_HOME=home)
        pipe, close_pipe = kernel_output(log, held)
        try:
            await client.async_execute(env=env, stdout=pipe, stderr=pipe)
        except CellExecutionError as exc:
            outcome = Outcome(label, "failed", failure_line(exc, hook.cell, ""))
        else:
            outcome = read_outcome(label, nb)
        finally:
            start_line.release()  # a kernel that failed early must not hold the other one
            close_pipe()
    nbformat.write(nb, executed)
    outcome.kernel_log, outcome.notebook = str(log_path), str(executed)
    return outcome


async def run_kernels(url: str, rows: int | None, out_dir: Path) -> list[Outcome]:
    """Both kernels at once; each ``%dp_fit`` starts when both are ready."""
    start_line = StartLine(len(KERNELS))
    with tempfile.TemporaryDirectory(prefix="kp-demo-") as sockets:
        runs = (run_kernel(k, url, rows, out_dir, sockets, start_line) for k in KERNELS)
        return list(await asyncio.gather(*runs))


def outcome_line(o: Outcome) -> str:
    if o.outcome == "charged":
        return f"  kernel {o.kernel}: charged ε = {o.epsilon:.4f} ({o.steps} steps)"
    head = f"  kernel {o.kernel}: {o.outcome}: "
    return textwrap.fill(o.message, 100, initial_indent=head, subsequent_indent=" " * len(head))


def verdict(outcomes: list[Outcome], spent: float, cap: float) -> str | None:
    """None when the ledger did its job (one run charged, one refused, cap held); else why not."""
    kinds = sorted(o.outcome for o in outcomes)
    if spent > cap:
        return f"the cap did not hold: spent ε = {spent:.4f} > cap {cap:.4f}"
    if kinds != ["charged", "refused"]:
        return f"expected one run charged and one refused, got {', '.join(kinds)}"
    return None


def run_demo(out_dir: Path, small: bool) -> int:
    """Cluster up, budget created, both kernels run, outcome and ledger shown, cluster gone."""
    from .datasets import load_nsl_kdd
    from .dp.cli import budget_text
    from .dp.ledger import Ledger
    from .dp.pg_local import LocalPostgres

    start = time.perf_counter()
    pg = LocalPostgres()  # says what to install when PostgreSQL is missing
    n = len(load_nsl_kdd().y_train)
    rows = min(SMALL_ROWS, n) if small else None
    one, two, cap = plan_cap(rows or n)
    print("Starting a throwaway PostgreSQL cluster (Unix socket only) …", flush=True)
    with pg:
        url, cluster = pg.url(), pg.socket_dir
        with Ledger(url) as ledger:
            ledger.create(BUDGET, cap, DELTA)
        print(
            f"  budget {BUDGET!r}: cap ε = {cap:.4f} at δ = {DELTA:g}; one run spends ε = "
            f"{one:.4f}, two compose to ε = {two:.4f}\n"
            f"Two kernels start the same %dp_fit ({rows or n} rows, 1 epoch, σ = "
            f"{NOISE_MULTIPLIER:g}) together, both charging {BUDGET!r} …",
            flush=True,
        )
        outcomes = asyncio.run(run_kernels(url, rows, out_dir))
        with Ledger(url) as ledger:
            budget = ledger.budget(BUDGET)
            state = budget_text(budget, ledger.cumulative_epsilon(BUDGET))
    summary = {
        "budget": budget.to_dict(),
        "planned": {"one_run_epsilon": one, "two_runs_epsilon": two, "rows": rows or n},
        "kernels": [asdict(o) for o in outcomes],
        "cluster_folder": cluster,
    }
    summary_file = out_dir / SUMMARY_NAME
    summary_file.write_text(json.dumps(summary, indent=1))
    print(f"Done in {time.perf_counter() - start:.0f} s (cluster stopped and deleted).")
    for o in outcomes:
        print(outcome_line(o))
    print(f"  ledger (kprivacy-nb ledger show {BUDGET}):")
    print("\n".join("    " + line for line in state.splitlines()))
    print(f"  summary: {summary_file}")
    print(f"  kernel logs and executed notebooks: {out_dir}/kernel-{{A,B}}.log, team-*.ipynb")
    problem = verdict(outcomes, budget.spent_epsilon, budget.epsilon_cap)
    if problem:
        sys.stdout.flush()
        print(f"demo failed: {problem}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    args = demo_arguments(
        "python -m kprivacy_nb.demo_team",
        "Two Jupyter kernels share one privacy budget on a throwaway PostgreSQL.",
        f"train on the first {SMALL_ROWS} rows: faster",
    ).parse_args(argv)
    try:
        import nbclient  # noqa: F401
        import psycopg  # noqa: F401
    except ImportError as exc:
        print(
            f"the team demo needs nbclient, ipykernel and psycopg ({exc.name} is missing): "
            "pip install -e '.[dev]'",
            file=sys.stderr,
        )
        return 2
    out_dir = Path(args.out).expanduser().resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        return run_demo(out_dir, args.small)
    except KPrivacyError as exc:  # PostgreSQL missing, the cluster would not start, …
        print(f"demo failed: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
