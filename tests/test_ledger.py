"""The privacy-budget ledger: composition, reserve/settle, concurrency, damaged databases."""

from __future__ import annotations

import multiprocessing
import os
import sqlite3
import stat
import time

import dp_accounting
import pytest

from kprivacy_nb.dp import accounting as acc
from kprivacy_nb.dp.ledger import (
    Ledger,
    LedgerTarget,
    event_from_json,
    event_to_json,
    resolve_ledger,
)
from kprivacy_nb.errors import BudgetExceededError, InvalidParameterError, LedgerError

G = dp_accounting.GaussianDpEvent


def dpsgd(sigma: float = 1.1, steps: int = 234 * 5) -> dp_accounting.DpEvent:
    return acc.dpsgd_event(n=60000, batch_size=256, noise_multiplier=sigma, steps=steps)


@pytest.fixture
def ledger(kp_home):
    with Ledger() as led:
        yield led


# ---------------------------------------------------------------- events as JSON


@pytest.mark.parametrize(
    "event",
    [
        dpsgd(),
        acc.dpsgd_event(n=100, batch_size=10, noise_multiplier=2.0, steps=30, sampling="shuffle"),
        dp_accounting.ComposedDpEvent((G(1.0), dpsgd(0.9, 10))),
        dp_accounting.SampledWithoutReplacementDpEvent(100, 10, G(3.0)),
        dp_accounting.NoOpDpEvent(),
    ],
)
def test_event_json_round_trip(event):
    text = event_to_json(event)
    assert '"version":1' in text and '"format":"kprivacy_nb.dp_event"' in text
    back = event_from_json(text)
    assert back == event or (
        isinstance(event, dp_accounting.ComposedDpEvent) and tuple(back.events) == event.events
    )


def test_event_json_refuses_foreign_documents():
    good = event_to_json(G(1.0))
    with pytest.raises(ValueError, match="version"):
        event_from_json(good.replace('"version":1', '"version":99'))
    with pytest.raises(ValueError, match="unknown DpEvent type"):
        event_from_json(good.replace("GaussianDpEvent", "PrivacyAccountant"))
    with pytest.raises(ValueError):
        event_from_json('{"format": "other"}')


# ---------------------------------------------------------------- budgets


def test_create_persist_and_list(kp_home):
    with Ledger() as led:
        b = led.create("customers", epsilon=8, delta=1e-5)
        assert (b.name, b.epsilon_cap, b.delta, b.spent_epsilon, b.remaining_epsilon, b.runs) == (
            "customers", 8.0, 1e-5, 0.0, 8.0, 0
        )  # fmt: skip
        led.create("other", 2, 1e-6, accountant="rdp")
    path = kp_home / "ledger.sqlite3"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    with Ledger() as again:
        assert [b.name for b in again.budgets()] == ["customers", "other"]
        assert again.budget("other").accountant == "rdp"


def test_duplicate_and_bad_budgets(ledger):
    ledger.create("c", 8, 1e-5)
    with pytest.raises(LedgerError, match="already exists"):
        ledger.create("c", 8, 1e-5)
    ledger.create("c", 8, 1e-5, exist_ok=True)  # same settings: fine
    with pytest.raises(LedgerError, match="already exists"):
        ledger.create("c", 9, 1e-5, exist_ok=True)
    with pytest.raises(InvalidParameterError):
        ledger.create("d", -1, 1e-5)
    with pytest.raises(InvalidParameterError):
        ledger.create("d", 1, 1.5)
    with pytest.raises(InvalidParameterError):
        ledger.create("  ", 1, 1e-5)


def test_unknown_budget_is_a_clear_error(ledger):
    ledger.create("known", 1, 1e-5)
    with pytest.raises(LedgerError, match=r"no budget named 'nope'.*known budgets: known"):
        ledger.budget("nope")
    with pytest.raises(LedgerError, match="no budget named"):
        ledger.reserve("nope", dpsgd())


# ---------------------------------------------------------------- spending


def test_spent_is_the_composition_not_the_sum(ledger):
    ledger.create("c", 8, 1e-5)
    e1, e2 = dpsgd(1.1, 234 * 15), dpsgd(0.9, 234 * 3)
    ledger.reserve("c", e1, description="first").settle()
    ledger.reserve("c", e2, description="second").settle()
    b = ledger.budget("c")
    composed = acc.epsilon_of_event(dp_accounting.ComposedDpEvent((e1, e2)), 1e-5, "pld")
    summed = acc.epsilon_of_event(e1, 1e-5, "pld") + acc.epsilon_of_event(e2, 1e-5, "pld")
    assert b.spent_epsilon == pytest.approx(composed)
    assert b.spent_epsilon < summed
    assert b.runs == 2 and b.remaining_epsilon == pytest.approx(8 - composed)
    assert [r.description for r in ledger.runs("c")] == ["first", "second"]
    assert [r.event for r in ledger.runs("c")] == [e1, e2]


