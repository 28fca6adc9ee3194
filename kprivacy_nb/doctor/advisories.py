"""Known vulnerabilities of the packages a private-ML notebook touches.

The data is a bundled, date-stamped snapshot (``advisories.json`` beside this file; its
``provenance`` and each entry's ``source`` say where it comes from), rebuilt from OSV by
``tools/refresh_advisories.py``. Versions come from the running environment or from a
requirements file: an exact pin (``==``) is checked as that version, a range (``>=3``) is
reported when it still admits an affected version. ``pip-audit`` is asked too when
``online=True`` and it is installed — nothing else here touches the network.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import importlib.util
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any

from packaging.requirements import InvalidRequirement, Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

from ..errors import InvalidParameterError
from . import Context, check
from .report import Finding

SNAPSHOT = "advisories.json"
_MAX_INCLUDE_DEPTH = 5
_MAX_REQUIREMENTS_BYTES = 4 * 1024 * 1024  # a hashed lock file of hundreds of packages is < 1 MiB
_SEVERITY = {
    "critical": "high",
    "high": "high",
    "moderate": "medium",
    "medium": "medium",
    "low": "low",
}


@dataclass(frozen=True)
class Advisory:
    """One advisory for one package: ``ranges`` are ``{"introduced", "fixed"|"last_affected"}``."""

    id: str
    aliases: tuple[str, ...]
    package: str
    severity: str
    summary: str
    ranges: tuple[dict[str, str], ...]
    references: tuple[str, ...] = ()
    source: str = ""

    @property
    def display_id(self) -> str:
        """The CVE id when there is one (what people search for), else the advisory id."""
        return next((a for a in self.aliases if a.startswith("CVE-")), self.id)

    def affects(self, version: Version) -> bool:
        for r in self.ranges:
            intro = r.get("introduced", "0")
            if intro not in ("", "0") and version < Version(intro):
                continue
            if "fixed" in r and version >= Version(r["fixed"]):
                continue
            if "last_affected" in r and version > Version(r["last_affected"]):
                continue
            return True
        return False

    def fixed_after(self, version: Version) -> Version | None:
        """The first fixed version above ``version`` (``None`` when no fix is known)."""
        fixes = sorted(Version(r["fixed"]) for r in self.ranges if "fixed" in r)
        return next((v for v in fixes if v > version), None)

    def range_text(self) -> str:
        parts = []
        for r in self.ranges:
            lo = r.get("introduced", "0")
            bits = [f">={lo}"] if lo not in ("", "0") else []
            if "fixed" in r:
                bits.append(f"<{r['fixed']}")
            if "last_affected" in r:
                bits.append(f"<={r['last_affected']}")
            parts.append(",".join(bits) or "all versions")
        return " or ".join(parts)


@dataclass(frozen=True)
class Snapshot:
    date: str
    watched: tuple[str, ...]
    advisories: tuple[Advisory, ...]

    def for_package(self, name: str) -> list[Advisory]:
        key = canonicalize_name(name)
        return [a for a in self.advisories if canonicalize_name(a.package) == key]


def _parse_snapshot(doc: dict[str, Any]) -> Snapshot:
    advisories = tuple(
        Advisory(
            id=a["id"],
            aliases=tuple(a.get("aliases", ())),
            package=a["package"],
            severity=_SEVERITY.get(str(a.get("severity", "")).lower(), "medium"),
            summary=a.get("summary", ""),
            ranges=tuple(a["ranges"]),
            references=tuple(a.get("references", ())),
            source=a.get("source", ""),
        )
        for a in doc["advisories"]
    )
    return Snapshot(doc.get("snapshot_date", "unknown"), tuple(doc["watched_packages"]), advisories)


@functools.lru_cache(maxsize=1)
def load_snapshot() -> Snapshot:
    """The bundled advisory snapshot (read once)."""
    text = files(__package__).joinpath(SNAPSHOT).read_text(encoding="utf-8")
    return _parse_snapshot(json.loads(text))


# -- where versions come from ---------------------------------------------------------------


@dataclass(frozen=True)
class Pin:
    """A package as found: an exact ``version`` (installed or ``==``), or a ``specifier``."""

    name: str
    version: Version | None
    specifier: SpecifierSet | None
    origin: str

    @property
    def shown(self) -> str:
        if self.version is not None:
            return f"{self.name} {self.version}"
        return f"{self.name}{self.specifier}"


def installed_pins(names: tuple[str, ...]) -> Iterator[Pin]:
    """The installed version of each watched package (those not installed are skipped)."""
    for name in names:
        try:
            raw = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        try:
            yield Pin(name, Version(raw), None, f"installed in {sys.prefix}")
        except InvalidVersion:
            continue


def _logical_lines(path: Path) -> Iterator[tuple[int, str]]:
    """Lines of a requirements file, continuations joined, comments dropped (pip's rules)."""
    try:
        if path.stat().st_size > _MAX_REQUIREMENTS_BYTES:
            raise InvalidParameterError(
                f"{path} is larger than {_MAX_REQUIREMENTS_BYTES >> 20} MiB: not a requirements file"
            )
        text = path.read_bytes().decode("utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidParameterError(
            f"{path} is not a readable UTF-8 requirements file ({type(exc).__name__})"
        ) from None
    if "\0" in text:
        raise InvalidParameterError(f"{path} is not a text requirements file")
    buf, start = "", 0
    for no, raw in enumerate(text.splitlines(), 1):
        line = re.sub(r"(^|\s)#.*$", "", raw).rstrip()
        if not buf:
            start = no
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        if buf.strip():
            yield start, buf.strip()
        buf = ""
    if buf.strip():
        yield start, buf.strip()


def requirement_pins(
    path: Path, ctx: Context, depth: int = 0, seen: set[Path] | None = None
) -> tuple[list[Pin], list[str]]:
    """Parse ``path`` like pip does; returns the pins and lines that could not be understood.

    ``-r``/``-c`` includes are followed, each file once (an include loop, or a file included
    from several places, is read once); editable installs, local paths and URLs are noted as
    not checked (their version is not in the file).
    """
    pins: list[Pin] = []
    bad: list[str] = []
    seen = set() if seen is None else seen
    with contextlib.suppress(OSError, RuntimeError):
        seen.add(path.resolve())
    for no, line in _logical_lines(path):
        where = f"{path.name} line {no}"
        head, _, rest = line.partition(" ")
        if head in ("-r", "--requirement", "-c", "--constraint") or re.match(
            r"^(-r|-c|--requirement=|--constraint=)\S", line
        ):
            target = (
                rest.strip() if rest else re.sub(r"^(-r|-c|--requirement=|--constraint=)", "", line)
            )
            inc = (path.parent / Path(target).expanduser()).expanduser()
            if depth >= _MAX_INCLUDE_DEPTH or not inc.is_file():
                bad.append(f"{where}: included file {target!r} not found (or nested too deep)")
                continue
            try:
                key = inc.resolve()
            except (OSError, RuntimeError):
                key = inc
            if key in seen:
                continue  # already read (an include loop or a shared include)
            more, more_bad = requirement_pins(inc, ctx, depth + 1, seen)
            pins.extend(more)
            bad.extend(more_bad)
            continue
        if head in ("-e", "--editable") or line.startswith("--editable="):
            ctx.note(f"{where}: editable install {rest.strip() or line} not checked (no version)")
            continue
        if line.startswith("-"):
            continue  # --index-url, --hash on its own line, --pre …: options, not packages
        spec = re.split(r"\s--hash[=\s]", line)[0].strip()
        if spec.startswith((".", "/", "~")) or re.match(r"^[a-z+]+://", spec):
            ctx.note(f"{where}: {spec} is a path or URL; not checked (no version)")
            continue
        try:
            req = Requirement(spec)
        except InvalidRequirement:
            bad.append(f"{where}: {spec!r}")
            continue
        if req.marker is not None and not _marker_holds(req):
            ctx.note(f"{where}: {req.name} skipped (its marker {req.marker} is false here)")
            continue
        if req.url:
            ctx.note(f"{where}: {req.name} comes from a URL; not checked (no version)")
            continue
        exact = [s for s in req.specifier if s.operator in ("==", "===") and "*" not in s.version]
        version = None
        if exact:
            try:
                version = Version(exact[0].version)
            except InvalidVersion:
                bad.append(f"{where}: {spec!r} (not a valid version)")
                continue
        pins.append(Pin(req.name, version, None if version else req.specifier, where))
    return pins, bad


def _marker_holds(req: Requirement) -> bool:
    try:
        return bool(req.marker.evaluate()) if req.marker is not None else True
    except Exception:  # an undefined marker variable: assume it applies (check it)
        return True


def _entirely_affected(spec: SpecifierSet, adv: Advisory) -> bool:
    """Is every version ``spec`` allows affected (``keras>=3,<3.9``: the fix is excluded)?

    Candidates for an allowed, unaffected version: each fixed version, the specifier's own
    boundaries, and versions below and above everything. Checked only when ``spec`` admits an
    affected version (see :func:`_admits_affected`).
    """
    candidates = {Version("0"), Version("99999")}
    candidates.update(Version(r["fixed"]) for r in adv.ranges if "fixed" in r)
    for s in spec:
        with contextlib.suppress(InvalidVersion):
            candidates.add(Version(s.version.rstrip(".*")))
    return not any(spec.contains(v, prereleases=True) and not adv.affects(v) for v in candidates)


def _admits_affected(spec: SpecifierSet, adv: Advisory) -> bool:
    """Does ``spec`` allow some affected version? Candidates: each range's start and the
    specifier's own boundary versions (``>=3.9`` → 3.9), the versions a resolver may pick."""
    candidates = {Version(r.get("introduced", "0") or "0") for r in adv.ranges}
    for s in spec:
        try:
            candidates.add(Version(s.version.rstrip(".*")))
        except InvalidVersion:
            continue
    return any(spec.contains(v, prereleases=True) and adv.affects(v) for v in candidates)


def _upgrade_fix(name: str, target: Version | None) -> str:
    if target is None:
        return f"no fixed release known; remove {name} or avoid the affected feature"
    return f'pip install "{canonicalize_name(name)}>={target}"'


def findings_for(pin: Pin, snapshot: Snapshot) -> list[Finding]:
    """Findings for one package: one per advisory that affects it."""
    advisories = snapshot.for_package(pin.name)
    if pin.version is not None:
        hits = [a for a in advisories if a.affects(pin.version)]
        fixes = [a.fixed_after(pin.version) for a in hits]
        target = None if None in fixes else max(fixes, default=None)
        return [
            Finding(
                id=a.display_id,
                severity=a.severity,
                title=f"{pin.name} {pin.version}: {a.summary}",
                evidence=f"{pin.shown} ({pin.origin}); {a.id} affects {a.range_text()}"
                + (f"; {len(hits)} advisories affect this version" if len(hits) > 1 else ""),
                fix=_upgrade_fix(pin.name, target),
                check="advisories",
            )
            for a in hits
        ]
    if pin.specifier is None:
        return []
    hits = [a for a in advisories if _admits_affected(pin.specifier, a)]
    if not hits:
        return []
    fixes = [Version(r["fixed"]) for a in hits for r in a.ranges if "fixed" in r]
    target = f'"{canonicalize_name(pin.name)}>={max(fixes)}"' if fixes else None
    # A range that excludes every fixed release is as vulnerable as a pin: one finding per
    # advisory, at its severity (``keras>=3,<3.9`` can only install affected versions).
    whole = [a for a in hits if _entirely_affected(pin.specifier, a)]
    found = [
        Finding(
            id=a.display_id,
            severity=a.severity,
            title=f"{pin.shown}: every version it allows is affected: {a.summary}",
            evidence=f"{pin.shown} ({pin.origin}); {a.id} affects {a.range_text()}",
            fix=f"require {target}" if target else f"remove {pin.name} or avoid the feature",
            check="advisories",
        )
        for a in whole
    ]
    hits = [a for a in hits if a not in whole]
    if not hits:
        return found
    ids = ", ".join(a.display_id for a in hits[:6]) + (" …" if len(hits) > 6 else "")
    return [
        *found,
        Finding(
            id=f"unpinned:{canonicalize_name(pin.name)}",
            severity="low",
            title=f"{pin.shown} still allows versions with {len(hits)} known advisories",
            evidence=f"{pin.shown} ({pin.origin}) admits affected versions ({ids})",
            fix=f"require {target}" if target else f"pin {pin.name} exactly",
            check="advisories",
        ),
    ]


def _pip_audit(ctx: Context, known: set[str]) -> list[Finding]:
    """Ask pip-audit (online), when installed, for what the snapshot does not know."""
    if importlib.util.find_spec("pip_audit") is not None:
        cmd = [sys.executable, "-m", "pip_audit"]  # audits this interpreter's environment
    elif shutil.which("pip-audit"):
        cmd = [str(shutil.which("pip-audit"))]
    else:
        ctx.note("online: pip-audit is not installed (pip install pip-audit); snapshot only")
        return []
    cmd += ["-f", "json", "--progress-spinner", "off"]
    if ctx.requirements is not None:
        cmd += ["-r", str(ctx.requirements), "--no-deps"]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
        doc = json.loads(out.stdout or "{}")
    except (OSError, subprocess.TimeoutExpired, json.JSONDecodeError) as exc:
        ctx.note(f"online: pip-audit failed ({type(exc).__name__}); snapshot only")
        return []
    found = []
    deps = doc.get("dependencies", []) if isinstance(doc, dict) else doc
    for dep in deps:
        for vuln in dep.get("vulns", []):
            ids = [vuln.get("id", "")] + list(vuln.get("aliases", []))
            if known.intersection(ids):
                continue
            shown = next((i for i in ids if i.startswith("CVE-")), ids[0])
            fixed = []
            for v in vuln.get("fix_versions") or []:
                with contextlib.suppress(InvalidVersion):
                    fixed.append(Version(v))
            found.append(
                Finding(
                    id=shown,
                    severity="medium",
                    title=f"{dep['name']} {dep.get('version', '?')}: {vuln.get('description', '')[:120]}",
                    evidence=f"pip-audit (online): {', '.join(i for i in ids if i)}",
                    fix=_upgrade_fix(dep["name"], min(fixed, default=None)),
                    check="advisories",
                )
            )
    return found


@check("advisories")
def check_advisories(ctx: Context) -> list[Finding]:
    snapshot = load_snapshot()
    ctx.snapshot_date = snapshot.date
    if ctx.requirements is not None:
        pins, bad = requirement_pins(ctx.requirements, ctx)
    else:
        pins, bad = list(installed_pins(snapshot.watched)), []
    findings: list[Finding] = []
    for pin in dict.fromkeys(pins):  # the same line reached twice is reported once
        for f in findings_for(pin, snapshot):
            if f not in findings:
                findings.append(f)
    covered = {canonicalize_name(a.package) for a in snapshot.advisories}
    uncovered = sorted(
        {canonicalize_name(p.name) for p in pins if p.version is not None}
        & ({canonicalize_name(w) for w in snapshot.watched} - covered)
    )
    if uncovered:
        ctx.note(
            f"the advisory snapshot has no entries for {', '.join(uncovered)}: their versions "
            "were not checked (python tools/refresh_advisories.py, or --online with pip-audit)"
        )
    if bad:
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        findings.append(
            Finding(
                id="requirements:unparsed",
                severity="low",
                title=f"{len(bad)} requirements line(s) could not be read, so were not checked",
                evidence="; ".join(bad[:5]) + more,
                fix="write them as NAME==VERSION (PEP 508), e.g. keras==3.14.0",
                check="advisories",
            )
        )
    if ctx.online:
        shown = {f.id for f in findings}
        known = set(shown)
        for a in snapshot.advisories:
            if a.display_id in shown:
                known.update((a.id, *a.aliases))
        findings.extend(_pip_audit(ctx, known))
    return findings


def snapshot_path() -> Path:
    """Where the bundled snapshot lives (``tools/refresh_advisories.py`` rewrites it)."""
    return Path(str(files(__package__).joinpath(SNAPSHOT)))
