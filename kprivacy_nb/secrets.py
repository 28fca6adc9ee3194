"""The one place secrets come from, and the registry that keeps them out of output.

A secret (passphrase, identity, signing key) reaches kprivacy_nb in exactly three ways:

* a prompt (:func:`getpass.getpass`, which ipykernel answers without echo),
* an environment variable whose *name* is given (``--passphrase-env VAR``),
* a key file, refused if group/other can read it.

Everything resolved here is wrapped in :class:`Secret` (whose ``repr`` never shows the value) and
registered with :data:`REGISTRY`, so :func:`redact` can mask it if anything later prints it.
This module imports neither IPython nor TensorFlow.
"""

from __future__ import annotations

import base64
import getpass
import math
import os
import re
import stat
import threading
from collections import Counter
from pathlib import Path

from .errors import KeyFileError, KPrivacyError, MissingEnvVarError, SecretOnLineError

MASK = "***"
#: Shortest secret masked in output. A shorter one ("1234", "patient") turns up in ordinary
#: values and names: masking it there would corrupt what is shown and point at the secret.
#: (Files are encrypted only with passphrases of 10 characters or more.)
MIN_MASKED = 8


class Secret:
    """A secret string that does not show itself in ``repr``/``str``/f-strings.

    >>> s = Secret("hunter2")
    >>> s
    Secret(***)
    >>> s.reveal()
    'hunter2'
    """

    __slots__ = ("_value", "source")

    def __init__(self, value: str, source: str = "value") -> None:
        self._value = value
        self.source = source
        REGISTRY.register(value)

    def reveal(self) -> str:
        """Return the secret value; call only at the point of use."""
        return self._value

    def __repr__(self) -> str:
        return f"Secret({MASK})"

    __str__ = __repr__

    def __format__(self, spec: str) -> str:
        return repr(self)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(("Secret", self._value))

    def __reduce__(self):  # pragma: no cover - defensive
        raise TypeError("Secret objects cannot be pickled")


