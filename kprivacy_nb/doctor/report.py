"""What the doctor finds: :class:`Finding` (one problem, with its evidence and its fix) and
:class:`Report` (all of them, as text, HTML — one coloured line per finding — or JSON)."""

from __future__ import annotations

import html
import json
import stat
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..secrets import redact

SEVERITIES = ("high", "medium", "low")
_COLOURS = {"high": "#c0392b", "medium": "#d68910", "low": "#5d6d7e"}


@dataclass(frozen=True)
class Finding:
    """One problem: a stable ``id``, a ``severity`` (high / medium / low), a one-line ``title``,
    the ``evidence`` (what was seen, never a secret) and the ``fix`` (a command where there is
    one). ``check`` names the family that found it (advisories, server, keys, privacy)."""

    id: str
    severity: str
    title: str
    evidence: str
    fix: str
    check: str = ""

    def __post_init__(self) -> None:
        if self.severity not in SEVERITIES:
            raise ValueError(f"severity must be one of {SEVERITIES}, not {self.severity!r}")

    def to_dict(self) -> dict[str, str]:
        return {k: redact(v) for k, v in asdict(self).items()}


@dataclass
class Report:
    """Every finding of one doctor run, most severe first, plus notes on what was not checked."""

    findings: list[Finding] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    checks: tuple[str, ...] = ()
    snapshot_date: str = ""

    def __post_init__(self) -> None:
        self.findings.sort(key=lambda f: (SEVERITIES.index(f.severity), f.check, f.id))

    def count(self, severity: str) -> int:
        return sum(f.severity == severity for f in self.findings)

    @property
    def has_high(self) -> bool:
        """True when a high-severity finding is present (the CLI then exits 1)."""
        return self.count("high") > 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "findings": [f.to_dict() for f in self.findings],
            "summary": {s: self.count(s) for s in SEVERITIES},
            "checks": list(self.checks),
            "advisory_snapshot": self.snapshot_date,
            "notes": [redact(n) for n in self.notes],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False)

    def _headline(self) -> str:
        if not self.findings:
            head = "no findings"
        else:
            counts = ", ".join(f"{self.count(s)} {s}" for s in SEVERITIES if self.count(s))
            head = f"{len(self.findings)} finding(s): {counts}"
        checked = ", ".join(self.checks)
        snap = f"; advisories as of {self.snapshot_date}" if self.snapshot_date else ""
        return f"kprivacy-nb doctor — {head} (checked: {checked}{snap})"

    def __repr__(self) -> str:
        lines = [self._headline()]
        for f in self.findings:
            lines.append(f"{f.severity.upper():6} {f.id}  {redact(f.title)}")
            lines.append(f"       evidence: {redact(f.evidence)}")
            lines.append(f"       fix: {redact(f.fix)}")
        lines.extend(f"note: {redact(n)}" for n in self.notes)
        return "\n".join(lines)

    __str__ = __repr__

    def _repr_html_(self) -> str:
        rows = []
        for f in self.findings:
            colour = _COLOURS[f.severity]
            rows.append(
                f"<details style='border-left:4px solid {colour};padding:1px 6px;margin:2px 0'>"
                f"<summary><b style='color:{colour}'>{f.severity.upper()}</b> "
                f"<code>{html.escape(f.id)}</code> {html.escape(redact(f.title))}</summary>"
                f"<div style='margin-left:1.5em'><small>evidence:</small> "
                f"{html.escape(redact(f.evidence))}<br><small>fix:</small> "
                f"<code>{html.escape(redact(f.fix))}</code></div></details>"
            )
        notes = "".join(f"<li>{html.escape(redact(n))}</li>" for n in self.notes)
        return (
            f"<div><p><b>{html.escape(self._headline())}</b></p>{''.join(rows)}"
            + (f"<small><ul>{notes}</ul></small>" if notes else "")
            + "</div>"
        )


def mode_finding(
    path: Path, *, id: str, severity: str, title: str, check: str, want: int = 0o600
) -> Finding:
    """A finding about ``path``'s permissions: its mode as evidence, ``chmod`` as the fix."""
    mode = stat.S_IMODE(path.stat().st_mode)
    return Finding(
        id=id,
        severity=severity,
        title=title,
        evidence=f"{path} has mode {mode:04o} (should be {want:04o})",
        fix=f"chmod {want:o} {path}",
        check=check,
    )
