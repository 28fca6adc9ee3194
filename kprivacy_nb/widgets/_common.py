"""Small helpers shared by the widgets."""

from __future__ import annotations

import asyncio
import io
from collections.abc import Callable
from typing import Any


class Debouncer:
    """Call ``func`` once, ``delay`` seconds after the last :meth:`trigger`.

    Inside a running event loop (a Jupyter kernel handling widget messages) calls are coalesced
    with ``loop.call_later``; with no running loop (plain Python, tests) ``func`` runs at once.
    """

    def __init__(self, func: Callable[[], Any], delay: float = 0.25) -> None:
        self.func = func
        self.delay = delay
        self._handle: asyncio.TimerHandle | None = None

    def trigger(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if loop is None or self.delay <= 0:
            self.func()
            return
        self._handle = loop.call_later(self.delay, self._fire)

    def _fire(self) -> None:
        self._handle = None
        self.func()

    @property
    def pending(self) -> bool:
        return self._handle is not None


def figure_png(fig: Any) -> bytes:
    """Render a matplotlib ``Figure`` to PNG bytes (no pyplot, no global state)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    return buf.getvalue()
