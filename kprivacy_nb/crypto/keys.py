"""Key files and names: age identities, named recipients, and where they live.

Layout under :func:`kprivacy_nb.paths.home_dir`::

    keys/NAME.key        age identity (AGE-SECRET-KEY-1… or AGE-SECRET-KEY-PQ-1…), 0600
    keys/NAME.sign.key   Ed25519 signing key (KPRIVACY-SIGNING-KEY-1…), 0600
    keys/NAME.sign.pub   its public key (kppub1…)
    recipients.txt       "name: KEY" lines, KEY any public key: age1…, age1pq1…, ssh-ed25519 …,
                         ssh-rsa … (recipients) or kppub1… (signers); # comments

Colleagues' public keys are named with :func:`add_recipient` (``kprivacy-nb recipients add NAME
KEY``, ``%secure_recipients add NAME KEY``); :func:`generate_identity` names your own new keys.

A recipient can be named (``alice``), given literally (any type the age registry knows:
``age1…``, ``age1pq1…``, ``ssh-ed25519 …``, ``ssh-rsa …``) or as a recipients file (several
keys of any type, ``#`` comments, blank lines, as age); identities come from key files only
(refused if group/other can read them).
"""

from __future__ import annotations

import datetime as _dt
import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import InvalidParameterError, KeyFileError
from ..paths import atomic_write, home_dir
from ..secrets import read_key_file
from .age import HybridIdentity, X25519Identity, identities_from_text
from .age.registry import PassphraseSource, parse_recipient, recipient_like
from .outputs import atomic_output

IDENTITY_SUFFIX = ".key"
SIGNING_SUFFIX = ".sign.key"
SIGNING_PUB_SUFFIX = ".sign.pub"
RECIPIENTS_FILE = "recipients.txt"
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}")


def keys_dir(create: bool = True) -> Path:
    """``home_dir()/keys`` (created 0700)."""
    d = home_dir(create=create) / "keys"
    if create:
        d.mkdir(mode=0o700, exist_ok=True)
    return d


def recipients_file() -> Path:
    return home_dir() / RECIPIENTS_FILE


def check_name(name: str) -> str:
    if not _NAME_RE.fullmatch(name or "") or name.endswith((".key", ".pub")):
        raise InvalidParameterError(
            f"{name!r} is not a valid key name (letters, digits, '_', '.', '@', '-'; max 64)"
        )
    return name


def now_iso() -> str:
    return (
        _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")
    )


@dataclass(frozen=True)
class KeygenResult:
    """What keygen made: the key file and its *public* half (never the secret)."""

    path: Path
    public: str
    kind: str = "age"
    name: str | None = None

    def __str__(self) -> str:
        return self.public

    def _repr_html_(self) -> str:
        import html

        who = f" <b>{html.escape(self.name)}</b>" if self.name else ""
        return (
            f"<div>New {html.escape(self.kind)} key{who} written to "
            f"<code>{html.escape(str(self.path))}</code> (mode 0600).<br>"
            f"Public key: <code>{html.escape(self.public)}</code></div>"
        )


def write_key_file(path: Path, text: str, *, force: bool) -> None:
    """Write a secret key file atomically, 0600."""
    with atomic_output(path, force=force) as f:
        f.write(text.encode())


def generate_identity(
    name: str | None = None,
    *,
    output: str | os.PathLike | None = None,
    force: bool = False,
    pq: bool = False,
) -> KeygenResult:
    """Create an age identity file (0600) and return its path and public recipient.

    X25519 (``age1…``) by default; with ``pq`` a post-quantum hybrid one (``age1pq1…``,
    ML-KEM-768 + X25519, as ``age-keygen -pq``). With ``name`` it goes to ``keys/NAME.key`` and
    ``NAME: age1…`` is added to recipients.txt, so ``-r NAME`` works. ``output`` writes it to
    that path instead.
    """
    if name is not None:
        check_name(name)
    ident = HybridIdentity.generate() if pq else X25519Identity.generate()
    public = str(ident.recipient())
    if output is not None:
        path = Path(output).expanduser()
    else:
        path = keys_dir() / f"{name or 'default'}{IDENTITY_SUFFIX}"
    text = f"# created: {now_iso()}\n# public key: {public}\n{ident.reveal()}\n"
    write_key_file(path, text, force=force)
    if name is not None:
        add_named(name, public, force=force)
    return KeygenResult(path, public, "post-quantum age" if pq else "age", name)


# --- named public keys ----------------------------------------------------------------------------


def read_named(path: Path | None = None) -> list[tuple[str | None, str]]:
    """``(name, value)`` pairs of a recipients file; unnamed lines give ``(None, value)``."""
    return [(name, value) for _, name, value in _named_lines(path or recipients_file())]


def _named_lines(path: Path) -> list[tuple[int, str | None, str]]:
    """``(line number, name, value)`` for each key line of a recipients file."""
    if not path.exists():
        return []
    out: list[tuple[int, str | None, str]] = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, value = line.partition(":")
        if sep and _NAME_RE.fullmatch(name.strip()) and not value.startswith("//"):
            out.append((lineno, name.strip(), value.strip()))
        else:
            out.append((lineno, None, line))
    return out


