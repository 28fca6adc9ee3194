"""``kprivacy-nb doctor`` and ``%kp_doctor``: each finding from a fixture that has the problem,
and a clean environment that reports nothing high."""

from __future__ import annotations

import json
import os
import shutil
import socket
import sqlite3
import subprocess
import sys

import pytest

from kprivacy_nb.__main__ import main
from kprivacy_nb.crypto import age
from kprivacy_nb.doctor import run_checks

PATCHED = "keras==3.15.0\ncryptography==46.0.5\njupyter-server==2.21.0\npillow==12.0.0\n"


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """Jupyter's runtime/config folders, IPython's history and the working tree in tmp_path."""
    for name in ("runtime", "jcfg", "ipython", "work"):
        (tmp_path / name).mkdir()
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "runtime"))
    monkeypatch.setenv("JUPYTER_CONFIG_DIR", str(tmp_path / "jcfg"))
    monkeypatch.setenv("JUPYTER_CONFIG_PATH", "")
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))
    monkeypatch.delenv("KPRIVACY_NB_LEDGER_URL", raising=False)
    monkeypatch.chdir(tmp_path / "work")
    return tmp_path


def doctor(capsys, *argv: str) -> tuple[int, dict]:
    rc = main(["doctor", "--json", *argv])
    out = capsys.readouterr().out.strip().splitlines()
    return rc, json.loads(out[-1])


def ids(doc: dict, severity: str | None = None) -> set[str]:
    return {f["id"] for f in doc["findings"] if severity in (None, f["severity"])}


# -- package advisories ----------------------------------------------------------------------


def test_vulnerable_pins_are_reported_and_fail_the_cli(capsys, tmp_path):
    req = tmp_path / "requirements.txt"
    req.write_text("keras==3.8.0  # pinned\ncryptography==41.0.0\n")
    rc, doc = doctor(capsys, "--requirements", str(req), "--check", "advisories")
    assert rc == 1
    assert {"CVE-2025-1550", "CVE-2024-26130"} <= ids(doc, "high")
    f = next(f for f in doc["findings"] if f["id"] == "CVE-2025-1550")
    assert "keras 3.8.0" in f["evidence"] and "requirements.txt line 1" in f["evidence"]
    assert f["fix"].startswith('pip install "keras>=') and f["check"] == "advisories"
    assert doc["advisory_snapshot"]  # the snapshot is date-stamped


def test_patched_pins_report_nothing_and_pass(capsys, tmp_path):
    req = tmp_path / "requirements.txt"
    req.write_text(PATCHED)
    rc, doc = doctor(capsys, "--requirements", str(req), "--check", "advisories")
    assert (rc, doc["findings"]) == (0, [])


def test_a_clean_environment_reports_nothing_high(capsys, tmp_path):
    req = tmp_path / "requirements.txt"
    req.write_text(PATCHED)
    rc, doc = doctor(capsys, "--requirements", str(req))  # every check family
    assert rc == 0 and not ids(doc, "high")
    assert set(doc["checks"]) == {"advisories", "server", "keys", "privacy"}


def test_ranges_editables_and_bad_lines(capsys, tmp_path):
    (tmp_path / "more.txt").write_text("keras>=3.15.0\n")
    req = tmp_path / "requirements.txt"
    req.write_text(
        "keras>=3\n-e .\n--index-url https://example.invalid/simple\nfoo=1.0\n"
        "cryptography==41.0.0 ; python_version < '3'\n-r more.txt\n-r missing.txt\n"
    )
    rc, doc = doctor(capsys, "--requirements", str(req), "--check", "advisories")
    assert rc == 0  # nothing pinned to a vulnerable version: only low findings
    assert ids(doc) == {"unpinned:keras", "requirements:unparsed"}
    assert ids(doc, "low") == ids(doc)
    bad = [f["evidence"] for f in doc["findings"] if f["id"] == "requirements:unparsed"]
    assert any("foo=1.0" in e for e in bad) and any("missing.txt" in e for e in bad)
    assert any("editable" in n for n in doc["notes"])


