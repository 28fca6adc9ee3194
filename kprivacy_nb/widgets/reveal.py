"""Decrypted output shown so that no saved notebook can hold it (``%secure_show`` in Jupyter).

A notebook file keeps a cell's outputs, and some savers keep widget state too (nbclient and
``jupyter nbconvert --execute`` by default; JupyterLab when "Save Widget State Automatically"
is on). So the plaintext never becomes a cell output: the cell shows a button and an empty
``Output`` widget. Only a click in a live frontend — never a headless run — sends the decrypted
outputs into the widget, and after ``seconds`` they are taken out again and the widget is
closed, so no widget state of them remains either.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import ipywidgets as w

HIDDEN_TEXT = "🔒 decrypted output hidden again (run %secure_show to see it again)"


class RevealPanel(w.VBox):
    """A "show" button over an ``Output`` widget that holds the decrypted outputs only between
    a click and ``seconds`` later (``seconds <= 0``: until the panel is hidden or closed)."""

    def __init__(self, items: Sequence[tuple[dict, dict]], seconds: float, label: str) -> None:
        self._items: list[tuple[dict, dict]] | None = list(items)
        self._seconds = seconds
        self._timer: threading.Timer | None = None
        self._lock = threading.Lock()
        when = f"hidden again after {seconds:g} s" if seconds and seconds > 0 else "until re-run"
        self.button = w.Button(
            description=f"🔓 Show {label} ({when}; never saved in the notebook)",
            layout=w.Layout(width="auto"),
        )
        self.output = w.Output()
        self.button.on_click(lambda _b: self.reveal())
        super().__init__([self.button, self.output])

    @property
    def shown(self) -> bool:
        return bool(self.output.outputs)

    def reveal(self) -> None:
        """Put the decrypted outputs in the widget (what a click does) and start the timer."""
        with self._lock:
            if self._items is None or self.shown:
                return
            self.output.outputs = tuple(
                {"output_type": "display_data", "data": data, "metadata": metadata}
                for data, metadata in self._items
            )
            self.button.disabled = True
            if self._seconds and self._seconds > 0:
                self._timer = threading.Timer(self._seconds, self.hide)
                self._timer.daemon = True
                self._timer.start()

    def hide(self) -> None:
        """Take the plaintext out of the widget (and this object) and close the output widget."""
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
            self._items = None
            self.output.outputs = ()
            self.output.close()
            self.children = (self.button,)
            self.button.description = HIDDEN_TEXT
            self.button.disabled = True
