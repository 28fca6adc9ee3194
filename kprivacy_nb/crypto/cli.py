"""Placeholder: subcommands arrive with the issue that owns this area."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add this area's subcommands to the ``kprivacy-nb`` parser."""
