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


JS_DIR = os.path.join(os.path.dirname(__file__), "js")


def require_typage() -> list[str]:
    """The command running ``tests/js/age_js.mjs`` over typage (npm ``age-encryption``, the
    reference age implementation in TypeScript, which has age 1.3's post-quantum keys)."""
    node = require_tool("node", "apt-get install nodejs npm")
    if not os.path.isdir(os.path.join(JS_DIR, "node_modules", "age-encryption")):
        message = f"typage is not installed (npm ci --prefix {JS_DIR})"
        if in_ci():
            pytest.fail(f"CI: {message}; .ci/run must install it", pytrace=False)
        pytest.skip(f"*** SKIPPED: {message} ***")
    return [node, os.path.join(JS_DIR, "age_js.mjs")]
