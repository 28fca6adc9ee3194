"""OpenSSF model signing (``--format oms``, ``secure_save(sign_with=EC key)``), checked both ways
against the real ``model_signing`` CLI (the model-signing package's console script): its
signatures verify with us, ours with it; a changed file, a missing or extra file and a wrong key
all fail, with one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_crypto_cli import run

from kprivacy_nb import errors, secure_load, secure_save
from kprivacy_nb.crypto import keys, oms

pytest.importorskip("model_signing", reason="pip install 'kprivacy-nb[oms]'")

MODEL_SIGNING = str(Path(sys.executable).with_name("model_signing"))


def model_signing(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [MODEL_SIGNING, *args], capture_output=True, text=True, timeout=120, check=False
    )


def ec_keypair(folder: Path, name: str, curve: str = "P-256") -> tuple[Path, Path]:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    curves = {"P-256": ec.SECP256R1(), "P-384": ec.SECP384R1()}
    key = ec.generate_private_key(curves[curve])
    priv, pub = folder / f"{name}.pem", folder / f"{name}.pub"
    priv.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    priv.chmod(0o600)
    pub.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return priv, pub


@pytest.fixture
def k(tmp_path) -> dict[str, Path]:
    priv, pub = ec_keypair(tmp_path, "signer")
    other_priv, other_pub = ec_keypair(tmp_path, "other")
    return {"priv": priv, "pub": pub, "other_priv": other_priv, "other_pub": other_pub}


@pytest.fixture
def model_dir(tmp_path) -> Path:
    d = tmp_path / "my_model"
    (d / "weights").mkdir(parents=True)
    (d / "config.json").write_text('{"layers": 2}')
    (d / "weights" / "w.bin").write_bytes(os.urandom(100_000))
    (d / ".gitignore").write_text("*.tmp\n")  # left out by both tools
    return d


def one_line_error(r) -> str:
    err = r.stderr.decode() if isinstance(r.stderr, bytes) else r.stderr
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("target", ["folder", "file"])
def test_ours_verified_by_model_signing_and_theirs_by_us(k, model_dir, tmp_path, target):
    path = model_dir if target == "folder" else model_dir / "config.json"
    ours, theirs = tmp_path / "ours.sig", tmp_path / "theirs.sig"
    r = run("sign", "--format", "oms", "--private-key", str(k["priv"]), "-o", str(ours), str(path))
    assert r.returncode == 0, r.stderr
    bundle = json.loads(ours.read_text())
    assert bundle["mediaType"] == "application/vnd.dev.sigstore.bundle.v0.3+json"
    v = model_signing(
        "verify", "key", "--public_key", str(k["pub"]), "--signature", str(ours), str(path)
    )
    assert v.returncode == 0 and "Verification succeeded" in v.stdout, v.stderr

    s = model_signing(
        "sign", "key", "--private_key", str(k["priv"]), "--signature", str(theirs), str(path)
    )
    assert s.returncode == 0, s.stderr
    r = run(
        "verify", "--format", "oms", "--public-key", str(k["pub"]),
        "--signature", str(theirs), str(path),
    )  # fmt: skip
    assert r.returncode == 0 and b"good OpenSSF model signature" in r.stdout, r.stderr


def test_signature_inside_the_folder_is_left_out_as_model_signing_does(k, model_dir):
    sig = model_dir / "model.sig"
    r = run("sign", "--format", "oms", "--private-key", str(k["priv"]), "-o", str(sig),
            str(model_dir))  # fmt: skip
    assert r.returncode == 0, r.stderr
    v = model_signing(
        "verify", "key", "--public_key", str(k["pub"]), "--signature", str(sig), str(model_dir)
    )
    assert v.returncode == 0, v.stderr


def test_tampered_missing_or_extra_file_and_wrong_key_fail(k, model_dir, tmp_path):
    sig = tmp_path / "m.sig"
    s = model_signing(
        "sign", "key", "--private_key", str(k["priv"]), "--signature", str(sig), str(model_dir)
    )
    assert s.returncode == 0, s.stderr

    def verify(pub: Path) -> object:
        return run("verify", "--format", "oms", "--public-key", str(pub), "--signature",
                   str(sig), str(model_dir))  # fmt: skip

    r = verify(k["other_pub"])
    assert r.returncode == 1 and "bad OpenSSF model signature" in one_line_error(r)
    w = model_dir / "weights" / "w.bin"
    data = bytearray(w.read_bytes())
    data[500] ^= 1
    w.write_bytes(bytes(data))
    r = verify(k["pub"])
    assert r.returncode == 1 and "weights/w.bin" in one_line_error(r)
    data[500] ^= 1
    w.write_bytes(bytes(data))
    assert verify(k["pub"]).returncode == 0
    (model_dir / "extra.py").write_text("import os")
    r = verify(k["pub"])
    assert r.returncode == 1 and "extra.py" in one_line_error(r)
    (model_dir / "extra.py").unlink()
    (model_dir / "config.json").unlink()
    assert verify(k["pub"]).returncode == 1


def test_cli_errors_are_one_line(k, model_dir, tmp_path):
    r = run("sign", "--format", "oms", str(model_dir))
    assert r.returncode == 2 and "--private-key" in one_line_error(r)
    k["priv"].chmod(0o644)
    r = run("sign", "--format", "oms", "--private-key", str(k["priv"]), str(model_dir))
    assert r.returncode == 1 and "chmod 600" in one_line_error(r)
    r = run("verify", "--format", "oms", "--public-key", str(k["priv"]), "--signature",
            str(tmp_path / "nope.sig"), str(model_dir))  # fmt: skip
    assert r.returncode == 1 and "private key" in one_line_error(r)
    (tmp_path / "junk.sig").write_text("{not json")
    r = run("verify", "--format", "oms", "--public-key", str(k["pub"]), "--signature",
            str(tmp_path / "junk.sig"), str(model_dir))  # fmt: skip
    assert r.returncode == 1 and "malformed" in one_line_error(r)
    ed = tmp_path / "ed.pem"
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    ed.write_bytes(
        ed25519.Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    ed.chmod(0o600)
    r = run("sign", "--format", "oms", "--private-key", str(ed), str(model_dir))
    assert r.returncode == 1 and "EC keys" in one_line_error(r)


@pytest.fixture
def alice(kp_home) -> str:
    return keys.generate_identity("alice").public


def test_secure_save_embeds_a_signature_model_signing_accepts(alice, k, model_dir, tmp_path):
    target = tmp_path / "model.age"
    res = secure_save(model_dir, target, recipients="alice", sign_with=k["priv"])
    assert res.signed_by and res.signed_by.startswith("oms:ecdsa-p256:")
    restored = secure_load(target, verify_with=k["pub"])
    assert restored.files["my_model/config.json"] == b'{"layers": 2}'

    out = tmp_path / "out"
    r = run("decrypt", "--extract", str(out), "-i", "alice", str(target))
    assert r.returncode == 0, r.stderr
    assert (out / "weights" / "w.bin").read_bytes() == (
        model_dir / "weights" / "w.bin"
    ).read_bytes()
    v = model_signing("verify", "key", "--public_key", str(k["pub"]), "--signature",
                      str(out / "model.sig"), str(out))  # fmt: skip
    assert v.returncode == 0, v.stderr
    r = run("verify", "--format", "oms", "--public-key", str(k["pub"]), "-i", "alice", str(target))
    assert r.returncode == 0 and b"embedded" in r.stdout, r.stderr
    r = run("verify", "--format", "oms", "--public-key", str(k["other_pub"]), "-i", "alice",
            str(target))  # fmt: skip
    assert r.returncode == 1 and "bad OpenSSF model signature" in one_line_error(r)


def test_embedded_signature_covers_type_and_metadata(alice, k, tmp_path):
    target = tmp_path / "a.age"
    secure_save(np.arange(6), target, recipients="alice", sign_with=str(k["priv"]))
    assert list(secure_load(target, verify_with=str(k["pub"]))) == list(range(6))
    with pytest.raises(errors.SignatureError, match="bad OpenSSF"):
        secure_load(target, verify_with=str(k["other_pub"]))
    out = tmp_path / "parts"
    assert run("decrypt", "--extract", str(out), "-i", "alice", str(target)).returncode == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "array.npy",
        "kprivacy-entry.json",
        "model.sig",
    ]
    v = model_signing("verify", "key", "--public_key", str(k["pub"]), "--signature",
                      str(out / "model.sig"), str(out))  # fmt: skip
    assert v.returncode == 0, v.stderr

    # Someone who can encrypt to alice re-packs the signed parts under another type: refused.
    from kprivacy_nb.crypto import age
    from kprivacy_nb.crypto.container import Entry, write_container
    from kprivacy_nb.crypto.envelope import open_container

    parts = open_container(target, identities=["alice"]).read_parts()
    forged = tmp_path / "forged.age"
    with open(forged, "wb") as f:
        w = age.EncryptWriter(f, keys.resolve_recipients(["alice"]))
        entry = Entry("array", "numpy.ndarray", parts, {"shape": [600]})
        write_container(w, [entry], created="now")
        w.close()
    with pytest.raises(errors.SignatureError, match="type or metadata"):
        secure_load(forged, verify_with=k["pub"])


def test_unsigned_file_refused_when_an_oms_key_is_required(alice, k, tmp_path):
    target = tmp_path / "plain.age"
    secure_save(np.arange(3), target, recipients="alice")
    with pytest.raises(errors.SignatureError, match="no OpenSSF model signature"):
        secure_load(target, verify_with=k["pub"])


def test_p384_keys_and_ed25519_default_unchanged(alice, tmp_path, kp_home):
    priv, pub = ec_keypair(tmp_path, "p384", "P-384")
    target = tmp_path / "x.age"
    secure_save(b"weights", target, recipients="alice", sign_with=priv)
    assert secure_load(target, verify_with=pub) == b"weights"
    assert str(oms.load_public_key(pub)).startswith("oms:ecdsa-p384:")
    from kprivacy_nb.crypto import signing

    signing.generate_signing_key("me")
    res = secure_save(b"w", tmp_path / "y.age", recipients="alice", sign_with="me")
    assert res.signed_by.startswith("kppub1")


@pytest.mark.slow
def test_keras_model_signed_with_ec_key_loads_and_verifies_after_extraction(alice, k, tmp_path):
    import keras

    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    target = tmp_path / "m.age"
    secure_save(model, target, recipients="alice", sign_with=k["priv"])
    loaded = secure_load(target, verify_with=k["pub"])
    x = np.ones((1, 3), "float32")
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0))
    out = tmp_path / "files"
    assert run("decrypt", "--extract", str(out), "-i", "alice", str(target)).returncode == 0
    assert (out / "model.keras").is_file()
    v = model_signing("verify", "key", "--public_key", str(k["pub"]), "--signature",
                      str(out / "model.sig"), str(out))  # fmt: skip
    assert v.returncode == 0, v.stderr


# --- what an embedded signature covers: a co-recipient re-packs and re-encrypts the container ---


def _repack(src: Path, dst: Path, edit) -> None:
    """Re-encrypt ``src``'s container to alice after ``edit(entries, metadata)`` changed it, as
    anyone who can decrypt the file (a co-recipient) can."""
    from kprivacy_nb.crypto import age
    from kprivacy_nb.crypto.container import Entry, write_container
    from kprivacy_nb.crypto.envelope import open_container

    reader = open_container(src, identities=["alice"])
    entries = [
        Entry(e["name"], e["type"], reader.read_parts(e["name"]), e.get("meta", {}))
        for e in reader.entries
    ]
    metadata = dict(reader.manifest["metadata"])
    edit(entries, metadata)
    with open(dst, "wb") as f:
        w = age.EncryptWriter(f, keys.resolve_recipients(["alice"]))
        write_container(w, entries, created="now", metadata=metadata)
        w.close()


def test_embedded_signature_covers_entry_name_entries_and_metadata(alice, k, tmp_path):
    from kprivacy_nb.crypto.container import Entry
    from kprivacy_nb.crypto.store import load_with_status

    target = tmp_path / "w.age"
    secure_save(np.arange(5), target, recipients="alice", sign_with=k["priv"], name="weights",
                metadata={"run": "r1"})  # fmt: skip
    obj, status = load_with_status(target, verify_with=k["pub"])
    assert list(obj) == list(range(5)) and status.verified
    assert "it covers the entry 'weights' (its name, type, metadata" in str(status)
    assert "container's metadata" in str(status)

    def rename(entries, metadata):
        entries[0].name = "renamed"

    def new_metadata(entries, metadata):
        metadata["run"] = "attacker"

    def extra_entry(entries, metadata):
        entries.append(Entry("evil", "text", {"text.txt": b"unsigned"}, {}))

    for edit, why in ((rename, "'weights' was signed"), (new_metadata, "container's metadata"),
                      (extra_entry, "entries were added")):  # fmt: skip
        forged = tmp_path / f"{edit.__name__}.age"
        _repack(target, forged, edit)
        name = "weights" if edit is extra_entry else None
        with pytest.raises(errors.SignatureError, match=why):
            secure_load(forged, verify_with=k["pub"], name=name)
        r = run("verify", "--format", "oms", "--public-key", str(k["pub"]), "-i", "alice",
                str(forged))  # fmt: skip
        assert r.returncode == 1 and b"good" not in r.stdout
    # inspect and verify say what the signature covers
    text = run("inspect", str(target), "-i", "alice").stdout.decode()
    assert "embedded OpenSSF model signature (model.sig), not checked by inspect" in text
    assert "it covers the entry 'weights'" in text
    r = run("verify", "--format", "oms", "--public-key", str(k["pub"]), "-i", "alice", str(target))
    assert r.returncode == 0 and b"it covers the entry 'weights'" in r.stdout, r.stderr


def test_signed_folder_holds_only_what_is_signed(alice, k, model_dir, tmp_path):
    import io
    import tarfile

    from kprivacy_nb.crypto.store import load_with_status

    (model_dir / ".git").mkdir()
    (model_dir / ".git" / "config").write_text("[core]\n")
    target = tmp_path / "folder.age"
    secure_save(model_dir, target, recipients="alice", sign_with=k["priv"])
    restored, status = load_with_status(target, verify_with=k["pub"])
    assert not any("/.git" in n for n in restored.files)  # git files: not signed, not stored
    assert "not the folder's own name" in str(status)

    def add_git_config(entries, metadata):
        tar = entries[0].parts["files.tar"]
        out = io.BytesIO()
        with (
            tarfile.open(fileobj=io.BytesIO(tar)) as src,
            tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as dst,
        ):
            for m in src.getmembers():
                dst.addfile(m, src.extractfile(m) if m.isfile() else None)
            evil = b'[core]\n\tfsmonitor = "touch pwned"\n'
            info = tarfile.TarInfo("my_model/.git/config")
            info.size = len(evil)
            dst.addfile(info, io.BytesIO(evil))
        entries[0].parts["files.tar"] = out.getvalue()

    def add_metadata(entries, metadata):
        metadata["note"] = "unsigned"

    for edit, why in ((add_git_config, "does not cover"), (add_metadata, "container metadata")):
        forged = tmp_path / f"{edit.__name__}.age"
        _repack(target, forged, edit)
        with pytest.raises(errors.SignatureError, match=why):
            secure_load(forged, verify_with=k["pub"])
    with pytest.raises(errors.InvalidParameterError, match="can't cover metadata"):
        secure_save(model_dir, tmp_path / "m.age", recipients="alice", sign_with=k["priv"],
                    metadata={"note": "x"})  # fmt: skip
