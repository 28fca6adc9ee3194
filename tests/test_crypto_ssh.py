"""SSH keys as age recipients and identities (ssh-ed25519, ssh-rsa), with keys made by the real
``ssh-keygen`` and files checked both ways against the reference ``age`` CLI; recipient files of
mixed types with comments; passphrase-protected keys prompt on the terminal, never on the line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from IPython.core.error import UsageError
from test_crypto_cli import run

from kprivacy_nb import errors, secure_load, secure_save
from kprivacy_nb.crypto import age, keys
from kprivacy_nb.secrets import Secret, find_secret

from ci_support import require_tool


@pytest.fixture(scope="module")
def tools() -> dict[str, str]:
    return {
        "age": require_tool("age", "apt-get install age"),
        "ssh-keygen": require_tool("ssh-keygen", "apt-get install openssh-client"),
    }


@pytest.fixture(scope="module")
def sshkeys(tools, tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("ssh")
    made = {"ed": ["-t", "ed25519"], "rsa": ["-t", "rsa", "-b", "3072"]}
    for name, kind in made.items():
        subprocess.run(
            [tools["ssh-keygen"], "-q", *kind, "-N", "", "-C", f"{name}@host", "-f", d / name],
            check=True,
        )
    subprocess.run(
        [tools["ssh-keygen"], "-q", "-t", "ed25519", "-N", "open sesame", "-f", d / "locked"],
        check=True,
    )
    return {p.name: p for p in d.iterdir()}


def age_cli(tools, *args: str, stdin: bytes) -> subprocess.CompletedProcess:
    return subprocess.run([tools["age"], *args], input=stdin, capture_output=True, timeout=60)


@pytest.mark.parametrize("kind", ["ed", "rsa"])
def test_ours_to_age_and_back(tools, sshkeys, tmp_path, kind):
    pub = sshkeys[f"{kind}.pub"].read_text().strip()  # with its comment, as -r takes it
    (tmp_path / "plain").write_bytes(b"x" * 70_000)
    r = run("encrypt", "-r", pub, "-o", str(tmp_path / "c.age"), str(tmp_path / "plain"))
    assert r.returncode == 0, r.stderr
    stanza = "ssh-ed25519" if kind == "ed" else "ssh-rsa"
    assert age.stanza_types(open(tmp_path / "c.age", "rb")) == [stanza]
    out = age_cli(tools, "-d", "-i", str(sshkeys[kind]), stdin=(tmp_path / "c.age").read_bytes())
    assert out.returncode == 0 and out.stdout == b"x" * 70_000, out.stderr
    # age encrypts to the .pub file; our CLI decrypts with the OpenSSH private key
    theirs = age_cli(tools, "-R", str(sshkeys[f"{kind}.pub"]), stdin=b"from age")
    (tmp_path / "t.age").write_bytes(theirs.stdout)
    r = run("decrypt", "-i", str(sshkeys[kind]), str(tmp_path / "t.age"))
    assert (r.returncode, r.stdout) == (0, b"from age"), r.stderr


def test_recipients_file_of_mixed_types(tools, sshkeys, tmp_path):
    mine = age.X25519Identity.generate()
    rfile = tmp_path / "team.txt"
    rfile.write_text(
        "# the team — one key per line, as age reads it\n\n"
        f"{mine.recipient()}\n"
        f"# alice's laptop\n{sshkeys['ed.pub'].read_text().strip()}\n\n"
        f"{sshkeys['rsa.pub'].read_text()}"
    )
    (tmp_path / "p").write_bytes(b"for everyone")
    r = run("encrypt", "-R", str(rfile), "-o", str(tmp_path / "c.age"), str(tmp_path / "p"))
    assert r.returncode == 0, r.stderr
    blob = (tmp_path / "c.age").read_bytes()
    assert sorted(age.stanza_types(open(tmp_path / "c.age", "rb"))) == [
        "X25519",
        "ssh-ed25519",
        "ssh-rsa",
    ]
    for k in ("ed", "rsa"):
        assert age_cli(tools, "-d", "-i", str(sshkeys[k]), stdin=blob).stdout == b"for everyone"
    assert age.decrypt(blob, [mine]) == b"for everyone"
    # the same file read by age: what it encrypts, we open with either SSH key
    theirs = age_cli(tools, "-R", str(rfile), stdin=b"same file").stdout
    for k in ("ed", "rsa"):
        assert age.decrypt(theirs, keys.load_identities(str(sshkeys[k]))) == b"same file"


def test_named_ssh_recipient_and_store(sshkeys, kp_home, tmp_path, ip):
    keys.add_named("bob", sshkeys["rsa.pub"].read_text().strip())
    pub = sshkeys["ed.pub"].read_text().strip()
    assert find_secret(f'x f.age --to "{pub}"') is None  # a public key is not a secret
    ip.user_ns["x"] = b"shared"
    ip.run_line_magic("secure_save", f'x {tmp_path}/s.age --to bob --to "{pub}"')
    for k in ("rsa", "ed"):
        with pytest.warns(Warning):
            assert secure_load(tmp_path / "s.age", identities=[str(sshkeys[k])]) == b"shared"
    secure_save(b"y", tmp_path / "only_bob.age", recipients=["bob"])
    with pytest.raises(errors.NoIdentityMatchError):
        secure_load(tmp_path / "only_bob.age", identities=[str(sshkeys["ed"])])


def test_encrypted_key_asks_only_when_needed(tools, sshkeys):
    pub = sshkeys["locked.pub"].read_text().strip()
    blob = age_cli(tools, "-r", pub, stdin=b"locked away").stdout
    asked: list[str] = []

    def prompt(text: str) -> Secret:
        asked.append(text)
        return Secret("open sesame")

    ids = keys.load_identities(str(sshkeys["locked"]), passphrase=prompt)
    other = age.encrypt(b"not for it", [age.X25519Identity.generate().recipient()])
    with pytest.raises(errors.NoIdentityMatchError):
        age.decrypt(other, ids)
    assert asked == []  # not our stanza: no prompt
    assert age.decrypt(blob, ids) == b"locked away" and len(asked) == 1
    wrong = keys.load_identities(str(sshkeys["locked"]), passphrase=lambda _: Secret("nope"))
    with pytest.raises(errors.KeyFileError, match="wrong passphrase"):
        age.decrypt(blob, wrong)


def test_cli_prompts_for_ssh_key_passphrase_on_the_terminal(tools, sshkeys, tmp_path):
    pexpect = pytest.importorskip("pexpect")
    pub = sshkeys["locked.pub"].read_text().strip()
    (tmp_path / "c.age").write_bytes(age_cli(tools, "-r", pub, stdin=b"via tty").stdout)
    out = tmp_path / "out"
    argv = ["-m", "kprivacy_nb", "decrypt", "-i", str(sshkeys["locked"]), "-o", str(out)]
    child = pexpect.spawn(sys.executable, [*argv, str(tmp_path / "c.age")], timeout=60)
    child.expect("Passphrase for .*locked")
    child.sendline("open sesame")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0 and out.read_bytes() == b"via tty"
    assert b"open sesame" not in child.before.replace(b"\r", b"")  # not echoed
    child = pexpect.spawn(sys.executable, [*argv + ["--force"], str(tmp_path / "c.age")])
    child.expect("Passphrase")
    child.sendline("wrong one")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 1 and b"wrong passphrase" in child.before


def test_bad_ssh_inputs(sshkeys, tools, tmp_path):
    with pytest.raises(errors.InvalidParameterError):
        age.parse_recipient("ssh-ed25519 AAAAnotakey")
    with pytest.raises(errors.InvalidParameterError):
        age.parse_recipient("ssh-dss AAAAB3NzaC1kc3MAAACBAP")
    subprocess.run(
        [tools["ssh-keygen"], "-q", "-t", "rsa", "-b", "1024", "-N", "", "-f", tmp_path / "weak"],
        check=True,
    )
    with pytest.raises(errors.InvalidParameterError, match="2048"):
        age.parse_recipient((tmp_path / "weak.pub").read_text())
    broken = tmp_path / "broken"
    broken.write_text(
        "-----BEGIN OPENSSH PRIVATE KEY-----\nAAAA\n-----END OPENSSH PRIVATE KEY-----\n"
    )
    broken.chmod(0o600)
    with pytest.raises(errors.KeyFileError):
        keys.load_identities(str(broken))
    # an identity that is not the stanza's key: no match, never a crash
    blob = age.encrypt(b"z", [age.parse_recipient(sshkeys["rsa.pub"].read_text())])
    with pytest.raises(errors.NoIdentityMatchError):
        age.decrypt(blob, keys.load_identities(str(sshkeys["ed"])))


# --- passphrases of encrypted identities: never from stdin, one clear line on every failure ----


def _detached(*args: str, stdin: bytes = b"", env: dict | None = None):
    """The real CLI with no controlling terminal (setsid), as under cron/CI or in a pipe."""
    import os

    return subprocess.run(
        [sys.executable, "-m", "kprivacy_nb", *args],
        input=stdin,
        capture_output=True,
        start_new_session=True,
        env={**os.environ, **(env or {})},
        timeout=120,
    )


def _one_line(stderr: bytes) -> str:
    text = stderr.decode()
    assert text.count("\n") == 1 and text.startswith("kprivacy-nb: "), text
    assert "Traceback" not in text and "Warning" not in text, text
    return text


@pytest.fixture
def locked_file(tools, sshkeys, tmp_path) -> Path:
    pub = sshkeys["locked.pub"].read_text().strip()
    path = tmp_path / "c.age"
    path.write_bytes(age_cli(tools, "-r", pub, stdin=b"locked data").stdout)
    return path


def test_no_terminal_passphrase_is_never_read_from_stdin(sshkeys, locked_file, tmp_path):
    out = tmp_path / "out"
    # the ciphertext itself on stdin: a line of it must not be taken for the passphrase
    r = _detached(
        "decrypt", "-i", str(sshkeys["locked"]), "-o", str(out), stdin=locked_file.read_bytes()
    )
    text = _one_line(r.stderr)
    assert r.returncode == 1 and "no terminal" in text and "--identity-passphrase-env VAR" in text
    # the right passphrase, but on stdin (or invalid UTF-8 bytes): refused the same way
    for typed in (b"open sesame\n", b"\xffopen sesame\n"):
        r = _detached(
            "decrypt", "-i", str(sshkeys["locked"]), "-o", str(out), str(locked_file), stdin=typed
        )
        assert r.returncode == 1 and "no terminal" in _one_line(r.stderr)
        assert b"open sesame" not in r.stderr and b"\xff" not in r.stderr
    assert not out.exists()
    # --passphrase-env is for scrypt files: the advice never points at it for an identity
    r = _detached(
        "decrypt", "-i", str(sshkeys["locked"]), "--passphrase-env", "P", str(locked_file),
        env={"P": "open sesame"},
    )  # fmt: skip
    assert r.returncode == 1 and "--identity-passphrase-env VAR" in _one_line(r.stderr)


def test_identity_passphrase_env(sshkeys, locked_file, tmp_path):
    help_text = _detached("decrypt", "--help").stdout.decode()
    assert "--identity-passphrase-env VAR" in help_text
    ok = {"SSH_PASS": "open sesame"}
    key = str(sshkeys["locked"])
    r = _detached(
        "decrypt", "-i", key, "--identity-passphrase-env", "SSH_PASS", str(locked_file), env=ok
    )
    assert (r.returncode, r.stdout) == (0, b"locked data"), r.stderr
    r = _detached(
        "decrypt", "-i", key, "--identity-passphrase-env", "SSH_PASS", str(locked_file),
        env={"SSH_PASS": "not it"},
    )  # fmt: skip
    assert r.returncode == 1 and "passphrase" in _one_line(r.stderr) and r.stdout == b""
    r = _detached(
        "decrypt", "-i", key, "--identity-passphrase-env", "UNSET_VAR_XYZ", str(locked_file)
    )
    assert r.returncode == 1 and "not set" in _one_line(r.stderr)
    # a passphrase that is not UTF-8 (bytes in the environment): one line, nothing of it shown
    import os

    r = subprocess.run(
        [sys.executable, "-m", "kprivacy_nb", "decrypt", "-i", key, "--identity-passphrase-env",
         "SSH_PASS", str(locked_file)],
        capture_output=True, start_new_session=True, timeout=120,
        env={**os.environb, b"SSH_PASS": b"\xffopen"},
    )  # fmt: skip
    assert r.returncode == 1 and "not UTF-8" in _one_line(r.stderr) and b"open" not in r.stderr
    # inspect and verify take it too (they decrypt with -i)
    r = _detached(
        "inspect", str(locked_file), "-i", key, "--identity-passphrase-env", "SSH_PASS", env=ok
    )
    assert r.returncode == 0 and b"not a kprivacy-nb container" in r.stdout, r.stderr


def test_secure_load_magic_takes_identity_passphrase_env(sshkeys, tmp_path, ip, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "locked").write_bytes(sshkeys["locked"].read_bytes())
    (tmp_path / "locked").chmod(0o600)
    secure_save(
        b"for the locked key", tmp_path / "s.age", recipients=[sshkeys["locked.pub"].read_text()]
    )
    monkeypatch.setenv("SSH_PASS", "open sesame")
    ip.run_line_magic("secure_load", "s.age -o got -i locked --identity-passphrase-env SSH_PASS")
    assert ip.user_ns["got"] == b"for the locked key"


def _pty_decrypt(sshkeys, locked_file, typed: bytes):
    pexpect = __import__("pexpect")
    argv = ["-m", "kprivacy_nb", "decrypt", "-i", str(sshkeys["locked"]), str(locked_file)]
    child = pexpect.spawn(sys.executable, argv, timeout=60)
    child.expect("Passphrase for .*locked")
    child.send(typed)
    child.expect(pexpect.EOF)
    child.close()
    return child.exitstatus, child.before.replace(b"\r", b"")


def test_terminal_prompt_failures_are_one_clear_line(sshkeys, locked_file):
    status, shown = _pty_decrypt(sshkeys, locked_file, b"\xffpass\n")  # not UTF-8
    assert status == 1 and b"not valid UTF-8" in shown
    assert b"Traceback" not in shown and b"pass" not in shown.replace(b"passphrase", b"")
    status, shown = _pty_decrypt(sshkeys, locked_file, b"\x04")  # Ctrl-D at the prompt
    assert status == 1 and b"no passphrase entered" in shown and b"Traceback" not in shown


def test_encrypt_passphrase_prompt_without_terminal_and_at_confirm(tmp_path):
    pexpect = __import__("pexpect")
    r = _detached("encrypt", "-p", "-o", str(tmp_path / "p.age"), stdin=b"pass\n")
    text = _one_line(r.stderr)
    assert (
        r.returncode == 1 and "--passphrase-env VAR" in text and not (tmp_path / "p.age").exists()
    )
    (tmp_path / "in").write_bytes(b"x")
    argv = [
        "-m",
        "kprivacy_nb",
        "encrypt",
        "-p",
        "-o",
        str(tmp_path / "p.age"),
        str(tmp_path / "in"),
    ]
    child = pexpect.spawn(sys.executable, argv, timeout=60)
    child.expect("Passphrase")
    child.sendline("correct horse")
    child.expect("Confirm")
    child.send(b"\x04")  # Ctrl-D
    child.expect(pexpect.EOF)
    child.close()
    shown = child.before.replace(b"\r", b"")
    assert child.exitstatus == 1 and b"Traceback" not in shown and b"EOFError" not in shown
    assert b"correct horse" not in shown and not (tmp_path / "p.age").exists()


def test_dsa_identity_refused_without_library_warning(tools, tmp_path, locked_file):
    subprocess.run(
        [tools["ssh-keygen"], "-q", "-t", "dsa", "-N", "", "-f", tmp_path / "dsa"], check=True
    )
    r = _detached("decrypt", "-i", str(tmp_path / "dsa"), str(locked_file))
    assert r.returncode == 1 and "unsupported SSH key type" in _one_line(r.stderr)


def test_encrypted_signing_pem_without_terminal_names_password_env(tmp_path):
    from cryptography.hazmat.primitives import serialization as ser
    from cryptography.hazmat.primitives.asymmetric import ec

    pem = tmp_path / "enc.pem"
    key = ec.generate_private_key(ec.SECP256R1())
    pem.write_bytes(
        key.private_bytes(
            ser.Encoding.PEM, ser.PrivateFormat.PKCS8, ser.BestAvailableEncryption(b"pem pass")
        )
    )
    pem.chmod(0o600)
    (tmp_path / "m.bin").write_bytes(b"model")
    argv = ["sign", "--format", "oms", "--private-key", str(pem), str(tmp_path / "m.bin")]
    r = _detached(*argv, stdin=b"pem pass\n")
    assert r.returncode == 1 and "--password-env VAR" in _one_line(r.stderr)
    assert not (tmp_path / "m.bin.sig").exists()


def test_secure_show_takes_identity_passphrase_env(sshkeys, tmp_path, ip, monkeypatch):
    """An encrypted cell output for an encrypted SSH key, shown without any prompt."""
    import kprivacy_nb.magics.export as export_magics

    monkeypatch.chdir(tmp_path)
    (tmp_path / "locked").write_bytes(sshkeys["locked"].read_bytes())
    (tmp_path / "locked").chmod(0o600)
    pub = sshkeys["locked.pub"].read_text().strip()
    ip.run_cell(f'%%secure_output -r "{pub}"\nprint("ROW-" + str(6 * 7))')
    shown = []
    monkeypatch.setattr(export_magics, "display", lambda obj, **kw: shown.append(obj))
    monkeypatch.setenv("SSH_PASS", "open sesame")
    ip.run_line_magic("secure_show", "-i locked --identity-passphrase-env SSH_PASS --for 0")
    assert any("ROW-42" in str(item) for item in shown), shown
    monkeypatch.setenv("SSH_PASS", "not it")
    with pytest.raises(UsageError):
        ip.run_line_magic("secure_show", "-i locked --identity-passphrase-env SSH_PASS --for 0")
