"""``make demo-team``: two real kernels charge one budget on a throwaway PostgreSQL ledger.

Run as a user runs it (a child process, no TF_CPP_MIN_LOG_LEVEL): exactly one kernel's run is
charged, the other is refused with the ledger's message, the cap holds, and nothing from
TensorFlow reaches the terminal.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from test_quiet_terminal import TF_MARKERS, run_demo, user_env

from kprivacy_nb.dp.pg_local import find_bindir

from ci_support import in_ci

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.kernel
@pytest.mark.slow
def test_two_kernels_share_one_budget_and_the_cap_holds(tmp_path):
    if find_bindir() is None:
        message = "PostgreSQL is not installed (apt-get install postgresql)"
        if in_ci():
            pytest.fail(f"CI: {message}; .ci/run must install it", pytrace=False)
        pytest.skip(f"*** SKIPPED: {message} ***")
    out = tmp_path / "demo-output"
    proc = run_demo("kprivacy_nb.demo_team", tmp_path)
    terminal = proc.stdout + proc.stderr
    assert proc.returncode == 0, terminal
    assert proc.stderr == ""
    for marker in (*TF_MARKERS, "IPKernelApp", "WARNING", "Traceback"):
        assert marker not in terminal, f"{marker!r} reached the terminal:\n{terminal}"

    summary = json.loads((out / "team-summary.json").read_text())
    kernels = {k["kernel"]: k for k in summary["kernels"]}
    assert sorted(kernels) == ["A", "B"]
    assert sorted(k["outcome"] for k in kernels.values()) == ["charged", "refused"]
    charged = next(k for k in kernels.values() if k["outcome"] == "charged")
    refused = next(k for k in kernels.values() if k["outcome"] == "refused")
    budget, planned = summary["budget"], summary["planned"]
    # The numbers force the race: one run fits the cap, two identical runs would not.
    assert planned["one_run_epsilon"] <= budget["epsilon_cap"] < planned["two_runs_epsilon"]
    assert budget["runs"] == 1 and budget["reserved"] == 0
    assert budget["spent_epsilon"] == pytest.approx(charged["epsilon"], rel=1e-6)
    assert budget["spent_epsilon"] <= budget["epsilon_cap"]
    assert "refused before starting" in refused["message"]
    for k in kernels.values():
        assert f"kernel {k['kernel']}: {k['outcome']}" in proc.stdout
        log = Path(k["kernel_log"]).read_text()
        assert any(m in log for m in ("oneDNN", "cuda", "absl::InitializeLog")), log[:500]
    assert "ledger (kprivacy-nb ledger show patients):" in proc.stdout
    assert not Path(summary["cluster_folder"]).exists()  # the cluster was stopped and deleted


def test_missing_postgresql_is_one_line_saying_what_to_install(tmp_path):
    env = {**user_env(), "KPRIVACY_NB_PG_BINDIR": str(tmp_path / "no-postgres")}
    proc = subprocess.run(
        [sys.executable, "-m", "kprivacy_nb.demo_team", "--out", str(tmp_path / "out")],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert len(proc.stderr.splitlines()) == 1, proc.stderr
    assert "apt-get install postgresql" in proc.stderr
