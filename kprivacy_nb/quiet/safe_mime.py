"""Which parts of a stored output may be shown again, when nobody you trust vouches for it.

An encrypted output blob can be written by anyone who knows your public key. Re-displaying its
``text/html`` or ``application/javascript`` would run their code in your notebook page. Unless
the blob is signed by a key you trust, :func:`safe_output` keeps only passive types:

* ``text/plain``, without terminal escape sequences (ANSI colours and cursor moves, OSC 8
  hyperlinks and titles) or other control characters except tab and line breaks;
* ``image/png`` and ``image/jpeg`` (strict base64 only);
* ``image/svg+xml``, shown as an ``<img>`` with a ``data:`` URI (browsers run no script there);
* ``text/markdown`` without raw HTML, whose every link and image destination (inline ``[x](…)``,
  reference ``[1]: …``) is ``http:``, ``https:``, ``mailto:`` or relative (``page``, ``#anchor``),
  judged after decoding HTML entities and backslash escapes and removing control characters and
  whitespace — as a browser would read the ``href``. Math (``$…$``, ``$$…$$``, ``\\(…\\)``,
  ``\\[…\\]``, ``\\begin{…}``) is not passive — MathJax's ``\\href``, ``\\style`` and ``\\class``
  reach the page — and how to escape it differs between frontends, so Markdown with math is
  shown as plain text. Remote images (``![x](https://…)``) would load as soon as the output is
  shown (a tracking beacon): each becomes the text "[remote image removed: HOST]". Anything
  else is shown as plain text.

Everything else is dropped and counted, so the caller can say what was held back.

>>> safe_output({"text/html": "<script>x()</script>", "text/plain": "x"}, {})[0]
{'text/plain': 'x'}
"""

from __future__ import annotations

import base64
import html
import re
from typing import Any
from urllib.parse import urlsplit

_B64_RE = re.compile(r"[A-Za-z0-9+/\s]*={0,2}\s*")
_RAW_HTML_RE = re.compile(r"<[A-Za-z!/?]", re.IGNORECASE)  # also catches <scheme:…> autolinks
# Where a Markdown link destination starts: after "](" (inline links, images) or "]:" (reference
# definitions), possibly on the next line, possibly in <…>.
_LINK_DEST_RE = re.compile(r"\]\s*(?:\(|:)\s*(<[^>]*>?|[^\s)]*)")
_SAFE_SCHEMES = frozenset({"http", "https", "mailto"})
_INVISIBLE_RE = re.compile(r"[\x00-\x20\x7f-\x9f\s\u200b-\u200f\u2028\u2029\ufeff]+")
_MD_ESCAPE_RE = re.compile(r"\\([!-/:-@\[-`{-~])")
_IMAGE_META = ("width", "height")
# Terminal escape sequences (7-bit and 8-bit forms): OSC … BEL/ST (titles, OSC 8 hyperlinks),
# CSI … final byte (colours, cursor moves), DCS/SOS/PM/APC strings, other two-byte escapes.
_ESCAPE_RE = re.compile(
    r"(?:\x1b\]|\x9d)[^\x07\x1b\x9c]*(?:\x07|\x1b\\|\x9c)?"
    r"|(?:\x1b\[|\x9b)[0-?]*[ -/]*[@-~]?"
    r"|(?:\x1b[PX^_]|[\x90\x98\x9e\x9f])[^\x1b\x9c]*(?:\x1b\\|\x9c)?"
    r"|\x1b[ -/]*[0-~]?"
)
_CONTROL_RE = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
_MATH_RE = re.compile(r"\$|\\[(\[]|\\begin\s*\{")
_INLINE_IMAGE_RE = re.compile(
    r"!\[[^\[\]]*\]\(\s*(<[^>]*>|[^\s)]*)(?:\s+(?:\"[^\"]*\"|'[^']*'))?\s*\)"
)
_HOST_RE = re.compile(r"[A-Za-z0-9.\-]+")


