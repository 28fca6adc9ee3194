"""``kprivacy-nb import-fernet``: files from the Fernet recipes become age files that the reference
``age`` CLI opens; the plaintext never touches the disk; wrong keys leave nothing behind."""

from __future__ import annotations

import os
import subprocess

import pytest
from cryptography.fernet import Fernet
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from test_crypto_cli import run

from kprivacy_nb.crypto import age

from ci_support import require_tool

MODEL = b"\x89HDF\r\n\x1a\n" + os.urandom(200_000)  # what model.save("model.h5") starts with


@pytest.fixture
def alice(tmp_path):
    ident = age.X25519Identity.generate()
    key = tmp_path / "alice.key"
    key.write_text(ident.reveal() + "\n")
    key.chmod(0o600)
    return ident, key


def write_secret(path, data: bytes, mode: int = 0o600):
    path.write_bytes(data)
    path.chmod(mode)
    return path


def test_seed_recipe_to_age(tmp_path, alice):
    agebin = require_tool("age", "apt-get install age")
    key = Fernet.generate_key()
    write_secret(tmp_path / "key.txt", key + b"\n")
    (tmp_path / "encrypted_model.h5").write_bytes(Fernet(key).encrypt(MODEL))
    before = set(os.listdir(tmp_path))
    r = run(
        "import-fernet", "--key", str(tmp_path / "key.txt"), str(tmp_path / "encrypted_model.h5"),
        "-r", str(alice[0].recipient()), "-o", str(tmp_path / "model.age"),
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert b"HDF5" in r.stderr and b"Lambda" in r.stderr  # the legacy-model warning
    assert set(os.listdir(tmp_path)) == before | {"model.age"}  # nothing else written
    assert (tmp_path / "model.age").stat().st_mode & 0o777 == 0o600
    out = subprocess.run(
        [agebin, "-d", "-i", str(alice[1]), str(tmp_path / "model.age")], capture_output=True
    )
    assert out.returncode == 0 and out.stdout == MODEL
    assert key not in r.stdout + r.stderr


def test_rsa_wrapped_recipe(tmp_path, alice):
    priv = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = priv.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"pem pass"),
    )
    write_secret(tmp_path / "private.pem", pem)
    key = Fernet.generate_key()
    oaep = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)
    (tmp_path / "key.enc").write_bytes(priv.public_key().encrypt(key, oaep))
    (tmp_path / "data.bin.enc").write_bytes(Fernet(key).encrypt(b"csv,rows\n1,2\n"))
    from kprivacy_nb.crypto import fernet_import
    from kprivacy_nb.secrets import Secret

    fernet = fernet_import.fernet_key_unwrapped(
        tmp_path / "key.enc", tmp_path / "private.pem", passphrase=lambda _: Secret("pem pass")
    )
    res = fernet_import.import_fernet(
        tmp_path / "data.bin.enc", fernet, [alice[0].recipient()], tmp_path / "data.age"
    )
    assert res.warning is None and res.size == 13
    assert age.decrypt((tmp_path / "data.age").read_bytes(), [alice[0]]) == b"csv,rows\n1,2\n"
    # the CLI, with an unencrypted PEM and a base64 wrapped key
    plain_pem = priv.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    write_secret(tmp_path / "p2.pem", plain_pem)
    import base64

    (tmp_path / "key.b64").write_bytes(base64.b64encode(priv.public_key().encrypt(key, oaep)))
    r = run(
        "import-fernet", "--wrapped-key", str(tmp_path / "key.b64"), "--rsa-key",
        str(tmp_path / "p2.pem"), str(tmp_path / "data.bin.enc"), "-r",
        str(alice[0].recipient()), "-o", str(tmp_path / "d2.age"), "-a",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "d2.age").read_bytes().startswith(b"-----BEGIN AGE ENCRYPTED FILE-----")
    assert age.decrypt((tmp_path / "d2.age").read_bytes(), [alice[0]]) == b"csv,rows\n1,2\n"


def test_wrong_key_or_loose_key_file_leaves_nothing(tmp_path, alice):
    (tmp_path / "f.enc").write_bytes(Fernet(Fernet.generate_key()).encrypt(b"secret"))
    write_secret(tmp_path / "other.txt", Fernet.generate_key())
    args = [str(tmp_path / "f.enc"), "-r", str(alice[0].recipient()), "-o", str(tmp_path / "o")]
    r = run("import-fernet", "--key", str(tmp_path / "other.txt"), *args)
    assert r.returncode == 1 and b"does not authenticate" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "o").exists()
    write_secret(tmp_path / "loose.txt", Fernet.generate_key(), mode=0o644)
    r = run("import-fernet", "--key", str(tmp_path / "loose.txt"), *args)
    assert r.returncode == 1 and b"chmod 600" in r.stderr and not (tmp_path / "o").exists()
    write_secret(tmp_path / "junk.txt", b"not a key")
    r = run("import-fernet", "--key", str(tmp_path / "junk.txt"), *args)
    assert r.returncode == 1 and b"not a Fernet key" in r.stderr
    assert b"not a key" not in r.stderr


def test_key_pasted_instead_of_key_file_is_never_shown(tmp_path, alice):
    import base64

    from test_crypto_cli import run_subprocess

    key = Fernet.generate_key()
    dash_key = base64.urlsafe_b64encode(b"\xf8" + os.urandom(31))  # starts with "-"
    assert dash_key.startswith(b"-")
    (tmp_path / "enc.bin").write_bytes(Fernet(key).encrypt(b"model"))
    for pasted in (key, dash_key):
        r = run_subprocess(
            "import-fernet", "--key", pasted.decode(), str(tmp_path / "enc.bin"),
            "-r", str(alice[0].recipient()), "-o", str(tmp_path / "m.age"),
        )  # fmt: skip
        err = r.stderr.decode()
        assert r.returncode == 2 and "--key takes the FILE" in err and err.count("\n") == 1, err
        assert pasted.decode() not in err and pasted[1:20].decode() not in err
        assert not (tmp_path / "m.age").exists()
    # a mistyped path is still named (it is no secret)
    r = run("import-fernet", "--key", str(tmp_path / "kye.txt"), str(tmp_path / "enc.bin"), "-r",
            str(alice[0].recipient()), "-o", str(tmp_path / "m.age"))  # fmt: skip
    assert r.returncode == 1 and b"kye.txt does not exist" in r.stderr


def test_output_dash_is_stdout_not_a_file_named_dash(tmp_path, alice, monkeypatch):
    from test_crypto_cli import run_subprocess

    monkeypatch.chdir(tmp_path)
    key = Fernet.generate_key()
    write_secret(tmp_path / "key.txt", key)
    (tmp_path / "enc.bin").write_bytes(Fernet(key).encrypt(b"to stdout"))
    r = run_subprocess(
        "import-fernet", "--key", "key.txt", "enc.bin", "-r", str(alice[0].recipient()), "-o", "-"
    )
    assert r.returncode == 0, r.stderr
    assert age.decrypt(r.stdout, [alice[0]]) == b"to stdout"
    assert b"-> stdout" in r.stderr and not (tmp_path / "-").exists()
