"""age v1 format: keys, armor, STREAM boundaries, interop with rage (pyrage), tampering."""

from __future__ import annotations

import io
import os
import random

import pyrage
import pytest

from kprivacy_nb import errors
from kprivacy_nb.crypto import age, armor, bech32
from kprivacy_nb.crypto.age.stream import BATCH

CHUNK = age.CHUNK
SPAN = BATCH * CHUNK  # plaintext per batch of chunks (one read / AEAD loop / write)


@pytest.fixture(scope="module")
def ident() -> age.X25519Identity:
    return age.X25519Identity.generate()


# --- bech32 / keys ----------------------------------------------------------------------------------


def test_bech32_bip173_vectors():
    # Valid BIP-173 test vectors.
    for s in (
        "A12UEL5L",
        "a12uel5l",
        "abcdef1qpzry9x8gf2tvdw0s3jn54khce6mua7lmqqqxw",
        "split1checkupstagehandshakeupstreamerranterredcaperred2y9e3w",
    ):
        hrp, _ = bech32.decode(s)
        assert hrp == s.lower()[: s.lower().rfind("1")]
    for bad in ("A12uEL5L", "a12uel5m", "1pzry9x0s0muk", "pzry9x0s0muk", "abc1rzg"):
        with pytest.raises(bech32.Bech32Error):
            bech32.decode(bad)


def test_key_strings_round_trip_with_rage():
    theirs = pyrage.x25519.Identity.generate()
    ours = age.X25519Identity.parse(str(theirs))
    assert str(ours.recipient()) == str(theirs.to_public())
    assert ours.reveal() == str(theirs)
    assert str(age.X25519Recipient.parse(str(theirs.to_public()))) == str(theirs.to_public())


def test_identity_repr_hides_secret(ident):
    secret = ident.reveal()
    for text in (repr(ident), str(ident), f"{ident}"):
        assert secret not in text and "AGE-SECRET-KEY" not in text
    sr = age.ScryptRecipient("correct horse battery", work_factor=18)
    assert "correct horse" not in repr(sr)
    assert "correct horse" not in repr(age.ScryptIdentity("correct horse battery"))


def test_bad_recipient_strings():
    with pytest.raises(errors.InvalidParameterError):
        age.X25519Recipient.parse("age1notvalid")
    with pytest.raises(errors.KeyFileError):
        age.X25519Identity.parse("AGE-SECRET-KEY-1QQQ")


# --- STREAM boundaries ------------------------------------------------------------------------------

