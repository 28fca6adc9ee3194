"""ASCII armor for age files (the strict PEM-like form of the age spec).

An armored file is ``-----BEGIN AGE ENCRYPTED FILE-----``, the age file in canonical padded
base64 wrapped at 64 columns (the last line shorter or equal, never empty), and
``-----END AGE ENCRYPTED FILE-----``. Lines end in LF or CRLF. Only whitespace may surround the
armor; anything else (headers, spaces inside lines, non-canonical base64) is an
:class:`~kprivacy_nb.errors.ArmorError`. Both directions stream line by line.
"""

from __future__ import annotations

import base64
import binascii
from typing import BinaryIO

from ..errors import ArmorError

BEGIN = b"-----BEGIN AGE ENCRYPTED FILE-----"
END = b"-----END AGE ENCRYPTED FILE-----"
COLUMNS = 64
_WHITESPACE = b" \t\r\n"
_MAX_LEADING = 1 << 16
_B64 = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=")


class ArmorWriter:
    """A write-only file object that armors what is written to it into ``dst``."""

    def __init__(self, dst: BinaryIO) -> None:
        self._dst = dst
        self._pending = bytearray()
        self._closed = False
        dst.write(BEGIN + b"\n")

    def write(self, data: bytes | bytearray | memoryview) -> int:
        self._pending += data
        full = len(self._pending) - len(self._pending) % 48
        if full:
            encoded = base64.b64encode(bytes(self._pending[:full]))
            del self._pending[:full]
            self._dst.write(
                b"".join(encoded[i : i + COLUMNS] + b"\n" for i in range(0, len(encoded), COLUMNS))
            )
        return len(data)

    def close(self) -> None:
        """Write the last line and the END marker (does not close ``dst``)."""
        if self._closed:
            return
        self._closed = True
        if self._pending:
            self._dst.write(base64.b64encode(bytes(self._pending)) + b"\n")
        self._dst.write(END + b"\n")


def _strip_eol(line: bytes) -> bytes | None:
    if line.endswith(b"\r\n"):
        return line[:-2]
    if line.endswith(b"\n"):
        return line[:-1]
    return None


class ArmorReader:
    """A read-only file object that de-armors ``src`` strictly, line by line.

    ``prefix`` is data already read from ``src`` (e.g. while sniffing the format).
    """

    def __init__(self, src: BinaryIO, prefix: bytes = b"") -> None:
        self._src = src
        self._raw = bytearray(prefix)
        self._out = bytearray()
        self._done = False
        self._began = False
        self._short_seen = False

    def _raw_readline(self, limit: int) -> bytes:
        while b"\n" not in self._raw and len(self._raw) < limit:
            more = self._src.read(4096)
            if not more:
                break
            self._raw += more
        idx = self._raw.find(b"\n")
        cut = min(idx + 1 if idx >= 0 else len(self._raw), limit)
        line = bytes(self._raw[:cut])
        del self._raw[:cut]
        return line

    def _begin(self) -> None:
        skipped = 0
        while True:
            if not self._raw:
                more = self._src.read(4096)
                if not more:
                    raise ArmorError("armor: no BEGIN line found")
                self._raw += more
            stripped = self._raw.lstrip(_WHITESPACE)
            skipped += len(self._raw) - len(stripped)
            self._raw = bytearray(stripped)
            if self._raw or skipped > _MAX_LEADING:
                break
        line = _strip_eol(self._raw_readline(len(BEGIN) + 2))
        if line != BEGIN:
            raise ArmorError("armor: the file does not start with " + BEGIN.decode())
        self._began = True

    def _next_line(self) -> None:
        raw = self._raw_readline(COLUMNS + 2)
        line = _strip_eol(raw)
        if line is None:
            # Only the END line may lack a line ending (at end of file).
            if raw == END:
                line = raw
            else:
                raise ArmorError("armor: truncated or overlong line")
        if line == END:
            self._finish()
            return
        if self._short_seen:
            raise ArmorError("armor: a short line must be the last line before END")
        if not line or len(line) > COLUMNS or not _B64.issuperset(line):
            raise ArmorError("armor: invalid line (wrong length or character)")
        if len(line) < COLUMNS:
            self._short_seen = True
        elif b"=" in line[:-2]:
            raise ArmorError("armor: padding inside the body")
        try:
            decoded = base64.b64decode(line, validate=True)
        except (binascii.Error, ValueError):
            raise ArmorError("armor: invalid base64") from None
        if base64.b64encode(decoded) != line:
            raise ArmorError("armor: non-canonical base64")
        if b"=" in line and not self._short_seen:
            self._short_seen = True  # padding ends the body even on a full-width line
        self._out += decoded

    def _finish(self) -> None:
        self._done = True
        # Only whitespace may follow, and not too much of it.
        seen = len(self._raw)
        if self._raw.strip(_WHITESPACE):
            raise ArmorError("armor: data after the END line")
        while True:
            more = self._src.read(4096)
            if not more:
                break
            seen += len(more)
            if more.strip(_WHITESPACE) or seen > _MAX_LEADING:
                raise ArmorError("armor: data after the END line")
        self._raw.clear()

    def read(self, n: int = -1) -> bytes:
        if not self._began:
            self._begin()
        while not self._done and (n < 0 or len(self._out) < n):
            self._next_line()
        if n < 0:
            n = len(self._out)
        out = bytes(self._out[:n])
        del self._out[:n]
        return out

    def readinto(self, buf: bytearray | memoryview) -> int:
        data = self.read(len(buf))
        buf[: len(data)] = data
        return len(data)


def armor(data: bytes) -> bytes:
    """Armor a whole age file held in memory."""
    import io

    out = io.BytesIO()
    w = ArmorWriter(out)
    w.write(data)
    w.close()
    return out.getvalue()


def dearmor(text: bytes) -> bytes:
    """De-armor a whole armored file held in memory (strict)."""
    import io

    return ArmorReader(io.BytesIO(text)).read()
