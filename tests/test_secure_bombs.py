"""Decompression and allocation bombs inside a container are refused in bounded memory.

Each bomb is a small, validly encrypted file whose archive *declares* far more than it holds.
The load runs in a child process that reports its own peak-RSS growth, so the measurement is not
blurred by whatever this test process loaded before.
"""

from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
import tarfile
import zipfile

import numpy as np
import pytest

from kprivacy_nb.crypto import age, keys
from kprivacy_nb.crypto.container import Entry, write_container
from kprivacy_nb.crypto.limits import loads_json
from kprivacy_nb.crypto.store import secure_load
from kprivacy_nb.errors import ResourceLimitError, SerializationError

BOMB = 256 << 20  # what the bombs declare / inflate to
LIMIT = 32 << 20  # the expansion limit used for the test loads

CHILD = r"""
import json, resource, sys, warnings
import numpy, pandas  # imported before measuring
from kprivacy_nb.crypto.store import secure_load
from kprivacy_nb.errors import KPrivacyError
warnings.simplefilter("ignore")
path, ident, limit = sys.argv[1], sys.argv[2], sys.argv[3]
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    secure_load(path, identities=[ident], max_expanded_bytes=int(limit) if limit else None)
    outcome = {"error": None}
except KPrivacyError as exc:
    outcome = {"error": type(exc).__name__, "message": str(exc)}
growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
print(json.dumps({**outcome, "growth": growth * 1024}))
"""


@pytest.fixture
def alice(kp_home):
    return keys.generate_identity("alice")


def crafted(path, alice, type_name: str, parts: dict[str, bytes], meta: dict | None = None):
    """An age file holding a container with one hand-made entry (as an attacker would)."""
    with open(path, "wb") as f:
        writer = age.EncryptWriter(f, [age.X25519Recipient.parse(alice.public)])
        write_container(writer, [Entry("x", type_name, parts, meta or {})], created="now")
        writer.close()
    return path


