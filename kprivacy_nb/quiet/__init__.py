"""``kprivacy_nb.quiet()``: hold back TensorFlow's log noise in scripts, as ``%quiet`` does in a
notebook — and the log-hygiene and output-redaction machinery behind both (no IPython imports).

This package is callable, so ``help(kprivacy_nb.quiet)`` shows this text:

``kprivacy_nb.quiet()`` turns quiet mode on for the rest of the process (``quiet(False)`` turns
it off); ``with kprivacy_nb.quiet():`` only for the block; ``kprivacy_nb.quiet(show=True)``
lists what was held back (on stderr). Known-harmless TensorFlow/absl/CUDA-stub/oneDNN lines,
progress-bar redraws and dp-accounting's RDP non-convergence warnings are held back at the file
descriptor level; errors and tracebacks still show. Signature and details:
:func:`kprivacy_nb.quiet.terminal.quiet`.

Example::

    import kprivacy_nb
    with kprivacy_nb.quiet():
        import tensorflow as tf      # no oneDNN / CUDA-stub / absl lines
        model.fit(x, y)              # errors and tracebacks still show
    kprivacy_nb.quiet(show=True)     # what was held back

The line classifier used by both:

>>> from kprivacy_nb.quiet import classify
>>> classify("I0000 00:00:1732550000.1 123 cpu_feature_guard.cc:210] oneDNN custom operations are on")
'noise'
>>> classify("ValueError: shapes do not match")
'keep'
"""

import sys
import types
from typing import Any

from .filter import HeldBack, LineFilter, classify
from .install import QuietController
from .terminal import Quiet, quiet

__all__ = ["HeldBack", "LineFilter", "Quiet", "QuietController", "classify", "quiet"]


class _CallableModule(types.ModuleType):
    """``kprivacy_nb.quiet`` is both this package and the ``quiet()`` function."""

    def __call__(self, *args: Any, **kwargs: Any) -> Quiet:
        return quiet(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
