"""Many objects in one signed, encrypted age file: exports and encrypted cell outputs.

A bundle is a kprivacy-nb container (docs/container.md) with several entries and one manifest,
signed once. :func:`export_bundle` serialises *everything first* — an object that can't be
serialised stops the export before a byte is written — then streams the container through age
into an atomic 0600 file. :class:`Bundle` opens one lazily: the payload is authenticated and the
signature checked before the manifest is read, and each entry is deserialised only when asked for.

>>> from kprivacy_nb.crypto.bundle import export_bundle, load_bundle       # doctest: +SKIP
>>> export_bundle({"model": model, "X_test": X_test}, "share.age", recipients=["alice"])  # doctest: +SKIP
>>> bundle = load_bundle("share.age"); bundle["X_test"]                     # doctest: +SKIP
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
import json
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from ..errors import InvalidParameterError, SerializationError
from ..notebook_file import clean_notebook
from ..secrets import Secret
from . import age, serializers
from .container import ContainerReader, Entry, write_container
from .envelope import RecipientSpec, open_container, open_container_from, recipients_for
from .keys import now_iso
from .limits import expansion_limit, loads_json
from .outputs import atomic_output, check_output
from .signing import SigningKey, load_signing_key
from .trust import SignatureStatus

BUNDLE_KIND = "bundle"
NOTEBOOK_TYPE = "jupyter.notebook"
OUTPUTS_TYPE = "jupyter.outputs"
OUTPUTS_MIME = "application/vnd.kprivacy-nb.age+armor"

Progress = Callable[[float, str], None]


class OutputsNotEncryptedError(SerializationError):
    """Captured cell outputs could not be encrypted; they were discarded (never shown)."""


# --- two entry types that only bundles create (never picked automatically for an object) -------


@dataclass(frozen=True)
class NotebookFile:
    """A notebook stored in a bundle: ``.data`` is the ``.ipynb`` JSON; ``.save(path)`` writes it."""

    name: str
    data: bytes

    def save(self, path: str | os.PathLike, *, force: bool = False) -> Path:
        with atomic_output(path, force=force) as f:
            f.write(self.data)
        return Path(path)

    def __repr__(self) -> str:
        return f"NotebookFile({self.name!r}, {len(self.data):,} bytes)"


def _load_notebook(parts: dict[str, bytes], meta: dict) -> NotebookFile:
    return NotebookFile(str(meta.get("filename", "notebook.ipynb")), parts["ipynb"])


def _load_outputs(parts: dict[str, bytes], meta: dict) -> list[dict]:
    outputs = loads_json(parts["outputs.json"], "encrypted cell outputs")
    if not isinstance(outputs, list) or not all(isinstance(o, dict) for o in outputs):
        raise SerializationError("malformed encrypted cell outputs")
    return outputs


def _never(_obj: Any) -> bool:
    return False


def _no_dump(_obj: Any) -> tuple[dict, dict]:  # pragma: no cover - detection never picks these
    raise SerializationError("created only by export_bundle / %%secure_output")


serializers.register(serializers.Serializer(NOTEBOOK_TYPE, _never, _no_dump, _load_notebook))
serializers.register(serializers.Serializer(OUTPUTS_TYPE, _never, _no_dump, _load_outputs))


# --- writing --------------------------------------------------------------------------------


class _HashingWriter:
    """Counts and hashes the ciphertext on its way to the file (for the confirmation)."""

    def __init__(self, out: BinaryIO, total: int, progress: Progress | None) -> None:
        self._out = out
        self.sha256 = hashlib.sha256()
        self.size = 0
        self._total = max(total, 1)
        self._progress = progress

    def write(self, data: bytes) -> int:
        self._out.write(data)
        self.sha256.update(data)
        self.size += len(data)
        if self._progress:
            self._progress(min(1.0, 0.5 + 0.5 * self.size / self._total), "encrypting")
        return len(data)

    def flush(self) -> None:
        self._out.flush()


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export_bundle` wrote — public information only."""

    path: Path
    size: int
    sha256: str
    entries: tuple[tuple[str, str, int], ...]  # (name, type, plaintext bytes)
    recipients: tuple[str, ...]
    signed_by: str | None
    armored: bool = False

    def __str__(self) -> str:
        names = ", ".join(f"{n} ({t})" for n, t, _ in self.entries)
        signed = f"; signed by {self.signed_by}" if self.signed_by else "; not signed"
        return (
            f"exported {len(self.entries)} item(s) to {self.path} ({self.size:,} bytes, "
            f"sha256 {self.sha256}) for {', '.join(self.recipients)}{signed}: {names}"
        )

    def _repr_html_(self) -> str:
        rows = "".join(
            f"<tr><td>{html.escape(n)}</td><td>{html.escape(t)}</td><td>{s:,}</td></tr>"
            for n, t, s in self.entries
        )
        signed = html.escape(self.signed_by) if self.signed_by else "not signed"
        return (
            f"<div><b>🔒 Encrypted export written</b>: <code>{html.escape(str(self.path))}</code>"
            f" ({self.size:,} bytes)<br>sha256 <code>{self.sha256}</code><br>"
            f"for: {html.escape(', '.join(self.recipients))}; signature: {signed}"
            f"<table><tr><th>entry</th><th>type</th><th>bytes</th></tr>{rows}</table></div>"
        )


