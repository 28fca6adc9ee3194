"""Ed25519 signing keys and signatures.

Text forms (Bech32, like age keys, so they are easy to copy and checksummed):

* public key: ``kppub1…`` (HRP ``kppub``, 32 bytes) — public, fine on a magic line;
* secret key: ``KPRIVACY-SIGNING-KEY-1…`` (HRP ``kprivacy-signing-key-``, the 32-byte seed), kept
  only in 0600 key files;
* detached signature: ``kpsig1…`` (HRP ``kpsig``, 64 bytes).

A container signature covers ``CONTAINER_CONTEXT + manifest bytes``; the manifest lists the
SHA-256 of every plaintext part, so the signature survives re-encryption to new recipients.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from ..errors import InvalidParameterError, KeyFileError, SignatureError
from ..secrets import Secret, read_key_file, register_secret
from . import bech32
from .keys import (
    SIGNING_PUB_SUFFIX,
    SIGNING_SUFFIX,
    KeygenResult,
    add_named,
    check_name,
    keys_dir,
    lookup_named,
    now_iso,
    write_key_file,
)
from .printable import printable

PUB_HRP = "kppub"
SECRET_HRP = "kprivacy-signing-key-"
SIG_HRP = "kpsig"
CONTAINER_CONTEXT = b"kprivacy-nb/container/v1 manifest signature\n"
DETACHED_CONTEXT = b"kprivacy-nb/v1 detached signature of sha256:"


class VerifyKey:
    """An Ed25519 public key (``kppub1…``)."""

    __slots__ = ("raw",)

    def __init__(self, raw: bytes) -> None:
        if len(raw) != 32:
            raise InvalidParameterError("an Ed25519 public key is 32 bytes")
        self.raw = raw

    @classmethod
    def parse(cls, text: str) -> VerifyKey:
        try:
            hrp, data = bech32.decode(text.strip())
        except bech32.Bech32Error as exc:
            raise InvalidParameterError(f"not a valid kppub1… public key ({exc})") from None
        if hrp != PUB_HRP or len(data) != 32:
            raise InvalidParameterError("not a kprivacy-nb public signing key (kppub1…)")
        return cls(data)

    def __str__(self) -> str:
        return bech32.encode(PUB_HRP, self.raw)

    def __repr__(self) -> str:
        return f"VerifyKey({self})"

    @property
    def fingerprint(self) -> str:
        """A short digest of the key (``SHA256:…``, as OpenSSH shows keys) to read out to the
        key's owner over another channel before trusting it."""
        import base64

        digest = hashlib.sha256(b"kprivacy-nb signing key\n" + self.raw).digest()
        return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, VerifyKey) and other.raw == self.raw

    def __hash__(self) -> int:
        return hash(self.raw)

    def verify(self, signature: bytes, message: bytes) -> None:
        try:
            Ed25519PublicKey.from_public_bytes(self.raw).verify(signature, message)
        except (InvalidSignature, ValueError):
            raise SignatureError(
                f"bad signature: the data was not signed by {self} (or was modified)"
            ) from None


class SigningKey:
    """An Ed25519 secret key. Its repr shows only the public key."""

    __slots__ = ("_key",)

    def __init__(self, key: Ed25519PrivateKey) -> None:
        self._key = key

    @classmethod
    def generate(cls) -> SigningKey:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_text(cls, text: str | Secret, origin: str = "signing key") -> SigningKey:
        value = text.reveal() if isinstance(text, Secret) else text
        lines = [ln.strip() for ln in value.splitlines() if ln.strip() and not ln.startswith("#")]
        if len(lines) != 1:
            raise KeyFileError(f"{origin}: expected one KPRIVACY-SIGNING-KEY-1… line")
        register_secret(lines[0])
        try:
            hrp, seed = bech32.decode(lines[0])
        except bech32.Bech32Error:
            raise KeyFileError(f"{origin}: not a valid signing key") from None
        if hrp != SECRET_HRP or len(seed) != 32:
            raise KeyFileError(f"{origin}: not a kprivacy-nb signing key")
        return cls(Ed25519PrivateKey.from_private_bytes(seed))

    def reveal(self) -> str:
        """The ``KPRIVACY-SIGNING-KEY-1…`` string; only for writing the key file."""
        return bech32.encode(SECRET_HRP, self._key.private_bytes_raw()).upper()

    def public(self) -> VerifyKey:
        return VerifyKey(self._key.public_key().public_bytes_raw())

    def sign(self, message: bytes) -> bytes:
        return self._key.sign(message)

    def __repr__(self) -> str:
        return f"SigningKey(public={self.public()})"

    __str__ = __repr__

    def __reduce__(self):  # pragma: no cover - defensive
        raise TypeError("signing keys cannot be pickled")