def test_refused_before_start_with_what_fits(ledger):
    ledger.create("small", 1.0, 1e-5)
    with pytest.raises(BudgetExceededError) as info:
        ledger.reserve("small", dpsgd(1.1, 234 * 15))  # ε≈1.13 > 1
    msg = str(info.value)
    assert "ε=1 left of 1" in msg and "refused before starting" in msg
    assert "σ ≥" in msg and "steps" in msg
    assert ledger.runs("small") == []  # nothing recorded
    # the suggested σ really fits
    sigma = float(msg.split("σ ≥ ")[1].split()[0])
    ledger.reserve("small", dpsgd(sigma, 234 * 15)).settle()
    assert ledger.budget("small").spent_epsilon <= 1.0


def test_reservations_count_until_settled_or_cancelled(ledger):
    ledger.create("c", 1.5, 1e-5)
    first = ledger.reserve("c", dpsgd(1.1, 234 * 15))
    b = ledger.budget("c")
    assert b.reserved == 1 and b.runs == 0 and b.spent_epsilon == 0
    assert b.committed_epsilon == pytest.approx(1.133, rel=0.01)
    with pytest.raises(BudgetExceededError):  # the reservation holds the budget
        ledger.reserve("c", dpsgd(1.1, 234 * 15))
    first.cancel()
    assert ledger.budget("c").committed_epsilon == 0
    with pytest.raises(LedgerError, match="already cancelled"):
        first.settle()
    second = ledger.reserve("c", dpsgd(1.1, 234 * 15))
    second.settle(dpsgd(1.1, 234 * 4))  # interrupted after 4 epochs: records what ran
    b = ledger.budget("c")
    assert b.runs == 1 and b.spent_epsilon == pytest.approx(
        acc.epsilon_of_event(dpsgd(1.1, 234 * 4), 1e-5, "pld")
    )
    with pytest.raises(LedgerError, match="already settled"):
        second.settle()


def test_reservation_context_manager(ledger):
    ledger.create("c", 20, 1e-5)
    with ledger.reserve("c", dpsgd(steps=100)) as run:
        pass
    assert run.status == "settled"
    with pytest.raises(RuntimeError), ledger.reserve("c", dpsgd(steps=100)) as run2:
        run2.update(dpsgd(steps=40))
        raise RuntimeError("kernel interrupted")
    with pytest.raises(RuntimeError), ledger.reserve("c", dpsgd(steps=100)) as run3:
        raise RuntimeError("failed before the first step")
    assert (run2.status, run3.status) == ("settled", "cancelled")
    records = ledger.runs("c", include_cancelled=True)
    assert [(r.status, r.event.count) for r in records] == [
        ("settled", 100), ("settled", 40), ("cancelled", 100)
    ]  # fmt: skip


def test_budget_accountant_is_used(ledger):
    ledger.create("r", 1.2, 1e-5, accountant="rdp")
    ledger.create("p", 1.2, 1e-5)
    event = dpsgd(1.1, 234 * 15)  # RDP ≈ 1.28 > 1.2 ≥ PLD ≈ 1.13
    with pytest.raises(BudgetExceededError):
        ledger.reserve("r", event)
    ledger.reserve("p", event).settle()


def test_resolve_ledger(kp_home, ledger):
    assert resolve_ledger(None) is None
    ledger.create("customers", 8, 1e-5)
    target = resolve_ledger("customers")
    assert isinstance(target, LedgerTarget) and target.name == "customers"
    assert target.budget().epsilon_cap == 8
    assert resolve_ledger(("customers", ledger)).ledger is ledger
    assert resolve_ledger((ledger, "customers")).name == "customers"
    with pytest.raises(LedgerError, match="no budget named"):
        resolve_ledger("unknown")
    with pytest.raises(InvalidParameterError):
        resolve_ledger(42)


def test_delete(ledger):
    ledger.create("gone", 8, 1e-5)
    ledger.reserve("gone", dpsgd()).settle()
    ledger.delete("gone")
    assert ledger.names() == []
    with pytest.raises(LedgerError):
        ledger.delete("gone")


# ---------------------------------------------------------------- damaged / locked databases


def test_corrupted_database_is_reported_and_left_alone(tmp_path):
    path = tmp_path / "ledger.sqlite3"
    junk = b"this is not an sqlite database at all" * 200
    path.write_bytes(junk)
    with pytest.raises(LedgerError, match="corrupted"):
        Ledger(path)
    assert path.read_bytes() == junk


def test_damaged_page_in_a_real_ledger(tmp_path):
    path = tmp_path / "ledger.sqlite3"
    with Ledger(path) as led:
        led.create("c", 8, 1e-5)
        for _ in range(3):
            led.reserve("c", dpsgd(steps=10), description="x" * 3000).settle()
    data = bytearray(path.read_bytes())
    data[4096:8192] = b"\xff" * 4096  # smash the second page
    path.write_bytes(bytes(data))
    with pytest.raises(LedgerError, match="corrupted|damaged|unreadable"):
        with Ledger(path) as led:
            led.budgets()
    assert path.read_bytes() == bytes(data)