class SecretRegistry:
    """Secrets this process has handled, so they can be masked in anything printed later."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._secrets: set[str] = set()
        self._pattern: re.Pattern[str] | None = None

    def register(self, value: str | bytes | None) -> None:
        if value is None:
            return
        if isinstance(value, bytes):
            try:
                value = value.decode()
            except UnicodeDecodeError:
                return
        pieces = {value, value.strip()}
        # Key files: also mask each non-comment line on its own.
        pieces.update(line.strip() for line in value.splitlines() if not line.startswith("#"))
        with self._lock:
            added = False
            for piece in pieces:
                if len(piece) >= MIN_MASKED and piece not in self._secrets:
                    self._secrets.add(piece)
                    added = True
            if added:
                ordered = sorted(self._secrets, key=len, reverse=True)
                self._pattern = re.compile("|".join(re.escape(s) for s in ordered))

    def forget_all(self) -> None:
        with self._lock:
            self._secrets.clear()
            self._pattern = None

    def __len__(self) -> int:
        return len(self._secrets)

    def redact(self, text: str) -> str:
        """Return ``text`` with every registered secret (and any age secret key) masked."""
        pattern = self._pattern
        if pattern is not None:
            text = pattern.sub(MASK, text)
        return SIGNING_KEY_RE.sub(MASK, AGE_SECRET_KEY_RE.sub(MASK, text))

    def contains_secret(self, text: str) -> bool:
        return self.redact(text) != text


REGISTRY = SecretRegistry()


def redact(text: str) -> str:
    """Mask every secret kprivacy_nb has seen (and any age secret key) in ``text``."""
    return REGISTRY.redact(text)


def register_secret(value: str | bytes | None) -> None:
    """Tell the redaction registry about a secret handled outside this module."""
    REGISTRY.register(value)


# --- detecting secrets typed on a magic line ---------------------------------------------------

AGE_SECRET_KEY_RE = re.compile(r"AGE-SECRET-KEY-(?:PQ-)?1[0-9A-Za-z]{20,}")
# kprivacy_nb Ed25519 signing keys (kprivacy_nb.crypto.signing).
SIGNING_KEY_RE = re.compile(r"KPRIVACY-SIGNING-KEY-1[0-9A-Za-z]{20,}", re.IGNORECASE)
_SSH_PRIVATE_RE = re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----")
_LITERAL_FLAG_RE = re.compile(
    r"(?:^|[\s'\"])--?(?:passphrase|password|passwd|secret|secret-key|identity-string)(?:=|\s+)(?!-)(\S+)",
    re.IGNORECASE,
)
_TOKEN_RE = re.compile(r"[A-Za-z0-9+/=_\-]{32,}")
# Flags that take the NAME of an environment variable, never a value.
# Abbreviations too (--passphrase-e, --passphrase-): argparse would have accepted them.
_ENV_FLAG_RE = re.compile(
    r"(?:^|\s)--[a-z-]*-(?:e|en|env)?(?:=|\s+)(\"[^\"]*\"?|'[^']*'?|\S+)", re.IGNORECASE
)
_ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# Public things that look random but are not secrets.
_PUBLIC_PREFIXES = ("age1", "ssh-ed25519", "ssh-rsa", "kpsig1", "kppub1")
# The base64 of an SSH public key after "ssh-ed25519 " / "ssh-rsa " (its wire format starts with
# the type name): public, not a token.
_SSH_PUBLIC_B64_RE = re.compile(r"(?:^|\s|['\"])(?:ssh-ed25519|ssh-rsa)\s+(AAAA[A-Za-z0-9+/]+=*)")


def _entropy_bits_per_char(token: str) -> float:
    counts = Counter(token)
    n = len(token)
    return -sum(c / n * math.log2(c / n) for c in counts.values())


def _is_high_entropy(token: str) -> bool:
    if token.lower().startswith(_PUBLIC_PREFIXES):
        return False
    if re.fullmatch(r"[0-9a-f]+", token):  # hex digests are public identifiers
        return False
    if "/" in token:
        # A path, or base64 with slashes: judge the long pieces on their own.
        return any(len(p) >= 20 and _is_high_entropy(p) for p in token.split("/"))
    mixed = all(re.search(p, token) for p in (r"[a-z]", r"[A-Z]", r"[0-9]"))
    return bool(mixed) and _entropy_bits_per_char(token) >= 4.0


def _is_ssh_public_blob(token: str) -> bool:
    try:
        blob = base64.b64decode(token + "=" * (-len(token) % 4))
    except ValueError:
        return False
    return blob.startswith((b"\x00\x00\x00\x0bssh-ed25519\x00", b"\x00\x00\x00\x07ssh-rsa\x00"))


def looks_like_env_name(value: str) -> bool:
    """Whether ``value`` looks like an environment variable *name* rather than a passphrase.

    A name is an identifier; one mixing lower case, upper case and digits with a spread of
    characters (``Tr0ub4dorXyz``) is taken for a password typed in the wrong place.
    """
    if not _ENV_NAME_RE.fullmatch(value):
        return False
    mixed = all(re.search(p, value) for p in (r"[a-z]", r"[A-Z]", r"[0-9]"))
    return not (mixed and len(value) >= 8 and _entropy_bits_per_char(value) >= 2.5)


def find_secret(line: str) -> str | None:
    """Return why ``line`` looks like it contains a secret, or ``None`` if it looks clean.

    Flags that *name* a secret (``--passphrase-env VAR``, ``--identity FILE``) are fine; literal
    values are not.
    """
    if AGE_SECRET_KEY_RE.search(line):
        return "an age secret key (AGE-SECRET-KEY-1…)"
    if SIGNING_KEY_RE.search(line):
        return "a signing secret key (KPRIVACY-SIGNING-KEY-1…)"
    if _SSH_PRIVATE_RE.search(line):
        return "a private key block"
    m = _LITERAL_FLAG_RE.search(line)
    if m:
        return f"a literal value after {m.group(0).split()[0].split('=')[0]!s}"
    for m in _ENV_FLAG_RE.finditer(line):
        if not looks_like_env_name(m.group(1)[1:-1] if m.group(1)[:1] in "'\"" else m.group(1)):
            flag = m.group(0).strip().split("=")[0].split()[0]
            return (
                f"what looks like a passphrase after {flag} (it takes the NAME of an environment "
                "variable holding the passphrase)"
            )
    public = {t for t in _SSH_PUBLIC_B64_RE.findall(line) if _is_ssh_public_blob(t)}
    for token in _TOKEN_RE.findall(line):
        if token not in public and _is_high_entropy(token):
            return "a long high-entropy token (an API key or password?)"
    if REGISTRY.contains_secret(line):
        return "a secret this session has already handled"
    return None


def check_line(line: str) -> None:
    """Raise :class:`SecretOnLineError` if ``line`` contains what looks like a secret."""
    why = find_secret(line)
    if why:
        raise SecretOnLineError(
            f"refused: this line contains {why}. Secrets never go on a magic line — use a prompt "
            "(omit the value), --passphrase-env VAR, or a key file (-i FILE). The line was removed "
            "from the input history."
        )


# --- the key-source resolver --------------------------------------------------------------------


def check_key_file_permissions(path: Path) -> None:
    """Refuse a key file that group or others can read or write."""
    st = path.stat()
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeyFileError(
            f"{path} is readable by group/others (mode {stat.S_IMODE(st.st_mode):04o}); "
            f"fix it with: chmod 600 {path}"
        )


def read_key_file(path: str | os.PathLike) -> Secret:
    """Read a secret key file after checking its permissions; the content is registered."""
    p = Path(path).expanduser()
    if not p.exists():
        raise KeyFileError(f"key file {p} does not exist")
    if not p.is_file():
        raise KeyFileError(f"{p} is not a file")
    check_key_file_permissions(p)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise KeyFileError(f"cannot read key file {p}: {type(exc).__name__}") from None
    return Secret(text, source=f"file {p}")


def secret_from_env(var: str) -> Secret:
    """Read a secret from the environment variable named ``var``."""
    if not looks_like_env_name(var or ""):
        if var:
            register_secret(var)  # mask it if anything prints it later
        raise SecretOnLineError(
            "refused: --passphrase-env takes the NAME of an environment variable (like "
            "MY_PASSPHRASE), and what was given looks like a passphrase itself (not shown). "
            "Set it with `export MY_PASSPHRASE=…` (or %env) and pass the name"
        )
    value = os.environ.get(var)
    if value is None or value == "":
        raise MissingEnvVarError(
            "the environment variable named in --passphrase-env is not set (or empty); its name "
            "is not repeated, in case it was the passphrase itself. Set it with "
            "`export NAME=…` (or %env) before starting, then pass the NAME"
        )
    return Secret(value, source=f"env {var}")


def prompt_secret(prompt: str = "Passphrase: ", *, confirm: bool = False) -> Secret:
    """Ask for a secret without echo (ipykernel answers :func:`getpass.getpass` as a password box)."""
    try:
        value = getpass.getpass(prompt)
    except (EOFError, OSError, RuntimeError) as exc:
        raise KPrivacyError(
            "no way to prompt for a passphrase here (no terminal or frontend input); "
            "use --passphrase-env VAR instead"
        ) from exc
    if not value:
        raise KPrivacyError("empty passphrase refused")
    if confirm:
        again = getpass.getpass("Confirm: ")
        if again != value:
            raise KPrivacyError("the two passphrases differ")
    return Secret(value, source="prompt")


def resolve_passphrase(
    env: str | None = None, *, prompt: str = "Passphrase: ", confirm: bool = False
) -> Secret:
    """The passphrase source resolver: the named env var if given, else a no-echo prompt."""
    if env:
        return secret_from_env(env)
    return prompt_secret(prompt, confirm=confirm)
