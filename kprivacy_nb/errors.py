"""Exceptions a user can cause.

Every error a user can trigger is a :class:`KPrivacyError` whose message says what to do next.
Magics turn these into IPython ``UsageError`` (one line, no traceback) and the CLI into a one-line
message on stderr. Messages never contain secrets.
"""

from __future__ import annotations


class KPrivacyError(Exception):
    """Base class of every user-facing kprivacy_nb error."""

    exit_code = 1


class InvalidParameterError(KPrivacyError, ValueError):
    """A parameter is out of range or inconsistent (bad sizes, δ ≥ 1/n, σ < 0…)."""

    exit_code = 2


class OutputPathError(InvalidParameterError):
    """The output folder is missing or not writable (a failure, exit code 1, not a usage error)."""

    exit_code = 1


class SecretOnLineError(KPrivacyError):
    """A magic line or argument contains something that looks like a secret."""

    exit_code = 2


class MissingEnvVarError(KPrivacyError):
    """The environment variable named for a secret is not set (its name is not echoed)."""


class KeyFileError(KPrivacyError):
    """A key file is missing, unreadable, malformed or has unsafe permissions."""


class BudgetExceededError(KPrivacyError):
    """A DP run would spend more privacy budget than its ledger has left."""


class SlowPathWarning(UserWarning):
    """A layer takes a per-example path much slower than its fast one (a recurrent layer with
    dropout inside the recurrence, for instance): said before training, with the way back."""


class PrivacyBudgetWarning(UserWarning):
    """A run that is allowed but probably not what was meant (e.g. a target ε mostly spent by
    the model's earlier fits, so the new fit gets almost pure noise)."""


class LedgerError(KPrivacyError):
    """The ledger database is unknown, corrupted, locked or otherwise unusable."""


class TrainingError(KPrivacyError):
    """DP training cannot start or had to stop (unsupported layer, non-finite gradients…)."""


class CryptoError(KPrivacyError):
    """Base class of encryption, decryption and signature failures."""


class HeaderError(CryptoError):
    """The age header is malformed or unsupported."""


class HMACError(CryptoError):
    """The age header MAC does not match: the header was modified or the key is wrong."""


class PayloadError(CryptoError):
    """The age payload failed authentication or is truncated."""


class ArmorError(CryptoError):
    """The ASCII armor is malformed."""


class NoIdentityMatchError(CryptoError):
    """None of the given identities or passphrases opens the file."""


class SignatureError(CryptoError):
    """A signature is missing, malformed or does not verify."""


class SerializationError(KPrivacyError):
    """An object can't be serialised or deserialised safely (unknown type, pickle refused…)."""


class FileExistsRefusedError(KPrivacyError, FileExistsError):
    """The output file exists and overwriting was not asked for."""


class ResourceLimitError(SerializationError):
    """An untrusted file would expand beyond a size limit (a decompression bomb, say)."""


class UntrustedSignatureError(SignatureError):
    """A signature is required (trust policy) but the file is unsigned or its signer unknown."""


def caller_stacklevel() -> int:
    """The ``stacklevel`` for a ``warnings.warn`` made by the caller of this function that points
    at the user's code: the first frame outside kprivacy_nb, Keras, TensorFlow and the standard
    library (the warning then shows the user's line, not ours)."""
    import os
    import sys
    import sysconfig

    skipped = (os.path.dirname(os.path.abspath(__file__)), sysconfig.get_paths()["stdlib"])
    level, frame = 1, sys._getframe(1)
    while frame is not None:
        name = os.path.abspath(frame.f_code.co_filename)
        inside = any(name.startswith(path + os.sep) for path in skipped) or any(
            f"{os.sep}{lib}{os.sep}" in name for lib in ("keras", "tensorflow")
        )
        if not inside:
            return level
        frame, level = frame.f_back, level + 1
    return level
