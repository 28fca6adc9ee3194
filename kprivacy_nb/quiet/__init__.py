"""Log hygiene and secret redaction of cell output (no IPython imports).

>>> from kprivacy_nb.quiet import classify
>>> classify("I0000 00:00:1732550000.1 123 cpu_feature_guard.cc:210] oneDNN custom operations are on")
'noise'
>>> classify("ValueError: shapes do not match")
'keep'
"""

from .filter import HeldBack, LineFilter, classify
from .install import QuietController

__all__ = ["HeldBack", "LineFilter", "QuietController", "classify"]
