"""``secure_save`` / ``secure_load``: Python objects ⇄ signed containers in standard age files.

>>> from kprivacy_nb import secure_save, secure_load              # doctest: +SKIP
>>> secure_save(model, "models/detector.age", recipients="alice", sign_with="me")  # doctest: +SKIP
>>> model = secure_load("models/detector.age", verify_with="me")  # doctest: +SKIP

The file is an ordinary age v1 file (``age -d`` / ``rage -d`` open it); its payload is a
kprivacy-nb container (docs/container.md). Writes are atomic and 0600, plaintext lives only in
memory, and loading authenticates the whole payload and checks the signature (when asked) before
any object is deserialised.
"""

from __future__ import annotations

import hashlib
import html
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..secrets import Secret
from . import age, oms, serializers
from .bundle import Bundle
from .container import Entry, write_container
from .envelope import IdentitySpec, RecipientSpec, VerifySpec, open_container, recipients_for
from .keys import now_iso
from .limits import expansion_limit
from .outputs import atomic_output, check_output
from .signing import SigningKey, load_signing_key
from .trust import SignatureStatus, UnverifiedFileWarning


@dataclass(frozen=True)
class SaveResult:
    """What :func:`secure_save` wrote (no secrets in here)."""

    path: Path
    type: str
    name: str
    size: int
    recipients: tuple[str, ...]
    signed_by: str | None
    armored: bool = False
    parts: dict[str, str] = field(default_factory=dict)

    def _repr_html_(self) -> str:
        signed = html.escape(self.signed_by) if self.signed_by else "not signed"
        to = ", ".join(html.escape(r) for r in self.recipients)
        return (
            f"<div>🔒 Saved <b>{html.escape(self.name)}</b> ({html.escape(self.type)}, "
            f"{self.size:,} bytes) to <code>{html.escape(str(self.path))}</code><br>"
            f"encrypted to: {to}; signature: {signed}</div>"
        )

    def __str__(self) -> str:
        signed = f", signed by {self.signed_by}" if self.signed_by else ""
        to = ", ".join(self.recipients)
        return f"saved {self.name} ({self.type}) to {self.path} for {to}{signed}"


def secure_save(
    obj: Any,
    path: str | os.PathLike,
    *,
    recipients: Sequence[RecipientSpec] | RecipientSpec | None = None,
    passphrase: str | Secret | None = None,
    sign_with: str | os.PathLike | SigningKey | None = None,
    force: bool = False,
    allow_pickle: bool = False,
    armor: bool = False,
    name: str | None = None,
    metadata: Mapping[str, Any] | None = None,
    work_factor: int = age.DEFAULT_SCRYPT_WORK_FACTOR,
) -> SaveResult:
    """Serialise ``obj``, wrap it in a (signed) container and write it as an age file.

    ``recipients``: names from recipients.txt, ``age1…`` keys or recipients files;
    or ``passphrase`` (scrypt). ``sign_with``: a signing key name or file, or an EC P-256 PEM
    key for an OpenSSF model signature of the object's files (:mod:`.oms`). The file is written
    atomically with mode 0600 and never overwrites an existing one without ``force``.
    """
    target = check_output(path, force=force)  # before serialising anything
    recips, shown = recipients_for(recipients, passphrase, work_factor)
    oms_key = oms.signing_key_for(sign_with)
    signer = load_signing_key(sign_with) if sign_with is not None and not oms_key else None
    type_name, parts, meta = serializers.dump(obj, allow_pickle=allow_pickle)
    entry_name = name or meta.get("name") or type_name.split(".")[-1]
    meta = serializers.json_safe(meta)
    if oms_key:
        parts = oms.embed(type_name, parts, meta, oms_key, entry_name, metadata)
    entry = Entry(entry_name, type_name, parts, meta)
    with atomic_output(target, force=force) as f:
        writer = age.EncryptWriter(f, recips, armor=armor)
        write_container(writer, [entry], created=now_iso(), sign_with=signer, metadata=metadata)
        writer.close()
    return SaveResult(
        path=target,
        type=type_name,
        name=entry_name,
        size=sum(len(p) for p in parts.values()),
        recipients=shown,
        signed_by=str((signer or oms_key).public()) if signer or oms_key else None,
        armored=armor,
        parts={k: hashlib.sha256(v).hexdigest() for k, v in parts.items()},
    )


