"""Encrypt and decrypt: pick a file key, wrap it for every recipient, MAC the header, STREAM the
payload — and the reverse, trying each identity on each stanza of a known type."""

from __future__ import annotations

import hmac
import io
import os
from collections.abc import Iterator, Sequence
from typing import BinaryIO, Protocol

from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from ...errors import HeaderError, HMACError, InvalidParameterError, NoIdentityMatchError
from .. import armor as _armor
from . import registry
from .format import INTRO, MAX_STANZAS, Header, Source, Stanza, encode_header, parse_header
from .pipeline import drain
from .primitives import FILE_KEY_LEN, TAG, header_mac
from .stream import (
    BATCH,
    CHUNK,
    ENC_CHUNK,
    NONCE_LEN,
    Ring,
    nonce,
    open_chunks,
    payload_key,
    seal_chunks,
)


class Recipient(Protocol):
    """Something a file key can be wrapped for; ``labels`` say what it may be mixed with."""

    labels: frozenset[str]

    def wrap(self, file_key: bytes) -> list[Stanza]: ...


class Identity(Protocol):
    """Something that may open a stanza: the file key, or ``None`` when the stanza is not its."""

    def unwrap(self, stanza: Stanza) -> bytes | None: ...


# --- file key ------------------------------------------------------------------------------------


def check_recipients(recipients: Sequence[Recipient]) -> None:
    """age's mixing rules: a passphrase is alone; post-quantum recipients only with their kind
    (an X25519 stanza beside them would make the file as breakable as X25519 alone)."""
    if not recipients:
        raise InvalidParameterError("at least one recipient (or a passphrase) is required")
    _check_stanza_count(len(recipients))
    labels = [getattr(r, "labels", frozenset()) for r in recipients]
    if "passphrase" in set().union(*labels) and len(recipients) != 1:
        raise InvalidParameterError("a passphrase can't be combined with other recipients")
    if len(set(labels)) > 1:
        raise InvalidParameterError(
            "post-quantum (age1pq1…) recipients can't be combined with other recipient types "
            "(the file would be only as strong as the weakest); encrypt to age1pq1… keys only"
        )


def _check_stanza_count(n: int) -> None:
    """Refuse a header our own reader would refuse (:data:`~.format.MAX_STANZAS`)."""
    if n > MAX_STANZAS:
        raise InvalidParameterError(
            f"too many recipients: {n:,} stanzas, and an age file may hold at most "
            f"{MAX_STANZAS:,} (more would not decrypt with kprivacy-nb); split the recipients "
            "over several files"
        )


def recover_file_key(header: Header, identities: Sequence[Identity]) -> bytes:
    """The file key from the first stanza an identity opens, after checking the header MAC."""
    types = header.types()
    for t in set(types):
        kind = registry.stanza_type(t)
        if kind is not None and kind.alone and len(types) != 1:
            raise HeaderError(f"age header: an {t} stanza must be the only stanza in the file")
    if not identities:
        raise NoIdentityMatchError("no identity or passphrase given to decrypt with")
    for identity in identities:
        for stanza in header.stanzas:
            file_key = identity.unwrap(stanza)
            if file_key is None:
                continue
            if len(file_key) != FILE_KEY_LEN:  # pragma: no cover - body length checked
                raise HeaderError("age header: invalid file key length")
            if not hmac.compare_digest(header_mac(file_key, header.mac_input), header.mac):
                raise HMACError(
                    "age header MAC mismatch: the header was modified (or the file is corrupted)"
                )
            return file_key
    raise NoIdentityMatchError(
        "no identity matches: none of the given keys/passphrases can open this file "
        f"(its recipients are of type {', '.join(sorted(set(types))) or 'none'})"
    )


# --- encrypt -------------------------------------------------------------------------------------


def _start_file(dst: BinaryIO, recipients: Sequence[Recipient], armor: bool):
    check_recipients(recipients)
    file_key = os.urandom(FILE_KEY_LEN)
    stanzas = [s for r in recipients for s in r.wrap(file_key)]
    _check_stanza_count(len(stanzas))
    out = _armor.ArmorWriter(dst) if armor else dst
    payload_nonce = os.urandom(NONCE_LEN)
    out.write(encode_header(stanzas, file_key) + payload_nonce)
    return out, payload_key(file_key, payload_nonce)


