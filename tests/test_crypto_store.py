"""secure_save / secure_load: serialisers, signatures, safe loading, atomic 0600 writes."""

from __future__ import annotations

import hashlib
import io
import json
import os
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest

from kprivacy_nb import errors
from kprivacy_nb.crypto import age, container, keys, serializers, signing, store
from kprivacy_nb.crypto.container import ContainerReader, Entry, write_container
from kprivacy_nb.crypto.envelope import open_container
from kprivacy_nb.crypto.store import secure_load, secure_save


@pytest.fixture
def alice(kp_home):
    res = keys.generate_identity("alice")
    return res


@pytest.fixture
def me(kp_home):
    return signing.generate_signing_key("me")


def test_numpy_round_trip_default_identity_and_modes(alice, tmp_path):
    arr = np.arange(12, dtype=np.float32).reshape(3, 4)
    res = secure_save(arr, tmp_path / "a.age", recipients="alice")
    assert res.type == "numpy.ndarray" and res.recipients == (alice.public,)
    assert (tmp_path / "a.age").stat().st_mode & 0o777 == 0o600
    assert alice.path.stat().st_mode & 0o777 == 0o600
    out = secure_load(tmp_path / "a.age")  # identities from the keys folder
    assert out.dtype == arr.dtype and np.array_equal(out, arr)
    # A literal age1… recipient works as well, and the file opens with the identity file.
    secure_save(arr, tmp_path / "b.age", recipients=[alice.public])
    assert np.array_equal(secure_load(tmp_path / "b.age", identities=[alice.path]), arr)


def test_never_overwrite_without_force(alice, tmp_path):
    p = tmp_path / "x.age"
    secure_save(b"one", p, recipients="alice")
    with pytest.raises(errors.FileExistsRefusedError, match="--force"):
        secure_save(b"two", p, recipients="alice")
    assert secure_load(p) == b"one"
    secure_save(b"two", p, recipients="alice", force=True)
    assert secure_load(p) == b"two"


def test_failure_mid_save_leaves_old_file_intact(alice, tmp_path, monkeypatch):
    p = tmp_path / "x.age"
    secure_save("old text", p, recipients="alice")
    before = p.read_bytes()

    def broken(out, entries, **kw):
        out.write(b"x" * 200_000)  # some ciphertext reaches the temp file...
        raise RuntimeError("disk on fire")  # ...then the save dies

    monkeypatch.setattr(store, "write_container", broken)
    with pytest.raises(RuntimeError):
        secure_save("new text", p, recipients="alice", force=True)
    assert p.read_bytes() == before
    assert sorted(x.name for x in tmp_path.iterdir()) == ["x.age"]  # no temp file left
    assert secure_load(p) == "old text"


def test_wrong_key_and_tampering_refused(alice, tmp_path):
    p = tmp_path / "x.age"
    secure_save(b"payload" * 1000, p, recipients="alice")
    stranger = tmp_path / "stranger.key"
    stranger.write_text(age.X25519Identity.generate().reveal() + "\n")
    stranger.chmod(0o600)
    with pytest.raises(errors.NoIdentityMatchError, match="no identity matches"):
        secure_load(p, identities=[stranger])
    blob = bytearray(p.read_bytes())
    blob[-40] ^= 0x10
    bad = tmp_path / "bad.age"
    bad.write_bytes(bytes(blob))
    with pytest.raises(errors.PayloadError):
        secure_load(bad)
    bad.write_bytes(p.read_bytes()[:-5])
    with pytest.raises(errors.PayloadError):
        secure_load(bad)


def test_group_readable_identity_refused_with_chmod_fix(alice, tmp_path):
    secure_save(b"x", tmp_path / "x.age", recipients="alice")
    alice.path.chmod(0o644)
    with pytest.raises(errors.KeyFileError, match="chmod 600"):
        secure_load(tmp_path / "x.age", identities=[alice.path])


class _Spy:
    calls = 0


