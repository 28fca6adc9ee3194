"""``%secure_save``, ``%secure_load``, ``%secure_keygen``, ``%secure_recipients``,
``%secure_trust``: encrypted, signed objects in age files, colleagues' public keys, and whose
signatures you trust.

Thin layer over :mod:`kprivacy_nb.crypto.store` / ``keys`` / ``signing`` / ``trust``. Secrets never
go on the line: passphrases come from a prompt (``--passphrase``) or ``--passphrase-env VAR``, keys
from key files. Settings: ``%config SecureMagics.work_factor = 19``, ``SecureMagics.armor = True``,
``SecureMagics.default_recipients = ['alice']``, ``SecureMagics.default_signer = 'me'``,
``SecureMagics.require_signature = True``, ``SecureMagics.max_expanded_bytes = 2**31``.
"""

from __future__ import annotations

import html
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring
from traitlets import Bool, Int, List, Unicode

from ..crypto.age import DEFAULT_SCRYPT_WORK_FACTOR
from ._base import (
    PlainText,
    encryption_arguments,
    lookup,
    passphrase_from_args,
    user_errors,
)


class LoadResult:
    """What ``%secure_load -o VAR`` put in the namespace (no secrets, no object repr)."""

    def __init__(self, var: str, obj: Any, path: str, status: Any) -> None:
        self.var = var
        self.type = f"{type(obj).__module__}.{type(obj).__qualname__}"
        self.path = path
        self.status = status
        self.verified_by = status.signer if status.verified else None

    def __repr__(self) -> str:
        mark = "" if self.status.verified else "⚠️ "
        return f"loaded {self.path} into {self.var} ({self.type}); {mark}{self.status}"

    def _repr_html_(self) -> str:
        if self.status.verified:
            sig = f"✅ {html.escape(str(self.status))}"
        else:
            sig = f"<b style='color:#b00'>⚠️ {html.escape(str(self.status))}</b>"
        return (
            f"<div>🔓 Loaded <code>{html.escape(self.path)}</code> into "
            f"<b>{html.escape(self.var)}</b> ({html.escape(self.type)})<br>{sig}</div>"
        )


