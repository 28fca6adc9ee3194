"""Bounded readers for the archives inside container parts: zip (``.keras``, ``.npz``), tar, npy.

Each reader checks what an archive *declares* (member sizes, array shapes) against what it
holds and against :func:`~kprivacy_nb.crypto.limits.max_expanded_bytes` before allocating
anything, so a small file can't make the loader allocate gigabytes. Every malformed archive ends
in a :class:`~kprivacy_nb.errors.SerializationError`.
"""

from __future__ import annotations

import io
import math
import tarfile
import unicodedata
import zipfile
from pathlib import PurePosixPath
from typing import Any

from ..errors import SerializationError
from .limits import charge_expansion, check_expansion, check_json_size, loads_json
from .printable import printable

MAX_MEMBERS = 100_000


# --- zip ------------------------------------------------------------------------------------------


def open_zip(data: bytes, what: str) -> zipfile.ZipFile:
    """A zip archive whose members (each, and all together) fit the expansion limit.

    The sizes checked are the declared ones; ``zipfile`` never inflates a member beyond its
    declared size (it stops there and checks the CRC), so the check bounds the real expansion.
    """
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
        infos = zf.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, OSError, EOFError, RuntimeError):
        raise SerializationError(f"refused: {what} is not a valid zip archive") from None
    if len(infos) > MAX_MEMBERS:
        raise SerializationError(f"refused: {what} has too many members ({len(infos):,})")
    for info in infos:
        if info.flag_bits & 0x1:
            raise SerializationError(f"refused: {what} has an encrypted member")
        check_expansion(info.file_size, f"member {info.filename!r} of {what}")
    charge_expansion(sum(i.file_size for i in infos), f"{what} (all members together)")
    return zf


def read_member(zf: zipfile.ZipFile, name: str, what: str) -> bytes:
    """One member of an archive opened with :func:`open_zip` (its size already checked)."""
    try:
        return zf.read(name)
    except KeyError:
        raise SerializationError(f"refused: {what} has no member {name!r}") from None
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, RuntimeError) as exc:
        raise SerializationError(f"refused: member {name!r} of {what} is corrupt ({exc})") from None


def read_json_member(zf: zipfile.ZipFile, name: str, what: str) -> Any:
    """A JSON member, its declared size checked against the JSON limit before it is inflated."""
    try:
        size = zf.getinfo(name).file_size
    except KeyError:
        raise SerializationError(f"refused: {what} has no member {name!r}") from None
    check_json_size(size, f"{name} in {what}")
    return loads_json(read_member(zf, name, what), f"{name} in {what}")


# --- numpy ----------------------------------------------------------------------------------------


def npy_declared_bytes(data: bytes, what: str) -> int:
    """Bytes the ``.npy`` header in ``data`` declares; refused if more than follow the header."""
    from numpy.lib import format as npformat

    fp = io.BytesIO(data)
    try:
        version = npformat.read_magic(fp)
        reader = (
            npformat.read_array_header_1_0 if version == (1, 0) else npformat.read_array_header_2_0
        )
        shape, _fortran, dtype = reader(fp)
    except Exception:  # numpy parses the header with ast/tokenize: any error means malformed
        raise SerializationError(f"refused: {what} is not a valid .npy array") from None
    if dtype.hasobject:
        raise SerializationError(f"refused: {what} is an object array (needs pickle)")
    declared = math.prod(int(d) for d in shape) * dtype.itemsize
    check_expansion(declared, what)
    if declared > len(data) - fp.tell():
        raise SerializationError(
            f"refused: {what} declares {declared:,} bytes but holds {len(data) - fp.tell():,}"
        )
    return declared


def load_npy(data: bytes, what: str) -> Any:
    """An array from ``.npy`` bytes: header checked first, never pickle."""
    import numpy as np

    npy_declared_bytes(data, what)
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise SerializationError(f"refused {what}: {exc}") from None


def check_npz(data: bytes, what: str) -> None:
    """Refuse an ``.npz`` whose members (or the arrays their headers declare) are too large."""
    zf = open_zip(data, what)
    for info in zf.infolist():
        if not info.filename.endswith(".npy"):
            raise SerializationError(f"refused: unexpected member {info.filename!r} in {what}")
        npy_declared_bytes(read_member(zf, info.filename, what), f"{info.filename} in {what}")


def load_npz(data: bytes, what: str) -> dict[str, Any]:
    """Every array of an ``.npz`` archive, each member bounded before it is inflated."""
    zf = open_zip(data, what)
    out = {}
    for info in zf.infolist():
        if not info.filename.endswith(".npy"):
            raise SerializationError(f"refused: unexpected member {info.filename!r} in {what}")
        member = read_member(zf, info.filename, what)
        out[info.filename[: -len(".npy")]] = load_npy(member, f"{info.filename} in {what}")
    return out


# --- tar ------------------------------------------------------------------------------------------