def _kind(value: str) -> str:
    return "signing" if value.startswith("kppub1") else "age"


def add_named(name: str, value: str, *, force: bool = False) -> None:
    """Record ``name: value`` (a public key, already validated) in recipients.txt."""
    check_name(name)
    path = recipients_file()
    lines = (
        path.read_text(encoding="utf-8").splitlines()
        if path.exists()
        else [
            "# kprivacy-nb named public keys: 'name: age1…' (recipients), 'name: kppub1…' (signers)"
        ]
    )
    kept = []
    for line in lines:
        n, sep, v = line.partition(":")
        if sep and n.strip() == name and _kind(v.strip()) == _kind(value):
            if v.strip() == value:
                return
            if not force:
                raise InvalidParameterError(
                    f"{name!r} already names another key in {path}; pass --force to replace it"
                )
            continue
        kept.append(line)
    kept.append(f"{name}: {value}")
    with atomic_write(path, force=True) as f:
        f.write(("\n".join(kept) + "\n").encode())


@dataclass(frozen=True)
class NamedKey:
    """A public key recorded under a name in recipients.txt (never a secret)."""

    name: str
    key: str
    type: str  # "age", "age (post-quantum)", "ssh-ed25519", "ssh-rsa" or "signing"

    def __str__(self) -> str:
        return f"{self.name}: {self.key} ({self.type})"


def _key_type(value: str) -> str:
    if value.startswith("kppub1"):
        return "signing"
    if value.startswith("age1pq1"):
        return "age (post-quantum)"
    if value.startswith("age1"):
        return "age"
    return value.split()[0] if value.startswith("ssh-") else "unknown"


def add_recipient(name: str, key: str, *, force: bool = False) -> NamedKey:
    """Record a colleague's public key under ``name`` so ``-r NAME`` /
    ``recipients=["NAME"]`` encrypt to it. ``key`` is any supported public key: ``age1…``,
    ``age1pq1…``, ``ssh-ed25519 AAAA…``, ``ssh-rsa AAAA…`` (a recipient), or ``kppub1…`` (a
    signer, for ``--verify-with NAME``). No key pair is made: this is someone else's public key.

    Example::

        add_recipient("bob", "age1ql3z7hjy54pw3hyww5ayyfg7zqgvc7w3j2elw8zmrj2kg5sfn9aqmcac8p")
    """
    check_name(name)
    value = " ".join(key.strip().strip("'\"").split())
    if not value:
        raise InvalidParameterError("give the public key to record: recipients add NAME KEY")
    if value.startswith(("AGE-SECRET-KEY", "KPRIVACY-SIGNING-KEY", "-----BEGIN")):
        raise InvalidParameterError(
            "that is a secret key, not a public one: ask its owner for the public key "
            "(age1…, age1pq1…, ssh-ed25519 …, ssh-rsa …, kppub1…)"
        )
    if value.lower().startswith("kppub1"):
        from .signing import VerifyKey

        value = str(VerifyKey.parse(value))
    else:
        parse_recipient(value)  # refuses what is not a valid public key of a known type
    add_named(name, value, force=force)
    return NamedKey(name, value, _key_type(value))


def list_recipients() -> list[NamedKey]:
    """The named public keys of recipients.txt (unnamed lines are skipped)."""
    return [NamedKey(n, v, _key_type(v)) for n, v in read_named() if n is not None]


def remove_recipient(name: str) -> list[NamedKey]:
    """Forget every public key recorded under ``name``; returns what was removed."""
    path = recipients_file()
    gone = [k for k in list_recipients() if k.name == name]
    if not gone:
        raise InvalidParameterError(
            f"no public key is named {name!r} in {path} (see them with `kprivacy-nb recipients "
            "list`)"
        )
    kept = [
        line
        for line in path.read_text(encoding="utf-8").splitlines()
        if line.partition(":")[0].strip() != name or not line.partition(":")[1]
    ]
    with atomic_write(path, force=True) as f:
        f.write(("\n".join(kept) + "\n").encode())
    return gone


def lookup_named(name: str, kind: str) -> list[str]:
    return [v for n, v in read_named() if n == name and _kind(v) == kind]


def _parse_recipient_values(values: list[tuple[str, str]]) -> list:
    """Recipients from ``(where, value)`` pairs; an error names where the bad value is."""
    out = []
    for origin, v in values:
        if v.startswith("kppub1"):
            continue
        try:
            out.append(parse_recipient(v))
        except InvalidParameterError as exc:
            raise InvalidParameterError(f"{origin}: {exc}") from None
    return out


