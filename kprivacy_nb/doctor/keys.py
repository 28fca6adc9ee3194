"""Key and secret hygiene: key file modes, keys in the working tree or a git repository, and
secret literals in notebooks (``.ipynb``) or IPython's history. Evidence names the place and
the kind of secret, never the secret."""

from __future__ import annotations

import contextlib
import json
import os
import re
import sqlite3
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

from .. import secrets
from ..paths import home_dir
from . import Context, check
from .report import Finding, mode_finding

_PRIVATE_BLOCK_RE = re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----")
_KEY_FILE_RE = re.compile(
    r"^\s*(?:AGE-SECRET-KEY-(?:PQ-)?1[0-9A-Za-z]{20,}|KPRIVACY-SIGNING-KEY-1[0-9A-Za-z]{20,})\s*$"
    r"|^-----BEGIN [A-Z ]*PRIVATE KEY-----",
    re.MULTILINE | re.IGNORECASE,
)
# ``passphrase="…"``, ``PASSPHRASE = '…'``, ``db_password = b"…"``, ``os.environ["KP_PASSPHRASE"] =
# "…"``, ``{"password": "…"}``: a name ending in passphrase/password/passwd given a literal of 4+
# characters. ``passphrase_env = "VAR"`` (a name ending otherwise) is not a secret.
_PASSPHRASE_LITERAL_RE = re.compile(
    r"""\b\w*(?:passphrase|password|passwd)['"]?\]?\s*[:=]\s*[rbuRBU]{0,2}"""
    r"""(?P<q>['"])(?!\s*(?P=q))[^'"\n]{4,}(?P=q)""",
    re.IGNORECASE,
)
# Cheap first pass over a whole file (lower-cased bytes: a case-insensitive regex is ~25x
# slower): only a file holding one of these can hold a secret.
_CANDIDATE_RE = re.compile(rb"secret-key-|signing-key-|private key-----|pass(?:phrase|word|wd)")


def may_hold_secret(data: bytes) -> bool:
    return _CANDIDATE_RE.search(data.lower()) is not None


_SKIP_DIRS = {".git", ".hg", ".venv", "venv", "node_modules", "__pycache__", ".tox", ".mypy_cache"}
_MAX_FILES = 20000
_MAX_DEPTH = 8
_SMALL = 16 * 1024  # key files are tiny (an RSA-4096 PEM key is ~3.3 KiB)
_MAX_NOTEBOOK = 50 * 1024 * 1024  # parsed cell by cell up to this size; larger: a raw scan
_MAX_RAW_SCAN = 2 * 1024 * 1024 * 1024  # larger notebooks are scanned for keys in chunks
_MAX_HISTORY_HITS = 1000


def secret_kind(text: str, *, code: bool = True) -> str | None:
    """What kind of secret ``text`` holds (``None``: nothing seen). ``code`` also looks for
    ``passphrase="…"`` literals and secret-bearing magic lines."""
    if secrets.AGE_SECRET_KEY_RE.search(text):
        return "an age secret key (AGE-SECRET-KEY-1…)"
    if secrets.SIGNING_KEY_RE.search(text):
        return "a signing secret key (KPRIVACY-SIGNING-KEY-1…)"
    if _PRIVATE_BLOCK_RE.search(text):
        return "a private key block"
    if code:
        if _PASSPHRASE_LITERAL_RE.search(text):
            return "a passphrase/password literal"
        for line in text.splitlines():
            if line.lstrip().startswith("%") and "passphrase" in line:
                why = secrets.find_secret(line)
                if why:
                    return why
    return None


def _mode(path: Path) -> int:
    try:
        return stat.S_IMODE(path.stat().st_mode)
    except OSError:
        return 0


def _open_regular(path: Path) -> int | None:
    """A descriptor on ``path`` if it is a regular file, else ``None``. Opened without blocking
    and checked on the open descriptor, so a FIFO, a device (``x.ipynb -> /dev/zero``) or a
    file swapped for one after a ``stat`` is never read."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0)
    try:
        fd = os.open(path, flags)
    except (OSError, ValueError):
        return None
    try:
        if stat.S_ISREG(os.fstat(fd).st_mode):
            return fd
    except OSError:
        pass
    os.close(fd)
    return None


def _chunks(path: Path, limit: int, size: int = 1 << 20) -> Iterator[bytes]:
    """``path``'s bytes in chunks, at most ``limit`` in all (nothing unless a regular file)."""
    fd = _open_regular(path)
    if fd is None:
        return
    try:
        while limit > 0:
            chunk = os.read(fd, min(limit, size))
            if not chunk:
                break
            limit -= len(chunk)
            yield chunk
    except OSError:
        return
    finally:
        os.close(fd)


