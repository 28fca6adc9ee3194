"""The ledger's PostgreSQL store (psycopg 3): one set of budgets shared by a team.

Selected by a ``postgresql://`` (or ``postgres://``) URL — ``KPRIVACY_NB_LEDGER_URL``,
``Ledger(url)`` or ``%dp_ledger --url``. Any libpq URL works, including a Unix socket
(``postgresql://me@/db?host=/run/postgresql``) and ``sslmode=verify-full``; a password is best
left to libpq (``PGPASSWORD``, ``~/.pgpass``), and one written in the URL is never shown
(:func:`redact_url` in every message and ``repr``).

Concurrency: every write transaction runs at READ COMMITTED and first locks the row of the
budget it changes (``SELECT … FOR UPDATE``, the ledger's ``for_update`` hook), so the check
"does this still fit the cap?" and the insert of the reservation happen while no other writer
of that budget can commit; budgets don't block each other. Reads are REPEATABLE READ snapshots.
A lock held by a process that dies is released by the server when its connection drops.

Schema: tables live in the schema ``kprivacy_nb``; ``kprivacy_nb.schema_version`` lists the
migrations applied. Opening a ledger applies missing ones in one transaction under an advisory
lock (many kernels may start at once); a database newer than this code is refused.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

from .. import secrets
from ..errors import LedgerError

SCHEMA = "kprivacy_nb"
CONNECT_TIMEOUT = 10  # seconds
ADVISORY_LOCK = 0x6B70_6C65_6467  # "kpledg": serialises migrations across processes
URL_SCHEMES = ("postgresql://", "postgres://")


@dataclass(frozen=True)
class Migration:
    """One step of the PostgreSQL schema; applied once, in order, recorded in schema_version."""

    version: int
    description: str
    statements: tuple[str, ...]


MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "budgets and runs",
        (
            f"CREATE TABLE {SCHEMA}.budgets (name TEXT PRIMARY KEY, "
            "epsilon_cap DOUBLE PRECISION NOT NULL, delta DOUBLE PRECISION NOT NULL, "
            "accountant TEXT NOT NULL, created_at TEXT NOT NULL)",
            f"CREATE TABLE {SCHEMA}.runs (id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY, "
            f"budget TEXT NOT NULL REFERENCES {SCHEMA}.budgets(name), "
            "status TEXT NOT NULL CHECK (status IN ('reserved', 'settled', 'cancelled')), "
            "reserved_event TEXT NOT NULL, event TEXT, description TEXT NOT NULL DEFAULT '', "
            "created_at TEXT NOT NULL, settled_at TEXT, host TEXT, pid INTEGER)",
            f"CREATE INDEX runs_budget ON {SCHEMA}.runs (budget, status)",
        ),
    ),
)


# ------------------------------------------------------------------------------ URLs


def is_postgres_url(value: object) -> bool:
    return isinstance(value, str) and value.startswith(URL_SCHEMES)


def url_password(url: str) -> str | None:
    """The password written in ``url`` (user:password@ or ?password=), if any."""
    parts = urlsplit(url)
    with contextlib.suppress(ValueError):
        if parts.password:
            return unquote(parts.password)
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if key == "password" and value:
            return value
    return None


def redact_url(url: str) -> str:
    """``url`` with any password replaced by ``***`` (the user, host and database stay)."""
    try:
        parts = urlsplit(url)
        netloc = parts.netloc
        if "@" in netloc:
            userinfo, host = netloc.rsplit("@", 1)
            if ":" in userinfo:
                netloc = f"{userinfo.split(':', 1)[0]}:{secrets.MASK}@{host}"
        query = parts.query
        if query:
            pairs = parse_qsl(query, keep_blank_values=True)
            pairs = [(k, secrets.MASK if k == "password" else v) for k, v in pairs]
            query = urlencode(pairs, safe="/*:,")
        return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
    except ValueError:
        return f"{url.split('://', 1)[0]}://{secrets.MASK}"


def _one_line(exc: BaseException, password: str | None) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    if password:
        text = text.replace(password, secrets.MASK)
    return secrets.redact(text)[:400]


# --------------------------------------------------------------------------- the store


@functools.lru_cache(maxsize=256)
def _pg_sql(sql: str) -> str:
    """The ledger's SQL uses ``?`` parameters (sqlite3's style); psycopg wants ``%s``."""
    return sql.replace("%", "%%").replace("?", "%s")


class _Connection:
    """What the ledger's SQL runs on: ``execute``/``executemany`` with ``?`` parameters."""

    def __init__(self, conn: Any) -> None:
        self._conn = conn

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Any:
        return self._conn.execute(_pg_sql(sql), params)

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> Any:
        cur = self._conn.cursor()
        cur.executemany(_pg_sql(sql), rows)
        return cur


class TransientLedgerError(LedgerError):
    """A conflict the server resolved by aborting this transaction (deadlock, serialization):
    nothing was recorded and running the transaction again is safe."""

    retry = True