def test_missing_or_binary_requirements_file_is_a_usage_error(capsys, tmp_path):
    assert main(["doctor", "--requirements", str(tmp_path / "nope.txt")]) == 2
    err = capsys.readouterr().err
    assert "nope.txt" in err and "Traceback" not in err
    (tmp_path / "blob.txt").write_bytes(bytes(range(256)) * 8)
    assert main(["doctor", "--requirements", str(tmp_path / "blob.txt")]) == 2
    assert "not a" in capsys.readouterr().err


def test_ignore_accepted_findings(capsys, tmp_path):
    req = tmp_path / "requirements.txt"
    req.write_text("cryptography==46.0.4\n")
    rc, doc = doctor(capsys, "-r", str(req), "--check", "advisories")
    assert (rc, ids(doc)) == (1, {"CVE-2026-26007"})
    rc, doc = doctor(capsys, "-r", str(req), "--check", "advisories", "--ignore", "CVE-2026-26007")
    assert (rc, doc["findings"]) == (0, []) and any("ignored" in n for n in doc["notes"])


# -- the Jupyter server and the kernel -------------------------------------------------------


def test_running_server_on_all_interfaces_without_token(capsys, isolated):
    info = {"hostname": "0.0.0.0", "port": 1, "token": "", "password": False, "secure": False}
    runtime = isolated / "runtime"
    (runtime / "jpserver-1.json").write_text(json.dumps({**info, "pid": os.getpid()}))
    rc, doc = doctor(capsys, "--check", "server")
    assert rc == 1
    assert "server:auth-off-exposed" in ids(doc, "high") and "server:no-tls" in ids(doc)
    # The same file from a server that is gone is ignored (and said so).
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], text=True,
                          capture_output=True, check=True)  # fmt: skip
    (runtime / "jpserver-1.json").write_text(json.dumps({**info, "pid": int(dead.stdout)}))
    rc, doc = doctor(capsys, "--check", "server")
    assert (rc, doc["findings"]) == (0, []) and any("stale" in n for n in doc["notes"])


@pytest.mark.skipif(not os.path.exists("/proc/net/tcp"), reason="reads /proc/net (Linux)")
def test_runtime_file_saying_localhost_but_socket_on_all_interfaces(capsys, isolated):
    # With --ip='*' the runtime file says "localhost"; the listening socket tells the truth.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("0.0.0.0", 0))
        sock.listen(1)
        port = sock.getsockname()[1]
        info = {"hostname": "localhost", "port": port, "token": "", "pid": os.getpid()}
        (isolated / "runtime" / "jpserver-2.json").write_text(json.dumps(info))
        rc, doc = doctor(capsys, "--check", "server")
    assert rc == 1 and "server:auth-off-exposed" in ids(doc, "high")
    rc, doc = doctor(capsys, "--check", "server")  # socket closed: only local, auth off
    assert rc == 0 and ids(doc) == {"server:auth-off"}


def test_server_config_files_auth_off_and_any_origin(capsys, isolated):
    cfg = isolated / "jcfg"
    (cfg / "jupyter_server_config.json").write_text(
        json.dumps({"ServerApp": {"ip": "0.0.0.0", "token": "", "allow_origin": "*"}})
    )
    rc, doc = doctor(capsys, "--check", "server")
    assert rc == 1 and {"server:auth-off-exposed", "server:allow-origin-any"} <= ids(doc, "high")
    (cfg / "jupyter_server_config.json").unlink()
    marker = isolated / "executed"
    (cfg / "jupyter_server_config.py").write_text(
        f"import pathlib; pathlib.Path({str(marker)!r}).touch()\n"
        "c.ServerApp.ip = '0.0.0.0'\nc.IdentityProvider.token = ''\n"
    )
    rc, doc = doctor(capsys, "--check", "server")
    assert "server:auth-off-exposed" in ids(doc, "high")
    assert not marker.exists()  # config files are parsed, never run


