"""A persistent privacy-budget ledger: named budgets, every DP run recorded as its ``DpEvent``.

The total spent on a budget is the *composition* of all its runs' events under the budget's
accountant (PLD by default), not a sum of ε's. A run reserves its planned event before training
(check + reserve in one ``BEGIN IMMEDIATE`` transaction, so two kernels can't overspend between
check and record) and settles it with the steps actually run afterwards. Reserved events count
against the cap until settled or cancelled.

Storage is a store that only speaks SQL (``?`` parameters) in transactions: an SQLite file by
default (``home_dir()/ledger.sqlite3``, :class:`SQLiteStore`), or a team's PostgreSQL database
(:class:`~kprivacy_nb.dp.ledger_pg.PostgresStore`) named by a ``postgresql://`` URL — given to
``Ledger(...)`` or in ``KPRIVACY_NB_LEDGER_URL`` (which also takes ``sqlite:///PATH``). Every write
transaction locks the row of the budget it changes first (``store.for_update``; SQLite's
``BEGIN IMMEDIATE`` already locks the whole file), so concurrent writers of one budget serialise.

>>> ledger = Ledger()                                    # doctest: +SKIP
>>> ledger.create("customers", epsilon=8, delta=1e-5)    # doctest: +SKIP
>>> with ledger.reserve("customers", event) as run:      # doctest: +SKIP
...     train()                                          # settles with `event` on success

Event serialisation (``event_to_json``/``event_from_json``), format version 1::

    {"format": "kprivacy_nb.dp_event", "version": 1,
     "event": {"type": "<dp_accounting class name>", "fields": {...}}}

Field values are JSON numbers/strings/booleans/null, nested events (same ``{"type", "fields"}``
shape) or lists of those. Only ``dp_accounting.dp_event`` classes are ever instantiated.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import math
import numbers
import os
import socket
import sqlite3
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import dp_accounting
from dp_accounting import dp_event as _dp_event

from ..errors import BudgetExceededError, InvalidParameterError, LedgerError
from ..paths import home_dir
from . import accounting

EVENT_FORMAT = "kprivacy_nb.dp_event"
EVENT_FORMAT_VERSION = 1
SCHEMA_VERSION = 1
APP_ID = "kprivacy_nb-ledger"
LEDGER_FILENAME = "ledger.sqlite3"
LOCK_TIMEOUT = 30.0  # seconds to wait for another writer before calling the ledger locked
TRANSIENT_RETRIES = 5  # a transaction the server aborted as a conflict is run again

__all__ = [
    "Budget",
    "Ledger",
    "LedgerTarget",
    "Reservation",
    "RunRecord",
    "SQLiteStore",
    "event_from_json",
    "event_to_json",
    "resolve_ledger",
]


# ------------------------------------------------------------------ event (de)serialisation


def _encode(value: Any) -> Any:
    if isinstance(value, _dp_event.DpEvent):
        # DpEvents are attrs classes: __attrs_attrs__ lists their fields in declaration order.
        names = [a.name for a in type(value).__attrs_attrs__]
        fields = {name: _encode(getattr(value, name)) for name in names}
        return {"type": type(value).__name__, "fields": fields}
    if isinstance(value, (list, tuple)):
        return [_encode(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        if not math.isfinite(float(value)):
            raise InvalidParameterError(f"cannot record a non-finite event parameter ({value})")
        return float(value)
    raise InvalidParameterError(f"cannot serialise event field of type {type(value).__name__}")


def _decode(value: Any) -> Any:
    if isinstance(value, dict):
        name = value.get("type")
        cls = getattr(_dp_event, name, None) if isinstance(name, str) else None
        if not (isinstance(cls, type) and issubclass(cls, _dp_event.DpEvent)):
            raise ValueError(f"unknown DpEvent type {name!r}")
        fields = value.get("fields")
        if not isinstance(fields, dict):
            raise ValueError(f"event {name} has no fields object")
        kwargs = {k: _decode(v) for k, v in fields.items()}
        if cls is _dp_event.ComposedDpEvent:
            kwargs["events"] = tuple(kwargs.get("events", ()))  # hashable, so ε can be cached
        return cls(**kwargs)
    if isinstance(value, list):
        return [_decode(v) for v in value]
    return value


def check_event(event: Any) -> None:
    """Refuse events that could *lower* a budget's spend or that the ledger doesn't know:
    only Gaussian mechanisms (σ > 0), Poisson sampling (0 < q ≤ 1), and their compositions with
    counts ≥ 1 may be charged."""
    if isinstance(event, dp_accounting.GaussianDpEvent):
        ok = event.noise_multiplier > 0 and math.isfinite(event.noise_multiplier)
    elif isinstance(event, dp_accounting.PoissonSampledDpEvent):
        ok = 0 < event.sampling_probability <= 1
        check_event(event.event)
    elif isinstance(event, dp_accounting.SelfComposedDpEvent):
        ok = isinstance(event.count, int) and event.count >= 1
        check_event(event.event)
    elif isinstance(event, dp_accounting.ComposedDpEvent):
        ok = bool(event.events)
        for inner in event.events:
            check_event(inner)
    else:
        ok = False
    if not ok:
        raise InvalidParameterError(
            f"the ledger only charges DP-SGD events (Gaussian σ > 0, Poisson 0 < q ≤ 1, "
            f"compositions with counts ≥ 1); refused: {event!r}"
        )


def event_to_json(event: dp_accounting.DpEvent) -> str:
    """Serialise a ``DpEvent`` to the versioned JSON form described in the module docstring."""
    if not isinstance(event, _dp_event.DpEvent):
        raise InvalidParameterError(f"expected a dp_accounting DpEvent, got {type(event).__name__}")
    doc = {"format": EVENT_FORMAT, "version": EVENT_FORMAT_VERSION, "event": _encode(event)}
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), allow_nan=False)


def event_from_json(text: str) -> dp_accounting.DpEvent:
    """Inverse of :func:`event_to_json`; raises ``ValueError`` on anything else."""
    doc = json.loads(text)
    if not isinstance(doc, dict) or doc.get("format") != EVENT_FORMAT:
        raise ValueError("not a kprivacy_nb DpEvent document")
    if doc.get("version") != EVENT_FORMAT_VERSION:
        raise ValueError(f"unsupported DpEvent format version {doc.get('version')!r}")
    return _decode(doc["event"])


# --------------------------------------------------------------------------- storage


class SQLStore(Protocol):
    """What the ledger needs from a database: transactions that run SQL with ``?`` parameters.

    ``transaction`` raises :class:`LedgerError` for any database failure (never a driver
    exception); ``for_update`` is appended to the SELECT of a budget row that a write transaction
    is about to change (a row lock, or ``""`` where the transaction already locks everything);
    ``ensure_schema`` creates or migrates the tables and refuses a database that isn't a ledger.
    """

    location: str
    timeout: float
    for_update: str

    def transaction(self, *, write: bool = False) -> contextlib.AbstractContextManager[Any]: ...

    def ensure_schema(self) -> None: ...

    def close(self) -> None: ...


class SQLiteStore:
    """An SQLite file, created 0600. ``transaction(write=True)`` is ``BEGIN IMMEDIATE``."""

    for_update = ""  # BEGIN IMMEDIATE holds the file's write lock already

    def __init__(self, path: str | os.PathLike, *, timeout: float = LOCK_TIMEOUT) -> None:
        self.path = Path(path)
        self.location = str(self.path)
        self.timeout = timeout
        if not self.path.parent.is_dir():
            raise LedgerError(f"folder {self.path.parent} for the ledger does not exist")
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
            os.close(fd)
            self._conn = sqlite3.connect(
                self.path, timeout=timeout, isolation_level=None, check_same_thread=False
            )
        except (OSError, sqlite3.Error) as exc:
            raise LedgerError(f"cannot open the ledger {self.path}: {exc}") from None

    @contextlib.contextmanager
    def transaction(self, *, write: bool = False) -> Iterator[sqlite3.Connection]:
        conn = self._conn
        try:
            conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
        except sqlite3.Error as exc:
            raise _ledger_error(self.location, exc, self.timeout) from None
        try:
            yield conn
        except BaseException as exc:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            if isinstance(exc, sqlite3.Error):
                raise _ledger_error(self.location, exc, self.timeout) from None
            raise
        try:
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            raise _ledger_error(self.location, exc, self.timeout) from None

    def ensure_schema(self) -> None:
        with self.transaction() as db:  # read-only check: no write lock to open
            if self._check_schema(db):
                return
        with self.transaction(write=True) as db:
            if self._check_schema(db):  # another process created it meanwhile
                return
            for stmt in _SCHEMA:
                db.execute(stmt)
            db.executemany(
                "INSERT INTO meta (key, value) VALUES (?, ?)",
                [("app", APP_ID), ("schema_version", str(SCHEMA_VERSION))],
            )

    def _check_schema(self, db: Any) -> set[str]:
        """The tables present (empty for a new file); LedgerError if it isn't our ledger."""
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if not tables:
            return tables
        meta: dict[str, str] = {}
        if "meta" in tables:
            meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
        if meta.get("app") != APP_ID or not {"budgets", "runs"} <= tables:
            raise LedgerError(
                f"{self.location} is not a kprivacy_nb ledger (or is damaged); it was left "
                "untouched — point KPRIVACY_NB_HOME elsewhere or move the file aside"
            )
        if meta.get("schema_version") != str(SCHEMA_VERSION):
            raise LedgerError(
                f"the ledger {self.location} has schema version {meta.get('schema_version')!r}; "
                f"this kprivacy_nb understands {SCHEMA_VERSION}. Upgrade kprivacy_nb"
            )
        return tables

    def close(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            self._conn.close()


def _ledger_error(location: str, exc: BaseException, timeout: float = LOCK_TIMEOUT) -> LedgerError:
    text = str(exc)
    if "locked" in text or "busy" in text:
        return LedgerError(
            f"the ledger {location} is locked by another process (waited {timeout:g}s); "
            "retry when the other kernel or process has finished"
        )
    if isinstance(exc, sqlite3.DatabaseError) and (
        "not a database" in text or "malformed" in text or "corrupt" in text
    ):
        return LedgerError(
            f"the ledger {location} is corrupted ({text}); it was left untouched — restore it "
            "from a backup or move it aside to start a new one"
        )
    return LedgerError(f"ledger {location}: {text}")


def _open_store(path_or_url: str | os.PathLike | None, timeout: float) -> SQLStore:
    from . import ledger_pg

    where = "Ledger(…)"
    if path_or_url is None:
        path_or_url = os.environ.get("KPRIVACY_NB_LEDGER_URL") or None
        where = "KPRIVACY_NB_LEDGER_URL"
        if path_or_url is None:
            return SQLiteStore(home_dir() / LEDGER_FILENAME, timeout=timeout)
    if ledger_pg.is_postgres_url(path_or_url):
        return ledger_pg.PostgresStore(str(path_or_url), timeout=timeout)
    if isinstance(path_or_url, str) and path_or_url.startswith("sqlite:///"):
        return SQLiteStore(path_or_url[len("sqlite:///") :], timeout=timeout)
    if isinstance(path_or_url, str) and "://" in path_or_url:
        raise LedgerError(
            f"{where}: {path_or_url.split('://')[0]}://… is not a ledger location kprivacy_nb "
            "knows; use postgresql://USER@HOST/DB, sqlite:///PATH or a file path"
        )
    if where == "KPRIVACY_NB_LEDGER_URL":
        raise LedgerError(
            "KPRIVACY_NB_LEDGER_URL must be a URL (postgresql://USER@HOST/DB or sqlite:///PATH)"
        )
    return SQLiteStore(path_or_url, timeout=timeout)


_SCHEMA = (
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    "CREATE TABLE budgets (name TEXT PRIMARY KEY, epsilon_cap REAL NOT NULL, "
    "delta REAL NOT NULL, accountant TEXT NOT NULL, created_at TEXT NOT NULL)",
    "CREATE TABLE runs (id INTEGER PRIMARY KEY AUTOINCREMENT, "
    "budget TEXT NOT NULL REFERENCES budgets(name), "
    "status TEXT NOT NULL CHECK (status IN ('reserved', 'settled', 'cancelled')), "
    "reserved_event TEXT NOT NULL, event TEXT, description TEXT NOT NULL DEFAULT '', "
    "created_at TEXT NOT NULL, settled_at TEXT, host TEXT, pid INTEGER)",
    "CREATE INDEX runs_budget ON runs (budget, status)",
)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


# --------------------------------------------------------------------------- value objects


@dataclass(frozen=True)
class RunRecord:
    """One recorded run: its event (settled) or reserved event (pending), and its own ε."""

    id: int
    budget: str
    status: str
    event: dp_accounting.DpEvent
    description: str
    created_at: str
    settled_at: str | None


@dataclass
class Budget:
    """A named budget's state. ``spent_epsilon`` composes settled runs; ``committed_epsilon``
    adds pending reservations; ``remaining_epsilon = epsilon_cap - committed_epsilon`` (≥ 0)."""

    name: str
    epsilon_cap: float
    delta: float
    spent_epsilon: float
    remaining_epsilon: float
    runs: int
    reserved: int = 0
    committed_epsilon: float = 0.0
    accountant: str = "pld"
    created_at: str = ""
    records: list[RunRecord] = field(default_factory=list, repr=False)

    @property
    def fraction_used(self) -> float:
        if self.epsilon_cap <= 0:
            return 1.0
        return min(1.0, self.committed_epsilon / self.epsilon_cap)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "epsilon_cap": self.epsilon_cap,
            "delta": self.delta,
            "spent_epsilon": self.spent_epsilon,
            "committed_epsilon": self.committed_epsilon,
            "remaining_epsilon": self.remaining_epsilon,
            "runs": self.runs,
            "reserved": self.reserved,
            "accountant": self.accountant,
        }