def read_regular(path: Path, limit: int) -> bytes | None:
    """Up to ``limit`` + 1 bytes of ``path`` if it is a regular file (``None`` otherwise)."""
    if (fd := _open_regular(path)) is None:
        return None
    os.close(fd)
    return b"".join(_chunks(path, limit + 1))


def safe_resolve(path: Path) -> Path | None:
    """``path.resolve()``, or ``None`` for a symlink loop or an unreadable path."""
    try:
        return path.resolve()
    except (OSError, RuntimeError):
        return None


def git_root(path: Path) -> Path | None:
    for parent in [path, *path.parents]:
        if (parent / ".git").exists():
            return parent
    return None


def _git_ignored(root: Path, path: Path) -> bool:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        r = subprocess.run(
            ["git", "-C", str(root), "check-ignore", "-q", str(path)],
            capture_output=True,
            timeout=10,
            check=False,
        )
        return r.returncode == 0
    return False


def _walk(top: Path) -> Iterator[Path]:
    count = 0
    base = len(top.parts)
    for dirpath, dirnames, filenames in os.walk(top):
        depth = len(Path(dirpath).parts) - base
        dirnames[:] = [] if depth >= _MAX_DEPTH else [d for d in dirnames if d not in _SKIP_DIRS]
        for name in filenames:
            count += 1
            if count > _MAX_FILES:
                return
            yield Path(dirpath) / name


def _raw_secret(data: bytes) -> str | None:
    """A key in a file too broken to read cell by cell."""
    return secret_kind(data.decode("utf-8", errors="replace"), code=False)


def _streamed_secret(path: Path) -> str | None:
    """A key anywhere in a file too large to parse (read in chunks, up to _MAX_RAW_SCAN)."""
    carry = b""
    for chunk in _chunks(path, _MAX_RAW_SCAN, 4 << 20):
        buf = carry + chunk
        kind = _raw_secret(buf)
        if kind:
            return kind
        carry = buf[-512:]  # a key split across two chunks
    return None


def _notebook_secrets(path: Path) -> list[str]:
    """``cell N: <kind>`` for each cell of a notebook that holds a secret."""
    data = read_regular(path, _MAX_NOTEBOOK)
    if data is None:
        return []
    if len(data) > _MAX_NOTEBOOK:
        kind = _streamed_secret(path)
        return [f"(too large to read cell by cell): {kind}"] if kind else []
    if not may_hold_secret(data):
        return []
    try:
        nb = json.loads(data.decode("utf-8", errors="replace"))
    except (ValueError, RecursionError):
        kind = _raw_secret(data)
        return [f"(not valid notebook JSON): {kind}"] if kind else []
    hits = []
    cells = nb.get("cells", []) if isinstance(nb, dict) else []
    for i, cell in enumerate(cells if isinstance(cells, list) else [], 1):
        if not isinstance(cell, dict):
            continue
        src = cell.get("source", "")
        text = "".join(src) if isinstance(src, list) else str(src)
        kind = secret_kind(text, code=cell.get("cell_type") == "code")
        if kind is None:
            outs = json.dumps(cell.get("outputs", []))
            kind = secret_kind(outs, code=False)
            kind = f"{kind} in its output" if kind else None
        if kind:
            hits.append(f"cell {i}: {kind}")
    return hits


def _file_secret(path: Path) -> str | None:
    """The kind of key a small text file *is* (a key alone on a line, or a PEM private key);
    a key quoted inside source code or a test vector is not a key file."""
    if path.is_symlink():
        return None
    head = read_regular(path, _SMALL)
    if head is None or len(head) > _SMALL:
        return None
    if b"\0" in head[:1024]:
        return None
    m = _KEY_FILE_RE.search(head.decode("utf-8", errors="replace"))
    return secret_kind(m.group(0), code=False) if m else None


def _home_findings(home: Path) -> list[Finding]:
    found = []
    keys = home / "keys"
    for folder, what in ((home, "kprivacy_nb home folder"), (keys, "keys folder")):
        if folder.is_dir() and _mode(folder) & 0o077:
            found.append(
                mode_finding(
                    folder,
                    id="keys:folder-mode",
                    severity="medium",
                    title=f"the {what} is open to other users",
                    check="keys",
                    want=0o700,
                )
            )
    try:
        entries = sorted(keys.iterdir()) if keys.is_dir() else []
    except OSError as exc:
        entries = []
        found.append(
            Finding(
                id="keys:folder-unreadable",
                severity="low",
                title="the keys folder could not be listed, so key file modes were not checked",
                evidence=f"{keys}: {type(exc).__name__}",
                fix=f"chmod 700 {keys} (as its owner)",
                check="keys",
            )
        )
    if entries:
        for path in entries:
            if path.is_file() and path.name.endswith(".key") and _mode(path) & 0o077:
                found.append(
                    mode_finding(
                        path,
                        id="keys:file-mode",
                        severity="high",
                        title="a secret key file is readable or writable by other users",
                        check="keys",
                    )
                )
    resolved = safe_resolve(home) if home.exists() else None
    root = git_root(resolved) if resolved is not None else None
    if root is not None:
        found.append(
            Finding(
                id="keys:home-in-git",
                severity="high",
                title="the kprivacy_nb home folder (with its keys) is inside a git repository",
                evidence=f"{home} is under {root}",
                fix="move it out (export KPRIVACY_NB_HOME=~/.config/kprivacy_nb) and check "
                "git history for committed keys",
                check="keys",
            )
        )
    return found