def test_kernel_connection_file_over_tcp(capsys, isolated):
    conn = isolated / "runtime" / "kernel-abc.json"
    conn.write_text(json.dumps({"transport": "tcp", "ip": "0.0.0.0", "key": "", "shell_port": 1}))
    conn.chmod(0o644)
    rc, doc = doctor(capsys, "--check", "server")
    assert rc == 1
    assert {"kernel:tcp-exposed", "kernel:no-key", "kernel:connection-file-mode"} <= ids(doc)
    local = {"transport": "tcp", "ip": "127.0.0.1", "key": "k" * 32}
    conn.write_text(json.dumps(local))
    conn.chmod(0o600)
    rc, doc = doctor(capsys, "--check", "server")  # ipykernel's own warning, as a low finding
    assert (rc, ids(doc), ids(doc, "low")) == (0, {"kernel:tcp-no-curve"}, {"kernel:tcp-no-curve"})
    conn.write_text(json.dumps({**local, "ip": "0.0.0.0", "curve_secretkey": "s" * 40}))
    rc, doc = doctor(capsys, "--check", "server")  # CurveZMQ: encrypted
    assert (rc, doc["findings"]) == (0, [])
    conn.write_text(json.dumps({**local, "transport": "ipc"}))
    rc, doc = doctor(capsys, "--check", "server")
    assert (rc, doc["findings"]) == (0, [])


# -- keys and secrets ------------------------------------------------------------------------


def test_key_file_readable_by_others(capsys, kp_home):
    keys = kp_home / "keys"
    keys.mkdir(mode=0o700)
    key = keys / "alice.key"
    key.write_text(age.X25519Identity.generate().reveal() + "\n")
    key.chmod(0o644)
    rc, doc = doctor(capsys, "--check", "keys")
    assert rc == 1
    f = next(f for f in doc["findings"] if f["id"] == "keys:file-mode")
    assert f["severity"] == "high" and "0644" in f["evidence"] and f["fix"] == f"chmod 600 {key}"
    key.chmod(0o640)  # group-readable is as bad
    rc, doc = doctor(capsys, "--check", "keys")
    assert rc == 1 and "keys:file-mode" in ids(doc, "high")
    key.chmod(0o600)
    rc, doc = doctor(capsys, "--check", "keys")
    assert (rc, doc["findings"]) == (0, [])


def test_secret_literals_in_a_notebook(capsys, isolated):
    secret = age.X25519Identity.generate().reveal()
    nb = {
        "cells": [
            {"cell_type": "markdown", "source": ["# fine"]},
            {"cell_type": "code", "source": [f'ident = "{secret}"\n'], "outputs": []},
            {"cell_type": "code", "source": 'secure_save(m, "m.age", passphrase="hunter2!")',
             "outputs": []},
        ]
    }  # fmt: skip
    (isolated / "work" / "leak.ipynb").write_text(json.dumps(nb))
    rc = main(["doctor", "--check", "keys"])
    out = capsys.readouterr().out
    assert rc == 1 and secret not in out and "hunter2" not in out
    assert "leak.ipynb cell 2: an age secret key" in out
    assert "leak.ipynb cell 3: a passphrase/password literal" in out


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_key_in_a_git_working_tree(capsys, isolated):
    work = isolated / "work"
    subprocess.run(["git", "init", "-q", str(work)], check=True)
    key = age.X25519Identity.generate().reveal()
    # A key quoted in code or a test vector is not a key file; only key.txt is reported.
    (work / "test_vectors.py").write_text(f'BAD = "%quiet {key}"\n')
    (work / "vector").write_text(f"identity: {key}\n")
    (work / "key.txt").write_text(f"# created: today\n# public key: age1…\n{key}\n")
    rc, doc = doctor(capsys, "--check", "keys")
    (f,) = doc["findings"]
    assert rc == 1 and f["id"] == "keys:key-in-tree" and f["severity"] == "high"
    assert f["evidence"].endswith("key.txt: an age secret key (AGE-SECRET-KEY-1…)")
    (work / ".gitignore").write_text("key.txt\n")
    rc, doc = doctor(capsys, "--check", "keys")
    assert rc == 0 and ids(doc, "medium") == {"keys:key-in-tree"}


