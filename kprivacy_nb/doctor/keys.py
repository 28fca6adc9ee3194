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
_PASSPHRASE_LITERAL_RE = re.compile(
    r"""\b(?:passphrase|password)\s*=\s*(?P<q>['"])(?!\s*(?P=q))[^'"\n]{4,}(?P=q)"""
)
_SKIP_DIRS = {".git", ".hg", ".venv", "venv", "node_modules", "__pycache__", ".tox", ".mypy_cache"}
_MAX_FILES = 20000
_MAX_DEPTH = 8
_SMALL = 16 * 1024  # key files are tiny (an RSA-4096 PEM key is ~3.3 KiB)
_MAX_NOTEBOOK = 50 * 1024 * 1024


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
    return stat.S_IMODE(path.stat().st_mode)


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


def _notebook_secrets(path: Path) -> list[str]:
    """``cell N: <kind>`` for each cell of a notebook that holds a secret."""
    try:
        if path.stat().st_size > _MAX_NOTEBOOK:
            return []
        nb = json.loads(path.read_text(encoding="utf-8", errors="replace"))
    except (OSError, ValueError):
        return []
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
    try:
        if not path.is_file() or path.is_symlink() or path.stat().st_size > _SMALL:
            return None
        with path.open("rb") as f:
            head = f.read(_SMALL)
    except OSError:
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
    if keys.is_dir():
        for path in sorted(keys.iterdir()):
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
    root = git_root(home.resolve()) if home.exists() else None
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
    home_r = home.resolve() if home.exists() else None
    n = 0
    for path in _walk(workdir):
        n += 1
        if home_r is not None and home_r in path.resolve().parents:
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
        root = git_root(path.parent.resolve())
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
    try:
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=2)
        try:
            rows = con.execute("SELECT session, line, source_raw FROM history").fetchall()
        finally:
            con.close()
    except sqlite3.Error as exc:
        ctx.note(f"IPython history {path} could not be read ({type(exc).__name__})")
        return []
    hits = [(s, ln, kind) for s, ln, src in rows if (kind := secret_kind(str(src or "")))]
    if not hits:
        return []
    where = ", ".join(f"session {s} line {ln}: {k}" for s, ln, k in hits[:5])
    more = f" and {len(hits) - 5} more" if len(hits) > 5 else ""
    return [
        Finding(
            id="keys:secret-in-history",
            severity="high",
            title=f"IPython's history holds {len(hits)} input(s) with a secret",
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
