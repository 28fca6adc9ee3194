"""The registry of recipient types: which stanza type each one writes, and how its public and
secret keys are written as text.

Each recipient module (``x25519``, ``scrypt``, ``hybrid``, ``ssh_ed25519``, ``ssh_rsa``) calls
:func:`register` once at import; a new recipient type is a new module, not an edit to a
dispatcher. Parsing a recipient string, an identity line or a whole identity file (an OpenSSH
private key) goes through :func:`parse_recipient` / :func:`parse_identities`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ...errors import InvalidParameterError, KeyFileError
from ...secrets import Secret

# A source of a passphrase for an encrypted key file (called only when one is needed).
PassphraseSource = Callable[[str], Secret]


@dataclass(frozen=True)
class RecipientType:
    """One stanza type and the text forms of its keys.

    ``recipient_prefixes`` / ``identity_prefixes`` select the parser for a recipient string or
    an identity-file line; ``identity_file_markers`` select a parser of a whole key file (PEM
    style, with an optional passphrase source). ``alone`` types (scrypt) must be the only stanza
    of a file.
    """

    stanza: str
    description: str
    parse_recipient: Callable[[str], Any] | None = None
    recipient_prefixes: tuple[str, ...] = ()
    parse_identity: Callable[[str], Any] | None = None
    identity_prefixes: tuple[str, ...] = ()
    alone: bool = False


_TYPES: dict[str, RecipientType] = {}
_FILE_PARSERS: dict[str, Callable[[str, str, PassphraseSource | None], list]] = {}


def register(kind: RecipientType) -> RecipientType:
    """Add a recipient type (each stanza type once)."""
    if kind.stanza in _TYPES:
        raise ValueError(f"stanza type {kind.stanza!r} registered twice")
    _TYPES[kind.stanza] = kind
    return kind


def register_identity_file(marker: str):
    """Decorator: ``parser(text, origin, passphrase)`` reads a key file that contains ``marker``
    (e.g. ``-----BEGIN OPENSSH PRIVATE KEY-----``) into identities."""

    def deco(parser):
        _FILE_PARSERS[marker] = parser
        return parser

    return deco


def stanza_type(name: str) -> RecipientType | None:
    """The registered type of stanza ``name`` (``None`` for a type we don't know: skipped)."""
    return _TYPES.get(name)


def types() -> list[RecipientType]:
    return list(_TYPES.values())


def _longest_prefix(text: str, attr: str) -> RecipientType | None:
    best, best_len = None, -1
    for kind in _TYPES.values():
        for prefix in getattr(kind, attr):
            if text.startswith(prefix) and len(prefix) > best_len:
                best, best_len = kind, len(prefix)
    return best


def parse_recipient(text: str) -> Any:
    """A recipient from its text form (``age1…``, ``age1pq1…``, ``ssh-ed25519 AAAA…``…)."""
    value = text.strip()
    kind = _longest_prefix(value, "recipient_prefixes")
    if kind is None or kind.parse_recipient is None:
        known = ", ".join(p.strip() + "…" for k in _TYPES.values() for p in k.recipient_prefixes)
        raise InvalidParameterError(f"unknown recipient type (expected one of: {known})")
    return kind.parse_recipient(value)


def recipient_like(text: str) -> bool:
    """Whether ``text`` starts like a recipient of some registered type."""
    return _longest_prefix(text.strip(), "recipient_prefixes") is not None


def parse_identities(
    text: str | Secret,
    *,
    origin: str = "identity file",
    passphrase: PassphraseSource | None = None,
) -> list[Any]:
    """Every identity in a key file: a whole-file key (OpenSSH private key), or lines of
    ``AGE-SECRET-KEY-1…`` / ``AGE-SECRET-KEY-PQ-1…`` with ``#`` comments and blank lines."""
    value = text.reveal() if isinstance(text, Secret) else text
    for marker, parser in _FILE_PARSERS.items():
        if marker in value:
            return parser(value, origin, passphrase)
    out = []
    for lineno, line in enumerate(value.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        kind = _longest_prefix(line.upper(), "identity_prefixes")
        if kind is None or kind.parse_identity is None:
            raise KeyFileError(
                f"{origin}, line {lineno}: not an age identity (expected AGE-SECRET-KEY-1…, "
                "AGE-SECRET-KEY-PQ-1… or an OpenSSH private key)"
            )
        try:
            out.append(kind.parse_identity(line))
        except KeyFileError:
            raise KeyFileError(
                f"{origin}, line {lineno}: not a valid {kind.description} identity"
            ) from None
    if not out:
        raise KeyFileError(f"{origin} contains no age identity")
    return out
