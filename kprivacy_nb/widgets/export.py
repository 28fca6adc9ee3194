"""The one-click encrypted export panel (``%secure_export`` with no items).

Lists what can be exported from the notebook namespace (Keras models, DP run results, arrays,
DataFrames, matplotlib figures) plus the notebook file itself, lets the user pick recipients and
a signing key, and writes ONE signed age bundle. No secret ever enters widget state: recipients
are public keys, a passphrase is read from an environment variable whose *name* is typed.
"""

from __future__ import annotations

import html
import os
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ipywidgets as w

from ..crypto import serializers
from ..crypto.bundle import ExportResult, export_bundle
from ..crypto.keys import SIGNING_SUFFIX, keys_dir, read_named
from ..errors import KPrivacyError
from ..secrets import redact, secret_from_env

EXPORTABLE_TYPES = (
    "keras.model",
    "dp.result",
    "numpy.ndarray",
    "pandas.dataframe",
    "matplotlib.figure",
)
_HIDDEN = {"In", "Out", "exit", "quit", "get_ipython"}


def describe(obj: Any) -> str:
    """A short, value-free description of an object for the item list."""
    shape = getattr(obj, "shape", None)
    if shape is not None and not callable(shape):
        return f"{type(obj).__name__} {tuple(shape)}"
    name = getattr(obj, "name", None)
    if isinstance(name, str):
        return f"{type(obj).__name__} '{name}'"
    return type(obj).__name__


def exportable_items(namespace: Mapping[str, Any]) -> dict[str, str]:
    """``name → serialiser type`` for every exportable object in ``namespace``."""
    found: dict[str, str] = {}
    for name, obj in namespace.items():
        if name.startswith("_") or name in _HIDDEN:
            continue
        if isinstance(obj, (types.ModuleType, type, types.FunctionType)):
            continue
        try:
            ser = serializers.serializer_for(obj)
        except KPrivacyError:
            continue
        if ser.type in EXPORTABLE_TYPES:
            found[name] = ser.type
    return dict(sorted(found.items()))


def signing_key_names() -> list[str]:
    folder = keys_dir(create=False)
    if not folder.is_dir():
        return []
    return sorted(p.name[: -len(SIGNING_SUFFIX)] for p in folder.glob(f"*{SIGNING_SUFFIX}"))


class ExportPanel(w.VBox):
    """Tick items, choose recipients and a path, click **Encrypt & export**.

    >>> panel = ExportPanel(globals())          # doctest: +SKIP
    >>> panel.items["model"].value = True       # doctest: +SKIP
    >>> panel.pasted.value = "age1…"             # doctest: +SKIP
    >>> panel.export_button.click()             # doctest: +SKIP
    """

    def __init__(
        self,
        namespace: Mapping[str, Any],
        *,
        notebook_path: str | os.PathLike | None = None,
        output: str = "export.age",
    ) -> None:
        self._namespace = namespace
        self.result: ExportResult | None = None
        self.error: str | None = None
        self.items: dict[str, w.Checkbox] = {}
        self.item_box = w.VBox()
        self.refresh_button = w.Button(description="Refresh list", icon="refresh")
        self.refresh_button.on_click(lambda _b: self.refresh())

        self.include_notebook = w.Checkbox(description="this notebook", indent=False)
        self.notebook_path = w.Text(
            value=str(notebook_path or ""),
            placeholder="path/to/notebook.ipynb",
            description="notebook",
        )
        self.strip_outputs = w.Checkbox(description="strip outputs", indent=False)
        self.clear_widgets = w.Checkbox(description="clear widget state", indent=False)

        named = [name for name, value in read_named() if name and value.startswith("age1")]
        self.named = w.SelectMultiple(options=named, description="to (named)", rows=3)
        self.pasted = w.Textarea(
            placeholder="age1… public keys, one per line", description="to (keys)"
        )
        self.passphrase_env = w.Text(
            placeholder="or: NAME of an env var holding a passphrase", description="passphrase"
        )
        self.sign_with = w.Dropdown(
            options=["(don't sign)", *signing_key_names()], description="sign with"
        )
        self.output = w.Text(value=output, description="output")
        self.overwrite = w.Checkbox(description="overwrite", indent=False)
        self.export_button = w.Button(
            description="Encrypt & export", button_style="primary", icon="lock"
        )
        self.export_button.on_click(lambda _b: self.export())
        self.progress = w.FloatProgress(value=0.0, min=0.0, max=1.0, description="")
        self.status = w.HTML()
        self.refresh()
        super().__init__(
            [
                w.HTML("<b>🔒 Encrypted export</b> — one signed age file"),
                w.HBox([w.Label("What to export:"), self.refresh_button]),
                self.item_box,
                w.HBox([self.include_notebook, self.notebook_path]),
                w.HBox([self.strip_outputs, self.clear_widgets]),
                self.named,
                self.pasted,
                self.passphrase_env,
                self.sign_with,
                w.HBox([self.output, self.overwrite]),
                w.HBox([self.export_button, self.progress]),
                self.status,
            ]
        )

    def refresh(self) -> None:
        """Re-scan the namespace, keeping ticks of items that are still there."""
        ticked = {name for name, box in self.items.items() if box.value}
        self.items = {}
        for name, kind in exportable_items(self._namespace).items():
            label = f"{name} — {describe(self._namespace[name])} [{kind}]"
            self.items[name] = w.Checkbox(value=name in ticked, description=label, indent=False)
        self.item_box.children = list(self.items.values()) or [
            w.Label("(no models, arrays, data frames or figures in the namespace yet)")
        ]

    def selected(self) -> list[str]:
        return [name for name, box in self.items.items() if box.value]

    def _set_progress(self, fraction: float, what: str) -> None:
        self.progress.value = fraction
        self.progress.description = what[:20]

    def export(self) -> ExportResult | None:
        """Run the export with the panel's settings; errors are shown in the panel."""
        self.error = None
        self.result = None
        self.export_button.disabled = True
        try:
            recipients = list(self.named.value) + [
                line.strip() for line in self.pasted.value.splitlines() if line.strip()
            ]
            passphrase = None
            if self.passphrase_env.value.strip():
                if recipients:
                    raise KPrivacyError("choose recipients or a passphrase, not both")
                passphrase = secret_from_env(self.passphrase_env.value.strip())
            if not recipients and passphrase is None:
                raise KPrivacyError(
                    "no recipients: pick a named recipient, paste an age1… key, or name an "
                    "environment variable holding a passphrase"
                )
            items = {name: self._namespace[name] for name in self.selected()}
            notebook = None
            if self.include_notebook.value:
                notebook = self.notebook_path.value.strip()
                if not notebook:
                    raise KPrivacyError("type the notebook's path to include it")
            sign = self.sign_with.value if self.sign_with.value != "(don't sign)" else None
            self.result = export_bundle(
                items,
                Path(self.output.value.strip() or "export.age"),
                recipients=recipients or None,
                passphrase=passphrase,
                sign_with=sign,
                notebook=notebook,
                strip_outputs=self.strip_outputs.value,
                clear_widget_state=self.clear_widgets.value,
                force=self.overwrite.value,
                progress=self._set_progress,
            )
            self.status.value = self.result._repr_html_()
            return self.result
        except (KPrivacyError, OSError) as exc:
            self.error = redact(str(exc))
            self.progress.value = 0.0
            self.progress.description = "failed"
            self.status.value = (
                f"<div style='color:#b00020'><b>Export failed</b>: {html.escape(self.error)}"
                "<br>No file was written.</div>"
            )
            return None
        finally:
            self.export_button.disabled = False
