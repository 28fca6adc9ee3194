"""OpenSSF model signing (OMS): signatures the ``model_signing`` tool writes and checks.

A signature is a Sigstore bundle (v0.3 JSON) holding a DSSE envelope over an in-toto statement
with the ``https://model_signing/signature/v1.0`` predicate: the SHA-256 of every file of a model
(a file or a folder), signed with an EC P-256/384/521 key. ``model_signing sign key`` /
``model_signing verify key`` accept ours and we accept theirs; the format itself is the
``model-signing`` package's (the ``oms`` extra), never written by hand here.

Two uses:

* files on disk: :func:`sign_path` / :func:`verify_path` (``kprivacy-nb sign|verify --format oms``);
* inside a ``secure_save`` file: :func:`embed` adds the signature of the object's files (its parts,
  or the files of a saved folder) and of its type and metadata, as a ``model.sig`` part;
  :func:`check_embedded` verifies it before anything is deserialised, and :func:`signed_files`
  gives back the files exactly as signed, so that once written out ``model_signing verify key``
  accepts them.

What an embedded signature covers (:func:`covers`): the entry's name (the signed model name),
that it is the container's only entry, and every file; for an object (not a saved folder) also
its type, its metadata and the container's metadata (``kprivacy-entry.json``). The OMS format
signs files only, so a saved folder's own name and kind, and the manifest's ``created`` and
``library`` notes, are not covered; a folder signed this way is stored without its git files
(which OMS leaves out) and without container metadata, and a verified load refuses either.

>>> key = load_private_key("signer.pem")                       # doctest: +SKIP
>>> sign_path("my_model/", key, "my_model.sig")                # doctest: +SKIP
>>> verify_path("my_model/", "my_model.sig", load_public_key("signer.pub"))  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
from collections.abc import Mapping
from types import SimpleNamespace
from typing import Any

from ..errors import InvalidParameterError, KeyFileError, SignatureError
from ..secrets import read_key_file, register_secret
from .printable import printable

SIGNATURE_PART = "model.sig"
ENTRY_PART = "kprivacy-entry.json"
PREDICATE_TYPE = "https://model_signing/signature/v1.0"
# What ``model_signing`` leaves out of a folder by default; left out of our signatures too.
GIT_PATHS = (".git", ".gitattributes", ".github", ".gitignore")
CURVES = {"secp256r1": "p256", "secp384r1": "p384", "secp521r1": "p521"}
INSTALL_HINT = (
    "OpenSSF model signing needs the model-signing package: pip install 'kprivacy-nb[oms]'"
)


def _ms() -> Any:
    """The ``model_signing`` modules used here (imported only when OMS is used)."""
    try:
        from model_signing import hashing, manifest, signing, verifying
        from model_signing._hashing import hashing as digests
        from model_signing._signing import sign_ec_key, sign_sigstore_pb
        from model_signing._signing import signing as payloads
    except ImportError:
        raise InvalidParameterError(INSTALL_HINT) from None

    return SimpleNamespace(
        hashing=hashing,
        manifest=manifest,
        signing=signing,
        verifying=verifying,
        digests=digests,
        ec_key=sign_ec_key,
        bundle=sign_sigstore_pb,
        payloads=payloads,
    )


# --- keys ---------------------------------------------------------------------------------------


def _curve(key: Any) -> str:
    from cryptography.hazmat.primitives.asymmetric import ec

    if not isinstance(key, (ec.EllipticCurvePrivateKey, ec.EllipticCurvePublicKey)):
        raise KeyFileError("OpenSSF model signing takes EC keys (P-256, P-384 or P-521)")
    if key.curve.name not in CURVES:
        raise KeyFileError(f"unsupported EC curve {key.curve.name} (use P-256, P-384 or P-521)")
    return CURVES[key.curve.name]


class OMSVerifyKey:
    """An EC public key that checks OMS signatures. ``str()`` names it by curve and by the
    SHA-256 of its PEM, the hint ``model_signing`` puts in its bundles."""

    __slots__ = ("key",)

    def __init__(self, key: Any) -> None:
        _curve(key)
        self.key = key

    @property
    def pem(self) -> bytes:
        from cryptography.hazmat.primitives import serialization

        return self.key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    @property
    def hint(self) -> str:
        return hashlib.sha256(self.pem).hexdigest()

    def __str__(self) -> str:
        return f"oms:ecdsa-{_curve(self.key)}:{self.hint[:16]}"

    def __repr__(self) -> str:
        return f"OMSVerifyKey({self})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, OMSVerifyKey) and other.pem == self.pem

    def __hash__(self) -> int:
        return hash(self.pem)


class OMSSigningKey:
    """An EC private key for OMS signatures. Its repr shows only the public key."""

    __slots__ = ("_key",)

    def __init__(self, key: Any) -> None:
        _curve(key)
        self._key = key

    def public(self) -> OMSVerifyKey:
        return OMSVerifyKey(self._key.public_key())

    def __repr__(self) -> str:
        return f"OMSSigningKey(public={self.public()})"

    __str__ = __repr__

    def __reduce__(self):  # pragma: no cover - defensive
        raise TypeError("signing keys cannot be pickled")


def _is_pem_file(spec: Any) -> bool:
    if not isinstance(spec, (str, os.PathLike)):
        return False
    p = pathlib.Path(spec).expanduser()
    try:
        with open(p, "rb") as f:
            return f.read(11) == b"-----BEGIN "
    except OSError:
        return False


def is_signing_key(spec: Any) -> bool:
    """Whether a ``sign_with`` value is an OMS key (a PEM file or an EC key), not an Ed25519 one."""
    from cryptography.hazmat.primitives.asymmetric import ec

    return isinstance(spec, (OMSSigningKey, ec.EllipticCurvePrivateKey)) or _is_pem_file(spec)


def is_verify_key(spec: Any) -> bool:
    """Whether a ``verify_with`` value is an OMS public key (PEM file or EC key)."""
    from cryptography.hazmat.primitives.asymmetric import ec

    return isinstance(spec, (OMSVerifyKey, ec.EllipticCurvePublicKey)) or _is_pem_file(spec)


def load_private_key(spec: Any, password_env: str | None = None) -> OMSSigningKey:
    """An EC private key from a PEM file (mode 0600, as every key file), or as given.

    An encrypted PEM asks for its password (no echo), or reads it from ``$password_env``.
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    if isinstance(spec, OMSSigningKey):
        return spec
    if isinstance(spec, ec.EllipticCurvePrivateKey):
        return OMSSigningKey(spec)
    text = read_key_file(spec).reveal().encode()
    password = None
    if b"ENCRYPTED" in text.split(b"\n", 1)[0] or b"Proc-Type: 4,ENCRYPTED" in text:
        from . import prompt

        secret = prompt.resolve(password_env, prompt="Key password: ", option="--password-env")
        password = prompt.password_bytes(secret)
    try:
        key = serialization.load_pem_private_key(text, password)
    except (ValueError, TypeError):
        raise KeyFileError(
            f"{printable(str(spec))}: not a PEM private key, or the password is wrong"
        ) from None
    return OMSSigningKey(key)


