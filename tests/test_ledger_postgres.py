"""The ledger on a real PostgreSQL server: same semantics as SQLite, races between processes,
killed processes, migrations, and credentials that never show.

A throwaway cluster (Debian's ``postgresql``, :class:`kprivacy_nb.dp.pg_local.LocalPostgres`)
is started once per session on a Unix socket in a temp folder; each test gets its own database.
In CI a missing PostgreSQL or psycopg is a failure, elsewhere a loud skip.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid

import dp_accounting
import pytest

from kprivacy_nb.dp import accounting as acc
from kprivacy_nb.dp import ledger_pg
from kprivacy_nb.dp.ledger import Ledger, resolve_ledger
from kprivacy_nb.dp.pg_local import LocalPostgres, find_bindir
from kprivacy_nb.errors import BudgetExceededError, LedgerError

from ci_support import in_ci

G = dp_accounting.GaussianDpEvent
RACE_SIGMA = 3.0


def _missing(message: str) -> None:
    if in_ci():
        pytest.fail(f"CI: {message}; .ci/run must install it", pytrace=False)
    pytest.skip(f"*** SKIPPED: {message} ***")


@pytest.fixture(scope="session")
def pg_server():
    try:
        import psycopg  # noqa: F401
    except ImportError:
        _missing("psycopg is not installed (pip install -e '.[dev]')")
    if find_bindir() is None:
        _missing("PostgreSQL is not installed (apt-get install postgresql)")
    with LocalPostgres() as server:
        yield server


@pytest.fixture
def pg_url(pg_server):
    return pg_server.create_database(f"t_{uuid.uuid4().hex[:12]}")


def _dbname(url: str) -> str:
    return url.split("/")[3].split("?")[0]


def dpsgd(sigma: float = 1.1, steps: int = 234 * 5) -> dp_accounting.DpEvent:
    return acc.dpsgd_event(n=60000, batch_size=256, noise_multiplier=sigma, steps=steps)


# ---------------------------------------------------------------- same semantics as SQLite


def _scenario(led: Ledger) -> list:
    """A session of ledger calls; returns what a user sees (locations left out)."""
    seen: list = []

    def outcome(func, *args, **kw):
        try:
            result = func(*args, **kw)
        except (BudgetExceededError, LedgerError) as exc:
            return f"{type(exc).__name__}: {str(exc).replace(led.location, 'LOC')}"
        return result.to_dict() if hasattr(result, "to_dict") else result

    seen.append(outcome(led.create, "c", 3.0, 1e-5))
    seen.append(outcome(led.create, "c", 3.0, 1e-5, exist_ok=True))
    seen.append(outcome(led.create, "c", 4.0, 1e-5))
    seen.append(outcome(led.create, "r", 2.0, 1e-6, accountant="rdp"))
    first = led.reserve("c", dpsgd(1.1, 500), description="first")
    seen.append(outcome(led.budget, "c"))
    first.settle(dpsgd(1.1, 400))  # ran fewer steps than planned
    with led.reserve("c", dpsgd(2.0, 300)) as run:
        run.update(dpsgd(2.0, 100))
    seen.append(outcome(led.reserve, "c", dpsgd(0.6, 5000)))  # refused, with what would fit
    pending = led.reserve("c", dpsgd(3.0, 200))
    seen.append(outcome(led.settle, pending.id, dpsgd(0.5, 5000)))  # reports more than reserved
    pending.cancel()
    seen.append(outcome(led.cancel, pending.id))
    seen.append(outcome(led.budget, "nope"))
    seen.append([(r.id, r.status, r.description) for r in led.runs("c", include_cancelled=True)])
    seen.append([b.to_dict() for b in led.budgets()])
    seen.append([round(e, 9) for _, e in led.cumulative_epsilon("c")])
    led.delete("r")
    seen.append(led.names())
    return seen


def test_postgres_gives_the_same_answers_as_sqlite(pg_url, tmp_path):
    with Ledger(tmp_path / "ledger.sqlite3") as lite, Ledger(pg_url) as pg:
        seen = _scenario(pg)
        assert seen == _scenario(lite)
    assert any(isinstance(x, str) and "Would fit" in x for x in seen)  # refusals say what fits


def test_url_from_the_environment_and_dp_fit_resolution(pg_url, monkeypatch):
    monkeypatch.setenv("KPRIVACY_NB_LEDGER_URL", pg_url)
    with Ledger() as led:
        assert led.location.startswith("postgresql://")
        led.create("team", 8, 1e-5)
    target = resolve_ledger("team")  # what dp_fit(ledger="team") does
    assert target.ledger.location == led.location
    target.reserve(dpsgd()).settle()
    with Ledger(pg_url) as other:
        assert other.budget("team").runs == 1


# ---------------------------------------------------------------- credentials and errors


def test_a_password_in_the_url_is_never_shown(pg_server, pg_url):
    password = f"pw-{uuid.uuid4().hex}"
    dbname = _dbname(pg_url)
    pg_server.execute(f"CREATE ROLE alice LOGIN PASSWORD '{password}'")
    pg_server.execute(f"GRANT ALL ON DATABASE {dbname} TO alice")
    pg_server.require_password("alice")
    try:
        good = pg_server.url(dbname, user="alice", password=password)
        with Ledger(good) as led:
            led.create("c", 8, 1e-5)
            shown = [repr(led), led.location, str(led._store.__repr__())]
            with pytest.raises(LedgerError) as unknown:
                led.budget("nope")
            shown.append(str(unknown.value))
        assert all(password not in s and "alice:***@" in s for s in shown), shown
        query_form = good.replace(f"alice:{password}@", "alice@") + f"&password={password}"
        with Ledger(query_form) as led:
            assert password not in repr(led) and "password=***" in led.location
            assert led.budget("c").epsilon_cap == 8
        for wrong in (good.replace(password, password[::-1]), good.replace(password, "")):
            with pytest.raises(LedgerError) as exc:
                Ledger(wrong)
            text = str(exc.value)
            assert "cannot connect" in text and ("password authentication failed" in text
                                                 or "no password supplied" in text)  # fmt: skip
            assert password not in text and password[::-1] not in text and "\n" not in text
    finally:
        pg_server.require_password()


def test_connection_failures_are_one_line_errors(pg_server, tmp_path):
    nowhere = f"postgresql://kp@/postgres?host={tmp_path}&port=5432"
    with pytest.raises(LedgerError, match=r"^cannot connect to the ledger postgresql://") as exc:
        Ledger(nowhere)
    assert "\n" not in str(exc.value) and "server is up" in str(exc.value)
    with pytest.raises(LedgerError, match='database "missing_db" does not exist'):
        Ledger(pg_server.url("missing_db"))


def test_without_psycopg_the_error_says_what_to_install(pg_url, monkeypatch):
    monkeypatch.setitem(sys.modules, "psycopg", None)
    with pytest.raises(LedgerError, match=r"kprivacy-nb\[postgres\]"):
        Ledger(pg_url)


def test_a_dropped_connection_reconnects(pg_server, pg_url):
    with Ledger(pg_url) as led:
        led.create("c", 8, 1e-5)
        pid = led._run(lambda db: db.execute("SELECT pg_backend_pid()").fetchone()[0])
        pg_server.execute(f"SELECT pg_terminate_backend({pid}, 5000)")  # a restart, a failover
        assert led.budget("c").runs == 0  # an idle connection that died: connected again
        with pytest.raises(LedgerError, match="lost the connection .* nothing was recorded"):
            led._run(lambda db: db.execute("SELECT pg_terminate_backend(pg_backend_pid())"))
        led.reserve("c", dpsgd()).settle()
        assert led.budget("c").runs == 1


TEAM_GRANTS = """
GRANT USAGE ON SCHEMA kprivacy_nb TO {team};
GRANT SELECT ON kprivacy_nb.budgets, kprivacy_nb.schema_version TO {team};
GRANT UPDATE (created_at) ON kprivacy_nb.budgets TO {team};
GRANT SELECT, INSERT, UPDATE ON kprivacy_nb.runs TO {team};
"""  # as docs/scale.md gives them


def test_team_roles_charge_runs_but_cannot_change_budgets(pg_server, pg_url, monkeypatch):
    tag = uuid.uuid4().hex[:8]
    owner, team, bob, dbname = f"owner_{tag}", f"team_{tag}", f"bob_{tag}", _dbname(pg_url)
    pg_server.execute(f"CREATE ROLE {owner} LOGIN; CREATE ROLE {team} NOLOGIN; "
                      f"CREATE ROLE {bob} LOGIN IN ROLE {team}")  # fmt: skip
    pg_server.execute(f"ALTER DATABASE {dbname} OWNER TO {owner}")
    with Ledger(pg_server.url(dbname, user=owner)) as led:
        led.create("c", 8, 1e-5)
    pg_server.execute(TEAM_GRANTS.format(team=team), dbname)
    with Ledger(pg_server.url(dbname, user=bob)) as led:
        led.reserve("c", dpsgd()).settle()
        led.reserve("c", dpsgd()).cancel()
        assert led.budget("c").runs == 1
        for action in (lambda: led.create("mine", 100, 1e-5), lambda: led.delete("c")):
            with pytest.raises(LedgerError, match="lacks a privilege .* ledger owner's role"):
                action()
        with pytest.raises(Exception, match="permission denied"):
            led._run(lambda db: db.execute("UPDATE budgets SET epsilon_cap = 1e9"), write=True)
    step2 = ledger_pg.Migration(2, "x", ("ALTER TABLE kprivacy_nb.runs ADD COLUMN x TEXT",))
    monkeypatch.setattr(ledger_pg, "MIGRATIONS", (*ledger_pg.MIGRATIONS, step2))
    with pytest.raises(LedgerError, match="lacks a privilege"):
        Ledger(pg_server.url(dbname, user=bob))  # upgrades are the owner's job
    with Ledger(pg_server.url(dbname, user=owner)) as led:
        assert led.budget("c").epsilon_cap == 8


# ---------------------------------------------------------------- schema migrations


def _versions(pg_server, url) -> list[int]:
    rows = pg_server.execute(
        "SELECT version FROM kprivacy_nb.schema_version ORDER BY 1", _dbname(url)
    )
    return [r[0] for r in rows]


def test_schema_is_versioned_and_migrated_in_order(pg_server, pg_url, monkeypatch):
    with Ledger(pg_url) as led:
        led.create("c", 8, 1e-5)
        led.reserve("c", dpsgd()).settle()
    assert _versions(pg_server, pg_url) == [1]
    step2 = ledger_pg.Migration(
        2, "runs.note", ("ALTER TABLE kprivacy_nb.runs ADD COLUMN note TEXT",)
    )
    monkeypatch.setattr(ledger_pg, "MIGRATIONS", (*ledger_pg.MIGRATIONS, step2))
    with Ledger(pg_url) as led:  # an older ledger is upgraded, its records kept
        assert led.budget("c").runs == 1
    assert _versions(pg_server, pg_url) == [1, 2]
    monkeypatch.undo()
    with pytest.raises(LedgerError, match="schema version 2; .* understands up to 1. Upgrade"):
        Ledger(pg_url)  # a newer ledger is refused, not downgraded


def test_a_foreign_kprivacy_nb_schema_is_left_alone(pg_server, pg_url):
    dbname = _dbname(pg_url)
    pg_server.execute("CREATE SCHEMA kprivacy_nb", dbname)
    pg_server.execute("CREATE TABLE kprivacy_nb.budgets (x int)", dbname)
    with pytest.raises(LedgerError, match="not a kprivacy_nb ledger .* left untouched"):
        Ledger(pg_url)
    tables = pg_server.execute(
        "SELECT table_name FROM information_schema.tables WHERE table_schema = 'kprivacy_nb'",
        dbname,
    )
    assert tables == [("budgets",)]


# ---------------------------------------------------------------- concurrent processes


def _race_worker(url: str, cap: float, barrier, tries: int, queue) -> None:
    granted = refused = cancelled = 0
    try:
        with Ledger(url) as led:  # a fresh database: the first opens race to migrate it
            led.create("race", cap, 1e-5, exist_ok=True)
            barrier.wait()
            for i in range(tries):
                try:
                    run = led.reserve("race", G(RACE_SIGMA), description=f"pid {os.getpid()}")
                except BudgetExceededError:
                    refused += 1
                    continue
                granted += 1
                if i % 4 == 3:
                    run.cancel()
                    cancelled += 1
                else:
                    run.settle()
        queue.put((granted, refused, cancelled, ""))
    except Exception as exc:  # reported to the test, which fails on it
        queue.put((granted, refused, cancelled, f"{type(exc).__name__}: {exc}"))


@pytest.mark.slow
def test_eight_processes_never_overspend_or_lose_records(pg_url):
    cap = 4.0
    fit = 0  # how many Gaussian(σ=3) releases fit the cap, composed
    while acc.epsilon_of_event(dp_accounting.SelfComposedDpEvent(G(RACE_SIGMA), fit + 1), 1e-5,
                               "pld") <= cap:  # fmt: skip
        fit += 1
    assert 4 < fit < 40
    workers, tries = 8, fit  # together they try 8x what fits
    ctx = multiprocessing.get_context("fork")
    barrier, queue = ctx.Barrier(workers), ctx.Queue()
    procs = [ctx.Process(target=_race_worker, args=(pg_url, cap, barrier, tries, queue))
             for _ in range(workers)]  # fmt: skip
    for p in procs:
        p.start()
    results = [queue.get(timeout=300) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert [err for *_, err in results if err] == []
    granted = sum(r[0] for r in results)
    cancelled = sum(r[2] for r in results)
    assert sum(r[0] + r[1] for r in results) == workers * tries
    with Ledger(pg_url) as led:
        b = led.budget("race")
        runs = led.runs("race", include_cancelled=True)
    assert len(runs) == granted  # every grant recorded, none lost
    assert sum(r.status == "cancelled" for r in runs) == cancelled
    assert b.runs == granted - cancelled == fit  # cancelled spend was reused, the cap held
    assert b.reserved == 0 and b.spent_epsilon <= cap
    assert len({r.description for r in runs}) > 1  # several processes really competed


_RESERVE_AND_HANG = """
import sys, time, dp_accounting
from kprivacy_nb.dp.ledger import Ledger
led = Ledger(sys.argv[1])
run = led.reserve("team", dp_accounting.GaussianDpEvent(float(sys.argv[2])), description="doomed")
print(run.id, flush=True)
time.sleep(120)
"""


def _spawn(code: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _first_line(proc: subprocess.Popen) -> str:
    line = proc.stdout.readline().strip()
    assert line, proc.stderr.read()
    return line


def test_a_killed_process_reservation_stays_charged_until_an_operator_acts(pg_url, ip):
    with Ledger(pg_url) as led:
        led.create("team", 1.5, 1e-5)
        one = acc.epsilon_of_event(G(3.0), 1e-5, "pld")
        assert acc.epsilon_of_event(dp_accounting.SelfComposedDpEvent(G(3.0), 2), 1e-5, "pld") > 1.5
        doomed = []
        for _ in range(2):
            proc = _spawn(_RESERVE_AND_HANG, pg_url, "6.0")
            doomed.append(int(_first_line(proc)))
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
        b = led.budget("team")
        assert (b.reserved, b.runs) == (2, 0) and b.committed_epsilon > 0
        with pytest.raises(BudgetExceededError):
            led.reserve("team", G(3.0))  # fits only if the dead runs' spend were forgotten
        # The operator: one run is known never to have trained, the other may have.
        ip.run_line_magic("dp_ledger", f"cancel team --run {doomed[0]} --url {pg_url}")
        ip.run_line_magic("dp_ledger", f"settle team --run {doomed[1]} --url {pg_url}")
        statuses = {r.id: r.status for r in led.runs("team", include_cancelled=True)}
        assert statuses == {doomed[0]: "cancelled", doomed[1]: "settled"}
        assert led.budget("team").spent_epsilon < one  # σ=6 settled: less than one σ=3 run
        with pytest.raises(BudgetExceededError):
            led.reserve("team", dpsgd(0.5, 5000))


_HOLD_LOCK = """
import sys, time, psycopg
conn = psycopg.connect(sys.argv[1])
conn.execute("SELECT * FROM kprivacy_nb.budgets WHERE name = 'team' FOR UPDATE")
print("locked", flush=True)
time.sleep(120)
"""


def test_a_killed_lock_holder_blocks_nobody(pg_url):
    with Ledger(pg_url) as led:
        led.create("team", 8, 1e-5)
        led.create("other", 8, 1e-5)
    holder = _spawn(_HOLD_LOCK, pg_url)
    try:
        assert _first_line(holder) == "locked"
        with Ledger(pg_url, timeout=0.3) as led:
            with pytest.raises(LedgerError, match="locked by another process .* 0.3s") as exc:
                led.reserve("team", dpsgd())
            assert "\n" not in str(exc.value)
            led.reserve("other", dpsgd()).settle()  # budgets don't block each other
            assert led.budget("team").reserved == 0  # the refused reservation left nothing
            holder.send_signal(signal.SIGKILL)
            holder.wait(timeout=30)
            start = time.monotonic()
            led._store.timeout = 10
            led.reserve("team", dpsgd()).settle()  # the server released the dead one's lock
            assert time.monotonic() - start < 5
    finally:
        holder.kill()
        holder.wait(timeout=30)


# ---------------------------------------------------------------- the magic


def test_dp_ledger_url_option(pg_url, ip):
    ip.run_line_magic("dp_ledger", f"create team --epsilon 2 --delta 1e-5 --url {pg_url}")
    table = ip.run_line_magic("dp_ledger", f"--url {pg_url}")
    assert "team" in repr(table) and table.location.startswith("postgresql://kp@")
    with Ledger(pg_url) as led:
        assert led.budget("team").epsilon_cap == 2
    from IPython.core.error import UsageError

    secret = f"S3cr{uuid.uuid4().hex[:6]}"
    line = f"--url {pg_url.replace('kp@', f'kp:{secret}@')}"
    with pytest.raises(UsageError, match="password in it") as exc:
        ip.run_line_magic("dp_ledger", line)
    assert secret not in str(exc.value)
    from kprivacy_nb import secrets

    assert secrets.redact(f"x {secret} y") == "x *** y"  # masked if anything prints it later


# ---------------------------------------------------------------- real dp_fit processes

_DP_FIT = """
import sys
import numpy as np, keras
from kprivacy_nb import dp_fit
from kprivacy_nb.errors import BudgetExceededError
rng = np.random.default_rng(int(sys.argv[1]))
x = rng.normal(size=(64, 4)).astype("float32")
y = (x[:, 0] > 0).astype("float32")
model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1, activation="sigmoid")])
model.compile(loss="binary_crossentropy")
try:
    r = dp_fit(model, x, y, epochs=1, batch_size=16, noise_multiplier=1.0, delta=1e-3,
               ledger="team", verbose=0, seed=int(sys.argv[1]))
    print("OK", r.epsilon, flush=True)
