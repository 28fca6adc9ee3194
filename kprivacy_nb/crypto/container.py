"""The kprivacy-nb container: what sits *inside* the age payload (see docs/container.md).

Layout (all lengths unsigned 64-bit big-endian)::

    b"kprivacy-nb container v1\\n"      magic line (25 bytes)
    len(manifest) | manifest            UTF-8 JSON, sorted keys, no whitespace
    len(signature) | signature          UTF-8 JSON signature block, or length 0 if unsigned
    data                                every part of every entry, concatenated

The manifest lists entries (named objects), each made of parts (byte strings) with their offset
in ``data``, size and SHA-256. The signature covers the manifest bytes, hence every part's digest:
re-encrypting the same container to other recipients keeps it valid. A reader checks the
signature (when asked) before parsing the manifest, and a part's digest before handing it out.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import platform
import re
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from ..errors import SerializationError, SignatureError
from .limits import loads_json
from .signing import SigningKey, sign_manifest
from .trust import SignaturePolicy, SignatureStatus

MAGIC = b"kprivacy-nb container v1\n"
FORMAT = "kprivacy-nb/container"
VERSION = 1
MAX_MANIFEST = 16 << 20
MAX_SIGNATURE = 64 << 10
_LEN = struct.Struct(">Q")
_SHA256_RE = re.compile(r"[0-9a-f]{64}")


@dataclass
class Entry:
    """One named object to store: its serialiser type, parts and JSON metadata."""

    name: str
    type: str
    parts: dict[str, bytes]
    meta: dict[str, Any] = field(default_factory=dict)


def library_versions(extra: Iterable[str] = ()) -> dict[str, str]:
    """Versions of Python, kprivacy_nb and the libraries that wrote the entries."""
    import importlib.metadata as md
    import sys

    from .. import __version__

    out = {"python": platform.python_version(), "kprivacy_nb": __version__}
    for mod in ("numpy", "cryptography", *extra):
        if mod in sys.modules or mod in ("numpy", "cryptography"):
            try:
                out[mod] = md.version(mod)
            except md.PackageNotFoundError:
                pass
    return out


def encode_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def build_manifest(
    entries: list[Entry], *, created: str, metadata: Mapping[str, Any] | None = None
) -> bytes:
    names = [e.name for e in entries]
    if len(set(names)) != len(names):
        raise SerializationError("entry names must be unique in a container")
    offset = 0
    listed = []
    libs: set[str] = set()
    for e in entries:
        parts = []
        for pname, data in e.parts.items():
            parts.append(
                {
                    "name": pname,
                    "offset": offset,
                    "size": len(data),
                    "sha256": hashlib.sha256(data).hexdigest(),
                }
            )
            offset += len(data)
        libs.update(e.meta.pop("_libraries", []))
        listed.append(
            {"name": e.name, "type": e.type, "created": created, "meta": e.meta, "parts": parts}
        )
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "created": created,
        "library": library_versions(sorted(libs)),
        "entries": listed,
        "data_size": offset,
        "metadata": dict(metadata or {}),
    }
    return encode_json(manifest)


def write_container(
    out: BinaryIO,
    entries: list[Entry],
    *,
    created: str,
    sign_with: SigningKey | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> bytes:
    """Write a container to ``out``; returns the manifest bytes."""
    manifest = build_manifest(entries, created=created, metadata=metadata)
    sig = encode_json(sign_manifest(manifest, sign_with)) if sign_with else b""
    out.write(MAGIC + _LEN.pack(len(manifest)) + manifest + _LEN.pack(len(sig)) + sig)
    for e in entries:
        for data in e.parts.values():
            out.write(data)
    return manifest


def is_container(head: bytes) -> bool:
    return head.startswith(MAGIC)


def _check_data_end(end: int, expected: int, what: str) -> None:
    """Refuse data longer (bytes no digest or signature covers) or shorter than declared."""
    if end != expected:
        raise SerializationError(
            f"container data is {end:,} bytes but {what} {expected:,}: "
            + ("bytes were added after it" if end > expected else "it is truncated")
        )


class ContainerReader:
    """Read a container from a seekable plaintext buffer, verifying before anything else.

    >>> buf = io.BytesIO()
    >>> _ = write_container(buf, [Entry("x", "bytes", {"data": b"hi"})], created="now")
    >>> ContainerReader(buf).read_parts("x")
    {'data': b'hi'}
    """

    def __init__(self, buf: BinaryIO, *, policy: SignaturePolicy | None = None) -> None:
        self._buf = buf
        buf.seek(0)
        if buf.read(len(MAGIC)) != MAGIC:
            raise SerializationError(
                "the decrypted data is not a kprivacy-nb container (it may be a plain age file: "
                "use `kprivacy-nb decrypt` for those)"
            )
        self.manifest_bytes = self._read_block(MAX_MANIFEST, "manifest")
        sig = self._read_block(MAX_SIGNATURE, "signature")
        self.signature: dict | None = None
        if sig:
            try:
                self.signature = loads_json(sig, "signature block")
            except SerializationError:
                raise SignatureError("malformed signature block") from None
            if not isinstance(self.signature, dict):
                raise SignatureError("malformed signature block")
        # The signature is judged before a byte of the manifest is parsed.
        self.signature_status: SignatureStatus = (policy or SignaturePolicy()).check(
            self.manifest_bytes, self.signature
        )
        self.verified_by = self.signature_status.signer if self.signature_status.verified else None
        self._data_start = buf.tell()
        manifest = loads_json(self.manifest_bytes, "container manifest", max_bytes=MAX_MANIFEST)
        self.manifest = self._check_manifest(manifest)

    def _read_block(self, limit: int, what: str) -> bytes:
        raw = self._buf.read(_LEN.size)
        if len(raw) != _LEN.size:
            raise SerializationError(f"container truncated before the {what}")
        (n,) = _LEN.unpack(raw)
        if n > limit:
            raise SerializationError(f"container {what} too large ({n} bytes)")
        data = self._buf.read(n)
        if len(data) != n:
            raise SerializationError(f"container truncated inside the {what}")
        return data

    def _check_manifest(self, m: Any) -> dict:
        if not isinstance(m, dict) or m.get("format") != FORMAT:
            raise SerializationError("not a kprivacy-nb container manifest")
        if m.get("version") != VERSION:
            raise SerializationError(
                f"container version {m.get('version')!r} is not supported by this kprivacy-nb"
            )
        entries = m.get("entries")
        if not isinstance(entries, list) or not entries:
            raise SerializationError("container manifest lists no entries")
        end = self._buf.seek(0, io.SEEK_END) - self._data_start
        declared = m.get("data_size")
        if declared is not None:
            if type(declared) is not int or declared < 0:
                raise SerializationError("malformed manifest: 'data_size' must be a byte count")
            _check_data_end(end, declared, "its manifest declares")
        names = set()
        for e in entries:
            ok = (
                isinstance(e, dict)
                and isinstance(e.get("name"), str)
                and isinstance(e.get("type"), str)
                and isinstance(e.get("meta", {}), dict)
                and isinstance(e.get("parts"), list)
                and e["name"] not in names
            )
            if not ok:
                raise SerializationError("malformed manifest entry")
            names.add(e["name"])
            part_names = set()
            for p in e["parts"]:
                ok = (
                    isinstance(p, dict)
                    and isinstance(p.get("name"), str)
                    and p["name"] not in part_names
                    and type(p.get("offset")) is int
                    and type(p.get("size")) is int
                    and 0 <= p["offset"]
                    and 0 <= p["size"]
                    and p["offset"] + p["size"] <= end
                    and isinstance(p.get("sha256"), str)
                    and _SHA256_RE.fullmatch(p["sha256"]) is not None
                )
                if not ok:
                    raise SerializationError("manifest part out of bounds or malformed")
                part_names.add(p["name"])
        extent = max((p["offset"] + p["size"] for e in entries for p in e["parts"]), default=0)
        _check_data_end(end, extent, "its parts end at")
        if not isinstance(m.get("metadata", {}), dict):
            raise SerializationError("malformed container metadata")
        library = m.get("library", {})
        if not isinstance(library, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in library.items()
        ):
            raise SerializationError("malformed manifest: 'library' must map names to versions")
        if not isinstance(m.get("created", ""), str):
            raise SerializationError("malformed manifest: 'created' must be a string")
        return m

    def check_all_parts(self) -> None:
        """Check every part of every entry against its manifest digest (what ``verify`` and
        ``inspect`` vouch for), reading in chunks."""
        for e in self.entries:
            for p in e["parts"]:
                self._buf.seek(self._data_start + p["offset"])
                digest, left = hashlib.sha256(), p["size"]
                while left:
                    chunk = self._buf.read(min(left, 1 << 20))
                    if not chunk:
                        break
                    digest.update(chunk)
                    left -= len(chunk)
                if left or not hmac.compare_digest(digest.hexdigest(), p["sha256"]):
                    raise SerializationError(
                        f"part {p['name']!r} of entry {e['name']!r} does not match its manifest "
                        "digest: the content was changed after signing"
                    )

    @property
    def entries(self) -> list[dict]:
        return self.manifest["entries"]

    def entry(self, name: str | None = None) -> dict:
        if name is None:
            if len(self.entries) != 1:
                names = ", ".join(e["name"] for e in self.entries)
                raise SerializationError(f"the file holds several entries ({names}); name one")
            return self.entries[0]
        for e in self.entries:
            if e["name"] == name:
                return e
        raise SerializationError(f"no entry named {name!r} in this file")

    def read_parts(self, name: str | None = None) -> dict[str, bytes]:
        """The parts of one entry, each checked against its manifest digest."""
        out = {}
        for p in self.entry(name)["parts"]:
            self._buf.seek(self._data_start + p["offset"])
            data = self._buf.read(p["size"])
            if not hmac.compare_digest(hashlib.sha256(data).hexdigest(), p["sha256"]):
                raise SerializationError(
                    f"part {p.get('name')!r} does not match its manifest digest"
                )
            out[p["name"]] = data
        return out
