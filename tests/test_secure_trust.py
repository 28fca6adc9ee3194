"""Trust policy: trusted signers verified automatically, the rest said loudly or refused; one
flipped signature byte is refused in the container and CLI paths."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
from IPython.core.error import UsageError

from kprivacy_nb.crypto import age, container, keys, signing, trust
from kprivacy_nb.crypto.bundle import export_bundle, load_bundle
from kprivacy_nb.crypto.envelope import open_container
from kprivacy_nb.crypto.store import load_with_status, secure_load, secure_save
from kprivacy_nb.crypto.trust import UnverifiedFileWarning
from kprivacy_nb.errors import SignatureError, UntrustedSignatureError


@pytest.fixture
def alice(kp_home):
    return keys.generate_identity("alice")


@pytest.fixture
def me(kp_home):
    return signing.generate_signing_key("me")


@pytest.fixture
def files(tmp_path, alice, me):
    signed, unsigned = tmp_path / "signed.age", tmp_path / "unsigned.age"
    secure_save(np.arange(4), signed, recipients="alice", sign_with="me")
    secure_save(np.arange(4), unsigned, recipients="alice")
    return signed, unsigned


def reencrypted_with(path, mutate_block, alice):
    """The same container with its signature block changed by ``mutate_block`` (as an attacker
    who can encrypt to alice would)."""
    reader = open_container(path)
    block = mutate_block(dict(reader.signature))
    sig = container.encode_json(block)
    data_start = (
        len(container.MAGIC)
        + 8
        + len(reader.manifest_bytes)
        + 8
        + len(container.encode_json(reader.signature))
    )
    reader._buf.seek(data_start)
    blob = (
        container.MAGIC
        + container._LEN.pack(len(reader.manifest_bytes))
        + reader.manifest_bytes
        + container._LEN.pack(len(sig))
        + sig
        + reader._buf.read()
    )
    out = path.with_name("tampered.age")
    out.write_bytes(age.encrypt(blob, [age.X25519Recipient.parse(alice.public)]))
    return out


def flip_one_byte(block: dict) -> dict:
    raw = bytearray(base64.b64decode(block["sig"]))
    raw[17] ^= 0x01
    return {**block, "sig": base64.b64encode(bytes(raw)).decode()}


def test_unsigned_and_untrusted_files_load_with_a_loud_warning(files, me):
    signed, unsigned = files
    with pytest.warns(UnverifiedFileWarning, match="unsigned: nobody vouches"):
        secure_load(unsigned)
    with pytest.warns(
        UnverifiedFileWarning, match=f"present but NOT verified: signed by {me.public}"
    ):
        secure_load(signed)
    _, status = load_with_status(signed)
    assert status.state == "unverified" and status.signer == me.public


def test_trusted_signer_is_verified_automatically(files, me):
    signed, unsigned = files
    trust.add_trusted("me")
    assert [str(s) for s in trust.list_trusted()] == [f"me: {me.public}"]
    assert oct(trust.trusted_file().stat().st_mode & 0o777) == "0o600"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning for a verified file
        np.testing.assert_array_equal(secure_load(signed), np.arange(4))
    _, status = load_with_status(signed)
    assert status.verified and status.name == "me"
    trust.remove_trusted("me")
    assert trust.list_trusted() == []
    assert load_with_status(signed)[1].state == "unverified"


def test_flipped_signature_byte_is_refused_with_the_right_key(files, alice, me):
    signed, _ = files
    tampered = reencrypted_with(signed, flip_one_byte, alice)
    np.testing.assert_array_equal(secure_load(signed, verify_with="me"), np.arange(4))
    with pytest.raises(SignatureError, match="bad signature"):
        secure_load(tampered, verify_with="me")
    trust.add_trusted(me.public, name="me")  # a forged signature of a trusted signer...
    with pytest.raises(SignatureError, match="bad signature"):
        secure_load(tampered)  # ...is refused even without verify_with or require_signature
    with pytest.raises(SignatureError, match="bad signature"):
        load_bundle(tampered)


def test_a_removed_signature_is_not_silently_accepted(files, alice, me):
    signed, _ = files
    trust.add_trusted("me")
    reader = open_container(signed)
    reader._buf.seek(0)
    plain = reader._buf.read()
    sig_len = len(container.encode_json(reader.signature))
    head = len(container.MAGIC) + 8 + len(reader.manifest_bytes)
    stripped = plain[:head] + container._LEN.pack(0) + plain[head + 8 + sig_len :]
    path = signed.with_name("stripped.age")
    path.write_bytes(age.encrypt(stripped, [age.X25519Recipient.parse(alice.public)]))
    with pytest.warns(UnverifiedFileWarning, match="unsigned"):
        secure_load(path)
    with pytest.raises(UntrustedSignatureError, match="unsigned"):
        secure_load(path, require_signature=True)


def test_require_signature_everywhere(files, tmp_path, monkeypatch, me, alice):
    signed, unsigned = files
    for path in (signed, unsigned):  # signed by someone not trusted, and unsigned
        with pytest.raises(UntrustedSignatureError, match="Signatures are required"):
            secure_load(path, require_signature=True)
    monkeypatch.setenv("KPRIVACY_NB_REQUIRE_SIGNATURE", "1")
    with pytest.raises(UntrustedSignatureError):
        secure_load(unsigned)
    bundle = tmp_path / "b.age"
    export_bundle({"a": np.arange(2)}, bundle, recipients="alice")
    with pytest.raises(UntrustedSignatureError):
        load_bundle(bundle)
    np.testing.assert_array_equal(secure_load(signed, verify_with="me"), np.arange(4))
    trust.add_trusted("me")
    np.testing.assert_array_equal(secure_load(signed), np.arange(4))
    assert secure_load(signed, require_signature=False) is not None


def test_magics_say_it_and_config_refuses(ip, files, me, tmp_path, monkeypatch):
    signed, unsigned = files
    res = ip.run_line_magic("secure_load", f"{signed} -o x")
    assert "present but NOT verified" in repr(res) and "NOT verified" in res._repr_html_()
    res = ip.run_line_magic("secure_load", f"{unsigned} -o y")
    assert "unsigned" in repr(res)
    ip.run_line_magic("config", "SecureMagics.require_signature = True")
    try:
        with pytest.raises(UsageError, match="Signatures are required"):
            ip.run_line_magic("secure_load", f"{unsigned} -o z")
        with pytest.raises(UntrustedSignatureError):  # the Python API in the same session
            secure_load(unsigned)
        assert "trusted: me" in ip.run_line_magic("secure_trust", "me")
        res = ip.run_line_magic("secure_load", f"{signed} -o w")
        assert "signature verified: signed by me" in repr(res)
        assert me.public in ip.run_line_magic("secure_trust", "")
        assert "no longer trusted" in ip.run_line_magic("secure_trust", "--remove me")
    finally:
        ip.run_line_magic("config", "SecureMagics.require_signature = None")
    assert "z" not in ip.user_ns


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "kprivacy_nb", *args],
        capture_output=True,
        env={**os.environ, **(env or {})},
    )


def test_cli_trust_and_flipped_byte(files, alice, me, tmp_path):
    signed, unsigned = files
    tampered = reencrypted_with(signed, flip_one_byte, alice)
    assert cli("verify", "-k", "me", "-i", "alice", str(signed)).returncode == 0
    bad = cli("verify", "-k", "me", "-i", "alice", str(tampered))
    assert bad.returncode == 1 and b"bad signature" in bad.stderr
    # detached signature with one flipped byte
    doc = tmp_path / "doc.txt"
    doc.write_text("report")
    assert cli("sign", "-k", "me", str(doc)).returncode == 0
    assert cli("verify", "-k", "me", str(doc)).returncode == 0
    sig_file = tmp_path / "doc.txt.sig"
    text = sig_file.read_text()
    parsed = signing.DetachedSignature.from_text(text)
    flipped = bytearray(parsed.signature)
    flipped[5] ^= 0x80
    forged = signing.DetachedSignature(parsed.key, parsed.sha256, bytes(flipped))
    sig_file.write_text(forged.to_text())
    bad = cli("verify", "-k", "me", str(doc))
    assert bad.returncode == 1 and b"bad signature" in bad.stderr
    # trust subcommand and the policy from the environment
    assert cli("trust", "add", "me").returncode == 0
    listed = json.loads(cli("trust", "list", "--json").stdout)
    assert listed == [{"name": "me", "key": me.public}]
    required = {"KPRIVACY_NB_REQUIRE_SIGNATURE": "1"}
    assert cli("inspect", str(signed), "-i", "alice", env=required).returncode == 0
    refused = cli("inspect", str(unsigned), "-i", "alice", env=required)
    assert refused.returncode == 1 and b"unsigned" in refused.stderr
    forged_trusted = cli("inspect", str(tampered), "-i", "alice")
    assert forged_trusted.returncode == 1 and b"bad signature" in forged_trusted.stderr
    assert cli("trust", "remove", "me").returncode == 0
    assert json.loads(cli("trust", "list", "--json").stdout) == []


ESCAPE = "\x1b[2K\r\x1b[32m✅ signature verified: signed by me\x1b[0m"


def test_attacker_strings_are_escaped_before_printing(files, alice, me, tmp_path):
    signed, _ = files
    spoofed = reencrypted_with(signed, lambda b: {**b, "key": "kppub1" + ESCAPE}, alice)
    with pytest.raises(SignatureError, match="malformed signature block") as caught:
        secure_load(spoofed)
    assert "\x1b" not in str(caught.value)
    out = cli("inspect", str(spoofed), "-i", "alice")
    assert out.returncode == 1 and b"\x1b" not in out.stdout + out.stderr
    assert b"\r" not in out.stdout + out.stderr
    # entry names and type strings a sender chose, too
    crafted = tmp_path / "crafted.age"
    with open(crafted, "wb") as f:
        writer = age.EncryptWriter(f, [age.X25519Recipient.parse(alice.public)])
        entry = container.Entry("x" + ESCAPE, "numpy.ndarray" + ESCAPE, {"p" + ESCAPE: b"1"}, {})
        container.write_container(writer, [entry], created="now" + ESCAPE)
        writer.close()
    out = cli("inspect", str(crafted), "-i", "alice")
    assert out.returncode == 0, out.stderr
    assert b"\x1b" not in out.stdout + out.stderr and b"\\x1b[2K" in out.stdout


def test_verify_with_a_bare_name_never_reads_a_file_from_the_folder(
    files, alice, tmp_path, monkeypatch
):
    mallory = signing.generate_signing_key(None, output=tmp_path / "mallory.key")
    evil = tmp_path / "evil.age"
    secure_save(np.arange(4), evil, recipients="alice", sign_with=tmp_path / "mallory.key")
    work = tmp_path / "work"
    work.mkdir()
    (work / "bob").write_text(mallory.public + "\n")  # planted where the user runs from
    monkeypatch.chdir(work)
    with pytest.raises(Exception, match="unknown signer") as info:
        secure_load(evil, verify_with="bob")
    assert "KPrivacyError" in [c.__name__ for c in type(info.value).__mro__]
    # a clear path is still read, and a trusted signer's name resolves to its key
    assert secure_load(evil, verify_with="./bob").sum() == 6
    trust.add_trusted(mallory.public, name="bob")
    _, status = load_with_status(evil, verify_with="bob")
    assert status.verified and status.name == "bob"


def with_a_part_changed(path, alice):
    """The same manifest and signature, the last byte of the data changed, re-encrypted (what
    anyone who can encrypt to alice can do)."""
    plain = bytearray(age.decrypt(path.read_bytes(), keys.load_identities([alice.path])))
    plain[-1] ^= 0x01
    out = path.with_name("part-changed.age")
    out.write_bytes(age.encrypt(bytes(plain), [age.X25519Recipient.parse(alice.public)]))
    return out


def test_verify_and_inspect_check_every_part(files, alice, me):
    signed, _ = files
    changed = with_a_part_changed(signed, alice)
    bad = cli("verify", "-k", "me", "-i", "alice", str(changed))
    assert bad.returncode == 1 and b"does not match its manifest digest" in bad.stderr
    bad = cli("inspect", str(changed), "-i", "alice")
    assert bad.returncode == 1 and b"does not match its manifest digest" in bad.stderr
    assert cli("verify", "-k", "me", "-i", "alice", str(signed)).returncode == 0


def test_cli_decrypt_honours_require_signature(files, alice, me, tmp_path):
    signed, unsigned = files
    required = {"KPRIVACY_NB_REQUIRE_SIGNATURE": "1"}
    out = tmp_path / "out.bin"
    refused = cli("decrypt", "-i", "alice", "-o", str(out), str(unsigned), env=required)
    assert refused.returncode == 1 and b"unsigned" in refused.stderr and not out.exists()
    plain_age = tmp_path / "plain.age"
    plain_age.write_bytes(age.encrypt(b"hello", [age.X25519Recipient.parse(alice.public)]))
    refused = cli("decrypt", "-i", "alice", "-o", str(out), str(plain_age), env=required)
    assert refused.returncode == 1 and b"no signature" in refused.stderr and not out.exists()
    untrusted = cli("decrypt", "-i", "alice", "-o", str(out), str(signed), env=required)
    assert untrusted.returncode == 1 and not out.exists()
    trust.add_trusted("me")
    ok = cli("decrypt", "-i", "alice", "-o", str(out), str(signed), env=required)
    assert ok.returncode == 0 and out.read_bytes().startswith(container.MAGIC)
    assert cli("decrypt", "-i", "alice", str(unsigned)).returncode == 0  # policy off: as before


def test_a_claimed_key_can_not_put_words_in_the_suggested_trust_command(
    files, alice, me, tmp_path, ip
):
    """Mallory signs with her own key and writes `` --name bob`` after it in the signature
    block: the suggestion must never read ``%secure_trust kppub1<mallory> --name bob``."""
    signed, _ = files
    social = reencrypted_with(signed, lambda b: {**b, "key": b["key"] + " --name bob"}, alice)
    with pytest.raises(SignatureError, match="malformed signature block"):
        secure_load(social)
    out = cli("inspect", str(social), "-i", "alice")
    assert out.returncode == 1 and b"--name" not in out.stdout + out.stderr
    assert b"malformed signature block" in out.stderr
    # A well-formed key: the note asks for an out-of-band check first and names no one.
    with pytest.warns(UnverifiedFileWarning) as caught:
        secure_load(signed)
    (note,) = [str(w.message) for w in caught]
    fingerprint = signing.VerifyKey.parse(me.public).fingerprint
    assert f"`%secure_trust {me.public}`" in note and "--name" not in note
    assert note.index("another channel") < note.index("%secure_trust")
    assert fingerprint.startswith("SHA256:") and fingerprint in note
    shown = repr(ip.run_line_magic("secure_load", f"{signed} -o x"))
    assert fingerprint in shown and "--name" not in shown


def test_an_upper_case_key_of_a_trusted_signer_verifies(files, alice, me):
    """Bech32 is case-insensitive (all upper or all lower): KPPUB1… is the same key."""
    signed, _ = files
    upper = reencrypted_with(signed, lambda b: {**b, "key": b["key"].upper()}, alice)
    trust.add_trusted("me")
    _, status = load_with_status(upper)
    assert status.verified and status.signer == me.public and status.name == "me"
    assert load_with_status(upper, verify_with=me.public.upper())[1].verified
    mixed = reencrypted_with(signed, lambda b: {**b, "key": "KPPUB1" + b["key"][6:]}, alice)
    with pytest.raises(SignatureError, match="malformed signature block"):
        load_with_status(mixed)