except BudgetExceededError:
    print("REFUSED", flush=True)
"""


@pytest.mark.slow
def test_two_dp_fit_processes_share_one_budget(pg_url):
    kw = dict(n=64, batch_size=16, noise_multiplier=1.0, delta=1e-3)
    one, two = acc.compute_epsilon(epochs=1, **kw), acc.compute_epsilon(epochs=2, **kw)
    with Ledger(pg_url) as led:
        led.create("team", (one + two) / 2, 1e-3)  # room for one run, not two
    env = {**os.environ, "KPRIVACY_NB_LEDGER_URL": pg_url, "TF_CPP_MIN_LOG_LEVEL": "3"}
    procs = [
        subprocess.Popen([sys.executable, "-c", _DP_FIT, str(seed)], env=env, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for seed in (1, 2)
    ]  # fmt: skip
    outs = [p.communicate(timeout=300) for p in procs]
    lasts = sorted(out.strip().splitlines()[-1].split()[0] if out.strip() else err[-500:]
                   for out, err in outs)  # fmt: skip
    assert lasts == ["OK", "REFUSED"], outs
    with Ledger(pg_url) as led:
        b = led.budget("team")
    assert (b.runs, b.reserved) == (1, 0)
    assert b.spent_epsilon == pytest.approx(one, rel=1e-3) and b.spent_epsilon <= b.epsilon_cap
