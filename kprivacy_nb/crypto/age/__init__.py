"""The age v1 file format (https://age-encryption.org/v1, C2SP), on ``cryptography`` primitives.

Split by concept, as the spec and the reference implementation are:

* :mod:`.format` — the header: ``age-encryption.org/v1``, one stanza per recipient, ``--- MAC``.
* :mod:`.stream` — the payload: a nonce, then STREAM (ChaCha20-Poly1305, 64 KiB chunks);
  :mod:`.pipeline` overlaps it with writing in a second thread.
* :mod:`.registry` — the stanza types, one module each: :mod:`.x25519` (``age1…``),
  :mod:`.scrypt` (passphrases), :mod:`.hybrid` (``age1pq1…``, ML-KEM-768 + X25519),
  :mod:`.ssh_ed25519` and :mod:`.ssh_rsa` (OpenSSH keys).
* :mod:`.api` — encrypt / decrypt, streaming and in memory.

Every failure has a name (:class:`~kprivacy_nb.errors.HeaderError`, ``HMACError``,
``PayloadError``, ``ArmorError``, ``NoIdentityMatchError``). Decryption never hands out a byte of
a chunk before that chunk's tag has been checked; :func:`decrypt_to_path` leaves no output file if
anything fails.

>>> ident = X25519Identity.generate()
>>> blob = encrypt(b"hello", [ident.recipient()])
>>> decrypt(blob, [ident])
b'hello'
"""

from __future__ import annotations

from ...errors import CryptoError
from ...secrets import Secret
from . import hybrid, registry, scrypt, ssh_ed25519, ssh_rsa, sshkeys, x25519
from .api import (
    AgeFile,
    DecryptReader,
    EncryptWriter,
    Identity,
    Recipient,
    check_recipients,
    decrypt,
    decrypt_stream,
    decrypt_to_path,
    encrypt,
    encrypt_stream,
    iter_decrypt,
    read_header,
    recover_file_key,
    stanza_types,
)
from .format import Header, Stanza, b64decode, b64encode, encode_header
from .hybrid import HybridIdentity, HybridRecipient
from .primitives import FILE_KEY_LEN, TAG
from .registry import parse_recipient
from .scrypt import DEFAULT_WORK_FACTOR as DEFAULT_SCRYPT_WORK_FACTOR
from .scrypt import MAX_WORK_FACTOR as MAX_SCRYPT_WORK_FACTOR
from .scrypt import MIN_WORK_FACTOR as MIN_SCRYPT_WORK_FACTOR
from .scrypt import ScryptIdentity, ScryptRecipient
from .ssh_ed25519 import SSHEd25519Identity, SSHEd25519Recipient
from .ssh_rsa import SSHRSAIdentity, SSHRSARecipient
from .stream import CHUNK, ENC_CHUNK, NONCE_LEN, nonce, payload_key
from .x25519 import X25519Identity, X25519Recipient


def identities_from_text(text: str | Secret, *, origin: str = "identity file", passphrase=None):
    """Parse an identity file: ``AGE-SECRET-KEY-1…`` / ``AGE-SECRET-KEY-PQ-1…`` lines with ``#``
    comments and blank lines, or an OpenSSH private key (``passphrase`` is asked for only if
    the key is encrypted)."""
    return registry.parse_identities(text, origin=origin, passphrase=passphrase)


__all__ = [
    "CHUNK",
    "DEFAULT_SCRYPT_WORK_FACTOR",
    "ENC_CHUNK",
    "FILE_KEY_LEN",
    "MAX_SCRYPT_WORK_FACTOR",
    "MIN_SCRYPT_WORK_FACTOR",
    "NONCE_LEN",
    "TAG",
    "AgeFile",
    "CryptoError",
    "DecryptReader",
    "EncryptWriter",
    "Header",
    "HybridIdentity",
    "HybridRecipient",
    "Identity",
    "Recipient",
    "ScryptIdentity",
    "SSHEd25519Identity",
    "SSHEd25519Recipient",
    "SSHRSAIdentity",
    "SSHRSARecipient",
    "ScryptRecipient",
    "Stanza",
    "X25519Identity",
    "X25519Recipient",
    "b64decode",
    "b64encode",
    "check_recipients",
    "decrypt",
    "decrypt_stream",
    "decrypt_to_path",
    "encode_header",
    "encrypt",
    "encrypt_stream",
    "hybrid",
    "identities_from_text",
    "iter_decrypt",
    "nonce",
    "parse_recipient",
    "payload_key",
    "read_header",
    "recover_file_key",
    "registry",
    "scrypt",
    "ssh_ed25519",
    "ssh_rsa",
    "sshkeys",
    "stanza_types",
    "x25519",
]