def _spy_loads(monkeypatch):
    real = serializers.by_type

    def spy(*a, **kw):
        _Spy.calls += 1
        return real(*a, **kw)

    _Spy.calls = 0
    monkeypatch.setattr(serializers, "by_type", spy)


def test_signatures(alice, me, tmp_path, monkeypatch):
    p_signed, p_plain = tmp_path / "s.age", tmp_path / "u.age"
    res = secure_save({"not": "supported"}.__repr__(), p_signed, recipients="alice", sign_with="me")
    assert res.signed_by == me.public
    secure_save("text", p_plain, recipients="alice")
    assert secure_load(p_signed, verify_with="me") == "{'not': 'supported'}"
    assert secure_load(p_signed, verify_with=me.public) == "{'not': 'supported'}"
    other = signing.generate_signing_key("other")
    _spy_loads(monkeypatch)
    with pytest.raises(errors.SignatureError, match="not signed"):
        secure_load(p_plain, verify_with="me")
    with pytest.raises(errors.SignatureError, match="not by"):
        secure_load(p_signed, verify_with=other.public)
    assert _Spy.calls == 0  # refused before any deserialiser was even looked up


def test_forged_signature_refused_before_deserialising(alice, me, tmp_path, monkeypatch):
    """An attacker who can encrypt to alice swaps the object but keeps the signature block."""
    p = tmp_path / "s.age"
    secure_save(b"genuine", p, recipients="alice", sign_with="me")
    reader = open_container(p)
    forged_manifest_src = io.BytesIO()
    write_container(forged_manifest_src, [Entry("bytes", "bytes", {"data": b"evil"})], created="x")
    forged = ContainerReader(forged_manifest_src)
    blob = (
        container.MAGIC
        + container._LEN.pack(len(forged.manifest_bytes))
        + forged.manifest_bytes
        + container._LEN.pack(len(container.encode_json(reader.signature)))
        + container.encode_json(reader.signature)
        + b"evil"
    )
    evil = tmp_path / "evil.age"
    evil.write_bytes(age.encrypt(blob, keys.resolve_recipients("alice")))
    assert secure_load(evil) == b"evil"  # without verification it is just some file
    _spy_loads(monkeypatch)
    with pytest.raises(errors.SignatureError, match="bad signature"):
        secure_load(evil, verify_with="me")
    assert _Spy.calls == 0


def test_signature_survives_reencryption(alice, me, tmp_path):
    p = tmp_path / "s.age"
    secure_save(np.ones(3), p, recipients="alice", sign_with="me")
    plaintext = age.decrypt(p.read_bytes(), keys.load_identities("alice"))
    bob = keys.generate_identity("bob")
    q = tmp_path / "bob.age"
    q.write_bytes(age.encrypt(plaintext, keys.resolve_recipients("bob")))
    assert np.array_equal(secure_load(q, identities=[bob.path], verify_with="me"), np.ones(3))


def test_bytes_after_the_declared_data_are_refused(alice, me, tmp_path):
    """A co-recipient re-encrypts a signed container with bytes appended: the signature still
    checks (it covers the manifest), so the reader must refuse data the manifest does not declare."""
    from test_crypto_cli import run

    from kprivacy_nb.crypto import trust

    trust.add_trusted("me")  # so that inspect would say "signature verified"
    p = tmp_path / "s.age"
    secure_save(np.ones(3), p, recipients="alice", sign_with="me")
    plaintext = age.decrypt(p.read_bytes(), keys.load_identities("alice"))
    assert b"signature verified" in run("inspect", str(p), "-i", "alice").stdout
    for label, blob in (("added", plaintext + b"EXTRA"), ("truncated", plaintext[:-1])):
        q = tmp_path / f"{label}.age"
        q.write_bytes(age.encrypt(blob, keys.resolve_recipients("alice")))
        with pytest.raises(errors.SerializationError, match=f"manifest declares .*{label}"):
            secure_load(q, verify_with="me")
        r = run("verify", "-k", "me", "-i", "alice", str(q))
        assert r.returncode == 1 and b"good signature" not in r.stdout
        assert b"manifest declares" in r.stderr and r.stderr.count(b"\n") == 1
        r = run("inspect", str(q), "-i", "alice")
        assert r.returncode == 1 and b"signature verified" not in r.stdout


