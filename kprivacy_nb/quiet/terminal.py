"""``kprivacy_nb.quiet()``: quiet mode for scripts and CLI commands (no notebook needed).

The same filter as ``%quiet``, applied to this process's file descriptors 1 and 2: known-harmless
TensorFlow/absl/CUDA-stub/oneDNN lines, dp-accounting's RDP non-convergence warnings and Keras
progress-bar redraws are held back; errors and anything unrecognised still show.

>>> import kprivacy_nb
>>> kprivacy_nb.quiet()               # doctest: +SKIP
>>> import tensorflow as tf           # nothing from TensorFlow on the terminal  # doctest: +SKIP
>>> with kprivacy_nb.quiet():         # or just for a block  # doctest: +SKIP
...     model.fit(x, y)
>>> kprivacy_nb.quiet(show=True)      # lists what was held back, on stderr  # doctest: +SKIP
"""

from __future__ import annotations

import atexit
import sys
import threading
from typing import Any

from .install import QuietController

_lock = threading.Lock()
_controller: QuietController | None = None
_atexit_registered = False


def _stop() -> None:
    global _controller
    with _lock:
        if _controller is not None:
            _controller.uninstall()
            _controller.enabled = False


def _start(tf_log_level: str) -> bool:
    """Turn quiet mode on; True if this call did (it was off)."""
    global _controller, _atexit_registered
    with _lock:
        if _controller is None:
            _controller = QuietController(enabled=True, max_cells=1)
            _controller.held.max_lines_per_cell = 5000
            _controller.held.start_cell("held back by kprivacy_nb.quiet()")
        if _controller.installed:
            return False
        _controller.enabled = True
        _controller.apply_tf_log_level(tf_log_level)
        _controller.install_fds()
        if not _atexit_registered:
            atexit.register(_stop)  # output still in the pipes reaches the terminal at exit
            _atexit_registered = True
        return True


class Quiet:
    """What :func:`quiet` returns: a context manager that ends the quiet it started."""

    def __init__(self, started: bool) -> None:
        self._started = started

    def __enter__(self) -> Quiet:
        return self

    def __exit__(self, *_exc: Any) -> None:
        if self._started:
            _stop()
            self._started = False

    @property
    def on(self) -> bool:
        return _controller is not None and _controller.installed

    @property
    def held_back(self) -> str:
        """The lines held back so far (since the process first went quiet)."""
        return _controller.held.render() if _controller is not None else "Nothing was held back."

    def count(self) -> int:
        return _controller.held.count() if _controller is not None else 0

    def __repr__(self) -> str:
        state = "on" if self.on else "off"
        return (
            f"<kprivacy_nb.quiet: {state}; {self.count()} line(s) held back "
            "(kprivacy_nb.quiet(show=True) lists them)>"
        )


def quiet(on: bool | None = None, *, show: bool = False, tf_log_level: str = "1") -> Quiet:
    """Hold back TensorFlow's log noise on the terminal, as ``%quiet`` does in a notebook.

    ``quiet()`` turns it on for the rest of the process (``quiet(False)`` turns it off);
    ``with quiet():`` only for the block. ``quiet(show=True)`` lists what was held back (on
    stderr) and leaves quiet mode as it is. Before TensorFlow is imported it also sets
    ``TF_CPP_MIN_LOG_LEVEL`` (to ``tf_log_level``) unless that is already set.

    Example::

        import kprivacy_nb
        with kprivacy_nb.quiet():
            import tensorflow as tf      # no oneDNN / CUDA-stub / absl lines
            model.fit(x, y)              # errors and tracebacks still show
        kprivacy_nb.quiet(show=True)     # what was held back
    """
    if show:
        handle = Quiet(started=False)
        text = handle.held_back
        if _controller is not None:
            _controller.write_terminal(text + "\n")
        else:
            print(text, file=sys.stderr, flush=True)
        if on is None:
            return handle
    if on is False:
        _stop()
        return Quiet(started=False)
    return Quiet(started=_start(tf_log_level))
