"""Asking for a passphrase: on the terminal (``/dev/tty``, no echo) or through the frontend.

Never from stdin. Python's :func:`getpass.getpass` falls back to reading stdin when there is no
controlling terminal — and stdin may be the very file being decrypted
(``cat f.age | kprivacy-nb decrypt -i id_ed25519``). Like age, the prompt here opens ``/dev/tty``;
with no terminal it refuses in one line that names the non-interactive option to use instead.
Where something else answers :func:`getpass.getpass` (ipykernel's password box, a test), that is
used. Every failure — no terminal, end of input (Ctrl-D), bytes that are not UTF-8, an empty
passphrase, two entries that differ — is one :class:`~kprivacy_nb.errors.KPrivacyError` line
that shows nothing of what was typed.

>>> resolve("MY_PASSPHRASE", option="--identity-passphrase-env")  # doctest: +SKIP
Secret(***)
"""

from __future__ import annotations

import contextlib
import getpass
import os
from collections.abc import Callable, Iterator

from ..errors import KPrivacyError, MissingEnvVarError, SecretOnLineError
from ..secrets import Secret, secret_from_env

TTY = "/dev/tty"
# The option that gives an encrypted identity's passphrase without a terminal (CLI, %secure_load).
IDENTITY_OPTION = "--identity-passphrase-env"
MAX_LINE = 64 << 10  # canonical terminal input is far shorter (4 KiB); bounds a runaway read
_STDLIB_GETPASS = getattr(getpass, "unix_getpass", None)


def _frontend_answers() -> bool:
    """Whether :func:`getpass.getpass` was replaced (ipykernel, a test) or is not the Unix one."""
    try:
        import termios  # noqa: F401
    except ImportError:  # pragma: no cover - not POSIX
        return True
    return getpass.getpass is not _STDLIB_GETPASS


def _instead(option: str | None) -> str:
    if option:
        return f"set it in an environment variable and pass {option} VAR"
    return "run the command in a terminal"


def _frontend_line(prompt: str, option: str | None) -> str:
    try:
        return getpass.getpass(prompt)
    except (EOFError, OSError, RuntimeError):
        raise KPrivacyError(
            f"no way to ask for the passphrase here (no frontend input): {_instead(option)}"
        ) from None


def _terminal_line(fd: int, prompt: str) -> str:
    """One line typed at the terminal ``fd`` with echo off, decoded as strict UTF-8."""
    import termios

    try:
        old = termios.tcgetattr(fd)
    except termios.error:
        raise KPrivacyError(f"{TTY} is not a terminal: cannot ask without echo") from None
    new = list(old)
    new[3] &= ~termios.ECHO
    termios.tcsetattr(fd, termios.TCSAFLUSH, new)
    typed = bytearray()
    try:
        os.write(fd, prompt.encode("utf-8", "replace"))
        while b"\n" not in typed and len(typed) < MAX_LINE:
            chunk = os.read(fd, 4096)
            if not chunk:  # Ctrl-D
                break
            typed += chunk
    finally:
        termios.tcsetattr(fd, termios.TCSAFLUSH, old)
        os.write(fd, b"\n")
    line = bytes(typed.split(b"\n", 1)[0])
    typed[:] = bytes(len(typed))  # best effort: one copy fewer of the secret in memory
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError:
        raise KPrivacyError(
            "the passphrase typed is not valid UTF-8 text (check the terminal's character "
            "encoding); nothing of it is shown"
        ) from None


@contextlib.contextmanager
def _reader(what: str, option: str | None) -> Iterator[Callable[[str], str]]:
    """``read(prompt) -> str``: through the frontend, else on ``/dev/tty`` (never stdin)."""
    if _frontend_answers():
        yield lambda prompt: _frontend_line(prompt, option)
        return
    try:
        fd = os.open(TTY, os.O_RDWR | os.O_NOCTTY)
    except OSError:
        raise KPrivacyError(
            f"no terminal to ask for the {what} (it is never read from stdin): {_instead(option)}"
        ) from None
    try:
        yield lambda prompt: _terminal_line(fd, prompt)
    finally:
        os.close(fd)


def ask(
    prompt: str = "Passphrase: ", *, option: str | None = None, confirm: bool = False
) -> Secret:
    """Ask for a passphrase without echo: on ``/dev/tty``, or through the frontend's
    :func:`getpass.getpass`. ``option`` names the non-interactive alternative the error shows
    when there is no terminal (``--passphrase-env``, ``--identity-passphrase-env``…)."""
    what = prompt.strip().rstrip(":").strip() or "passphrase"
    with _reader(what[:1].lower() + what[1:], option) as read:
        value = read(prompt)
        if not value:
            raise KPrivacyError("no passphrase entered (empty, or end of input)")
        if confirm and read("Confirm: ") != value:
            raise KPrivacyError("the two passphrases differ")
    return Secret(value, source="prompt")


def from_env(var: str, option: str) -> Secret:
    """The passphrase in ``$var`` (named by ``option``); refused if it is not UTF-8 text."""
    try:
        secret = secret_from_env(var)
    except (SecretOnLineError, MissingEnvVarError) as exc:
        raise type(exc)(str(exc).replace("--passphrase-env", option)) from None
    try:
        secret.reveal().encode("utf-8")
    except UnicodeEncodeError:
        raise KPrivacyError(
            f"the environment variable named in {option} holds bytes that are not UTF-8 text"
        ) from None
    return secret


def resolve(
    env: str | None,
    *,
    prompt: str = "Passphrase: ",
    option: str = "--passphrase-env",
    confirm: bool = False,
) -> Secret:
    """The passphrase from ``$env`` when a variable is named, else asked for (:func:`ask`)."""
    if env:
        return from_env(env, option)
    return ask(prompt, option=option, confirm=confirm)


def source(env: str | None, option: str) -> Callable[[str], Secret]:
    """A passphrase source for an encrypted key file (``keys.load_identities(...,
    passphrase=…)``): ``$env`` (read now, so a missing variable is reported at once), else a
    prompt whose no-terminal error names ``option``."""
    if env:
        secret = from_env(env, option)
        return lambda _prompt: secret
    return lambda prompt: ask(prompt, option=option)


def password_bytes(secret: Secret) -> bytes:
    """The secret as UTF-8 bytes for a key-file decryptor (one clear error, never the text)."""
    try:
        return secret.reveal().encode("utf-8")
    except UnicodeEncodeError:
        raise KPrivacyError(
            "the passphrase is not valid UTF-8 text; nothing of it is shown"
        ) from None