def test_data_must_end_where_the_parts_end(alice, tmp_path):
    """Also in a hand-made container without ``data_size``: no byte outside every part."""
    payload = b"covered"
    manifest = {
        "format": container.FORMAT,
        "version": container.VERSION,
        "entries": [
            {"name": "b", "type": "bytes", "meta": {}, "parts": [
                {"name": "data", "offset": 0, "size": len(payload),
                 "sha256": hashlib.sha256(payload).hexdigest()}]}
        ],
    }  # fmt: skip
    m = container.encode_json(manifest)
    head = container.MAGIC + container._LEN.pack(len(m)) + m + container._LEN.pack(0)
    for data, ok in ((payload, True), (payload + b"EXTRA", False)):
        q = tmp_path / "hand.age"
        q.write_bytes(age.encrypt(head + data, keys.resolve_recipients("alice")))
        if ok:
            assert secure_load(q) == payload
        else:
            with pytest.raises(errors.SerializationError, match="parts end at .* added after"):
                secure_load(q)


def test_passphrase_save_load_and_secret_hygiene(tmp_path):
    pw = "tr0ub4dor&3-horse"
    res = secure_save(b"data", tmp_path / "p.age", passphrase=pw)
    for text in (repr(res), str(res), res._repr_html_()):
        assert pw not in text
    with pytest.raises(errors.NoIdentityMatchError, match="passphrase"):
        secure_load(tmp_path / "p.age")  # no passphrase given: says what to do
    with pytest.raises(errors.NoIdentityMatchError) as info:
        secure_load(tmp_path / "p.age", passphrase="wrong-" + pw)
    assert pw not in str(info.value)
    assert secure_load(tmp_path / "p.age", passphrase=pw) == b"data"


def test_unknown_types_and_pickle(alice, tmp_path):
    class Thing:
        def __init__(self):
            self.x = 1

    with pytest.raises(errors.SerializationError, match="allow-pickle"):
        secure_save(Thing(), tmp_path / "t.age", recipients="alice")
    assert not (tmp_path / "t.age").exists()
    with pytest.warns(UserWarning, match="pickle"):
        secure_save({"a": [1, 2]}, tmp_path / "t.age", recipients="alice", allow_pickle=True)
    with pytest.raises(errors.SerializationError, match="holds a pickle"):
        secure_load(tmp_path / "t.age")
    with pytest.warns(UserWarning):
        assert secure_load(tmp_path / "t.age", allow_pickle=True) == {"a": [1, 2]}


def test_dataframe_round_trip_without_pickle(alice, tmp_path):
    import pandas as pd

    df = pd.DataFrame(
        {
            "i": [1, 2, 3],
            "f": [0.1, np.nan, 1e-300],
            "b": [True, False, True],
            "s": ["x", None, "z"],
            "c": pd.Categorical(["a", "b", "a"]),
            "t": pd.to_datetime(["2024-01-01", "2024-06-01", "2025-01-01"]),
        },
        index=pd.Index([10, 20, 30], name="id"),
    )
    secure_save(df, tmp_path / "df.age", recipients="alice")
    parts = open_container(tmp_path / "df.age").read_parts()
    assert set(parts) == {"schema.json", "arrays.npz"}  # no pickle anywhere
    back = secure_load(tmp_path / "df.age")
    pd.testing.assert_frame_equal(back, df, check_dtype=False)
    assert back["f"].tolist()[2] == 1e-300 and back["c"].dtype == "category"


