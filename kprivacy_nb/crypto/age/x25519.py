"""X25519 recipients (``age1…``) and identities (``AGE-SECRET-KEY-1…``): the ``X25519`` stanza.

The wrapping key is HKDF(ECDH(ephemeral, recipient), ephemeral share ‖ recipient,
"age-encryption.org/v1/X25519"); the stanza carries the ephemeral share.
"""

from __future__ import annotations

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from ...errors import HeaderError, InvalidParameterError, KeyFileError
from ...secrets import Secret, register_secret
from .. import bech32
from .format import Stanza, b64encode
from .primitives import WRAPPED_KEY_LEN, hkdf, unwrap_key, wrap_key
from .registry import RecipientType, register

STANZA = "X25519"
LABEL = b"age-encryption.org/v1/X25519"


def ecdh(private: X25519PrivateKey, share: bytes) -> bytes:
    """X25519 with ``share``; a low-order share (all-zero result) is a header error."""
    try:
        shared = private.exchange(X25519PublicKey.from_public_bytes(share))
    except ValueError:
        raise HeaderError("age header: X25519 share is a low-order point") from None
    if not any(shared):
        raise HeaderError("age header: X25519 share is a low-order point")
    return shared


class X25519Recipient:
    """An ``age1…`` public key."""

    __slots__ = ("public_bytes",)
    labels: frozenset[str] = frozenset()

    def __init__(self, public_bytes: bytes) -> None:
        if len(public_bytes) != 32:
            raise InvalidParameterError("an X25519 public key is 32 bytes")
        self.public_bytes = public_bytes

    @classmethod
    def parse(cls, text: str) -> X25519Recipient:
        try:
            hrp, data = bech32.decode(text.strip())
        except bech32.Bech32Error as exc:
            raise InvalidParameterError(f"not a valid age recipient ({exc})") from None
        if hrp != "age" or len(data) != 32 or text.strip() != text.strip().lower():
            raise InvalidParameterError("not an age X25519 recipient (expected age1…)")
        return cls(data)

    def __str__(self) -> str:
        return bech32.encode("age", self.public_bytes)

    def __repr__(self) -> str:
        return f"X25519Recipient({self})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, X25519Recipient) and other.public_bytes == self.public_bytes

    def __hash__(self) -> int:
        return hash(self.public_bytes)

    def wrap(self, file_key: bytes) -> list[Stanza]:
        eph = X25519PrivateKey.generate()
        share = eph.public_key().public_bytes_raw()
        shared = eph.exchange(X25519PublicKey.from_public_bytes(self.public_bytes))
        key = hkdf(shared, share + self.public_bytes, LABEL)
        return [Stanza(STANZA, [b64encode(share).decode()], wrap_key(key, file_key))]


class X25519Identity:
    """An ``AGE-SECRET-KEY-1…`` identity. Its repr shows only the public recipient."""

    __slots__ = ("_key", "_public")

    def __init__(self, key: X25519PrivateKey) -> None:
        self._key = key
        self._public = key.public_key().public_bytes_raw()

    @classmethod
    def generate(cls) -> X25519Identity:
        return cls(X25519PrivateKey.generate())

    @classmethod
    def parse(cls, text: str | Secret) -> X25519Identity:
        value = text.reveal() if isinstance(text, Secret) else text
        value = value.strip()
        register_secret(value)
        try:
            hrp, data = bech32.decode(value)
        except bech32.Bech32Error:
            raise KeyFileError("not a valid age identity (AGE-SECRET-KEY-1…)") from None
        if hrp != "age-secret-key-" or len(data) != 32 or value != value.upper():
            raise KeyFileError("not an age X25519 identity (expected AGE-SECRET-KEY-1…)")
        return cls(X25519PrivateKey.from_private_bytes(data))

    def reveal(self) -> str:
        """The ``AGE-SECRET-KEY-1…`` string; only for writing the key file."""
        raw = self._key.private_bytes_raw()
        return bech32.encode("age-secret-key-", raw).upper()

    def recipient(self) -> X25519Recipient:
        return X25519Recipient(self._public)

    def __repr__(self) -> str:
        return f"X25519Identity(recipient={self.recipient()})"

    __str__ = __repr__

    def __reduce__(self):  # pragma: no cover - defensive
        raise TypeError("identities cannot be pickled")

    def unwrap(self, stanza: Stanza) -> bytes | None:
        if stanza.type != STANZA:
            return None
        (share,) = stanza.arg_bytes(1, STANZA, 32)
        if len(stanza.body) != WRAPPED_KEY_LEN:
            raise HeaderError("age header: X25519 stanza body must be 32 bytes")
        key = hkdf(ecdh(self._key, share), share + self._public, LABEL)
        return unwrap_key(key, stanza.body)


register(
    RecipientType(
        STANZA,
        "X25519",
        parse_recipient=X25519Recipient.parse,
        recipient_prefixes=("age1",),
        parse_identity=X25519Identity.parse,
        identity_prefixes=("AGE-SECRET-KEY-1",),
    )
)
