"""Whose signatures you trust, and what loading does with a file's signature.

``trusted_signers`` in the home folder lists signing keys (``name: kppub1…`` lines, 0600). When a
container is opened:

* with ``verify_with``, its signature must be by that key and valid (as before);
* else, if it is signed by a key in ``trusted_signers``, that signature is verified
  automatically — a forged or broken signature claiming a trusted signer is always refused;
* else the file is **unverified** (signed by someone you don't trust) or **unsigned**, and the
  result says so loudly — or, with the policy ``require_signature`` on, it is refused.

``require_signature`` comes from, in order: the call's ``require_signature=`` argument,
``%config SecureMagics.require_signature = True`` (:func:`configure`), the environment variable
``KPRIVACY_NB_REQUIRE_SIGNATURE=1``; it is off otherwise.

>>> add_trusted("bob")  # or a key: add_trusted("kppub1…")    # doctest: +SKIP
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import InvalidParameterError, SignatureError, UntrustedSignatureError
from ..paths import atomic_write, home_dir
from .keys import check_name
from .signing import VerifyKey, check_manifest_signature, load_verify_key, signature_block_key

TRUSTED_FILE = "trusted_signers"
ENV_REQUIRE = "KPRIVACY_NB_REQUIRE_SIGNATURE"
CONFIG_REQUIRE = "SecureMagics.require_signature"

VERIFIED = "verified"
UNVERIFIED = "unverified"
UNSIGNED = "unsigned"

_configured_require: bool | None = None


class UnverifiedFileWarning(UserWarning):
    """A file was loaded whose content no trusted signer vouches for."""


def configure(*, require_signature: bool | None) -> None:
    """Set the session-wide policy (what ``%config SecureMagics.require_signature`` does)."""
    global _configured_require
    _configured_require = require_signature


def require_signature(explicit: bool | None = None) -> bool:
    """Whether unsigned and unverified files are refused (see the module docstring)."""
    if explicit is not None:
        return explicit
    if _configured_require is not None:
        return _configured_require
    return os.environ.get(ENV_REQUIRE, "").strip().lower() in ("1", "true", "yes", "on")


# --- the trusted_signers file ---------------------------------------------------------------------


@dataclass(frozen=True)
class TrustedSigner:
    name: str | None
    key: VerifyKey

    def __str__(self) -> str:
        return f"{self.name}: {self.key}" if self.name else str(self.key)


def trusted_file() -> Path:
    return home_dir() / TRUSTED_FILE


def list_trusted() -> list[TrustedSigner]:
    """The signers in ``trusted_signers`` (a malformed line is an error, not skipped)."""
    path = trusted_file()
    if not path.exists():
        return []
    out = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, _, value = line.rpartition(":")
        try:
            out.append(TrustedSigner(name.strip() or None, VerifyKey.parse(value)))
        except InvalidParameterError:
            raise InvalidParameterError(
                f"{path}, line {lineno}: not a 'name: kppub1…' line; fix or remove it"
            ) from None
    return out


def _write(signers: Sequence[TrustedSigner]) -> None:
    text = "# kprivacy-nb trusted signers: their signatures are verified automatically\n"
    text += "".join(f"{s}\n" for s in signers)
    with atomic_write(trusted_file(), force=True) as f:
        f.write(text.encode())


def resolve_signer(spec: VerifyKey | str | os.PathLike) -> VerifyKey:
    """The key ``--verify-with SPEC`` means, in this order: a literal ``kppub1…`` key, a trusted
    signer's name, a known key's name (recipients.txt, ``keys/NAME.sign.pub``), and only then a
    file, when SPEC is clearly a path (has a ``/``, starts with ``~`` or ends in ``.pub``)."""
    if isinstance(spec, str) and not spec.lower().startswith("kppub1"):
        for s in list_trusted():
            if s.name == spec:
                return s.key
    return load_verify_key(spec)


def add_trusted(spec: str, name: str | None = None) -> TrustedSigner:
    """Trust a signer: a ``kppub1…`` key (``name`` optional) or a known signer's name."""
    key = load_verify_key(spec)
    if name is None and not spec.lower().startswith("kppub1"):
        name = spec
    if name is not None:
        check_name(name)
    signers = list_trusted()
    for s in signers:
        if s.key == key:
            return s
        if name is not None and s.name == name:
            raise InvalidParameterError(
                f"{name!r} already names another trusted key; remove it first"
            )
    added = TrustedSigner(name, key)
    _write([*signers, added])
    return added