def test_figure_and_text_and_bytes(alice, tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot([1, 2, 3])
    secure_save(fig, tmp_path / "f.age", recipients="alice")
    plt.close(fig)
    back = secure_load(tmp_path / "f.age")
    assert back._repr_png_().startswith(b"\x89PNG") and b"<svg" in back.svg
    assert not hasattr(back, "_repr_svg_")  # a stored SVG may carry script: never displayed
    secure_save("héllo", tmp_path / "s.age", recipients="alice")
    assert secure_load(tmp_path / "s.age") == "héllo"


def test_files_and_folders(alice, tmp_path):
    src = tmp_path / "results"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text("A")
    (src / "sub" / "b.bin").write_bytes(b"\x00\x01")
    secure_save(src, tmp_path / "r.age", recipients="alice")
    back = secure_load(tmp_path / "r.age")
    assert back.kind == "folder"
    assert back.files == {"results/a.txt": b"A", "results/sub/b.bin": b"\x00\x01"}
    dest = tmp_path / "restored"
    back.extract(dest)
    assert (dest / "results" / "sub" / "b.bin").read_bytes() == b"\x00\x01"
    assert (dest / "results" / "a.txt").stat().st_mode & 0o777 == 0o600


def test_tar_path_traversal_refused(alice, tmp_path):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("../../evil.sh")
        info.size = 4
        tar.addfile(info, io.BytesIO(b"boom"))
    _write_entry(tmp_path / "e.age", Entry("x", "files", {"files.tar": buf.getvalue()}))
    with pytest.raises(errors.SerializationError, match="unsafe path"):
        secure_load(tmp_path / "e.age")


def _write_entry(path: Path, entry: Entry) -> None:
    """Craft a file the way an attacker with alice's public key could."""
    plain = io.BytesIO()
    write_container(plain, [entry], created="x")
    path.write_bytes(age.encrypt(plain.getvalue(), keys.resolve_recipients("alice")))


# --- Keras -----------------------------------------------------------------------------------------

_WRITES: list = []
_WATCH = {"on": False}


def _audit(event: str, args: tuple) -> None:
    if not _WATCH["on"]:
        return
    if event == "open":
        mode, flags = args[1], args[2]
        writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
            isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)
        )
        if writing:
            _WRITES.append(str(args[0]))
    elif event in ("tempfile.mkstemp", "tempfile.mkdtemp", "os.mkdir"):
        _WRITES.append(str(args[0]))


@pytest.fixture(scope="module")
def keras_model():
    import keras

    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(8, activation="relu"), keras.layers.Dense(2)]
    )
    model.compile(optimizer="sgd", loss="mse")
    model.fit(np.random.rand(16, 4), np.random.rand(16, 2), epochs=1, verbose=0)
    return model


def test_keras_round_trip_predicts_identically_and_nothing_on_disk(
    alice, me, tmp_path, keras_model, kp_home
):
    x = np.random.default_rng(0).random((5, 4)).astype("float32")
    target = tmp_path / "model.age"
    sys.addaudithook(_audit)
    _WRITES.clear()
    _WATCH["on"] = True
    try:
        secure_save(keras_model, target, recipients="alice", sign_with="me")
        loaded = secure_load(target, verify_with="me")
    finally:
        _WATCH["on"] = False
    # The only file written is the atomic temp for the (encrypted) output, in its folder.
    others = [
        w
        for w in _WRITES
        if not w.startswith(str(tmp_path / ".model.age."))  # the encrypted output's temp
        and w != str(tmp_path)  # ...or its unnamed (O_TMPFILE) temp, opened on the folder
        and not w.isdigit()  # its file descriptor
        and not (w.startswith(str(kp_home)) and Path(w).is_dir())  # mkdir(exist_ok) of home
    ]
    assert others == []
    assert np.array_equal(keras_model.predict(x, verbose=0), loaded.predict(x, verbose=0))


def _keras_archive(model) -> bytes:
    parts, _ = serializers.dump_keras(model)
    return parts["model.keras"]


