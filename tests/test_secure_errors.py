"""Malformed or unusual files end in one-line KPrivacyErrors that say what to do."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import numpy as np
import pytest
from test_secure_bombs import crafted, deflated_zip

from kprivacy_nb.crypto import age, container, keys
from kprivacy_nb.crypto.store import secure_load
from kprivacy_nb.errors import SerializationError


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