@magics_class
class SecureMagics(Magics):
    """Encrypt, sign and safely load notebook objects (standard age v1 files)."""

    work_factor = Int(
        DEFAULT_SCRYPT_WORK_FACTOR, help="scrypt work factor (log2 N) for new passphrase files"
    ).tag(config=True)
    armor = Bool(False, help="Write ASCII-armored files by default").tag(config=True)
    default_recipients = List(
        Unicode(), help="Recipients used by %secure_save when no -r/--passphrase is given"
    ).tag(config=True)
    default_signer = Unicode("", help="Signing key used by %secure_save when no --sign-with").tag(
        config=True
    )
    require_signature = Bool(
        None,
        allow_none=True,
        help="Refuse unsigned files and files not signed by a trusted signer or --verify-with "
        "(everywhere in this session, Python API included). None: KPRIVACY_NB_REQUIRE_SIGNATURE",
    ).tag(config=True)
    max_expanded_bytes = Int(
        None,
        allow_none=True,
        help="Largest size an archive member in a loaded file may expand to (bytes). "
        "None: KPRIVACY_NB_MAX_EXPANDED, else 1 GiB",
    ).tag(config=True)

    def __init__(self, shell: Any = None, **kwargs: Any) -> None:
        super().__init__(shell=shell, **kwargs)
        self.observe(self._apply_policy, names=["require_signature", "max_expanded_bytes"])
        self._apply_policy()

    def _apply_policy(self, _change: Any = None) -> None:
        from ..crypto import limits, trust

        trust.configure(require_signature=self.require_signature)
        limits.configure(max_expanded_bytes=self.max_expanded_bytes)

    def on_unload(self) -> None:
        from ..crypto import limits, trust

        trust.configure(require_signature=None)
        limits.configure(max_expanded_bytes=None)

    @magic_arguments()
    @argument("obj", help="variable to save (with --path: a file or folder to save)")
    @argument("path", help="output .age file")
    @encryption_arguments
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

            %secure_save model models/detector.age -r alice --sign-with me
            %secure_save df data.age --passphrase-env DATA_PASS
            %secure_save --path results/ results.age -r alice
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
    @argument(
        "--identity-passphrase-env",
        metavar="VAR",
        help="read the passphrase of an encrypted SSH identity (-i) from $VAR",
    )
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
            %secure_load data.age -o df -i ~/.ssh/id_ed25519 --identity-passphrase-env SSH_PASS
        """
        args = parse_argstring(self.secure_load, line)
        from ..crypto import keys, prompt
        from ..crypto.envelope import stanza_types_of
        from ..crypto.store import load_with_status

        identities = None
        if args.identity_passphrase_env and not args.identity:
            raise UsageError("--identity-passphrase-env is for an encrypted key given with -i FILE")
        if args.identity:
            source = prompt.source(args.identity_passphrase_env, prompt.IDENTITY_OPTION)
            identities = keys.load_identities(args.identity, passphrase=source)

        passphrase = passphrase_from_args(args, confirm=False)
        if passphrase is None and not args.identity:
            if "scrypt" in stanza_types_of(args.path):
                from ..secrets import prompt_secret

                passphrase = prompt_secret("Passphrase: ")
        if args.allow_pickle:
            print("⚠️ --allow-pickle: a pickle runs code chosen by whoever wrote the file")
        if args.output and not args.output.isidentifier():
            raise UsageError(f"{args.output!r} is not a valid variable name")
        obj, status = load_with_status(
            args.path,
            identities=identities,
            passphrase=passphrase,
            verify_with=args.verify_with,
            allow_pickle=args.allow_pickle,
            name=args.name,
        )
        if not args.output:
            if not status.verified:
                print(f"⚠️ {args.path}: {status}")
            return obj
        self.shell.user_ns[args.output] = obj
        return LoadResult(args.output, obj, args.path, status)

    @magic_arguments()
    @argument("name", nargs="?", help="key name (default: 'default')")
    @argument("--signing", action="store_true", help="an Ed25519 signing key instead of age")
    @argument("--pq", action="store_true", help="post-quantum hybrid age identity (age1pq1…)")
    @argument("-o", "--output", metavar="FILE", help="write the key file here")
    @argument("--force", action="store_true", help="replace an existing key")
    @line_magic
    @user_errors
    def secure_keygen(self, line: str = "") -> Any:
        """Create a key file (0600) and show only its public key.

        Example::

            %secure_keygen alice            # age identity; then: %secure_save x f.age -r alice
            %secure_keygen me --signing     # signing key; then: --sign-with me / --verify-with me
            %secure_keygen carol --pq       # post-quantum (ML-KEM-768 + X25519): age1pq1…
        """
        args = parse_argstring(self.secure_keygen, line)
        from ..crypto import keys, signing

        if args.signing and args.pq:
            raise UsageError("--signing and --pq are different keys: choose one")
        if args.signing:
            return signing.generate_signing_key(args.name, output=args.output, force=args.force)
        return keys.generate_identity(args.name, output=args.output, force=args.force, pq=args.pq)

    @magic_arguments()
    @argument("action", nargs="?", default="list", help="add, list (default) or remove")
    @argument("name", nargs="?", help="the name to use with -r / recipients=")
    @argument("key", nargs="*", help="(add) the public key: age1…, age1pq1…, ssh-…, kppub1…")
    @argument("--force", action="store_true", help="(add) replace a key already under NAME")
    @line_magic
    @user_errors
    def secure_recipients(self, line: str = "") -> Any:
        """Name colleagues' public keys, so ``-r NAME`` (alias ``--to NAME``) encrypts to them.

        KEY is the public key someone sent you (``age1…``, ``age1pq1…``, ``ssh-ed25519 AAAA…``,
        ``ssh-rsa AAAA…``, or a signer's ``kppub1…``); no key pair is made — your own keys come
        from ``%secure_keygen``. Example::

            %secure_recipients add bob age1ql3z7hjy54pw3hyww5ayyfg7zqgvc7w3j2elw8zmrj2kg5sfn9aqmcac8p
            %secure_recipients add carol ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAA… carol@laptop
            %secure_save df results.age -r bob
            %secure_recipients                  # list
            %secure_recipients remove bob
        """
        args = parse_argstring(self.secure_recipients, line)
        from ..crypto import keys

        if args.action == "add":
            if not args.name or not args.key:
                raise UsageError(
                    "add needs a name and a public key: %secure_recipients add NAME KEY"
                )
            return PlainText(
                f"added {keys.add_recipient(args.name, ' '.join(args.key), force=args.force)}"
            )
        if args.action == "remove":
            if not args.name:
                raise UsageError("remove needs a name: %secure_recipients remove NAME")
            return PlainText("\n".join(f"removed {k}" for k in keys.remove_recipient(args.name)))
        if args.action != "list" or args.name:
            raise UsageError("use %secure_recipients add NAME KEY | list | remove NAME")
        named = keys.list_recipients()
        if not named:
            return PlainText("no named public keys yet: %secure_recipients add NAME KEY")
        return PlainText("\n".join(str(k) for k in named))

    @magic_arguments()
    @argument("signer", nargs="?", help="signer name or kppub1… key to trust")
    @argument("--name", help="name to record with a kppub1… key")
    @argument("--remove", metavar="SIGNER", help="stop trusting this signer (name or kppub1…)")
    @argument("--list", action="store_true", help="list trusted signers (the default)")
    @line_magic
    @user_errors
    def secure_trust(self, line: str = "") -> Any:
        """Manage trusted signers: files they signed are verified automatically on load.

        Others load with a loud "signature present but NOT verified" / "unsigned" note, or are
        refused with ``%config SecureMagics.require_signature = True``. Example::

            %secure_trust bob                       # a name from recipients.txt / keys/
            %secure_trust kppub1… --name carol
            %secure_trust --remove carol
            %secure_trust                           # list
        """
        args = parse_argstring(self.secure_trust, line)
        from ..crypto import trust

        if args.remove:
            return PlainText(f"no longer trusted: {trust.remove_trusted(args.remove)}")
        if args.signer:
            added = trust.add_trusted(args.signer, args.name)
            return PlainText(f"trusted: {added} (fingerprint {added.key.fingerprint})")
        signers = trust.list_trusted()
        if not signers:
            return PlainText("no trusted signers yet: %secure_trust NAME|kppub1…")
        return PlainText("\n".join(f"{s} (fingerprint {s.key.fingerprint})" for s in signers))
