"""Shared plumbing for every magic: errors → UsageError, secret-line refusal, history scrubbing."""

from __future__ import annotations

import contextlib
import functools
import re
import shlex
import sqlite3
from collections.abc import Callable
from typing import Any

from IPython.core.error import UsageError

from .. import secrets
from ..errors import KPrivacyError, MissingEnvVarError, SecretOnLineError

REDACTED_INPUT = "# [kprivacy_nb] input removed: it contained a secret"


class Refused(UsageError):
    """A magic line refused because it may hold a secret. ``replaced``: the cell's text is being
    replaced by a redacted copy (:func:`replace_cell_text`)."""

    def __init__(self, message: str, replaced: bool) -> None:
        super().__init__(_with_note(message, replaced))
        self.replaced = replaced


def report_refusal(exc: Refused) -> None:
    """Show a refusal as IPython shows a UsageError, without failing the cell.

    Jupyter frontends apply ``set_next_input(replace=True)`` only from a reply whose status is
    "ok" (JupyterLab's cell executor reads the payload of an ok reply alone), so a refusal that
    asked for the cell's text to be replaced must not raise, or the secret would stay in the
    cell and in the saved notebook. Nothing of the refused line ran."""
    import sys

    print(f"UsageError: {exc}", file=sys.stderr, flush=True)


class PlainText(str):
    """A string that displays as itself (no quotes) — for reports returned by magics."""

    def __repr__(self) -> str:
        return str(self)


def scrub_history(shell: Any, needle: str | None = None, *, magic: str | None = None) -> int:
    """Remove every input that contains ``needle`` (or looks like a secret) from IPython's history;
    with ``magic``, only inputs that also name that magic count as containing ``needle``.

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
            if magic is None or magic in text:
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
    # The history manager keeps its own _i/_ii/_iii/_i00 and copies them back into the
    # namespace on the next cell: scrub those too, or the secret line comes back.
    for attr in ("_i00", "_i", "_ii", "_iii"):
        if bad(getattr(hm, attr, None)):
            setattr(hm, attr, REDACTED_INPUT)
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


REPLACED_NOTE = "the cell's text was replaced by a copy without that line"


def redacted_cell(cell: str, line: str) -> str | None:
    """``cell`` with every source line that holds ``line`` replaced by a note naming only the
    magic (``None`` when ``line`` is not in it)."""
    needle = line.strip()
    if not needle or needle not in cell:
        return None
    out = []
    for source in cell.splitlines():
        if needle in source:
            word = source.strip().split()[0] if source.strip().startswith("%") else ""
            magic = word if re.fullmatch(r"%%?\w+", word) else "this line"
            source = f"# {magic} … — removed by kprivacy_nb: it held a secret"
        out.append(source)
    return "\n".join(out)


def replace_cell_text(shell: Any, line: str) -> bool:
    """In a Jupyter kernel, replace the running cell's text by :func:`redacted_cell`
    (``set_next_input(..., replace=True)``: the frontend rewrites the cell, so the secret does
    not stay in the notebook). Returns whether it asked for that."""
    hm = getattr(shell, "history_manager", None)
    if getattr(shell, "kernel", None) is None or hm is None or not hm.input_hist_raw:
        return False
    text = redacted_cell(hm.input_hist_raw[-1], line)
    if text is None:
        return False
    shell.set_next_input(text, replace=True)
    return True


def scrub_line(shell: Any, line: str, *, magic: str | None = None) -> bool:
    """Remove ``line`` (of ``magic``, if given) from the history now, and again after the cell
    (the history DB writer may flush after this magic returns); in Jupyter, also from the
    cell's own text. Returns whether the cell's text is being replaced."""
    if shell is None:
        return False
    replaced = replace_cell_text(shell, line)
    scrub_history(shell, line, magic=magic)
    events = shell.events

    def _later(*_a: Any) -> None:
        scrub_history(shell, line, magic=magic)
        with contextlib.suppress(ValueError):
            events.unregister("post_run_cell", _later)

    events.register("post_run_cell", _later)
    return replaced


def _with_note(message: str, replaced: bool) -> str:
    return f"{message} ({REPLACED_NOTE})" if replaced else message


def refuse_secret_line(shell: Any, line: str, cell: str | None = None) -> None:
    """Refuse a magic line (or cell header) that carries a secret, scrubbing it from history
    and, in Jupyter, from the cell's text."""
    why = secrets.find_secret(line)
    if why is None:
        return
    replaced = scrub_line(shell, line)
    try:
        secrets.check_line(line)
    except SecretOnLineError as exc:
        raise Refused(str(exc), replaced) from None


_UNRECOGNIZED_RE = re.compile(r"^unrecognized arguments: (.*)$", re.DOTALL)
_INVALID_VALUE_RE = re.compile(r"^(argument \S+: invalid (?:choice|.*? value)): .*$", re.DOTALL)
_AMBIGUOUS_RE = re.compile(r"^ambiguous option: (--?[\w-]+)=\S*")


