"""Resource bounds for untrusted files: everything is size-checked *before* it is allocated.

A file anyone can send you must not be able to make the loader allocate more than it says it
holds. The rules (docs/container.md, "Limits"):

* an archive member (zip, npz, ``.keras``) may expand to at most :func:`max_expanded_bytes`
  (default 1 GiB), and so may all members of one archive together;
* a tar member may be no larger than the tar part it comes from; sparse members are refused;
* an ``.npy`` array may not declare more bytes than follow its header;
* archives nested in archives (``model.weights.npz`` or HDF5 weights inside a ``.keras``) count
  against the same limit: everything one entry expands to, all levels together, is at most
  :func:`max_expanded_bytes` (see :func:`expansion_budget`);
* JSON is at most :data:`MAX_JSON_BYTES` (16 MiB) long and :data:`MAX_JSON_DEPTH` deep — parsed
  JSON takes up to ~50× its size in memory, and a real model's config is far smaller.

The expansion limit comes from, in order: :func:`expansion_limit` (what ``secure_load(...,
max_expanded_bytes=N)`` sets for one call), :func:`configure` (what ``%config
SecureMagics.max_expanded_bytes = N`` sets), the environment variable
``KPRIVACY_NB_MAX_EXPANDED``, else 1 GiB.

>>> with expansion_limit(1 << 20):
...     max_expanded_bytes()
1048576
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import os
from collections.abc import Iterator
from typing import Any

from ..errors import InvalidParameterError, ResourceLimitError, SerializationError

ENV_VAR = "KPRIVACY_NB_MAX_EXPANDED"
CONFIG_NAME = "SecureMagics.max_expanded_bytes"
DEFAULT_MAX_EXPANDED = 1 << 30
MAX_JSON_BYTES = 16 << 20
MAX_JSON_DEPTH = 64

_override: contextvars.ContextVar[int | None] = contextvars.ContextVar(
    "kprivacy_nb_max_expanded", default=None
)
_configured: int | None = None
_spent: contextvars.ContextVar[list[int] | None] = contextvars.ContextVar(
    "kprivacy_nb_expansion_spent", default=None
)


def _parse_limit(value: Any, origin: str) -> int:
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise InvalidParameterError(f"{origin} must be a number of bytes, not {value!r}") from None
    if n <= 0:
        raise InvalidParameterError(f"{origin} must be a positive number of bytes")
    return n


def configure(*, max_expanded_bytes: int | None) -> None:
    """Set the session-wide limit (what ``%config SecureMagics.max_expanded_bytes`` does)."""
    global _configured
    _configured = (
        None if max_expanded_bytes is None else _parse_limit(max_expanded_bytes, CONFIG_NAME)
    )


def max_expanded_bytes() -> int:
    """The per-entry expansion limit in force (see the module docstring for the order)."""
    override = _override.get()
    if override is not None:
        return override
    if _configured is not None:
        return _configured
    env = os.environ.get(ENV_VAR)
    if env:
        return _parse_limit(env, ENV_VAR)
    return DEFAULT_MAX_EXPANDED


@contextlib.contextmanager
def expansion_limit(limit: int | None) -> Iterator[None]:
    """Use ``limit`` bytes as the expansion limit inside the block (``None``: keep the current)."""
    if limit is None:
        yield
        return
    token = _override.set(_parse_limit(limit, "max_expanded_bytes"))
    try:
        yield
    finally:
        _override.reset(token)


def check_expansion(size: int, what: str) -> None:
    """Refuse ``what`` expanding to ``size`` bytes when that is above the limit."""
    limit = max_expanded_bytes()
    if size > limit:
        raise ResourceLimitError(
            f"refused: {what} would expand to {size:,} bytes, above the limit of {limit:,}. "
            f"If you trust this file, raise the limit with `%config {CONFIG_NAME} = N` or the "
            f"environment variable {ENV_VAR}=N"
        )


@contextlib.contextmanager
def expansion_budget() -> Iterator[None]:
    """Inside the block, every :func:`charge_expansion` adds up: one entry's nested archives
    together may not expand beyond the limit (a nested block shares the outer budget)."""
    if _spent.get() is not None:
        yield
        return
    token = _spent.set([0])
    try:
        yield
    finally:
        _spent.reset(token)


def charge_expansion(size: int, what: str) -> None:
    """Refuse ``what`` expanding to ``size`` bytes if it, or everything expanded so far in the
    current :func:`expansion_budget`, is above the limit."""
    check_expansion(size, what)
    spent = _spent.get()
    if spent is not None:
        spent[0] += size
        check_expansion(spent[0], f"{what} (with the archives it is nested in)")


def json_depth(obj: Any) -> int:
    """Nesting depth of a parsed JSON value, computed without recursion."""
    deepest = 0
    stack = [(obj, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            node = list(node.values())
        if isinstance(node, list):
            deepest = max(deepest, depth)
            stack.extend((child, depth + 1) for child in node)
    return deepest


def check_json_size(size: int, what: str, max_bytes: int = MAX_JSON_BYTES) -> None:
    """Refuse JSON text of ``size`` bytes before reading or parsing it."""
    if size > max_bytes:
        raise ResourceLimitError(
            f"refused: {what} is {size:,} bytes, above the JSON limit of {max_bytes:,} "
            "(kprivacy_nb.crypto.limits.MAX_JSON_BYTES)"
        )


def loads_json(data: bytes | str, what: str, *, max_bytes: int = MAX_JSON_BYTES) -> Any:
    """``json.loads`` for untrusted data: size and depth bounded, every failure a clear error."""
    check_json_size(len(data), what, max_bytes)
    try:
        value = json.loads(data)
    except RecursionError:
        raise ResourceLimitError(f"refused: {what} is nested too deeply") from None
    except (ValueError, UnicodeDecodeError, TypeError):
        raise SerializationError(f"malformed {what} (not valid JSON)") from None
    if json_depth(value) > MAX_JSON_DEPTH:
        raise ResourceLimitError(
            f"refused: {what} is nested more than {MAX_JSON_DEPTH} levels deep"
        )
    return value
