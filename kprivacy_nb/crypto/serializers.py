"""The one serialiser registry: how each kind of object becomes container parts, and back.

Every serialiser is pickle-free except ``pickle`` itself, which needs ``allow_pickle=True`` both to
save and to load. Unknown types are refused. TensorFlow/Keras is imported only inside the Keras
functions, and only when the object already is a Keras model (so Keras is already loaded).

Types (``Serializer.type``): ``dp.result``, ``keras.model``, ``matplotlib.figure``,
``pandas.dataframe``, ``numpy.ndarray``, ``bytes``, ``text``, ``file``, ``folder``, ``pickle``.
"""

from __future__ import annotations

import io
import json
import sys
import tarfile
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import FileExistsRefusedError, KPrivacyError, OutputPathError, SerializationError
from .archives import (
    check_h5,
    check_npz,
    load_npy,
    load_npz,
    open_zip,
    read_json_member,
    read_member,
    read_tar,
    safe_member_name,
)
from .limits import expansion_budget, loads_json
from .printable import printable

Parts = dict[str, bytes]


@dataclass(frozen=True)
class Serializer:
    type: str
    matches: Callable[[Any], bool]
    dump: Callable[[Any], tuple[Parts, dict]]
    load: Callable[[Parts, dict], Any]
    needs_pickle: bool = False


REGISTRY: list[Serializer] = []


def register(ser: Serializer) -> Serializer:
    REGISTRY.append(ser)
    return ser


def _module_loaded(name: str) -> Any:
    return sys.modules.get(name)