def _entries_for(
    items: Mapping[str, Any], *, allow_pickle: bool, progress: Progress | None
) -> list[Entry]:
    entries: list[Entry] = []
    failures: list[str] = []
    for i, (name, obj) in enumerate(items.items()):
        if progress:
            progress(0.5 * i / max(len(items), 1), f"serialising {name}")
        try:
            type_name, parts, meta = serializers.dump(obj, allow_pickle=allow_pickle)
        except SerializationError as exc:
            failures.append(f"{name}: {exc}")
            continue
        entries.append(Entry(name, type_name, parts, serializers.json_safe(meta)))
    if failures:
        raise SerializationError(
            "nothing was exported; these items can't be serialised safely — " + "; ".join(failures)
        )
    return entries


def notebook_entry(
    path: str | os.PathLike, *, strip_outputs: bool = False, clear_widget_state: bool = False
) -> Entry:
    """The notebook file as a bundle entry (optionally without outputs / widget state)."""
    src = Path(path).expanduser()
    if not src.is_file():
        raise InvalidParameterError(f"notebook {src} not found; type its path")
    data = clean_notebook(
        src.read_bytes(), strip_outputs=strip_outputs, clear_widget_state=clear_widget_state
    )
    meta = {
        "filename": src.name,
        "outputs_stripped": strip_outputs,
        "widget_state_cleared": clear_widget_state,
    }
    return Entry(src.name, NOTEBOOK_TYPE, {"ipynb": data}, meta)


def export_bundle(
    items: Mapping[str, Any],
    path: str | os.PathLike,
    *,
    recipients: Sequence[RecipientSpec] | RecipientSpec | None = None,
    passphrase: str | Secret | None = None,
    sign_with: str | os.PathLike | SigningKey | None = None,
    notebook: str | os.PathLike | None = None,
    strip_outputs: bool = False,
    clear_widget_state: bool = False,
    force: bool = False,
    allow_pickle: bool = False,
    armor: bool = False,
    progress: Progress | None = None,
    work_factor: int = age.DEFAULT_SCRYPT_WORK_FACTOR,
) -> ExportResult:
    """Encrypt ``items`` (name → object) and optionally the notebook into ONE age file.

    Everything is serialised before the file is opened; on any failure no file is left behind
    (the write is atomic) and an existing file is untouched.
    """
    if not items and notebook is None:
        raise InvalidParameterError("nothing to export: choose at least one item")
    target = check_output(path, force=force)  # before serialising anything
    recips, shown = recipients_for(recipients, passphrase, work_factor)
    signer = load_signing_key(sign_with) if sign_with is not None else None
    entries = _entries_for(items, allow_pickle=allow_pickle, progress=progress)
    if notebook is not None:
        entry = notebook_entry(
            notebook, strip_outputs=strip_outputs, clear_widget_state=clear_widget_state
        )
        if entry.name in items:
            raise InvalidParameterError(f"an item is already named {entry.name!r}")
        entries.append(entry)
    total = sum(len(p) for e in entries for p in e.parts.values())
    with atomic_output(target, force=force) as f:
        sink = _HashingWriter(f, total, progress)
        writer = age.EncryptWriter(sink, recips, armor=armor)
        write_container(
            writer, entries, created=now_iso(), sign_with=signer, metadata={"kind": BUNDLE_KIND}
        )
        writer.close()
    if progress:
        progress(1.0, "done")
    return ExportResult(
        path=target,
        size=sink.size,
        sha256=sink.sha256.hexdigest(),
        entries=tuple((e.name, e.type, sum(len(p) for p in e.parts.values())) for e in entries),
        recipients=shown,
        signed_by=str(signer.public()) if signer else None,
        armored=armor,
    )