def test_foreign_sqlite_database_is_refused(tmp_path):
    path = tmp_path / "other.sqlite3"
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE stuff (x)")
    con.commit()
    con.close()
    with pytest.raises(LedgerError, match="not a kprivacy_nb ledger"):
        Ledger(path)
    con = sqlite3.connect(path)
    assert con.execute("SELECT name FROM sqlite_master").fetchall() == [("stuff",)]
    con.close()


def test_unreadable_event_row_is_reported(tmp_path):
    path = tmp_path / "ledger.sqlite3"
    with Ledger(path) as led:
        led.create("c", 8, 1e-5)
        led.reserve("c", dpsgd()).settle()
    con = sqlite3.connect(path)
    con.execute("UPDATE runs SET event = '{broken'")
    con.commit()
    con.close()
    with Ledger(path) as led, pytest.raises(LedgerError, match="run 1 .* unreadable event"):
        led.budget("c")


def test_locked_database_is_a_clear_error_and_loses_nothing(tmp_path):
    path = tmp_path / "ledger.sqlite3"
    with Ledger(path) as led:
        led.create("c", 8, 1e-5)
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(LedgerError, match="locked"), Ledger(path, timeout=0.2) as led:
            led.reserve("c", dpsgd())
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    with Ledger(path) as led:
        led.reserve("c", dpsgd()).settle()
        assert led.budget("c").runs == 1


def test_ledger_url_setting(tmp_path, monkeypatch):
    monkeypatch.setenv("KPRIVACY_NB_LEDGER_URL", f"sqlite:///{tmp_path / 'team.sqlite3'}")
    with Ledger() as led:
        led.create("shared", 3, 1e-5)
    assert (tmp_path / "team.sqlite3").exists()
    monkeypatch.setenv("KPRIVACY_NB_LEDGER_URL", "mysql://db.example/ledger")
    with pytest.raises(LedgerError, match="mysql://… is not a ledger location"):
        Ledger()
    monkeypatch.setenv("KPRIVACY_NB_LEDGER_URL", str(tmp_path / "bare-path.sqlite3"))
    with pytest.raises(LedgerError, match="must be a URL"):
        Ledger()


# ---------------------------------------------------------------- concurrent processes

RACE_SIGMA = 3.0


def _race_worker(path: str, barrier, tries: int, queue) -> None:
    ok = refused = 0
    with Ledger(path) as led:
        barrier.wait()
        for _ in range(tries):
            try:
                run = led.reserve("race", G(RACE_SIGMA), description=f"pid {os.getpid()}")
            except BudgetExceededError:
                refused += 1
                continue
            time.sleep(0.001)
            run.settle()
            ok += 1
    queue.put((ok, refused))


@pytest.mark.slow
def test_concurrent_processes_never_overspend_or_lose_records(tmp_path):
    path = tmp_path / "ledger.sqlite3"
    cap = 4.0
    with Ledger(path) as led:
        led.create("race", cap, 1e-5)
    # How many Gaussian(σ=3) releases fit the cap, when composed.
    fit = 0
    while (
        acc.epsilon_of_event(dp_accounting.SelfComposedDpEvent(G(RACE_SIGMA), fit + 1), 1e-5, "pld")
        <= cap
    ):
        fit += 1
    assert 4 < fit < 40
    workers, tries = 4, fit  # together they try 4x what fits
    ctx = multiprocessing.get_context("fork")
    barrier, queue = ctx.Barrier(workers), ctx.Queue()
    procs = [ctx.Process(target=_race_worker, args=(str(path), barrier, tries, queue))
             for _ in range(workers)]  # fmt: skip
    for p in procs:
        p.start()
    results = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    granted = sum(ok for ok, _ in results)
    assert sum(ok + refused for ok, refused in results) == workers * tries
    with Ledger(path) as led:
        b = led.budget("race")
        runs = led.runs("race", include_cancelled=True)
    assert granted == fit == b.runs == len(runs)  # every grant recorded, none beyond the cap
    assert b.spent_epsilon <= cap
    assert len({r.description for r in runs}) > 1  # several processes really competed


def test_dp_ledger_settle_records_a_stale_reservation_as_fully_spent(tmp_path):
    from IPython.core.error import UsageError
    from IPython.testing.globalipapp import get_ipython

    from kprivacy_nb.dp import accounting
    from kprivacy_nb.dp.ledger import Ledger

    ledger = Ledger()
    ledger.create("stale", 8.0, 1e-5)
    event = accounting.dpsgd_event(n=10000, batch_size=100, noise_multiplier=1.0, steps=200)
    res = ledger.reserve("stale", event)  # a kernel reserved, then died before settling
    ip = get_ipython()
    ip.run_line_magic("load_ext", "kprivacy_nb")
    try:
        with pytest.raises(UsageError, match=f"pending in 'stale': {res.id}"):
            ip.run_line_magic("dp_ledger", "settle stale")
        ip.run_line_magic("dp_ledger", f"settle stale --run {res.id}")
        (run,) = ledger.runs("stale")
        assert run.status == "settled" and run.event == event
        assert ledger.budget("stale").spent_epsilon == pytest.approx(
            accounting.epsilon_of_event(event, 1e-5, "pld"), rel=1e-6
        )
    finally:
        ip.run_line_magic("unload_ext", "kprivacy_nb")
