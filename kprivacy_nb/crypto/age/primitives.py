"""The primitives every age recipient type shares: HKDF-SHA256, the header MAC, and wrapping a
16-byte file key with ChaCha20-Poly1305 under a one-time key (zero nonce)."""

from __future__ import annotations

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import hmac as crypto_hmac
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

FILE_KEY_LEN = 16
TAG = 16
WRAPPED_KEY_LEN = FILE_KEY_LEN + TAG
_ZERO_NONCE = bytes(12)


def hkdf(ikm: bytes, salt: bytes, info: bytes, length: int = 32) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(ikm)


def header_mac(file_key: bytes, header_without_mac: bytes) -> bytes:
    """HMAC-SHA256 keyed by HKDF(file key, "header") over the header up to ``---``."""
    h = crypto_hmac.HMAC(hkdf(file_key, b"", b"header"), hashes.SHA256())
    h.update(header_without_mac)
    return h.finalize()


def wrap_key(key: bytes, file_key: bytes) -> bytes:
    """Seal the file key under a wrapping key used once (so the zero nonce is safe)."""
    return ChaCha20Poly1305(key).encrypt(_ZERO_NONCE, file_key, None)


def unwrap_key(key: bytes, body: bytes) -> bytes | None:
    """The file key, or ``None`` when the body does not open under ``key`` (not our stanza)."""
    try:
        return ChaCha20Poly1305(key).decrypt(_ZERO_NONCE, body, None)
    except InvalidTag:
        return None