def resolve_recipients(specs: list | str) -> list:
    """Turn names, literal public keys (``age1…``, ``age1pq1…``, ``ssh-ed25519 …``,
    ``ssh-rsa …``), recipient objects and recipients files into recipients."""
    if isinstance(specs, str) or hasattr(specs, "wrap"):
        specs = [specs]
    out: list = []
    for spec in specs:
        if hasattr(spec, "wrap"):
            out.append(spec)
            continue
        if len(spec) > 1 and spec[0] == spec[-1] and spec[0] in "'\"":
            spec = spec[1:-1]  # a quoted key from a magic line ("ssh-ed25519 AAAA… me@host")
        if recipient_like(spec):
            out.append(parse_recipient(spec))
        elif _NAME_RE.fullmatch(spec) and lookup_named(spec, "age"):
            out += _parse_recipient_values(
                [(f"recipient {spec!r}", v) for v in lookup_named(spec, "age")]
            )
        elif Path(spec).expanduser().is_file():
            out += recipients_from_file(spec)
        else:
            raise InvalidParameterError(unknown_recipient_message(spec))
    return out


def unknown_recipient_message(spec: str) -> str:
    """What to do about a recipient that is no key, name or file (used by every front end)."""
    name = spec if _NAME_RE.fullmatch(spec) else "NAME"
    return (
        f"unknown recipient {spec!r}: give a public key (age1…, age1pq1…, ssh-ed25519 …, "
        f"ssh-rsa …), a recipients file, or a name listed in {recipients_file()}. To name a "
        f"colleague's public key, add the key they sent you: `kprivacy-nb recipients add {name} "
        f"KEY` (in a notebook: %secure_recipients add {name} KEY)"
    )


def recipients_from_file(path: str | os.PathLike) -> list:
    """Read a recipients file as age does: one public key of any supported type per line,
    ``#`` comments and blank lines (``name: key`` lines are accepted too)."""
    p = Path(path).expanduser()
    try:
        lines = _named_lines(p)
    except (OSError, UnicodeDecodeError) as exc:
        raise KeyFileError(f"cannot read recipients file {p}: {type(exc).__name__}") from None
    out = _parse_recipient_values([(f"{p}, line {n}", v) for n, _, v in lines])
    if not out:
        raise KeyFileError(f"recipients file {p} lists no age recipient")
    return out


# --- identities -----------------------------------------------------------------------------------


def identity_path(spec: str | os.PathLike) -> Path:
    """A key file path, or ``keys/NAME.key`` for a bare name."""
    p = Path(spec).expanduser()
    if p.exists() or os.sep in str(spec):
        return p
    if _NAME_RE.fullmatch(str(spec)):
        named = keys_dir(create=False) / f"{spec}{IDENTITY_SUFFIX}"
        if named.exists():
            return named
    return p


def load_identities(
    specs: list | str | os.PathLike, *, passphrase: PassphraseSource | None = None
) -> list:
    """Load identities from key files (refusing group/other-readable ones) or key names.

    A key file holds age identities (``AGE-SECRET-KEY-1…``, ``AGE-SECRET-KEY-PQ-1…``) or an
    OpenSSH private key; ``passphrase(prompt)`` is asked only for an encrypted one (default: a
    no-echo prompt).
    """
    if isinstance(specs, (str, os.PathLike)) or hasattr(specs, "unwrap"):
        specs = [specs]
    out: list = []
    for spec in specs:
        if hasattr(spec, "unwrap"):
            out.append(spec)
            continue
        path = identity_path(spec)
        _refuse_public_key(path)
        out += identities_from_text(
            read_key_file(path), origin=f"identity file {path}", passphrase=passphrase
        )
    return out


# How public keys start (authorized_keys lines, age recipients, kppub1…, PEM public keys).
_PUBLIC_KEY_STARTS = (
    "ssh-ed25519 ",
    "ssh-rsa ",
    "ssh-dss ",
    "ecdsa-sha2-",
    "sk-ssh-",
    "sk-ecdsa-",
    "age1",
    "kppub1",
    "-----BEGIN PUBLIC KEY-----",
    "-----BEGIN SSH2 PUBLIC KEY-----",
)


def _refuse_public_key(path: Path) -> None:
    """A public key given where the identity (private key) file is wanted: say so, rather than
    complain about its (public, so harmless) permissions or its format."""
    try:
        if not path.is_file():
            return  # read_key_file says what is wrong
        with open(path, "rb") as f:
            head = f.read(8192).decode("utf-8", "replace")
    except OSError:
        return
    first = next(
        (ln.strip() for ln in head.splitlines() if ln.strip() and not ln.startswith("#")), ""
    )
    if first.startswith(_PUBLIC_KEY_STARTS) or first.lower().startswith(("age1", "kppub1")):
        private = path.with_suffix("") if path.suffix == ".pub" else None
        hint = f" (the private key is probably {private})" if private and private.exists() else ""
        raise KeyFileError(
            f"{path} is a public key: -i takes an identity, the private key file{hint}"
        )


def default_identity_files() -> list[Path]:
    """Every age identity file in ``keys/`` (signing keys excluded)."""
    d = keys_dir(create=False)
    if not d.is_dir():
        return []
    return sorted(
        p
        for p in d.iterdir()
        if p.name.endswith(IDENTITY_SUFFIX) and not p.name.endswith(SIGNING_SUFFIX)
    )