def test_secret_in_ipython_history(capsys, isolated):
    db = isolated / "ipython" / "profile_default" / "history.sqlite"
    db.parent.mkdir(parents=True)
    with sqlite3.connect(db) as con:
        con.execute("CREATE TABLE history (session integer, line integer, source text, "
                    "source_raw text)")  # fmt: skip
        con.execute("INSERT INTO history VALUES (1, 1, 'x = 1', 'x = 1')")
        key = age.X25519Identity.generate().reveal()
        con.execute("INSERT INTO history VALUES (1, 2, ?, ?)", (f"k = {key!r}", f"k = {key!r}"))
    con.close()
    rc, doc = doctor(capsys, "--check", "keys")
    f = next(f for f in doc["findings"] if f["id"] == "keys:secret-in-history")
    assert rc == 1 and "session 1 line 2" in f["evidence"] and key not in json.dumps(doc)


# -- privacy hygiene -------------------------------------------------------------------------


def test_ledger_writable_by_others(capsys, kp_home):
    ledger = kp_home / "ledger.sqlite3"
    ledger.write_bytes(b"")
    ledger.chmod(0o666)
    rc, doc = doctor(capsys, "--check", "privacy")
    assert rc == 1 and ids(doc, "high") == {"privacy:ledger-writable"}
    ledger.chmod(0o644)
    rc, doc = doctor(capsys, "--check", "privacy")
    assert rc == 0 and ids(doc, "low") == {"privacy:ledger-readable"}
    ledger.chmod(0o600)
    rc, doc = doctor(capsys, "--check", "privacy")
    assert (rc, doc["findings"]) == (0, [])


def _run(ledger_name):
    from kprivacy_nb.dp.trainer import DPFitResult

    return DPFitResult(
        model=None, history={}, epsilon=1.0, epsilon_curve=None, noise_multiplier=1.0,
        delta=1e-5, steps=10, clipping={}, l2_norm_clip=1.0, batch_size=8, n=80,
        sampling="poisson", accountant="pld", epochs_completed=1, planned_curve=None,
        ledger_name=ledger_name,
    )  # fmt: skip


def test_dp_runs_not_charged_to_a_ledger():
    report = run_checks(checks=["privacy"], user_ns={"run": _run(None), "ok": _run("customers")})
    (f,) = report.findings
    assert f.id == "privacy:run-not-charged" and f.evidence == "variables: run"


# -- the magic -------------------------------------------------------------------------------


def test_kp_doctor_magic(ip, tmp_path):
    (tmp_path / "work" / "req.txt").write_text("keras==3.8.0\n")
    report = ip.run_line_magic("kp_doctor", "--requirements req.txt --check advisories")
    high = [f for f in report.findings if f.severity == "high"]
    assert "CVE-2025-1550" in {f.id for f in high} and report.has_high
    assert "CVE-2025-1550" in repr(report)
    html = report._repr_html_()
    assert html.count("<details") == len(report.findings) and "#c0392b" in html
    text = ip.run_line_magic("kp_doctor", "--requirements req.txt --check advisories --json")
    assert "CVE-2025-1550" in {f["id"] for f in json.loads(str(text))["findings"]}
    ip.user_ns["run"] = _run(None)
    report = ip.run_line_magic("kp_doctor", "--check privacy")
    assert [f.id for f in report.findings] == ["privacy:run-not-charged"]
    doc = ip.find_line_magic("kp_doctor").__doc__
    assert "Example" in doc and "%kp_doctor" in doc


def test_kp_doctor_bad_usage_is_a_usage_error(ip):
    from IPython.core.error import UsageError

    with pytest.raises(UsageError, match="does not exist"):
        ip.run_line_magic("kp_doctor", "--requirements nope.txt")


# -- the snapshot refresh tool ---------------------------------------------------------------