def encrypt_stream(
    src: BinaryIO,
    dst: BinaryIO,
    recipients: Sequence[Recipient],
    *,
    armor: bool = False,
    threads: bool | None = None,
) -> int:
    """Encrypt everything readable from ``src`` into ``dst`` in constant memory.

    Returns the number of plaintext bytes. With ``threads`` (default: auto, see
    :func:`~.pipeline.want_threads`), reading+sealing and writing overlap in two threads.

    >>> import io
    >>> from kprivacy_nb.crypto.age import X25519Identity
    >>> me = X25519Identity.generate()
    >>> out = io.BytesIO()
    >>> encrypt_stream(io.BytesIO(b"data"), out, [me.recipient()])
    4
    """
    out, aead = _start_file(dst, recipients, armor)
    written = drain(
        lambda ring: seal_chunks(src, aead, ring), out, threads=threads, bufsize=BATCH * ENC_CHUNK
    )
    if isinstance(out, _armor.ArmorWriter):
        out.close()
    return written - TAG * max(1, -(-written // ENC_CHUNK))


class EncryptWriter:
    """A write-only file object: what you write is age-encrypted into ``dst``.

    Call :meth:`close` (or use ``with``) to write the final chunk; ``dst`` is not closed.
    """

    def __init__(
        self, dst: BinaryIO, recipients: Sequence[Recipient], *, armor: bool = False
    ) -> None:
        self._out, self._aead = _start_file(dst, recipients, armor)
        self._counter = 0
        self._sealed = bytearray(ENC_CHUNK)
        self._buf = bytearray()
        self._closed = False

    def _seal(self, data, last: bool) -> None:
        view = memoryview(self._sealed)[: len(data) + TAG]
        self._aead.encrypt_into(nonce(self._counter, last), data, None, view)
        self._counter += 1
        self._out.write(view)

    def write(self, data: bytes | bytearray | memoryview) -> int:
        if self._closed:
            raise ValueError("write to a closed EncryptWriter")
        self._buf += data
        # Keep at least one byte back: the last chunk must carry the last-chunk flag.
        while len(self._buf) > CHUNK:
            self._seal(memoryview(self._buf)[:CHUNK], False)
            del self._buf[:CHUNK]
        return len(data)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._seal(bytes(self._buf), True)
        self._buf.clear()
        if isinstance(self._out, _armor.ArmorWriter):
            self._out.close()

    def __enter__(self) -> EncryptWriter:
        return self

    def __exit__(self, exc_type, *_exc) -> None:
        if exc_type is None:
            self.close()
        else:
            self._closed = True


def encrypt(data: bytes, recipients: Sequence[Recipient], *, armor: bool = False) -> bytes:
    """Encrypt bytes held in memory."""
    out = io.BytesIO()
    encrypt_stream(io.BytesIO(data), out, recipients, armor=armor, threads=False)
    return out.getvalue()


# --- decrypt -------------------------------------------------------------------------------------


def _open_source(src: BinaryIO, armored: bool | None = None) -> Source:
    """Return a line-capable source over the binary age file, de-armoring if needed.

    ``armored=None`` sniffs: input that (after whitespace) starts with ``-----`` is armored.
    """
    if armored:
        return Source(_armor.ArmorReader(src))
    head = src.read(len(INTRO))
    if armored is False:
        return Source(src, head)
    while len(head.lstrip(b" \t\r\n")) < 5 and len(head) < (1 << 16):
        more = src.read(4096)
        if not more:
            break
        head += more
    if head.lstrip(b" \t\r\n").startswith(b"-----"):
        return Source(_armor.ArmorReader(src, head))
    return Source(src, head)


def read_header(src: BinaryIO, *, armored: bool | None = None) -> tuple[Header, Source]:
    """Parse the header of the age file readable from ``src`` (armored or not)."""
    source = _open_source(src, armored)
    return parse_header(source), source


def _payload_of(header: Header, source: Source, identities: Sequence[Identity]) -> ChaCha20Poly1305:
    file_key = recover_file_key(header, identities)
    payload_nonce = source.read_exact_or_less(NONCE_LEN)
    if len(payload_nonce) != NONCE_LEN:
        raise HeaderError("age file truncated: missing payload nonce")
    return payload_key(file_key, payload_nonce)


def _open_payload(
    src: BinaryIO, identities: Sequence[Identity], armored: bool | None
) -> tuple[Source, ChaCha20Poly1305]:
    header, source = read_header(src, armored=armored)
    return source, _payload_of(header, source, identities)


class AgeFile:
    """An age file whose header has been read: inspect its recipients, then decrypt it.

    Works on non-seekable input (stdin): the header is parsed once and decryption continues from
    the same position.
    """

    def __init__(self, src: BinaryIO, *, armored: bool | None = None) -> None:
        self.header, self._source = read_header(src, armored=armored)
        self.armored = isinstance(self._source.src, _armor.ArmorReader)
        self._used = False

    def stanza_types(self) -> list[str]:
        return self.header.types()

    def decrypt_to(
        self, dst: BinaryIO, identities: Sequence[Identity], *, threads: bool | None = None
    ) -> int:
        """Decrypt the payload into ``dst`` (only authenticated chunks); returns its size."""
        if self._used:
            raise ValueError("an AgeFile can be decrypted once")
        self._used = True
        aead = _payload_of(self.header, self._source, identities)
        source = self._source
        return drain(
            lambda ring: open_chunks(source, aead, ring),
            dst,
            threads=threads,
            bufsize=BATCH * CHUNK,
        )


def iter_decrypt(
    src: BinaryIO, identities: Sequence[Identity], *, armored: bool | None = None
) -> Iterator[bytes]:
    """Yield the plaintext chunk by chunk; each chunk is yielded only once authenticated.

    Raises the matching :mod:`kprivacy_nb.errors` exception at the first bad byte; chunks yielded
    before that were genuine (truncation is only detectable at the end).
    """
    source, aead = _open_payload(src, identities, armored)
    ring = Ring(1, BATCH * CHUNK)
    for slot, size in open_chunks(source, aead, ring):
        yield bytes(ring.bufs[slot][:size])
        ring.release(slot)


class DecryptReader(io.RawIOBase):
    """A readable file object over the plaintext; only authenticated bytes are returned.

    The header is parsed and the file key recovered when it is created, so key errors
    (``NoIdentityMatchError``, ``HMACError``…) surface immediately.
    """

    def __init__(
        self, src: BinaryIO, identities: Sequence[Identity], *, armored: bool | None = None
    ) -> None:
        super().__init__()
        source, aead = _open_payload(src, identities, armored)
        self._ring = Ring(1, BATCH * CHUNK)
        self._chunks = open_chunks(source, aead, self._ring)
        self._pending = memoryview(b"")
        self._slot: int | None = None
        self._eof = False

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        view = memoryview(buf).cast("B")
        while not self._pending and not self._eof:
            if self._slot is not None:
                self._ring.release(self._slot)
                self._slot = None
            try:
                self._slot, size = next(self._chunks)
            except StopIteration:
                self._eof = True
                break
            self._pending = memoryview(self._ring.bufs[self._slot])[:size]
        k = min(len(view), len(self._pending))
        view[:k] = self._pending[:k]
        self._pending = self._pending[k:]
        return k


def decrypt_stream(
    src: BinaryIO,
    dst: BinaryIO,
    identities: Sequence[Identity],
    *,
    armored: bool | None = None,
    threads: bool | None = None,
) -> int:
    """Decrypt ``src`` into ``dst`` chunk by chunk in constant memory; returns the plaintext size.

    Only authenticated chunks are written; on failure ``dst`` may hold a genuine prefix — use
    :func:`decrypt_to_path` when a partial output must not survive.
    """
    source, aead = _open_payload(src, identities, armored)
    return drain(
        lambda ring: open_chunks(source, aead, ring), dst, threads=threads, bufsize=BATCH * CHUNK
    )


def decrypt_to_path(
    src: BinaryIO,
    path: str | os.PathLike,
    identities: Sequence[Identity],
    *,
    force: bool = False,
    armored: bool | None = None,
) -> int:
    """Decrypt into ``path`` atomically (0600): the file appears only if decryption succeeded."""
    from ..outputs import atomic_output

    with atomic_output(path, force=force) as f:
        return decrypt_stream(src, f, identities, armored=armored)


def decrypt(data: bytes, identities: Sequence[Identity], *, armored: bool | None = None) -> bytes:
    """Decrypt bytes held in memory (all or nothing)."""
    out = io.BytesIO()
    decrypt_stream(io.BytesIO(data), out, identities, armored=armored, threads=False)
    return out.getvalue()


def stanza_types(src: BinaryIO) -> list[str]:
    """The recipient stanza types of an age file (e.g. ``['X25519', 'X25519']``)."""
    header, _ = read_header(src)
    return header.types()