MAX_NAME_BYTES = 255  # one path component, as most file systems allow
MAX_PATH_BYTES = 4096


def safe_member_name(name: str) -> str:
    """A relative POSIX path inside the archive, or a refusal: absolute, ``..``, backslashes,
    control or invisible format characters (a newline or ESC in a name would forge lines or
    escape codes wherever the name is printed), components longer than file systems allow."""
    shown = f"'{printable(name)}'"
    p = PurePosixPath(name)
    if p.is_absolute() or ".." in p.parts or not p.parts or "\\" in name:
        raise SerializationError(f"refused: unsafe path {shown} in the stored files")
    if any(unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp") for ch in name):
        raise SerializationError(f"refused: a control character in the stored name {shown}")
    if len(name.encode("utf-8", "surrogateescape")) > MAX_PATH_BYTES or any(
        len(part.encode("utf-8", "surrogateescape")) > MAX_NAME_BYTES for part in p.parts
    ):
        raise SerializationError(f"refused: the stored name {shown} is too long")
    return str(p)


def read_tar(data: bytes, what: str) -> dict[str, bytes]:
    """The regular files of a tar archive held in ``data`` (folders skipped).

    Refused: links and special files, sparse members (they expand beyond what is stored), and
    members declaring more bytes than the whole archive has.
    """
    files: dict[str, bytes] = {}
    folders: set[str] = set()
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            for count, info in enumerate(tar):
                if count >= MAX_MEMBERS:
                    raise SerializationError(f"refused: {what} has too many members")
                name = safe_member_name(info.name)
                _check_unique(name, info.isdir(), files, folders, what)
                if info.isdir():
                    continue
                if info.issparse():
                    raise SerializationError(f"refused: {info.name!r} in {what} is a sparse file")
                if not info.isfile():
                    raise SerializationError(f"refused: {info.name!r} is a link or special file")
                if info.size > len(data):
                    raise SerializationError(
                        f"refused: {info.name!r} in {what} declares {info.size:,} bytes, more "
                        f"than the archive holds ({len(data):,})"
                    )
                fobj = tar.extractfile(info)
                content = fobj.read() if fobj else b""
                if len(content) != info.size:
                    raise SerializationError(f"refused: {info.name!r} in {what} is truncated")
                files[name] = content
    except (tarfile.TarError, EOFError, ValueError, OSError, UnicodeDecodeError):
        raise SerializationError(f"refused: {what} is not a valid tar archive") from None
    return files


def _check_unique(
    name: str, is_dir: bool, files: dict[str, bytes], folders: set[str], what: str
) -> None:
    """Refuse a second member with the same path, and a path that is both a file and a folder
    (``a`` as a file, then ``a/b``): either would silently lose or misplace a file."""
    parents = [str(p) for p in PurePosixPath(name).parents if str(p) != "."]
    if name in files or (not is_dir and name in folders):
        raise SerializationError(f"refused: '{printable(name)}' is stored twice in {what}")
    if any(p in files for p in parents):
        raise SerializationError(
            f"refused: '{printable(name)}' in {what} is inside a path stored as a file"
        )
    if is_dir:
        folders.add(name)
    folders.update(parents)


# --- HDF5 (Keras weights) -------------------------------------------------------------------------


MAX_H5_OBJECTS = 100_000


def check_h5(data: bytes, what: str) -> None:
    """Refuse HDF5 weights that link outside the file, declare more than the limit, or hold
    more than :data:`MAX_H5_OBJECTS` objects. Hard links may make the group graph cyclic: each
    object (by its address in the file) is visited once."""
    import h5py

    total = 0
    visited: set[Any] = set()
    steps = 0
    try:
        with h5py.File(io.BytesIO(data), "r") as f:
            pending: list[Any] = [f]
            visited.add(h5py.h5o.get_info(f["/"].id).addr)
            while pending:
                group = pending.pop()
                for key in group:
                    steps += 1
                    if steps > MAX_H5_OBJECTS:
                        raise SerializationError(
                            f"refused: {what} has more than {MAX_H5_OBJECTS:,} objects"
                        )
                    link = group.get(key, getlink=True)
                    if isinstance(link, (h5py.ExternalLink, h5py.SoftLink)):
                        raise SerializationError(f"refused: {what} links to {key!r} elsewhere")
                    node = group[key]
                    address = h5py.h5o.get_info(node.id).addr
                    if address in visited:
                        continue  # a second hard link to an object already checked
                    visited.add(address)
                    if isinstance(node, h5py.Group):
                        pending.append(node)
                        continue
                    if node.is_virtual or node.external:
                        raise SerializationError(f"refused: {what} reads data from other files")
                    total += math.prod(node.shape or (1,)) * node.dtype.itemsize
                    check_expansion(total, what)
    except SerializationError:
        raise
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, AttributeError):
        raise SerializationError(f"refused: {what} is not a valid HDF5 weights file") from None
    charge_expansion(total, what)
