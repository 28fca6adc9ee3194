"""Put :class:`~kprivacy_nb.quiet.filter.LineFilter` in front of ``sys.stdout``/``sys.stderr``.

In an ipykernel kernel the standard streams are ``OutStream`` objects, and ipykernel forwards
everything written to file descriptors 1 and 2 (TensorFlow's C++ logging included) through their
``write`` method from a watcher thread. Patching ``write`` on those instances therefore filters
both Python-level and fd-level output before it becomes a cell output. Elsewhere (terminal
IPython, plain Python) the stream object is wrapped instead; C++ lines then go straight to the
terminal, which is not a cell — :meth:`QuietController.install_fds` filters the descriptors
themselves for that case (scripts, the CLI: :func:`kprivacy_nb.quiet.quiet`).
Known-harmless Python log records are held back at the logging level in both cases.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable
from typing import Any

from .fdfilter import FdFilter
from .filter import HeldBack, LineFilter, LogNoiseFilter

TF_LOG_ENV = "TF_CPP_MIN_LOG_LEVEL"


class _StreamProxy:
    """A stand-in for a stream whose class can't be swapped (C-implemented TextIOWrapper)."""

    def __init__(self, stream: Any, line_filter: LineFilter) -> None:
        self._kp_stream = stream
        self._kp_filter = line_filter

    def write(self, text: str) -> int:
        return self._kp_filter.write(text)

    def flush(self) -> None:
        self._kp_filter.flush()
        self._kp_stream.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._kp_stream, name)


_guard = threading.local()
_QUIET_CLASSES: dict[type, type] = {}


def _downstream(stream: Any) -> Callable[[str], Any]:
    """Where filtered text goes: whatever wrapped ``write`` after us (IPython's tee), else the
    stream's own class ``write``."""
    nxt = stream.__dict__.get("_kp_next")
    base_write = stream.__dict__["_kp_base"].write
    if nxt is None or getattr(_guard, "active", False):
        return lambda text: base_write(stream, text)

    def call(text: str) -> Any:
        _guard.active = True
        try:
            return nxt(text)
        finally:
            _guard.active = False

    return call


def _quiet_write_property(base: type) -> property:
    def getter(stream: Any) -> Callable[[str], int]:
        line_filter = stream.__dict__.get("_kp_filter")
        if line_filter is None or getattr(_guard, "active", False):
            # Detached, or called back by a wrapper we feed: go straight to the stream.
            def passthrough(text: str) -> Any:
                return base.write(stream, text)

            passthrough._kp_own = True  # type: ignore[attr-defined]
            return passthrough

        def write(text: str) -> int:
            # A wrapper that kept this bound write (ipykernel 7 does) and is now fed our
            # filtered text must not filter it again: the partial line still held would be put
            # in front of it ("a\nb\nc" came out as "ca\nb\n").
            if getattr(_guard, "active", False):
                return base.write(stream, text)
            return line_filter.write(text)

        write._kp_own = True  # type: ignore[attr-defined]
        return write

    def setter(stream: Any, value: Any) -> None:
        # IPython's output capture does `stream.write = wrapper` and later restores what it read.
        if getattr(value, "_kp_own", False):
            stream.__dict__.pop("_kp_next", None)
        else:
            stream.__dict__["_kp_next"] = value

    def deleter(stream: Any) -> None:
        stream.__dict__.pop("_kp_next", None)

    return property(getter, setter, deleter)


def _quiet_class(base: type) -> type:
    cls = _QUIET_CLASSES.get(base)
    if cls is None:

        def flush(stream: Any) -> None:
            line_filter = stream.__dict__.get("_kp_filter")
            if line_filter is not None:
                line_filter.flush()
            base.flush(stream)

        cls = type(
            f"Quiet{base.__name__}",
            (base,),
            {"write": _quiet_write_property(base), "flush": flush, "__module__": __name__},
        )
        _QUIET_CLASSES[base] = cls
    return cls