class LedgerTarget(NamedTuple):
    """A budget in a ledger, as :func:`resolve_ledger` returns it."""

    ledger: Ledger
    name: str

    def reserve(self, event: dp_accounting.DpEvent, **kw: Any) -> Reservation:
        return self.ledger.reserve(self.name, event, **kw)

    def budget(self) -> Budget:
        return self.ledger.budget(self.name)


class Reservation:
    """A planned spend held against a budget until :meth:`settle` or :meth:`cancel`.

    As a context manager: a clean exit settles with the last :meth:`update` (or the reserved
    event); an exception settles with the last :meth:`update` if any, else cancels.
    """

    def __init__(self, ledger: Ledger, run_id: int, name: str, event: dp_accounting.DpEvent):
        self._ledger = ledger
        self.id = run_id
        self.name = name
        self.event = event
        self.progress: dp_accounting.DpEvent | None = None
        self.status = "reserved"

    def __repr__(self) -> str:
        return f"Reservation(id={self.id}, name={self.name!r}, status={self.status!r})"

    def update(self, event: dp_accounting.DpEvent) -> None:
        """Remember the event of the steps run so far (used if the run is interrupted)."""
        self.progress = event

    def settle(self, event: dp_accounting.DpEvent | None = None) -> None:
        """Record ``event`` (default: the reserved one) as what the run actually spent."""
        final = event if event is not None else (self.progress or self.event)
        self._ledger._settle(self.id, final, reserved=self.event)
        self.status = "settled"

    def cancel(self) -> None:
        """Release the reservation: nothing was spent (no step ran)."""
        self._ledger._cancel(self.id)
        self.status = "cancelled"

    def __enter__(self) -> Reservation:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if self.status != "reserved":
            return
        if exc_type is None:
            self.settle()
        elif self.progress is not None:
            self.settle(self.progress)
        else:
            self.cancel()