# --- reading --------------------------------------------------------------------------------


class Bundle(Mapping[str, Any]):
    """A read-only mapping over a bundle's entries, deserialised lazily on first access.

    The payload was authenticated and the signature (if asked for) verified when the bundle
    was opened; each entry's digest is checked again when it is read.
    """

    def __init__(
        self,
        reader: ContainerReader,
        *,
        allow_pickle: bool = False,
        max_expanded_bytes: int | None = None,
    ) -> None:
        self._reader = reader
        self._allow_pickle = allow_pickle
        self._max_expanded = max_expanded_bytes
        self._cache: dict[str, Any] = {}

    @property
    def manifest(self) -> dict:
        return self._reader.manifest

    @property
    def signed(self) -> bool:
        return self._reader.signature is not None

    @property
    def verified_by(self) -> str | None:
        return self._reader.verified_by

    @property
    def signature_status(self) -> SignatureStatus:
        """``verified`` (by ``verify_with`` or a trusted signer), ``unverified`` or ``unsigned``."""
        return self._reader.signature_status

    def info(self) -> list[dict]:
        """Name, type and size of each entry (nothing deserialised)."""
        return [
            {"name": e["name"], "type": e["type"], "size": sum(p["size"] for p in e["parts"])}
            for e in self._reader.entries
        ]

    def __getitem__(self, name: str) -> Any:
        if name not in self._cache:
            entry = self._reader.entry(name)
            with expansion_limit(self._max_expanded):
                self._cache[name] = serializers.load(
                    entry["type"],
                    self._reader.read_parts(name),
                    entry.get("meta", {}),
                    allow_pickle=self._allow_pickle,
                )
        return self._cache[name]

    def __iter__(self) -> Iterator[str]:
        return iter(e["name"] for e in self._reader.entries)

    def __len__(self) -> int:
        return len(self._reader.entries)

    def __repr__(self) -> str:
        items = ", ".join(f"{i['name']}: {i['type']}" for i in self.info())
        return f"<Bundle {len(self)} entries ({self.signature_status}): {items}>"

    def _repr_html_(self) -> str:
        rows = "".join(
            f"<tr><td>{html.escape(i['name'])}</td><td>{html.escape(i['type'])}</td>"
            f"<td>{i['size']:,}</td></tr>"
            for i in self.info()
        )
        return f"<div>{html.escape(repr(self))}<table>{rows}</table></div>"


def load_bundle(
    path: str | os.PathLike,
    *,
    identities: Any = None,
    passphrase: str | Secret | None = None,
    verify_with: Any = None,
    allow_pickle: bool = False,
    require_signature: bool | None = None,
    max_expanded_bytes: int | None = None,
) -> Bundle:
    """Open a bundle written by :func:`export_bundle` (signature judged first; see
    :func:`kprivacy_nb.crypto.store.secure_load` for the trust policy)."""
    reader = open_container(
        path,
        identities=identities,
        passphrase=passphrase,
        verify_with=verify_with,
        require_signature=require_signature,
    )
    return Bundle(reader, allow_pickle=allow_pickle, max_expanded_bytes=max_expanded_bytes)


# --- encrypted cell outputs -----------------------------------------------------------------


_MAX_OUTPUT_DEPTH = 48  # below limits.MAX_JSON_DEPTH, so the blob opens again
_MAX_OUTPUT_NODES = 1_000_000


