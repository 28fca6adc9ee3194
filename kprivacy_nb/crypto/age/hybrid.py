"""Post-quantum hybrid recipients (``age1pq1…``) and identities (``AGE-SECRET-KEY-PQ-1…``): the
``mlkem768x25519`` stanza of age 1.3.

The file key is sealed with HPKE (RFC 9180) using the MLKEM768-X25519 hybrid KEM, HKDF-SHA256
and ChaCha20-Poly1305, info ``"age-encryption.org/mlkem768x25519"`` — all from ``cryptography``
(no KEM arithmetic here). The stanza's argument is the KEM ciphertext ``enc`` (1,120 bytes), its
body the sealed file key. An identity is a 32-byte seed: SHAKE256(seed, 96) gives the ML-KEM-768
seed (64 bytes) and the X25519 private key (32). A recipient is the ML-KEM-768 public key
followed by the X25519 public key (1,216 bytes, Bech32 without a length limit).

Hybrid recipients carry the ``postquantum`` label: a file can't mix them with classic
recipients (an X25519 stanza beside them would make the file no stronger than X25519).
"""

from __future__ import annotations

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, hpke
from cryptography.hazmat.primitives.asymmetric import mlkem
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from ...errors import HeaderError, InvalidParameterError, KeyFileError
from ...secrets import Secret, register_secret
from .. import bech32
from .format import Stanza, b64encode
from .primitives import WRAPPED_KEY_LEN
from .registry import RecipientType, register
from .x25519 import ecdh

STANZA = "mlkem768x25519"
INFO = b"age-encryption.org/mlkem768x25519"
RECIPIENT_HRP = "age1pq"
IDENTITY_HRP = "age-secret-key-pq-"
MLKEM_PUBLIC_LEN = 1184
MLKEM_CT_LEN = 1088
ENC_LEN = MLKEM_CT_LEN + 32
PUBLIC_LEN = MLKEM_PUBLIC_LEN + 32
SEED_LEN = 32
_SUITE = hpke.Suite(hpke.KEM.MLKEM768_X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.CHACHA20_POLY1305)


class HybridRecipient:
    """An ``age1pq1…`` public key (ML-KEM-768 + X25519)."""

    __slots__ = ("_key", "public_bytes")
    labels: frozenset[str] = frozenset({"postquantum"})

    def __init__(self, public_bytes: bytes) -> None:
        if len(public_bytes) != PUBLIC_LEN:
            raise InvalidParameterError(f"an ML-KEM-768+X25519 public key is {PUBLIC_LEN} bytes")
        try:
            self._key = hpke.MLKEM768X25519PublicKey(
                mlkem.MLKEM768PublicKey.from_public_bytes(public_bytes[:MLKEM_PUBLIC_LEN]),
                X25519PublicKey.from_public_bytes(public_bytes[MLKEM_PUBLIC_LEN:]),
            )
        except ValueError:
            raise InvalidParameterError("not a valid ML-KEM-768+X25519 public key") from None
        self.public_bytes = public_bytes

    @classmethod
    def parse(cls, text: str) -> HybridRecipient:
        value = text.strip()
        try:
            hrp, data = bech32.decode(value)
        except bech32.Bech32Error as exc:
            raise InvalidParameterError(f"not a valid age1pq1… recipient ({exc})") from None
        if hrp != RECIPIENT_HRP or value != value.lower():
            raise InvalidParameterError("not a post-quantum age recipient (expected age1pq1…)")
        return cls(data)

    def __str__(self) -> str:
        return bech32.encode(RECIPIENT_HRP, self.public_bytes)

    def __repr__(self) -> str:
        text = str(self)
        return f"HybridRecipient({text[:16]}…{text[-8:]})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, HybridRecipient) and other.public_bytes == self.public_bytes

    def __hash__(self) -> int:
        return hash(self.public_bytes)

    def wrap(self, file_key: bytes) -> list[Stanza]:
        sealed = _SUITE.encrypt(file_key, self._key, info=INFO)
        enc, body = sealed[:ENC_LEN], sealed[ENC_LEN:]
        return [Stanza(STANZA, [b64encode(enc).decode()], body)]


class HybridIdentity:
    """An ``AGE-SECRET-KEY-PQ-1…`` identity (a 32-byte seed). Its repr shows no secret."""

    __slots__ = ("_key", "_public", "_seed", "_x25519")

    def __init__(self, seed: bytes) -> None:
        if len(seed) != SEED_LEN:
            raise KeyFileError("a post-quantum age identity is a 32-byte seed")
        h = hashes.Hash(hashes.SHAKE256(96))
        h.update(seed)
        expanded = h.finalize()
        kem = mlkem.MLKEM768PrivateKey.from_seed_bytes(expanded[:64])
        self._x25519 = X25519PrivateKey.from_private_bytes(expanded[64:])
        self._key = hpke.MLKEM768X25519PrivateKey(kem, self._x25519)
        self._public = (
            kem.public_key().public_bytes_raw() + self._x25519.public_key().public_bytes_raw()
        )
        self._seed = seed

    @classmethod
    def generate(cls) -> HybridIdentity:
        import os

        return cls(os.urandom(SEED_LEN))

    @classmethod
    def parse(cls, text: str | Secret) -> HybridIdentity:
        value = (text.reveal() if isinstance(text, Secret) else text).strip()
        register_secret(value)
        try:
            hrp, data = bech32.decode(value)
        except bech32.Bech32Error:
            raise KeyFileError("not a valid age identity (AGE-SECRET-KEY-PQ-1…)") from None
        if hrp != IDENTITY_HRP or len(data) != SEED_LEN or value != value.upper():
            raise KeyFileError("not a post-quantum age identity (expected AGE-SECRET-KEY-PQ-1…)")
        return cls(data)

    def reveal(self) -> str:
        """The ``AGE-SECRET-KEY-PQ-1…`` string; only for writing the key file."""
        return bech32.encode(IDENTITY_HRP, self._seed).upper()

    def recipient(self) -> HybridRecipient:
        return HybridRecipient(self._public)

    def __repr__(self) -> str:
        return f"HybridIdentity(recipient={self.recipient()!r})"

    __str__ = __repr__

    def __reduce__(self):  # pragma: no cover - defensive
        raise TypeError("identities cannot be pickled")

    def unwrap(self, stanza: Stanza) -> bytes | None:
        if stanza.type != STANZA:
            return None
        (enc,) = stanza.arg_bytes(1, STANZA, ENC_LEN)
        if len(stanza.body) != WRAPPED_KEY_LEN:
            raise HeaderError("age header: mlkem768x25519 stanza body must be 32 bytes")
        ecdh(self._x25519, enc[MLKEM_CT_LEN:])  # a low-order X25519 share is a header error
        try:
            return _SUITE.decrypt(enc + stanza.body, self._key, info=INFO)
        except (InvalidTag, ValueError):
            return None  # ML-KEM's implicit rejection: another recipient's stanza


register(
    RecipientType(
        STANZA,
        "post-quantum (ML-KEM-768 + X25519)",
        parse_recipient=HybridRecipient.parse,
        recipient_prefixes=("age1pq1",),
        parse_identity=HybridIdentity.parse,
        identity_prefixes=("AGE-SECRET-KEY-PQ-1",),
    )
)