# --------------------------------------------------------------------------- the ledger


def _check_name(name: object) -> str:
    if not isinstance(name, str) or not name.strip():
        raise InvalidParameterError("a budget name must be a non-empty string")
    name = name.strip()
    if len(name) > 200 or any(ord(c) < 32 for c in name):
        raise InvalidParameterError("a budget name must be ≤ 200 printable characters")
    return name


def _compose(events: Sequence[dp_accounting.DpEvent]) -> dp_accounting.DpEvent:
    if len(events) == 1:
        return events[0]
    return dp_accounting.ComposedDpEvent(tuple(events))


def _epsilon(events: Sequence[dp_accounting.DpEvent], delta: float, accountant: str) -> float:
    if not events:
        return 0.0
    return accounting.epsilon_of_event(_compose(events), delta, accountant)


class Ledger:
    """Named privacy budgets in an SQLite file (default ``home_dir()/ledger.sqlite3``) or a
    PostgreSQL database (``Ledger("postgresql://me@db.internal/privacy")``).

    ``path_or_url``: a file path, ``sqlite:///PATH`` or ``postgresql://…``; None means
    ``KPRIVACY_NB_LEDGER_URL`` if set, else the home folder. ``timeout``: seconds to wait for
    another writer's lock before raising :class:`LedgerError`.
    """

    def __init__(
        self, path_or_url: str | os.PathLike | None = None, *, timeout: float = LOCK_TIMEOUT
    ):
        self._store = _open_store(path_or_url, timeout)
        self.location = self._store.location  # a URL's password is never in it
        try:
            self._store.ensure_schema()
        except BaseException:
            self._store.close()
            raise

    def __repr__(self) -> str:
        return f"Ledger({self.location!r})"

    def close(self) -> None:
        self._store.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _run(self, func: Any, *, write: bool = False) -> Any:
        """``func(db)`` in one transaction; again (a few times) if the server aborted it as a
        conflict, in which case nothing of it was recorded."""
        for attempt in range(TRANSIENT_RETRIES):
            try:
                with self._store.transaction(write=write) as db:
                    return func(db)
            except LedgerError as exc:
                if not getattr(exc, "retry", False) or attempt == TRANSIENT_RETRIES - 1:
                    raise
                time.sleep(0.01 * 2**attempt)
        raise AssertionError("unreachable")

    # -- budgets
    def create(
        self,
        name: str,
        epsilon: float,
        delta: float,
        *,
        accountant: str = "pld",
        exist_ok: bool = False,
    ) -> Budget:
        """Create the budget ``name`` with cap ``epsilon`` at ``delta``; return it."""
        name = _check_name(name)
        eps = accounting._check_float("epsilon", epsilon)
        if eps <= 0:
            raise InvalidParameterError(f"a budget's epsilon must be > 0, got {eps}")
        delta = accounting._check_float("delta", delta)
        if not 0 < delta < 1:
            raise InvalidParameterError(f"delta must be between 0 and 1 (exclusive), got {delta}")
        accountant = accounting._check_choice("accountant", accountant, accounting.ACCOUNTANTS)

        def tx(db: Any) -> None:
            inserted = db.execute(
                "INSERT INTO budgets (name, epsilon_cap, delta, accountant, created_at) "
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT (name) DO NOTHING",
                (name, eps, delta, accountant, _now()),
            ).rowcount
            if inserted:
                return
            row = db.execute(
                "SELECT epsilon_cap, delta FROM budgets WHERE name = ?", (name,)
            ).fetchone()
            if exist_ok and tuple(row) == (eps, delta):
                return
            raise LedgerError(
                f"budget {name!r} already exists (ε={row[0]:g}, δ={row[1]:g}) in "
                f"{self.location}; pick another name or delete it first"
            )

        self._run(tx, write=True)
        return self.budget(name)

    def delete(self, name: str) -> None:
        """Delete the budget ``name`` and all its run records (irreversible)."""
        name = _check_name(name)

        def tx(db: Any) -> None:
            self._budget_row(db, name, lock=True)
            db.execute("DELETE FROM runs WHERE budget = ?", (name,))
            db.execute("DELETE FROM budgets WHERE name = ?", (name,))

        self._run(tx, write=True)

    def names(self) -> list[str]:
        return [
            r[0]
            for r in self._run(
                lambda db: db.execute("SELECT name FROM budgets ORDER BY name").fetchall()
            )
        ]

    def _budget_row(self, db: Any, name: str, *, lock: bool = False) -> tuple:
        """The budget's row; ``lock=True`` (write transactions, before reading anything they
        decide on) holds its row lock until commit, so writers of one budget take turns."""
        row = db.execute(
            "SELECT name, epsilon_cap, delta, accountant, created_at FROM budgets WHERE name = ?"
            + (self._store.for_update if lock else ""),
            (name,),
        ).fetchone()
        if row is None:
            known = [r[0] for r in db.execute("SELECT name FROM budgets ORDER BY name")]
            hint = (
                f"known budgets: {', '.join(known)}" if known else "the ledger has no budgets yet"
            )
            raise LedgerError(
                f"no budget named {name!r} in {self.location} ({hint}); create it with "
                f"%dp_ledger create {name} --epsilon 8 --delta 1e-5"
            )
        return tuple(row)

    def _records(self, db: Any, name: str, statuses: Sequence[str]) -> list[RunRecord]:
        marks = ",".join("?" for _ in statuses)
        rows = db.execute(
            "SELECT id, budget, status, reserved_event, event, description, created_at, settled_at "
            f"FROM runs WHERE budget = ? AND status IN ({marks}) ORDER BY id",
            (name, *statuses),
        ).fetchall()
        records = []
        for rid, budget, status, reserved, settled, desc, created, settled_at in rows:
            try:
                event = event_from_json(settled if status == "settled" else reserved)
            except (ValueError, TypeError, KeyError) as exc:
                raise LedgerError(
                    f"run {rid} of budget {name!r} in {self.location} has an unreadable event "
                    f"({exc}); the ledger is damaged — nothing was changed"
                ) from None
            records.append(RunRecord(rid, budget, status, event, desc, created, settled_at))
        return records

    def _state(self, db: Any, name: str, *, lock: bool = False) -> tuple[tuple, list[RunRecord]]:
        row = self._budget_row(db, name, lock=lock)  # first: the lock, then what it protects
        return row, self._records(db, name, ("settled", "reserved"))

    def _make_budget(self, row: tuple, records: list[RunRecord]) -> Budget:
        name, cap, delta, acct, created = row
        settled = [r.event for r in records if r.status == "settled"]
        everything = [r.event for r in records]
        spent = _epsilon(settled, delta, acct)
        committed = _epsilon(everything, delta, acct)
        return Budget(
            name=name,
            epsilon_cap=cap,
            delta=delta,
            spent_epsilon=spent,
            remaining_epsilon=max(0.0, cap - committed),
            runs=len(settled),
            reserved=len(everything) - len(settled),
            committed_epsilon=committed,
            accountant=acct,
            created_at=created,
            records=records,
        )

    def budget(self, name: str) -> Budget:
        """The budget ``name`` with its spent/remaining ε (LedgerError if unknown)."""
        name = _check_name(name)
        row, records = self._run(lambda db: self._state(db, name))
        return self._make_budget(row, records)

    def budgets(self) -> list[Budget]:
        """Every budget, by name."""

        def tx(db: Any) -> list[tuple[tuple, list[RunRecord]]]:
            names = [r[0] for r in db.execute("SELECT name FROM budgets ORDER BY name")]
            return [self._state(db, n) for n in names]

        return [self._make_budget(row, recs) for row, recs in self._run(tx)]

    def runs(self, name: str, *, include_cancelled: bool = False) -> list[RunRecord]:
        """The runs recorded against ``name``, oldest first."""
        name = _check_name(name)
        statuses = (
            ("settled", "reserved", "cancelled") if include_cancelled else ("settled", "reserved")
        )

        def tx(db: Any) -> list[RunRecord]:
            self._budget_row(db, name)
            return self._records(db, name, statuses)

        return self._run(tx)

    def cumulative_epsilon(self, name: str) -> list[tuple[RunRecord, float]]:
        """Each settled/reserved run with the composed ε of all runs up to and including it."""
        b = self.budget(name)
        out = []
        for i, rec in enumerate(b.records):
            out.append(
                (rec, _epsilon([r.event for r in b.records[: i + 1]], b.delta, b.accountant))
            )
        return out

    # -- spending
    def reserve(
        self,
        name: str,
        event: dp_accounting.DpEvent,
        *,
        description: str = "",
        accountant: str | None = None,
    ) -> Reservation:
        """Reserve ``event`` against ``name`` if the composition stays within the cap.

        Check and insert happen in one transaction holding the budget's lock (``BEGIN
        IMMEDIATE`` in SQLite, the budget row's ``FOR UPDATE`` in PostgreSQL). Raises
        :class:`BudgetExceededError` (saying what is left and what would fit) otherwise.
        The check always uses the budget's own accountant (``accountant``, if given, must be a
        known name but does not change how the budget is counted).
        """
        name = _check_name(name)
        check_event(event)
        payload = event_to_json(event)
        # Warm the ε cache outside the write lock, so the locked section is usually a cache hit.
        with contextlib.suppress(LedgerError):
            row, records = self._run(lambda db: self._state(db, name))
            acct = self._accountant(row, accountant)
            _epsilon([r.event for r in records] + [event], row[2], acct)

        def tx(db: Any) -> tuple[int | None, dict[str, Any]]:
            row, records = self._state(db, name, lock=True)
            acct = self._accountant(row, accountant)
            cap, delta = row[1], row[2]
            existing = [r.event for r in records]
            after = _epsilon(existing + [event], delta, acct)
            if after > cap:
                before = _epsilon(existing, delta, acct)
                return None, {"cap": cap, "delta": delta, "before": before, "after": after,
                              "existing": existing, "accountant": acct}  # fmt: skip
            (run_id,) = db.execute(
                "INSERT INTO runs (budget, status, reserved_event, description, created_at, host, "
                "pid) VALUES (?, 'reserved', ?, ?, ?, ?, ?) RETURNING id",
                (name, payload, description or "", _now(), socket.gethostname(), os.getpid()),
            ).fetchone()
            return run_id, {}

        run_id, info = self._run(tx, write=True)
        if run_id is None:
            raise BudgetExceededError(self._refusal(name, event, **info))
        return Reservation(self, int(run_id), name, event)

    @staticmethod
    def _accountant(row: tuple, accountant: str | None) -> str:
        if accountant is not None:
            accounting._check_choice("accountant", accountant, accounting.ACCOUNTANTS)
        return row[3]  # a budget is always counted under its own accountant

    def _refusal(
        self,
        name: str,
        event: dp_accounting.DpEvent,
        *,
        cap: float,
        delta: float,
        before: float,
        after: float,
        existing: list,
        accountant: str,
    ) -> str:
        left = max(0.0, cap - before)
        msg = (
            f"budget {name!r} has ε={left:.4g} left of {cap:g} (spent ε={before:.4g} at "
            f"δ={delta:g}); this run would bring it to ε={after:.4g}, so it was refused before "
            "starting."
        )
        hint = _what_fits(event, existing, cap, delta, accountant) if left > 0 else None
        return msg + (f" {hint}" if hint else " Create a new budget or use less data.")

    def _lock_reserved(self, db: Any, run_id: int) -> tuple[str, str]:
        """Lock the budget of pending run ``run_id``; return (budget name, reserved event JSON).
        LedgerError if the run is unknown or no longer pending (read after taking the lock)."""
        row = db.execute("SELECT budget FROM runs WHERE id = ?", (run_id,)).fetchone()
        if row is None:
            raise LedgerError(f"run {run_id} is not in the ledger {self.location}")
        self._budget_row(db, row[0], lock=True)
        status, booked = db.execute(
            "SELECT status, reserved_event FROM runs WHERE id = ?", (run_id,)
        ).fetchone()
        if status != "reserved":
            raise LedgerError(f"run {run_id} is already {status}")
        return row[0], booked

    def _settle(self, run_id: int, event: dp_accounting.DpEvent, *, reserved: Any) -> None:
        """Record what a run spent. Anything other than the reserved event passes the same cap
        check as a new reservation, in the same transaction; a run that would overspend stays
        pending (charged as reserved) and :class:`BudgetExceededError` says so."""
        check_event(event)
        payload = event_to_json(event)

        def tx(db: Any) -> dict[str, Any] | None:
            name, booked = self._lock_reserved(db, run_id)
            note = ""
            if event != event_from_json(booked):
                row, records = self._state(db, name)
                others = [r.event for r in records if r.id != run_id]
                after = _epsilon(others + [event], row[2], row[3])
                if after > row[1]:
                    return {"name": name, "cap": row[1], "after": after, "delta": row[2]}
                note = ran_note(event, event_from_json(booked))
            db.execute(
                "UPDATE runs SET status = 'settled', event = ?, settled_at = ?, "
                "description = description || ? WHERE id = ?",
                (payload, _now(), note, run_id),
            )
            return None

        refused = self._run(tx, write=True)
        if refused is not None:
            raise BudgetExceededError(
                f"run {run_id} reports more than it reserved: settling it would bring budget "
                f"{refused['name']!r} to ε={refused['after']:.4g} > cap {refused['cap']:g} "
                f"(δ={refused['delta']:g}). Nothing was recorded; the run stays pending and is "
                "charged as reserved. Settle it with what was reserved (%dp_ledger settle) after "
                "checking what ran"
            )

    def _cancel(self, run_id: int) -> None:
        def tx(db: Any) -> None:
            self._lock_reserved(db, run_id)
            db.execute(
                "UPDATE runs SET status = 'cancelled', settled_at = ? WHERE id = ?",
                (_now(), run_id),
            )

        self._run(tx, write=True)

    def settle(self, run_id: int, event: dp_accounting.DpEvent) -> None:
        """Settle a pending reservation by id (e.g. one left by a crashed kernel)."""
        self._settle(int(run_id), event, reserved=None)

    def cancel(self, run_id: int) -> None:
        """Cancel a pending reservation by id (only if you know no step of it ran)."""
        self._cancel(int(run_id))


