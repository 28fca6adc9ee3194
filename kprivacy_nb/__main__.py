"""``python -m kprivacy_nb`` / ``kprivacy-nb``: the command-line face of the core functions.

Each area contributes its subcommands through a ``register(subparsers)`` function in its own
``cli`` module; this file only builds the parser and maps errors to exit codes
(0 ok, 1 failure, 2 usage error; one line on stderr, no traceback).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import sys
from collections.abc import Sequence
from typing import Any

from . import __version__
from .errors import KPrivacyError
from .secrets import redact

# Modules that add subcommands (each defines ``register(subparsers)``).
CLI_MODULES = ("kprivacy_nb.dp.cli", "kprivacy_nb.crypto.cli", "kprivacy_nb.doctor.cli")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="kprivacy-nb",
        description=(
            "Privacy-aware ML from the command line: DP accounting (epsilon, calibrate, curve) "
            "and age encryption/signing (keygen, encrypt, decrypt, sign, verify, inspect)."
        ),
    )
    parser.add_argument("--version", action="version", version=f"kprivacy-nb {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="SUBCOMMAND", parser_class=_Parser)
    for module in CLI_MODULES:
        importlib.import_module(module).register(sub)
    return parser


def _quiet_for(args: argparse.Namespace) -> Any:
    """Subcommands that set ``quiet_output=True`` (they import TensorFlow or dp-accounting) run
    under :func:`kprivacy_nb.quiet`: their library log noise stays off the terminal."""
    if getattr(args, "quiet_output", False):
        from .quiet import quiet

        return quiet()
    return contextlib.nullcontext()


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        with _quiet_for(args):
            return int(args.func(args) or 0)
    except KPrivacyError as exc:
        print(f"kprivacy-nb: {redact(str(exc))}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("kprivacy-nb: interrupted", file=sys.stderr)
        return 1
    except BrokenPipeError:
        return 1


if __name__ == "__main__":
    sys.exit(main())
