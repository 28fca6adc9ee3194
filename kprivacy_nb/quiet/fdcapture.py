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
from typing import Any

DEFAULT_LIMIT = 64 << 20  # bytes kept per descriptor; more is counted and dropped


def _flush_all() -> None:
    """Flush Python's and the C library's buffers so earlier output goes where it was meant."""
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        with contextlib.suppress(Exception):
            if stream is not None:
                stream.flush()
    with contextlib.suppress(Exception):
        ctypes.CDLL(None).fflush(None)


class _PipeReader(threading.Thread):
    """Reads one pipe into memory until EOF, or until stopped and drained."""

    def __init__(self, fd: int, limit: int) -> None:
        super().__init__(name=f"kprivacy-fdcapture-{fd}", daemon=True)
        self.fd = fd
        self.limit = limit
        self.data = bytearray()
        self.dropped = 0
        self.stop = threading.Event()

    def run(self) -> None:
        while True:
            ready, _, _ = select.select([self.fd], [], [], 0.05)
            if not ready:
                if self.stop.is_set():
                    return  # writers left open by background processes: stop anyway
                continue
            chunk = os.read(self.fd, 1 << 16)
            if not chunk:
                return
            room = self.limit - len(self.data)
            self.data += chunk[: max(room, 0)]
            self.dropped += max(len(chunk) - max(room, 0), 0)


class FdCapture:
    """Redirect fd 1 and 2 into in-memory buffers for the duration of a ``with`` block.

    After the block, :attr:`stdout` / :attr:`stderr` hold the decoded text and
    :attr:`dropped` how many bytes beyond ``limit`` (per descriptor) were discarded.
    """

    FDS = (1, 2)

    def __init__(self, limit: int = DEFAULT_LIMIT) -> None:
        self.limit = limit
        self._saved: dict[int, int] = {}
        self._readers: dict[int, _PipeReader] = {}
        self.stdout = ""
        self.stderr = ""
        self.dropped = 0

    def __enter__(self) -> FdCapture:
        _flush_all()
        try:
            for fd in self.FDS:
                saved = os.dup(fd)
                self._saved[fd] = saved
                r, w = os.pipe()
                reader = _PipeReader(r, self.limit)
                self._readers[fd] = reader
                os.dup2(w, fd)
                os.close(w)
                reader.start()
        except BaseException:
            self._restore()
            raise
        return self

    def __exit__(self, *_exc: Any) -> None:
        self._restore()

    def _restore(self) -> None:
        _flush_all()
        for fd, saved in self._saved.items():
            os.dup2(saved, fd)  # our pipe's write end is released here
            os.close(saved)
        self._saved.clear()
        texts = {}
        for fd, reader in self._readers.items():
            if reader.is_alive():
                reader.stop.set()
                reader.join()
            os.close(reader.fd)
            texts[fd] = bytes(reader.data).decode("utf-8", errors="replace")
            self.dropped += reader.dropped
        self._readers.clear()
        self.stdout = texts.get(1, "")
        self.stderr = texts.get(2, "")
