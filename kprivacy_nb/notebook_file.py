"""Find and clean the current notebook file (for encrypted export), without IPython imports.

JupyterLab sets ``__session__`` in the kernel namespace to the notebook's path and VS Code sets
``__vsc_ipynb_file__``; otherwise the user types the path.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .errors import InvalidParameterError

NAMESPACE_HINTS = ("__vsc_ipynb_file__", "__session__", "__notebook_path__")


def find_notebook_path(
    namespace: Mapping[str, Any], cwd: str | os.PathLike | None = None
) -> Path | None:
    """The path of the running notebook, from the hints frontends leave in the namespace."""
    base = Path(cwd or os.getcwd())
    for key in NAMESPACE_HINTS:
        value = namespace.get(key)
        if isinstance(value, str) and value.endswith(".ipynb"):
            path = Path(value).expanduser()
            if not path.is_absolute():
                # JupyterLab gives the path relative to the server root; the kernel usually runs
                # in the notebook's folder, so try the file name there too.
                for candidate in (base / path, base / path.name):
                    if candidate.exists():
                        return candidate.resolve()
            elif path.exists():
                return path
    return None


def clean_notebook(
    data: bytes, *, strip_outputs: bool = False, clear_widget_state: bool = False
) -> bytes:
    """Return the notebook JSON with outputs and/or saved widget state removed.

    Widget state (``metadata.widgets``) can hold the values the widgets showed, so it is worth
    clearing before sharing.
    """
    try:
        nb = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidParameterError(f"the notebook file is not valid JSON: {exc}") from None
    if not isinstance(nb, dict) or "cells" not in nb:
        raise InvalidParameterError("the file does not look like a Jupyter notebook (no cells)")
    if strip_outputs:
        for cell in nb["cells"]:
            if cell.get("cell_type") == "code":
                cell["outputs"] = []
                cell["execution_count"] = None
    if clear_widget_state:
        nb.get("metadata", {}).pop("widgets", None)
        for cell in nb["cells"]:
            for out in cell.get("outputs", []):
                out.get("data", {}).pop("application/vnd.jupyter.widget-view+json", None)
    return (json.dumps(nb, indent=1, ensure_ascii=False) + "\n").encode()