def argument_error(message: str) -> str:
    """An argparse error for a magic line, without repeating any value typed on it: a value
    might be a secret typed in the wrong place (``--passphrase-env VAR hunter2``)."""
    m = _UNRECOGNIZED_RE.match(message)
    if m:
        n = len(m.group(1).split())
        return (
            f"unrecognized arguments: {n} word(s) not understood (not repeated here, in case one "
            "is a secret); see the magic's help with %name?"
        )
    m = _INVALID_VALUE_RE.match(message)
    if m:
        return f"{m.group(1)} (the value is not repeated here)"
    return secrets.redact(_AMBIGUOUS_RE.sub(r"ambiguous option: \1=…", message))


def _strict_parser(wrapper: Any) -> None:
    """No abbreviated options (``--passphrase-e``) on magics that take a passphrase."""
    parser = getattr(wrapper, "parser", None)
    if parser is not None and parser.allow_abbrev:
        if any("passphrase" in opt for opt in parser._option_string_actions):
            parser.allow_abbrev = False


SECURE_PREFIX = "secure_"


def refuse_unparsed_line(shell: Any, line: str, parser: Any, magic: str) -> None:
    """A secure magic's line that does not parse may hold a secret in the wrong place
    (``--pass hunter2``, ``-p …``, ``--bogus …``): refused without repeating it, and scrubbed
    from the history like a secret line."""
    if parser is None:
        return
    try:
        parser.parse_argstring(line)
    except UsageError as exc:
        message = argument_error(str(exc))
    else:
        return
    if not line.strip():
        raise UsageError(message)
    replaced = scrub_line(shell, line, magic=magic)
    raise Refused(
        f"{message} — the line was removed from the input history, in case it held a secret",
        replaced,
    )


def user_errors(func: Callable[..., Any]) -> Callable[..., Any]:
    """Decorate a magic: refuse secret lines; turn kprivacy_nb errors into a one-line UsageError;
    argument errors never repeat what was typed; no abbreviated options next to passphrases."""

    @functools.wraps(func)
    def wrapper(self: Any, line: str = "", cell: str | None = None, *args: Any, **kw: Any) -> Any:
        shell = getattr(self, "shell", None)
        try:
            return checked(self, shell, line, cell, *args, **kw)
        except Refused as exc:
            if not exc.replaced:  # (IPython shows only an exact UsageError in one line)
                raise UsageError(str(exc)) from None
            report_refusal(exc)  # the cell's text is being replaced: the reply must be "ok"
            return None

    def checked(self: Any, shell: Any, line: str, cell: Any, *args: Any, **kw: Any) -> Any:
        refuse_secret_line(shell, line)
        _strict_parser(wrapper)
        if func.__name__.startswith(SECURE_PREFIX):
            refuse_unparsed_line(shell, line, getattr(wrapper, "parser", None), func.__name__)
        try:
            if cell is None:
                return func(self, line, *args, **kw)
            return func(self, line, cell, *args, **kw)
        except Refused:
            raise
        except MissingEnvVarError as exc:
            # the "name" may have been a passphrase: out of the history and the cell
            raise Refused(str(exc), scrub_line(shell, line)) from None
        except KPrivacyError as exc:
            raise UsageError(secrets.redact(str(exc))) from None
        except UsageError as exc:
            message = argument_error(str(exc))
            if message != str(exc) and "passphrase" in line:
                # a stray word next to a passphrase option
                raise Refused(message, scrub_line(shell, line)) from None
            raise UsageError(message) from None

    return wrapper


def encryption_arguments(func: Callable[..., Any]) -> Callable[..., Any]:
    """The options every encrypting magic takes, in this order: ``-r/--recipient`` (``--to`` an
    alias, repeatable), ``--passphrase`` (prompt) and ``--passphrase-env VAR``."""
    from IPython.core.magic_arguments import argument

    func = argument("--passphrase-env", metavar="VAR", help="read the passphrase from $VAR")(func)
    func = argument("--passphrase", action="store_true", help="encrypt with a passphrase (prompt)")(
        func
    )
    return argument(
        "-r", "--recipient", "--to", dest="to", metavar="RECIPIENT", action="append", default=[],
        help="recipient: public key (age1…, age1pq1…, ssh-…), name or recipients file "
        "(repeatable; --to is an alias)",
    )(func)  # fmt: skip


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
    if not all(part.isidentifier() for part in (head, *rest)):
        raise UsageError(
            f"{name!r} is an expression, and magics take variable names: assign it first "
            f"(e.g. subset = {name}) and pass the name"
        )
    if head not in shell.user_ns:
        raise UsageError(f"no variable named {head!r} in the notebook namespace")
    obj = shell.user_ns[head]
    for attr in rest:
        try:
            obj = getattr(obj, attr)
        except AttributeError:
            raise UsageError(f"{name!r}: {type(obj).__name__} has no attribute {attr!r}") from None
    return obj
