"""``%kp_doctor``: the doctor's report for this notebook's environment and kernel.

Thin layer over :func:`kprivacy_nb.doctor.run_checks`: it adds what only the kernel knows —
its own connection file, IPython's history database and the notebook namespace (DP runs not
charged to a ledger). Setting: ``%config DoctorMagics.online = True`` also asks pip-audit.
"""

from __future__ import annotations

import contextlib
from typing import Any

from IPython.core.magic import Magics, line_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring
from traitlets import Bool
from traitlets.config import Configurable

from ..doctor.cli import FAMILIES
from ._base import PlainText, user_errors


def _connection_file() -> str | None:
    """This kernel's connection file, when running under ipykernel."""
    with contextlib.suppress(Exception):
        from ipykernel.kernelapp import IPKernelApp

        if IPKernelApp.initialized():
            return IPKernelApp.instance().abs_connection_file
    return None


@magics_class
class DoctorMagics(Magics, Configurable):
    """Environment checks: package advisories, server/kernel exposure, key and ledger hygiene."""

    online = Bool(False, config=True, help="Also ask pip-audit (network) when it is installed.")

    @magic_arguments()
    @argument("--requirements", "-r", default=None, help="audit this requirements file's pins")
    @argument("--check", action="append", choices=FAMILIES, default=None, help="only this family")
    @argument("--ignore", action="append", default=[], help="drop findings with this id")
    @argument("--path", default=None, help="working tree to scan (default: the current folder)")
    @argument("--online", action="store_true", help="also ask pip-audit (network)")
    @argument("--json", action="store_true", help="return the JSON text instead of the report")
    @line_magic
    @user_errors
    def kp_doctor(self, line: str = "") -> Any:
        """Is this notebook environment safe for private data? One finding per line.

        Checks known advisories of the installed packages (bundled snapshot, no network),
        the Jupyter server (auth off, 0.0.0.0, allow_origin "*", no TLS) and this kernel's
        transport, key file modes, keys and secret literals in the working tree, notebooks
        and IPython history, ledger permissions, and DP runs not charged to a ledger.

        Examples::

            %kp_doctor
            %kp_doctor --requirements requirements.txt --check advisories
            report = %kp_doctor
            [f.id for f in report.findings if f.severity == "high"]
        """
        args = parse_argstring(self.kp_doctor, line)
        from ..doctor import run_checks

        hm = getattr(self.shell, "history_manager", None)
        hist = getattr(hm, "hist_file", None)
        report = run_checks(
            requirements=args.requirements,
            checks=args.check,
            workdir=args.path,
            user_ns=self.shell.user_ns,
            kernel_connection_file=_connection_file(),
            history_file=None if hist in (None, ":memory:") else str(hist),
            online=args.online or self.online,
            ignore=args.ignore,
        )
        return PlainText(report.to_json()) if args.json else report