def _refresh_tool():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "tools" / "refresh_advisories.py"
    spec = importlib.util.spec_from_file_location("refresh_advisories", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_refresh_tool_turns_osv_records_into_a_snapshot(tmp_path, capsys):
    import zipfile

    from packaging.version import Version

    from kprivacy_nb.doctor.advisories import Pin, _parse_snapshot, findings_for

    def rec(id_, aliases, sev=None, **extra):
        events = [{"introduced": "3.0.0"}, {"fixed": "3.9.0"}]
        return {
            "id": id_, "aliases": aliases, "modified": "2026-01-01T00:00:00Z",
            "summary": "safe_mode bypass",
            "database_specific": {"severity": sev} if sev else {},
            "affected": [{"package": {"ecosystem": "PyPI", "name": "Keras"},
                          "ranges": [{"type": "ECOSYSTEM", "events": events}]}],
            **extra,
        }  # fmt: skip

    records = [
        rec("PYSEC-2025-1", ["CVE-2025-1550"]),
        rec("GHSA-48g7-3x6r-xfhp", ["CVE-2025-1550"], "HIGH"),
        rec("GHSA-gone-gone-gone", ["CVE-2000-1"], "HIGH", withdrawn="2026-01-02T00:00:00Z"),
        {**rec("GHSA-othr-othr-othr", []), "affected": [{"package": {"ecosystem": "PyPI",
         "name": "unrelated"}, "ranges": [{"type": "ECOSYSTEM", "events": []}]}]},
    ]  # fmt: skip
    archive = tmp_path / "all.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for r in records:
            zf.writestr(f"{r['id']}.json", json.dumps(r))
    out = tmp_path / "advisories.json"
    assert _refresh_tool().main(["--from-zip", str(archive), "--output", str(out)]) == 0
    doc = json.loads(out.read_text())
    (entry,) = doc["advisories"]
    assert entry["id"] == "GHSA-48g7-3x6r-xfhp" and entry["severity"] == "high"
    assert set(entry["aliases"]) == {"CVE-2025-1550", "PYSEC-2025-1"}
    snap = _parse_snapshot(doc)
    hit = findings_for(Pin("keras", Version("3.8.0"), None, "test"), snap)
    assert [f.id for f in hit] == ["CVE-2025-1550"]
    assert findings_for(Pin("keras", Version("3.9.0"), None, "test"), snap) == []


def test_bundled_snapshot_is_dated_sourced_and_parseable():
    import datetime as dt

    from packaging.version import Version

    from kprivacy_nb.doctor.advisories import load_snapshot

    snap = load_snapshot()
    dt.date.fromisoformat(snap.date)
    assert {"keras", "cryptography", "jupyter-server"} <= {a.package for a in snap.advisories}
    for a in snap.advisories:
        assert a.source and a.references and a.severity in ("high", "medium", "low"), a.id
        for r in a.ranges:
            for key in ("introduced", "fixed", "last_affected"):
                if r.get(key, "0") != "0":
                    Version(r[key])


def test_online_merges_pip_audit_without_duplicates(capsys, tmp_path, monkeypatch):
    import importlib.util

    if importlib.util.find_spec("pip_audit") is not None:
        pytest.skip("a real pip-audit is installed; this test fakes it")
    report = {
        "dependencies": [{"name": "keras", "version": "3.8.0", "vulns": [
            {"id": "GHSA-48g7-3x6r-xfhp", "aliases": ["CVE-2025-1550"], "fix_versions": ["3.9.0"],
             "description": "known to the snapshot"},
            {"id": "PYSEC-2099-1", "aliases": ["CVE-2099-0001"], "fix_versions": ["3.10.0", "3.9.1"],
             "description": "only pip-audit knows"},
        ]}]
    }  # fmt: skip
    bindir = tmp_path / "bin"
    bindir.mkdir()
    fake = bindir / "pip-audit"
    fake.write_text(f"#!/bin/sh\necho \"$@\" > {tmp_path / 'args'}\ncat <<'EOF'\n"
                    f"{json.dumps(report)}\nEOF\n")  # fmt: skip
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    req = tmp_path / "requirements.txt"
    req.write_text("keras==3.8.0\n")
    rc, doc = doctor(capsys, "-r", str(req), "--check", "advisories", "--online")
    assert [f["id"] for f in doc["findings"]].count("CVE-2025-1550") == 1
    new = next(f for f in doc["findings"] if f["id"] == "CVE-2099-0001")
    assert new["fix"] == 'pip install "keras>=3.9.1"' and "pip-audit" in new["evidence"]
    assert f"-r {req}" in (tmp_path / "args").read_text()


# -- hostile inputs: never hang, never crash, never print the secret ---------------------------


def _doctor_subprocess(*argv: str, cwd, timeout: float = 90) -> subprocess.CompletedProcess:
    """The CLI in a child process with a deadline (a hang fails the test instead of the run)."""
    return subprocess.run(
        [sys.executable, "-m", "kprivacy_nb", "doctor", "--json", *argv],
        cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False,
    )  # fmt: skip


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_fifo_and_device_notebooks_and_symlink_loops_do_not_hang_or_crash(isolated):
    work = isolated / "work"
    os.mkfifo(work / "pipe.ipynb")  # open() would block forever
    os.mkfifo(work / "pipe.key")
    (work / "zero.ipynb").symlink_to("/dev/zero")  # read() would never end
    (work / "loop1").symlink_to("loop2")
    (work / "loop2").symlink_to("loop1")  # Path.resolve() raises RuntimeError
    (work / "up").symlink_to(".")
    (work / "bad.ipynb").write_text('{"cells": [')
    (work / "list.ipynb").write_text("[1, 2]")
    (work / "deep.ipynb").write_text("[" * 100_000 + "]" * 100_000)
    r = _doctor_subprocess("--check", "keys", "--check", "server", cwd=work)
    assert "Traceback" not in r.stderr, r.stderr
    assert r.returncode == 0 and json.loads(r.stdout.splitlines()[-1])["findings"] == []


def test_fifo_in_the_runtime_folder_does_not_hang(isolated):
    if not hasattr(os, "mkfifo"):
        pytest.skip("needs FIFOs")
    os.mkfifo(isolated / "runtime" / "jpserver-1.json")
    os.mkfifo(isolated / "runtime" / "kernel-1.json")
    os.mkfifo(isolated / "jcfg" / "jupyter_server_config.json")
    r = _doctor_subprocess("--check", "server", cwd=isolated / "work", timeout=60)
    assert r.returncode == 0 and "Traceback" not in r.stderr


def test_secrets_in_a_broken_or_oversized_notebook_are_still_found(capsys, isolated, monkeypatch):
    from kprivacy_nb.doctor import keys

    secret = age.X25519Identity.generate().reveal()
    work = isolated / "work"
    (work / "broken.ipynb").write_text('{"cells": [{"source": "k = \'' + secret + "'")
    big = {"cells": [{"cell_type": "code", "source": "x", "outputs": []}] * 200 + [
        {"cell_type": "code", "source": f"k = {secret!r}", "outputs": []}]}  # fmt: skip
    (work / "big.ipynb").write_text(json.dumps(big))
    monkeypatch.setattr(keys, "_MAX_NOTEBOOK", 2000)
    rc, doc = doctor(capsys, "--check", "keys")
    ev = sorted(f["evidence"] for f in doc["findings"] if f["id"] == "keys:secret-in-notebook")
    assert rc == 1 and len(ev) == 2 and secret not in json.dumps(doc)
    assert "big.ipynb (too large to read cell by cell): an age secret key" in ev[0]
    assert "broken.ipynb (not valid notebook JSON): an age secret key" in ev[1]


def test_more_passphrase_literal_spellings_are_found(capsys, isolated):
    leaks = [
        "PASSPHRASE = 'correct horse battery'",
        "db_password = 'correct horse battery'",
        "os.environ['KP_PASSPHRASE'] = 'correct horse battery'",
        "secure_save(m, 'm.age', passphrase=b'correct horse battery')",
        "cfg = {'password': 'correct horse battery'}",
    ]
    fine = [
        "secure_save(m, 'm.age', passphrase_env='KP_PASSPHRASE')",
        "if password == 'correct horse battery': pass",
        "passphrase = getpass('passphrase: ')",
        "passphrase = ''",
    ]
    cells = [{"cell_type": "code", "source": src, "outputs": []} for src in leaks + fine]
    (isolated / "work" / "nb.ipynb").write_text(json.dumps({"cells": cells}))
    rc, doc = doctor(capsys, "--check", "keys")
    ev = {f["evidence"].rsplit(" cell ", 1)[1].split(":")[0] for f in doc["findings"]}
    assert rc == 1 and ev == {str(i) for i in range(1, len(leaks) + 1)}
    assert "correct horse" not in json.dumps(doc)


def test_unreadable_keys_folder_is_a_finding_not_a_traceback(capsys, kp_home, monkeypatch):
    from pathlib import Path

    keys = kp_home / "keys"
    keys.mkdir(mode=0o700)
    real = Path.iterdir

    def deny(self):
        if self == keys:
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "iterdir", deny)
    rc, doc = doctor(capsys, "--check", "keys")
    assert (rc, ids(doc)) == (0, {"keys:folder-unreadable"})


