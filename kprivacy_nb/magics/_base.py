"""Shared plumbing for every magic: errors → UsageError, secret-line refusal, history scrubbing."""

from __future__ import annotations

import contextlib
import functools
import shlex
import sqlite3
from collections.abc import Callable
from typing import Any

from IPython.core.error import UsageError

from .. import secrets
from ..errors import KPrivacyError, SecretOnLineError

REDACTED_INPUT = "# [kprivacy_nb] input removed: it contained a secret"


class PlainText(str):
    """A string that displays as itself (no quotes) — for reports returned by magics."""

    def __repr__(self) -> str:
        return str(self)


def scrub_history(shell: Any, needle: str | None = None) -> int:
    """Remove every input that contains ``needle`` (or looks like a secret) from IPython's history.

    Covers ``In``/``_ih``, ``_i``/``_ii``/``_iii``/``_iN``, the raw/parsed caches, the pending DB
    write cache and the rows already in the history database. Returns how many places changed.
    """
    hm = getattr(shell, "history_manager", None)
    if hm is None:
        return 0
    changed = 0

    def bad(text: Any) -> bool:
        if not isinstance(text, str):
            return False
        if needle and (needle in text or repr(needle)[1:-1] in text):
            return True
        return secrets.find_secret(text) is not None

    for hist in (hm.input_hist_parsed, hm.input_hist_raw):
        for i, text in enumerate(hist):
            if bad(text):
                hist[i] = REDACTED_INPUT
                changed += 1
    ns = shell.user_ns
    for key in list(ns):
        if (key in ("_i", "_ii", "_iii") or key.startswith("_i")) and bad(ns.get(key)):
            ns[key] = REDACTED_INPUT
            changed += 1
    lock = getattr(hm, "db_input_cache_lock", contextlib.nullcontext())
    with lock:
        cache = getattr(hm, "db_input_cache", [])
        for i, row in enumerate(cache):
            if any(bad(part) for part in row[1:]):
                cache[i] = (row[0], REDACTED_INPUT, REDACTED_INPUT)
                changed += 1
    db = getattr(hm, "db", None)
    session = getattr(hm, "session_number", None)
    if db is not None and session is not None:
        with contextlib.suppress(sqlite3.Error, AttributeError):
            rows = db.execute(
                "SELECT line, source, source_raw FROM history WHERE session = ?", (session,)
            ).fetchall()
            for line, source, raw in rows:
                if bad(source) or bad(raw):
                    db.execute(
                        "UPDATE history SET source = ?, source_raw = ? WHERE session = ? AND line = ?",
                        (REDACTED_INPUT, REDACTED_INPUT, session, line),
                    )
                    changed += 1
            db.commit()
    return changed


def refuse_secret_line(shell: Any, line: str, cell: str | None = None) -> None:
    """Refuse a magic line (or cell header) that carries a secret, scrubbing it from history."""
    why = secrets.find_secret(line)
    if why is None:
        return
    if shell is not None:
        scrub_history(shell, line)
        # The history DB writer may flush after this magic returns: scrub again after the cell.
        events = shell.events

        def _later(*_a: Any) -> None:
            scrub_history(shell, line)
            with contextlib.suppress(ValueError):
                events.unregister("post_run_cell", _later)

        events.register("post_run_cell", _later)
    try:
        secrets.check_line(line)
    except SecretOnLineError as exc:
        raise UsageError(str(exc)) from None


def user_errors(func: Callable[..., Any]) -> Callable[..., Any]:
    """Decorate a magic: refuse secret lines; turn kprivacy_nb errors into a one-line UsageError."""

    @functools.wraps(func)
    def wrapper(self: Any, line: str = "", cell: str | None = None, *args: Any, **kw: Any) -> Any:
        refuse_secret_line(getattr(self, "shell", None), line)
        try:
            if cell is None:
                return func(self, line, *args, **kw)
            return func(self, line, cell, *args, **kw)
        except KPrivacyError as exc:
            raise UsageError(secrets.redact(str(exc))) from None

    return wrapper


def passphrase_from_args(args: Any, *, confirm: bool = False) -> Any:
    """The passphrase a magic's ``--passphrase`` (prompt) / ``--passphrase-env VAR`` asked for,
    or ``None`` when neither was given."""
    if getattr(args, "passphrase_env", None) or getattr(args, "passphrase", False):
        return secrets.resolve_passphrase(args.passphrase_env, confirm=confirm)
    return None


def split_line(line: str) -> list[str]:
    """Split a magic line like a shell would, with a clear error on bad quoting."""
    try:
        return shlex.split(line)
    except ValueError as exc:
        raise UsageError(f"cannot parse the line: {exc}") from None


def lookup(shell: Any, name: str) -> Any:
    """Look ``name`` up in the user namespace (dotted attributes allowed), or raise UsageError."""
    head, *rest = name.split(".")
    if head not in shell.user_ns:
        raise UsageError(f"no variable named {head!r} in the notebook namespace")
    obj = shell.user_ns[head]
    for attr in rest:
        try:
            obj = getattr(obj, attr)
        except AttributeError:
            raise UsageError(f"{name!r}: {type(obj).__name__} has no attribute {attr!r}") from None
    return obj
