"""Naming a colleague's public key (issue #20, item 5): `kprivacy-nb recipients add NAME KEY`,
`%secure_recipients add NAME KEY`, any supported key type, and the hint for an unknown name."""

from __future__ import annotations

import json

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from IPython.core.error import UsageError
from test_crypto_cli import run

from kprivacy_nb.crypto import keys, signing
from kprivacy_nb.crypto.age import HybridIdentity, X25519Identity
from kprivacy_nb.paths import home_dir


def _ssh_pair(private, tmp_path, name):
    """An OpenSSH private key file (0600) and its one-line public key, as ssh-keygen writes."""
    path = tmp_path / name
    path.write_bytes(
        private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)
    public = private.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    return path, f"{public.decode()} {name}@laptop"


def _age_pair(identity, tmp_path, name):
    path = tmp_path / f"{name}.key"
    path.write_text(identity.reveal() + "\n")
    path.chmod(0o600)
    return path, str(identity.recipient())


@pytest.fixture
def colleagues(tmp_path):
    """Key pairs that belong to other people: we only ever get their public halves."""
    return {
        "bob": _age_pair(X25519Identity.generate(), tmp_path, "bob"),
        "pat": _age_pair(HybridIdentity.generate(), tmp_path, "pat"),
        "carol": _ssh_pair(ed25519.Ed25519PrivateKey.generate(), tmp_path, "carol"),
        "dave": _ssh_pair(rsa.generate_private_key(65537, 2048), tmp_path, "dave"),
    }


def test_cli_recipients_add_list_remove_every_key_type(kp_home, colleagues, tmp_path):
    (tmp_path / "data.txt").write_bytes(b"rows for colleagues\n")
    for name, (_, public) in colleagues.items():
        # an ssh key pasted unquoted arrives as several words
        r = run("recipients", "add", name, *public.split())
        assert r.returncode == 0, r.stderr
        assert name in r.stdout.decode()
    assert not list(kp_home.glob("keys/*"))  # no key pair was made
    listed = json.loads(run("recipients", "list", "--json").stdout)
    assert {k["name"]: k["type"] for k in listed} == {
        "bob": "age",
        "pat": "age (post-quantum)",
        "carol": "ssh-ed25519",
        "dave": "ssh-rsa",
    }
    for name, (private, _) in colleagues.items():
        out = tmp_path / f"for-{name}.age"
        r = run("encrypt", "-r", name, "-o", str(out), str(tmp_path / "data.txt"))
        assert r.returncode == 0, r.stderr
        r = run("decrypt", "-i", str(private), str(out))
        assert r.returncode == 0 and r.stdout == b"rows for colleagues\n", r.stderr
    r = run("recipients", "remove", "bob")
    assert r.returncode == 0 and "removed bob" in r.stdout.decode()
    assert "bob" not in {k["name"] for k in json.loads(run("recipients", "list", "--json").stdout)}
    r = run("encrypt", "-r", "bob", str(tmp_path / "data.txt"))
    assert r.returncode == 2 and b"recipients add bob KEY" in r.stderr


def test_unknown_name_says_to_add_the_colleagues_public_key(kp_home, tmp_path):
    (tmp_path / "data.txt").write_bytes(b"x")
    r = run("encrypt", "-r", "bob", "-o", str(tmp_path / "x.age"), str(tmp_path / "data.txt"))
    err = r.stderr.decode()
    assert r.returncode == 2 and err.count("\n") == 1
    assert "kprivacy-nb recipients add bob KEY" in err
    assert "keygen" not in err  # a new LOCAL key pair is not what Bob can open


def test_add_refuses_secret_or_malformed_keys_and_replacing_without_force(kp_home, colleagues):
    secret = X25519Identity.generate().reveal()
    r = run("recipients", "add", "eve", secret)
    assert r.returncode == 2 and b"secret key" in r.stderr and secret.encode() not in r.stderr
    r = run("recipients", "add", "eve", "age1notakey")
    assert r.returncode == 2
    assert run("recipients", "add", "bob", colleagues["bob"][1]).returncode == 0
    other = str(X25519Identity.generate().recipient())
    r = run("recipients", "add", "bob", other)
    assert r.returncode == 2 and b"--force" in r.stderr
    assert run("recipients", "add", "bob", other, "--force").returncode == 0
    assert [k.key for k in keys.list_recipients()] == [other]
    # a signer's kppub1… key goes beside the age key, for --verify-with bob
    pub = signing.generate_signing_key(output=home_dir() / "b.sign.key").public
    assert run("recipients", "add", "bob", pub).returncode == 0
    assert {k.type for k in keys.list_recipients() if k.name == "bob"} == {"age", "signing"}
    assert str(signing.load_verify_key("bob")) == pub


def test_secure_recipients_magic(ip, kp_home, colleagues):
    _, carol = colleagues["carol"]
    out = ip.run_line_magic("secure_recipients", f"add carol {carol}")
    assert "carol: ssh-ed25519" in str(out)
    ip.run_line_magic("secure_recipients", f"add pat {colleagues['pat'][1]}")
    listed = str(ip.run_line_magic("secure_recipients", ""))
    assert "carol: ssh-ed25519" in listed and "pat: age1pq1" in listed
    ip.user_ns["rows"] = "id,1\n"
    ip.run_line_magic("secure_save", f"rows {kp_home}/rows.age --to carol")
    from kprivacy_nb import secure_load

    assert secure_load(kp_home / "rows.age", identities=[colleagues["carol"][0]]) == "id,1\n"
    assert "removed carol" in str(ip.run_line_magic("secure_recipients", "remove carol"))
    with pytest.raises(UsageError, match="recipients add carol KEY"):
        ip.run_line_magic("secure_save", f"rows {kp_home}/rows2.age --to carol")
    with pytest.raises(UsageError, match="add NAME KEY"):
        ip.run_line_magic("secure_recipients", "add carol")