def _tree_findings(workdir: Path, home: Path, ctx: Context) -> list[Finding]:
    found = []
    home_r = safe_resolve(home) if home.exists() else None
    n = 0
    for path in _walk(workdir):
        n += 1
        real = safe_resolve(path)
        if real is None:
            continue  # a symlink loop or a path we may not read
        if home_r is not None and home_r in real.parents:
            continue  # the keys folder itself is judged by its modes
        if path.suffix == ".ipynb":
            for hit in _notebook_secrets(path):
                found.append(
                    Finding(
                        id="keys:secret-in-notebook",
                        severity="high",
                        title="a notebook in the working tree holds a secret",
                        evidence=f"{path} {hit}",
                        fix="remove it from the cell (and its output), save, and rotate the "
                        "key/passphrase; use --passphrase-env VAR or a key file instead",
                        check="keys",
                    )
                )
            continue
        kind = _file_secret(path)
        if kind is None:
            continue
        parent = safe_resolve(path.parent)
        root = git_root(parent) if parent is not None else None
        tracked_risk = root is not None and not _git_ignored(root, path)
        if tracked_risk:
            severity = "high"
        else:
            severity = "medium" if root is not None or _mode(path) & 0o077 else "low"
        found.append(
            Finding(
                id="keys:key-in-tree",
                severity=severity,
                title="a secret key file lies in the working tree"
                + (" of a git repository (not ignored)" if tracked_risk else ""),
                evidence=f"{path}: {kind}",
                fix=f"move it to {home / 'keys'} (chmod 600) and rotate it if it was ever "
                "committed or shared",
                check="keys",
            )
        )
    if n >= _MAX_FILES:
        ctx.note(f"working tree scan stopped after {_MAX_FILES} files in {workdir}")
    return found


def default_history_file() -> Path:
    ipdir = os.environ.get("IPYTHONDIR") or str(Path.home() / ".ipython")
    return Path(ipdir).expanduser() / "profile_default" / "history.sqlite"


def _history_findings(path: Path, ctx: Context) -> list[Finding]:
    if not path.is_file():
        return []
    # SQLite narrows the rows (LIKE is case-insensitive for ASCII) and they are streamed: a
    # history of millions of inputs is neither loaded whole nor run through Python's regexes.
    words = ("AGE-SECRET-KEY-", "KPRIVACY-SIGNING-KEY-", "PRIVATE KEY-----", "passphrase",
             "password", "passwd")  # fmt: skip
    query = "SELECT session, line, source_raw FROM history WHERE " + " OR ".join(
        "source_raw LIKE ?" for _ in words
    )
    hits = []
    try:
        con = sqlite3.connect(f"{path.absolute().as_uri()}?mode=ro", uri=True, timeout=2)
        try:
            for s, ln, src in con.execute(query, [f"%{w}%" for w in words]):
                kind = secret_kind(str(src or ""))
                if kind:
                    hits.append((s, ln, kind))
                    if len(hits) >= _MAX_HISTORY_HITS:
                        break
        finally:
            con.close()
    except sqlite3.Error as exc:
        ctx.note(f"IPython history {path} could not be read ({type(exc).__name__})")
        return []
    if not hits:
        return []
    where = ", ".join(f"session {s} line {ln}: {k}" for s, ln, k in hits[:5])
    more = f" and {len(hits) - 5} more" if len(hits) > 5 else ""
    count = f"{len(hits)}+" if len(hits) >= _MAX_HISTORY_HITS else str(len(hits))
    return [
        Finding(
            id="keys:secret-in-history",
            severity="high",
            title=f"IPython's history holds {count} input(s) with a secret",
            evidence=f"{path}: {where}{more}",
            fix=f"ipython history clear (or delete those rows from {path}) and rotate the secret",
            check="keys",
        )
    ]


@check("keys")
def check_keys(ctx: Context) -> list[Finding]:
    home = home_dir(create=False)
    found = _home_findings(home)
    if ctx.workdir.is_dir():
        found.extend(_tree_findings(ctx.workdir, home, ctx))
    found.extend(_history_findings(ctx.history_file or default_history_file(), ctx))
    return found
