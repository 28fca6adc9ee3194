"""Which parts of a stored output may be shown again, when nobody you trust vouches for it.

An encrypted output blob can be written by anyone who knows your public key. Re-displaying its
``text/html`` or ``application/javascript`` would run their code in your notebook page. Unless
the blob is signed by a key you trust, :func:`safe_output` keeps only passive types:

* ``text/plain``;
* ``image/png`` and ``image/jpeg`` (strict base64 only);
* ``image/svg+xml``, shown as an ``<img>`` with a ``data:`` URI (browsers run no script there);
* ``text/markdown`` without raw HTML, whose every link and image destination (inline ``[x](…)``,
  reference ``[1]: …``) is ``http:``, ``https:``, ``mailto:`` or relative (``page``, ``#anchor``),
  judged after decoding HTML entities and backslash escapes and removing control characters and
  whitespace — as a browser would read the ``href``. Anything else is shown as plain text.

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
_RAW_HTML_RE = re.compile(r"<[A-Za-z!/?]", re.IGNORECASE)  # also catches <scheme:…> autolinks
# Where a Markdown link destination starts: after "](" (inline links, images) or "]:" (reference
# definitions), possibly on the next line, possibly in <…>.
_LINK_DEST_RE = re.compile(r"\]\s*(?:\(|:)\s*(<[^>]*>?|[^\s)]*)")
_SAFE_SCHEMES = frozenset({"http", "https", "mailto"})
_INVISIBLE_RE = re.compile(r"[\x00-\x20\x7f-\x9f\s\u200b-\u200f\u2028\u2029\ufeff]+")
_MD_ESCAPE_RE = re.compile(r"\\([!-/:-@\[-`{-~])")
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


def safe_link(dest: str) -> bool:
    """Whether a link destination is http(s), mailto or relative, read as a browser would."""
    text = dest.strip("<>")
    for _ in range(3):  # entities may be nested (&amp;#106;): decode until nothing changes
        decoded = html.unescape(_MD_ESCAPE_RE.sub(r"\1", text))
        if decoded == text:
            break
        text = decoded
    text = _INVISIBLE_RE.sub("", text)
    scheme = re.match(r"([^/?#]*?):", text)
    return scheme is None or scheme.group(1).lower() in _SAFE_SCHEMES


def _passive_markdown(text: str) -> bool:
    if _RAW_HTML_RE.search(text):
        return False
    return all(safe_link(m.group(1)) for m in _LINK_DEST_RE.finditer(text))


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
            if not _passive_markdown(_text(value)):
                out.setdefault("text/plain", _text(value))
                dropped.append("text/markdown (raw HTML or unsafe link)")
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
