"""``kprivacy-nb keygen | encrypt | decrypt | sign | verify | inspect`` (flags mirror age's).

Files written are standard age v1 files; ``age``/``rage`` can open them and vice versa. Input
defaults to stdin and output to stdout, streamed chunk by chunk. Secrets never come from the
command line: identities from files (``-i``), passphrases from a prompt or ``--passphrase-env``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from ..errors import InvalidParameterError, KPrivacyError, SerializationError
from . import age, envelope, keys, prompt, signing, trust
from .outputs import atomic_output
from .printable import printable

FORMATS = ("kprivacy", "oms")
FORMAT_HELP = "kprivacy (default: Ed25519, kppub1… keys) or oms (OpenSSF model signing)"
PASS_ENV_HELP = "read the passphrase from $VAR"
ID_PASS_OPTION = prompt.IDENTITY_OPTION
ID_PASS_ENV_HELP = (
    "read the passphrase of an encrypted SSH identity (-i) from $VAR, instead of asking on the "
    "terminal"
)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the crypto subcommands to the ``kprivacy-nb`` parser."""
    p = subparsers.add_parser(
        "keygen",
        help="create an age identity (or --signing key); prints only the public key",
        description="Create a key file (mode 0600) and print its public key. With NAME it goes "
        "to the keys folder and NAME can be used with -r. Example: kprivacy-nb keygen alice",
    )
    p.add_argument("name", nargs="?", help="key name (keys/NAME.key, 'NAME: age1…' registered)")
    p.add_argument("-o", "--output", help="write the key file here instead")
    kind = p.add_mutually_exclusive_group()
    kind.add_argument("--signing", action="store_true", help="an Ed25519 signing key instead")
    kind.add_argument(
        "--pq",
        action="store_true",
        help="a post-quantum hybrid identity (ML-KEM-768 + X25519; age1pq1…, as age-keygen -pq)",
    )
    p.add_argument("--force", action="store_true", help="overwrite an existing key file")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.set_defaults(func=cmd_keygen)

    p = subparsers.add_parser(
        "encrypt",
        allow_abbrev=False,  # no --passphrase-e: a secret must not land in an abbreviation
        help="encrypt to age recipients (age1…, age1pq1…, ssh-ed25519, ssh-rsa) or a passphrase",
        description="Encrypt IN (default stdin) to OUT (default stdout) as an age v1 file. "
        "Example: kprivacy-nb encrypt -r alice -o data.age data.csv",
    )
    _recipient_arguments(p)
    p.add_argument("-p", "--passphrase", action="store_true", help="encrypt with a passphrase")
    p.add_argument("--passphrase-env", metavar="VAR", help="read the passphrase from $VAR")
    p.add_argument("-a", "--armor", action="store_true", help="ASCII-armored output")
    p.add_argument("-o", "--output", help="output file (default stdout)")
    p.add_argument("--force", action="store_true", help="overwrite OUT if it exists")
    p.add_argument("input", nargs="?", help="input file (default stdin)")
    p.set_defaults(func=cmd_encrypt)

    p = subparsers.add_parser(
        "decrypt",
        allow_abbrev=False,  # no --passphrase-e: a secret must not land in an abbreviation
        help="decrypt an age file",
        description="Decrypt IN (default stdin) to OUT (default stdout). With -o, OUT appears "
        "only if the whole file authenticated. Example: kprivacy-nb decrypt -i key.txt data.age",
    )
    _identity_arguments(p)
    p.add_argument("-p", "--passphrase", action="store_true", help="prompt for a passphrase")
    p.add_argument("--passphrase-env", metavar="VAR", help="read the passphrase from $VAR")
    p.add_argument("-o", "--output", help="output file (default stdout)")
    p.add_argument(
        "--extract",
        metavar="DIR",
        help="write the files of a secure_save file into DIR instead (a saved folder's files, "
        "or the object's parts; with its OpenSSF model.sig, so `model_signing verify key` "
        "checks them)",
    )
    p.add_argument("--force", action="store_true", help="overwrite OUT if it exists")
    p.add_argument("input", nargs="?", help="input file (default stdin)")
    p.set_defaults(func=cmd_decrypt)

    p = subparsers.add_parser(
        "sign",
        allow_abbrev=False,
        help="write a detached Ed25519 signature of a file, or an OpenSSF model signature",
        description="Sign FILE's SHA-256 with a signing key; writes FILE.sig (or -o). With "
        "--format oms, sign a model file or folder as `model_signing sign key` does (EC P-256 "
        "PEM key; Sigstore bundle). Examples: kprivacy-nb sign -k me model.age  |  "
        "kprivacy-nb sign --format oms --private-key key.pem -o model.sig my_model/",
    )
    p.add_argument("-k", "--key", help="signing key file or name")
    p.add_argument("--format", choices=FORMATS, default="kprivacy", help=FORMAT_HELP)
    p.add_argument("--private-key", metavar="PEM", help="EC private key (--format oms; 0600)")
    p.add_argument("--password-env", metavar="VAR", help="password of an encrypted PEM key")
    p.add_argument("-o", "--output", help="signature file (default FILE.sig)")
    p.add_argument("--force", action="store_true", help="overwrite the signature file")
    p.add_argument("file", help="file (or, with --format oms, model folder) to sign")
    p.set_defaults(func=cmd_sign)

    p = subparsers.add_parser(
        "verify",
        allow_abbrev=False,  # no --passphrase-e: a secret must not land in an abbreviation
        help="verify a detached signature, or the signature inside a secure_save file",
        description="With FILE.sig (or -s), check the detached signature. Otherwise decrypt FILE "
        "(-i/--passphrase-env) and check its container signature. With --format oms, check an "
        "OpenSSF model signature (ours or model_signing's) of a model file or folder, or the one "
        "embedded in a secure_save file. Examples: kprivacy-nb verify -k me model.age  |  "
        "kprivacy-nb verify --format oms --public-key key.pub --signature model.sig my_model/",
    )
    p.add_argument("-k", "--key", help="signer: kppub1… key, name or .pub file")
    p.add_argument("--format", choices=FORMATS, default="kprivacy", help=FORMAT_HELP)
    p.add_argument("--public-key", metavar="PEM", help="EC public key (--format oms)")
    p.add_argument("-s", "--signature", help="detached signature file (default FILE.sig)")
    _identity_arguments(p)
    p.add_argument("--passphrase-env", metavar="VAR", help=PASS_ENV_HELP)
    p.add_argument("file", help="the signed file (or model folder)")
    p.set_defaults(func=cmd_verify)

    p = subparsers.add_parser(
        "inspect",
        allow_abbrev=False,  # no --passphrase-e: a secret must not land in an abbreviation
        help="what a file is: age header, recipient types, container manifest",
        description="Describe FILE without decrypting it; with -i/--passphrase-env also show the "
        "container manifest (entries, types, sizes, digests, signature). "
        "Example: kprivacy-nb inspect model.age -i alice",
    )
    p.add_argument("file", help="the age file to describe")
    _identity_arguments(p)
    p.add_argument("--passphrase-env", metavar="VAR", help=PASS_ENV_HELP)
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.set_defaults(func=cmd_inspect)

    p = subparsers.add_parser(
        "import-fernet",
        allow_abbrev=False,
        help="re-encrypt a Fernet-encrypted file (the seed recipes) as an age file",
        description="Decrypt a file written by Fernet(key).encrypt(...) in memory and write it as "
        "an age file for the recipients (0600, atomically; no plaintext on disk). The Fernet key "
        "comes from --key FILE, or for the asymmetric recipe from --wrapped-key FILE (RSA-OAEP "
        "encrypted) opened with --rsa-key PEM. Example: kprivacy-nb import-fernet --key key.txt "
        "encrypted_model.h5 -r alice -o model.age",
    )
    _key_file_errors(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--key", metavar="FILE", help="Fernet key file (mode 0600)")
    src.add_argument("--wrapped-key", metavar="FILE", help="the Fernet key, RSA-OAEP encrypted")
    p.add_argument("--rsa-key", metavar="PEM", help="RSA private key for --wrapped-key (0600)")
    _recipient_arguments(p)
    p.add_argument("-a", "--armor", action="store_true", help="ASCII-armored output")
    p.add_argument("-o", "--output", required=True, help="the age file to write ('-': stdout)")
    p.add_argument("--force", action="store_true", help="overwrite OUT if it exists")
    p.add_argument("input", help="the Fernet-encrypted file")
    p.set_defaults(func=cmd_import_fernet)

    p = subparsers.add_parser(
        "recipients",
        help="name colleagues' public keys (so -r NAME encrypts to them)",
        description="add/list/remove named public keys in recipients.txt of the home folder. "
        "KEY is the public key someone sent you: age1…, age1pq1…, 'ssh-ed25519 AAAA…', "
        "'ssh-rsa AAAA…' (a recipient, for -r NAME) or kppub1… (a signer, for -k / "
        "--verify-with NAME). No key pair is made (that is `keygen NAME`, for your own keys). "
        "Example: kprivacy-nb recipients add bob age1ql3z…  |  kprivacy-nb recipients add carol "
        '"$(cat carol_id_ed25519.pub)"',
    )
    rsub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    r = rsub.add_parser("add", help="name a public key: NAME KEY")
    r.add_argument("name", help="the name to use with -r (letters, digits, _ . @ -)")
    r.add_argument("key", nargs="+", help="the public key (an ssh key may be given unquoted)")
    r.add_argument("--force", action="store_true", help="replace a key already under NAME")
    r.set_defaults(func=cmd_recipients)
    r = rsub.add_parser("list", help="list named public keys")
    r.add_argument("--json", action="store_true", help="print one JSON list")
    r.set_defaults(func=cmd_recipients)
    r = rsub.add_parser("remove", help="forget the public keys named NAME")
    r.add_argument("name", help="the name to forget")
    r.set_defaults(func=cmd_recipients)

    p = subparsers.add_parser(
        "trust",
        help="manage trusted signers (their signatures are verified automatically)",
        description="add/list/remove signers in the trusted_signers file of the home folder. "
        "Files signed by a trusted signer are verified on load; others are reported as "
        "unverified (or refused with KPRIVACY_NB_REQUIRE_SIGNATURE=1). "
        "Example: kprivacy-nb trust add bob  |  kprivacy-nb trust add kppub1… --name bob",
    )
    tsub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    t = tsub.add_parser("add", help="trust a signer: a known name or a kppub1… key")
    t.add_argument("signer", help="signer name (recipients.txt, keys/NAME.sign.pub) or kppub1…")
    t.add_argument("--name", help="name to record with a kppub1… key")
    t.set_defaults(func=cmd_trust)
    t = tsub.add_parser("list", help="list trusted signers")
    t.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    t.set_defaults(func=cmd_trust)
    t = tsub.add_parser("remove", help="stop trusting a signer (name or kppub1…)")
    t.add_argument("signer", help="signer name or kppub1… key")
    t.set_defaults(func=cmd_trust)


# --- helpers --------------------------------------------------------------------------------------


def _identity_arguments(parser: argparse.ArgumentParser) -> None:
    """``-i/--identity`` and the environment variable holding an encrypted identity's
    passphrase, for every command that decrypts."""
    parser.add_argument(
        "-i", "--identity", action="append", default=[], help="identity file or name"
    )
    parser.add_argument(ID_PASS_OPTION, metavar="VAR", help=ID_PASS_ENV_HELP)


def _recipient_arguments(parser: argparse.ArgumentParser) -> None:
    """``-r/--recipient`` (``--to`` an alias) and ``-R/--recipients-file``, for every command
    that encrypts."""
    parser.add_argument(
        "-r",
        "--recipient",
        "--to",
        dest="recipient",
        metavar="RECIPIENT",
        action="append",
        default=[],
        help="public key (age1…, age1pq1…, 'ssh-ed25519 …', 'ssh-rsa …') or a name from "
        "`recipients list` (repeatable; --to is an alias)",
    )
    parser.add_argument(
        "-R", "--recipients-file", action="append", default=[], help="recipients file (repeatable)"
    )


def _key_file_errors(parser: argparse.ArgumentParser) -> None:
    """A Fernet key pasted after ``--key`` that starts with ``-`` looks like an option to argparse
    ("expected one argument"): say what ``--key`` wants instead (the key itself is never shown)."""
    from .fernet_import import KEY_GIVEN_INSTEAD_OF_FILE

    plain = parser.error

    def error(message: str):
        if message.startswith("argument --key:"):
            message = KEY_GIVEN_INSTEAD_OF_FILE
        return plain(message)

    parser.error = error  # type: ignore[method-assign]


@contextlib.contextmanager
def _input(path: str | None) -> Iterator[BinaryIO]:
    if path is None or path == "-":
        yield sys.stdin.buffer
        return
    try:
        f = open(path, "rb")  # noqa: SIM115
    except OSError as exc:
        raise KPrivacyError(f"cannot read {path}: {exc.strerror}") from None
    with f:
        yield f


@contextlib.contextmanager
def _output(path: str | None, force: bool, *, binary: bool) -> Iterator[BinaryIO]:
    if path is None or path == "-":
        if binary and sys.stdout.isatty():
            raise InvalidParameterError(
                "refusing to write binary data to a terminal; use -o FILE or -a"
            )
        yield sys.stdout.buffer
        sys.stdout.buffer.flush()
        return
    with atomic_output(path, force=force) as f:
        yield f


def _passphrase(args: argparse.Namespace, *, confirm: bool = False):
    """The scrypt passphrase: ``--passphrase-env VAR``, else asked on the terminal."""
    return prompt.resolve(args.passphrase_env, confirm=confirm)


def _load_identities(args: argparse.Namespace, specs: list) -> list:
    """Identities from key files; an encrypted SSH key's passphrase comes from
    ``--identity-passphrase-env VAR``, else the terminal (never stdin)."""
    source = prompt.source(getattr(args, "identity_passphrase_env", None), ID_PASS_OPTION)
    return keys.load_identities(specs, passphrase=source)


def _given_identities(args: argparse.Namespace) -> list | None:
    """The ``-i`` identities, loaded (for the container readers), or None when none was given."""
    return _load_identities(args, args.identity) if args.identity else None


def _identities(args: argparse.Namespace, types: list[str]) -> list:
    ids: list = []
    if args.passphrase_env or getattr(args, "passphrase", False):
        ids.append(age.ScryptIdentity(_passphrase(args)))
    elif "scrypt" in types and not args.identity:
        ids.append(age.ScryptIdentity(prompt.resolve(None)))
    if args.identity:
        ids += _load_identities(args, args.identity)
    elif not ids:
        files = keys.default_identity_files()
        if not files:
            raise InvalidParameterError("no identity: pass -i FILE (or create one with keygen)")
        ids += _load_identities(args, files)
    return ids


# --- commands -------------------------------------------------------------------------------------


def cmd_keygen(args: argparse.Namespace) -> int:
    if args.signing:
        res = signing.generate_signing_key(args.name, output=args.output, force=args.force)
    else:
        res = keys.generate_identity(args.name, output=args.output, force=args.force, pq=args.pq)
    print(f"# key file: {res.path} (mode 0600)", file=sys.stderr)
    print(
        json.dumps({"public_key": res.public, "path": str(res.path)}) if args.json else res.public
    )
    return 0


def cmd_encrypt(args: argparse.Namespace) -> int:
    use_pass = args.passphrase or args.passphrase_env
    if use_pass and (args.recipient or args.recipients_file):
        raise InvalidParameterError("use either recipients (-r/-R) or a passphrase, not both")
    if use_pass:
        recips: list = [age.ScryptRecipient(_passphrase(args, confirm=True))]
    else:
        recips = _recipients(args)
    with _input(args.input) as src, _output(args.output, args.force, binary=not args.armor) as dst:
        age.encrypt_stream(src, dst, recips, armor=args.armor)
    return 0


def _recipients(args: argparse.Namespace) -> list:
    recips = keys.resolve_recipients(args.recipient)
    for f in args.recipients_file:
        recips += keys.recipients_from_file(f)
    if not recips:
        raise InvalidParameterError("give at least one -r RECIPIENT / -R FILE")
    age.check_recipients(recips)  # before any output is opened
    return recips


def cmd_import_fernet(args: argparse.Namespace) -> int:
    from . import fernet_import

    recips = _recipients(args)
    if args.key:
        fernet = fernet_import.fernet_key_from_file(args.key)
    elif not args.rsa_key:
        raise InvalidParameterError("--wrapped-key needs --rsa-key PEM (the RSA private key)")
    else:
        fernet = fernet_import.fernet_key_unwrapped(args.wrapped_key, args.rsa_key)
    if args.output == "-":
        with _output(None, args.force, binary=not args.armor) as dst:
            res = fernet_import.import_fernet(args.input, fernet, recips, dst, armor=args.armor)
    else:
        res = fernet_import.import_fernet(
            args.input, fernet, recips, args.output, armor=args.armor, force=args.force
        )
    if res.warning:
        print(f"kprivacy-nb: warning: {res.warning}", file=sys.stderr)
    if res.path is None:  # stdout holds the age file: the note goes to stderr
        print(f"imported {args.input} -> stdout ({res.size:,} bytes, age)", file=sys.stderr)
    else:
        print(f"imported {args.input} -> {res.path} ({res.size:,} bytes, age, mode 0600)")
    return 0


def cmd_decrypt(args: argparse.Namespace) -> int:
    if args.extract:
        return _extract(args)
    if trust.require_signature():
        return _decrypt_signed_only(args)
    with _input(args.input) as src:
        agefile = age.AgeFile(src)
        ids = _identities(args, agefile.stanza_types())
        with _output(args.output, args.force, binary=False) as dst:
            agefile.decrypt_to(dst, ids)
    return 0


def _decrypt_signed_only(args: argparse.Namespace) -> int:
    """``decrypt`` under ``KPRIVACY_NB_REQUIRE_SIGNATURE=1``: only a kprivacy-nb container signed
    by a trusted signer is written out (a plain age file carries no signature: refused)."""
    if args.input in (None, "-"):
        raise InvalidParameterError(
            "with signatures required, decrypt reads a file (not stdin): give IN"
        )
    with _input(args.input) as src:
        types = age.AgeFile(src).stanza_types()
    passphrase = None
    if args.passphrase_env or args.passphrase or ("scrypt" in types and not args.identity):
        passphrase = _passphrase(args)
    given = _given_identities(args)
    try:
        reader = envelope.open_container(
            args.input,
            identities=given,
            passphrase=passphrase,
            require_signature=True,
        )
    except SerializationError as exc:
        if "not a kprivacy-nb container" not in str(exc):
            raise
        raise trust_refusal(args.input) from None
    ids = [age.ScryptIdentity(passphrase)] if passphrase is not None else []
    if given or passphrase is None:
        ids += given or _load_identities(args, keys.default_identity_files())
    reader.check_all_parts()
    with _input(args.input) as src, _output(args.output, args.force, binary=False) as dst:
        age.AgeFile(src).decrypt_to(dst, ids)
    return 0


def trust_refusal(path: str) -> KPrivacyError:
    from ..errors import UntrustedSignatureError

    return UntrustedSignatureError(
        f"refused: {path} is a plain age file with no signature, and signatures are required "
        f"({trust.CONFIG_REQUIRE} / {trust.ENV_REQUIRE}=1)"
    )


def _extract(args: argparse.Namespace) -> int:
    """``decrypt --extract DIR``: the files of a secure_save file, and its OMS signature."""
    from . import oms, serializers

    if args.output or args.input in (None, "-"):
        raise InvalidParameterError("--extract DIR reads a file (IN) and takes no -o")
    passphrase = _passphrase(args) if args.passphrase_env or args.passphrase else None
    reader = envelope.open_container(
        args.input, identities=_given_identities(args), passphrase=passphrase
    )
    if not reader.signature_status.verified:
        print(f"kprivacy-nb: warning: {reader.signature_status}", file=sys.stderr)
    entry = reader.entry(None)
    parts = reader.read_parts(entry["name"])
    files = oms.signed_files(entry["type"], parts)
    if oms.SIGNATURE_PART in parts:
        files[oms.SIGNATURE_PART] = parts[oms.SIGNATURE_PART]
    written = serializers.RestoredFiles(entry["name"], "folder", files).extract(
        args.extract, force=args.force
    )
    print(f"extracted {len(written)} files of {printable(entry['name'])} to {args.extract}")
    return 0


def _need(value: str | None, flag: str, fmt: str) -> str:
    if not value:
        raise InvalidParameterError(f"--format {fmt} needs {flag}")
    return value


def cmd_sign(args: argparse.Namespace) -> int:
    if args.format == "oms":
        from . import oms

        key = oms.load_private_key(
            _need(args.private_key, "--private-key KEY.pem", "oms"), args.password_env
        )
        out = args.output or f"{str(args.file).rstrip('/')}.sig"
        pub = oms.sign_path(args.file, key, out, force=args.force)
        print(f"signed {args.file} with {pub} -> {out} (OpenSSF model signature)")
        return 0
    key = signing.load_signing_key(_need(args.key, "-k KEY", "kprivacy"))
    with _input(args.file) as f:
        sig = signing.sign_detached(f, key)
    out = args.output or f"{args.file}.sig"
    with atomic_output(out, force=args.force, mode=0o644) as f:
        f.write(sig.to_text().encode())
    print(f"signed {args.file} with {sig.key} -> {out}")
    return 0


def _verify_oms(args: argparse.Namespace) -> int:
    from . import oms

    key = oms.load_public_key(_need(args.public_key, "--public-key KEY.pub", "oms"))
    if args.signature:
        oms.verify_path(args.file, args.signature, key)
        print(f"good OpenSSF model signature by {key} on {args.file}")
        return 0
    passphrase = _passphrase(args) if args.passphrase_env else None
    reader = envelope.open_container(
        args.file,
        identities=_given_identities(args),
        passphrase=passphrase,
        require_signature=False,
    )
    entry = reader.entry(None)
    oms.check_embedded(reader.manifest, entry, reader.read_parts(entry["name"]), key)
    print(
        f"good OpenSSF model signature by {key} on {args.file} (embedded; it covers the "
        f"{oms.covers(entry['type'], entry['name'])})"
    )
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    if args.format == "oms":
        return _verify_oms(args)
    expected = trust.resolve_signer(_need(args.key, "-k KEY", "kprivacy"))
    sig_path = args.signature or (f"{args.file}.sig" if Path(f"{args.file}.sig").exists() else None)
    if sig_path:
        try:
            text = Path(sig_path).read_text(encoding="utf-8")
        except OSError as exc:
            raise KPrivacyError(f"cannot read {sig_path}: {exc.strerror}") from None
        sig = signing.DetachedSignature.from_text(text)
        with _input(args.file) as f:
            signing.verify_detached(f, sig, expected)
        print(f"good signature by {expected} on {args.file}")
        return 0
    _check_age_file_to_verify(args.file)
    passphrase = _passphrase(args) if args.passphrase_env else None
    reader = envelope.open_container(
        args.file,
        identities=_given_identities(args),
        passphrase=passphrase,
        verify_with=expected,
    )
    reader.check_all_parts()  # a valid manifest signature vouches only for matching parts
    print(f"good signature by {expected} on {args.file} (manifest and every part)")
    return 0


def _check_age_file_to_verify(path: str) -> None:
    """With no detached signature, ``verify`` checks the container inside an age file: when the
    file is no age file, the missing ``FILE.sig`` is the news, not the age header."""
    from ..errors import HeaderError, SignatureError

    try:
        envelope.stanza_types_of(path)
    except HeaderError as exc:
        raise SignatureError(
            f"no signature to check: {printable(path)}.sig does not exist (give the signature "
            f"file with -s SIG), and {printable(path)} is not an age file holding a signed "
            f"container ({exc})"
        ) from None


def cmd_recipients(args: argparse.Namespace) -> int:
    if args.action == "add":
        print(f"added {keys.add_recipient(args.name, ' '.join(args.key), force=args.force)}")
    elif args.action == "remove":
        for k in keys.remove_recipient(args.name):
            print(f"removed {k}")
    else:
        named = keys.list_recipients()
        if args.json:
            print(json.dumps([{"name": k.name, "key": k.key, "type": k.type} for k in named]))
            return 0
        for k in named:
            print(k)
        if not named:
            print("no named public keys yet (add one: kprivacy-nb recipients add NAME KEY)")
    return 0


def cmd_trust(args: argparse.Namespace) -> int:
    if args.action == "add":
        print(f"trusted: {trust.add_trusted(args.signer, args.name)}")
    elif args.action == "remove":
        print(f"no longer trusted: {trust.remove_trusted(args.signer)}")
    else:
        signers = trust.list_trusted()
        if args.json:
            print(json.dumps([{"name": s.name, "key": str(s.key)} for s in signers]))
        else:
            for s in signers:
                print(s)
            if not signers:
                print("no trusted signers yet (add one: kprivacy-nb trust add NAME|kppub1…)")
    return 0


def describe(
    path: str,
    identities: list[str],
    passphrase_env: str | None,
    identity_passphrase_env: str | None = None,
) -> dict:
    """What :func:`cmd_inspect` reports, as a dict (no secrets)."""
    p = Path(path)
    with _input(path) as f:
        agefile = age.AgeFile(f)
    info: dict = {
        "file": str(p),
        "size": p.stat().st_size,
        "format": "age-encryption.org/v1",
        "armored": agefile.armored,
        "recipients": agefile.stanza_types(),
    }
    if identities or passphrase_env:
        passphrase = prompt.resolve(passphrase_env) if passphrase_env else None
        source = prompt.source(identity_passphrase_env, ID_PASS_OPTION)
        try:
            reader = envelope.open_container(
                path,
                identities=keys.load_identities(identities, passphrase=source)
                if identities
                else None,
                passphrase=passphrase,
            )
        except KPrivacyError as exc:
            if "not a kprivacy-nb container" in str(exc):
                info["content"] = "opaque data (not a kprivacy-nb container)"
                return info
            raise
        reader.check_all_parts()
        info["content"] = "kprivacy-nb container"
        info["manifest"] = reader.manifest
        signed_by = (reader.signature or {}).get("key")
        info["signed_by"] = printable(signed_by) if signed_by is not None else None
        info["signature"] = reader.signature_status.state
        info["signature_note"] = str(reader.signature_status)
        info["oms_signatures"] = _oms_notes(reader.entries)
    return info


def _oms_notes(entries: list[dict]) -> list[dict]:
    """The embedded OpenSSF model signatures of a container's entries: where, and what they cover
    (inspect has no EC public key to check them with; ``verify --format oms`` does)."""
    from . import oms

    return [
        {
            "entry": e["name"],
            "covers": oms.covers(e["type"], e["name"]),
            "note": "embedded OpenSSF model signature (model.sig), not checked by inspect: check it with "
            "kprivacy-nb verify --format oms --public-key KEY.pub -i IDENTITY FILE",
        }
        for e in entries
        if any(p["name"] == oms.SIGNATURE_PART for p in e["parts"])
    ]


def cmd_inspect(args: argparse.Namespace) -> int:
    info = describe(args.file, args.identity, args.passphrase_env, args.identity_passphrase_env)
    if args.json:
        print(json.dumps(info))
        return 0
    print(
        f"{info['file']}: age v1 file{' (ASCII armored)' if info['armored'] else ''}, "
        f"{info['size']:,} bytes"
    )
    types = info["recipients"]
    print(f"recipients: {len(types)} stanza(s): {', '.join(types)}")
    if "content" in info:
        print(f"content: {info['content']}")
    m = info.get("manifest")
    if m:
        # Every string below was chosen by whoever wrote the file: printed escaped.
        print(
            f"created: {printable(m.get('created'))}  libraries: "
            + printable(", ".join(f"{k} {v}" for k, v in sorted(m.get("library", {}).items())))
        )
        print(info["signature_note"])
        for note in info["oms_signatures"]:
            print(f"{note['note']}; it covers the {note['covers']}")
        for e in m["entries"]:
            size = sum(p["size"] for p in e["parts"])
            print(f"entry '{printable(e['name'])}': {printable(e['type'])}, {size:,} bytes")
            for part in e["parts"]:
                print(
                    f"  {printable(part['name'])}: {part['size']:,} bytes sha256 {part['sha256']}"
                )
            card = e.get("meta", {}).get("privacy_card")
            if card:
                print(f"  privacy card: {printable(json.dumps(card, sort_keys=True), 2000)}")
    return 0
