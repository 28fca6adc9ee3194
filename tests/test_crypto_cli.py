"""``kprivacy-nb keygen|encrypt|decrypt|sign|verify|inspect`` through real subprocesses."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyrage
import pytest

from kprivacy_nb.crypto import age


class Result:
    def __init__(self, returncode: int, stdout: bytes, stderr: bytes) -> None:
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def run_subprocess(*args: str, stdin: bytes | None = None, env: dict | None = None) -> Result:
    """The real console entry point (``python -m kprivacy_nb``)."""
    r = subprocess.run(
        [sys.executable, "-m", "kprivacy_nb", *args],
        input=stdin,
        capture_output=True,
        env={**os.environ, **(env or {})},
        timeout=120,
    )
    return Result(r.returncode, r.stdout, r.stderr)


def run(*args: str, stdin: bytes | None = None, env: dict | None = None) -> Result:
    """``kprivacy_nb.__main__.main`` in-process with byte stdin/stdout (fast)."""
    from kprivacy_nb.__main__ import main

    fin = io.TextIOWrapper(io.BytesIO(stdin or b""))
    fout, ferr = io.TextIOWrapper(io.BytesIO()), io.TextIOWrapper(io.BytesIO())
    saved_env = dict(os.environ)
    saved = sys.stdin, sys.stdout, sys.stderr
    os.environ.update(env or {})
    sys.stdin, sys.stdout, sys.stderr = fin, fout, ferr
    try:
        try:
            code = main(list(args))
        except SystemExit as exc:  # argparse usage errors
            code = exc.code
    finally:
        sys.stdin, sys.stdout, sys.stderr = saved
        os.environ.clear()
        os.environ.update(saved_env)
    fout.flush()
    ferr.flush()
    return Result(code, fout.buffer.getvalue(), ferr.buffer.getvalue())


def test_keygen_prints_only_public_key(kp_home):
    r = run("keygen", "alice")
    assert r.returncode == 0, r.stderr
    out = r.stdout.decode().strip()
    assert out.startswith("age1") and len(out.splitlines()) == 1
    assert b"AGE-SECRET-KEY" not in r.stdout + r.stderr
    key = kp_home / "keys" / "alice.key"
    assert key.stat().st_mode & 0o777 == 0o600
    assert f"alice: {out}" in (kp_home / "recipients.txt").read_text()
    r = run("keygen", "-o", str(kp_home / "other.txt"), "--json")
    info = json.loads(r.stdout.decode().splitlines()[-1])
    assert info["public_key"].startswith("age1")
    assert (kp_home / "other.txt").stat().st_mode & 0o777 == 0o600
    assert run("keygen", "alice").returncode == 1  # never overwrite without --force


def test_encrypt_decrypt_files_and_pipes(kp_home, tmp_path):
    run = run_subprocess  # the real entry point, with real pipes
    run("keygen", "alice")
    data = os.urandom(200_000)
    src = tmp_path / "in.bin"
    src.write_bytes(data)
    r = run("encrypt", "-r", "alice", "-o", str(tmp_path / "f.age"), str(src))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "f.age").stat().st_mode & 0o777 == 0o600
    r = run("decrypt", "-i", "alice", "-o", str(tmp_path / "out.bin"), str(tmp_path / "f.age"))
    assert r.returncode == 0 and (tmp_path / "out.bin").read_bytes() == data
    # stdin -> stdout both ways, armored in the middle
    enc = run("encrypt", "-r", "alice", "-a", stdin=data)
    assert enc.returncode == 0 and enc.stdout.startswith(b"-----BEGIN AGE ENCRYPTED FILE-----")
    dec = run("decrypt", stdin=enc.stdout)  # default identities from the keys folder
    assert dec.returncode == 0 and dec.stdout == data


def test_interop_with_rage(kp_home, tmp_path):
    theirs = pyrage.x25519.Identity.generate()
    r = run("encrypt", "-r", str(theirs.to_public()), stdin=b"for rage")
    assert pyrage.decrypt(r.stdout, [theirs]) == b"for rage"
    ident = tmp_path / "id.txt"
    ident.write_text(f"# a rage key\n{theirs}\n")
    ident.chmod(0o600)
    blob = pyrage.encrypt(b"from rage", [theirs.to_public()])
    r = run("decrypt", "-i", str(ident), stdin=blob)
    assert r.returncode == 0 and r.stdout == b"from rage"


def test_failures_exit_codes_and_no_partial_output(kp_home, tmp_path):
    run("keygen", "alice")
    run("keygen", "bob")
    enc = run("encrypt", "-r", "alice", stdin=b"x" * 100_000).stdout
    (tmp_path / "f.age").write_bytes(enc)
    r = run("decrypt", "-i", "bob", "-o", str(tmp_path / "o"), str(tmp_path / "f.age"))
    assert r.returncode == 1
    assert r.stderr.decode().count("\n") == 1 and "no identity matches" in r.stderr.decode()
    (tmp_path / "t.age").write_bytes(enc[:-100])
    r = run("decrypt", "-i", "alice", "-o", str(tmp_path / "o"), str(tmp_path / "t.age"))
    assert r.returncode == 1 and "truncated" in r.stderr.decode()
    assert not (tmp_path / "o").exists()
    assert run("encrypt", stdin=b"x").returncode == 2  # no recipient: usage error
    assert run("encrypt", "--bogus").returncode == 2
    (kp_home / "keys" / "alice.key").chmod(0o640)
    r = run("decrypt", "-i", "alice", str(tmp_path / "f.age"))
    assert r.returncode == 1 and "chmod 600" in r.stderr.decode()


@pytest.mark.slow
def test_passphrase_from_env(tmp_path):
    env = {"KP_PASS": "correct horse battery staple"}
    enc = run("encrypt", "--passphrase-env", "KP_PASS", stdin=b"secret", env=env)
    assert enc.returncode == 0, enc.stderr
    assert pyrage.passphrase.decrypt(enc.stdout, env["KP_PASS"]) == b"secret"
    dec = run("decrypt", "--passphrase-env", "KP_PASS", stdin=enc.stdout, env=env)
    assert dec.stdout == b"secret"
    bad = run("decrypt", "--passphrase-env", "KP_PASS", stdin=enc.stdout, env={"KP_PASS": "no"})
    assert bad.returncode == 1 and b"correct horse" not in bad.stderr


def test_sign_verify_and_inspect(kp_home, tmp_path):
    from kprivacy_nb.crypto import keys, signing, store

    keys.generate_identity("alice")
    me = signing.generate_signing_key("me")
    f = tmp_path / "m.age"
    store.secure_save(np.arange(3), f, recipients="alice", sign_with="me")
    r = run("inspect", str(f), "--json")
    info = json.loads(r.stdout.decode().splitlines()[-1])
    assert info["recipients"] == ["X25519"] and "manifest" not in info
    r = run("inspect", str(f), "-i", "alice", "--json")
    info = json.loads(r.stdout.decode().splitlines()[-1])
    assert info["signed_by"] == me.public and info["signature"] == "unverified"
    entry = info["manifest"]["entries"][0]
    assert entry["type"] == "numpy.ndarray" and len(entry["parts"][0]["sha256"]) == 64
    text = run("inspect", str(f), "-i", "alice").stdout.decode()
    assert (
        "numpy.ndarray" in text
        and f"signature present but NOT verified: signed by {me.public}" in text
    )
    assert run("trust", "add", "me").returncode == 0
    text = run("inspect", str(f), "-i", "alice").stdout.decode()
    assert f"signature verified: signed by me ({me.public})" in text
    # embedded container signature
    assert run("verify", "-k", "me", "-i", "alice", str(f)).returncode == 0
    other = signing.generate_signing_key("other")
    assert run("verify", "-k", other.public, "-i", "alice", str(f)).returncode == 1
    # detached signatures
    doc = tmp_path / "doc.txt"
    doc.write_text("report")
    assert run("sign", "-k", "me", str(doc)).returncode == 0
    assert run("verify", "-k", me.public, str(doc)).returncode == 0
    doc.write_text("report!")
    r = run("verify", "-k", "me", str(doc))
    assert r.returncode == 1 and "modified" in r.stderr.decode()
    assert not Path(str(doc) + ".sig").read_text().count("KPRIVACY-SIGNING-KEY")


def test_dangling_symlink_at_output_is_named_and_never_followed(kp_home, tmp_path):
    run("keygen", "alice")
    (tmp_path / "in").write_bytes(b"plain")
    (tmp_path / "victim").mkdir()
    link = tmp_path / "out.age"
    link.symlink_to(tmp_path / "victim" / "new")
    for argv in (
        ["encrypt", "-r", "alice", "-o", str(link), str(tmp_path / "in")],
        ["keygen", "-o", str(link)],
    ):
        r = run(*argv)
        err = r.stderr.decode()
        assert r.returncode == 1 and err.count("\n") == 1, err
        assert "is a symbolic link to" in err and "does not exist" in err and "appeared" not in err
        assert link.is_symlink() and list((tmp_path / "victim").iterdir()) == []
    r = run("encrypt", "-r", "alice", "-o", str(link), "--force", str(tmp_path / "in"))
    assert r.returncode == 0 and not link.is_symlink()  # the link itself replaced
    assert list((tmp_path / "victim").iterdir()) == []


def test_recipients_file_error_names_the_line(tmp_path):
    good = age.X25519Identity.generate().recipient()
    rfile = tmp_path / "team.txt"
    rfile.write_text(f"# team\n\n{good}\nage1zzz\n")
    r = run("encrypt", "-R", str(rfile), stdin=b"x")
    err = r.stderr.decode()
    assert r.returncode == 2 and f"{rfile}, line 4: " in err and err.count("\n") == 1, err


def test_public_key_given_as_identity_is_named(kp_home, tmp_path):
    me = age.X25519Identity.generate()
    blob = age.encrypt(b"x", [me.recipient()])
    (tmp_path / "id").write_text(me.reveal() + "\n")
    (tmp_path / "id").chmod(0o600)
    pub = tmp_path / "id.pub"
    pub.write_text(f"# public\n{me.recipient()}\n")
    pub.chmod(0o644)  # as public keys are: the complaint must not be about permissions
    r = run("decrypt", "-i", str(pub), stdin=blob)
    err = r.stderr.decode()
    assert r.returncode == 1 and "is a public key" in err and "chmod" not in err, err
    assert f"probably {tmp_path / 'id'}" in err
    assert run("decrypt", "-i", str(tmp_path / "id"), stdin=blob).stdout == b"x"


def test_verify_without_signature_file_says_so(kp_home, tmp_path):
    from kprivacy_nb.crypto import signing

    me = signing.generate_signing_key("me")
    doc = tmp_path / "report.txt"
    doc.write_text("not an age file")
    r = run("verify", "-k", me.public, str(doc))
    err = r.stderr.decode()
    assert r.returncode == 1 and f"{doc}.sig does not exist" in err and "-s SIG" in err, err
    assert err.count("\n") == 1