def json_safe(obj: Any) -> Any:
    """Best-effort conversion of metadata (numpy scalars, tuples…) to JSON values."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    for attr in ("item", "tolist"):
        if hasattr(obj, attr):
            try:
                return json_safe(getattr(obj, attr)())
            except (TypeError, ValueError):
                pass
    for attr in ("to_dict", "as_dict", "_asdict"):
        if callable(getattr(obj, attr, None)):
            return json_safe(getattr(obj, attr)())
    if hasattr(obj, "__dataclass_fields__"):
        import dataclasses

        return json_safe(dataclasses.asdict(obj))
    return str(obj)


# --- Keras ----------------------------------------------------------------------------------------

KERAS_MEMBERS = {"metadata.json", "config.json", "model.weights.h5", "model.weights.npz"}
_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
_ALLOWED_MODULE_PREFIXES = ("keras", "builtins")


def _is_keras_model(obj: Any) -> bool:
    keras = _module_loaded("keras")
    return keras is not None and isinstance(obj, keras.Model)


def _keras_layers(model: Any) -> list[Any]:
    flatten = getattr(model, "_flatten_layers", None)
    if callable(flatten):
        return list(flatten(include_self=True, recursive=True))
    return [model, *getattr(model, "layers", [])]


def dump_keras(model: Any) -> tuple[Parts, dict]:
    """A ``.keras`` archive built in memory (no temp file holds weights or config)."""
    from keras.src.saving import saving_lib

    with_assets = [
        layer.name
        for layer in _keras_layers(model)
        if callable(getattr(layer, "save_assets", None))
    ]
    if with_assets:
        raise SerializationError(
            f"layers {', '.join(with_assets)} keep assets (e.g. lookup vocabularies) that Keras "
            "writes to a temp folder on disk; refusing so no plaintext touches disk"
        )
    buf = io.BytesIO()
    try:
        _write_keras_archive(saving_lib, model, buf)
    except (AttributeError, TypeError):  # pragma: no cover - Keras internals moved
        # Public path: same archive; Keras creates (and removes) an empty temp folder for
        # assets, which holds no data since asset-carrying layers were refused above.
        buf = io.BytesIO()  # no .name: Keras keeps the weights in memory for file objects
        saving_lib.save_model(model, buf)
    data = buf.getvalue()
    check_keras_archive(data)  # refuse now what could not be loaded safely later
    meta = {"class": type(model).__name__, "_libraries": ["keras", "tensorflow"]}
    return {"model.keras": data}, meta


def _write_keras_archive(saving_lib: Any, model: Any, buf: io.BytesIO) -> None:
    """The ``.keras`` zip (metadata, config, HDF5 weights) written straight into ``buf``.

    Same layout as ``keras.saving.save_model``, minus the asset store (Keras creates a temp
    folder for it even when there are no assets), so nothing at all touches the disk.
    """
    config_json, metadata_json = saving_lib._serialize_model_as_json(model)
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("metadata.json", metadata_json)
        zf.writestr("config.json", config_json)
        store = saving_lib.H5IOStore("model.weights.h5", archive=zf, mode="w")
        try:
            saving_lib._save_state(
                model,
                weights_store=store,
                assets_store=None,
                inner_path="",
                visited_saveables=set(),
            )
        finally:
            store.close()


def check_keras_archive(data: bytes) -> None:
    """Refuse legacy HDF5, unexpected or oversized archive members, Lambda layers and
    non-Keras modules — before Keras reads anything."""
    if data.startswith(_HDF5_MAGIC):
        raise SerializationError("refused: legacy .h5 Keras models are not loaded (unsafe format)")
    zf = open_zip(data, "the .keras archive")
    names = set(zf.namelist())
    if not names <= KERAS_MEMBERS or "config.json" not in names:
        raise SerializationError(
            "refused: unexpected files in the .keras archive "
            f"({', '.join(sorted(names - KERAS_MEMBERS)) or 'config.json missing'})"
        )
    config = read_json_member(zf, "config.json", "the .keras archive")
    if "metadata.json" in names:
        read_json_member(zf, "metadata.json", "the .keras archive")
    if "model.weights.h5" in names:
        check_h5(read_member(zf, "model.weights.h5", "the .keras archive"), "the model weights")
    if "model.weights.npz" in names:
        # Keras inflates each array of this nested zip: bound them (against the same budget).
        npz = read_member(zf, "model.weights.npz", "the .keras archive")
        check_npz(npz, "the model weights (model.weights.npz)")

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if node.get("class_name") in ("Lambda", "function", "__lambda__"):
                raise SerializationError(
                    "refused: the model contains a Lambda layer or serialized Python code; "
                    "it can run arbitrary code when loaded"
                )
            module = node.get("module")
            if isinstance(module, str) and not module.startswith(_ALLOWED_MODULE_PREFIXES):
                raise SerializationError(
                    f"refused: the model config names the module {module!r}; only Keras' own "
                    "classes are loaded"
                )
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(config)


def load_keras(parts: Parts, meta: dict) -> Any:
    data = parts["model.keras"]
    check_keras_archive(data)
    # keras.saving.load_model only takes paths; saving_lib takes file objects (kept in memory).
    from keras.src.saving import saving_lib

    try:
        return saving_lib.load_model(io.BytesIO(data), safe_mode=True)
    except (ValueError, TypeError) as exc:
        raise SerializationError(f"refused by Keras safe_mode: {str(exc)[:300]}") from None


register(Serializer("keras.model", _is_keras_model, dump_keras, load_keras))


# --- DP run result (kprivacy_nb.dp.trainer.DPFitResult, duck-typed) -------------------------------

_DP_FIELDS = ("epsilon", "delta", "noise_multiplier", "steps")


def _is_dp_result(obj: Any) -> bool:
    return type(obj).__name__ == "DPFitResult" or (
        all(hasattr(obj, a) for a in ("model", "history", *_DP_FIELDS))
        and _is_keras_model(getattr(obj, "model", None))
    )


def privacy_card_of(obj: Any) -> dict | None:
    for attr in ("privacy_card", "card", "summary"):  # DPFitResult.summary() is its card
        card = getattr(obj, attr, None)
        if card is None:
            continue
        if callable(card) and not isinstance(card, dict):
            card = card()
        return json_safe(card) if isinstance(json_safe(card), dict) else {"text": str(card)}
    return None


def _history_dict(history: Any) -> Any:
    if hasattr(history, "history") and isinstance(history.history, dict):
        history = history.history
    return json_safe(history)


def dump_dp_result(res: Any) -> tuple[Parts, dict]:
    parts, meta = dump_keras(res.model)
    fields = {a: json_safe(getattr(res, a)) for a in _DP_FIELDS}
    for extra in ("epsilon_curve", "clipping", "accountant", "sampling"):
        if hasattr(res, extra):
            fields[extra] = json_safe(getattr(res, extra))
    card = privacy_card_of(res) or {k: fields[k] for k in _DP_FIELDS}
    parts["privacy_card.json"] = json.dumps(card, sort_keys=True).encode()
    parts["history.json"] = json.dumps(_history_dict(getattr(res, "history", None))).encode()
    meta.update({"privacy_card": card, "dp": fields})
    return parts, meta


@dataclass
class LoadedDPRun:
    """A DP training run loaded from a file: the model and what its privacy cost was."""

    model: Any
    epsilon: float | None
    delta: float | None
    noise_multiplier: float | None
    steps: int | None
    history: Any
    privacy_card: dict
    extra: dict = field(default_factory=dict)

    def _repr_html_(self) -> str:
        import html

        rows = "".join(
            f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>"
            for k, v in self.privacy_card.items()
        )
        return f"<div><b>DP run (loaded)</b><table>{rows}</table></div>"


def load_dp_result(parts: Parts, meta: dict) -> LoadedDPRun:
    model = load_keras(parts, meta)
    card = loads_json(parts.get("privacy_card.json", b"{}"), "privacy card")
    fields = meta.get("dp", {})
    return LoadedDPRun(
        model=model,
        epsilon=fields.get("epsilon"),
        delta=fields.get("delta"),
        noise_multiplier=fields.get("noise_multiplier"),
        steps=fields.get("steps"),
        history=loads_json(parts.get("history.json", b"null"), "training history"),
        privacy_card=card,
        extra={k: v for k, v in fields.items() if k not in _DP_FIELDS},
    )


REGISTRY.insert(0, Serializer("dp.result", _is_dp_result, dump_dp_result, load_dp_result))


# --- matplotlib figures ---------------------------------------------------------------------------


def _is_figure(obj: Any) -> bool:
    mpl_figure = _module_loaded("matplotlib.figure")
    return mpl_figure is not None and isinstance(obj, mpl_figure.Figure)


def dump_figure(fig: Any) -> tuple[Parts, dict]:
    png, svg = io.BytesIO(), io.BytesIO()
    fig.savefig(png, format="png")
    fig.savefig(svg, format="svg")
    return {"figure.png": png.getvalue(), "figure.svg": svg.getvalue()}, {
        "_libraries": ["matplotlib"]
    }


@dataclass
class SavedFigure:
    """A figure loaded back as images (PNG and SVG); displays itself in Jupyter."""

    png: bytes = field(repr=False)
    svg: bytes = field(repr=False)

    def _repr_png_(self) -> bytes:
        return self.png  # the SVG is not displayed: it could carry script (use .svg yourself)


register(
    Serializer(
        "matplotlib.figure",
        _is_figure,
        dump_figure,
        lambda p, m: SavedFigure(p["figure.png"], p["figure.svg"]),
    )
)


# --- pandas ---------------------------------------------------------------------------------------


def _is_dataframe(obj: Any) -> bool:
    pd = _module_loaded("pandas")
    return pd is not None and isinstance(obj, pd.DataFrame)


def _series_parts(values: Any, key: str, arrays: dict, cols: list) -> dict:
    """Describe one column (or the index) pickle-free: numpy arrays or JSON lists."""
    import numpy as np
    import pandas as pd

    dtype = values.dtype
    if isinstance(dtype, pd.CategoricalDtype):
        arrays[key] = np.asarray(values.cat.codes if hasattr(values, "cat") else values.codes)
        cats = values.cat.categories if hasattr(values, "cat") else values.categories
        return {"kind": "category", "categories": json_safe(list(cats)), "ordered": dtype.ordered}
    if getattr(dtype, "kind", "O") in "biufcmM" and isinstance(dtype, np.dtype):
        arrays[key] = np.asarray(values)
        return {"kind": "numpy"}
    if str(dtype) in ("object", "string", "str") or isinstance(dtype, pd.StringDtype):
        items = list(values)
        if not all(
            isinstance(v, str) or v is None or (isinstance(v, float) and v != v) for v in items
        ):
            raise SerializationError(
                f"column {key!r} holds Python objects other than strings; convert it first "
                "(or pass allow_pickle=True)"
            )
        return {
            "kind": "strings",
            "dtype": str(dtype),
            "values": [None if not isinstance(v, str) else v for v in items],
        }
    raise SerializationError(
        f"column {key!r} has dtype {dtype} that the pickle-free DataFrame format can't store"
    )


def dump_dataframe(df: Any) -> tuple[Parts, dict]:
    import numpy as np
    import pandas as pd

    if isinstance(df.columns, pd.MultiIndex) or isinstance(df.index, pd.MultiIndex):
        raise SerializationError("MultiIndex DataFrames are not supported; reset_index() first")
    arrays: dict = {}
    cols = []
    for i, name in enumerate(df.columns):
        if not isinstance(name, (str, int, float)):
            raise SerializationError("DataFrame column names must be strings or numbers")
        desc = _series_parts(df.iloc[:, i], f"c{i}", arrays, cols)
        desc["name"] = json_safe(name)
        cols.append(desc)
    if isinstance(df.index, pd.RangeIndex):
        index = {
            "kind": "range",
            "start": df.index.start,
            "stop": df.index.stop,
            "step": df.index.step,
        }
    else:
        index = _series_parts(pd.Series(df.index), "index", arrays, cols)
    index["name"] = json_safe(df.index.name)
    buf = io.BytesIO()
    np.savez(buf, allow_pickle=False, **arrays)
    schema = {"columns": cols, "index": index, "shape": list(df.shape)}
    return {"schema.json": json.dumps(schema).encode(), "arrays.npz": buf.getvalue()}, {
        "shape": list(df.shape),
        "_libraries": ["pandas"],
    }


_INT64 = range(-(2**63), 2**63)


def _range_bounds(idx: dict) -> tuple[int, int, int]:
    """A stored RangeIndex's start/stop/step: int64 integers, step not 0 (else refused)."""
    bounds = tuple(idx.get(k) for k in ("start", "stop", "step"))
    if not all(type(b) is int and b in _INT64 for b in bounds) or bounds[2] == 0:
        raise SerializationError(
            "refused: the DataFrame's RangeIndex is malformed (start/stop/step must be 64-bit "
            "integers and step non-zero); the file may be corrupted or crafted"
        )
    return bounds  # type: ignore[return-value]