def generate_signing_key(
    name: str | None = None, *, output: str | os.PathLike | None = None, force: bool = False
) -> KeygenResult:
    """Create an Ed25519 signing key file (0600) plus its ``.pub``; return the public key.

    With ``name``: ``keys/NAME.sign.key`` and ``NAME: kppub1…`` in recipients.txt, so
    ``--sign-with NAME`` / ``--verify-with NAME`` work.
    """
    if name is not None:
        check_name(name)
    key = SigningKey.generate()
    public = str(key.public())
    path = (
        Path(output).expanduser()
        if output is not None
        else keys_dir() / f"{name or 'default'}{SIGNING_SUFFIX}"
    )
    text = (
        f"# kprivacy-nb Ed25519 signing key\n# created: {now_iso()}\n"
        f"# public key: {public}\n{key.reveal()}\n"
    )
    write_key_file(path, text, force=force)
    pub_path = path.with_name(path.name.removesuffix(".key") + ".pub")
    if pub_path == path:  # pragma: no cover - odd output names
        pub_path = path.with_name(path.name + ".pub")
    from ..paths import atomic_write

    with atomic_write(pub_path, force=True, mode=0o644) as f:
        f.write(f"{public}\n".encode())
    if name is not None:
        add_named(name, public, force=force)
    return KeygenResult(path, public, "signing", name)


def load_signing_key(spec: str | os.PathLike | SigningKey) -> SigningKey:
    """A signing key from a key file (0600 required) or a key name (``keys/NAME.sign.key``)."""
    if isinstance(spec, SigningKey):
        return spec
    p = Path(spec).expanduser()
    if not p.exists() and os.sep not in str(spec):
        named = keys_dir(create=False) / f"{spec}{SIGNING_SUFFIX}"
        if named.exists():
            p = named
        else:
            raise KeyFileError(
                f"no signing key named {spec!r} (looked for {named}); create one with "
                f"`%secure_keygen {spec} --signing`"
            )
    return SigningKey.from_text(read_key_file(p), origin=f"signing key {p}")


def looks_like_path(text: str) -> bool:
    """Whether a signer argument is clearly a file path: it contains ``/``, starts with ``~``
    or ends in ``.pub`` — a bare word (``bob``) is a name and is never read from the folder."""
    return "/" in text or text.startswith("~") or text.endswith(".pub")


def load_verify_key(spec: str | os.PathLike | VerifyKey) -> VerifyKey:
    """A public key: literal ``kppub1…``, a name (recipients.txt or ``keys/NAME.sign.pub``),
    or a file holding one — read only when the argument is clearly a path
    (:func:`looks_like_path`), so a file named ``bob`` in the current folder can't stand in
    for the signer ``bob``."""
    if isinstance(spec, VerifyKey):
        return spec
    text = str(spec)
    if text.lower().startswith("kppub1"):
        return VerifyKey.parse(text)
    named = lookup_named(text, "signing")
    if named:
        return VerifyKey.parse(named[-1])
    pub = keys_dir(create=False) / f"{text}{SIGNING_PUB_SUFFIX}"
    candidates = [pub]
    if isinstance(spec, os.PathLike) or looks_like_path(text):
        candidates.append(Path(text).expanduser())
    for candidate in candidates:
        if candidate.is_file():
            for line in candidate.read_text(encoding="utf-8").splitlines():
                if line.strip().startswith("kppub1"):
                    return VerifyKey.parse(line.strip())
            raise KeyFileError(f"{candidate} holds no kppub1… public key")
    raise InvalidParameterError(
        f"unknown signer {printable(text)}: give a kppub1… key, a trusted signer's or known "
        "key's name, or a path to a .pub file (with a '/' or ending in .pub, e.g. ./bob.pub)"
    )