def plain_text(text: str) -> str:
    """``text`` without terminal escape sequences or control characters (tab, ``\\n`` and
    ``\\r`` stay): what an untrusted stream or ``text/plain`` output may show."""
    return _CONTROL_RE.sub("", _ESCAPE_RE.sub("", text))


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


def _link_text(dest: str) -> str:
    """A link destination as a browser reads it: entities and backslash escapes decoded,
    control characters and whitespace removed."""
    text = dest.strip("<>")
    for _ in range(3):  # entities may be nested (&amp;#106;): decode until nothing changes
        decoded = html.unescape(_MD_ESCAPE_RE.sub(r"\1", text))
        if decoded == text:
            break
        text = decoded
    return _INVISIBLE_RE.sub("", text)


def safe_link(dest: str) -> bool:
    """Whether a link destination is http(s), mailto or relative, read as a browser would."""
    scheme = re.match(r"([^/?#]*?):", _link_text(dest))
    return scheme is None or scheme.group(1).lower() in _SAFE_SCHEMES


def _remote_host(dest: str) -> str | None:
    """The host a destination loads from, if it is not on the notebook's own server."""
    text = _link_text(dest)
    if not re.match(r"(?:[a-z][a-z0-9+.\-]*:)?//", text, re.IGNORECASE) and not re.match(
        r"[a-z][a-z0-9+.\-]*:", text, re.IGNORECASE
    ):
        return None  # relative: the notebook server's own files
    host = urlsplit(text).hostname or ""
    return host if _HOST_RE.fullmatch(host) else "a remote host"


def _without_remote_images(text: str) -> tuple[str, bool]:
    """Markdown with each remote inline image replaced by a note; ``False`` when an image is
    left whose source may still be remote (reference images, odd syntax)."""

    def replace(m: re.Match[str]) -> str:
        host = _remote_host(m.group(1))
        return m.group(0) if host is None else f"[remote image removed: {host}]"

    text = _INLINE_IMAGE_RE.sub(replace, text)
    if "![" in text and any(
        _remote_host(m.group(1)) is not None for m in _LINK_DEST_RE.finditer(text)
    ):
        return text, False
    return text, True


def _passive_markdown(text: str) -> str | None:
    """Why Markdown can't be shown as Markdown, or ``None`` if it can."""
    if _RAW_HTML_RE.search(text) or not all(
        safe_link(m.group(1)) for m in _LINK_DEST_RE.finditer(text)
    ):
        return "text/markdown (raw HTML or unsafe link)"
    if _MATH_RE.search(text):
        return "text/markdown (math)"
    return None


def _safe_markdown(text: str, out: dict[str, Any], dropped: list[str]) -> None:
    why = _passive_markdown(text)
    if why is None:
        shown, images_ok = _without_remote_images(text)
        if not images_ok:
            why = "text/markdown (remote image)"
        elif shown != text:
            dropped.append("remote image(s) in text/markdown")
    if why is not None:
        out.setdefault("text/plain", plain_text(text))
        dropped.append(why)
    else:
        out["text/markdown"] = shown


def safe_output(data: Any, metadata: Any) -> tuple[dict, dict, list[str]]:
    """The passive part of a MIME bundle: ``(data, metadata, dropped MIME types)``."""
    if not isinstance(data, dict):
        return {}, {}, ["(malformed output)"]
    out: dict[str, Any] = {}
    dropped: list[str] = []
    for mime, value in data.items():
        if mime == "text/plain" and _text(value) is not None:
            out[mime] = plain_text(_text(value))
        elif mime in ("image/png", "image/jpeg") and _b64_image(value) is not None:
            out[mime] = _b64_image(value)
        elif mime == "image/svg+xml" and _text(value) is not None:
            uri = "data:image/svg+xml;base64," + base64.b64encode(_text(value).encode()).decode()
            out["text/html"] = f'<img src="{html.escape(uri)}" alt="SVG image">'
        elif mime == "text/markdown" and _text(value) is not None:
            _safe_markdown(_text(value), out, dropped)
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
