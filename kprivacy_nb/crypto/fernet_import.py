"""Migrating files from the Fernet recipes (``Fernet(key).encrypt(open("model.h5", "rb").read())``,
and its asymmetric variant: the Fernet key itself encrypted with RSA-OAEP) to age files.

The Fernet token is authenticated (its HMAC) and decrypted in memory, then written straight into
an age file for the given recipients — atomically, mode 0600; the plaintext never touches disk.
A legacy HDF5 Keras model inside is carried over as bytes, with a warning: ``secure_load``
refuses ``.h5`` models (an HDF5 model can hold a ``Lambda`` layer, i.e. code that runs on load).
"""

from __future__ import annotations

import base64
import binascii
import io
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from cryptography.fernet import Fernet, InvalidToken
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from ..errors import CryptoError, InvalidParameterError, KeyFileError, KPrivacyError
from ..secrets import Secret, read_key_file, register_secret
from . import age, prompt
from .outputs import atomic_output

HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
MAX_TOKEN_BYTES = 4 << 30  # a Fernet token is decrypted whole, in memory
HDF5_WARNING = (
    "the imported file is a legacy HDF5 (.h5) Keras model: secure_load refuses it, because an "
    "HDF5 model can carry Lambda layers (code that runs when it is loaded). Convert it explicitly, "
    "only if you trust where it came from: keras.models.load_model('model.h5', safe_mode=True), "
    "then model.save('model.keras') and secure_save the model"
)


class FernetImportError(CryptoError):
    """A Fernet file or key can't be read, or the token does not authenticate."""


@dataclass(frozen=True)
class ImportResult:
    """What ``import-fernet`` wrote (no plaintext, no key); ``path`` is None for a stream."""

    path: Path | None
    size: int
    hdf5: bool

    @property
    def warning(self) -> str | None:
        return HDF5_WARNING if self.hdf5 else None


KEY_GIVEN_INSTEAD_OF_FILE = (
    "--key takes the FILE that holds the Fernet key, not the key itself (what was given is not "
    "shown): save the key in a file, chmod 600 it, and pass the file's path"
)


def looks_like_fernet_key(value: str) -> bool:
    """Whether ``value`` is a Fernet key itself (urlsafe base64 of 32 bytes), not a path."""
    try:
        Fernet(value.strip().encode())
    except (ValueError, binascii.Error, UnicodeEncodeError):
        return False
    return True


def fernet_key_from_file(path: str | os.PathLike) -> Fernet:
    """A Fernet key file (urlsafe base64 of 32 bytes, as ``Fernet.generate_key()`` writes)."""
    if not Path(path).expanduser().exists() and looks_like_fernet_key(str(path)):
        register_secret(str(path))  # masked if anything prints it later
        raise InvalidParameterError(KEY_GIVEN_INSTEAD_OF_FILE)
    text = read_key_file(path).reveal().strip()
    return _fernet(text.encode(), str(path))


def _fernet(raw: bytes, origin: str) -> Fernet:
    register_secret(raw.decode("ascii", "replace"))
    try:
        return Fernet(raw.strip())
    except (ValueError, binascii.Error):
        raise FernetImportError(
            f"{origin} is not a Fernet key (44 characters of urlsafe base64)"
        ) from None


def fernet_key_unwrapped(
    wrapped: str | os.PathLike,
    private_key: str | os.PathLike,
    *,
    passphrase: Callable[[str], Secret] | None = None,
) -> Fernet:
    """The Fernet key of the asymmetric recipe: ``wrapped`` holds it RSA-OAEP(SHA-256) encrypted
    (raw bytes or base64), ``private_key`` is the PEM RSA private key (prompted passphrase if
    it is encrypted)."""
    pem = read_key_file(private_key).reveal().encode()
    try:
        key = serialization.load_pem_private_key(pem, None)
    except TypeError:
        secret = (passphrase or prompt.ask)(f"Passphrase for {private_key}: ")
        try:
            key = serialization.load_pem_private_key(pem, prompt.password_bytes(secret))
        except ValueError:
            raise KeyFileError(f"{private_key}: wrong passphrase (or a damaged key)") from None
    except ValueError:
        raise KeyFileError(f"{private_key} is not a PEM private key") from None
    if not isinstance(key, rsa.RSAPrivateKey):
        raise KeyFileError(f"{private_key} is not an RSA private key")
    blob = _read(wrapped, 1 << 16)
    candidates = [blob]
    try:
        candidates.append(base64.b64decode(blob.strip(), validate=True))
    except (binascii.Error, ValueError):
        pass
    for oaep_hash in (hashes.SHA256(), hashes.SHA1()):
        pad = padding.OAEP(mgf=padding.MGF1(oaep_hash), algorithm=oaep_hash, label=None)
        for c in candidates:
            try:
                return _fernet(key.decrypt(c, pad), str(wrapped))
            except ValueError:
                continue
    raise FernetImportError(f"{wrapped} does not open with {private_key} (RSA-OAEP)")


def _read(path: str | os.PathLike, limit: int) -> bytes:
    p = Path(path).expanduser()
    try:
        size = p.stat().st_size
        if size > limit:
            raise FernetImportError(f"{p} is larger than {limit:,} bytes")
        return p.read_bytes()
    except OSError as exc:
        raise KPrivacyError(f"cannot read {p}: {exc.strerror or exc}") from None


def import_fernet(
    src: str | os.PathLike,
    fernet: Fernet,
    recipients: Sequence,
    output: str | os.PathLike | BinaryIO,
    *,
    armor: bool = False,
    force: bool = False,
) -> ImportResult:
    """Re-encrypt the Fernet file ``src`` as an age file for ``recipients`` at ``output`` (a
    path, written atomically, or a binary stream such as stdout)."""
    token = _read(src, MAX_TOKEN_BYTES)
    try:
        plain = fernet.decrypt(token.strip())
    except InvalidToken:
        raise FernetImportError(
            f"{src} does not authenticate with this Fernet key (wrong key, or not a Fernet file)"
        ) from None
    hdf5 = plain.startswith(HDF5_MAGIC)
    if hasattr(output, "write"):
        age.encrypt_stream(io.BytesIO(plain), output, recipients, armor=armor, threads=False)
        return ImportResult(None, len(plain), hdf5)
    with atomic_output(output, force=force) as f:
        age.encrypt_stream(io.BytesIO(plain), f, recipients, armor=armor, threads=False)
    return ImportResult(Path(output), len(plain), hdf5)
