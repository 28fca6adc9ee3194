"""Privacy hygiene: who can read or rewrite the ledger, and DP runs in this kernel that no
ledger was charged for (their ε is spent but nowhere accounted)."""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..paths import home_dir
from . import Context, check
from .report import Finding, mode_finding

LEDGER_FILENAME = "ledger.sqlite3"  # as kprivacy_nb.dp.ledger (not imported: it is heavy)


def ledger_path() -> Path | None:
    url = os.environ.get("KPRIVACY_NB_LEDGER_URL")
    if url:
        return Path(url[len("sqlite:///") :]).expanduser() if url.startswith("sqlite:///") else None
    return home_dir(create=False) / LEDGER_FILENAME


def _ledger_findings(path: Path) -> list[Finding]:
    if not path.is_file():
        return []
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & (stat.S_IWGRP | stat.S_IWOTH):
        fid, severity, title = "privacy:ledger-writable", "high", "rewrite the privacy ledger "
        title += "(and so the budgets it enforces)"
    elif mode & (stat.S_IRGRP | stat.S_IROTH):
        fid, severity = "privacy:ledger-readable", "low"
        title = "read the privacy ledger (dataset names, budgets, runs)"
    else:
        return []
    return [
        mode_finding(
            path, id=fid, severity=severity, title=f"other users can {title}", check="privacy"
        )
    ]


def _uncharged(value: Any) -> bool:
    """A DP run result (``dp_fit``'s, or a ``make_private`` model's card) with no ledger."""
    for obj in (value, getattr(value, "privacy", None)):
        if obj is None or not type(obj).__module__.startswith("kprivacy_nb."):
            continue
        if hasattr(obj, "ledger_name") and hasattr(obj, "epsilon"):
            return obj.ledger_name is None
    return False


def _run_findings(user_ns: Mapping[str, Any]) -> list[Finding]:
    names = [k for k, v in list(user_ns.items()) if not k.startswith("_") and _uncharged(v)]
    if not names:
        return []
    return [
        Finding(
            id="privacy:run-not-charged",
            severity="medium",
            title=f"{len(names)} DP run(s) in this kernel were not charged to a ledger",
            evidence="variables: " + ", ".join(sorted(names)[:10]),
            fix="create a budget (%dp_ledger create NAME --epsilon E --delta D) and train with "
            "--ledger NAME, so every release of the same data is counted",
            check="privacy",
        )
    ]


@check("privacy")
def check_privacy(ctx: Context) -> list[Finding]:
    found: list[Finding] = []
    path = ledger_path()
    if path is not None:
        found.extend(_ledger_findings(path))
    if ctx.user_ns is not None:
        found.extend(_run_findings(ctx.user_ns))
    return found
