"""``%secure_keygen``, ``%secure_save``, ``%secure_load`` in a real IPython shell."""

from __future__ import annotations

import numpy as np
import pytest
from IPython.core.error import UsageError

from kprivacy_nb.crypto import age
from kprivacy_nb.secrets import REGISTRY


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    # Notebook lines use short relative paths (pytest's long tmp paths trip the secret detector).
    monkeypatch.chdir(tmp_path)


def test_keygen_save_load_with_signature(ip, kp_home, tmp_path):
    res = ip.run_line_magic("secure_keygen", "alice")
    assert res.public.startswith("age1") and "AGE-SECRET-KEY" not in repr(res) + res._repr_html_()
    assert (kp_home / "keys" / "alice.key").stat().st_mode & 0o777 == 0o600
    sig = ip.run_line_magic("secure_keygen", "me --signing")
    assert sig.public.startswith("kppub1")
    ip.user_ns["weights"] = np.linspace(0, 1, 7)
    path = "w.age"
    saved = ip.run_line_magic("secure_save", f"weights {path} --to alice --sign-with me")
    assert saved.signed_by == sig.public and "w.age" in saved._repr_html_()
    assert (tmp_path / path).stat().st_mode & 0o777 == 0o600
    loaded = ip.run_line_magic("secure_load", f"{path} -o w2 --verify-with me")
    assert np.array_equal(ip.user_ns["w2"], np.linspace(0, 1, 7))
    assert "verified" in repr(loaded)
    with pytest.raises(UsageError, match="exists"):
        ip.run_line_magic("secure_save", f"weights {path} --to alice")
    ip.run_line_magic("secure_save", f"weights {path} --to alice --force")
    with pytest.raises(UsageError, match="not signed"):
        ip.run_line_magic("secure_load", f"{path} -o w3 --verify-with me")
    assert "w3" not in ip.user_ns


def test_wrong_key_is_a_one_line_usage_error(ip, tmp_path):
    ip.run_line_magic("secure_keygen", "alice")
    ip.run_line_magic("secure_keygen", "bob")
    ip.user_ns["blob"] = b"abc"
    path = "b.age"
    ip.run_line_magic("secure_save", f"blob {path} --to alice")
    with pytest.raises(UsageError, match="no identity matches"):
        ip.run_line_magic("secure_load", f"{path} -i bob")


def test_secrets_on_the_line_are_refused(ip, tmp_path):
    ip.user_ns["blob"] = b"abc"
    key = age.X25519Identity.generate().reveal()
    with pytest.raises(UsageError, match="Secrets never go on a magic line"):
        ip.run_line_magic("secure_load", f"x.age -i {key}")
    with pytest.raises(UsageError, match="literal value"):
        ip.run_line_magic("secure_save", "blob x.age --passphrase hunter2hunter2")
    assert not (tmp_path / "x.age").exists()


def test_a_short_passphrase_is_refused_and_never_masks_ordinary_output(
    ip, tmp_path, capsys, monkeypatch
):
    # "1234" was accepted, then masked everywhere: "order 1234 shipped" printed as
    # "order *** shipped", which both corrupted the output and pointed at the passphrase.
    ip.user_ns["blob"] = b"abc"
    monkeypatch.setenv("SHORT_PASS", "1234")
    try:
        with pytest.raises(UsageError, match="at least 10 characters"):
            ip.run_line_magic("secure_save", "blob x.age --passphrase-env SHORT_PASS")
        assert not (tmp_path / "x.age").exists()
        ip.run_cell('print("order 1234 shipped; total 12345")')
        assert "order 1234 shipped; total 12345" in capsys.readouterr().out
    finally:
        REGISTRY.forget_all()


@pytest.mark.slow
def test_passphrase_from_env_and_folder(ip, tmp_path, monkeypatch):
    monkeypatch.setenv("NB_PASS", "a long passphrase for tests")
    folder = tmp_path / "results"  # created here, referred to as results/
    folder.mkdir()
    (folder / "metrics.json").write_text('{"acc": 0.9}')
    path = "r.age"
    saved = ip.run_line_magic("secure_save", f"--path results {path} --passphrase-env NB_PASS")
    assert saved.recipients == ("passphrase (scrypt)",)
    assert "a long passphrase" not in repr(saved) + saved._repr_html_()
    ip.run_line_magic("secure_load", f"{path} -o restored --passphrase-env NB_PASS")
    assert ip.user_ns["restored"].files == {"results/metrics.json": b'{"acc": 0.9}'}


def test_help_has_examples(ip):
    for name in ("secure_save", "secure_load", "secure_keygen"):
        doc = ip.find_line_magic(name).__doc__
        assert "Example" in doc and f"%{name}" in doc