def secure_load(
    path: str | os.PathLike,
    *,
    identities: Sequence[IdentitySpec] | IdentitySpec | None = None,
    passphrase: str | Secret | None = None,
    verify_with: VerifySpec | None = None,
    allow_pickle: bool = False,
    name: str | None = None,
    require_signature: bool | None = None,
    max_expanded_bytes: int | None = None,
) -> Any:
    """Load the object saved by :func:`secure_save`.

    ``identities``: identity files or key names (default: every identity in the keys folder);
    ``passphrase`` for passphrase files. The signature is checked before anything is
    deserialised: against ``verify_with`` (the signer's ``kppub1…`` key or name) if given, else
    against your trusted signers (:mod:`kprivacy_nb.crypto.trust`); an EC public key (PEM) as
    ``verify_with`` checks the embedded OpenSSF model signature instead (it covers the entry's
    name and files, and for an object its type and metadata and the container's metadata, not a
    saved folder's own name: see :func:`kprivacy_nb.crypto.oms.covers`); an unsigned or unverified
    file gives an :class:`UnverifiedFileWarning`, or is refused when ``require_signature``
    (or ``%config SecureMagics.require_signature`` / ``KPRIVACY_NB_REQUIRE_SIGNATURE=1``).
    Archives inside are bounded by ``max_expanded_bytes`` (default: see
    :mod:`kprivacy_nb.crypto.limits`).
    """
    obj, status = load_with_status(
        path,
        identities=identities,
        passphrase=passphrase,
        verify_with=verify_with,
        allow_pickle=allow_pickle,
        name=name,
        require_signature=require_signature,
        max_expanded_bytes=max_expanded_bytes,
    )
    warn_unverified(status, str(path))
    return obj


def load_with_status(
    path: str | os.PathLike,
    *,
    identities: Sequence[IdentitySpec] | IdentitySpec | None = None,
    passphrase: str | Secret | None = None,
    verify_with: VerifySpec | None = None,
    allow_pickle: bool = False,
    name: str | None = None,
    require_signature: bool | None = None,
    max_expanded_bytes: int | None = None,
) -> tuple[Any, SignatureStatus]:
    """:func:`secure_load`, also returning how the signature was judged (and not warning)."""
    oms_key = oms.verify_key_for(verify_with)
    reader = open_container(
        path,
        identities=identities,
        passphrase=passphrase,
        verify_with=None if oms_key else verify_with,
        require_signature=False if oms_key else require_signature,
    )
    status = reader.signature_status
    if (
        not oms_key
        and name is None
        and (len(reader.entries) > 1 or reader.manifest.get("metadata", {}).get("kind") == "bundle")
    ):
        bundle = Bundle(reader, allow_pickle=allow_pickle, max_expanded_bytes=max_expanded_bytes)
        return bundle, status
    entry = reader.entry(name)
    parts = reader.read_parts(entry["name"])
    status = oms.judge(reader.manifest, entry, parts, oms_key) or status
    with expansion_limit(max_expanded_bytes):
        obj = serializers.load(
            entry["type"],
            oms.strip(parts),
            entry.get("meta", {}),
            allow_pickle=allow_pickle,
        )
    return obj, status


def warn_unverified(status: SignatureStatus, what: str) -> None:
    """Say loudly that nobody trusted vouches for what was just opened."""
    if not status.verified:
        warnings.warn(f"{what}: {status}", UnverifiedFileWarning, stacklevel=3)