class _JsonReady:
    """Turns whatever a cell displayed into JSON values (see :func:`outputs_json`)."""

    def __init__(self) -> None:
        self.nodes = 0
        self.path: set[int] = set()

    def note(self, value: Any, why: str) -> str:
        return f"[kprivacy_nb: {type(value).__name__} value dropped: {why}]"

    def __call__(self, value: Any, depth: int = 0) -> Any:
        self.nodes += 1
        if self.nodes > _MAX_OUTPUT_NODES:
            return self.note(value, "too many values")
        if value is None or isinstance(value, (bool, int, float)):
            return value
        if isinstance(value, str):
            # Lone surrogates can't be UTF-8 encoded: replaced rather than failing the cell.
            return value if value.isascii() else value.encode("utf-8", "replace").decode()
        if isinstance(value, (bytes, bytearray, memoryview)):
            return base64.b64encode(bytes(value)).decode("ascii")  # as Jupyter sends binary MIME
        if not isinstance(value, (dict, list, tuple, set, frozenset)):
            return self.note(value, "not JSON data")
        if depth >= _MAX_OUTPUT_DEPTH:
            return self.note(value, "nested too deeply")
        if id(value) in self.path:
            return self.note(value, "it contains itself")
        self.path.add(id(value))
        try:
            if isinstance(value, dict):
                return {self._key(k): self(v, depth + 1) for k, v in value.items()}
            return [self(v, depth + 1) for v in value]
        finally:
            self.path.discard(id(value))

    def _key(self, key: Any) -> str:
        if isinstance(key, str):
            return self(key)
        if key is None or isinstance(key, (bool, int, float)):
            return json.dumps(key)
        return self.note(key, "not a string key")


def outputs_json(outputs: list[dict]) -> bytes:
    """Output dicts as UTF-8 JSON, whatever they hold: bytes become base64 (as Jupyter sends
    binary MIME data), sets and tuples lists, and anything else a one-line note — never an
    exception that would carry the outputs in a traceback."""
    return json.dumps(_JsonReady()(outputs), ensure_ascii=False).encode()


def encrypt_outputs(
    outputs: list[dict],
    *,
    recipients: Sequence[RecipientSpec] | RecipientSpec | None = None,
    passphrase: str | Secret | None = None,
    sign_with: str | os.PathLike | SigningKey | None = None,
    work_factor: int = age.DEFAULT_SCRYPT_WORK_FACTOR,
) -> tuple[str, tuple[str, ...]]:
    """Encrypt nbformat-style output dicts as one ASCII-armored age file (in memory).

    Returns the armored text and the recipients (public parts) it was encrypted to. Any failure
    after the keys are resolved is one line (:class:`OutputsNotEncryptedError`), raised from a
    frame that no longer holds the outputs: a verbose traceback (``%xmode Verbose`` prints every
    frame's locals) can't show them.
    """
    recips, shown = recipients_for(recipients, passphrase, work_factor)
    signer = load_signing_key(sign_with) if sign_with is not None else None
    try:
        armored = _seal_outputs(outputs, recips, signer)
        failure = None
    except Exception as exc:  # noqa: BLE001 - whatever it was, its traceback holds plaintext
        failure = type(exc).__name__
    del outputs
    if failure is not None:
        raise OutputsNotEncryptedError(
            f"the outputs could not be encrypted ({failure}); they were discarded, not shown"
        ) from None
    return armored, shown


def _seal_outputs(outputs: list[dict], recips: list, signer: SigningKey | None) -> str:
    data = outputs_json(outputs)
    entry = Entry("outputs", OUTPUTS_TYPE, {"outputs.json": data}, {"count": len(outputs)})
    buf = io.BytesIO()
    writer = age.EncryptWriter(buf, recips, armor=True)
    write_container(writer, [entry], created=now_iso(), sign_with=signer)
    writer.close()
    return buf.getvalue().decode("ascii")


def open_outputs(
    armored: str,
    *,
    identities: Any = None,
    passphrase: str | Secret | None = None,
    verify_with: Any = None,
    require_signature: bool | None = None,
) -> tuple[list[dict], SignatureStatus]:
    """Decrypt what :func:`encrypt_outputs` produced: the output dicts and who vouches for them."""
    raw = armored.encode("ascii", errors="replace")
    reader = open_container_from(
        lambda: io.BytesIO(raw),
        identities=identities,
        passphrase=passphrase,
        verify_with=verify_with,
        require_signature=require_signature,
    )
    entry = reader.entry("outputs")
    if entry["type"] != OUTPUTS_TYPE:
        raise SerializationError("this blob does not hold encrypted cell outputs")
    outputs = serializers.load(OUTPUTS_TYPE, reader.read_parts("outputs"), entry.get("meta", {}))
    return outputs, reader.signature_status


def decrypt_outputs(
    armored: str,
    *,
    identities: Any = None,
    passphrase: str | Secret | None = None,
    verify_with: Any = None,
) -> list[dict]:
    """Decrypt what :func:`encrypt_outputs` produced back into output dicts."""
    return open_outputs(
        armored, identities=identities, passphrase=passphrase, verify_with=verify_with
    )[0]
