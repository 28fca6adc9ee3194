"""The age header: ``age-encryption.org/v1``, one stanza per recipient, ``--- MAC``.

A stanza is ``-> TYPE ARG…`` then its body in canonical unpadded base64, wrapped at 64 columns
and ended by a short (possibly empty) line. Parsing is strict (canonical base64, printable
arguments, bounded lines and stanza count) and keeps the exact bytes the MAC covers.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import BinaryIO

from ...errors import HeaderError
from .primitives import header_mac

VERSION_LINE = b"age-encryption.org/v1"
INTRO = VERSION_LINE + b"\n"
MAX_LINE = 1 << 16
MAX_STANZAS = 1024
_ARG_RE = re.compile(rb"[\x21-\x7e]+")
_B64_CHARS = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")


def b64encode(data: bytes) -> bytes:
    """Canonical unpadded standard base64, as in age headers."""
    return base64.b64encode(data).rstrip(b"=")


def b64decode(data: bytes) -> bytes:
    """Strict unpadded base64: only the alphabet, no padding, canonical trailing bits."""
    if not _B64_CHARS.issuperset(data) or len(data) % 4 == 1:
        raise HeaderError("age header: invalid base64")
    try:
        out = base64.b64decode(data + b"=" * (-len(data) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise HeaderError("age header: invalid base64") from None
    if b64encode(out) != data:
        raise HeaderError("age header: non-canonical base64")
    return out


@dataclass
class Stanza:
    """One recipient stanza: a type, its arguments, and a body."""

    type: str
    args: list[str]
    body: bytes

    def encode(self) -> bytes:
        line = b"-> " + b" ".join(a.encode() for a in [self.type, *self.args]) + b"\n"
        enc = b64encode(self.body)
        lines = [enc[i : i + 64] for i in range(0, len(enc), 64)]
        if not lines or len(lines[-1]) == 64:
            lines.append(b"")
        return line + b"".join(x + b"\n" for x in lines)

    def arg_bytes(self, count: int, what: str, size: int | None = None) -> list[bytes]:
        """The arguments base64-decoded, checking there are ``count`` (and the first is
        ``size`` bytes): the common shape of a key-agreement stanza."""
        if len(self.args) != count:
            raise HeaderError(f"age header: {what} stanza must have {count} argument(s)")
        out = [b64decode(a.encode()) for a in self.args]
        if size is not None and len(out[0]) != size:
            raise HeaderError(f"age header: {what} share must be {size} bytes")
        return out


@dataclass
class Header:
    """A parsed age header; ``mac_input`` is the exact bytes the MAC covers."""

    stanzas: list[Stanza]
    mac: bytes
    mac_input: bytes = field(repr=False)

    def types(self) -> list[str]:
        return [s.type for s in self.stanzas]


class Source:
    """A byte source with a small push-back buffer, so the header can be read by lines."""

    def __init__(self, src: BinaryIO, prefix: bytes = b"") -> None:
        self.src = src
        self.buf = bytearray(prefix)

    def readline(self, limit: int = MAX_LINE) -> bytes:
        while b"\n" not in self.buf and len(self.buf) < limit:
            more = self.src.read(4096)
            if not more:
                break
            self.buf += more
        idx = self.buf.find(b"\n")
        cut = min(idx + 1 if idx >= 0 else len(self.buf), limit)
        line = bytes(self.buf[:cut])
        del self.buf[:cut]
        return line

    def readinto_full(self, view: memoryview) -> int:
        """Fill ``view`` as far as possible (short only at end of input)."""
        n = 0
        if self.buf:
            k = min(len(self.buf), len(view))
            view[:k] = self.buf[:k]
            del self.buf[:k]
            n = k
        return n + readinto_full(self.src, view[n:])

    def read_exact_or_less(self, size: int) -> bytes:
        buf = bytearray(size)
        n = self.readinto_full(memoryview(buf))
        return bytes(buf[:n])


def readinto_full(src: BinaryIO, view: memoryview) -> int:
    """Fill ``view`` from ``src`` as far as possible (short only at end of input)."""
    n = 0
    readinto = getattr(src, "readinto", None)
    while n < len(view):
        if readinto is not None:
            got = readinto(view[n:])
        else:
            data = src.read(len(view) - n)
            got = len(data)
            view[n : n + got] = data
        if not got:
            break
        n += got
    return n


def parse_header(source: Source) -> Header:
    """Read the header from ``source``, leaving it positioned at the payload nonce."""
    first = source.readline(len(INTRO) + 1)
    if first != INTRO:
        if first.startswith(b"age-encryption.org/"):
            raise HeaderError("age header: unsupported format version")
        raise HeaderError("age header: not an age file (missing 'age-encryption.org/v1')")
    mac_input = bytearray(first)
    stanzas: list[Stanza] = []
    while True:
        line = source.readline()
        if not line.endswith(b"\n"):
            raise HeaderError("age header: truncated or overlong line")
        if line.startswith(b"--- "):
            mac_b64 = line[4:-1]
            if len(mac_b64) != 43:
                raise HeaderError("age header: malformed MAC line")
            mac = b64decode(mac_b64)
            mac_input += b"---"
            return Header(stanzas, mac, bytes(mac_input))
        if not line.startswith(b"-> "):
            raise HeaderError("age header: expected a stanza ('-> ') or the MAC line ('--- ')")
        if len(stanzas) >= MAX_STANZAS:
            raise HeaderError("age header: too many stanzas")
        mac_input += line
        args = line[3:-1].split(b" ")
        if not all(_ARG_RE.fullmatch(a) for a in args):
            raise HeaderError("age header: empty or invalid stanza argument")
        stanzas.append(
            Stanza(args[0].decode(), [a.decode() for a in args[1:]], _body(source, mac_input))
        )


def _body(source: Source, mac_input: bytearray) -> bytes:
    body = bytearray()
    while True:
        bline = source.readline(66)
        if not bline.endswith(b"\n"):
            raise HeaderError("age header: stanza body line missing or too long")
        mac_input += bline
        content = bline[:-1]
        if len(content) > 64:
            raise HeaderError("age header: stanza body line too long")
        body += b64decode(content) if content else b""
        if len(content) < 64:
            return bytes(body)


def encode_header(stanzas: Sequence[Stanza], file_key: bytes) -> bytes:
    """The header for ``stanzas``, MAC'd with ``file_key``."""
    head = INTRO + b"".join(s.encode() for s in stanzas) + b"---"
    return head + b" " + b64encode(header_mac(file_key, head)) + b"\n"
