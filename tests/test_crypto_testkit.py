"""The C2SP age test kit (tests/data/age-testkit, provenance in tests/data/age-testkit.md).

Every vector must pass, none skipped — X25519, scrypt, the ``mlkem768x25519`` post-quantum
hybrid, armor, header, HMAC and STREAM: success cases give the exact payload; failure cases raise
the matching error, and the plaintext released before the failure hashes to the vector's
``payload`` (i.e. nothing unauthenticated was handed out).
"""

from __future__ import annotations

import hashlib
import io
import zlib
from pathlib import Path

import pytest

from kprivacy_nb import errors
from kprivacy_nb.crypto import age

KIT = Path(__file__).parent / "data" / "age-testkit"
EXPECT = {
    "success": None,
    "no match": errors.NoIdentityMatchError,
    "HMAC failure": errors.HMACError,
    "header failure": errors.HeaderError,
    "payload failure": errors.PayloadError,
    "armor failure": errors.ArmorError,
}
KNOWN_KEYS = {
    "expect",
    "payload",
    "file key",
    "identity",
    "passphrase",
    "armored",
    "compressed",
    "comment",
}


def load_vector(path: Path) -> dict:
    raw = path.read_bytes()
    head, _, body = raw.partition(b"\n\n")
    vec: dict = {"identity": [], "passphrase": [], "name": path.name}
    for line in head.decode().splitlines():
        key, _, value = line.partition(": ")
        assert key in KNOWN_KEYS, f"{path.name}: unknown key {key}"
        if key in ("identity", "passphrase"):
            vec[key].append(value)
        else:
            vec[key] = value
    if vec.get("compressed") == "zlib":
        body = zlib.decompress(body)
    vec["body"] = body
    return vec


VECTORS = sorted(KIT.iterdir())


def identities_of(vec: dict) -> list:
    ids: list = [x for i in vec["identity"] for x in age.identities_from_text(i)]
    return ids + [age.ScryptIdentity(p) for p in vec["passphrase"]]


def test_kit_is_complete():
    assert len(VECTORS) == 143
    hybrid_only = [
        p.name
        for p in VECTORS
        if (v := load_vector(p))["identity"]
        and all(i.startswith("AGE-SECRET-KEY-PQ") for i in v["identity"])
        and not v["passphrase"]
    ]
    # The post-quantum vectors run like every other (they were skipped before age 1.3 keys).
    assert all("hybrid" in n for n in hybrid_only)
    assert len(hybrid_only) == 18
    assert any(
        isinstance(i, age.HybridIdentity) for i in identities_of(load_vector(KIT / "hybrid"))
    )


@pytest.mark.parametrize("path", VECTORS, ids=[p.name for p in VECTORS])
def test_vector(path: Path, tmp_path: Path):
    vec = load_vector(path)
    ids = identities_of(vec)
    armored = vec.get("armored") == "yes" or None
    expected = EXPECT[vec["expect"]]
    released = hashlib.sha256()
    if expected is None:
        for chunk in age.iter_decrypt(io.BytesIO(vec["body"]), ids, armored=armored):
            released.update(chunk)
        assert released.hexdigest() == vec["payload"]
    else:
        with pytest.raises(expected):
            for chunk in age.iter_decrypt(io.BytesIO(vec["body"]), ids, armored=armored):
                released.update(chunk)
        if "payload" in vec:
            assert released.hexdigest() == vec["payload"]
        else:
            assert released.digest() == hashlib.sha256(b"").digest()
    # The file API is all-or-nothing: no output file unless the whole file authenticated.
    out = tmp_path / "out.bin"
    if expected is None:
        age.decrypt_to_path(io.BytesIO(vec["body"]), out, ids, armored=armored)
        assert hashlib.sha256(out.read_bytes()).hexdigest() == vec["payload"]
        assert out.stat().st_mode & 0o777 == 0o600
    else:
        with pytest.raises(expected):
            age.decrypt_to_path(io.BytesIO(vec["body"]), out, ids, armored=armored)
        assert list(tmp_path.iterdir()) == []


def test_pass_rate():
    """Summary: every vector passes (reported as a number for the record)."""
    passed = total = 0
    for path in VECTORS:
        vec = load_vector(path)
        ids = identities_of(vec)
        total += 1
        h = hashlib.sha256()
        try:
            for c in age.iter_decrypt(
                io.BytesIO(vec["body"]), ids, armored=vec.get("armored") == "yes" or None
            ):
                h.update(c)
            ok = vec["expect"] == "success"
        except errors.CryptoError as exc:
            ok = EXPECT[vec["expect"]] is not None and isinstance(exc, EXPECT[vec["expect"]])
        ok = ok and ("payload" not in vec or h.hexdigest() == vec["payload"])
        passed += ok
    assert (passed, total) == (143, 143)
