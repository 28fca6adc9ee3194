"""Fuzzing: every malformed age header, container or serialiser part ends in a one-line
KPrivacyError, and a failed decrypt leaves no file. About 12,000 cases in total."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kprivacy_nb.crypto import age, serializers
from kprivacy_nb.crypto.container import ContainerReader, Entry, write_container
from kprivacy_nb.errors import KPrivacyError

pytestmark = pytest.mark.slow

IDENT = age.X25519Identity.generate()
PASS_IDENT = age.ScryptIdentity("fuzz passphrase")


def fuzz_settings(n: int):
    return settings(
        max_examples=n,
        deadline=None,
        database=None,
        derandomize=True,  # the same cases in every CI run (run with it off to explore)
        suppress_health_check=list(HealthCheck),
    )


@st.composite
def mutated(draw, blob: bytes):
    """``blob`` with 1–4 random edits: bit flips, truncation, insertion, deletion, duplication."""
    data = bytearray(blob)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "truncate", "insert", "delete", "dup", "byte"]))
        pos = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "flip" and data:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "byte" and data:
            data[pos] = draw(st.sampled_from([0, 0x0A, 0x20, 0x2D, 0x3E, 0x7F, 0xFF, 0x30]))
        elif op == "truncate":
            del data[pos:]
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del data[pos : pos + draw(st.integers(1, 64))]
        elif op == "dup" and data:
            data[pos:pos] = data[pos : pos + draw(st.integers(1, 256))]
    return bytes(data)


def expect_clean_failure(func, *args):
    """Run ``func``; anything but success or a one-line KPrivacyError fails the test."""
    try:
        return func(*args)
    except KPrivacyError as exc:
        assert "\n" not in str(exc), str(exc)
        return None


def header_edits(blob: bytes) -> st.SearchStrategy[bytes]:
    """Edits concentrated on the header (and nonce) — where the parser lives."""
    end = blob.index(b"\n--- ") + 70
    return mutated(blob[:end]).map(lambda head: head + blob[end:])


X25519_FILE = age.encrypt(os.urandom(200), [IDENT.recipient()])
ARMORED_FILE = age.encrypt(os.urandom(100), [IDENT.recipient()], armor=True)


@fuzz_settings(3000)
@given(header_edits(X25519_FILE))
def test_fuzz_age_header(data):
    expect_clean_failure(age.decrypt, data, [IDENT])


@fuzz_settings(1000)
@given(mutated(ARMORED_FILE))
def test_fuzz_armored_age_file(data):
    expect_clean_failure(age.decrypt, data, [IDENT])


@fuzz_settings(1000)
@given(mutated(X25519_FILE))
def test_fuzz_decrypt_to_path_leaves_no_file(tmp_path_factory, data):
    folder = tmp_path_factory.mktemp("out")
    ok = expect_clean_failure(age.decrypt_to_path, io.BytesIO(data), folder / "out.bin", [IDENT])
    assert os.listdir(folder) == (["out.bin"] if ok is not None else [])


def container_bytes(entries: list[Entry]) -> bytes:
    buf = io.BytesIO()
    write_container(buf, entries, created="2026-01-01T00:00:00Z")
    return buf.getvalue()


def open_and_load_all(data: bytes) -> None:
    reader = ContainerReader(io.BytesIO(data))
    for entry in reader.entries:
        serializers.load(entry["type"], reader.read_parts(entry["name"]), entry.get("meta", {}))


def sample_parts() -> dict[str, tuple[dict[str, bytes], dict]]:
    import pandas as pd

    df = pd.DataFrame({"a": [1, 2, 3], "s": ["x", None, "z"], "c": pd.Categorical(["u", "v", "u"])})
    out = {}
    for name, obj in {
        "numpy.ndarray": np.arange(12, dtype="float32").reshape(3, 4),
        "pandas.dataframe": df,
        "text": "héllo",
        "bytes": b"\x00\x01",
    }.items():
        type_name, parts, meta = serializers.dump(obj)
        assert type_name == name
        out[name] = (parts, serializers.json_safe(meta))
    import tarfile

    tar = io.BytesIO()
    with tarfile.open(fileobj=tar, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for fname, content in (("d/a.txt", b"alpha"), ("d/b.bin", bytes(700))):
            info = tarfile.TarInfo(fname)
            info.size = len(content)
            tf.addfile(info, io.BytesIO(content))
    out["files"] = ({"files.tar": tar.getvalue()}, {"kind": "folder", "name": "d"})
    return out


SAMPLES = sample_parts()
CONTAINER = container_bytes(
    [Entry(f"e{i}", t, parts, dict(meta)) for i, (t, (parts, meta)) in enumerate(SAMPLES.items())]
)


@fuzz_settings(3000)
@given(mutated(CONTAINER))
def test_fuzz_container(data):
    expect_clean_failure(open_and_load_all, data)


@pytest.mark.parametrize("type_name", sorted(SAMPLES))
def test_fuzz_serializer_parts(type_name):
    parts, meta = SAMPLES[type_name]

    @fuzz_settings(800)
    @given(
        st.sampled_from(sorted(parts)).flatmap(lambda k: mutated(parts[k]).map(lambda v: (k, v)))
    )
    def run(edit):
        key, value = edit
        expect_clean_failure(serializers.load, type_name, {**parts, key: value}, meta)

    run()


def test_fuzz_keras_archive():
    import keras

    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    archive = serializers.dump_keras(model)[0]["model.keras"]

    @fuzz_settings(300)
    @given(mutated(archive))
    def run(data):
        expect_clean_failure(serializers.load, "keras.model", {"model.keras": data}, {})

    run()