def _with_config(archive: bytes, mutate) -> bytes:
    src = zipfile.ZipFile(io.BytesIO(archive))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as zf:
        for name in src.namelist():
            data = src.read(name)
            if name == "config.json":
                cfg = json.loads(data)
                mutate(cfg)
                data = json.dumps(cfg).encode()
            zf.writestr(name, data)
    return out.getvalue()


def test_malicious_keras_archives_refused(alice, tmp_path, keras_model):
    good = _keras_archive(keras_model)

    def os_system(cfg):
        cfg["config"]["layers"][1]["module"] = "os"
        cfg["config"]["layers"][1]["class_name"] = "system"

    def lambda_layer(cfg):
        cfg["config"]["layers"].append(
            {
                "module": "keras.layers",
                "class_name": "Lambda",
                "config": {"function": {"class_name": "__lambda__", "config": {"code": "xxx"}}},
            }
        )

    cases = {
        "os.system": (_with_config(good, os_system), "names the module 'os'"),
        "lambda": (_with_config(good, lambda_layer), "Lambda"),
        "legacy h5": (b"\x89HDF\r\n\x1a\n" + b"\x00" * 100, "legacy .h5"),
        "extra member": (good[:0] + _add_member(good, "assets/x.txt"), "unexpected files"),
    }
    for name, (archive, message) in cases.items():
        path = tmp_path / f"{name}.age"
        _write_entry(path, Entry("model", "keras.model", {"model.keras": archive}))
        with pytest.raises(errors.SerializationError, match=message):
            secure_load(path)


def _add_member(archive: bytes, member: str) -> bytes:
    out = io.BytesIO(archive)
    with zipfile.ZipFile(out, "a") as zf:
        zf.writestr(member, b"x")
    return out.getvalue()


def test_real_lambda_model_refused_at_save_and_load(alice, tmp_path):
    import keras
    from keras.src.saving import saving_lib

    model = keras.Sequential([keras.Input((2,)), keras.layers.Lambda(lambda t: t * 2)])
    with pytest.raises(errors.SerializationError, match="Lambda"):
        secure_save(model, tmp_path / "refused.age", recipients="alice")
    assert not (tmp_path / "refused.age").exists()
    buf = io.BytesIO()
    serializers._write_keras_archive(saving_lib, model, buf)  # as a malicious writer would
    archive = buf.getvalue()
    path = tmp_path / "lambda.age"
    _write_entry(path, Entry("model", "keras.model", {"model.keras": archive}))
    with pytest.raises(errors.SerializationError, match="Lambda"):
        secure_load(path)


class DPFitResult:
    """Stand-in with the documented attributes of kprivacy_nb.dp.trainer.DPFitResult."""

    def __init__(self, model):
        self.model = model
        self.epsilon = 2.5
        self.delta = 1e-5
        self.noise_multiplier = np.float64(1.1)
        self.steps = 120
        self.history = {"loss": [0.5, 0.4]}
        self.privacy_card = {"epsilon": 2.5, "delta": 1e-5, "accountant": "pld"}


def test_dp_result_keeps_privacy_card(alice, tmp_path, keras_model):
    secure_save(DPFitResult(keras_model), tmp_path / "run.age", recipients="alice")
    reader = open_container(tmp_path / "run.age")
    entry = reader.entry()
    assert entry["type"] == "dp.result"
    assert entry["meta"]["privacy_card"]["accountant"] == "pld"
    run = secure_load(tmp_path / "run.age")
    assert run.epsilon == 2.5 and run.noise_multiplier == 1.1 and run.steps == 120
    assert run.privacy_card["epsilon"] == 2.5 and run.history == {"loss": [0.5, 0.4]}
    x = np.ones((2, 4), dtype="float32")
    assert np.array_equal(run.model.predict(x, verbose=0), keras_model.predict(x, verbose=0))


