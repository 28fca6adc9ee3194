"""Send what is written to *existing* stream objects into buffers for the duration of a block.

Swapping ``sys.stdout``/``sys.stderr`` (as IPython's ``capture_output`` does) misses every
reference taken before the swap: ``s = sys.stdout`` in an earlier cell, a
``logging.StreamHandler`` created with the old ``sys.stderr``. In a Jupyter kernel those objects
are ipykernel's ``OutStream``s, which publish straight to the frontend. :func:`hold_streams`
points the ``write`` of those very objects at the capture buffers and restores it afterwards.
C-level streams (``sys.__stdout__``) can't be patched; they write to fd 1/2, which
:class:`~kprivacy_nb.quiet.fdcapture.FdCapture` captures.

>>> import io, sys
>>> saved, sink = sys.stdout, io.StringIO()
>>> with hold_streams({"stdout": sink, "stderr": sink}, [saved]):  # doctest: +SKIP
...     saved.write("caught")
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterable, Iterator
from typing import Any

_MISSING = object()


def terminal_streams() -> list[Any]:
    """The stream objects that reach the user: ``sys.stdout``/``sys.stderr`` now, and the stream
    of every logging handler that writes to one of those or to an ipykernel ``OutStream``."""
    found = [sys.stdout, sys.stderr]
    kernel_stream = getattr(sys.modules.get("ipykernel.iostream"), "OutStream", None)
    loggers = [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]
    for logger in loggers:
        for handler in getattr(logger, "handlers", ()):
            stream = getattr(handler, "stream", None)
            if stream is None or isinstance(handler, logging.FileHandler):
                continue
            if kernel_stream is not None and isinstance(stream, kernel_stream):
                found.append(stream)
    unique: dict[int, Any] = {}
    for stream in found:
        unique.setdefault(id(stream), stream)
    return list(unique.values())


def _channel(stream: Any) -> str:
    name = getattr(stream, "name", None)
    return "stdout" if stream is sys.stdout or name in ("stdout", "<stdout>") else "stderr"


def flush_handlers() -> None:
    """Flush every logging handler (so buffered records are written while still captured)."""
    for logger in [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]:
        for handler in getattr(logger, "handlers", ()):
            with contextlib.suppress(Exception):
                handler.flush()


@contextlib.contextmanager
def hold_streams(sinks: dict[str, Any], streams: Iterable[Any]) -> Iterator[None]:
    """Inside the block, ``write``/``writelines`` of each of ``streams`` go to ``sinks[channel]``.

    Streams whose attributes can't be set (C-implemented files) are left alone.
    """
    patched: list[tuple[Any, dict[str, Any]]] = []
    for stream in streams:
        sink = sinks[_channel(stream)]
        with contextlib.suppress(Exception):
            stream.flush()  # earlier output goes where it was meant to
        saved: dict[str, Any] = {}
        try:
            for attr in ("write", "writelines"):
                saved[attr] = vars(stream).get(attr, _MISSING)
                setattr(stream, attr, getattr(sink, attr))
        except (AttributeError, TypeError):
            _restore(stream, saved)
            continue
        patched.append((stream, saved))
    try:
        yield
    finally:
        flush_handlers()
        for stream, saved in patched:
            with contextlib.suppress(Exception):
                stream.flush()  # a line still buffered by a filter in front goes to the sink
            _restore(stream, saved)


def _restore(stream: Any, saved: dict[str, Any]) -> None:
    for attr, value in saved.items():
        with contextlib.suppress(AttributeError, TypeError):
            if value is _MISSING:
                delattr(stream, attr)
            else:
                setattr(stream, attr, value)