def ran_note(event: Any, planned: Any) -> str:
    """What a run settled with less (or other) than it reserved actually ran, for its
    description: ``" — stopped: ran 37 of 120 planned steps"`` (epochs for shuffled
    sampling, where each epoch is one release)."""
    if (
        isinstance(event, dp_accounting.SelfComposedDpEvent)
        and isinstance(planned, dp_accounting.SelfComposedDpEvent)
        and event.event == planned.event
    ):
        unit = "steps" if isinstance(event.event, dp_accounting.PoissonSampledDpEvent) else "epochs"
        if event.count < planned.count:
            return f" — stopped early: ran {event.count} of {planned.count} planned {unit}"
        return f" — ran {event.count} {unit} ({planned.count} planned)"
    return " — settled with a different event than reserved"


def _dpsgd_parts(event: Any) -> tuple[float, float, int] | None:
    """(q, σ, steps) of a Poisson DP-SGD event, or None for anything else."""
    if (
        isinstance(event, dp_accounting.SelfComposedDpEvent)
        and isinstance(event.event, dp_accounting.PoissonSampledDpEvent)
        and isinstance(event.event.event, dp_accounting.GaussianDpEvent)
    ):
        return event.event.sampling_probability, event.event.event.noise_multiplier, event.count
    return None


