"""Encrypted bundles: export_bundle/load_bundle, %secure_export, the export panel, and
%%secure_output / %secure_show (shell level; the kernel-level check is in test_kernel_export)."""

from __future__ import annotations

import io
import json
import os
import stat
import traceback

import numpy as np
import pyrage
import pytest
from IPython.core.error import UsageError

from kprivacy_nb import secure_load
from kprivacy_nb.crypto.bundle import (
    OUTPUTS_MIME,
    Bundle,
    decrypt_outputs,
    encrypt_outputs,
    export_bundle,
    load_bundle,
)
from kprivacy_nb.crypto.container import ContainerReader
from kprivacy_nb.crypto.keys import generate_identity
from kprivacy_nb.crypto.signing import generate_signing_key
from kprivacy_nb.errors import FileExistsRefusedError, InvalidParameterError, SerializationError
from kprivacy_nb.widgets.export import ExportPanel, exportable_items


@pytest.fixture
def alice(kp_home):
    return generate_identity("alice")


@pytest.fixture
def signer(kp_home):
    return generate_signing_key("me")


def identity_text(key) -> str:
    lines = [ln for ln in key.path.read_text().splitlines() if ln and not ln.startswith("#")]
    return lines[0]


@pytest.fixture(scope="module")
def model():
    import keras

    m = keras.Sequential(
        [keras.Input((5,)), keras.layers.Dense(4, activation="relu"), keras.layers.Dense(2)]
    )
    m.build((None, 5))
    return m


def test_bundle_round_trip_is_lazy_and_verified(tmp_path, alice, signer, model):
    x = np.random.default_rng(0).normal(size=(7, 5)).astype("float32")
    out = tmp_path / "share.age"
    res = export_bundle({"model": model, "X_test": x}, out, recipients=["alice"], sign_with="me")
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert res.size == out.stat().st_size and len(res.sha256) == 64
    assert [e[0] for e in res.entries] == ["model", "X_test"]
    assert res.recipients == (alice.public,)
    bundle = load_bundle(out, identities=[alice.path], verify_with="me")
    assert isinstance(bundle, Bundle) and set(bundle) == {"model", "X_test"}
    assert bundle._cache == {}  # nothing deserialised yet
    np.testing.assert_array_equal(bundle["X_test"], x)
    assert "model" not in bundle._cache
    np.testing.assert_allclose(bundle["model"].predict(x, verbose=0), model.predict(x, verbose=0))
    # secure_load on a multi-entry file returns the same kind of bundle
    again = secure_load(out, identities=[alice.path], verify_with="me")
    assert isinstance(again, Bundle)


def test_bundle_opens_with_an_independent_age_implementation(tmp_path, alice):
    out = tmp_path / "share.age"
    export_bundle({"a": np.arange(3), "b": np.ones((2, 2))}, out, recipients=[alice.public])
    ident = pyrage.x25519.Identity.from_str(identity_text(alice))
    plain = pyrage.decrypt(out.read_bytes(), [ident])
    reader = ContainerReader(io.BytesIO(plain))
    assert [e["name"] for e in reader.entries] == ["a", "b"]
    assert reader.manifest["metadata"]["kind"] == "bundle"


def test_unserialisable_item_exports_nothing(tmp_path, alice):
    out = tmp_path / "share.age"

    class Opaque:
        pass

    with pytest.raises(SerializationError, match="weird"):
        export_bundle({"ok": np.arange(3), "weird": Opaque()}, out, recipients=["alice"])
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_existing_file_is_kept_without_force(tmp_path, alice):
    out = tmp_path / "share.age"
    out.write_bytes(b"old")
    with pytest.raises(FileExistsRefusedError):
        export_bundle({"a": np.arange(3)}, out, recipients=["alice"])
    assert out.read_bytes() == b"old"
    export_bundle({"a": np.arange(3)}, out, recipients=["alice"], force=True)
    assert out.read_bytes() != b"old"