def load_public_key(spec: Any) -> OMSVerifyKey:
    """An EC public key from a PEM file (``-----BEGIN PUBLIC KEY-----``), or as given."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    if isinstance(spec, OMSVerifyKey):
        return spec
    if isinstance(spec, ec.EllipticCurvePublicKey):
        return OMSVerifyKey(spec)
    p = pathlib.Path(spec).expanduser()
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise KeyFileError(f"cannot read public key {p}: {exc.strerror or exc}") from None
    if b"PRIVATE KEY" in data:
        register_secret(data.decode("ascii", "replace"))
        raise KeyFileError(f"{p} holds a private key; give the public key (.pub) to verify")
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError:
        raise KeyFileError(f"{p}: not a PEM public key") from None
    return OMSVerifyKey(key)


# --- signatures over in-memory files --------------------------------------------------------------


def _signer(key: OMSSigningKey) -> Any:
    """``model_signing``'s EC key signer, for a key already loaded (no key file re-read)."""
    m = _ms()

    class Signer(m.ec_key.Signer):
        def __init__(self, private_key: Any) -> None:
            self._private_key = private_key

    return Signer(key._key)


def _verifier(key: OMSVerifyKey) -> Any:
    """``model_signing``'s EC key verifier, for a key already loaded."""
    m = _ms()

    class Verifier(m.ec_key.Verifier):
        def __init__(self, public_key: Any) -> None:
            self._public_key = public_key

    return Verifier(key.key)


def _manifest(files: Mapping[str, bytes], model_name: str) -> Any:
    """The ``files``-method manifest ``model_signing`` computes for these files on disk."""
    m = _ms()
    serialization = m.manifest.SerializationType.from_args(
        {
            "method": "files",
            "hash_type": "sha256",
            "allow_symlinks": False,
            "ignore_paths": [SIGNATURE_PART, *GIT_PATHS],
        }
    )
    items = [
        serialization.new_item(name, m.digests.Digest("sha256", hashlib.sha256(data).digest()))
        for name, data in sorted(files.items())
    ]
    return m.manifest.Manifest(model_name, items, serialization)


