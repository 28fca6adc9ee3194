"""``kprivacy-nb doctor [--json] [--requirements FILE]``: the doctor's report from the shell.

Exit code 1 when a high-severity finding is present (so it can gate CI), 0 otherwise, 2 on a
usage error. With ``--json`` the last stdout line is ``{"findings": [...], ...}``.
"""

from __future__ import annotations

import argparse

FAMILIES = ("advisories", "server", "keys", "privacy")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``doctor`` to the ``kprivacy-nb`` parser."""
    p = subparsers.add_parser(
        "doctor",
        help="is this environment safe for private data? (advisories, server, keys, ledger)",
        description="Check package advisories (bundled snapshot, no network), Jupyter server "
        "and kernel exposure, key and secret hygiene, and ledger permissions. Exits 1 when a "
        "high-severity finding is present. Examples: kprivacy-nb doctor; kprivacy-nb doctor "
        "--requirements requirements.txt --check advisories --json",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument(
        "--requirements",
        "-r",
        metavar="FILE",
        default=None,
        help="audit the pins of this requirements file instead of the installed packages",
    )
    p.add_argument(
        "--check",
        action="append",
        choices=FAMILIES,
        default=None,
        help="run only this check family (repeatable; default: all)",
    )
    p.add_argument(
        "--ignore",
        action="append",
        default=[],
        metavar="ID",
        help="drop findings with this id (an accepted risk; repeatable)",
    )
    p.add_argument("--path", default=None, help="working tree to scan for keys (default: .)")
    p.add_argument(
        "--online",
        action="store_true",
        help="also ask pip-audit (uses the network; only if pip-audit is installed)",
    )
    p.set_defaults(func=cmd_doctor)


def cmd_doctor(args: argparse.Namespace) -> int:
    from . import run_checks

    report = run_checks(
        requirements=args.requirements,
        checks=args.check,
        workdir=args.path,
        online=args.online,
        ignore=args.ignore,
    )
    print(report.to_json() if args.json else repr(report))
    return 1 if report.has_high else 0