def load_dataframe(parts: Parts, meta: dict) -> Any:
    import pandas as pd

    schema = loads_json(parts["schema.json"], "DataFrame schema")
    arrays = load_npz(parts["arrays.npz"], "DataFrame arrays.npz")

    def rebuild(desc: dict, key: str) -> Any:
        if desc["kind"] == "numpy":
            return arrays[key]
        if desc["kind"] == "category":
            return pd.Categorical.from_codes(
                arrays[key], categories=desc["categories"], ordered=desc["ordered"]
            )
        dtype = desc["dtype"] if desc["dtype"] != "str" else None
        try:
            return pd.array(desc["values"], dtype=dtype)
        except ImportError:
            raise SerializationError(
                f"a column is stored as {printable(dtype, 40)}, which needs pyarrow here: "
                "`pip install pyarrow`, or have the sender convert it first with "
                "df.astype({col: 'string'}) (or 'object')"
            ) from None

    data = {i: rebuild(c, f"c{i}") for i, c in enumerate(schema["columns"])}
    idx = schema["index"]
    if idx["kind"] == "range":
        index = pd.RangeIndex(*_range_bounds(idx), name=idx["name"])
    else:
        index = pd.Index(rebuild(idx, "index"), name=idx["name"])
    df = pd.DataFrame(data, index=index)
    df.columns = [c["name"] for c in schema["columns"]]
    return df