def sign_files(files: Mapping[str, bytes], key: OMSSigningKey, model_name: str) -> bytes:
    """The OMS signature (Sigstore bundle JSON) of ``files`` (relative POSIX path → bytes), as
    ``model_signing sign key`` would write it for a folder holding exactly these files."""
    m = _ms()
    payload = m.payloads.Payload(_manifest(files, model_name))
    return _signer(key).sign(payload).bundle.to_json().encode()


class _Text:
    """What ``Signature.read`` needs of a path (``read_text``), for a signature in memory."""

    def __init__(self, data: bytes) -> None:
        self._data = data

    def read_text(self, encoding: str = "utf-8") -> str:
        return self._data.decode(encoding)


def _verified_manifest(signature: bytes, key: OMSVerifyKey) -> Any:
    """The manifest an OMS signature vouches for, once the signature checks out with ``key``."""
    from .limits import MAX_JSON_BYTES

    m = _ms()
    if len(signature) > MAX_JSON_BYTES:
        raise SignatureError(f"refused: OpenSSF model signature over {MAX_JSON_BYTES} bytes")
    try:
        bundle = json.loads(signature)
        statement = json.loads(_b64(bundle["dsseEnvelope"]["payload"]))
        if statement.get("predicateType") != PREDICATE_TYPE:
            raise SignatureError(
                "refused: not a model_signing v1.0 signature "
                f"(predicate {printable(str(statement.get('predicateType')))})"
            )
        sig = m.bundle.Signature.read(_Text(signature))
    except SignatureError:
        raise
    except Exception:
        raise SignatureError("malformed OpenSSF model signature (not a Sigstore bundle)") from None
    try:
        return _verifier(key).verify(sig)
    except Exception as exc:
        raise SignatureError(
            f"bad OpenSSF model signature: not made by {key}, or modified ({_first_line(exc)})"
        ) from None


def _b64(text: str) -> bytes:
    import base64

    return base64.b64decode(text, validate=True)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return printable(text[0] if text else type(exc).__name__)[:300]


def verify_files(files: Mapping[str, bytes], signature: bytes, key: OMSVerifyKey) -> str:
    """Check that ``signature`` is ``key``'s OMS signature of exactly ``files``; returns the
    model name it signed."""
    expected = _verified_manifest(signature, key)
    actual = _manifest(files, expected.model_name)
    if actual != expected:
        want = {r.identifier: r.digest.digest_hex for r in expected.resource_descriptors()}
        have = {r.identifier: r.digest.digest_hex for r in actual.resource_descriptors()}
        changed = sorted(n for n in want.keys() & have.keys() if want[n] != have[n])
        what = "; ".join(
            f"{label}: {', '.join(printable(n) for n in names[:5])}"
            for label, names in (
                ("changed", changed),
                ("missing", sorted(want.keys() - have.keys())),
                ("not signed", sorted(have.keys() - want.keys())),
            )
            if names
        )
        raise SignatureError(
            f"bad OpenSSF model signature: files differ from what {key} signed ({what})"
        )
    return expected.model_name


# --- files on disk (kprivacy-nb sign|verify --format oms) -----------------------------------------


def _hashing_config(model: pathlib.Path, signature: pathlib.Path) -> Any:
    m = _ms()
    ignored = []
    try:
        ignored.append(signature.resolve().relative_to(model.resolve()))
    except ValueError:
        pass
    return m.hashing.Config().set_ignored_paths(paths=ignored, ignore_git_paths=True)


def _model_path(path: str | os.PathLike) -> pathlib.Path:
    p = pathlib.Path(path).expanduser()
    if not p.exists():
        raise InvalidParameterError(f"{printable(str(p))} does not exist")
    return p


def sign_path(
    path: str | os.PathLike, key: OMSSigningKey, output: str | os.PathLike, *, force: bool = False
) -> OMSVerifyKey:
    """Write ``key``'s OMS signature of the model file or folder at ``path`` to ``output``, as
    ``model_signing sign key --signature OUTPUT PATH`` does (git files and OUTPUT left out)."""
    from .outputs import atomic_output

    m = _ms()
    model, out = _model_path(path), pathlib.Path(output).expanduser()
    try:
        manifest = _hashing_config(model, out).hash(model)
        bundle = _signer(key).sign(m.payloads.Payload(manifest)).bundle.to_json()
    except OSError as exc:
        raise SignatureError(f"cannot sign {printable(str(model))}: {_first_line(exc)}") from None
    with atomic_output(out, force=force, mode=0o644) as f:
        f.write(bundle.encode())
    return key.public()


