"""Capture what a block of code writes to file descriptors 1 and 2 (subprocesses, C libraries).

Python-level capture (``sys.stdout`` swapped for a buffer) misses ``os.system``, subprocesses,
``print(..., file=sys.__stdout__)`` and C code writing to fd 1/2. :class:`FdCapture` points the
two descriptors at pipes of its own for the duration of a ``with`` block; a thread per pipe reads
them into memory (no temp file), and the original descriptors are restored on exit. In a Jupyter
kernel fd 1/2 normally lead to ipykernel's own forwarding pipes; while captured, nothing reaches
them, so nothing written in the block reaches the frontend or the kernel's log.

>>> with FdCapture() as cap:  # doctest: +SKIP
...     os.system("echo hi")
>>> cap.stdout  # doctest: +SKIP
'hi\\n'
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import select
import sys
import threading
from collections.abc import Callable
from typing import Any

DEFAULT_LIMIT = 64 << 20  # bytes kept per descriptor; more is counted and dropped


def flush_all() -> None:
    """Flush Python's and the C library's buffers so earlier output goes where it was meant."""
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        with contextlib.suppress(Exception):
            if stream is not None:
                stream.flush()
    with contextlib.suppress(Exception):
        ctypes.CDLL(None).fflush(None)


class PipeReader(threading.Thread):
    """Reads pipes until EOF, or until stopped and drained, in the order their data arrives.

    ``handlers`` maps each pipe's read end to the callable that gets its chunks; ``on_idle`` (if
    given) is called with a pipe's fd once it has been quiet for a moment after data came.
    """

    def __init__(
        self,
        handlers: dict[int, Callable[[bytes], object]],
        on_idle: Callable[[int], object] | None = None,
    ) -> None:
        super().__init__(name="kprivacy-pipes", daemon=True)
        self.handlers = handlers
        self.on_idle = on_idle
        self.stop = threading.Event()

    def run(self) -> None:
        open_fds = set(self.handlers)
        pending: set[int] = set()
        while open_fds:
            # Read the flag before waiting: what was written before stop() was called is then
            # seen by this wait. (Checked after a wait that had timed out, it let the last line
            # written just before stop() — a CLI's --json result — be dropped unread.)
            stopping = self.stop.is_set()
            ready, _, _ = select.select(sorted(open_fds), [], [], 0.05)
            for fd in pending - set(ready) if self.on_idle is not None else ():
                self.on_idle(fd)
            pending &= set(ready)
            if not ready:
                if stopping:
                    return  # writers left open by background processes: stop anyway
                continue
            for fd in ready:
                chunk = os.read(fd, 1 << 16)
                if chunk:
                    self.handlers[fd](chunk)
                    pending.add(fd)
                else:
                    open_fds.discard(fd)

    def close(self) -> None:
        """Stop once drained, wait, and close the read ends."""
        self.stop.set()
        self.join()
        for fd in self.handlers:
            os.close(fd)


class _Buffer:
    """Keeps up to ``limit`` bytes; counts the rest."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.data = bytearray()
        self.dropped = 0

    def add(self, chunk: bytes) -> None:
        room = max(self.limit - len(self.data), 0)
        self.data += chunk[:room]
        self.dropped += max(len(chunk) - room, 0)


class FdCapture:
    """Redirect fd 1 and 2 into in-memory buffers for the duration of a ``with`` block.

    After the block, :attr:`stdout` / :attr:`stderr` hold the decoded text and
    :attr:`dropped` how many bytes beyond ``limit`` (per descriptor) were discarded.
    """

    FDS = (1, 2)

    def __init__(self, limit: int = DEFAULT_LIMIT) -> None:
        self.limit = limit
        self._saved: dict[int, int] = {}
        self._buffers: dict[int, _Buffer] = {}
        self._reader: PipeReader | None = None
        self.stdout = ""
        self.stderr = ""
        self.dropped = 0

    def __enter__(self) -> FdCapture:
        flush_all()
        handlers = {}
        try:
            for fd in self.FDS:
                saved = os.dup(fd)
                self._saved[fd] = saved
                r, w = os.pipe()
                self._buffers[fd] = _Buffer(self.limit)
                handlers[r] = self._buffers[fd].add
                os.dup2(w, fd)
                os.close(w)
            self._reader = PipeReader(handlers)
            self._reader.start()
        except BaseException:
            for r in handlers:
                os.close(r)
            self._restore()
            raise
        return self

    def __exit__(self, *_exc: Any) -> None:
        self._restore()

    def _restore(self) -> None:
        flush_all()
        for fd, saved in self._saved.items():
            os.dup2(saved, fd)  # our pipe's write end is released here
            os.close(saved)
        self._saved.clear()
        if self._reader is not None:
            self._reader.close()
            self._reader = None
        texts = {
            fd: bytes(b.data).decode("utf-8", errors="replace") for fd, b in self._buffers.items()
        }
        self.dropped = sum(b.dropped for b in self._buffers.values())
        self._buffers.clear()
        self.stdout = texts.get(1, "")
        self.stderr = texts.get(2, "")