def test_history_in_a_folder_whose_name_is_not_uri_safe(capsys, isolated, monkeypatch):
    db = isolated / "odd#dir?x" / "history.sqlite"
    db.parent.mkdir()
    with sqlite3.connect(db) as con:
        con.execute("CREATE TABLE history (session integer, line integer, source text, "
                    "source_raw text)")  # fmt: skip
        con.executemany(
            "INSERT INTO history VALUES (1, ?, 'x', ?)",
            [(i, f"model.fit(x, y)  # run {i}") for i in range(1, 5000)],
        )
        con.execute("INSERT INTO history VALUES (2, 1, 'x', 'Passphrase = \"hunter2hunter2\"')")
    con.close()
    from kprivacy_nb.doctor import run_checks

    report = run_checks(checks=["keys"], history_file=db)
    (f,) = [f for f in report.findings if f.id == "keys:secret-in-history"]
    assert "session 2 line 1" in f.evidence and "hunter2" not in repr(report)


def test_requirements_include_loops_are_read_once(capsys, tmp_path):
    req = tmp_path / "requirements.txt"
    (tmp_path / "other.txt").write_text("-r requirements.txt\ncryptography==41.0.0\n")
    req.write_text("keras==3.8.0\n" + "-r requirements.txt\n-r ./other.txt\n" * 3)
    rc, doc = doctor(capsys, "-r", str(req), "--check", "advisories")
    found = [(f["id"], f["evidence"]) for f in doc["findings"]]
    assert rc == 1 and len(found) == len(set(found))
    assert {"CVE-2025-1550", "CVE-2024-26130"} <= ids(doc, "high")
    assert "requirements:unparsed" not in ids(doc)