class PostgresStore:
    """A PostgreSQL database as the ledger's store. ``transaction(write=True)`` is READ COMMITTED
    with ``lock_timeout``; writers lock their budget row through :attr:`for_update`."""

    for_update = " FOR UPDATE"

    def __init__(self, url: str, *, timeout: float) -> None:
        self._url = url
        self._password = url_password(url)
        secrets.register_secret(self._password)  # masked if anything ever prints it
        self.location = redact_url(url)
        self.timeout = timeout
        try:
            import psycopg
        except ImportError:
            raise LedgerError(
                f"the ledger {self.location} is on PostgreSQL, which needs psycopg 3: "
                "pip install 'kprivacy-nb[postgres]' (or psycopg[binary])"
            ) from None
        self._psycopg = psycopg
        self._conn: Any = None
        self._connection()

    def __repr__(self) -> str:
        return f"PostgresStore({self.location!r})"

    def _connection(self) -> Any:
        conn = self._conn
        if conn is not None and not conn.closed and not conn.broken:
            return conn
        try:
            self._conn = self._psycopg.connect(
                self._url,
                autocommit=True,  # transactions are explicit BEGIN … COMMIT (one round trip)
                connect_timeout=CONNECT_TIMEOUT,
                application_name="kprivacy_nb-ledger",
            )
        except self._psycopg.Error as exc:
            raise LedgerError(
                f"cannot connect to the ledger {self.location}: {_one_line(exc, self._password)}"
                " — check that the server is up, the host/port/database in the URL, and the "
                "credentials (PGPASSWORD or ~/.pgpass)"
            ) from None
        return self._conn

    @contextlib.contextmanager
    def transaction(self, *, write: bool = False) -> Iterator[_Connection]:
        mode = "READ COMMITTED" if write else "REPEATABLE READ READ ONLY"
        wait_ms = max(1, math.ceil(self.timeout * 1000))
        begin = (
            f"BEGIN ISOLATION LEVEL {mode}; SET LOCAL search_path TO {SCHEMA}; "
            f"SET LOCAL lock_timeout = {wait_ms}"
        )
        for attempt in (1, 2):
            conn = self._connection()
            try:
                conn.execute(begin)
                break
            except self._psycopg.Error as exc:
                # An idle connection the server (or a failover, an idle timeout) closed since
                # the last call: nothing was sent yet, so connect again once.
                if attempt == 1 and (conn.broken or conn.closed):
                    continue
                raise self._error(exc) from None
        try:
            yield _Connection(conn)
        except BaseException as exc:
            with contextlib.suppress(self._psycopg.Error):
                conn.execute("ROLLBACK")
            if isinstance(exc, self._psycopg.Error):
                raise self._error(exc) from None
            raise
        try:
            conn.execute("COMMIT")
        except self._psycopg.Error as exc:
            raise self._error(exc, committing=True) from None

    def _error(self, exc: BaseException, *, committing: bool = False) -> LedgerError:
        errors = self._psycopg.errors
        text = _one_line(exc, self._password)
        if isinstance(exc, errors.LockNotAvailable):
            return LedgerError(
                f"the ledger {self.location} is locked by another process (waited "
                f"{self.timeout:g}s); retry when the other kernel or process has finished"
            )
        if isinstance(exc, (errors.SerializationFailure, errors.DeadlockDetected)):
            return TransientLedgerError(f"ledger {self.location}: {text}")
        if isinstance(exc, errors.InsufficientPrivilege):
            return LedgerError(
                f"the ledger {self.location} refused this ({text}): the database role lacks a "
                "privilege it needs. Team members' roles charge runs; creating or deleting "
                "budgets and creating or upgrading the schema take the ledger owner's role "
                "(docs/scale.md, team ledger)"
            )
        if isinstance(exc, self._psycopg.OperationalError) or getattr(self._conn, "broken", 0):
            outcome = (
                "the last change may or may not have been recorded: check with %dp_ledger show"
                if committing
                else "nothing was recorded"
            )
            return LedgerError(
                f"lost the connection to the ledger {self.location} ({text}); {outcome}. "
                "The next call reconnects"
            )
        return LedgerError(f"ledger {self.location}: {text}")

    # -- schema
    def ensure_schema(self) -> None:
        """Apply the migrations this database lacks; refuse one newer than this code."""
        latest = MIGRATIONS[-1].version
        with self.transaction() as db:
            current = self._version(db)
        if current == latest:
            return
        with self.transaction(write=True) as db:
            db.execute("SELECT pg_advisory_xact_lock(?)", (ADVISORY_LOCK,))
            if not db.execute("SELECT 1 FROM pg_namespace WHERE nspname = ?", (SCHEMA,)).fetchone():
                db.execute(f"CREATE SCHEMA {SCHEMA}")
            current = self._version(db)
            if current is None:
                db.execute(
                    f"CREATE TABLE {SCHEMA}.schema_version (version INTEGER PRIMARY KEY, "
                    "description TEXT NOT NULL, applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"
                )
                current = 0
            for step in MIGRATIONS:
                if step.version > current:
                    for statement in step.statements:
                        db.execute(statement)
                    db.execute(
                        f"INSERT INTO {SCHEMA}.schema_version (version, description) VALUES (?, ?)",
                        (step.version, step.description),
                    )

    def _version(self, db: _Connection) -> int | None:
        """The schema version applied (None: no ledger here yet); LedgerError if the schema
        ``kprivacy_nb`` holds something else, or a newer ledger."""
        tables = {
            r[0]
            for r in db.execute(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = ?",
                (SCHEMA,),
            )
        }
        if not tables:
            return None
        if "schema_version" not in tables:
            raise LedgerError(
                f"schema {SCHEMA} in {self.location} is not a kprivacy_nb ledger (no "
                "schema_version table); it was left untouched — use another database"
            )
        version = db.execute(f"SELECT max(version) FROM {SCHEMA}.schema_version").fetchone()[0]
        version = version or 0
        latest = MIGRATIONS[-1].version
        if version > latest:
            raise LedgerError(
                f"the ledger {self.location} has schema version {version}; this kprivacy_nb "
                f"understands up to {latest}. Upgrade kprivacy_nb"
            )
        if version and not {"budgets", "runs"} <= tables:
            raise LedgerError(
                f"the ledger {self.location} is damaged (tables missing from schema {SCHEMA}); "
                "it was left untouched"
            )
        return version

    def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.close()
            self._conn = None
