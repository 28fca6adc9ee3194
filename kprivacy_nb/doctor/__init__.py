"""``kprivacy-nb doctor`` / ``%kp_doctor``: is this environment safe for private data?

Each check family lives in its own module and registers itself with :func:`check`:
``advisories`` (known vulnerabilities of the packages this workflow touches, from a bundled
snapshot), ``server`` (Jupyter server and kernel exposure), ``keys`` (key and secret hygiene)
and ``privacy`` (ledger permissions, DP runs not charged to a ledger). Nothing here uses the
network unless ``online=True`` asks for ``pip-audit``.

>>> report = run_checks(requirements="requirements.txt")  # doctest: +SKIP
>>> [f.id for f in report.findings if f.severity == "high"]  # doctest: +SKIP
['CVE-2025-1550', ...]
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import InvalidParameterError
from .report import SEVERITIES, Finding, Report

__all__ = ["CHECKS", "Context", "Finding", "Report", "SEVERITIES", "check", "run_checks"]


@dataclass
class Context:
    """What the checks look at. Every field has a default that describes this process."""

    requirements: Path | None = None
    workdir: Path = field(default_factory=Path.cwd)
    user_ns: Mapping[str, Any] | None = None
    kernel_connection_file: Path | None = None
    history_file: Path | None = None
    online: bool = False
    notes: list[str] = field(default_factory=list)
    snapshot_date: str = ""

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)


CheckFn = Callable[[Context], Iterable[Finding]]
CHECKS: dict[str, CheckFn] = {}


def check(name: str) -> Callable[[CheckFn], CheckFn]:
    """Register a check family under ``name`` (a new family is a new module, not an edit)."""

    def deco(fn: CheckFn) -> CheckFn:
        CHECKS[name] = fn
        return fn

    return deco


def _load_families() -> None:
    from . import advisories, keys, privacy, server  # noqa: F401  (they register themselves)


def run_checks(
    *,
    requirements: str | os.PathLike | None = None,
    checks: Iterable[str] | None = None,
    workdir: str | os.PathLike | None = None,
    user_ns: Mapping[str, Any] | None = None,
    kernel_connection_file: str | os.PathLike | None = None,
    history_file: str | os.PathLike | None = None,
    online: bool = False,
    ignore: Iterable[str] = (),
) -> Report:
    """Run the doctor's checks and return a :class:`Report` (most severe findings first).

    ``requirements`` audits a pinned requirements file instead of the installed packages;
    ``checks`` limits the run to some families (``advisories``, ``server``, ``keys``,
    ``privacy``); ``workdir`` is the working tree scanned for keys and notebooks (default: the
    current folder); ``user_ns`` is a notebook namespace (DP runs in it are checked);
    ``online`` also asks ``pip-audit`` (if installed — the only path that uses the network);
    ``ignore`` drops findings by id (accepted risks), and the report says how many.
    """
    _load_families()
    names = list(CHECKS) if checks is None else list(dict.fromkeys(checks))
    unknown = [n for n in names if n not in CHECKS]
    if unknown:
        raise InvalidParameterError(
            f"unknown check {unknown[0]!r}; choose from {', '.join(CHECKS)}"
        )
    req = Path(requirements).expanduser() if requirements is not None else None
    if req is not None and not req.is_file():
        raise InvalidParameterError(f"requirements file {req} does not exist or is not a file")
    ctx = Context(
        requirements=req,
        workdir=Path(workdir).expanduser() if workdir is not None else Path.cwd(),
        user_ns=user_ns,
        kernel_connection_file=Path(kernel_connection_file) if kernel_connection_file else None,
        history_file=Path(history_file) if history_file else None,
        online=online,
    )
    findings: list[Finding] = []
    for name in names:
        findings.extend(CHECKS[name](ctx))
    skip = set(ignore)
    dropped = [f for f in findings if f.id in skip]
    if dropped:
        findings = [f for f in findings if f.id not in skip]
        ctx.note(f"{len(dropped)} finding(s) ignored as asked: {', '.join(sorted(skip))}")
    return Report(findings, ctx.notes, tuple(names), ctx.snapshot_date)