class QuietController:
    """Owns the stream patches, the held-back buffer and the TensorFlow log-level setting."""

    def __init__(self, enabled: bool = True, max_cells: int = 20) -> None:
        self.enabled = enabled
        self.held = HeldBack(max_cells=max_cells)
        self._patches: list[tuple[str, Any, LineFilter, bool]] = []
        self._env_set_by_us: str | None = None
        self._cell_depth = 0
        self._log_filter = LogNoiseFilter(self.held, self._on)
        self._fd_filter: FdFilter | None = None

    # -- streams ---------------------------------------------------------------------------
    @property
    def installed(self) -> bool:
        return bool(self._patches) or self._fd_filter is not None

    def install_fds(self) -> None:
        """Filter file descriptors 1 and 2 (outside a kernel: a script, a CLI command)."""
        self._log_filter.attach()
        if self._fd_filter is None:
            self._fd_filter = FdFilter(self.held, self._on)
            self._fd_filter.start()

    def write_terminal(self, text: str) -> None:
        """Write to the real stderr, past the fd filter (if any)."""
        if self._fd_filter is not None:
            self._fd_filter.write_terminal(text)
        else:
            sys.stderr.write(text)
            sys.stderr.flush()

    def install(self) -> None:
        """Filter ``sys.stdout``/``sys.stderr``; call again to cover streams swapped in since."""
        self._log_filter.attach()
        for name in ("stdout", "stderr"):
            stream = getattr(sys, name)
            if (
                stream is None
                or isinstance(stream, _StreamProxy)
                or "_kp_filter" in getattr(stream, "__dict__", {})
            ):
                continue
            base = type(stream)
            swappable = hasattr(stream, "__dict__") and base.__module__ != "_io"
            if swappable:
                line_filter = LineFilter(
                    name, lambda text, s=stream: _downstream(s)(text), self.held, self._on
                )
                current = stream.__dict__.pop("write", None)  # someone's in-place wrapper
                stream.__dict__["_kp_base"] = base
                stream.__dict__["_kp_filter"] = line_filter
                stream.__class__ = _quiet_class(base)
                if current is not None:
                    stream.write = current
            else:
                line_filter = LineFilter(name, stream.write, self.held, self._on)
                setattr(sys, name, _StreamProxy(stream, line_filter))
            self._patches.append((name, stream, line_filter, swappable))

    def uninstall(self) -> None:
        self._log_filter.detach()
        if self._fd_filter is not None:
            self._fd_filter.stop()
            self._fd_filter = None
        for name, stream, line_filter, swapped in reversed(self._patches):
            line_filter.finish()
            if swapped:
                nxt = stream.__dict__.pop("_kp_next", None)
                stream.__dict__.pop("_kp_filter", None)
                base = stream.__dict__.pop("_kp_base", type(stream))
                stream.__class__ = base
                if nxt is not None:
                    stream.write = nxt
            else:
                current = getattr(sys, name)
                if isinstance(current, _StreamProxy) and current._kp_stream is stream:
                    setattr(sys, name, stream)
        self._patches.clear()
        self.restore_tf_log_level()

    def _on(self) -> bool:
        return self.enabled

    # -- cells -----------------------------------------------------------------------------
    def start_cell(self, label: str) -> None:
        if self._patches and self._cell_depth == 0:
            self.install()  # someone may have swapped sys.stdout/sys.stderr since
        self._cell_depth += 1
        if self._cell_depth == 1:
            self.held.start_cell(label)

    def end_cell(self) -> None:
        self._cell_depth = max(0, self._cell_depth - 1)
        for _name, _stream, line_filter, _in_place in self._patches:
            line_filter.finish()

    # -- TensorFlow's own log level --------------------------------------------------------
    def apply_tf_log_level(self, level: str = "1") -> str | None:
        """Lower TensorFlow's C++ logging if it isn't imported yet; else return a note saying so."""
        if "tensorflow" in sys.modules:
            return (
                "TensorFlow was imported before quiet mode: its C++ log level can't change now, "
                "so its log lines are filtered out of cell output instead (see %quiet --show)."
            )
        if TF_LOG_ENV not in os.environ:
            os.environ[TF_LOG_ENV] = level
            self._env_set_by_us = level
        return None

    def restore_tf_log_level(self) -> None:
        if self._env_set_by_us is not None and "tensorflow" not in sys.modules:
            if os.environ.get(TF_LOG_ENV) == self._env_set_by_us:
                del os.environ[TF_LOG_ENV]
        self._env_set_by_us = None