def test_crypto_core_does_not_import_tensorflow():
    import subprocess

    code = (
        "import sys, numpy as np, tempfile, os;"
        "os.environ['KPRIVACY_NB_HOME']=tempfile.mkdtemp();"
        "from kprivacy_nb.crypto import store, keys, cli;"
        "keys.generate_identity('a');"
        "p=os.path.join(tempfile.mkdtemp(),'x.age');"
        "store.secure_save(np.ones(2), p, recipients='a'); store.secure_load(p);"
        "print('tensorflow' in sys.modules, 'keras' in sys.modules, 'IPython' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False False False"


def test_container_readable_by_hand_as_documented(alice, me, tmp_path):
    """docs/container.md's recipe: any age tool + json/struct/hashlib is enough."""
    import hashlib
    import struct

    secure_save(np.arange(4), tmp_path / "m.age", recipients="alice", sign_with="me")
    key = (alice.path).read_text().splitlines()[-1]
    import pyrage

    plain = pyrage.decrypt(
        (tmp_path / "m.age").read_bytes(), [pyrage.x25519.Identity.from_str(key)]
    )
    assert plain.startswith(b"kprivacy-nb container v1\n")
    pos = 25
    (n,) = struct.unpack(">Q", plain[pos : pos + 8])
    manifest_bytes = plain[pos + 8 : pos + 8 + n]
    manifest = json.loads(manifest_bytes)
    pos += 8 + n
    (s,) = struct.unpack(">Q", plain[pos : pos + 8])
    sig = json.loads(plain[pos + 8 : pos + 8 + s])
    data = plain[pos + 8 + s :]
    assert manifest["format"] == "kprivacy-nb/container" and manifest["version"] == 1
    assert {"python", "kprivacy_nb", "numpy"} <= set(manifest["library"])
    part = manifest["entries"][0]["parts"][0]
    blob = data[part["offset"] : part["offset"] + part["size"]]
    assert hashlib.sha256(blob).hexdigest() == part["sha256"]
    assert np.array_equal(np.load(io.BytesIO(blob), allow_pickle=False), np.arange(4))
    assert sig["alg"] == "ed25519" and sig["key"] == me.public
    signing.VerifyKey.parse(sig["key"]).verify(
        __import__("base64").b64decode(sig["sig"]), signing.CONTAINER_CONTEXT + manifest_bytes
    )


def test_bad_key_file_error_does_not_echo_its_content(tmp_path):
    bad = tmp_path / "bad.key"
    secretish = "AGE-SECRET-KEY-1" + "Q" * 40 + "X"
    bad.write_text(f"# comment\n{secretish}\n")
    bad.chmod(0o600)
    with pytest.raises(errors.KeyFileError) as info:
        keys.load_identities([bad])
    assert secretish not in str(info.value) and "line 2" in str(info.value)
    sk = signing.SigningKey.generate()
    assert sk.reveal() not in repr(sk) and "KPRIVACY-SIGNING-KEY" not in str(sk)


def test_real_dp_fit_result_round_trip(alice, tmp_path, keras_model):
    import dataclasses

    from kprivacy_nb.dp import trainer

    fields = {f.name for f in dataclasses.fields(trainer.DPFitResult)}
    values = {
        "model": keras_model, "history": {"loss": [0.3]}, "epsilon": 1.5, "epsilon_curve": None,
        "noise_multiplier": 1.2, "delta": 1e-5, "steps": 10, "clipping": {"mode": "ghost"},
        "l2_norm_clip": 1.0, "batch_size": 8, "n": 80, "sampling": "poisson",
        "accountant": "pld", "epochs_completed": 1, "planned_curve": None,
    }  # fmt: skip
    res = trainer.DPFitResult(**{k: v for k, v in values.items() if k in fields})
    secure_save(res, tmp_path / "run.age", recipients="alice")
    run = secure_load(tmp_path / "run.age")
    assert run.epsilon == 1.5 and run.privacy_card["epsilon"] == 1.5
    assert run.privacy_card["accountant"] == "pld" and run.privacy_card["sampling"] == "poisson"