def test_bad_targets_and_no_recipients(tmp_path, alice, monkeypatch):
    with pytest.raises(InvalidParameterError, match="recipients|passphrase"):
        export_bundle({"a": np.arange(3)}, tmp_path / "x.age")
    with pytest.raises(InvalidParameterError, match="folder .* does not exist"):
        export_bundle({"a": np.arange(3)}, tmp_path / "missing" / "x.age", recipients=["alice"])
    plain_file = tmp_path / "plain.txt"  # a path under a regular file: unwritable, even for root
    plain_file.write_text("x")
    with pytest.raises(InvalidParameterError, match="does not exist"):
        export_bundle({"a": np.arange(3)}, plain_file / "x.age", recipients=["alice"])
    ro = tmp_path / "ro"
    ro.mkdir()
    real_access = os.access
    monkeypatch.setattr(  # CI runs as root, who may write anywhere: simulate a read-only folder
        os, "access", lambda p, mode, **kw: False if str(p) == str(ro) else real_access(p, mode)
    )
    with pytest.raises(InvalidParameterError, match="not writable"):
        export_bundle({"a": np.arange(3)}, ro / "x.age", recipients=["alice"])
    assert os.listdir(ro) == [] and sorted(os.listdir(tmp_path)) == ["plain.txt", "ro"]


def test_notebook_entry_can_drop_outputs_and_widget_state(tmp_path, alice):
    nb = {
        "cells": [
            {
                "cell_type": "code",
                "source": "x",
                "execution_count": 1,
                "metadata": {},
                "outputs": [{"output_type": "stream", "name": "stdout", "text": "SECRET-OUT"}],
            }
        ],
        "metadata": {"widgets": {"state": {"SECRET-WIDGET": 1}}},
        "nbformat": 4,
        "nbformat_minor": 5,
    }
    path = tmp_path / "analysis.ipynb"
    path.write_text(json.dumps(nb))
    out = tmp_path / "nb.age"
    export_bundle(
        {}, out, recipients=["alice"], notebook=path, strip_outputs=True, clear_widget_state=True
    )
    saved = load_bundle(out, identities=[alice.path])["analysis.ipynb"]
    assert b"SECRET-OUT" not in saved.data and b"SECRET-WIDGET" not in saved.data
    assert json.loads(saved.data)["cells"][0]["source"] == "x"
    out2 = tmp_path / "nb2.age"
    export_bundle({}, out2, recipients=["alice"], notebook=path)
    assert b"SECRET-OUT" in load_bundle(out2, identities=[alice.path])["analysis.ipynb"].data


def test_panel_lists_exportables_and_exports_with_a_click(tmp_path, alice, signer, model):
    x = np.arange(12.0).reshape(3, 4)
    ns = {"model": model, "X": x, "n": 3, "text": "hello", "_hidden": x, "np": np}
    assert exportable_items(ns) == {"X": "numpy.ndarray", "model": "keras.model"}
    panel = ExportPanel(ns, output=str(tmp_path / "panel.age"))
    assert set(panel.items) == {"X", "model"}
    panel.items["X"].value = True
    panel.items["model"].value = True
    panel.pasted.value = alice.public
    panel.sign_with.value = "me"
    panel.export_button.click()
    assert panel.error is None, panel.error
    out = tmp_path / "panel.age"
    assert panel.result.path == out and "sha256" in panel.status.value
    assert panel.progress.value == 1.0
    plain = pyrage.decrypt(
        out.read_bytes(), [pyrage.x25519.Identity.from_str(identity_text(alice))]
    )
    assert b"kprivacy-nb container" in plain[:40]
    bundle = load_bundle(out, identities=[alice.path], verify_with="me")
    np.testing.assert_array_equal(bundle["X"], x)
    probe = np.ones((2, 5), dtype="float32")
    np.testing.assert_allclose(
        bundle["model"].predict(probe, verbose=0), model.predict(probe, verbose=0)
    )