HINT_GRID = 1e-2  # PLD value discretization for the "what would fit" hints


def _what_fits(event: Any, existing: list, cap: float, delta: float, accountant: str) -> str | None:
    """Suggest a σ (same steps) and a number of epochs (same σ) that would fit the budget.

    Both come from ``calibrate_dp_mechanism`` on the composition of the recorded runs plus the
    modified run, under the budget's accountant on a coarse grid: conservative (σ to within 1%).
    """
    parts = _dpsgd_parts(event)
    if parts is None:
        return None
    q, sigma, steps = parts
    spe = max(1, round(1 / q))  # steps per epoch, as accounting.steps_per_epoch counts them

    def make(s: float, k: int) -> Any:
        run = dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(s)), k
        )
        return _compose([*existing, run])

    def calibrate(make_event: Any, **kw: Any) -> Any:
        # A coarse PLD grid is pessimistic (an upper bound on ε), so what it says fits does fit;
        # it answers in well under a second where the default grid takes many.
        return dp_accounting.calibrate_dp_mechanism(
            lambda: accounting.make_accountant(accountant, value_discretization_interval=HINT_GRID),
            make_event,
            cap,
            delta,
            **kw,
        )

    hints = []
    with contextlib.suppress(Exception):
        base = max(sigma, 1e-2)
        s = calibrate(
            lambda x: make(x, steps),
            bracket_interval=dp_accounting.LowerEndpointAndGuess(base, 2 * base),
            tol=0.01 * base,
        )
        hints.append(f"σ ≥ {s:.3f} for the same {steps} steps")
    epochs = steps // spe
    with contextlib.suppress(Exception):
        if epochs >= 2 and _epsilon([make(sigma, spe)], delta, accountant) <= cap:
            k = calibrate(
                lambda x: make(sigma, max(1, int(x)) * spe),
                bracket_interval=dp_accounting.ExplicitBracketInterval(1, epochs),
                discrete=True,
            )
            unit = "epoch" if int(k) == 1 else "epochs"
            hints.append(f"at most {int(k)} {unit} ({int(k) * spe} steps) at σ={sigma:g}")
    return ("Would fit: " + "; or ".join(hints) + ".") if hints else None


