"""Sealing and opening a container in an age file: who can open it, and opening it safely.

The one place that turns user-facing specs into age recipients / identities and opens an age
container for them; :mod:`~kprivacy_nb.crypto.store` (one object) and
:mod:`~kprivacy_nb.crypto.bundle` (several) both build on it.

Opening authenticates the whole age payload, then judges the signature under the trust policy
(:mod:`~kprivacy_nb.crypto.trust`) before the manifest is parsed; nothing is deserialised here.

>>> recips, shown = recipients_for(["alice"], None)                         # doctest: +SKIP
>>> reader = open_container("share.age", identities=["alice"])              # doctest: +SKIP
>>> reader.signature_status.state                                           # doctest: +SKIP
'unsigned'
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, BinaryIO

from ..errors import InvalidParameterError, KeyFileError, KPrivacyError, NoIdentityMatchError
from ..secrets import Secret
from . import age
from .container import ContainerReader
from .keys import default_identity_files, load_identities, resolve_recipients
from .signing import VerifyKey
from .trust import SignaturePolicy

RecipientSpec = str | age.Recipient
IdentitySpec = str | os.PathLike | age.Identity
VerifySpec = str | os.PathLike | VerifyKey


def recipients_for(
    recipients: Sequence[RecipientSpec] | RecipientSpec | None,
    passphrase: str | Secret | None,
    work_factor: int = age.DEFAULT_SCRYPT_WORK_FACTOR,
) -> tuple[list[Any], tuple[str, ...]]:
    """The age recipients for ``recipients`` (names, public keys of any age type, recipients
    files) or a passphrase, and how to show them (public parts only)."""
    if recipients and passphrase is not None:
        raise InvalidParameterError("use either recipients or a passphrase, not both")
    if passphrase is not None:
        return [age.ScryptRecipient(passphrase, work_factor)], ("passphrase (scrypt)",)
    if not recipients:
        raise InvalidParameterError(
            "say who can decrypt: recipients=['alice' or 'age1…'] (-r) or a passphrase "
            "(--passphrase)"
        )
    specs = (
        [recipients] if isinstance(recipients, str) or hasattr(recipients, "wrap") else recipients
    )
    resolved = resolve_recipients(list(specs))
    age.check_recipients(resolved)
    return resolved, tuple(_shown(r) for r in resolved)


def _shown(recipient: Any) -> str:
    """A recipient as shown to people: long post-quantum keys shortened."""
    text = str(recipient)
    return text if len(text) <= 80 else f"{text[:20]}…{text[-10:]}"


def identities_for(
    identities: Sequence[IdentitySpec] | IdentitySpec | None,
    passphrase: str | Secret | None,
    types: list[str],
) -> list[Any]:
    """The identities to try for a file whose header has recipient ``types``: the given ones,
    the passphrase, else every identity in the keys folder."""
    out: list[Any] = []
    if passphrase is not None:
        out.append(age.ScryptIdentity(passphrase))
    if identities is not None:
        specs = (
            [identities]
            if isinstance(identities, (str, os.PathLike)) or hasattr(identities, "unwrap")
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


def file_opener(path: str | os.PathLike) -> Callable[[], BinaryIO]:
    """An opener for :func:`open_container_from` whose failures are one-line errors."""
    src = Path(path).expanduser()

    def opener() -> BinaryIO:
        try:
            return open(src, "rb")  # noqa: SIM115 - returned to a with block
        except OSError as exc:
            raise KPrivacyError(f"cannot read {src}: {exc.strerror or exc}") from None

    return opener


def stanza_types_of(path: str | os.PathLike) -> list[str]:
    """The recipient types in an age file's header (no key needed)."""
    with file_opener(path)() as f:
        header, _ = age.read_header(f)
    return header.types()


def open_container_from(
    opener: Callable[[], BinaryIO],
    *,
    identities: Sequence[IdentitySpec] | IdentitySpec | None = None,
    passphrase: str | Secret | None = None,
    verify_with: VerifySpec | None = None,
    require_signature: bool | None = None,
) -> ContainerReader:
    """Decrypt an age source fully in memory and open its container (signature judged first).

    ``opener()`` returns the source from its start; it is called twice (header, then payload).
    """
    policy = SignaturePolicy.current(verify_with, require_signature)
    with opener() as f:
        header, _ = age.read_header(f)
    ids = identities_for(identities, passphrase, header.types())
    buf = io.BytesIO()
    with opener() as f:
        age.decrypt_stream(f, buf, ids, threads=False)
    return ContainerReader(buf, policy=policy)


def open_container(
    path: str | os.PathLike,
    *,
    identities: Sequence[IdentitySpec] | IdentitySpec | None = None,
    passphrase: str | Secret | None = None,
    verify_with: VerifySpec | None = None,
    require_signature: bool | None = None,
) -> ContainerReader:
    """:func:`open_container_from` for a file path."""
    return open_container_from(
        file_opener(path),
        identities=identities,
        passphrase=passphrase,
        verify_with=verify_with,
        require_signature=require_signature,
    )