def test_huge_requirements_file_is_a_usage_error(capsys, tmp_path):
    req = tmp_path / "requirements.txt"
    req.write_text("numpy>=1\n" * 600_000)
    assert main(["doctor", "-r", str(req), "--check", "advisories"]) == 2
    assert "larger than" in capsys.readouterr().err


def test_a_range_that_excludes_every_fix_is_as_bad_as_a_pin(capsys, tmp_path):
    req = tmp_path / "requirements.txt"
    req.write_text(
        'keras>=3,<3.9\ncryptography~=41.0\njupyterlab==4.0.*\nnotebook>=7 ; extra == "x"\n'
    )
    rc, doc = doctor(capsys, "-r", str(req), "--check", "advisories")
    assert rc == 1
    assert {"CVE-2025-1550", "CVE-2024-26130", "CVE-2024-43805"} <= ids(doc, "high")
    f = next(f for f in doc["findings"] if f["id"] == "CVE-2025-1550")
    assert (
        "every version it allows is affected" in f["title"]
        and f["fix"] == 'require "keras>=3.15.0"'
    )
    # jupyterlab 4.0.11+ closes CVE-2024-22420: that one stays a low "range" finding.
    assert "unpinned:jupyterlab" in ids(doc, "low")
    assert any("marker" in n and "notebook" in n for n in doc["notes"])


