"""Rebuild ``kprivacy_nb/doctor/advisories.json`` from OSV (https://osv.dev) data.

Needs the network (the doctor itself never does):

    python tools/refresh_advisories.py                    # asks api.osv.dev per watched package
    python tools/refresh_advisories.py --from-zip all.zip # an OSV export (PyPI/all.zip), offline
    python tools/refresh_advisories.py --check            # print what would change, write nothing

The watched packages are the snapshot's ``watched_packages`` list (edit it to add one). Each OSV
record becomes one entry per watched package it affects: its ECOSYSTEM ranges, its GitHub
severity (critical/high -> high, moderate -> medium, low -> low; medium when none is given), its
aliases, and ``source`` naming the OSV record and its ``modified`` time. Records that duplicate
each other (a PYSEC and a GHSA id for the same CVE) are merged, the GHSA record winning.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import urllib.request
import zipfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
SNAPSHOT = ROOT / "kprivacy_nb" / "doctor" / "advisories.json"
OSV_QUERY = "https://api.osv.dev/v1/query"
_SEVERITY = {
    "critical": "high",
    "high": "high",
    "moderate": "medium",
    "medium": "medium",
    "low": "low",
}


def query_osv(package: str) -> Iterator[dict[str, Any]]:
    """Every OSV record of a PyPI package (follows ``next_page_token``)."""
    token = None
    while True:
        body: dict[str, Any] = {"package": {"name": package, "ecosystem": "PyPI"}}
        if token:
            body["page_token"] = token
        req = urllib.request.Request(
            OSV_QUERY, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=60) as resp:  # noqa: S310 (fixed https URL)
            doc = json.load(resp)
        yield from doc.get("vulns", [])
        token = doc.get("next_page_token")
        if not token:
            return


def records_from_zip(path: Path) -> Iterator[dict[str, Any]]:
    with zipfile.ZipFile(path) as zf:
        for name in zf.namelist():
            if name.endswith(".json"):
                yield json.loads(zf.read(name))


def _ranges(affected: dict[str, Any]) -> list[dict[str, str]]:
    out = []
    for r in affected.get("ranges", []):
        if r.get("type") != "ECOSYSTEM":
            continue
        current: dict[str, str] | None = None
        for ev in r.get("events", []):
            if "introduced" in ev:
                if current is not None:
                    out.append(current)
                current = {"introduced": ev["introduced"]}
            elif current is not None and ("fixed" in ev or "last_affected" in ev):
                key = "fixed" if "fixed" in ev else "last_affected"
                current[key] = ev[key]
                out.append(current)
                current = None
        if current is not None:
            out.append(current)
    return out


def _severity(rec: dict[str, Any]) -> str:
    raw = str((rec.get("database_specific") or {}).get("severity", "")).lower()
    return _SEVERITY.get(raw, "medium")


def convert(records: Iterable[dict[str, Any]], watched: list[str]) -> list[dict[str, Any]]:
    """OSV records -> snapshot entries (one per record and watched package), duplicates merged."""
    want = {canonicalize_name(w) for w in watched}
    entries: dict[tuple[str, str], dict[str, Any]] = {}
    for rec in records:
        if rec.get("withdrawn"):
            continue
        for aff in rec.get("affected", []):
            pkg = aff.get("package", {})
            name = canonicalize_name(pkg.get("name", ""))
            if pkg.get("ecosystem") != "PyPI" or name not in want:
                continue
            ranges = _ranges(aff)
            if not ranges:
                continue
            entry = {
                "id": rec["id"],
                "aliases": sorted(set(rec.get("aliases", [])) - {rec["id"]}),
                "package": name,
                "severity": _severity(rec),
                "summary": (rec.get("summary") or rec.get("details", "").split("\n")[0])[:200],
                "ranges": ranges,
                "references": [
                    r["url"] for r in rec.get("references", []) if r.get("type") == "ADVISORY"
                ][:3],
                "source": f"OSV {rec['id']} (modified {rec.get('modified', '?')})",
            }
            entries[(name, rec["id"])] = entry
    # Merge records that name each other (PYSEC-… and GHSA-… for one CVE): keep the GHSA one.
    merged: list[dict[str, Any]] = []
    for key in sorted(entries, key=lambda k: (k[0], not k[1].startswith("GHSA-"), k[1])):
        e = entries[key]
        names = {e["id"], *e["aliases"]}
        twin = next(
            (
                m
                for m in merged
                if m["package"] == e["package"] and names & {m["id"], *m["aliases"]}
            ),
            None,
        )
        if twin is None:
            merged.append(e)
        else:
            twin["aliases"] = sorted(({*twin["aliases"]} | names) - {twin["id"]})
    return merged


def build(
    records: Iterable[dict[str, Any]], current: dict[str, Any], origin: str
) -> dict[str, Any]:
    watched = current["watched_packages"]
    today = dt.date.today().isoformat()
    return {
        "schema": current.get("schema", "kprivacy_nb.doctor/advisories-1"),
        "snapshot_date": today,
        "generated_by": f"tools/refresh_advisories.py from {origin} on {today}",
        "provenance": "Every OSV record (https://osv.dev) of the watched packages, as published "
        f"on {today}; ranges are PyPI versions (introduced <= v < fixed, or <= last_affected).",
        "watched_packages": watched,
        "omitted": [],
        "advisories": convert(records, watched),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--from-zip", type=Path, help="an OSV export zip (e.g. PyPI/all.zip)")
    p.add_argument("--output", type=Path, default=SNAPSHOT)
    p.add_argument("--check", action="store_true", help="report the change; write nothing")
    args = p.parse_args(argv)
    current = json.loads(SNAPSHOT.read_text(encoding="utf-8"))
    if args.from_zip:
        records: Iterable[dict[str, Any]] = list(records_from_zip(args.from_zip))
        origin = f"OSV export {args.from_zip.name}"
    else:
        records = [r for pkg in current["watched_packages"] for r in query_osv(pkg)]
        origin = "the OSV API (api.osv.dev)"
    new = build(records, current, origin)
    old_ids = {(a["package"], a["id"]) for a in current["advisories"]}
    new_ids = {(a["package"], a["id"]) for a in new["advisories"]}
    print(
        f"{len(new['advisories'])} advisories ({len(new_ids - old_ids)} new, "
        f"{len(old_ids - new_ids)} gone) for {len(new['watched_packages'])} packages"
    )
    if not args.check:
        args.output.write_text(json.dumps(new, indent=1, ensure_ascii=False) + "\n")
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