def verify_path(path: str | os.PathLike, signature: str | os.PathLike, key: OMSVerifyKey) -> None:
    """Check an OMS signature (ours or ``model_signing``'s) of the model file or folder at
    ``path``, as ``model_signing verify key`` does."""
    model, sig = _model_path(path), pathlib.Path(signature).expanduser()
    try:
        data = sig.read_bytes()
    except OSError as exc:
        raise SignatureError(f"cannot read signature {sig}: {exc.strerror or exc}") from None
    expected = _verified_manifest(data, key)
    try:
        actual = _hashing_config(model, sig).hash(model)
    except (OSError, ValueError) as exc:
        raise SignatureError(f"cannot hash {printable(str(model))}: {_first_line(exc)}") from None
    if actual != expected:
        want = {r.identifier: r.digest.digest_hex for r in expected.resource_descriptors()}
        have = {r.identifier: r.digest.digest_hex for r in actual.resource_descriptors()}
        names = sorted(n for n in want.keys() | have.keys() if want.get(n) != have.get(n))
        shown = ", ".join(printable(n) for n in names[:5])
        raise SignatureError(
            f"bad OpenSSF model signature: {printable(str(model))} differs from what {key} "
            f"signed ({shown})"
        )


# --- inside a secure_save file --------------------------------------------------------------------


def entry_description(
    type_name: str, meta: Mapping[str, Any], container_metadata: Mapping[str, Any] | None = None
) -> bytes:
    """The signed ``kprivacy-entry.json``: the entry's type and metadata, so a signature covers
    how the files are loaded (and, for a DP run, its ε) as well as the files; and the
    container's metadata, when there is any."""
    from .container import encode_json

    shown = {k: v for k, v in meta.items() if k != "_libraries"}
    described: dict[str, Any] = {"type": type_name, "meta": shown}
    if container_metadata:
        described["container_metadata"] = dict(container_metadata)
    return encode_json(described)


def covers(type_name: str, entry_name: str) -> str:
    """What an embedded OMS signature of this entry vouches for, in words."""
    name = printable(entry_name)
    if type_name == "files":
        return (
            f"entry '{name}' (its name, and every file of the saved folder); not the folder's "
            "own name or kind, nor the manifest's 'created'/'library' notes"
        )
    return (
        f"entry '{name}' (its name, type, metadata and every part) and the container's "
        "metadata; not the manifest's 'created'/'library' notes"
    )


def _is_git(relative: str) -> bool:
    return relative.split("/", 1)[0] in GIT_PATHS


def _folder_files(tar: bytes) -> dict[str, bytes]:
    """A saved file or folder's files, named relative to the folder (as ``model_signing``)."""
    from .archives import read_tar

    files = read_tar(tar, "the stored files")
    top = {n.split("/", 1)[0] for n in files}
    if len(top) == 1 and all("/" in n for n in files):
        files = {n.split("/", 1)[1]: d for n, d in files.items()}
    return files


def signed_files(type_name: str, parts: Mapping[str, bytes]) -> dict[str, bytes]:
    """The files an embedded signature covers: a saved file or folder's own files (git files
    left out, as ``model_signing`` does); for any other object, its parts and
    ``kprivacy-entry.json``."""
    if type_name == "files":
        return {n: d for n, d in _folder_files(parts["files.tar"]).items() if not _is_git(n)}
    return {n: d for n, d in parts.items() if n != SIGNATURE_PART}


def _without_git(tar: bytes) -> bytes:
    """The tar of a saved folder without its git files (``.git/``, ``.gitattributes``…): an OMS
    signature leaves them out, so a signed file stores only what is signed."""
    import io
    import tarfile

    out = io.BytesIO()
    with (
        tarfile.open(fileobj=io.BytesIO(tar), mode="r:") as src,
        tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as dst,
    ):
        members = src.getmembers()
        names = [m.name for m in members]
        nested = len({n.split("/", 1)[0] for n in names}) == 1 and any("/" in n for n in names)
        for m in members:
            relative = m.name.split("/", 1)[1] if nested and "/" in m.name else m.name
            if (nested and "/" not in m.name) or not _is_git(relative):
                dst.addfile(m, src.extractfile(m) if m.isfile() else None)
    return out.getvalue()