SIZES = [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK, 16 * CHUNK, 16 * CHUNK + 1, 33 * CHUNK + 7]
SIZES += [SPAN - 1, SPAN, SPAN + 1, 2 * SPAN, 3 * SPAN + CHUNK + 1]  # batch boundaries


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("threads", [False, True])
def test_round_trip_sizes(ident, size, threads):
    data = os.urandom(size)
    enc = io.BytesIO()
    n = age.encrypt_stream(io.BytesIO(data), enc, [ident.recipient()], threads=threads)
    assert n == size
    chunks = max(1, -(-size // CHUNK))
    blob = enc.getvalue()
    header_len = blob.index(b"\n--- ") + len(b"\n--- ") + 43 + 1
    assert len(blob) == header_len + 16 + size + 16 * chunks  # nonce + chunks with tags
    out = io.BytesIO()
    assert age.decrypt_stream(io.BytesIO(enc.getvalue()), out, [ident], threads=threads) == size
    assert out.getvalue() == data
    # Streaming reader and writer agree too.
    w = io.BytesIO()
    with age.EncryptWriter(w, [ident.recipient()]) as ew:
        for i in range(0, size, 10_000):
            ew.write(data[i : i + 10_000])
    assert age.DecryptReader(io.BytesIO(w.getvalue()), [ident]).read() == data


def test_multiple_recipients_and_armor(ident):
    other = age.X25519Identity.generate()
    blob = age.encrypt(b"x" * 1000, [other.recipient(), ident.recipient()], armor=True)
    assert blob.startswith(armor.BEGIN) and blob.rstrip().endswith(armor.END)
    assert all(len(line) <= 64 for line in blob.splitlines())
    assert age.decrypt(blob, [ident]) == b"x" * 1000
    assert age.decrypt(blob, [other]) == b"x" * 1000
    with pytest.raises(errors.NoIdentityMatchError, match="no identity matches"):
        age.decrypt(blob, [age.X25519Identity.generate()])


def test_armor_is_strict():
    good = armor.armor(b"hello world" * 10)
    assert armor.dearmor(good) == b"hello world" * 10
    for bad in (
        good.replace(b"-----\n", b"-----\nHeader: x\n\n", 1),
        good.replace(b"\n", b" \n", 2),
        good + b"garbage",
        good.replace(b"-----BEGIN", b"-----BEGIN ", 1),
    ):
        with pytest.raises(errors.ArmorError):
            armor.dearmor(bad)


def test_release_only_authenticated_chunks(ident):
    data = os.urandom(3 * CHUNK + 100)
    blob = bytearray(age.encrypt(data, [ident.recipient()]))
    blob[-50] ^= 1  # corrupt the last chunk
    got = []
    with pytest.raises(errors.PayloadError):
        for chunk in age.iter_decrypt(io.BytesIO(bytes(blob)), [ident]):
            got.append(chunk)
    assert b"".join(got) == data[: 3 * CHUNK]  # the genuine chunks, nothing of the bad one
    reader = age.DecryptReader(io.BytesIO(bytes(blob)), [ident])
    with pytest.raises(errors.PayloadError):
        while reader.read(1000):
            pass


# --- passphrases ------------------------------------------------------------------------------------


def test_scrypt_work_factor_bounds():
    with pytest.raises(errors.InvalidParameterError):
        age.ScryptRecipient("pw", work_factor=17)
    with pytest.raises(errors.InvalidParameterError):
        age.ScryptRecipient("pw", work_factor=23)
    with pytest.raises(errors.InvalidParameterError, match="passphrase can't be combined"):
        age.encrypt(
            b"x",
            [age.ScryptRecipient("pw long enough"), age.X25519Identity.generate().recipient()],
        )


def test_short_passphrases_are_refused_for_encryption_not_for_decryption():
    for short in ("1234", "patient", "nine char"):
        with pytest.raises(errors.InvalidParameterError, match="at least 10 characters"):
            age.ScryptRecipient(short)
    age.ScryptRecipient("ten chars!")
    # A file another age tool made with a short passphrase still opens.
    blob = pyrage.passphrase.encrypt(b"data", "1234")
    assert age.decrypt(blob, [age.ScryptIdentity("1234")]) == b"data"


@pytest.mark.slow
def test_scrypt_header_alone_and_default_factor(ident):
    blob = age.encrypt(b"secret data", [age.ScryptRecipient("pw long enough")])
    header, _ = age.read_header(io.BytesIO(blob))
    assert header.types() == ["scrypt"] and header.stanzas[0].args[1] == "18"
    assert age.decrypt(blob, [age.ScryptIdentity("pw long enough")]) == b"secret data"
    with pytest.raises(errors.NoIdentityMatchError):
        age.decrypt(blob, [age.ScryptIdentity("wrong")])
    with pytest.raises(errors.HeaderError, match="above the limit"):
        age.decrypt(blob, [age.ScryptIdentity("pw", max_work_factor=17)])


# --- interop with rage (pyrage), both directions --------------------------------------------------


@pytest.mark.parametrize("size", [0, 5, CHUNK, 3 * CHUNK + 1])
def test_ours_to_rage_x25519(size):
    theirs = pyrage.x25519.Identity.generate()
    data = os.urandom(size)
    blob = age.encrypt(data, [age.X25519Recipient.parse(str(theirs.to_public()))])
    assert pyrage.decrypt(blob, [theirs]) == data
    armored = age.encrypt(data, [age.X25519Recipient.parse(str(theirs.to_public()))], armor=True)
    assert pyrage.decrypt(armored, [theirs]) == data


@pytest.mark.parametrize("size", [0, 5, CHUNK, 3 * CHUNK + 1])
def test_rage_to_ours_x25519(ident, size):
    data = os.urandom(size)
    rec = pyrage.x25519.Recipient.from_str(str(ident.recipient()))
    assert age.decrypt(pyrage.encrypt(data, [rec]), [ident]) == data
    assert age.decrypt(pyrage.encrypt(data, [rec], armored=True), [ident]) == data


@pytest.mark.slow
def test_passphrase_interop_both_ways():
    data = os.urandom(CHUNK + 3)
    ours = age.encrypt(data, [age.ScryptRecipient("hunter2 correct horse")])
    assert pyrage.passphrase.decrypt(ours, "hunter2 correct horse") == data
    theirs = pyrage.passphrase.encrypt(data, "hunter2 correct horse")
    assert age.decrypt(theirs, [age.ScryptIdentity("hunter2 correct horse")]) == data


# --- tampering --------------------------------------------------------------------------------------


def test_thousand_tamperings_all_rejected_no_output(ident, tmp_path):
    rng = random.Random(1234)
    data = rng.randbytes(CHUNK + 1500)  # two chunks: exercises the chunk boundary too
    blob = age.encrypt(data, [ident.recipient()])
    out = tmp_path / "plain.bin"
    cases = 0
    for i in range(1000):
        if i % 4 == 3:
            tampered = blob[: rng.randrange(len(blob))]
        else:
            pos = rng.randrange(len(blob))
            tampered = blob[:pos] + bytes([blob[pos] ^ rng.randrange(1, 256)]) + blob[pos + 1 :]
        with pytest.raises(errors.CryptoError):
            age.decrypt_to_path(io.BytesIO(tampered), out, [ident])
        assert not out.exists()
        cases += 1
    assert cases == 1000
    assert list(tmp_path.iterdir()) == []
    age.decrypt_to_path(io.BytesIO(blob), out, [ident])
    assert out.read_bytes() == data


@pytest.mark.parametrize("threads", [False, True])
def test_bad_chunk_in_a_later_batch_leaves_no_file(ident, tmp_path, threads):
    """A MAC failure after whole batches were authenticated and written: no output file at all,
    and the streaming API releases exactly the genuine chunks before the bad one."""
    data = os.urandom(2 * SPAN + 3 * CHUNK + 5)
    blob = bytearray(age.encrypt(data, [ident.recipient()]))
    bad = 2 * BATCH + 1  # the second chunk of the third batch
    payload = len(blob) - len(data) - 16 * (2 * BATCH + 4)  # header + nonce
    blob[payload + bad * (CHUNK + 16) + 100] ^= 1
    (tmp_path / "plain.age").write_bytes(blob)
    out = tmp_path / "plain.bin"
    with open(tmp_path / "plain.age", "rb") as src, pytest.raises(errors.PayloadError):
        age.decrypt_to_path(src, out, [ident])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain.age"]
    sink = io.BytesIO()
    with pytest.raises(errors.PayloadError):
        age.decrypt_stream(io.BytesIO(bytes(blob)), sink, [ident], threads=threads)
    assert sink.getvalue() == data[: bad * CHUNK]


def test_wrong_header_mac_is_hmac_error(ident):
    blob = age.encrypt(b"abc", [ident.recipient()])
    head, sep, rest = blob.partition(b"\n--- ")
    mac = bytearray(rest[:43])
    mac[0] = ord("A") if mac[0] != ord("A") else ord("B")
    with pytest.raises(errors.HMACError):
        age.decrypt(head + sep + bytes(mac) + rest[43:], [ident])


def _stream_file(ident, chunks: list[tuple[bytes, bool]]) -> bytes:
    """An age file whose payload chunks are sealed exactly as given: (plaintext, last flag)."""
    file_key, nonce = os.urandom(age.FILE_KEY_LEN), os.urandom(age.NONCE_LEN)
    head = age.encode_header(ident.recipient().wrap(file_key), file_key) + nonce
    aead = age.payload_key(file_key, nonce)
    sealed = [aead.encrypt(age.nonce(i, last), p, None) for i, (p, last) in enumerate(chunks)]
    return head + b"".join(sealed)


def test_stream_final_chunk_rule(ident):
    full, part = os.urandom(age.CHUNK), os.urandom(10)
    # a full-size chunk may be the final one; so may a short one after full ones
    assert age.decrypt(_stream_file(ident, [(full, True)]), [ident]) == full
    assert age.decrypt(_stream_file(ident, [(full, False), (part, True)]), [ident]) == full + part
    assert age.decrypt(_stream_file(ident, [(b"", True)]), [ident]) == b""  # empty file
    bad = {
        "missing": [(full, False)],  # stream stops without a final chunk (truncation)
        "trailing": [(full, True), (part, True)],  # data after the final chunk
        "empty final": [(full, False), (b"", True)],  # empty last chunk in a non-empty file
        "short middle": [(part, False), (part, True)],  # only the last chunk may be short
    }
    for why, chunks in bad.items():
        with pytest.raises(errors.PayloadError):
            age.decrypt(_stream_file(ident, chunks), [ident])
            pytest.fail(f"accepted a stream with {why}")


def test_encrypt_refuses_more_stanzas_than_decrypt_accepts(ident, tmp_path):
    from test_crypto_cli import run_subprocess

    from kprivacy_nb import secure_save
    from kprivacy_nb.crypto.age.format import MAX_STANZAS

    others = [str(age.X25519Identity.generate().recipient()) for _ in range(MAX_STANZAS - 1)]
    rfile = tmp_path / "team.txt"
    rfile.write_text("\n".join([*others, str(ident.recipient())]) + "\n")
    (tmp_path / "in").write_bytes(b"for the team")
    # exactly the limit: written, and our own decrypt opens it
    blob = run_subprocess("encrypt", "-R", str(rfile), str(tmp_path / "in")).stdout
    assert len(age.stanza_types(io.BytesIO(blob))) == MAX_STANZAS
    assert age.decrypt(blob, [ident]) == b"for the team"
    # one more: refused before anything is written, by the CLI and the Python API
    rfile.write_text(rfile.read_text() + f"{age.X25519Identity.generate().recipient()}\n")
    r = run_subprocess(
        "encrypt", "-R", str(rfile), "-o", str(tmp_path / "c.age"), str(tmp_path / "in")
    )
    err = r.stderr.decode()
    assert r.returncode == 2 and f"at most {MAX_STANZAS:,}" in err and err.count("\n") == 1, err
    assert not (tmp_path / "c.age").exists() and r.stdout == b""
    with pytest.raises(errors.InvalidParameterError, match="too many recipients"):
        secure_save(b"x", tmp_path / "s.age", recipients=str(rfile))
    assert not (tmp_path / "s.age").exists()
    with pytest.raises(errors.InvalidParameterError, match="too many recipients"):
        age.encrypt(b"x", [ident.recipient()] * (MAX_STANZAS + 1))
