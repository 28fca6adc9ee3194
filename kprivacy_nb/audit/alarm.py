"""The warning an audit raises when its empirical ε lower bound is above the proven ε."""

from __future__ import annotations

import warnings

__all__ = ["EpsilonExceededWarning", "warn"]


class EpsilonExceededWarning(RuntimeWarning):
    """An audit shows a larger ε than the run's proven ε: for :func:`~kprivacy_nb.audit.one_run`
    the guarantee is contradicted (a bug, or a 1-in-20 fluke at 95%); for
    :func:`~kprivacy_nb.audit.membership_inference` a heuristic bound to check with ``one_run``."""


def warn(message: str, stacklevel: int = 3) -> None:
    """Warn with ``message``; the default ``stacklevel`` points at the caller of the audit
    function that calls this."""
    warnings.warn(message, EpsilonExceededWarning, stacklevel=stacklevel)
