"""A throwaway PostgreSQL cluster in a temp folder, on a Unix socket only (no TCP).

For the ledger's tests, its benchmark and demos of a team ledger on one machine — never for real
budgets: :meth:`LocalPostgres.stop` deletes it. PostgreSQL refuses to run as root, so as root
the cluster runs as the unprivileged user ``nobody`` in a folder that user owns.

>>> with LocalPostgres() as pg:                       # doctest: +SKIP
...     ledger = Ledger(pg.url())
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from ..errors import LedgerError

SUPERUSER = "kp"
PORT = 5432  # only names the socket file (.s.PGSQL.5432): nothing listens on TCP
UNPRIVILEGED = "nobody"


def find_bindir() -> Path | None:
    """The folder holding ``initdb`` and ``pg_ctl``: ``$KPRIVACY_NB_PG_BINDIR``, the ``PATH``, or
    Debian's ``/usr/lib/postgresql/<version>/bin`` (the newest version)."""
    env = os.environ.get("KPRIVACY_NB_PG_BINDIR")
    if env:
        return Path(env) if (Path(env) / "initdb").is_file() else None
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent

    def version(p: Path) -> tuple[int, ...]:
        return tuple(int(x) for x in re.findall(r"\d+", p.parent.parent.name)) or (0,)

    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=version)
    return candidates[-1].parent if candidates else None


class LocalPostgres:
    """Start with :meth:`start` (or ``with``); :meth:`url` names a database on it."""

    def __init__(self, bindir: str | os.PathLike | None = None, *, fsync: bool = False) -> None:
        found = Path(bindir) if bindir else find_bindir()
        if found is None or not (found / "initdb").is_file():
            raise LedgerError(
                "PostgreSQL's initdb/pg_ctl were not found (Debian: apt-get install postgresql; "
                "or set KPRIVACY_NB_PG_BINDIR to the folder holding them)"
            )
        self.bindir = found
        self.fsync = fsync
        self.root: Path | None = None
        self._ids: dict[str, Any] = {}
        if os.geteuid() == 0:
            import pwd

            entry = pwd.getpwnam(UNPRIVILEGED)
            self._ids = {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}

    @property
    def data(self) -> Path:
        assert self.root is not None, "start() the cluster first"
        return self.root / "data"

    @property
    def socket_dir(self) -> str:
        assert self.root is not None, "start() the cluster first"
        return str(self.root)

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            [str(self.bindir / args[0]), *args[1:]],
            cwd=self.root,
            capture_output=True,
            text=True,
            timeout=120,
            **self._ids,
        )
        if check and proc.returncode != 0:
            log = self.root / "server.log" if self.root else None
            tail = log.read_text()[-800:] if log and log.is_file() else ""
            raise LedgerError(
                f"{args[0]} failed ({proc.returncode}): {(proc.stderr or proc.stdout)[-800:]} {tail}"
            )
        return proc

    def start(self) -> LocalPostgres:
        base = "/tmp" if os.access("/tmp", os.W_OK) else None  # short: socket paths are ≤ 107 bytes
        self.root = Path(tempfile.mkdtemp(prefix="kp-pg-", dir=base))
        if self._ids:
            os.chown(self.root, self._ids["user"], self._ids["group"])
        try:
            self._run("initdb", "-D", str(self.data), "-U", SUPERUSER, "--auth=trust",
                      "-E", "UTF8", "--locale=C", "--no-sync")  # fmt: skip
            with open(self.data / "postgresql.conf", "a") as conf:
                conf.write(
                    "\nlisten_addresses = ''\n"
                    f"unix_socket_directories = '{self.root}'\n"
                    f"port = {PORT}\n"
                    f"fsync = {'on' if self.fsync else 'off'}\n"
                    f"synchronous_commit = {'on' if self.fsync else 'off'}\n"
                    "max_connections = 200\n"
                )
            self._write_hba([])
            self._run("pg_ctl", "-D", str(self.data), "-l", str(self.root / "server.log"),
                      "-w", "-t", "60", "start")  # fmt: skip
        except BaseException:
            self.stop()
            raise
        return self

    def _write_hba(self, password_roles: list[str]) -> None:
        lines = [f"local all {role} scram-sha-256" for role in password_roles]
        (self.data / "pg_hba.conf").write_text("\n".join([*lines, "local all all trust", ""]))

    def require_password(self, *roles: str) -> None:
        """Make ``roles`` log in with a password (SCRAM) from now on; others stay trusted."""
        self._write_hba(list(roles))
        self._run("pg_ctl", "-D", str(self.data), "reload")
        time.sleep(0.2)  # the postmaster rereads pg_hba.conf asynchronously

    def url(self, dbname: str = "postgres", user: str = SUPERUSER, password: str = "") -> str:
        """A ``postgresql://`` URL for ``dbname`` over the cluster's Unix socket."""
        auth = f"{user}:{password}" if password else user
        return f"postgresql://{auth}@/{dbname}?host={self.socket_dir}&port={PORT}"

    def execute(self, sql: str, dbname: str = "postgres") -> list[tuple]:
        """Run ``sql`` as the superuser (autocommit) and return its rows, if any."""
        import psycopg

        with psycopg.connect(self.url(dbname), autocommit=True) as conn:
            cur = conn.execute(sql)
            return cur.fetchall() if cur.description else []

    def create_database(self, name: str) -> str:
        """Create an empty database ``name``; return its URL."""
        self.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self) -> None:
        """Stop the server (fast shutdown) and delete the cluster's folder."""
        if self.root is None:
            return
        if (self.data / "postmaster.pid").exists():
            self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop", check=False)
        with contextlib.suppress(OSError):
            shutil.rmtree(self.root)
        self.root = None

    def __enter__(self) -> LocalPostgres:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
