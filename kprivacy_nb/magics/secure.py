"""``%secure_save``, ``%secure_load``, ``%secure_keygen``: encrypted, signed objects in age files.

Thin layer over :mod:`kprivacy_nb.crypto.store` / ``keys`` / ``signing``. Secrets never go on the
line: passphrases come from a prompt (``--passphrase``) or ``--passphrase-env VAR``, keys from key
files. Settings: ``%config SecureMagics.work_factor = 19``, ``SecureMagics.armor = True``,
``SecureMagics.default_recipients = ['alice']``, ``SecureMagics.default_signer = 'me'``.
"""

from __future__ import annotations

import html
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring
from traitlets import Bool, Int, List, Unicode

from ._base import lookup, passphrase_from_args, user_errors


class LoadResult:
    """What ``%secure_load -o VAR`` put in the namespace (no secrets, no object repr)."""

    def __init__(self, var: str, obj: Any, path: str, verified_by: str | None) -> None:
        self.var = var
        self.type = f"{type(obj).__module__}.{type(obj).__qualname__}"
        self.path = path
        self.verified_by = verified_by

    def __repr__(self) -> str:
        sig = f", signature by {self.verified_by} verified" if self.verified_by else ", unverified"
        return f"loaded {self.path} into {self.var} ({self.type}{sig})"

    def _repr_html_(self) -> str:
        sig = (
            f"✅ signature by <code>{html.escape(self.verified_by)}</code> verified"
            if self.verified_by
            else "⚠️ signature not checked (use --verify-with)"
        )
        return (
            f"<div>🔓 Loaded <code>{html.escape(self.path)}</code> into "
            f"<b>{html.escape(self.var)}</b> ({html.escape(self.type)})<br>{sig}</div>"
        )


@magics_class
class SecureMagics(Magics):
    """Encrypt, sign and safely load notebook objects (standard age v1 files)."""

    work_factor = Int(18, help="scrypt work factor (log2 N) for new passphrase files, ≥ 18").tag(
        config=True
    )
    armor = Bool(False, help="Write ASCII-armored files by default").tag(config=True)
    default_recipients = List(
        Unicode(), help="Recipients used by %secure_save when no --to/--passphrase is given"
    ).tag(config=True)
    default_signer = Unicode("", help="Signing key used by %secure_save when no --sign-with").tag(
        config=True
    )

    @magic_arguments()
    @argument("obj", help="variable to save (with --path: a file or folder to save)")
    @argument("path", help="output .age file")
    @argument("--to", action="append", default=[], help="recipient name or age1… (repeatable)")
    @argument("--passphrase", action="store_true", help="encrypt with a passphrase (prompt)")
    @argument("--passphrase-env", metavar="VAR", help="read the passphrase from $VAR")
    @argument("--sign-with", metavar="KEY", help="signing key name or file")
    @argument("--force", action="store_true", help="overwrite an existing file")
    @argument("--allow-pickle", action="store_true", help="pickle unknown types (unsafe)")
    @argument("-a", "--armor", action="store_true", help="ASCII-armored output")
    @argument("--name", help="entry name inside the file (default: the variable name)")
    @argument("--path", dest="is_path", action="store_true", help="OBJ is a file/folder path")
    @line_magic
    @user_errors
    def secure_save(self, line: str = "") -> Any:
        """Encrypt (and sign) a notebook object into a standard age file.

        Example::

            %secure_save model models/detector.age --to alice --sign-with me
            %secure_save df data.age --passphrase-env DATA_PASS
            %secure_save --path results/ results.age --to alice
        """
        args = parse_argstring(self.secure_save, line)
        from pathlib import Path

        from ..crypto.store import secure_save

        obj = Path(args.obj) if args.is_path else lookup(self.shell, args.obj)
        passphrase = passphrase_from_args(args, confirm=True)
        recipients = args.to or (None if passphrase is not None else self.default_recipients)
        if args.allow_pickle:
            print("⚠️ --allow-pickle: unknown types will be pickled; loading needs the same flag")
        return secure_save(
            obj,
            args.path,
            recipients=recipients or None,
            passphrase=passphrase,
            sign_with=args.sign_with or self.default_signer or None,
            force=args.force,
            allow_pickle=args.allow_pickle,
            armor=args.armor or self.armor,
            name=args.name or (Path(args.obj).name if args.is_path else args.obj),
            work_factor=self.work_factor,
        )

    @magic_arguments()
    @argument("path", help="the .age file to load")
    @argument("-o", "--output", metavar="VAR", help="variable to store the object in")
    @argument("--verify-with", metavar="PUB", help="required signer: name, kppub1… or .pub file")
    @argument("-i", "--identity", action="append", default=[], help="identity file or key name")
    @argument("--passphrase", action="store_true", help="prompt for the passphrase")
    @argument("--passphrase-env", metavar="VAR", help="read the passphrase from $VAR")
    @argument("--allow-pickle", action="store_true", help="allow loading a pickle (unsafe)")
    @argument("--name", help="entry to load when the file holds several")
    @line_magic
    @user_errors
    def secure_load(self, line: str = "") -> Any:
        """Decrypt, verify and safely load an object saved with %secure_save.

        Example::

            %secure_load models/detector.age -o detector --verify-with me
            %secure_load data.age -o df --passphrase
        """
        args = parse_argstring(self.secure_load, line)
        from ..crypto.store import secure_load, stanza_types_of

        passphrase = passphrase_from_args(args, confirm=False)
        if passphrase is None and not args.identity:
            try:
                types = stanza_types_of(args.path)
            except OSError as exc:
                raise UsageError(f"cannot read {args.path}: {exc.strerror}") from None
            if "scrypt" in types:
                from ..secrets import prompt_secret

                passphrase = prompt_secret("Passphrase: ")
        if args.allow_pickle:
            print("⚠️ --allow-pickle: a pickle runs code chosen by whoever wrote the file")
        obj = secure_load(
            args.path,
            identities=args.identity or None,
            passphrase=passphrase,
            verify_with=args.verify_with,
            allow_pickle=args.allow_pickle,
            name=args.name,
        )
        if not args.output:
            return obj
        if not args.output.isidentifier():
            raise UsageError(f"{args.output!r} is not a valid variable name")
        self.shell.user_ns[args.output] = obj
        from ..crypto.signing import load_verify_key

        verified = str(load_verify_key(args.verify_with)) if args.verify_with else None
        return LoadResult(args.output, obj, args.path, verified)

    @magic_arguments()
    @argument("name", nargs="?", help="key name (default: 'default')")
    @argument("--signing", action="store_true", help="an Ed25519 signing key instead of age")
    @argument("-o", "--output", metavar="FILE", help="write the key file here")
    @argument("--force", action="store_true", help="replace an existing key")
    @line_magic
    @user_errors
    def secure_keygen(self, line: str = "") -> Any:
        """Create a key file (0600) and show only its public key.

        Example::

            %secure_keygen alice            # age identity; then: %secure_save x f.age --to alice
            %secure_keygen me --signing     # signing key; then: --sign-with me / --verify-with me
        """
        args = parse_argstring(self.secure_keygen, line)
        from ..crypto import keys, signing

        make = signing.generate_signing_key if args.signing else keys.generate_identity
        return make(args.name, output=args.output, force=args.force)
