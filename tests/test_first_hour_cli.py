"""Issue #20 item 8 (and 7's help line): `kprivacy-nb ledger`, `%dp_ledger NAME`, target ε 0,
CLI hints and help texts, what an interrupted run's ledger record says, one recipient vocabulary."""

from __future__ import annotations

import argparse
import json

import dp_accounting
import pytest
from IPython.core.error import UsageError
from test_crypto_cli import run

from kprivacy_nb.dp.ledger import Ledger


def _event(steps: int):
    gaussian = dp_accounting.GaussianDpEvent(1.1)
    return dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(0.01, gaussian), steps
    )


def test_ledger_cli_mirrors_dp_ledger(kp_home):
    r = run("ledger", "create", "customers", "--epsilon", "8", "--delta", "1e-5", "--json")
    assert r.returncode == 0, r.stderr
    (budget,) = json.loads(r.stdout.splitlines()[-1])["budgets"]
    assert budget["name"] == "customers" and budget["epsilon_cap"] == 8
    with Ledger() as led:
        done = led.reserve("customers", _event(100))
        done.settle()
        pending = led.reserve("customers", _event(100))
    r = run("ledger", "customers")  # a name alone shows that budget
    out = r.stdout.decode()
    assert r.returncode == 0 and "budget 'customers'" in out and f"#{pending.id} reserved" in out
    r = run("ledger", "settle", "customers", "--json")
    assert r.returncode == 2 and f"pending in 'customers': {pending.id}" in r.stderr.decode()
    r = run("ledger", "cancel", "customers", "--run", str(pending.id), "--json")
    doc = json.loads(r.stdout.splitlines()[-1])
    assert doc["reserved"] == 0 and doc["runs"] == 1 and len(doc["runs_detail"]) == 1
    listed = run("ledger", "list").stdout.decode()
    assert "customers" in listed and "cap ε" in listed
    r = run("ledger", "delete", "customers")
    assert r.returncode == 2 and "--yes" in r.stderr.decode()
    assert run("ledger", "delete", "customers", "--yes").returncode == 0
    assert json.loads(run("ledger", "--json").stdout)["budgets"] == []
    other = kp_home / "team.sqlite3"
    r = run("ledger", "create", "t", "--epsilon", "1", "--delta", "1e-6", "--url", str(other))
    assert r.returncode == 0 and other.exists()


def test_ledger_cli_never_prints_a_url_password(kp_home):
    url = "postgresql://me:hunter2-secret@127.0.0.1:1/privacy"
    r = run("ledger", "--url", url)
    text = (r.stdout + r.stderr).decode()
    assert r.returncode != 0 and "hunter2-secret" not in text
    assert "PGPASSWORD" in text  # the warning says where a password belongs


def test_dp_ledger_name_shows_that_budget(ip, kp_home):
    with Ledger() as led:
        led.create("synth", 4, 1e-5)
    view = ip.run_line_magic("dp_ledger", "synth")
    assert "budget 'synth': cap ε=4" in repr(view)
    with pytest.raises(UsageError, match="no budget named 'ghost'"):
        ip.run_line_magic("dp_ledger", "ghost")


def test_target_epsilon_zero_is_refused_not_clamped(ip):
    for value in ("0", "-1"):
        with pytest.raises(UsageError, match="target_epsilon must be > 0"):
            ip.run_line_magic("dp_budget", f"--n 1000 --batch-size 50 --target-epsilon {value}")
    planner = ip.run_line_magic("dp_budget", "--n 1000 --batch-size 50 --target-epsilon 20000")
    assert planner.target_input.value == 20000  # not clamped to the box's old maximum


def test_cli_hint_names_the_flag_and_curve_accepts_it(kp_home):
    base = ["--n", "1000", "--batch-size", "50", "--epochs", "2", "--noise-multiplier", "0"]
    for cmd in ("epsilon", "curve"):
        r = run(cmd, *base)
        err = r.stderr.decode()
        assert r.returncode == 2 and "--allow-no-noise" in err and "allow_no_noise" not in err
    assert run("curve", *base, "--allow-no-noise").returncode == 0


def test_every_cli_option_has_help_and_states_its_default():
    from kprivacy_nb.__main__ import build_parser

    missing = []

    def walk(parser, path):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk(sub, [*path, name])
            elif action.dest not in ("help", "version"):
                where = f"{' '.join(path)} {action.option_strings or action.dest}"
                if not action.help:
                    missing.append(where)
                elif action.option_strings and action.default not in (None, False, []):
                    if "default" not in action.help:
                        missing.append(f"{where} (default {action.default!r} unstated)")

    walk(build_parser(), [])
    assert [m for m in missing if not m.startswith("doctor")] == []


def test_interrupted_run_says_what_ran(kp_home):
    with Ledger() as led:
        led.create("b", 8, 1e-5)
        res = led.reserve("b", _event(500), description="fit m: 5 epochs")
        res.update(_event(137))
        with pytest.raises(KeyboardInterrupt), res:
            raise KeyboardInterrupt
        (record,) = led.runs("b")
    assert record.status == "settled"
    assert record.description == "fit m: 5 epochs — stopped early: ran 137 of 500 planned steps"


def test_recipient_vocabulary_r_everywhere_to_kept(ip, kp_home, tmp_path):
    ip.run_line_magic("secure_keygen", "alice")
    ip.user_ns["note"] = "hello"
    for flag in ("-r", "--recipient", "--to"):
        ip.run_line_magic("secure_save", f"note {tmp_path}/n{flag}.age {flag} alice")
    (tmp_path / "in.txt").write_text("x")
    for flag in ("-r", "--to"):
        r = run(
            "encrypt", flag, "alice", "-o", str(tmp_path / f"c{flag}.age"), str(tmp_path / "in.txt")
        )
        assert r.returncode == 0, r.stderr
    from kprivacy_nb.magics.export import ExportMagics

    assert "-r RECIPIENT" in ExportMagics.secure_output.__doc__


def test_cell_magic_help_shows_a_cell_magic_usage_line(ip):
    doc = ip.magics_manager.magics["cell"]["secure_output"].__doc__
    assert "%%secure_output [-r RECIPIENT]" in doc