def test_packages_the_snapshot_does_not_cover_are_said_to_be_unchecked(capsys, tmp_path):
    req = tmp_path / "requirements.txt"
    req.write_text("tensorflow==2.12.0\nprotobuf==3.20.0\nkeras==3.15.0\n")
    rc, doc = doctor(capsys, "-r", str(req), "--check", "advisories")
    (note,) = [n for n in doc["notes"] if "no entries for" in n]
    assert rc == 0 and "protobuf, tensorflow" in note and "keras" not in note


@pytest.mark.skipif(not os.path.exists("/proc/self/cmdline"), reason="reads /proc (Linux)")
def test_running_server_options_given_on_the_command_line(capsys, isolated):
    # allow_origin / disable_check_xsrf passed as options are not in the runtime file.
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)",
                             "--ServerApp.allow_origin=*", "--ServerApp.disable_check_xsrf",
                             "True"])  # fmt: skip
    try:
        info = {"hostname": "localhost", "port": 1, "token": "t" * 48, "pid": proc.pid}
        (isolated / "runtime" / "jpserver-9.json").write_text(json.dumps(info))
        (isolated / "runtime" / "jpserver-9.json").chmod(0o600)
        rc, doc = doctor(capsys, "--check", "server")
    finally:
        proc.kill()
        proc.wait()
    assert rc == 0 and ids(doc) == {"server:allow-origin-any", "server:xsrf-off"}


@pytest.mark.skipif(not os.path.exists("/proc/net/tcp"), reason="reads /proc/net (Linux)")
def test_kernel_file_left_by_a_dead_kernel_is_ignored(capsys, isolated):
    ports = dict.fromkeys(("shell_port", "iopub_port", "stdin_port", "control_port", "hb_port"), 1)
    conn = isolated / "runtime" / "kernel-dead.json"
    conn.write_text(json.dumps({"transport": "tcp", "ip": "0.0.0.0", "key": "k" * 32, **ports}))
    conn.chmod(0o600)
    rc, doc = doctor(capsys, "--check", "server")
    assert (rc, doc["findings"]) == (0, []) and any("kernel-dead.json" in n for n in doc["notes"])
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("0.0.0.0", 0))
        sock.listen(1)
        conn.write_text(json.dumps({"transport": "tcp", "ip": "0.0.0.0", "key": "k" * 32,
                                    **ports, "hb_port": sock.getsockname()[1]}))  # fmt: skip
        rc, doc = doctor(capsys, "--check", "server")
    assert rc == 1 and ids(doc) == {"kernel:tcp-exposed"}
    # A kernel on another machine: nothing local can tell it is gone, so it is reported.
    conn.write_text(json.dumps({"transport": "tcp", "ip": "10.1.2.3", "key": "k" * 32, **ports}))
    rc, doc = doctor(capsys, "--check", "server")
    assert rc == 1 and ids(doc) == {"kernel:tcp-exposed"}


@pytest.mark.parametrize(
    ("package", "affected", "fixed", "cve"),
    [
        # unanchored allow_origin_pat: 2.17.0 and earlier, fixed in 2.18.0
        ("jupyter-server", "2.17.0", "2.18.0", "CVE-2026-40110"),
        # token leak: < 3.6.7 and 4.0.0 <= v < 4.0.11 (PYSEC-2026-2534)
        ("jupyterlab", "3.6.6", "3.6.8", "CVE-2024-22421"),
    ],
)
def test_jupyter_advisories_are_in_the_snapshot(capsys, tmp_path, package, affected, fixed, cve):
    req = tmp_path / "requirements.txt"
    req.write_text(f"{package}=={affected}\n")
    rc, doc = doctor(capsys, "-r", str(req), "--check", "advisories")
    assert rc == 1 and cve in ids(doc, "high")
    req.write_text(f"{package}=={fixed}\n")
    rc, doc = doctor(capsys, "-r", str(req), "--check", "advisories")
    assert cve not in ids(doc)
