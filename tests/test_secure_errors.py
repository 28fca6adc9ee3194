"""Malformed or unusual files end in one-line KPrivacyErrors that say what to do."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from test_secure_bombs import crafted, deflated_zip

from kprivacy_nb.crypto import age, container, keys
from kprivacy_nb.crypto.serializers import RestoredFiles
from kprivacy_nb.crypto.store import secure_load
from kprivacy_nb.errors import KPrivacyError, SerializationError


@pytest.fixture
def alice(kp_home):
    return keys.generate_identity("alice")


def dataframe_parts(index: dict, columns: list[dict]) -> dict[str, bytes]:
    schema = {"columns": columns, "index": {"name": None, **index}, "shape": [1, len(columns)]}
    return {"schema.json": json.dumps(schema).encode(), "arrays.npz": deflated_zip({})}


def test_huge_range_index_is_a_clear_error(tmp_path, alice):
    index = {"kind": "range", "start": 0, "stop": 10**30, "step": 1}
    path = crafted(tmp_path / "r.age", alice, "pandas.dataframe", dataframe_parts(index, []))
    with pytest.raises(SerializationError, match="RangeIndex is malformed"):
        secure_load(path)


def test_pyarrow_string_column_without_pyarrow_says_what_to_do(tmp_path, alice):
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("pyarrow is installed here: the column loads")
    column = {"kind": "strings", "dtype": "string[pyarrow]", "values": ["a"], "name": "s"}
    index = {"kind": "range", "start": 0, "stop": 1, "step": 1}
    path = crafted(tmp_path / "s.age", alice, "pandas.dataframe", dataframe_parts(index, [column]))
    with pytest.raises(SerializationError, match="pip install pyarrow.*astype"):
        secure_load(path)


def test_inspect_of_a_manifest_with_a_list_valued_library_is_one_line(tmp_path, alice):
    data = np.lib.format.header_data_from_array_1_0(np.zeros(1))  # any bytes will do
    payload = json.dumps(data).encode()
    manifest = {
        "format": container.FORMAT,
        "version": container.VERSION,
        "created": "now",
        "library": ["keras", "3.0"],
        "entries": [
            {
                "name": "x",
                "type": "numpy.ndarray",
                "meta": {},
                "parts": [
                    {
                        "name": "array.npy",
                        "offset": 0,
                        "size": len(payload),
                        "sha256": hashlib.sha256(payload).hexdigest(),
                    }
                ],
            }
        ],
    }
    m = container.encode_json(manifest)
    plain = container.MAGIC + container._LEN.pack(len(m)) + m + container._LEN.pack(0) + payload
    path = tmp_path / "lib.age"
    path.write_bytes(age.encrypt(plain, [age.X25519Recipient.parse(alice.public)]))
    r = subprocess.run(
        [sys.executable, "-m", "kprivacy_nb", "inspect", str(path), "-i", "alice"],
        capture_output=True,
    )
    err = r.stderr.decode()
    assert r.returncode == 1 and "Traceback" not in err, err
    assert "'library' must map names to versions" in err and len(err.strip().splitlines()) == 1


def tar_of(members: list[tuple[str, bytes | None]], fmt=tarfile.GNU_FORMAT) -> bytes:
    """A tar archive as an attacker writes it: any names, in any order (None: a folder)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.mark.parametrize(
    ("members", "message"),
    [
        ([("a\nsignature verified\x1b[32m", b"x")], "control character"),
        ([("ok\u202etxt.exe", b"x")], "control character"),
        ([("d", b"1"), ("d", b"2")], "stored twice"),
        ([("d", b"1"), ("d/x", b"2")], "inside a path stored as a file"),
        ([("d/x", b"2"), ("d", b"1")], "stored twice"),
        ([("A" * 300, b"x")], "too long"),
    ],
)
def test_stored_files_with_hostile_names_are_refused_on_load(tmp_path, alice, members, message):
    parts = {"files.tar": tar_of(members)}
    path = crafted(tmp_path / "f.age", alice, "files", parts, {"kind": "folder", "name": "f"})
    with pytest.raises(SerializationError, match=message) as caught:
        secure_load(path)
    assert "\n" not in str(caught.value) and "\x1b" not in str(caught.value)


def test_extract_fails_in_one_line_and_writes_nothing(tmp_path):
    """RestoredFiles is public: names a caller (or an older file) put in it are checked again
    before anything is written, and every failure is one KPrivacyError line."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "taken").write_bytes(b"mine")
    cases = [
        ({"new.txt": b"1", "taken": b"2"}, FileExistsError, "exists"),
        ({"new.txt": b"1", "taken/inner": b"2"}, KPrivacyError, "in the way"),
        ({"new.txt": b"1", "B" * 300: b"2"}, SerializationError, "too long"),
        ({"new.txt": b"1", "x\x1b]8;;evil\x07": b"2"}, SerializationError, "control character"),
        ({"new.txt": b"1", "a/../new.txt": b"2"}, SerializationError, "unsafe path"),
    ]
    for files, kind, message in cases:
        restored = RestoredFiles("f", "folder", files)
        with pytest.raises(KPrivacyError, match=message) as caught:
            restored.extract(out)
        assert isinstance(caught.value, kind) and "\n" not in str(caught.value)
        assert sorted(p.name for p in out.iterdir()) == ["taken"]  # nothing written
    written = RestoredFiles("f", "folder", {"a/b.txt": b"1", "c.txt": b"2"}).extract(out)
    assert sorted(p.relative_to(out).as_posix() for p in written) == ["a/b.txt", "c.txt"]
