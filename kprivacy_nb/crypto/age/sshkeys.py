"""OpenSSH keys as age sees them: public keys from ``authorized_keys``-style lines, private keys
from OpenSSH (and PEM RSA) key files, and the 4-byte fingerprint that names a key in a stanza.

An encrypted private key is opened lazily, as age does: its public key is readable without the
passphrase (the OpenSSH format stores it in clear), so the passphrase is asked for only when a
file really has a stanza for that key — through a prompt, never the command line.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import struct
import warnings

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from cryptography.utils import CryptographyDeprecationWarning

from ...errors import InvalidParameterError, KeyFileError
from ...secrets import Secret, register_secret
from .. import prompt as _prompt
from .format import Stanza, b64encode
from .registry import PassphraseSource, register_identity_file

OPENSSH_MARKER = "-----BEGIN OPENSSH PRIVATE KEY-----"
PEM_RSA_MARKER = "-----BEGIN RSA PRIVATE KEY-----"
_OPENSSH_MAGIC = b"openssh-key-v1\x00"

# Concrete identity classes per SSH key type, filled in by ssh_ed25519 / ssh_rsa.
IDENTITY_CLASSES: dict[str, type] = {}


def fingerprint(wire: bytes) -> str:
    """The stanza tag of an SSH public key: unpadded base64 of SHA-256(wire format)[:4]."""
    return b64encode(hashlib.sha256(wire).digest()[:4]).decode()


def wire_format(key: ed25519.Ed25519PublicKey | rsa.RSAPublicKey) -> bytes:
    """The SSH wire encoding of a public key (what ``authorized_keys`` holds in base64)."""
    line = key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return base64.b64decode(line.split()[1])


def public_line(wire: bytes) -> str:
    """``ssh-TYPE AAAA…``: the ``authorized_keys`` form of a wire-format public key."""
    key_type, _ = _read_string(wire, 0)
    return f"{key_type.decode()} {base64.b64encode(wire).decode()}"


def parse_public_line(text: str, expected: str):
    """``ssh-TYPE AAAA… [comment]`` → the public key (its type must be ``expected``)."""
    parts = text.strip().split()
    if len(parts) < 2 or parts[0] != expected:
        raise InvalidParameterError(f"not an {expected} public key (expected '{expected} AAAA…')")
    try:
        key = serialization.load_ssh_public_key(f"{parts[0]} {parts[1]}".encode())
    except (ValueError, binascii.Error, UnicodeEncodeError):
        raise InvalidParameterError(f"malformed {expected} public key") from None
    return key


def _read_string(buf: bytes, pos: int) -> tuple[bytes, int]:
    if pos + 4 > len(buf):
        raise KeyFileError("malformed OpenSSH private key")
    (n,) = struct.unpack(">I", buf[pos : pos + 4])
    if pos + 4 + n > len(buf):
        raise KeyFileError("malformed OpenSSH private key")
    return buf[pos + 4 : pos + 4 + n], pos + 4 + n


def _openssh_public(text: str) -> tuple[bool, bytes]:
    """(encrypted?, public key wire format) read from an OpenSSH private key's clear header."""
    body = text.split(OPENSSH_MARKER, 1)[1].split("-----END", 1)[0]
    try:
        blob = base64.b64decode("".join(body.split()), validate=True)
    except (binascii.Error, ValueError):
        raise KeyFileError("malformed OpenSSH private key (bad base64)") from None
    if not blob.startswith(_OPENSSH_MAGIC):
        raise KeyFileError("malformed OpenSSH private key")
    pos = len(_OPENSSH_MAGIC)
    cipher, pos = _read_string(blob, pos)
    _kdf, pos = _read_string(blob, pos)
    _kdf_options, pos = _read_string(blob, pos)
    if blob[pos : pos + 4] != b"\x00\x00\x00\x01":
        raise KeyFileError("OpenSSH private key files with several keys are not supported")
    public, _ = _read_string(blob, pos + 4)
    return cipher != b"none", public


def _load_private(data: bytes, password: bytes | None, origin: str):
    try:
        with warnings.catch_warnings():
            # DSA keys load with a CryptographyDeprecationWarning (and the library's path); age
            # refuses them anyway, in one line, below.
            warnings.simplefilter("ignore", CryptographyDeprecationWarning)
            if OPENSSH_MARKER.encode() in data:
                return serialization.load_ssh_private_key(data, password)
            return serialization.load_pem_private_key(data, password)
    except ValueError:
        if password is not None:
            raise KeyFileError(f"{origin}: wrong passphrase (or a damaged key)") from None
        raise KeyFileError(f"{origin}: malformed SSH private key") from None
    except TypeError:  # encrypted, and no password given
        raise KeyFileError(f"{origin}: the key is encrypted") from None
    except Exception as exc:  # unsupported cipher/kdf, missing bcrypt
        raise KeyFileError(
            f"{origin}: cannot read SSH private key ({type(exc).__name__})"
        ) from None


def identity_for(private_key, origin: str):
    """The age identity of a loaded SSH private key."""
    for cls in IDENTITY_CLASSES.values():
        if isinstance(private_key, cls.private_type):
            return cls(private_key)
    raise KeyFileError(f"{origin}: unsupported SSH key type (age supports ssh-ed25519, ssh-rsa)")


class EncryptedSSHIdentity:
    """A passphrase-protected SSH key: decrypted (after a prompt) only when a stanza is for it."""

    __slots__ = ("_data", "_inner", "_origin", "_passphrase", "key_type", "tag")

    def __init__(self, data: str, public_wire: bytes, origin: str, passphrase: PassphraseSource):
        key_type, _ = _read_string(public_wire, 0)
        self.key_type = key_type.decode("ascii", "replace")
        if self.key_type not in IDENTITY_CLASSES:
            raise KeyFileError(f"{origin}: unsupported SSH key type {self.key_type!r}")
        self._data, self._origin, self._passphrase = data, origin, passphrase
        self.tag = fingerprint(public_wire)
        self._inner = None

    def __repr__(self) -> str:
        return f"EncryptedSSHIdentity({self.key_type}, {self._origin})"

    def __reduce__(self):  # pragma: no cover - defensive
        raise TypeError("identities cannot be pickled")

    def unwrap(self, stanza: Stanza) -> bytes | None:
        if stanza.type != self.key_type or not stanza.args or stanza.args[0] != self.tag:
            return None
        if self._inner is None:
            secret = self._passphrase(f"Passphrase for {self._origin}: ")
            key = _load_private(self._data.encode(), _prompt.password_bytes(secret), self._origin)
            self._inner = identity_for(key, self._origin)
        return self._inner.unwrap(stanza)


def _default_prompt(prompt: str) -> Secret:
    return _prompt.ask(prompt, option=_prompt.IDENTITY_OPTION)


def _parse_key_file(text: str, origin: str, passphrase: PassphraseSource | None) -> list:
    register_secret(text)
    if OPENSSH_MARKER in text:
        encrypted, public = _openssh_public(text)
        if encrypted:
            return [EncryptedSSHIdentity(text, public, origin, passphrase or _default_prompt)]
    elif "ENCRYPTED" in text:  # PEM "Proc-Type: 4,ENCRYPTED": the public key is not in clear
        secret = (passphrase or _default_prompt)(f"Passphrase for {origin}: ")
        return [
            identity_for(
                _load_private(text.encode(), _prompt.password_bytes(secret), origin), origin
            )
        ]
    return [identity_for(_load_private(text.encode(), None, origin), origin)]


register_identity_file(OPENSSH_MARKER)(_parse_key_file)
register_identity_file(PEM_RSA_MARKER)(_parse_key_file)
