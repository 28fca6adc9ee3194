"""Passphrase recipients: the ``scrypt`` stanza (salt, log2 work factor), alone in its file.

The wrapping key is scrypt(passphrase, "age-encryption.org/v1/scrypt" ‖ salt, N=2^wf, r=8, p=1).
"""

from __future__ import annotations

import os
import re

from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from ...errors import HeaderError, InvalidParameterError
from ...secrets import Secret
from .format import Stanza, b64decode, b64encode
from .primitives import WRAPPED_KEY_LEN, unwrap_key, wrap_key
from .registry import RecipientType, register

STANZA = "scrypt"
LABEL = b"age-encryption.org/v1/scrypt"
DEFAULT_WORK_FACTOR = 18
MIN_WORK_FACTOR = 18
MAX_WORK_FACTOR = 22
#: Shortest passphrase a file is encrypted with. Whoever gets the file can try passphrases
#: offline; short ones also read like ordinary output (see :data:`..secrets.MIN_MASKED`).
MIN_PASSPHRASE_LENGTH = 10
_WORK_FACTOR_RE = re.compile(rb"[1-9][0-9]{0,1}")


def _scrypt_key(passphrase: Secret, salt: bytes, log_n: int) -> bytes:
    kdf = Scrypt(salt=LABEL + salt, length=32, n=1 << log_n, r=8, p=1)
    return kdf.derive(passphrase.reveal().encode("utf-8"))


def as_secret(passphrase: str | Secret) -> Secret:
    if isinstance(passphrase, Secret):
        return passphrase
    if not isinstance(passphrase, str) or not passphrase:
        raise InvalidParameterError("a passphrase must be a non-empty string")
    return Secret(passphrase, source="argument")


class ScryptRecipient:
    """Encrypt to a passphrase (scrypt, work factor ``2**work_factor``, at least 2**18)."""

    __slots__ = ("_passphrase", "work_factor")
    labels: frozenset[str] = frozenset({"passphrase"})

    def __init__(self, passphrase: str | Secret, work_factor: int = DEFAULT_WORK_FACTOR) -> None:
        if not MIN_WORK_FACTOR <= work_factor <= MAX_WORK_FACTOR:
            raise InvalidParameterError(
                f"scrypt work factor must be between {MIN_WORK_FACTOR} and {MAX_WORK_FACTOR}"
            )
        self._passphrase = as_secret(passphrase)
        if len(self._passphrase.reveal()) < MIN_PASSPHRASE_LENGTH:
            raise InvalidParameterError(
                f"a passphrase to encrypt with needs at least {MIN_PASSPHRASE_LENGTH} characters: "
                "whoever gets the file can guess short ones offline. Use several random words, "
                "or encrypt to a key (-r/recipients=)"
            )
        self.work_factor = work_factor

    def __repr__(self) -> str:
        return f"ScryptRecipient(passphrase=***, work_factor={self.work_factor})"

    def wrap(self, file_key: bytes) -> list[Stanza]:
        salt = os.urandom(16)
        key = _scrypt_key(self._passphrase, salt, self.work_factor)
        args = [b64encode(salt).decode(), str(self.work_factor)]
        return [Stanza(STANZA, args, wrap_key(key, file_key))]


class ScryptIdentity:
    """Decrypt with a passphrase; refuses work factors above ``max_work_factor`` (default 22)."""

    __slots__ = ("_passphrase", "max_work_factor")

    def __init__(self, passphrase: str | Secret, max_work_factor: int = MAX_WORK_FACTOR) -> None:
        self._passphrase = as_secret(passphrase)
        self.max_work_factor = max_work_factor

    def __repr__(self) -> str:
        return "ScryptIdentity(passphrase=***)"

    def unwrap(self, stanza: Stanza) -> bytes | None:
        if stanza.type != STANZA:
            return None
        if len(stanza.args) != 2:
            raise HeaderError("age header: scrypt stanza must have two arguments")
        salt = b64decode(stanza.args[0].encode())
        if len(salt) != 16:
            raise HeaderError("age header: scrypt salt must be 16 bytes")
        wf = stanza.args[1].encode()
        if not _WORK_FACTOR_RE.fullmatch(wf):
            raise HeaderError("age header: malformed scrypt work factor")
        log_n = int(wf)
        if log_n > self.max_work_factor:
            raise HeaderError(
                f"age header: scrypt work factor 2^{log_n} is above the limit "
                f"2^{self.max_work_factor} (would take too long)"
            )
        if len(stanza.body) != WRAPPED_KEY_LEN:
            raise HeaderError("age header: scrypt stanza body must be 32 bytes")
        return unwrap_key(_scrypt_key(self._passphrase, salt, log_n), stanza.body)


register(RecipientType(STANZA, "passphrase (scrypt)", alone=True))