register(Serializer("pandas.dataframe", _is_dataframe, dump_dataframe, load_dataframe))


# --- numpy ----------------------------------------------------------------------------------------


def _is_ndarray(obj: Any) -> bool:
    np = _module_loaded("numpy")
    return np is not None and isinstance(obj, np.ndarray)


def dump_ndarray(arr: Any) -> tuple[Parts, dict]:
    import numpy as np

    if arr.dtype.hasobject:
        raise SerializationError("object arrays need pickle; convert the array or allow pickle")
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return {"array.npy": buf.getvalue()}, {"shape": list(arr.shape), "dtype": str(arr.dtype)}


def load_ndarray(parts: Parts, meta: dict) -> Any:
    return load_npy(parts["array.npy"], "the stored array")


register(Serializer("numpy.ndarray", _is_ndarray, dump_ndarray, load_ndarray))


# --- bytes and text -------------------------------------------------------------------------------

register(
    Serializer(
        "bytes",
        lambda o: isinstance(o, (bytes, bytearray, memoryview)),
        lambda o: ({"data": bytes(o)}, {}),
        lambda p, m: p["data"],
    )
)
register(
    Serializer(
        "text",
        lambda o: isinstance(o, str),
        lambda o: ({"text.txt": o.encode("utf-8")}, {"encoding": "utf-8"}),
        lambda p, m: p["text.txt"].decode("utf-8"),
    )
)


