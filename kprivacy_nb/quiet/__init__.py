"""Log hygiene and secret redaction of output (no IPython imports).

The package itself is callable: ``kprivacy_nb.quiet()`` is :func:`.terminal.quiet` (quiet mode
for scripts and CLI commands; ``%quiet`` in a notebook).

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