def embed(
    type_name: str,
    parts: dict[str, bytes],
    meta: Mapping[str, Any],
    key: OMSSigningKey,
    name: str,
    container_metadata: Mapping[str, Any] | None = None,
) -> dict[str, bytes]:
    """``parts`` with the OMS signature of the object's files (and its description, with the
    container's metadata) added; the signed model name is the entry's name."""
    out = dict(parts)
    if type_name == "files":
        out["files.tar"] = _without_git(out["files.tar"])
        if container_metadata:
            raise InvalidParameterError(
                "an OpenSSF model signature of saved files signs only the files: it can't cover "
                "metadata=; leave it out, or sign with an Ed25519 key (sign_with='me')"
            )
    else:
        out[ENTRY_PART] = entry_description(type_name, meta, container_metadata)
    out[SIGNATURE_PART] = sign_files(signed_files(type_name, out), key, name)
    return out


def check_embedded(
    manifest: Mapping[str, Any],
    entry: Mapping[str, Any],
    parts: Mapping[str, bytes],
    key: OMSVerifyKey,
) -> None:
    """Verify the embedded OMS signature of ``entry`` of a container whose ``manifest`` is given:
    its files, name, type and metadata and the container's metadata (what :func:`covers` says)
    with ``key``; refuse an entry that has none, and a container with entries it can't cover."""
    if SIGNATURE_PART not in parts:
        raise SignatureError(
            f"refused: the file has no OpenSSF model signature, but one by {key} was required"
        )
    if len(manifest.get("entries", [])) != 1:
        raise SignatureError(
            "refused: an OpenSSF-signed file holds one entry, and this one holds "
            f"{len(manifest['entries'])}: entries were added after signing"
        )
    type_name = entry.get("type")
    files = signed_files(type_name, parts)
    signed_name = verify_files(files, parts[SIGNATURE_PART], key)
    metadata = manifest.get("metadata", {})
    if type_name != "files" and files.get(ENTRY_PART) != entry_description(
        type_name, entry.get("meta", {}), metadata
    ):
        raise SignatureError(
            "refused: the entry's type or metadata, or the container's metadata, differ from what "
            "was signed"
        )
    if type_name == "files":
        _check_folder_signed_whole(parts, metadata)
    if signed_name != entry.get("name"):
        raise SignatureError(
            f"refused: the entry is named '{printable(str(entry.get('name')))}', but "
            f"'{printable(signed_name)}' was signed"
        )


def _check_folder_signed_whole(parts: Mapping[str, bytes], metadata: Mapping[str, Any]) -> None:
    """Refuse what an OMS signature of a folder can't vouch for and kprivacy-nb never writes
    beside one: git files (left out of the signature) and container metadata."""
    unsigned = sorted(n for n in _folder_files(parts["files.tar"]) if _is_git(n))
    if unsigned:
        shown = ", ".join(printable(n) for n in unsigned[:5])
        raise SignatureError(
            f"refused: the folder holds files its OpenSSF signature does not cover ({shown}): "
            "they were added after signing"
        )
    if metadata:
        raise SignatureError(
            "refused: container metadata beside an OpenSSF-signed folder (its signature can't "
            "cover metadata, and kprivacy-nb never writes it there)"
        )


def strip(parts: Mapping[str, bytes]) -> dict[str, bytes]:
    """The parts a deserialiser gets: without the signature and the signed description."""
    return {n: d for n, d in parts.items() if n not in (SIGNATURE_PART, ENTRY_PART)}


def signing_key_for(sign_with: Any) -> OMSSigningKey | None:
    """The OMS key ``sign_with`` names (a PEM file or an EC key), or None for an Ed25519 key."""
    return (
        load_private_key(sign_with) if sign_with is not None and is_signing_key(sign_with) else None
    )


def verify_key_for(verify_with: Any) -> OMSVerifyKey | None:
    """The OMS key ``verify_with`` names (a PEM file or an EC key), or None for an Ed25519 key."""
    if verify_with is None or not is_verify_key(verify_with):
        return None
    return load_public_key(verify_with)


def judge(
    manifest: Mapping[str, Any],
    entry: Mapping[str, Any],
    parts: Mapping[str, bytes],
    key: OMSVerifyKey | None,
) -> Any:
    """With ``key``: check the entry's embedded signature and return the ``verified`` status,
    saying what it covers (before anything is deserialised); without: None (the container
    signature decides)."""
    if key is None:
        return None
    from .trust import VERIFIED, SignatureStatus

    check_embedded(manifest, entry, parts, key)
    return SignatureStatus(VERIFIED, str(key), covers=covers(entry["type"], entry["name"]))