def remove_trusted(spec: str) -> TrustedSigner:
    """Stop trusting a signer, given by name or ``kppub1…`` key."""
    signers = list_trusted()
    for s in signers:
        if s.name == spec or str(s.key) == spec.strip().lower():
            _write([t for t in signers if t is not s])
            return s
    raise InvalidParameterError(f"{spec!r} is not a trusted signer (list them with `trust list`)")


# --- what a signature block is worth --------------------------------------------------------------


@dataclass(frozen=True)
class SignatureStatus:
    """How a loaded file's signature was judged: ``verified``, ``unverified`` or ``unsigned``."""

    state: str
    signer: str | None = None  # the kppub1… key (claimed, when unverified; always well-formed)
    name: str | None = None  # its trusted name, if any
    covers: str | None = None  # what a verified signature vouches for, when not everything

    @property
    def fingerprint(self) -> str | None:
        return VerifyKey.parse(self.signer).fingerprint if self.signer else None

    @property
    def verified(self) -> bool:
        return self.state == VERIFIED

    def __str__(self) -> str:
        if self.state == VERIFIED:
            who = f"{self.name} ({self.signer})" if self.name else self.signer
            if self.covers:
                return f"signature verified: signed by {who}; it covers the {self.covers}"
            return f"signature verified: signed by {who}"
        if self.state == UNVERIFIED:
            return (
                f"signature present but NOT verified: signed by {self.signer} "
                f"(fingerprint {self.fingerprint}), not a trusted signer. Anyone can sign a file: "
                "before trusting this key, compare it (or its fingerprint) with the sender over "
                f"another channel (in person, by phone); then `%secure_trust {self.signer}`. "
                "Or pass --verify-with"
            )
        return "unsigned: nobody vouches for this file's content"


@dataclass(frozen=True)
class SignaturePolicy:
    """Judges a container's signature block before its manifest is parsed."""

    verify_with: VerifyKey | None = None
    trusted: tuple[TrustedSigner, ...] = ()
    require: bool = False

    @classmethod
    def current(
        cls, verify_with: VerifyKey | str | os.PathLike | None = None, require: bool | None = None
    ) -> SignaturePolicy:
        key = resolve_signer(verify_with) if verify_with is not None else None
        return cls(key, tuple(list_trusted()), require_signature(require))

    def check(self, manifest: bytes, block: dict | None) -> SignatureStatus:
        if block is not None and not isinstance(block, dict):
            raise SignatureError("refused: malformed signature block")
        if self.verify_with is not None:
            expected = self.verify_with
            if not block:
                raise SignatureError(
                    f"refused: the file is not signed, but a signature by {expected} was required"
                )
            check_manifest_signature(manifest, block, expected)
            known = {s.key: s.name for s in self.trusted}
            return SignatureStatus(VERIFIED, str(expected), known.get(expected))
        if not block:
            status = SignatureStatus(UNSIGNED)
        else:
            # The claimed key is the sender's choice: only a well-formed key is ever shown (as
            # its canonical text), so it can't carry words into the suggested command.
            claimed = signature_block_key(block)
            for s in self.trusted:
                if claimed == s.key:
                    # A forged signature claiming a trusted signer: always refused.
                    check_manifest_signature(manifest, block, s.key)
                    return SignatureStatus(VERIFIED, str(s.key), s.name)
            status = SignatureStatus(UNVERIFIED, str(claimed))
        if self.require:
            raise UntrustedSignatureError(
                f"refused: {status}. Signatures are required ({CONFIG_REQUIRE} / {ENV_REQUIRE}=1)"
            )
        return status