def resolve_ledger(
    ledger: str | tuple[str, Ledger] | tuple[Ledger, str] | LedgerTarget | None,
) -> LedgerTarget | None:
    """Turn ``dp_fit(ledger=…)`` into a :class:`LedgerTarget` ``(ledger, name)``, or None.

    A string is a budget name in the default :class:`Ledger`; a ``(name, Ledger)`` (or
    ``(Ledger, name)``) pair picks another ledger. Unknown budgets raise :class:`LedgerError`.
    """
    if ledger is None:
        return None
    if isinstance(ledger, LedgerTarget):
        target = ledger
    elif isinstance(ledger, str):
        target = LedgerTarget(Ledger(), _check_name(ledger))
    elif isinstance(ledger, tuple) and len(ledger) == 2:
        a, b = ledger
        if isinstance(a, str) and isinstance(b, Ledger):
            target = LedgerTarget(b, _check_name(a))
        elif isinstance(a, Ledger) and isinstance(b, str):
            target = LedgerTarget(a, _check_name(b))
        else:
            raise InvalidParameterError("ledger must be a budget name or a (name, Ledger) pair")
    else:
        raise InvalidParameterError(
            f"ledger must be a budget name or a (name, Ledger) pair, got {type(ledger).__name__}"
        )
    target.ledger.budget(target.name)  # raises LedgerError if unknown
    return target
