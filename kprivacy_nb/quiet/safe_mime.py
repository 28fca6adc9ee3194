"""Which parts of a stored output may be shown again, when nobody you trust vouches for it.

An encrypted output blob can be written by anyone who knows your public key. Re-displaying its
``text/html`` or ``application/javascript`` would run their code in your notebook page. Unless
the blob is signed by a key you trust, :func:`safe_output` keeps only passive types:

* ``text/plain``;
* ``image/png`` and ``image/jpeg`` (strict base64 only);
* ``image/svg+xml``, shown as an ``<img>`` with a ``data:`` URI (browsers run no script there);
* ``text/markdown`` without raw HTML or ``javascript:`` links (else shown as plain text).

Everything else is dropped and counted, so the caller can say what was held back.

>>> safe_output({"text/html": "<script>x()</script>", "text/plain": "x"}, {})[0]
{'text/plain': 'x'}
"""

from __future__ import annotations

import base64
import html
import re
from typing import Any

_B64_RE = re.compile(r"[A-Za-z0-9+/\s]*={0,2}\s*")
_RAW_HTML_RE = re.compile(r"<[A-Za-z!/?]|javascript:|vbscript:|data:text/html", re.IGNORECASE)
_IMAGE_META = ("width", "height")


def _text(value: Any) -> str | None:
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        value = "".join(value)
    return value if isinstance(value, str) else None


def _b64_image(value: Any) -> str | None:
    text = _text(value)
    if text is None or not _B64_RE.fullmatch(text):
        return None
    try:
        base64.b64decode("".join(text.split()), validate=True)
    except ValueError:
        return None
    return text


def safe_output(data: Any, metadata: Any) -> tuple[dict, dict, list[str]]:
    """The passive part of a MIME bundle: ``(data, metadata, dropped MIME types)``."""
    if not isinstance(data, dict):
        return {}, {}, ["(malformed output)"]
    out: dict[str, Any] = {}
    dropped: list[str] = []
    for mime, value in data.items():
        if mime == "text/plain" and _text(value) is not None:
            out[mime] = _text(value)
        elif mime in ("image/png", "image/jpeg") and _b64_image(value) is not None:
            out[mime] = _b64_image(value)
        elif mime == "image/svg+xml" and _text(value) is not None:
            uri = "data:image/svg+xml;base64," + base64.b64encode(_text(value).encode()).decode()
            out["text/html"] = f'<img src="{html.escape(uri)}" alt="SVG image">'
        elif mime == "text/markdown" and _text(value) is not None:
            if _RAW_HTML_RE.search(_text(value)):
                out.setdefault("text/plain", _text(value))
                dropped.append("text/markdown (raw HTML)")
            else:
                out[mime] = _text(value)
        else:
            dropped.append(str(mime))
    meta: dict[str, Any] = {}
    if isinstance(metadata, dict):
        for mime in ("image/png", "image/jpeg"):
            m = metadata.get(mime)
            if mime in out and isinstance(m, dict):
                kept = {k: m[k] for k in _IMAGE_META if type(m.get(k)) is int}
                if kept:
                    meta[mime] = kept
    return out, meta, dropped
