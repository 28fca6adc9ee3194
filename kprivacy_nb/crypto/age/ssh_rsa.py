"""SSH RSA keys as age recipients and identities: the ``ssh-rsa`` stanza.

The file key is encrypted with RSA-OAEP (SHA-256, MGF1-SHA-256, label
``"age-encryption.org/v1/ssh-rsa"``) to the recipient's public key; the argument is the key's
4-byte fingerprint. Keys shorter than 2048 bits are refused.
"""

from __future__ import annotations

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from ...errors import HeaderError, InvalidParameterError
from .format import Stanza
from .registry import RecipientType, register
from .sshkeys import IDENTITY_CLASSES, fingerprint, parse_public_line, public_line, wire_format

STANZA = "ssh-rsa"
LABEL = b"age-encryption.org/v1/ssh-rsa"
MIN_BITS = 2048


def oaep() -> padding.OAEP:
    return padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=LABEL)


class SSHRSARecipient:
    """An ``ssh-rsa AAAA…`` public key (a comment after it is allowed and ignored)."""

    __slots__ = ("_key", "_wire", "comment")
    labels: frozenset[str] = frozenset()

    def __init__(self, key: rsa.RSAPublicKey, comment: str = "") -> None:
        if key.key_size < MIN_BITS:
            raise InvalidParameterError(f"ssh-rsa keys shorter than {MIN_BITS} bits are refused")
        self._key, self._wire, self.comment = key, wire_format(key), comment

    @classmethod
    def parse(cls, text: str) -> SSHRSARecipient:
        return cls(parse_public_line(text, STANZA), " ".join(text.split()[2:]))

    def __str__(self) -> str:
        return public_line(self._wire)

    def __repr__(self) -> str:
        return f"SSHRSARecipient({fingerprint(self._wire)}, {self._key.key_size} bits)"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SSHRSARecipient) and other._wire == self._wire

    def __hash__(self) -> int:
        return hash(self._wire)

    def wrap(self, file_key: bytes) -> list[Stanza]:
        body = self._key.encrypt(file_key, oaep())
        return [Stanza(STANZA, [fingerprint(self._wire)], body)]


class SSHRSAIdentity:
    """An OpenSSH (or PEM) RSA private key used as an age identity."""

    __slots__ = ("_key", "_wire")
    private_type = rsa.RSAPrivateKey

    def __init__(self, key: rsa.RSAPrivateKey) -> None:
        self._key, self._wire = key, wire_format(key.public_key())

    def __repr__(self) -> str:
        return f"SSHRSAIdentity({fingerprint(self._wire)})"

    def __reduce__(self):  # pragma: no cover - defensive
        raise TypeError("identities cannot be pickled")

    def unwrap(self, stanza: Stanza) -> bytes | None:
        if stanza.type != STANZA:
            return None
        if len(stanza.args) != 1:
            raise HeaderError("age header: ssh-rsa stanza must have 1 argument")
        if stanza.args[0] != fingerprint(self._wire):
            return None
        try:
            return self._key.decrypt(stanza.body, oaep())
        except ValueError:
            return None


IDENTITY_CLASSES[STANZA] = SSHRSAIdentity
register(
    RecipientType(
        STANZA, "SSH RSA", parse_recipient=SSHRSARecipient.parse, recipient_prefixes=("ssh-rsa ",)
    )
)
