"""kprivacy_nb — privacy-aware machine learning in Jupyter.

Load it in IPython/Jupyter with ``%load_ext kprivacy_nb``. Everything a magic does is also a
function here; heavy dependencies (TensorFlow) are imported only when first needed.

>>> import kprivacy_nb
>>> kprivacy_nb.compute_epsilon(n=60000, batch_size=256, epochs=15, noise_multiplier=1.1,
...                             delta=1e-5)  # doctest: +SKIP
1.13...
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# Public name -> module that defines it. Resolved lazily so `import kprivacy_nb` stays light.
_LAZY = {
    "compute_epsilon": "kprivacy_nb.dp.accounting",
    "calibrate_noise": "kprivacy_nb.dp.accounting",
    "epsilon_curve": "kprivacy_nb.dp.accounting",
    "Ledger": "kprivacy_nb.dp.ledger",
    "dp_fit": "kprivacy_nb.dp.trainer",
    "DPFitResult": "kprivacy_nb.dp.trainer",
    "make_private": "kprivacy_nb.dp.private",
    "secure_save": "kprivacy_nb.crypto.store",
    "secure_load": "kprivacy_nb.crypto.store",
    "redact": "kprivacy_nb.secrets",
    "quiet": "kprivacy_nb.quiet",  # the package is callable: kprivacy_nb.quiet()
    "errors": "kprivacy_nb.errors",
}

__all__ = sorted(_LAZY) + ["load_ipython_extension", "unload_ipython_extension", "__version__"]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'kprivacy_nb' has no attribute {name!r}")
    mod = importlib.import_module(module)
    value = mod if module.endswith("." + name) else getattr(mod, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__


def load_ipython_extension(ipython: Any) -> None:
    """Called by ``%load_ext kprivacy_nb``: register the magics, quiet mode and redaction."""
    from .magics import load

    load(ipython)


def unload_ipython_extension(ipython: Any) -> None:
    """Called by ``%unload_ext kprivacy_nb``: undo everything ``load_ipython_extension`` did."""
    from .magics import unload

    unload(ipython)