def test_panel_shows_errors_and_writes_nothing(tmp_path, alice):
    ns = {"X": np.arange(3)}
    out = tmp_path / "p.age"
    panel = ExportPanel(ns, output=str(out))
    panel.items["X"].value = True
    panel.export_button.click()  # no recipients
    assert "no recipients" in panel.error and "Export failed" in panel.status.value
    assert not out.exists()
    out.write_bytes(b"old")
    panel.named.value = ("alice",)
    panel.export_button.click()  # exists, overwrite not ticked
    assert "exists" in panel.error and out.read_bytes() == b"old"
    panel.overwrite.value = True
    panel.export_button.click()
    assert panel.error is None and out.read_bytes() != b"old"


def test_widget_state_holds_no_secret(tmp_path, alice, monkeypatch):
    monkeypatch.setenv("EXPORT_PASS", "correct horse battery staple")
    panel = ExportPanel({"X": np.arange(3)}, output=str(tmp_path / "p.age"))
    panel.items["X"].value = True
    panel.passphrase_env.value = "EXPORT_PASS"
    panel.export_button.click()
    assert panel.error is None, panel.error
    state = json.dumps([c.get_state() for c in panel.children], default=str)
    assert "correct horse" not in state
    assert (
        load_bundle(tmp_path / "p.age", passphrase="correct horse battery staple")["X"].sum() == 3
    )


def test_encrypted_outputs_round_trip(alice):
    outputs = [{"output_type": "stream", "name": "stdout", "text": "MARKER\n"}]
    armored, shown = encrypt_outputs(outputs, recipients=["alice"])
    assert armored.startswith("-----BEGIN AGE ENCRYPTED FILE-----") and "MARKER" not in armored
    assert shown == (alice.public,)
    assert decrypt_outputs(armored, identities=[alice.path]) == outputs


def test_secure_output_and_show_in_a_shell(ip, alice, capsys):
    ip.user_ns["secret_rows"] = "PATIENT-1234"
    ip.run_cell(
        "%%secure_output --to alice\nprint('MARKER-PRINT')\nsecret_rows", store_history=True
    )
    shown = capsys.readouterr().out
    assert "encrypted output — 2 item(s) for alice" in shown
    assert "MARKER-PRINT" not in shown and "PATIENT-1234" not in shown
    assert not any("PATIENT-1234" in repr(v) for v in ip.user_ns["Out"].values())
    assert "PATIENT-1234" not in repr(ip.user_ns.get("_"))
    magics = ip.magics_manager.registry["ExportMagics"]
    (armored,) = magics.blobs.values()
    texts = [
        o.get("text", "") + json.dumps(o.get("data", {}))
        for o in decrypt_outputs(armored, identities=[alice.path])
    ]
    assert any("MARKER-PRINT" in t for t in texts) and any("PATIENT-1234" in t for t in texts)
    ip.run_line_magic("secure_show", f"-i {alice.path} --for 0")
    assert "PATIENT-1234" in capsys.readouterr().out


def test_secure_output_needs_recipients_and_encrypts_the_traceback(ip, alice, capsys):
    res = ip.run_cell("%%secure_output\nprint(1)")
    assert "-r NAME" in str(res.error_in_exec)
    capsys.readouterr()
    res = ip.run_cell("%%secure_output --to alice\nprint('ROW-' + str(6 * 7))\n1/0")
    seen = capsys.readouterr()
    shown = seen.out + seen.err
    assert "the cell raised ZeroDivisionError; traceback encrypted" in shown
    assert "Traceback" not in shown and "1/0" not in shown  # only the one-line note
    assert "ROW-42" not in shown and "encrypted output — 2 item(s) for alice" in shown
    assert res.error_in_exec is not None  # the cell still fails (Run All stops here)
    ip.run_line_magic("secure_show", f"-i {alice.path} --for 0")
    revealed = capsys.readouterr().out
    assert "ROW-42" in revealed and "ZeroDivisionError" in revealed and "1/0" in revealed


