"""The age payload: a 16-byte nonce, then STREAM — ChaCha20-Poly1305 over 64 KiB chunks with an
11-byte big-endian counter and a last-chunk flag, keyed by HKDF(file key, nonce, "payload").

The producers here fill reusable ring buffers with a batch of chunks and yield ``(slot, nbytes)``
in order (batching keeps syscalls and thread hand-offs per byte low); :mod:`.pipeline` drains
them. A batch is 8 chunks (512 KiB of plaintext): measured on ext4 (Linux 6.18), 2 MiB batches
made every decrypted write a 2 MiB-aligned 2 MiB ``write()``, which the page cache serves with huge
folios whose allocation (compaction) tripled the system time of a decrypt to a file — while a
smaller batch also keeps the read, AEAD and write buffers in the CPU caches. Decryption never yields a byte of a chunk before that chunk's tag has been checked.
"""

from __future__ import annotations

import queue
from typing import BinaryIO

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from ...errors import PayloadError
from .format import Source, readinto_full
from .primitives import TAG, hkdf

CHUNK = 64 * 1024
ENC_CHUNK = CHUNK + TAG
NONCE_LEN = 16
BATCH = 8


def nonce(counter: int, last: bool) -> bytes:
    """The STREAM nonce of chunk ``counter``."""
    return counter.to_bytes(11, "big") + (b"\x01" if last else b"\x00")


def payload_key(file_key: bytes, payload_nonce: bytes) -> ChaCha20Poly1305:
    return ChaCha20Poly1305(hkdf(file_key, payload_nonce, b"payload"))


class Cancelled(Exception):
    """The consumer stopped: the producer must end without touching the ring again."""


class Ring:
    """Reused output buffers. ``acquire`` blocks until the consumer released a buffer."""

    def __init__(self, slots: int, size: int) -> None:
        self.bufs = [bytearray(size) for _ in range(slots)]
        self.free: queue.SimpleQueue[int] = queue.SimpleQueue()
        for i in range(slots):
            self.free.put(i)

    def acquire(self) -> int:
        slot = self.free.get()
        if slot < 0:
            raise Cancelled
        return slot

    def release(self, slot: int) -> None:
        self.free.put(slot)

    def cancel(self) -> None:
        self.free.put(-1)


def seal_chunks(src: Source | BinaryIO, aead: ChaCha20Poly1305, ring: Ring):
    """STREAM encryption of everything readable from ``src``."""
    if isinstance(src, Source):
        reader = src.readinto_full
    else:

        def reader(view: memoryview) -> int:
            return readinto_full(src, view)

    span = BATCH * CHUNK
    a, b = bytearray(span + 1), bytearray(span + 1)
    n = reader(memoryview(a))
    counter = 0
    while True:
        final = n <= span
        count = max(1, -(-n // CHUNK)) if final else BATCH
        slot = ring.acquire()
        out = memoryview(ring.bufs[slot])
        inp = memoryview(a)
        pos = 0
        for i in range(count):
            last = final and i == count - 1
            size = (n - i * CHUNK) if last else CHUNK
            sealed = out[pos : pos + size + TAG]
            aead.encrypt_into(nonce(counter, last), inp[i * CHUNK : i * CHUNK + size], None, sealed)
            counter += 1
            pos += size + TAG
        yield slot, pos
        if final:
            return
        # Carry the look-ahead byte over, so we always know which chunk is the last.
        b[0] = a[span]
        n = 1 + reader(memoryview(b)[1:])
        a, b = b, a


def open_chunks(source: Source, aead: ChaCha20Poly1305, ring: Ring):
    """STREAM decryption. A full-size chunk may be the last one, so it is tried as a middle
    chunk first, then as the final chunk (as the reference implementation does). Every chunk is
    authenticated before it is yielded; an error is raised after yielding the genuine chunks
    before it (which is what the test kit's ``payload`` digests expect)."""
    span = BATCH * ENC_CHUNK
    a, b = bytearray(span + 1), bytearray(span + 1)
    n = source.readinto_full(memoryview(a))
    counter = 0
    while True:
        more = n > span
        avail = span if more else n
        slot = ring.acquire()
        out = memoryview(ring.bufs[slot])
        inp = memoryview(a)
        pos = opos = 0
        error: PayloadError | None = None
        last = False
        while pos < avail:
            size = min(ENC_CHUNK, avail - pos)
            if size < TAG:
                error = PayloadError("age payload truncated: chunk shorter than its tag")
                break
            chunk = inp[pos : pos + size]
            dest = out[opos : opos + size - TAG]
            last = size < ENC_CHUNK
            last, ok = _open_one(aead, counter, last, chunk, dest)
            if not ok:
                error = PayloadError(
                    "age payload authentication failed: the file was truncated or tampered with"
                )
                break
            if last and size == TAG and counter > 0:
                error = PayloadError("age payload: empty final chunk in a non-empty file")
                break
            counter += 1
            pos += size
            opos += size - TAG
            if last:
                if pos < avail or more:
                    error = PayloadError("age payload: trailing data after the final chunk")
                break
        if error is None and not last and not more:
            error = PayloadError(
                "age payload truncated: the final chunk is missing"
                if counter
                else "age payload truncated: no chunks"
            )
        if opos or (last and error is None):
            yield slot, opos
        else:
            ring.release(slot)
        if error is not None:
            raise error
        if last:
            return
        b[0] = a[span]
        n = 1 + source.readinto_full(memoryview(b)[1:])
        a, b = b, a


def _open_one(aead: ChaCha20Poly1305, counter: int, last: bool, chunk, dest) -> tuple[bool, bool]:
    """Open one chunk into ``dest``; returns ``(is_last, authenticated)``."""
    try:
        aead.decrypt_into(nonce(counter, last), chunk, None, dest)
        return last, True
    except InvalidTag:
        if last:
            return last, False
    try:
        aead.decrypt_into(nonce(counter, True), chunk, None, dest)
        return True, True
    except InvalidTag:
        return False, False