# --- files and folders ----------------------------------------------------------------------------


@dataclass
class RestoredFiles:
    """Files loaded from an encrypted file, held in memory until you write them somewhere.

    ``files`` maps relative POSIX paths to bytes. :meth:`extract` writes them (0600) under a
    folder, refusing absolute paths, ``..`` and existing files unless ``force``.
    """

    name: str
    kind: str
    files: dict[str, bytes] = field(repr=False)

    def __repr__(self) -> str:
        return f"RestoredFiles(name={self.name!r}, kind={self.kind!r}, files={len(self.files)})"

    @property
    def data(self) -> bytes:
        if self.kind != "file":
            raise AttributeError("a folder has several files; use .files or .extract()")
        return next(iter(self.files.values()))

    def extract(self, folder: str | Path, *, force: bool = False) -> list[Path]:
        """Write the files under ``folder`` (0600); returns their paths.

        Every name is checked before anything is written (a name that is unsafe, written twice,
        outside ``folder``, where a file is in the way, or already there without ``force``), and
        every failure is one :class:`~kprivacy_nb.errors.KPrivacyError` line.
        """
        from .outputs import atomic_output

        root = Path(folder).expanduser().resolve()
        targets = self._targets(root, force=force)
        written = []
        for (rel, data), target in zip(self.files.items(), targets, strict=True):
            try:
                target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
                with atomic_output(target, force=force) as f:
                    f.write(data)
            except KPrivacyError:
                raise
            except OSError as exc:
                raise OutputPathError(
                    f"cannot write {printable(rel)} under {root}: {exc.strerror or exc}"
                ) from None
            written.append(target)
        return written

    def _targets(self, root: Path, *, force: bool) -> list[Path]:
        targets: list[Path] = []
        seen: set[Path] = set()
        for rel in self.files:
            safe_member_name(rel)
            try:
                resolved = (root / rel).resolve()
            except (OSError, RuntimeError):
                raise OutputPathError(f"cannot resolve {printable(rel)} under {root}") from None
            if resolved in seen:
                raise SerializationError(f"refused: {printable(rel)} is listed twice")
            seen.add(resolved)
            if root != resolved and root not in resolved.parents:
                raise SerializationError(
                    f"refused: {printable(rel)} would be written outside {root}"
                )
            inside = [p for p in resolved.parents if p.is_relative_to(root)]
            if any(p in seen or (p.exists() and not p.is_dir()) for p in inside):
                raise OutputPathError(
                    f"cannot write {printable(rel)}: a file is in the way of its folder"
                )
            if resolved.is_dir() or (resolved.exists() and not force):
                raise FileExistsRefusedError(
                    f"{resolved} exists; pass force=True to overwrite (nothing was written)"
                )
            targets.append(resolved)
        return targets


def _is_path(obj: Any) -> bool:
    return isinstance(obj, Path)