def test_secure_export_line_magic(ip, tmp_path, alice):
    ip.user_ns["X_test"] = np.arange(6)
    out = tmp_path / "line.age"
    res = ip.run_line_magic("secure_export", f"X_test -o {out} --to alice")
    assert res.path == out and load_bundle(out, identities=[alice.path])["X_test"].sum() == 15
    panel = ip.run_line_magic("secure_export", "")
    assert isinstance(panel, ExportPanel) and "X_test" in panel.items


def test_secure_show_finds_a_blob_in_a_saved_notebook_by_id(ip, alice, tmp_path, capsys):
    armored, _ = encrypt_outputs(
        [{"output_type": "stream", "name": "stdout", "text": "FROM-THE-FILE\n"}],
        recipients=["alice"],
    )
    placeholder = {
        "output_type": "display_data",
        "data": {"text/plain": "🔒", OUTPUTS_MIME: armored},
        "metadata": {"kprivacy_nb": {"id": "abcd1234"}},
    }
    cell = {"cell_type": "code", "source": "", "metadata": {}, "outputs": [placeholder]}
    nb = tmp_path / "saved.ipynb"
    nb.write_text(json.dumps({"cells": [cell], "metadata": {}, "nbformat": 4}))
    ip.run_line_magic("secure_show", f"abcd1234 --notebook {nb} -i {alice.path} --for 0")
    assert "FROM-THE-FILE" in capsys.readouterr().out
    with pytest.raises(UsageError, match="no encrypted output ffff0000 found"):
        ip.run_line_magic("secure_show", f"ffff0000 --notebook {nb} -i {alice.path}")


def test_outputs_any_cell_can_display_are_encrypted(alice):
    """Whatever ipykernel accepts from a cell (bytes, sets, odd keys, objects) goes into the
    blob: binary data as base64 as Jupyter sends it, the rest as JSON or a one-line note."""
    loop: list = []
    loop.append(loop)
    outputs = [
        {
            "output_type": "display_data",
            "data": {"image/png": b"\x89PNG", "application/json": {"s": {3}, (1, 2): "t"}},
            "metadata": {"loop": loop, "obj": object(), "bad": "\ud800"},
        }
    ]
    armored, _ = encrypt_outputs(outputs, recipients=["alice"])
    (back,) = decrypt_outputs(armored, identities=[alice.path])
    assert back["data"]["image/png"] == "iVBORw=="
    assert back["data"]["application/json"]["s"] == [3]
    assert list(back["data"]["application/json"]) == [
        "s",
        "[kprivacy_nb: tuple value dropped: not a string key]",
    ]
    assert "contains itself" in json.dumps(back["metadata"]["loop"])
    assert "object value dropped" in back["metadata"]["obj"] and back["metadata"]["bad"] == "?"


def test_a_failure_to_encrypt_outputs_leaves_no_plaintext_in_the_traceback(alice, monkeypatch):
    """``%xmode Verbose`` prints every frame's locals: the error must come from frames that no
    longer hold the outputs, with no chained exception whose frames do."""
    from kprivacy_nb.crypto import bundle

    def broken(*_a, **_k):
        raise RuntimeError("deep in the crypto")

    monkeypatch.setattr(bundle.age, "EncryptWriter", broken)
    marker = "LOCALS-" + "LEAK"
    with pytest.raises(Exception) as caught:  # noqa: PT011 - which one is part of the check
        encrypt_outputs(
            [{"output_type": "stream", "name": "stdout", "text": marker}], recipients=["alice"]
        )
    error = caught.value
    frames = [frame for frame, _ in traceback.walk_tb(error.__traceback__)][1:]  # not this test
    assert frames and not [f for f in frames if marker in repr(f.f_locals)]
    assert error.__context__ is None and error.__cause__ is None
    assert isinstance(error, SerializationError)
    assert "discarded, not shown" in str(error) and "\n" not in str(error)
