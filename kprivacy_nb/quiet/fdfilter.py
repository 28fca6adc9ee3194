"""Quiet mode on file descriptors 1 and 2: scripts, CLI commands, a kernel's terminal output.

In a Jupyter kernel quiet mode filters ipykernel's streams (:mod:`.install`). Outside one there
are no cells: TensorFlow's C++ logging writes straight to fd 2 and reaches the terminal.
:class:`FdFilter` points fd 1 and 2 at pipes; a thread per pipe cuts what arrives into lines,
runs them through the same :class:`~kprivacy_nb.quiet.filter.LineFilter` as ``%quiet`` and writes
what is kept to the original descriptors. Subprocesses started meanwhile inherit the pipes, so
their output is filtered too. :func:`filtered_pipe` is the same reader for a pipe of one's own
(``make demo`` reads its kernel's output through it).

While filtered, fd 1/2 are pipes, not terminals: libraries that check ``isatty()`` print plain
(uncoloured, non-redrawing) output.
"""

from __future__ import annotations

import codecs
import contextlib
import os
from collections.abc import Callable
from typing import BinaryIO

from .fdcapture import PipeReader, flush_all
from .filter import HeldBack, LineFilter


def write_fd(fd: int, text: str) -> None:
    """Write all of ``text`` to ``fd``; a closed reader (``| head``) drops it silently."""
    data = text.encode("utf-8", errors="replace")
    with contextlib.suppress(OSError):
        while data:
            data = data[os.write(fd, data) :]


class _Decoder:
    """Bytes from a pipe → text for a LineFilter (UTF-8 split across reads is kept whole)."""

    def __init__(self, line_filter: LineFilter, log: BinaryIO | None = None) -> None:
        self.line_filter = line_filter
        self.log = log
        self._decode = codecs.getincrementaldecoder("utf-8")("replace").decode

    def data(self, chunk: bytes) -> None:
        if self.log is not None:
            self.log.write(chunk)
            self.log.flush()
        self.line_filter.write(self._decode(chunk))

    def idle(self) -> None:
        self.line_filter.flush()  # a prompt without a newline still shows

    def finish(self) -> None:
        tail = self._decode(b"", final=True)
        if tail:
            self.line_filter.write(tail)
        self.line_filter.finish()


def filtered_pipe(
    line_filter: LineFilter, log: BinaryIO | None = None
) -> tuple[int, Callable[[], None]]:
    """A pipe whose lines go through ``line_filter`` (and, raw, to ``log``).

    Returns the write end (give it to a child process; close your copy once it has started) and
    a ``close()`` that waits for the reader to drain the pipe and finishes the filter.
    """
    r, w = os.pipe()
    decoder = _Decoder(line_filter, log)
    reader = PipeReader({r: decoder.data}, lambda _fd: decoder.idle())
    reader.start()

    def close() -> None:
        with contextlib.suppress(OSError):
            os.close(w)
        reader.close()
        decoder.finish()

    return w, close


class FdFilter:
    """Filter fd 1 and 2 of this process between :meth:`start` and :meth:`stop`."""

    FDS = ((1, "stdout"), (2, "stderr"))

    def __init__(self, held: HeldBack, enabled: Callable[[], bool]) -> None:
        self.held = held
        self.enabled = enabled
        self._saved: dict[int, int] = {}
        self._decoders: dict[int, _Decoder] = {}  # by the read end of each pipe
        self._reader: PipeReader | None = None

    @property
    def active(self) -> bool:
        return bool(self._saved)

    def start(self) -> None:
        if self.active:
            return
        flush_all()
        pipes = []
        try:
            for fd, name in self.FDS:
                saved = os.dup(fd)
                self._saved[fd] = saved
                line_filter = LineFilter(
                    name, lambda text, out=saved: write_fd(out, text), self.held, self.enabled
                )
                r, w = os.pipe()
                self._decoders[r] = _Decoder(line_filter)
                pipes.append((fd, w))
            # One reader for both pipes keeps stdout and stderr lines in the order they came.
            self._reader = PipeReader(
                {r: d.data for r, d in self._decoders.items()},
                lambda r: self._decoders[r].idle(),
            )
            self._reader.start()
            for fd, w in pipes:
                os.dup2(w, fd)
        except BaseException:
            self.stop()
            raise
        finally:
            for _fd, w in pipes:
                os.close(w)

    def stop(self) -> None:
        """Restore fd 1/2 after everything written so far went through the filter."""
        flush_all()
        for fd, saved in self._saved.items():
            os.dup2(saved, fd)  # our pipe's write end is released here
        if self._reader is not None:
            self._reader.close()
            self._reader = None
        else:
            for r in self._decoders:
                os.close(r)
        for decoder in self._decoders.values():
            decoder.finish()
        for saved in self._saved.values():
            os.close(saved)
        self._saved.clear()
        self._decoders.clear()

    def write_terminal(self, text: str, fd: int = 2) -> None:
        """Write to the real fd 1/2, past the filter (for the held-back listing itself), after
        everything written before it."""
        active = self.active
        self.stop()
        write_fd(fd, text)
        if active:
            self.start()
