"""Post-quantum hybrid age keys (``age1pq1…`` / ``AGE-SECRET-KEY-PQ-1…``, the mlkem768x25519
stanza of age 1.3): interop both ways with typage (the reference TypeScript implementation; the
Debian ``age`` CLI here is 1.1, older than post-quantum keys), keygen, mixing rules, store."""

from __future__ import annotations

import io
import subprocess

import pytest
from test_crypto_cli import run

from kprivacy_nb import errors, secure_load, secure_save
from kprivacy_nb.crypto import age, keys

from ci_support import require_typage


@pytest.fixture(scope="module")
def typage() -> list[str]:
    return require_typage()


def js(cmd: list[str], *args: str, stdin: bytes = b"") -> bytes:
    return subprocess.run([*cmd, *args], input=stdin, capture_output=True, check=True).stdout


def test_keys_made_by_typage_are_ours(typage, tmp_path):
    secret, public = js(typage, "keygen-pq").decode().split()
    ident = age.HybridIdentity.parse(secret)
    assert str(ident.recipient()) == public and public.startswith("age1pq1")
    assert ident.reveal() == secret
    assert age.parse_recipient(public) == ident.recipient()
    # typage encrypts to the public key, we decrypt; we encrypt, typage decrypts.
    blob = js(typage, "encrypt", public, stdin=b"from typage")
    assert age.decrypt(blob, [ident]) == b"from typage"
    assert age.stanza_types(io.BytesIO(blob)) == ["mlkem768x25519"]
    key = tmp_path / "pq.key"
    key.write_text(secret + "\n")
    data = bytes(range(256)) * 700  # several STREAM chunks
    assert js(typage, "decrypt", str(key), stdin=age.encrypt(data, [ident.recipient()])) == data


def test_keygen_pq_cli_and_typage_decrypts(typage, tmp_path, kp_home):
    r = run("keygen", "carol", "--pq")
    assert r.returncode == 0, r.stderr
    public = r.stdout.decode().strip()
    assert public.startswith("age1pq1") and len(public) > 1900
    assert b"AGE-SECRET-KEY-PQ" not in r.stdout + r.stderr
    keyfile = kp_home / "keys" / "carol.key"
    assert keyfile.stat().st_mode & 0o777 == 0o600
    (tmp_path / "m.txt").write_bytes(b"quantum-safe")
    out = tmp_path / "m.age"
    assert run("encrypt", "-r", "carol", "-o", str(out), str(tmp_path / "m.txt")).returncode == 0
    assert js(typage, "decrypt", str(keyfile), stdin=out.read_bytes()) == b"quantum-safe"
    # and back: typage encrypts to the printed key, our CLI decrypts with the key file
    (tmp_path / "t.age").write_bytes(js(typage, "encrypt", public, stdin=b"back"))
    r = run("decrypt", "-i", str(keyfile), str(tmp_path / "t.age"))
    assert (r.returncode, r.stdout) == (0, b"back")


def test_pq_recipients_file_and_store(kp_home, tmp_path):
    a, b = age.HybridIdentity.generate(), age.HybridIdentity.generate()
    rfile = tmp_path / "team.txt"
    rfile.write_text(f"# the team\n\n{a.recipient()}\n  # bob:\n{b.recipient()}\n")
    recips = keys.recipients_from_file(rfile)
    assert recips == [a.recipient(), b.recipient()]
    secure_save(b"model bytes", tmp_path / "s.age", recipients=[str(rfile)])
    key = tmp_path / "b.key"
    key.write_text(b.reveal() + "\n")
    key.chmod(0o600)
    with pytest.warns(Warning):
        assert secure_load(tmp_path / "s.age", identities=[str(key)]) == b"model bytes"


def test_pq_cannot_be_mixed_with_classic_recipients():
    pq, classic = age.HybridIdentity.generate(), age.X25519Identity.generate()
    with pytest.raises(errors.InvalidParameterError, match="post-quantum"):
        age.encrypt(b"x", [pq.recipient(), classic.recipient()])
    with pytest.raises(errors.InvalidParameterError, match="passphrase"):
        age.encrypt(b"x", [pq.recipient(), age.ScryptRecipient("a passphrase here")])
    # several post-quantum recipients are fine, and each can open the file
    other = age.HybridIdentity.generate()
    blob = age.encrypt(b"x", [pq.recipient(), other.recipient()])
    assert age.decrypt(blob, [other]) == b"x" and age.decrypt(blob, [pq]) == b"x"
    with pytest.raises(errors.NoIdentityMatchError):
        age.decrypt(blob, [classic])


def test_pq_identity_never_shows_its_secret(capsys, ip):
    ident = age.HybridIdentity.generate()
    secret = ident.reveal()
    for text in (repr(ident), str(ident), repr(ident.recipient())):
        assert secret not in text and "AGE-SECRET-KEY" not in text
    res = ip.run_line_magic("secure_keygen", "dora --pq")
    assert str(res).startswith("age1pq1") and "AGE-SECRET-KEY" not in res._repr_html_()
    assert keys.load_identities("dora")[0].recipient() == age.parse_recipient(str(res))


def test_bad_pq_strings():
    ident = age.HybridIdentity.generate()
    public = str(ident.recipient())
    for bad in (public[:-1] + ("q" if public[-1] != "q" else "p"), public.upper()[:10] + "x"):
        with pytest.raises(errors.InvalidParameterError):
            age.parse_recipient(bad)
    secret = ident.reveal()
    with pytest.raises(errors.KeyFileError):  # (the last character changed, whatever it was)
        age.identities_from_text(secret[:-1] + ("Q" if secret[-1] != "Q" else "P"))