def load_in_child(path, alice, limit: int | None = LIMIT, env: dict | None = None) -> dict:
    import os

    run_env = {**os.environ, **(env or {})}
    r = subprocess.run(
        [sys.executable, "-c", CHILD, str(path), str(alice.path), str(limit or "")],
        capture_output=True,
        env=run_env,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr.decode()[-2000:]
    return json.loads(r.stdout.decode().splitlines()[-1])


def deflated_zip(members: dict[str, tuple[bytes, int]]) -> bytes:
    """A zip whose members are ``header + zeros`` deflated (``(header, zero_count)``)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, (head, zeros) in members.items():
            with zf.open(name, "w", force_zip64=True) as m:
                m.write(head)
                block = bytes(1 << 20)
                for _ in range(zeros >> 20):
                    m.write(block)
    return buf.getvalue()


def npy_header(n: int) -> bytes:
    out = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        out, {"descr": "|u1", "fortran_order": False, "shape": (n,)}
    )
    return out.getvalue()


def sparse_tar(declared: int) -> bytes:
    """A ~2 KiB GNU sparse tar whose one member expands to ``declared`` bytes of zeros."""
    info = tarfile.TarInfo("big.bin")
    info.type = tarfile.GNUTYPE_SPARSE
    info.size = 0
    head = bytearray(info.tobuf(format=tarfile.GNU_FORMAT))
    head[386:410] = b"%011o\0%011o\0" % (declared - 1, 1)  # one 1-byte segment at the end
    head[483:495] = b"%011o\0" % declared
    head[148:156] = b" " * 8
    head[148:156] = b"%06o\0 " % sum(head)
    return bytes(head) + bytes(1024)


@pytest.mark.slow
def test_sparse_tar_bomb_refused_without_allocating(tmp_path, alice):
    tar = sparse_tar(BOMB)
    assert len(tar) <= 2048
    path = crafted(tmp_path / "sparse.age", alice, "files", {"files.tar": tar}, {"kind": "file"})
    out = load_in_child(path, alice, limit=None)  # refused whatever the limit
    assert out["error"] == "SerializationError" and "sparse" in out["message"]
    assert out["growth"] < 16 << 20, out


@pytest.mark.slow
def test_npz_bomb_in_a_dataframe_refused_in_bounded_memory(tmp_path, alice):
    npz = deflated_zip({"c0.npy": (npy_header(BOMB), BOMB)})
    assert len(npz) < 2 << 20
    schema = {"columns": [{"kind": "numpy", "name": "a"}], "index": {"kind": "range"}}
    parts = {"schema.json": json.dumps(schema).encode(), "arrays.npz": npz}
    path = crafted(tmp_path / "df.age", alice, "pandas.dataframe", parts)
    out = load_in_child(path, alice)
    assert out["error"] == "ResourceLimitError", out
    assert "SecureMagics.max_expanded_bytes" in out["message"]
    assert "KPRIVACY_NB_MAX_EXPANDED" in out["message"]
    assert out["growth"] < LIMIT // 2, out
    # the environment variable sets the limit too
    out = load_in_child(path, alice, limit=None, env={"KPRIVACY_NB_MAX_EXPANDED": str(LIMIT)})
    assert out["error"] == "ResourceLimitError" and out["growth"] < LIMIT // 2, out


@pytest.mark.slow
def test_keras_config_bomb_refused_before_keras_reads_it(tmp_path, alice):
    archive = deflated_zip(
        {"metadata.json": (b"{}", 0), "config.json": (b'{"class_name": "Sequential"}', BOMB)}
    )
    path = crafted(tmp_path / "m.age", alice, "keras.model", {"model.keras": archive})
    out = load_in_child(path, alice)
    assert out["error"] == "ResourceLimitError" and "config.json" in out["message"], out
    assert out["growth"] < LIMIT // 2, out


def test_small_limits_apply_per_member_and_per_archive(tmp_path, alice):
    arr = np.arange(1000, dtype="uint8")
    path = tmp_path / "a.age"
    from kprivacy_nb.crypto.store import secure_save

    secure_save(arr, path, recipients="alice")
    with pytest.warns(UserWarning, match="unsigned"):
        np.testing.assert_array_equal(secure_load(path, max_expanded_bytes=1000), arr)
    with pytest.raises(ResourceLimitError, match="1,000 bytes, above the limit of 999"):
        secure_load(path, max_expanded_bytes=999)


def test_npy_declaring_more_than_it_holds_is_refused(tmp_path, alice):
    lying = npy_header(10**12) + b"\0" * 16  # a TB declared, 16 bytes stored
    path = crafted(tmp_path / "n.age", alice, "numpy.ndarray", {"array.npy": lying})
    with pytest.raises(ResourceLimitError):
        secure_load(path)
    small_lie = npy_header(100) + b"\0" * 16
    path = crafted(tmp_path / "n2.age", alice, "numpy.ndarray", {"array.npy": small_lie})
    with pytest.raises(SerializationError, match="declares 100 bytes but holds 16"):
        secure_load(path)


def test_tar_member_larger_than_its_part_is_refused(tmp_path, alice):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("f.txt")
        info.size = 5
        tar.addfile(info, io.BytesIO(b"hello"))
    data = bytearray(buf.getvalue())
    # a pax record claiming a huge size for the member
    pax = tarfile.TarInfo("f.txt")
    pax.size = 5
    pax.pax_headers = {"size": str(10**12)}
    evil = pax.tobuf(format=tarfile.PAX_FORMAT) + b"hello".ljust(512, b"\0") + bytes(1024)
    path = crafted(tmp_path / "t.age", alice, "files", {"files.tar": evil}, {"kind": "file"})
    with pytest.raises(SerializationError, match="more than the archive holds"):
        secure_load(path)
    del data


def test_deep_json_is_a_clear_error_not_a_recursion_error():
    with pytest.raises(ResourceLimitError, match="nested"):
        loads_json(b"[" * 100_000 + b"]" * 100_000, "test JSON")
    with pytest.raises(ResourceLimitError, match="more than 64 levels"):
        loads_json(b"[" * 100 + b"]" * 100, "test JSON")
    assert loads_json(b"[" * 10 + b"]" * 10, "test JSON") == [[[[[[[[[[]]]]]]]]]]
    with pytest.raises(ResourceLimitError, match="bytes"):
        loads_json(b" " * 100, "test JSON", max_bytes=10)


def test_deep_manifest_ends_in_a_kprivacy_error(tmp_path, alice):
    manifest = b"[" * 50_000 + b"]" * 50_000
    plain = b"kprivacy-nb container v1\n" + struct.pack(">Q", len(manifest)) + manifest
    plain += struct.pack(">Q", 0)
    path = tmp_path / "deep.age"
    path.write_bytes(age.encrypt(plain, [age.X25519Recipient.parse(alice.public)]))
    with pytest.raises(ResourceLimitError, match="manifest is nested"):
        secure_load(path)


def h5_with_a_hard_link_cycle() -> bytes:
    """HDF5 weights whose group ``a`` holds a hard link back to the root (a cycle)."""
    import h5py

    buf = io.BytesIO()
    with h5py.File(buf, "w") as f:
        f.create_group("a")
        f["a/back"] = f  # hard link: / -> a -> back (= /) -> a -> …
        f["a/w"] = np.zeros(3, "float32")
    return buf.getvalue()


def keras_archive(members: dict[str, bytes], compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


CONFIG = json.dumps({"class_name": "Sequential", "config": {"layers": []}}).encode()


def test_hdf5_hard_link_cycle_ends_quickly_in_a_clear_error(tmp_path, alice):
    archive = keras_archive(
        {"config.json": CONFIG, "model.weights.h5": h5_with_a_hard_link_cycle()}
    )
    path = crafted(tmp_path / "cycle.age", alice, "keras.model", {"model.keras": archive})
    code = (
        "import sys; from kprivacy_nb.crypto.store import secure_load\n"
        "from kprivacy_nb.errors import KPrivacyError\n"
        "try:\n    secure_load(sys.argv[1], identities=[sys.argv[2]])\n"
        "except KPrivacyError as exc:\n    print('refused', type(exc).__name__)\n"
    )
    try:
        r = subprocess.run(
            [sys.executable, "-c", code, str(path), str(alice.path)],
            capture_output=True,
            timeout=60,
        )
    except subprocess.TimeoutExpired:
        pytest.fail("loading HDF5 weights with a hard-link cycle hangs")
    # The weights walk ends; Keras then refuses the empty model's weights: a clear error.
    assert r.returncode == 0 and r.stdout.startswith(b"refused"), r.stderr.decode()[-1500:]


@pytest.mark.slow
def test_npz_weights_nested_in_a_keras_archive_are_bounded(tmp_path, alice):
    inner = deflated_zip({"layers/dense/vars.npy": (npy_header(BOMB), BOMB)})
    assert len(inner) < 2 << 20
    archive = keras_archive({"config.json": CONFIG, "model.weights.npz": inner})
    path = crafted(tmp_path / "nested.age", alice, "keras.model", {"model.keras": archive})
    out = load_in_child(path, alice)
    assert out["error"] == "ResourceLimitError" and "model.weights.npz" in out["message"], out
    assert out["growth"] < LIMIT // 2, out


def test_nested_archives_share_one_expansion_limit(tmp_path, alice):
    # Each level alone fits 1 MB; together (outer .keras + the npz inside it) they don't.
    inner = keras_archive({"w.npy": npy_header(600_000) + bytes(600_000)}, zipfile.ZIP_STORED)
    archive = keras_archive({"config.json": CONFIG, "model.weights.npz": inner})
    path = crafted(tmp_path / "two-levels.age", alice, "keras.model", {"model.keras": archive})
    with pytest.raises(ResourceLimitError, match="with the archives it is nested in"):
        secure_load(path, max_expanded_bytes=1_000_000)


@pytest.mark.slow
def test_large_json_is_refused_before_parsing_in_bounded_memory(tmp_path, alice):
    # 20 MiB of empty lists parse into ~450 MB of Python objects: refused by size first.
    schema = b"[" + b"[]," * ((20 << 20) // 3) + b"[]]"
    parts = {"schema.json": schema, "arrays.npz": deflated_zip({})}
    path = crafted(tmp_path / "json.age", alice, "pandas.dataframe", parts)
    out = load_in_child(path, alice, limit=None)
    assert out["error"] == "ResourceLimitError" and "JSON limit of 16,777,216" in out["message"]
    assert out["growth"] < 120 << 20, out
    # Inside a .keras, a big config.json is refused from its declared size, before inflating it.
    archive = deflated_zip({"config.json": (b"[", 17 << 20)})
    path = crafted(tmp_path / "cfg.age", alice, "keras.model", {"model.keras": archive})
    out = load_in_child(path, alice, limit=None)
    assert out["error"] == "ResourceLimitError" and "config.json" in out["message"], out
    assert out["growth"] < 12 << 20, out
