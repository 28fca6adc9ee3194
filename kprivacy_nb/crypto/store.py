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

import html
import io
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from ..errors import InvalidParameterError, KeyFileError, NoIdentityMatchError
from ..paths import atomic_write, check_target
from ..secrets import Secret
from . import age, serializers
from .container import ContainerReader, Entry, write_container
from .keys import default_identity_files, load_identities, now_iso, resolve_recipients
from .signing import SigningKey, VerifyKey, load_signing_key, load_verify_key

RecipientSpec = str | age.X25519Recipient
IdentitySpec = str | os.PathLike | age.X25519Identity


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


def _recipients_for(
    recipients: Sequence[RecipientSpec] | RecipientSpec | None,
    passphrase: str | Secret | None,
    work_factor: int,
) -> tuple[list[Any], tuple[str, ...]]:
    if recipients and passphrase is not None:
        raise InvalidParameterError("use either recipients or a passphrase, not both")
    if passphrase is not None:
        return [age.ScryptRecipient(passphrase, work_factor)], ("passphrase (scrypt)",)
    if not recipients:
        raise InvalidParameterError(
            "say who can decrypt: recipients=['alice' or 'age1…'] (--to) or a passphrase "
            "(--passphrase)"
        )
    specs = [recipients] if isinstance(recipients, (str, age.X25519Recipient)) else recipients
    resolved = resolve_recipients(list(specs))
    return resolved, tuple(str(r) for r in resolved)


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
    or ``passphrase`` (scrypt). ``sign_with``: a signing key name or file. The file is written
    atomically with mode 0600 and never overwrites an existing one without ``force``.
    """
    target = check_target(path, force=force)  # before serialising anything
    recips, shown = _recipients_for(recipients, passphrase, work_factor)
    signer = load_signing_key(sign_with) if sign_with is not None else None
    type_name, parts, meta = serializers.dump(obj, allow_pickle=allow_pickle)
    entry_name = name or meta.get("name") or type_name.split(".")[-1]
    meta = serializers._json_safe(meta)
    entry = Entry(entry_name, type_name, parts, meta)
    with atomic_write(target, force=force) as f:
        writer = age.EncryptWriter(f, recips, armor=armor)
        write_container(writer, [entry], created=now_iso(), sign_with=signer, metadata=metadata)
        writer.close()
    import hashlib

    return SaveResult(
        path=target,
        type=type_name,
        name=entry_name,
        size=sum(len(p) for p in parts.values()),
        recipients=shown,
        signed_by=str(signer.public()) if signer else None,
        armored=armor,
        parts={k: hashlib.sha256(v).hexdigest() for k, v in parts.items()},
    )


def stanza_types_of(path: str | os.PathLike) -> list[str]:
    """The recipient types in an age file's header (no key needed)."""
    with open(path, "rb") as f:
        header, _ = age.read_header(f)
    return header.types()


def _identities_for(
    identities: Sequence[IdentitySpec] | IdentitySpec | None,
    passphrase: str | Secret | None,
    types: list[str],
) -> list[Any]:
    out: list[Any] = []
    if passphrase is not None:
        out.append(age.ScryptIdentity(passphrase))
    if identities is not None:
        specs = (
            [identities]
            if isinstance(identities, (str, os.PathLike, age.X25519Identity))
            else identities
        )
        out += load_identities(list(specs))
    elif passphrase is None:
        if "scrypt" in types:
            raise NoIdentityMatchError(
                "this file is passphrase-encrypted: give passphrase= (or --passphrase / "
                "--passphrase-env VAR)"
            )
        files = default_identity_files()
        if not files:
            raise KeyFileError(
                "no identity given and none in the keys folder; pass identities=[FILE] (-i FILE) "
                "or create one with `kprivacy-nb keygen NAME`"
            )
        out += load_identities(files)
    return out


def open_container(
    path: str | os.PathLike,
    *,
    identities: Sequence[IdentitySpec] | IdentitySpec | None = None,
    passphrase: str | Secret | None = None,
    verify_with: str | os.PathLike | VerifyKey | None = None,
) -> ContainerReader:
    """Decrypt a file fully in memory and open its container (signature checked first).

    Nothing is deserialised here: the age payload is authenticated to its last chunk, then the
    signature (if ``verify_with``) is verified before the manifest is even parsed.
    """
    src = Path(path).expanduser()
    return open_container_from(
        lambda: open(src, "rb"),
        identities=identities,
        passphrase=passphrase,
        verify_with=verify_with,
    )


def open_container_from(
    opener: Callable[[], BinaryIO],
    *,
    identities: Sequence[IdentitySpec] | IdentitySpec | None = None,
    passphrase: str | Secret | None = None,
    verify_with: str | os.PathLike | VerifyKey | None = None,
) -> ContainerReader:
    """:func:`open_container` for any age source; ``opener()`` returns it from the start
    (called twice: once to read the header's recipient types, once to decrypt)."""
    verifier = load_verify_key(verify_with) if verify_with is not None else None
    with opener() as f:
        header, _ = age.read_header(f)
    ids = _identities_for(identities, passphrase, header.types())
    buf = io.BytesIO()
    with opener() as f:
        age.decrypt_stream(f, buf, ids, threads=False)
    return ContainerReader(buf, verify_with=verifier)


def secure_load(
    path: str | os.PathLike,
    *,
    identities: Sequence[IdentitySpec] | IdentitySpec | None = None,
    passphrase: str | Secret | None = None,
    verify_with: str | os.PathLike | VerifyKey | None = None,
    allow_pickle: bool = False,
    name: str | None = None,
) -> Any:
    """Load the object saved by :func:`secure_save`.

    ``identities``: identity files or key names (default: every identity in the keys folder);
    ``passphrase`` for passphrase files; ``verify_with``: the signer's ``kppub1…`` key or name —
    an unsigned or badly signed file is then refused before anything is deserialised.
    """
    reader = open_container(
        path, identities=identities, passphrase=passphrase, verify_with=verify_with
    )
    if name is None and (
        len(reader.entries) > 1 or reader.manifest.get("metadata", {}).get("kind") == "bundle"
    ):
        from .bundle import Bundle  # an export of several objects: a lazy, dict-like view

        return Bundle(reader, allow_pickle=allow_pickle)
    entry = reader.entry(name)
    ser = serializers.by_type(entry["type"], allow_pickle=allow_pickle)
    parts = reader.read_parts(entry["name"])
    return ser.load(parts, entry.get("meta", {}))