def dump_path(path: Path) -> tuple[Parts, dict]:
    path = path.expanduser()
    if not path.exists():
        raise SerializationError(f"{path} does not exist")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:

        def clean(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
            if not (info.isfile() or info.isdir()):
                return None  # links and devices are not stored
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            return info

        tar.add(str(path), arcname=path.name, recursive=True, filter=clean)
    kind = "folder" if path.is_dir() else "file"
    return {"files.tar": buf.getvalue()}, {"kind": kind, "name": path.name}


def load_path(parts: Parts, meta: dict) -> RestoredFiles:
    files = read_tar(parts["files.tar"], "the stored files")
    return RestoredFiles(str(meta.get("name", "")), str(meta.get("kind", "folder")), files)


register(Serializer("files", _is_path, dump_path, load_path))


# --- pickle (opt-in only) -------------------------------------------------------------------------

PICKLE_WARNING = (
    "pickle was allowed: loading a pickle runs code chosen by whoever wrote the file; "
    "only load pickles you created yourself"
)


def _dump_pickle(obj: Any) -> tuple[Parts, dict]:
    import pickle

    return {"object.pickle": pickle.dumps(obj, protocol=5)}, {"class": type(obj).__qualname__}


def _load_pickle(parts: Parts, meta: dict) -> Any:
    import pickle

    return pickle.loads(parts["object.pickle"])  # noqa: S301 - only with allow_pickle=True


PICKLE = Serializer("pickle", lambda o: True, _dump_pickle, _load_pickle, needs_pickle=True)


# --- registry entry points ------------------------------------------------------------------------


def serializer_for(obj: Any, *, allow_pickle: bool = False) -> Serializer:
    for ser in REGISTRY:
        if ser.matches(obj):
            return ser
    if allow_pickle:
        warnings.warn(PICKLE_WARNING, UserWarning, stacklevel=3)
        return PICKLE
    raise SerializationError(
        f"don't know how to store a {type(obj).__module__}.{type(obj).__qualname__} safely "
        f"(supported: {', '.join(s.type for s in REGISTRY)}). Convert it, or pass "
        "--allow-pickle (allow_pickle=True) if you accept the risks of pickle"
    )


def by_type(type_name: str, *, allow_pickle: bool = False) -> Serializer:
    if type_name == "pickle":
        if not allow_pickle:
            raise SerializationError(
                "refused: this file holds a pickle, which can run arbitrary code when loaded; "
                "pass --allow-pickle (allow_pickle=True) only if you trust who wrote it"
            )
        warnings.warn(PICKLE_WARNING, UserWarning, stacklevel=3)
        return PICKLE
    for ser in REGISTRY:
        if ser.type == type_name:
            return ser
    raise SerializationError(
        f"unknown entry type {type_name!r}: written by a newer kprivacy-nb? Upgrade to load it"
    )


def dump(obj: Any, *, allow_pickle: bool = False) -> tuple[str, Parts, dict]:
    ser = serializer_for(obj, allow_pickle=allow_pickle)
    parts, meta = ser.dump(obj)
    return ser.type, parts, meta


def load(type_name: str, parts: Parts, meta: dict, *, allow_pickle: bool = False) -> Any:
    """Deserialise one entry; any way its parts can be malformed ends in a SerializationError."""
    ser = by_type(type_name, allow_pickle=allow_pickle)
    if not isinstance(meta, dict):
        raise SerializationError(f"malformed {type_name} entry: its metadata is not an object")
    try:
        with expansion_budget():  # nested archives of one entry share one expansion limit
            return ser.load(parts, meta)
    except KPrivacyError:
        raise
    except (
        ArithmeticError,
        AttributeError,
        EOFError,
        IndexError,
        KeyError,
        LookupError,
        MemoryError,
        OSError,
        RecursionError,
        RuntimeError,
        TypeError,
        ValueError,
        tarfile.TarError,
        zipfile.BadZipFile,
    ) as exc:
        raise SerializationError(
            f"malformed {type_name} entry ({type(exc).__name__}); the file may be corrupted "
            "or crafted"
        ) from None
