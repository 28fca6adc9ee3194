"""The thin IPython layer: each area has one ``Magics`` class, registered on ``%load_ext``."""

from __future__ import annotations

import importlib
from typing import Any

# (module, class) of every Magics class, in registration order.
MAGIC_CLASSES: tuple[tuple[str, str], ...] = (
    ("kprivacy_nb.magics.quiet", "QuietMagics"),
    ("kprivacy_nb.magics.budget", "BudgetMagics"),
    ("kprivacy_nb.magics.fit", "FitMagics"),
    ("kprivacy_nb.magics.secure", "SecureMagics"),
    ("kprivacy_nb.magics.export", "ExportMagics"),
    ("kprivacy_nb.magics.audit", "AuditMagics"),
    ("kprivacy_nb.magics.doctor", "DoctorMagics"),
)

_LOADED: dict[int, list[Any]] = {}


def load(shell: Any) -> list[Any]:
    """Instantiate and register every Magics class on ``shell`` (idempotent)."""
    if id(shell) in _LOADED:
        return _LOADED[id(shell)]
    instances = []
    for module_name, class_name in MAGIC_CLASSES:
        cls = getattr(importlib.import_module(module_name), class_name)
        inst = cls(shell=shell)
        shell.register_magics(inst)
        if inst not in shell.configurables:
            shell.configurables.append(inst)
        if hasattr(inst, "on_load"):
            inst.on_load()
        instances.append(inst)
    _LOADED[id(shell)] = instances
    return instances


def unload(shell: Any) -> None:
    """Undo :func:`load`: magics, configurables, callbacks and filters each class installed."""
    instances = _LOADED.pop(id(shell), [])
    mm = shell.magics_manager
    for inst in reversed(instances):
        if hasattr(inst, "on_unload"):
            inst.on_unload()
        for kind, names in inst.magics.items():
            for name in names:
                mm.magics[kind].pop(name, None)
        mm.registry.pop(type(inst).__name__, None)
        if inst in shell.configurables:
            shell.configurables.remove(inst)
