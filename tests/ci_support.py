"""In CI a missing tool is a failure, not a skip (CI sets ``CI``; ``.ci/run`` sets KPRIVACY_NB_CI)."""

from __future__ import annotations

import os
import shutil

import pytest


def in_ci() -> bool:
    return bool(os.environ.get("CI") or os.environ.get("KPRIVACY_NB_CI"))


def require_tool(name: str, install: str) -> str:
    """Path of the command ``name``; fails in CI and skips (loudly) elsewhere when it is missing."""
    path = shutil.which(name)
    if path:
        return path
    message = f"{name} is not installed ({install})"
    if in_ci():
        pytest.fail(f"CI: {message}; .ci/run must install it", pytrace=False)
    pytest.skip(f"*** SKIPPED: {message} ***")
