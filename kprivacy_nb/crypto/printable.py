"""Strings from a received file, made safe to print in a terminal or a notebook.

A file's claimed signer key, entry names and type strings are chosen by whoever wrote it. Printed
raw, escape codes in them could rewrite the line ("✅ verified"), clear the screen or hide text.
:func:`printable` escapes every control character the way ``repr`` does and bounds the length.

>>> printable("kppub1\\x1b[2K\\rgood signature")
'kppub1\\\\x1b[2K\\\\rgood signature'
"""

from __future__ import annotations

import unicodedata
from typing import Any

MAX_SHOWN = 200


def printable(value: Any, limit: int = MAX_SHOWN) -> str:
    """``value`` as text with control and invisible format characters escaped, cut to ``limit``."""
    text = value if isinstance(value, str) else repr(value)
    out = []
    for ch in text:
        if unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp") or ch == "\\":
            out.append(repr(ch)[1:-1] if ch != "\\" else "\\\\")
        else:
            out.append(ch)
    shown = "".join(out)
    return shown if len(shown) <= limit else shown[: limit - 1] + "…"
