"""Quiet mode outside the notebook: ``kprivacy_nb.quiet()`` in scripts, the CLI and ``make demo``.

Each runs in a child process with a user's environment (no TF_CPP_MIN_LOG_LEVEL, no pytest
variables) and looks at what reached its real stdout/stderr.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TF_MARKERS = ("oneDNN", "cuda", "absl::InitializeLog", "cuInit", "_compute_log_a_frac")
FAKE_NOISE = "I0000 00:00:1795619555.1 77 port.cc:1] fd-level noise line"
FAKE_ERROR = "E0000 00:00:1795619555.2 77 op_kernel.cc:1] fd-level real failure"
LISTING = "held back by kprivacy_nb.quiet()"


def user_env() -> dict[str, str]:
    drop = ("TF_CPP_MIN_LOG_LEVEL", "PYTEST_CURRENT_TEST", "PYTEST_VERSION")
    return {k: v for k, v in os.environ.items() if k not in drop}


def run_demo(module: str, tmp_path: Path) -> subprocess.CompletedProcess:
    """``python -m module --small`` as a user runs it, writing to tmp_path/demo-output."""
    env = user_env()
    env["KPRIVACY_NB_HOME"] = str(tmp_path / "home")
    return subprocess.run(
        [sys.executable, "-m", module, "--small", "--out", str(tmp_path / "demo-output")],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=1800,
    )  # fmt: skip


def run_script(code: str, tmp_path: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(code))
    return subprocess.run(
        [sys.executable, str(script)],
        capture_output=True, text=True, env=user_env(), cwd=tmp_path, timeout=timeout,
    )  # fmt: skip


@pytest.mark.slow
def test_script_under_quiet_holds_back_tensorflow_but_not_a_raised_error(tmp_path):
    proc = run_script(
        f"""
        import os, sys
        import kprivacy_nb
        kprivacy_nb.quiet()
        import tensorflow as tf
        print("user line", float(tf.constant(2.0) * 2))
        # dp-accounting's RDP accountant gives up on some orders at q = 0.125 (absl warnings)
        print("epsilon", kprivacy_nb.compute_epsilon(800, 100, 3, 0.6, 1e-3, accountant="rdp"))
        os.write(2, b"{FAKE_ERROR}\\n")
        os.system("echo from a child process")  # children write to the filtered descriptors
        kprivacy_nb.quiet(show=True)
        raise ValueError("a real error")
        """,
        tmp_path,
    )
    assert proc.returncode == 1
    assert "user line 4.0" in proc.stdout and "epsilon " in proc.stdout
    assert "from a child process" in proc.stdout
    before, listing = proc.stderr.split(LISTING, 1)
    for marker in TF_MARKERS:
        assert marker not in proc.stdout + before, f"{marker!r} reached the terminal"
    assert FAKE_ERROR in before
    # Nothing lost: TensorFlow did print its lines and dp-accounting its warnings, held back.
    assert "oneDNN" in listing or "cuda" in listing
    assert "WARNING:absl:_compute_log_a_frac failed to converge" in listing
    # The raised error came after the listing, whole.
    assert "Traceback (most recent call last)" in listing
    assert listing.rstrip().endswith("ValueError: a real error")


def test_quiet_block_filters_only_inside_it(tmp_path):
    proc = run_script(
        f"""
        import os, sys
        import kprivacy_nb
        with kprivacy_nb.quiet() as q:
            os.write(2, b"{FAKE_NOISE} (inside)\\n")
            print("kept inside")
            sys.stderr.write("prompt> ")
            sys.stderr.flush()
        os.write(2, b"{FAKE_NOISE} (after)\\n")
        print(q)
        """,
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert "(inside)" not in proc.stderr and "prompt> " in proc.stderr
    assert "(after)" in proc.stderr  # quiet mode ended with the block
    assert "kept inside" in proc.stdout
    assert "kprivacy_nb.quiet: off; 1 line(s) held back" in proc.stdout


def test_cli_accounting_keeps_dp_accounting_warnings_off_the_terminal():
    argv = ["epsilon", "--n", "800", "--batch-size", "100", "--epochs", "3",
            "--noise-multiplier", "0.6", "--accountant", "rdp", "--json"]  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-m", "kprivacy_nb", *argv],
        capture_output=True, text=True, env=user_env(), timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "_compute_log_a_frac" not in proc.stdout + proc.stderr
    assert proc.stderr == ""
    assert json.loads(proc.stdout.strip().splitlines()[-1])["epsilon"] > 0


@pytest.mark.kernel
@pytest.mark.slow
def test_demo_terminal_output_is_only_the_demo(tmp_path):
    """What `make demo` prints: progress and summary, no TensorFlow; the kernel's own output
    is in demo-output/kernel.log, named in the summary."""
    out = tmp_path / "demo-output"
    proc = run_demo("kprivacy_nb.demo", tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    terminal = proc.stdout + proc.stderr
    for marker in (*TF_MARKERS, "IPKernelApp", "without encryption", "WARNING"):
        assert marker not in terminal, f"{marker!r} reached the terminal:\n{terminal}"
    assert proc.stderr == ""
    assert len(terminal.splitlines()) <= 24, terminal  # one screen
    assert "[1/" in proc.stdout and "Done in" in proc.stdout
    log = out / "kernel.log"
    assert f"kernel log:        {log}" in proc.stdout
    assert any(m in log.read_text() for m in ("oneDNN", "cuda", "absl::InitializeLog"))


def test_demo_kernel_output_goes_to_its_log_and_only_real_errors_to_the_terminal(tmp_path, capsys):
    from kprivacy_nb import demo
    from kprivacy_nb.quiet import HeldBack

    held = HeldBack()
    crash = "Fatal Python error: Segmentation fault"
    with open(tmp_path / "kernel.log", "wb") as log:
        pipe, close = demo.kernel_output(log, held)
        os.write(pipe, f"{FAKE_NOISE}\n{FAKE_ERROR}\n{crash}\n".encode())
        close()
    assert capsys.readouterr().err == f"  kernel: {FAKE_ERROR}\n  kernel: {crash}\n"
    logged = (tmp_path / "kernel.log").read_text()
    assert all(line in logged for line in (FAKE_NOISE, FAKE_ERROR, crash))
    assert held.count() == 1


def test_help_on_the_callable_package_explains_the_function():
    """``help(kprivacy_nb.quiet)`` shows the package docstring: it must say how to call it."""
    import kprivacy_nb

    doc = kprivacy_nb.quiet.__doc__
    assert "with kprivacy_nb.quiet():" in doc and "quiet(show=True)" in doc
    assert "quiet(False)" in doc


def test_a_failed_demo_says_where_in_one_plain_line():
    """`make demo` failing: the cell and section it failed in and the error's last line, without
    the colour codes nbclient's traceback carries (the terminal may be a pipe or a CI log)."""
    from kprivacy_nb import demo

    error = RuntimeError(
        "An error occurred while executing the following cell:\n------------------\nx @ y\n"
        "\x1b[31mValueError\x1b[39m: matmul: Input operand 1 has a mismatch"
    )
    line = demo.failure_line(error, 6, "Train with differential privacy")
    assert line == (
        "demo failed in cell 7 (Train with differential privacy): ValueError: matmul: Input "
        "operand 1 has a mismatch"
    )
    assert demo.failure_line(RuntimeError(""), -1, "") == "demo failed: RuntimeError"