# --- container signatures -------------------------------------------------------------------------


def sign_manifest(manifest: bytes, key: SigningKey) -> dict:
    """The signature block stored in a container."""
    import base64

    return {
        "alg": "ed25519",
        "key": str(key.public()),
        "sig": base64.b64encode(key.sign(CONTAINER_CONTEXT + manifest)).decode(),
    }


def signature_block_key(block: dict) -> VerifyKey:
    """The signer key a container's signature block claims, or a refusal ("malformed
    signature block") unless it is a well-formed ``kppub1…`` key. Bech32 is case-insensitive
    (all lower or all upper case), so ``KPPUB1…`` is the same key."""
    key = block.get("key")
    if not isinstance(key, str) or not key.lower().startswith("kppub1") or key != key.strip():
        raise SignatureError("refused: malformed signature block (its signer key is not kppub1…)")
    try:
        return VerifyKey.parse(key)
    except InvalidParameterError:
        raise SignatureError(
            "refused: malformed signature block (its signer key is not a valid kppub1… key)"
        ) from None


def check_manifest_signature(manifest: bytes, block: dict, key: VerifyKey) -> None:
    """Check that a container's signature block is ``key``'s valid signature of ``manifest``.

    Who ``key`` should be (the caller's choice, or a trusted signer) is decided in
    :mod:`kprivacy_nb.crypto.trust`.
    """
    import base64
    import binascii

    if block.get("alg") != "ed25519" or not isinstance(block.get("sig"), str):
        raise SignatureError("refused: unsupported or malformed signature block")
    claimed = signature_block_key(block)
    if claimed != key:
        raise SignatureError(f"refused: the file is signed by {claimed}, not by {key}")
    try:
        sig = base64.b64decode(block["sig"], validate=True)
    except (binascii.Error, ValueError):
        raise SignatureError("refused: malformed signature") from None
    key.verify(sig, CONTAINER_CONTEXT + manifest)


# --- detached signatures (CLI sign/verify) --------------------------------------------------------


@dataclass(frozen=True)
class DetachedSignature:
    key: VerifyKey
    sha256: str
    signature: bytes

    def to_text(self) -> str:
        return (
            "# kprivacy-nb detached signature (Ed25519 over the file's SHA-256)\n"
            f"key: {self.key}\nsha256: {self.sha256}\n"
            f"signature: {bech32.encode(SIG_HRP, self.signature)}\n"
        )

    @classmethod
    def from_text(cls, text: str) -> DetachedSignature:
        fields = {}
        for line in text.splitlines():
            if line.startswith("#") or ":" not in line:
                continue
            k, _, v = line.partition(":")
            fields[k.strip()] = v.strip()
        try:
            hrp, sig = bech32.decode(fields["signature"])
            if hrp != SIG_HRP or len(sig) != 64:
                raise ValueError
            return cls(VerifyKey.parse(fields["key"]), fields["sha256"], sig)
        except (KeyError, ValueError, bech32.Bech32Error, InvalidParameterError):
            raise SignatureError("malformed signature file") from None


def file_sha256(fileobj) -> str:
    h = hashlib.sha256()
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    while True:
        n = fileobj.readinto(buf)
        if not n:
            return h.hexdigest()
        h.update(view[:n])


def sign_detached(fileobj, key: SigningKey) -> DetachedSignature:
    digest = file_sha256(fileobj)
    return DetachedSignature(key.public(), digest, key.sign(DETACHED_CONTEXT + digest.encode()))


def verify_detached(fileobj, sig: DetachedSignature, expected: VerifyKey) -> None:
    if sig.key != expected:
        raise SignatureError(f"signed by {sig.key}, not by {expected}")
    digest = file_sha256(fileobj)
    if digest != sig.sha256:
        raise SignatureError("bad signature: the file was modified after signing")
    expected.verify(sig.signature, DETACHED_CONTEXT + digest.encode())
