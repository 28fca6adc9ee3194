"""SSH Ed25519 keys as age recipients and identities: the ``ssh-ed25519`` stanza.

The Ed25519 public key is mapped to its X25519 (Montgomery) form, u = (1 + y) / (1 − y) mod p;
the private scalar is SHA-512(seed)[:32]. The X25519 shared secret is then multiplied by a tweak,
HKDF(salt = the SSH public key, info = the label), and the wrapping key is
HKDF(tweaked secret, ephemeral share ‖ recipient's X25519 key, label). Arguments: the key's
4-byte fingerprint and the ephemeral share.
"""

from __future__ import annotations

import hashlib

from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from ...errors import HeaderError, InvalidParameterError
from .format import Stanza, b64decode, b64encode
from .primitives import WRAPPED_KEY_LEN, hkdf, unwrap_key, wrap_key
from .registry import RecipientType, register
from .sshkeys import IDENTITY_CLASSES, fingerprint, parse_public_line, public_line, wire_format
from .x25519 import ecdh

STANZA = "ssh-ed25519"
LABEL = b"age-encryption.org/v1/ssh-ed25519"
_P = 2**255 - 19


def montgomery_u(ed_public: bytes) -> bytes:
    """The X25519 public key of an Ed25519 public key (the birational map of RFC 7748)."""
    y = int.from_bytes(ed_public, "little") & ((1 << 255) - 1)
    if (1 - y) % _P == 0:
        raise InvalidParameterError("not a usable ssh-ed25519 public key")
    u = (1 + y) * pow(1 - y, -1, _P) % _P
    return u.to_bytes(32, "little")


def _tweaked(shared: bytes, wire: bytes) -> bytes:
    tweak = hkdf(b"", wire, LABEL)
    return X25519PrivateKey.from_private_bytes(tweak).exchange(
        X25519PublicKey.from_public_bytes(shared)
    )


class SSHEd25519Recipient:
    """An ``ssh-ed25519 AAAA…`` public key (a comment after it is allowed and ignored)."""

    __slots__ = ("_u", "_wire", "comment")
    labels: frozenset[str] = frozenset()

    def __init__(self, key: ed25519.Ed25519PublicKey, comment: str = "") -> None:
        self._wire = wire_format(key)
        self._u = montgomery_u(key.public_bytes_raw())
        self.comment = comment

    @classmethod
    def parse(cls, text: str) -> SSHEd25519Recipient:
        key = parse_public_line(text, STANZA)
        return cls(key, " ".join(text.split()[2:]))

    def __str__(self) -> str:
        return public_line(self._wire)

    def __repr__(self) -> str:
        return f"SSHEd25519Recipient({fingerprint(self._wire)})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SSHEd25519Recipient) and other._wire == self._wire

    def __hash__(self) -> int:
        return hash(self._wire)

    def wrap(self, file_key: bytes) -> list[Stanza]:
        eph = X25519PrivateKey.generate()
        share = eph.public_key().public_bytes_raw()
        shared = _tweaked(eph.exchange(X25519PublicKey.from_public_bytes(self._u)), self._wire)
        key = hkdf(shared, share + self._u, LABEL)
        args = [fingerprint(self._wire), b64encode(share).decode()]
        return [Stanza(STANZA, args, wrap_key(key, file_key))]


class SSHEd25519Identity:
    """An OpenSSH Ed25519 private key used as an age identity."""

    __slots__ = ("_u", "_wire", "_x")
    private_type = ed25519.Ed25519PrivateKey

    def __init__(self, key: ed25519.Ed25519PrivateKey) -> None:
        seed = key.private_bytes_raw()
        self._x = X25519PrivateKey.from_private_bytes(hashlib.sha512(seed).digest()[:32])
        self._u = self._x.public_key().public_bytes_raw()
        self._wire = wire_format(key.public_key())

    def __repr__(self) -> str:
        return f"SSHEd25519Identity({fingerprint(self._wire)})"

    def __reduce__(self):  # pragma: no cover - defensive
        raise TypeError("identities cannot be pickled")

    def unwrap(self, stanza: Stanza) -> bytes | None:
        if stanza.type != STANZA:
            return None
        if len(stanza.args) != 2:
            raise HeaderError("age header: ssh-ed25519 stanza must have 2 arguments")
        share = b64decode(stanza.args[1].encode())
        if len(share) != 32:
            raise HeaderError("age header: ssh-ed25519 share must be 32 bytes")
        if stanza.args[0] != fingerprint(self._wire):
            return None
        if len(stanza.body) != WRAPPED_KEY_LEN:
            raise HeaderError("age header: ssh-ed25519 stanza body must be 32 bytes")
        shared = _tweaked(ecdh(self._x, share), self._wire)
        return unwrap_key(hkdf(shared, share + self._u, LABEL), stanza.body)


IDENTITY_CLASSES[STANZA] = SSHEd25519Identity
register(
    RecipientType(
        STANZA,
        "SSH Ed25519",
        parse_recipient=SSHEd25519Recipient.parse,
        recipient_prefixes=("ssh-ed25519 ",),
    )
)
