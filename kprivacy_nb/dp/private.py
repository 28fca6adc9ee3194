"""``make_private(model)``: Keras' own ``model.fit`` trains with DP-SGD.

``make_private`` keeps the model object and its compiled optimizer, loss and metrics; it gives the
instance a ``fit`` that

1. takes the data as they are (NumPy arrays, ``np.memmap``, pandas, dicts/lists of arrays — anything
   with ``__len__`` and fancy indexing) and never loads the whole set: each step's rows are
   Poisson-sampled (CSPRNG) and gathered on the host, in a ``tf.data`` pipeline that also carries
   the step's Gaussian noise (:mod:`.noise`), so the traced step never sees the dataset;
2. plans the run before the first step — σ calibrated for a target ε (counting earlier ``fit`` calls
   on the same model), the ledger's reservation, the engine's self-check (:mod:`.clipping.selfcheck`)
   including the traced-step probe at this batch size;
3. hands that pipeline to Keras' real ``fit`` with a DP ``train_step`` (per-example clipping,
   optional micro-batches, noise once per logical step, the compiled optimizer), so callbacks,
   validation, progress bars, ``initial_epoch`` and ``EarlyStopping`` behave as Keras users expect;
4. writes ε after every epoch into the logs (``history.history["epsilon"]``) and, when ``fit``
   ends for any reason, the privacy card of everything the model was trained on into
   ``model.privacy`` and the ledger.

Training-set metrics are computed from the private data without noise: the DP ``train_step``
reports none unless ``include_training_metrics=True`` (then the card says they are not covered by
ε). Validation metrics come from Keras' ``evaluate`` on the validation data, as usual.
"""

from __future__ import annotations

import functools
import hashlib
import math
import time
import types
import weakref
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import InvalidParameterError, TrainingError
from . import accounting
from .engine import PRIVATE_UPDATE, private_update  # noqa: F401  (re-exported for compat)

__all__ = ["PrivacyState", "make_private"]

#: Rows read per chunk when scanning data for NaN/inf before training (bounded memory).
SCAN_ROWS = 65536


@dataclass
class PrivacyState:
    """What ``make_private`` attached to a model, and what its ``fit`` calls have spent."""

    l2_norm_clip: float
    noise_multiplier: float | None
    target_epsilon: float | None
    delta: float | None
    sampling: str
    accountant: str
    ledger: Any
    physical_batch_size: int | None
    seed: int | None
    include_training_metrics: bool
    runs: list[tuple[accounting.Mechanism, int]] = field(default_factory=list)
    fresh_data: bool = False
    original_fit: Any = None
    # The last fit's checked engine and traced step, reused by the next fit when nothing they
    # depend on changed (see _reusable_engine): a fit-per-epoch loop pays the self-check once.
    engine_key: Any = None
    engine: Any = None
    traced: Any = None  # (engine, counters, Keras train_function) of the last fit

    def event(self, extra: tuple[accounting.Mechanism, int] | None = None) -> Any:
        runs = [(m, s) for m, s in [*self.runs, *([extra] if extra else [])] if s > 0]
        return accounting.composed([m.event(s) for m, s in runs]) if runs else None


_STATES: weakref.WeakKeyDictionary[Any, PrivacyState] = weakref.WeakKeyDictionary()


def privacy_state(model: Any) -> PrivacyState | None:
    """The :class:`PrivacyState` of a model made private (None otherwise)."""
    return _STATES.get(model)


def make_private(
    model: Any,
    *,
    l2_norm_clip: float = 1.0,
    noise_multiplier: float | None = None,
    target_epsilon: float | None = None,
    delta: float | None = None,
    sampling: str = "poisson",
    accountant: str = "pld",
    ledger: Any = None,
    physical_batch_size: int | None = None,
    seed: int | None = None,
    include_training_metrics: bool = False,
    fresh_data: bool = False,
) -> Any:
    """Make ``model.fit`` train with DP-SGD; returns the same (compiled) model.

    Give ``noise_multiplier`` (σ) or ``target_epsilon`` (σ is calibrated when ``fit`` starts, from
    n, epochs and batch_size, so that every ``fit`` call on this model together stays within the
    target). ``delta`` defaults to the ledger's δ (with ``ledger``), else to the largest power of ten
    ≤ 1/(10·n); it is fixed at the first ``fit``.
    ``physical_batch_size`` splits each (Poisson) batch into micro-batches of at most that many
    rows: the same step in a fraction of the tensor memory (a one-block transformer at batch 64
    holds ~3× less with 16), for some speed (its steps ~1.4× longer; a recurrent layer's much
    more). The running sum holds a copy of every weight, so a small model with a large embedding
    table can take more memory split than whole. ``ledger`` (a budget
    name, or ``(name, Ledger)``) is charged for every ``fit``. A model made private again keeps what it spent (its earlier private runs
    compose with the next) unless ``fresh_data=True`` declares that it will now train on
    different people's data — the card then says so. After ``fit``: ``history.history["epsilon"]`` (ε after each epoch, all
    calls included) and ``model.privacy`` (the privacy card).

    >>> model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy",
    ...               metrics=["accuracy"])                                    # doctest: +SKIP
    >>> make_private(model, target_epsilon=3.0, delta=1e-5)                     # doctest: +SKIP
    >>> history = model.fit(x, y, epochs=10, batch_size=256, validation_split=0.1)  # doctest: +SKIP
    >>> model.privacy.epsilon <= 3.0                                             # doctest: +SKIP
    True
    """
    import keras

    if not isinstance(model, keras.Model):
        raise InvalidParameterError(f"model must be a keras.Model, got {type(model).__name__}")
    carried = getattr(getattr(model, "optimizer", None), "dp_settings", None)
    if carried is not None:  # compiled with a kprivacy_nb.compat.tensorflow_privacy DP optimizer
        if (
            target_epsilon is not None
            or noise_multiplier not in (None, carried.noise_multiplier)
            or l2_norm_clip not in (1.0, carried.l2_norm_clip)
        ):
            raise InvalidParameterError(
                f"{type(model.optimizer).__name__} already sets l2_norm_clip="
                f"{carried.l2_norm_clip:g} and noise_multiplier={carried.noise_multiplier:g}: "
                "omit them here (or compile with a plain Keras optimizer to use target_epsilon)"
            )
        l2_norm_clip, noise_multiplier = carried.l2_norm_clip, carried.noise_multiplier
    if (noise_multiplier is None) == (target_epsilon is None):
        raise InvalidParameterError(
            "give exactly one of noise_multiplier (σ) or target_epsilon (σ is then calibrated)"
        )
    clip = accounting.check_clip(l2_norm_clip)
    if noise_multiplier is not None and not (
        math.isfinite(float(noise_multiplier)) and float(noise_multiplier) >= 0
    ):
        raise InvalidParameterError(f"noise_multiplier must be ≥ 0, got {noise_multiplier}")
    if target_epsilon is not None:
        _positive("target_epsilon", target_epsilon)
    if delta is not None and not 0 < float(delta) < 1:
        raise InvalidParameterError(f"delta must be between 0 and 1 (exclusive), got {delta}")
    sampling, accountant = str(sampling).lower(), str(accountant).lower()
    accounting._check_choice("sampling", sampling, accounting.SAMPLINGS)
    accounting._check_choice("accountant", accountant, accounting.ACCOUNTANTS)
    if physical_batch_size is not None:
        # (Batch sizes are 32-bit in the graph: a larger value would not split anything.)
        physical_batch_size = accounting._check_int(
            "physical_batch_size", physical_batch_size, maximum=2**31 - 1
        )
    if noise_multiplier is not None and float(noise_multiplier) == 0 and ledger is not None:
        raise InvalidParameterError(
            "noise_multiplier=0 has ε = ∞: it cannot be charged to a ledger"
        )
    old = _STATES.get(model)
    state = PrivacyState(
        l2_norm_clip=clip, noise_multiplier=None if noise_multiplier is None else float(noise_multiplier),
        target_epsilon=None if target_epsilon is None else float(target_epsilon),
        delta=None if delta is None else float(delta), sampling=sampling, accountant=accountant,
        ledger=ledger, physical_batch_size=physical_batch_size, seed=seed,
        include_training_metrics=bool(include_training_metrics),
        original_fit=type(model).fit,
    )  # fmt: skip
    state.fresh_data = bool(fresh_data)
    if old is not None and not fresh_data:  # made private again: the spending stays with it
        state.runs = old.runs
        if old.delta is not None and state.delta is None:
            state.delta = old.delta
        elif old.runs and state.delta != old.delta:
            raise InvalidParameterError(
                f"this model was already trained privately with δ={old.delta:g}; runs on the "
                "same data compose only at one δ — keep it (or omit delta)"
            )
    if old is None:
        _warn_if_trained_before(model)
    _STATES[model] = state
    object.__setattr__(model, "fit", types.MethodType(_private_fit, model))
    # Every other way into Keras' training step would train without clipping or noise, and
    # without being counted: refused (the DP step is put in place by ``fit`` only).
    object.__setattr__(model, "train_step", _refusing_step)
    object.__setattr__(model, "train_on_batch", types.MethodType(_refuse_train_on_batch, model))
    model.train_function = None
    return model


def _warn_if_trained_before(model: Any) -> None:
    """ε covers the private fits only: a model whose optimizer already took steps outside
    them may have seen the data without clipping or noise, which no ε describes."""
    optimizer = getattr(model, "optimizer", None)
    try:
        taken = int(getattr(optimizer, "iterations", 0))
    except (TypeError, ValueError):
        return
    if taken <= 0:
        return
    import warnings

    from ..errors import PrivacyBudgetWarning, caller_stacklevel

    warnings.warn(
        f"this model's optimizer has already taken {taken} steps outside make_private: ε will "
        "cover the private fits from now on only. If those steps used the data you train on "
        "now, the model is not private at that ε; start from fresh weights (or weights trained "
        "on public data only) and a fresh optimizer",
        PrivacyBudgetWarning, stacklevel=caller_stacklevel(),
    )  # fmt: skip


def _refusal() -> TrainingError:
    return TrainingError(
        "this model was made private: train it with model.fit(x, y, ...) — train_on_batch, "
        "a custom loop over train_step or keras.Model.fit(model, ...) would skip clipping, noise "
        "and accounting"
    )


def _refusing_step(data: Any) -> Any:
    raise _refusal()


def _refuse_train_on_batch(model: Any, *args: Any, **kwargs: Any) -> Any:
    raise _refusal()


def _positive(name: str, value: Any) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise InvalidParameterError(f"{name} must be a positive number, got {value!r}") from None
    if not (out > 0 and math.isfinite(out)):
        raise InvalidParameterError(f"{name} must be a positive number, got {value!r}")
    return out


# --------------------------------------------------------------------------- data


def _refuse_streams(x: Any) -> None:
    import keras
    import tensorflow as tf

    kind = None
    if isinstance(x, tf.data.Dataset):
        kind = "a tf.data.Dataset"
    elif isinstance(x, keras.utils.PyDataset):
        kind = "a keras.utils.PyDataset"
    elif isinstance(x, types.GeneratorType) or (
        hasattr(x, "__next__") and not hasattr(x, "__getitem__")
    ):
        kind = "a generator"
    if kind:
        raise InvalidParameterError(
            f"x is {kind}: its batches are made elsewhere, so the examples of a step cannot be "
            "Poisson-sampled — the amplification the ε relies on. Pass the data as arrays "
            "(NumPy, np.memmap, pandas, a dict of arrays: nothing is loaded at once; rows are "
            "gathered per step)"
        )


def _as_columns(data: Any, what: str) -> Any:
    """``data`` as a structure of row-indexable arrays (no copy for NumPy / memmap)."""
    try:
        import pandas as pd
    except ImportError:  # pragma: no cover - pandas is a declared dependency
        pd = None
    if pd is not None and isinstance(data, pd.DataFrame):
        bad = [
            str(c) for c, t in data.dtypes.items()
            if not (pd.api.types.is_numeric_dtype(t) or pd.api.types.is_bool_dtype(t))
        ]  # fmt: skip
        if bad:
            raise InvalidParameterError(
                f"{what}: column(s) {', '.join(map(repr, bad[:5]))}"
                f"{' …' if len(bad) > 5 else ''} are not numeric (text, dates or mixed): encode "
                "them (pandas.get_dummies, .cat.codes) or drop them before training"
            )
        return _frame_array(data)
    if pd is not None and isinstance(data, pd.Series):
        if not (pd.api.types.is_numeric_dtype(data) or pd.api.types.is_bool_dtype(data)):
            raise InvalidParameterError(_text_labels(what))
        return _frame_array(data)
    if isinstance(data, dict):
        return {k: _as_columns(v, f"{what}[{k!r}]") for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        if data and all(np.ndim(v) == 0 for v in data):
            return np.asarray(data)
        return type(data)(_as_columns(v, f"{what}[{i}]") for i, v in enumerate(data))
    if isinstance(data, np.ndarray):
        if data.dtype.kind in "USO":
            raise InvalidParameterError(_text_labels(what))
        return data
    if hasattr(data, "__len__") and hasattr(data, "__getitem__") and hasattr(data, "shape"):
        return data
    try:
        arr = np.asarray(data)
    except Exception:  # noqa: BLE001 - anything unconvertible gets one clear message
        arr = None
    if arr is None or arr.dtype == object or arr.ndim == 0:
        raise InvalidParameterError(
            f"{what}: expected arrays (NumPy, np.memmap, pandas, or dicts/lists of them), got "
            f"{type(data).__name__}"
        )
    return arr


def _frame_array(data: Any) -> np.ndarray:
    """A numeric DataFrame or Series as one NumPy array: float64 when its columns mix kinds
    (floats and booleans) or use pandas' nullable types (a missing value becomes NaN, which is
    then refused with its row and column)."""
    arr = data.to_numpy()
    if arr.dtype == object:
        arr = data.astype("float64").to_numpy()
    return arr


def _text_labels(what: str) -> str:
    if what == "y":
        return (
            "y holds text (or Python objects), not numbers: encode the labels as integers "
            "0…k-1, e.g. y = pandas.factorize(y)[0] (keep the mapping to decode predictions)"
        )
    return f"{what} holds text (or Python objects), not numbers: encode or drop such columns"


def _input_arrays(model: Any, x: Any) -> list[np.ndarray | None]:
    """The data of each model input, in the model's input order (a dict's by the inputs'
    names), where it is a NumPy array of numbers: an Embedding reading an input directly has
    its ids range-checked against it before anything is spent."""
    inputs = list(getattr(model, "inputs", None) or [])
    leaves = _leaves(x)
    if len(inputs) <= 1 and len(leaves) == 1:
        arrays = leaves
    elif isinstance(x, dict):
        arrays = [x.get(getattr(t, "name", None)) for t in inputs]
    elif isinstance(x, (list, tuple)) and len(x) == len(inputs):
        arrays = list(x)
    else:
        arrays = []
    return [a if isinstance(a, np.ndarray) and a.dtype.kind in "iuf" else None for a in arrays]


def _leaves(data: Any) -> list[Any]:
    if isinstance(data, dict):
        return [leaf for v in data.values() for leaf in _leaves(v)]
    if isinstance(data, (list, tuple)):
        return [leaf for v in data for leaf in _leaves(v)]
    return [data]


def _map(fn: Any, data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _map(fn, v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return type(data)(_map(fn, v) for v in data)
    return fn(data)


def _rows(data: Any, what: str) -> int:
    sizes = {len(leaf) for leaf in _leaves(data)}
    if len(sizes) != 1:
        raise InvalidParameterError(
            f"{what}: every input array needs the same number of rows; got {sorted(sizes)}"
        )
    return sizes.pop()


def _take(data: Any, idx: np.ndarray) -> Any:
    """Rows ``idx`` (sorted: memmaps read forward) as float32 / integer arrays."""

    def one(a: Any) -> np.ndarray:
        out = np.asarray(a[idx])
        if out.dtype.kind == "f" and out.dtype != np.float32:
            out = out.astype(np.float32)
        elif out.dtype.kind == "b":
            out = out.astype(np.float32)
        return out

    return _map(one, data)


def _scan_finite(data: Any, what: str) -> tuple[str, ...]:
    """Refuse NaN/inf before anything is spent, reading ``SCAN_ROWS`` rows at a time; returns a
    hash of each leaf's bytes, made in the same pass (:func:`_engine_key` compares them)."""
    digests = []
    for leaf in _leaves(data):
        dtype = np.dtype(getattr(leaf, "dtype", np.float32))
        if dtype.kind == "O":
            raise InvalidParameterError(f"{what} must be numeric (got an object array)")
        digest = hashlib.blake2b(digest_size=16)
        for start in range(0, len(leaf), SCAN_ROWS):
            rows = np.ascontiguousarray(leaf[start : start + SCAN_ROWS])
            digest.update(rows.view(np.uint8).tobytes())
            if dtype.kind != "f":
                continue
            bad = ~np.isfinite(rows.astype(np.float32, copy=False))
            if bad.any():
                where = [int(i) for i in np.argwhere(bad)[0]]
                at = f"row {start + where[0]}" + (
                    f", column {tuple(where[1:])}" if len(where) > 1 else ""
                )
                raise InvalidParameterError(
                    f"{what} has a non-finite value (NaN or inf, or too large for float32) at "
                    f"{at}: clean or drop such rows before training (nothing was spent)"
                )
        digests.append(digest.hexdigest())
    return tuple(digests)


def _sparse_categorical(loss: Any) -> tuple[bool, Any]:
    """Whether ``loss`` takes class indices (sparse categorical cross-entropy), and the
    ``ignore_class`` it skips."""
    if isinstance(loss, str):
        return loss in ("sparse_categorical_crossentropy", "SparseCategoricalCrossentropy"), None
    fn = getattr(loss, "fn", loss)  # a Loss object wraps its function
    name = getattr(fn, "__name__", "") or getattr(loss, "name", "")
    ignore = (getattr(loss, "_fn_kwargs", None) or {}).get("ignore_class")
    return name == "sparse_categorical_crossentropy", ignore


def _check_class_labels(loss: Any, preds: Any, y: Any) -> None:
    """Refuse class indices a sparse categorical loss cannot take, before anything is spent.
    Unchecked, the first step that samples such a row stops training halfway, with
    TensorFlow's error listing the labels of every other example in that batch."""
    sparse, ignore = _sparse_categorical(loss)
    classes = preds.shape[-1] if getattr(preds, "shape", None) is not None else None
    if not sparse or classes is None:
        return
    for leaf in _leaves(y):
        for start in range(0, len(leaf), SCAN_ROWS):
            rows = np.asarray(leaf[start : start + SCAN_ROWS])
            bad = (rows < 0) | (rows >= classes) | (rows != np.floor(rows))
            if ignore is not None:
                bad &= rows != ignore
            if bad.any():
                row = start + int(np.argwhere(bad)[0][0])
                raise InvalidParameterError(
                    f"y: row {row} has a class label outside 0…{classes - 1} (the model has "
                    f"{classes} outputs and the loss takes class indices): fix or drop such "
                    "rows before training (nothing was spent)"
                )


def _split(data: Any, start: int, stop: int) -> Any:
    return _map(lambda a: a[start:stop], data)


def _sample_weights(
    n: int, y: Any, sample_weight: Any, class_weight: dict | None
) -> np.ndarray | None:
    w = None
    if sample_weight is not None:
        w = np.asarray(sample_weight, np.float64).reshape(-1)
        if w.shape[0] != n:
            raise InvalidParameterError(f"sample_weight has {w.shape[0]} values for {n} rows")
    if class_weight:
        if not isinstance(class_weight, dict):
            raise InvalidParameterError("class_weight must be a dict {class: weight}")
        labels = np.asarray(y)
        if labels.ndim > 1 and labels.shape[-1] > 1:
            labels = labels.argmax(-1)
        labels = labels.reshape(-1).astype(np.int64)
        cw = np.ones(n)
        for cls, weight in class_weight.items():
            cw[labels == int(cls)] = float(weight)
        w = cw if w is None else w * cw
    if w is not None and not (np.all(np.isfinite(w)) and np.all(w >= 0)):
        raise InvalidParameterError("sample_weight/class_weight must be finite and ≥ 0")
    return None if w is None else w.astype(np.float32)


# --------------------------------------------------------------------------- plan


@dataclass
class FitPlan:
    """Everything decided before the first step of one ``fit`` call."""

    model: Any
    state: PrivacyState
    x: Any
    y: Any
    weights: np.ndarray | None
    validation_data: Any
    epochs: int
    initial_epoch: int
    delta: float
    mechanism: accounting.Mechanism
    engine: Any  # DPSGDEngine (self-checked)
    validation_split: float = 0.0
    delta_source: str = "given"
    reservation: Any = None
    ledger_name: str | None = None
    ledger_cap: float | None = None
    ledger_spent: float | None = None
    strategy: Any = None  # a tf.distribute strategy with several replicas (distribute.py)
    engine_reused: bool = False  # the last fit's checked engine (no self-check ran this time)
    accuracy_name: str = "accuracy"  # the key the training accuracy is logged under

    @property
    def run_epochs(self) -> int:
        return self.epochs - self.initial_epoch

    @functools.cached_property
    def planned_curve(self) -> accounting.EpsilonCurve:
        """ε after each epoch of this call alone (one accountant pass for all epochs)."""
        m = self.mechanism
        return accounting.epsilon_curve(
            m.n, m.batch_size, self.run_epochs, m.noise_multiplier, self.delta,
            sampling=m.sampling, accountant=self.state.accountant,
        )  # fmt: skip

    def epsilon_after(self, steps: int) -> float:
        """ε of everything this model was trained on, if this call runs ``steps`` steps."""
        spe = self.mechanism.steps_per_epoch
        if not any(s for _, s in self.state.runs) and steps and steps % spe == 0:
            epochs = steps // spe  # on the plan: read off the curve instead of a new pass
            if epochs <= self.run_epochs and self.planned_curve.steps[epochs - 1] == steps:
                return float(self.planned_curve.epsilon[epochs - 1])
        event = self.state.event((self.mechanism, steps))
        if event is None:
            return 0.0
        return accounting.epsilon_of_event(event, self.delta, self.state.accountant)


def plan_fit(
    model: Any,
    x: Any,
    y: Any,
    *,
    batch_size: int | None,
    epochs: int,
    validation_split: float = 0.0,
    validation_data: Any = None,
    class_weight: dict | None = None,
    sample_weight: Any = None,
    initial_epoch: int = 0,
    accuracy: Any = None,
    build_metrics: bool = True,
    status: Any = None,
) -> FitPlan:
    """Check the data, fix δ and σ, build the engine and run its self-check (nothing spent).

    ``status(message)``, if given, hears what is being done while it takes time (calibrating
    σ, the self-check) — the slow part of a cold start has something on screen."""
    try:
        return _plan(model, x, y, batch_size=batch_size, epochs=epochs,
                     validation_split=validation_split, validation_data=validation_data,
                     class_weight=class_weight, sample_weight=sample_weight,
                     initial_epoch=initial_epoch, accuracy=accuracy,
                     build_metrics=build_metrics, status=status)  # fmt: skip
    except (InvalidParameterError, TrainingError) as exc:
        # Every refusal here comes before the ledger and the card: say so, once.
        text = str(exc)
        if "nothing was spent" in text or "spent nothing" in text or len(exc.args) != 1:
            raise
        try:
            said = type(exc)(f"{text} (this fit spent nothing)")
        except TypeError:  # (a subclass with other arguments: as it is)
            raise exc from exc.__cause__
        raise said from exc.__cause__


def _plan(
    model: Any, x: Any, y: Any, *, batch_size: int | None, epochs: int, validation_split: float,
    validation_data: Any, class_weight: dict | None, sample_weight: Any, initial_epoch: int,
    accuracy: Any, build_metrics: bool, status: Any,
) -> FitPlan:  # fmt: skip
    from .distribute import check_distributable, first_replica, strategy_for

    strategy = strategy_for(model)
    kwargs = dict(
        batch_size=batch_size, epochs=epochs, validation_split=validation_split,
        validation_data=validation_data, class_weight=class_weight, sample_weight=sample_weight,
        initial_epoch=initial_epoch, accuracy=accuracy, status=status or (lambda message: None),
    )  # fmt: skip
    if strategy is None:
        plan = _plan_fit(model, x, y, build_metrics=build_metrics, **kwargs)
        _build_optimizer(plan)
        return plan
    check_distributable(_STATES[model])
    with strategy.scope():  # the optimizer's slots are mirrored like the weights
        with first_replica(strategy):  # the checks run on this worker's first copy
            plan = _plan_fit(model, x, y, build_metrics=False, **kwargs)
        _build_optimizer(plan)
    plan.strategy = strategy
    return plan


#: A fit under ``target_epsilon`` whose model has already spent at least this share of the
#: target gets a warning: its σ is calibrated to the little that is left.
MOSTLY_SPENT = 0.5


def _warn_if_mostly_spent(state: PrivacyState, delta: float, sigma: float, status: Any) -> None:
    """Say so when earlier private fits of this model already spent most of ``target_epsilon``:
    this fit then trains on almost pure noise, which nobody wants to find out from the card."""
    prior = state.event()
    if prior is None:
        return
    spent = accounting.epsilon_of_event(prior, delta, state.accountant)
    target = float(state.target_epsilon)
    earlier = max((m.noise_multiplier for m, steps in state.runs if steps > 0), default=0.0)
    if spent < MOSTLY_SPENT * target or sigma <= earlier:
        return  # (σ no larger than any earlier fit's: not "mostly noise", whatever was spent)
    message = (
        f"this model's earlier private fits already spent ε = {spent:.3g} of its target "
        f"{target:g} (ε covers every private fit of a model), so this fit gets σ = {sigma:.3g}: "
        "mostly noise. If it trains on other people's data, say so with fresh_data=True "
        "(--fresh-data); otherwise raise target_epsilon or stop training"
    )
    import warnings

    from ..errors import PrivacyBudgetWarning, caller_stacklevel

    warnings.warn(message, PrivacyBudgetWarning, stacklevel=caller_stacklevel())


def _engine_key(
    model: Any,
    state: PrivacyState,
    leaves: list[Any],
    digests: tuple[str, ...],
    batch_size: int,
    accuracy: Any,
) -> tuple[tuple, tuple]:
    """What a checked engine depends on: ``(objects, values)``. The objects — the model's loss,
    optimizer, trainable weights and the data arrays (``leaves``) — must be the very same
    (compared with ``is``; held here, so no new object can take an old one's id); the values —
    clipping settings, the batch size of the traced probe, the data's shapes, dtypes and the
    hashes of its bytes (``digests``, from :func:`_scan_finite`) — must be equal."""
    objects = (model.loss, getattr(model, "optimizer", None), accuracy,
               *model.trainable_variables, *leaves)  # fmt: skip
    values = (
        state.l2_norm_clip, state.physical_batch_size, int(batch_size), digests,
        tuple((np.shape(a), str(getattr(a, "dtype", ""))) for a in leaves),
    )  # fmt: skip
    return objects, values


def _reusable_engine(state: PrivacyState, key: tuple[tuple, tuple], sigma: float) -> Any:
    """The last fit's engine if nothing in ``key`` changed (its self-check and traced probe
    then hold as they are); σ may change, but not between zero and non-zero (the traced step
    differs)."""
    engine, old = state.engine, state.engine_key
    if engine is None or old is None:
        return None
    (objects, values), (old_objects, old_values) = key, old
    same = len(objects) == len(old_objects) and all(
        a is b for a, b in zip(objects, old_objects, strict=True)
    )
    if not same or values != old_values:
        return None
    std = float(sigma) * float(state.l2_norm_clip)
    if (std > 0) != (engine.noise_std > 0):
        return None
    engine.noise_std = std
    return engine


def _warn_on_slow_recurrences(model: Any, report: dict[str, str]) -> None:
    """A recurrent layer off its fast path runs per-example gradients through the whole
    recurrence, tens of times slower (an LSTM with dropout=0.2: ~50×): say so before training,
    with the reason and the way back."""
    import warnings

    import keras

    from ..errors import SlowPathWarning, caller_stacklevel
    from .clipping.model import flatten_layers

    for layer in flatten_layers(model):
        path = report.get(layer.name, "")
        if not isinstance(layer, keras.layers.RNN) or "fallback" not in path:
            continue
        advice = (
            " A keras.layers.Dropout before or after the layer keeps it on the fast path."
            if "dropout" in path
            else ""
        )
        warnings.warn(
            f"the recurrent layer {layer.name!r} takes the slow per-example path ({path}): its "
            f"steps cost tens of times those of its fast path.{advice}",
            SlowPathWarning, stacklevel=caller_stacklevel(),
        )  # fmt: skip


def _build_optimizer(plan: FitPlan) -> None:
    optimizer = plan.engine.optimizer
    if not getattr(optimizer, "built", True):  # its slots exist before the step is traced
        optimizer.build(plan.engine.variables)


def _plan_fit(
    model: Any,
    x: Any,
    y: Any,
    *,
    batch_size: int | None,
    epochs: int,
    validation_split: float,
    validation_data: Any,
    class_weight: dict | None,
    sample_weight: Any,
    initial_epoch: int,
    accuracy: Any,
    build_metrics: bool,
    status: Any,
) -> FitPlan:
    from .clipping import per_example_loss_fn
    from .engine import DPSGDEngine

    state = _STATES[model]
    if getattr(model, "optimizer", None) is None or getattr(model, "loss", None) is None:
        raise TrainingError(
            "compile the model first (model.compile(optimizer=..., loss=..., metrics=...)): "
            "make_private uses the compiled optimizer, loss and metrics"
        )
    _refuse_streams(x)  # first: a tf.data Dataset comes without y
    if x is None or y is None:
        raise InvalidParameterError("fit needs x and y (unsupervised losses are not supported)")
    x, y = _as_columns(x, "x"), _as_columns(y, "y")
    if isinstance(y, (dict, list, tuple)):
        raise InvalidParameterError("models with several outputs/losses are not supported yet")
    from .clipping import per_example_loss_fn as _loss_fn
    from .trainer import _check_fits, _head

    preds = _check_fits(model, _loss_fn(model.loss), _head(x, "x"), _head(y, "y"))
    n_all = _rows(x, "x")
    if _rows(y, "y") != n_all:
        raise InvalidParameterError(f"x has {n_all} rows but y has {len(y)}: they must match")
    weights = _sample_weights(n_all, y, sample_weight, class_weight)
    if validation_data is None and validation_split:
        if not 0 < float(validation_split) < 1:
            raise InvalidParameterError(
                f"validation_split must be in (0, 1), got {validation_split}"
            )
        cut = int(n_all * (1.0 - float(validation_split)))  # the last rows, as Keras does
        validation_data = (_map(lambda a: np.asarray(a[cut:]), x), np.asarray(y[cut:]))
        x, y = _split(x, 0, cut), y[:cut]
        weights = None if weights is None else weights[:cut]
    n = _rows(x, "x")
    batch_size = 32 if batch_size is None else accounting._check_int("batch_size", batch_size)
    epochs = accounting._check_int("epochs", epochs)
    initial_epoch = int(initial_epoch)
    if not 0 <= initial_epoch < epochs:
        raise InvalidParameterError(f"initial_epoch must be in [0, epochs), got {initial_epoch}")
    digests = (*_scan_finite(x, "x"), *_scan_finite(y, "y"))
    _check_class_labels(model.loss, preds, y)
    delta, delta_source = state.delta, "given"
    if state.ledger is not None:
        from .ledger import resolve_ledger

        target = resolve_ledger(state.ledger)
        if target is not None:  # (a budget that does not exist is refused before any work)
            budget = target.budget()
            if delta is None:  # the ε charged to the budget is at its δ: report the same
                delta, delta_source = budget.delta, f"the ledger budget {target.name!r}"
    if delta is None:
        delta = accounting.default_delta(n)
        delta_source = f"defaulted (largest power of ten ≤ 1/(10·n), n={n})"
    elif state.runs and delta_source == "given":
        delta_source = "fixed by the first private fit of this model"
    no_noise = state.noise_multiplier == 0
    accounting.validate(
        n, batch_size, epochs=epochs - initial_epoch, noise_multiplier=state.noise_multiplier,
        delta=delta, sampling=state.sampling, accountant=state.accountant,
        allow_no_noise=no_noise,
    )  # fmt: skip
    if state.target_epsilon is not None:
        status(
            f"calibrating σ for ε = {state.target_epsilon:g} at δ = {delta:g} "
            f"({epochs - initial_epoch} epochs, batch {batch_size} of {n})…"
        )
        sigma = accounting.calibrate_noise(
            state.target_epsilon, n, batch_size, epochs - initial_epoch, delta,
            sampling=state.sampling, accountant=state.accountant, prior=state.event(),
        )  # fmt: skip
        _warn_if_mostly_spent(state, delta, sigma, status)
    else:
        sigma = float(state.noise_multiplier)
    rows = np.arange(min(n, max(16, min(batch_size, 512))))
    import tensorflow as tf

    X = tf.nest.map_structure(tf.constant, _take(x, rows))
    Y = tf.constant(_take(y, rows))
    key = _engine_key(model, state, [*_leaves(x), *_leaves(y)], digests, batch_size, accuracy)
    engine = _reusable_engine(state, key, sigma)
    reused = engine is not None
    if reused:
        status(f"σ = {sigma:.4g}; per-example clipping as checked for the last fit (same model, "
               "data and settings)")  # fmt: skip
    else:
        from .clipping.selfcheck import example_count

        checked = min(example_count(X), len(rows))
        status(f"σ = {sigma:.4g}; checking per-example clipping on {checked} real examples (and "
               f"the traced step on {len(rows)})…")  # fmt: skip
        engine = DPSGDEngine(
            model, per_example_loss_fn(model.loss), None, l2_norm_clip=state.l2_norm_clip,
            noise_multiplier=sigma, X=X, Y=Y, accuracy=accuracy,
            physical_batch_size=state.physical_batch_size,
            input_arrays=_input_arrays(model, x),
            batch_spec=batch_specs(x, y),
        )  # fmt: skip
        engine.check_sensitivity(X, Y, batch_size)
        state.engine_key, state.engine, state.traced = key, engine, None
        _warn_on_slow_recurrences(model, engine.report)
    if build_metrics:
        # Keras reads every compiled metric at the end of an epoch: they must be built. One
        # update builds them; the values are thrown away at once (the DP step never updates
        # them).
        x8 = tf.nest.map_structure(lambda t: t[:8], X)
        model.compute_metrics(x8, Y[:8], model(x8, training=False), sample_weight=None)
        model.reset_metrics()
    return FitPlan(
        model=model, state=state, x=x, y=y, weights=weights, validation_data=validation_data,
        epochs=epochs, initial_epoch=initial_epoch, delta=delta,
        mechanism=accounting.Mechanism(n, batch_size, sigma, state.sampling), engine=engine,
        validation_split=float(validation_split) if validation_split else 0.0,
        delta_source=delta_source, engine_reused=reused,
    )  # fmt: skip


def reserve(plan: FitPlan, description: str) -> None:
    """Reserve the planned spend in the ledger (refused up front if it would overspend).

    Under ``tf.distribute`` only the chief reserves (and later settles): the run is charged once;
    every worker learns whether it may start (:func:`.distribute.agree`) before any step."""
    if plan.strategy is not None:
        from .distribute import chief_only

        chief_only(plan.strategy, lambda: _reserve(plan, description))
        return
    _reserve(plan, description)


def _reserve(plan: FitPlan, description: str) -> None:
    state = plan.state
    if state.ledger is None:
        return
    from .ledger import resolve_ledger

    target = resolve_ledger(state.ledger)
    if target is None:
        return
    budget = target.budget()
    plan.ledger_name = target.name
    plan.ledger_cap, plan.ledger_spent = budget.epsilon_cap, budget.committed_epsilon
    steps = plan.run_epochs * plan.mechanism.steps_per_epoch
    plan.reservation = target.reserve(
        plan.mechanism.event(steps), accountant=state.accountant, description=description
    )


# --------------------------------------------------------------------------- run


class _Counters:
    """Step counter and per-epoch sums, updated inside the traced step (all public except the
    sums, which never leave the notebook unless ``include_training_metrics``)."""

    def __init__(self) -> None:
        import tensorflow as tf

        def var(dtype: Any) -> Any:
            return tf.Variable(tf.zeros([], dtype), trainable=False)

        self.traces = 0
        self.steps = var(tf.int64)
        self.not_applied = var(tf.float32)
        self.sums = tf.Variable(tf.zeros([4]), trainable=False)  # loss, count, correct, dropped
        self.noise: Any = None  # this fit's GaussianNoise (set by run_fit)
        self.noise_std = 0.0

    def draw_noise(self, denominator: Any) -> np.ndarray:
        """The step's flat noise vector, N(0, σ²C²/denominator²) (called from the step)."""
        return self.noise.next(self.noise_std / float(denominator))

    def reset_epoch(self) -> None:
        self.sums.assign([0.0, 0.0, 0.0, 0.0])

    def restart(self) -> None:
        """Zero everything for a new fit (the same counters serve a reused traced step)."""
        self.traces = 0  # traces of this fit's step (0 when the last fit's trace is reused)
        self.steps.assign(0)
        self.not_applied.assign(0.0)
        self.reset_epoch()

    def step_count(self) -> int:
        return int(self.steps.numpy())

    def epoch_sums(self) -> list[float]:
        """``[loss_sum, count, correct_sum, dropped]`` of this epoch so far."""
        return [float(v) for v in self.sums.numpy()]

    def failed(self) -> bool:
        """Whether a noisy update was not finite (and so not applied)."""
        return float(self.not_applied.numpy()) > 0


def _train_step(engine: Any, counters: _Counters) -> Any:
    import tensorflow as tf

    def train_step(data: Any) -> dict[str, Any]:
        counters.traces += 1  # this Python body runs once per trace
        inputs, y, w = data
        counters.steps.assign_add(1)  # counted before anything else: every step that ran counts
        repeated = inputs.get("repeated", ())
        noise = inputs["noise"]
        if engine.noise_std > 0:
            # Drawn here, not carried in the pipeline: the batches tf.data prefetches would
            # each hold a copy the size of the model.
            noise = tf.numpy_function(
                counters.draw_noise, [inputs["meta"][0]], tf.float32, stateful=True
            )
            noise.set_shape([None])
        out = engine.update(inputs["x"], y, w, inputs["meta"], noise, *repeated)
        counters.sums.assign_add([out[0], out[1], out[2], out[4]])
        counters.not_applied.assign_add(1.0 - out[3])
        # Keras needs at least one value per step; the step count is public.
        return {"dp_steps": counters.steps.value()}

    return train_step


def epoch_callback(plan: FitPlan, counters: Any, on_epoch: Any = None) -> Any:
    """A Keras callback: ε (and, only if asked, training metrics) into each epoch's logs before
    History records them; stops ``fit`` when a noisy update was not finite."""
    import keras

    class EpochLogger(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
            counters.reset_epoch()
            self._started = time.perf_counter()

        def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
            if counters.failed():
                self.model.stop_training = True

        def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
            logs = logs if logs is not None else {}
            logs.pop("dp_steps", None)
            loss, count, correct, dropped = counters.epoch_sums()
            train = {"loss": loss / max(count, 1.0)}
            if plan.engine.accuracy is not None:
                train[plan.accuracy_name] = correct / max(count, 1.0)
            if plan.state.include_training_metrics:
                logs.update(train)
            seconds = time.perf_counter() - self._started  # the epoch's training (and validation)
            steps = counters.step_count()
            logs["epsilon"] = plan.epsilon_after(steps)
            if on_epoch is not None:
                on_epoch(epoch + 1, train, dict(logs), steps, seconds, int(dropped))

    return EpochLogger()


def run_fit(
    plan: FitPlan,
    *,
    callbacks: Any = None,
    verbose: Any = "auto",
    on_epoch: Any = None,
    validation_steps: int | None = None,
    validation_batch_size: int | None = None,
    validation_freq: int = 1,
) -> Any:
    """Keras' ``fit`` over the Poisson pipeline with the DP step; the card and the ledger are
    written when it ends, however it ends. Returns Keras' ``History``."""
    if plan.strategy is not None:  # several replicas or workers: our own loop (distribute.py)
        from .distribute import run_distributed_fit

        return run_distributed_fit(
            plan, callbacks=callbacks, verbose=verbose, on_epoch=on_epoch,
            validation_steps=validation_steps, validation_batch_size=validation_batch_size,
            validation_freq=validation_freq,
        )  # fmt: skip
    model, state, engine = plan.model, plan.state, plan.engine
    traced = state.traced if state.traced is not None and state.traced[0] is engine else None
    counters = traced[1] if traced else _Counters()
    counters.restart()
    from .noise import GaussianNoise

    dataset = _pipeline(plan)
    noise = GaussianNoise(engine.sizes, run_seed(state), prefetch=engine.noise_std > 0)
    counters.noise, counters.noise_std = noise, engine.noise_std
    original_step = model.__dict__.get("train_step")
    saved_jit = getattr(model, "jit_compile", False)
    history, interrupted, started, steps, traces = None, False, time.perf_counter(), 0, 0
    try:
        object.__setattr__(
            model, "train_step", traced[3] if traced else _train_step(engine, counters)
        )
        model.jit_compile = False
        # Keras traces the DP step on the first fit; later fits of the same engine reuse it (it
        # is kept in our state, never left on the model for a non-private fit to find).
        model.train_function = traced[2] if traced else None
        history = state.original_fit(
            model, dataset, epochs=plan.epochs, verbose=verbose,
            callbacks=[epoch_callback(plan, counters, on_epoch), *(callbacks or [])],
            validation_data=plan.validation_data, initial_epoch=plan.initial_epoch,
            validation_steps=validation_steps, validation_batch_size=validation_batch_size,
            validation_freq=validation_freq, shuffle=False,
        )  # fmt: skip
    except KeyboardInterrupt:
        interrupted = True
        raise
    finally:
        noise.close()
        traces = counters.traces
        if model.train_function is not None and not interrupted:
            state.traced = (engine, counters, model.train_function, model.train_step)
        object.__setattr__(model, "train_step", original_step or _refusing_step)
        model.train_function = None
        model.jit_compile = saved_jit
        steps = counters.step_count()
        finish_fit(plan, steps, history, started, interrupted, int(traces))
    if counters.failed():
        raise diverged(steps)
    return history


def finish_fit(
    plan: FitPlan, steps: int, history: Any, started: float, interrupted: bool, traces: int
) -> None:
    """However ``fit`` ended: settle the ledger for the steps that ran, record them, write the
    card."""
    if plan.reservation is not None:
        if steps > 0:
            plan.reservation.settle(plan.mechanism.event(steps))
        else:
            plan.reservation.cancel()
    plan.state.runs.append((plan.mechanism, steps))
    plan.state.delta = plan.delta
    _set_card(plan, steps, history, started, interrupted, traces)


def diverged(steps: int) -> TrainingError:
    return TrainingError(
        f"the noisy update at step {steps} is not finite: the weights or the optimizer "
        "diverged. Training stopped and the weights from before that step were kept "
        f"({steps} steps charged). Lower the learning rate"
    )


def _say(message: str) -> None:
    """What a verbose private ``fit`` prints before its first step (where Keras prints its own
    progress), so a calibration that takes seconds does not look like a hang."""
    print(message, flush=True)


#: Compiled metrics reported as the training "accuracy" (with include_training_metrics).
_ACCURACY_METRICS = frozenset(
    {"accuracy", "acc", "binary_accuracy", "categorical_accuracy", "sparse_categorical_accuracy",
     "Accuracy", "BinaryAccuracy", "CategoricalAccuracy", "SparseCategoricalAccuracy"}
)  # fmt: skip


def _training_accuracy(model: Any, state: PrivacyState | None) -> tuple[Any, str]:
    """The per-example accuracy the step sums and the name it is logged under (the compiled
    metric's: "acc", "binary_accuracy"…), when the training accuracy is to be reported
    (``include_training_metrics`` and an accuracy among the compiled metrics)."""
    if state is None or not state.include_training_metrics:
        return None, "accuracy"
    try:
        metrics = (model.get_compile_config() or {}).get("metrics") or []
    except Exception:  # noqa: BLE001 - a model without a compile config reports no accuracy
        return None, "accuracy"
    for metric in _metric_leaves(metrics):
        if isinstance(metric, str):
            kind, name = metric, metric
        elif isinstance(metric, dict):
            kind = metric.get("class_name")
            name = (metric.get("config") or {}).get("name") or "accuracy"
        else:
            kind, name = type(metric).__name__, getattr(metric, "name", "accuracy")
        if kind in _ACCURACY_METRICS:
            from .engine import accuracy_fn

            return accuracy_fn(model.loss), str(name)
    return None, "accuracy"


def _metric_leaves(structure: Any) -> list[Any]:
    """Leaves of nested lists/tuples/dicts (a compile config's metrics)."""
    if isinstance(structure, dict) and "class_name" not in structure:
        return [leaf for value in structure.values() for leaf in _metric_leaves(value)]
    if isinstance(structure, (list, tuple)):
        return [leaf for item in structure for leaf in _metric_leaves(item)]
    return [structure]


def _warn_on_unreported_monitors(callbacks: Any, state: PrivacyState, accuracy: Any) -> None:
    """Warn up front about callbacks (EarlyStopping, ReduceLROnPlateau, ModelCheckpoint…) that
    watch a training-set metric a private fit does not report: they would silently do nothing.
    ``accuracy``: the name the training accuracy is logged under, if it is."""
    import warnings

    reported = {"epsilon"}
    if state.include_training_metrics:
        reported |= {"loss"} | ({accuracy} if accuracy else set())
    for callback in callbacks or []:
        monitor = getattr(callback, "monitor", None)
        if not isinstance(monitor, str) or monitor.startswith("val_") or monitor in reported:
            continue
        fix = (
            "Monitor a validation metric ('val_loss', with validation_data or "
            "validation_split), or pass include_training_metrics=True to make_private (the "
            "card then says they are not private)"
        )
        if state.include_training_metrics:
            fix = "Training-set metrics reported: " + ", ".join(sorted(reported - {"epsilon"}))
        warnings.warn(
            f"{type(callback).__name__} monitors {monitor!r}, which a private fit does not "
            "report: training-set metrics come from the private data without noise, so they "
            f"are not covered by ε. {fix}",
            UserWarning,
            stacklevel=3,
        )


def _private_fit(
    model: Any,
    x: Any = None,
    y: Any = None,
    batch_size: int | None = None,
    epochs: int = 1,
    verbose: Any = "auto",
    callbacks: Any = None,
    validation_split: float = 0.0,
    validation_data: Any = None,
    shuffle: bool = True,
    class_weight: dict | None = None,
    sample_weight: Any = None,
    initial_epoch: int = 0,
    steps_per_epoch: int | None = None,
    validation_steps: int | None = None,
    validation_batch_size: int | None = None,
    validation_freq: int = 1,
) -> Any:
    """Keras ``fit`` with DP-SGD (see :func:`make_private`); returns Keras' ``History``.

    ``shuffle`` is ignored (batches are Poisson-sampled); ``steps_per_epoch`` is refused (fixed
    by the sampling: n / batch_size)."""
    del shuffle
    if steps_per_epoch is not None:
        raise InvalidParameterError(
            "steps_per_epoch is fixed by DP-SGD's sampling (n / batch_size); leave it out"
        )
    state = privacy_state(model)
    accuracy, accuracy_name = _training_accuracy(model, state)
    if state is not None:
        _warn_on_unreported_monitors(callbacks, state, accuracy_name if accuracy else None)
    plan = plan_fit(
        model, x, y, batch_size=batch_size, epochs=epochs, validation_split=validation_split,
        validation_data=validation_data, class_weight=class_weight, sample_weight=sample_weight,
        initial_epoch=initial_epoch, status=_say if verbose else None,
        accuracy=accuracy,
    )  # fmt: skip
    plan.accuracy_name = accuracy_name
    m = plan.mechanism
    reserve(plan, f"fit {getattr(model, 'name', 'model')}: {plan.run_epochs} epochs, batch "
                  f"{m.batch_size}, σ={m.noise_multiplier:.4g}, C={plan.state.l2_norm_clip:g}")  # fmt: skip
    return run_fit(
        plan, callbacks=callbacks, verbose=verbose, validation_steps=validation_steps,
        validation_batch_size=validation_batch_size, validation_freq=validation_freq,
    )  # fmt: skip


def run_seed(state: PrivacyState) -> int | None:
    """The seed of this ``fit`` call (tests only): each call of the model gets its own stream."""
    return None if state.seed is None else int(state.seed) + 7919 * len(state.runs)


def padded_rows(rows: int) -> int:
    """The number of rows a Poisson batch of ``rows`` is padded to (with masked rows).

    A Poisson batch's size changes every step; every new size costs TensorFlow's CPU kernels
    new buffers and set-up (measured: a one-block transformer's process grew 170 MiB over 8
    epochs with Poisson batches, 25 MiB with fixed ones). Rounding up to a multiple of
    1/16 of the size (at least 4) leaves a handful of shapes per run for ≤ 1/8 more rows (about
    3% on average). Masked rows (weight 0) add nothing to the clipped sum or the statistics.
    """
    if rows <= 0:
        return 0
    grain = max(4, 1 << max(0, rows.bit_length() - 4))
    return -(-rows // grain) * grain


def batch_specs(x: Any, y: Any) -> tuple[Any, Any]:
    """The ``TensorSpec`` structures of the training batches of ``x, y`` (batch dimension
    unknown): floats and booleans as float32, as the pipeline delivers them."""
    import tensorflow as tf

    # tf.data reads a list as one tensor to stack: a multi-input model's list of inputs travels
    # as a tuple (Keras takes either).
    x_spec = _as_tuples(_map(lambda a: tf.TensorSpec([None, *a.shape[1:]], _dtype(a)), x))
    return x_spec, tf.TensorSpec([None, *np.shape(y)[1:]], _dtype(y))


def _as_tuples(structure: Any) -> Any:
    """``structure`` with every list made a tuple (dicts and tuples kept, leaves untouched)."""
    if isinstance(structure, (list, tuple)):
        return tuple(_as_tuples(item) for item in structure)
    if isinstance(structure, dict):
        return {key: _as_tuples(value) for key, value in structure.items()}
    return structure


class Element:
    """One step's inputs as the traced step sees them: the rows, the step's flat noise vector,
    ``meta = [denominator, weight]``, the labels, the per-row weights (and an input-reading
    Embedding's repeated tokens) — as flat NumPy arrays made on the host (:meth:`arrays`) and
    the matching ``TensorSpec`` list (:attr:`specs`), packed back by :meth:`unpack`."""

    def __init__(self, plan: FitPlan) -> None:
        import tensorflow as tf

        self.plan = plan
        self.x_spec, y_spec = plan.engine.batch_spec
        self.leaves = len(tf.nest.flatten(self.x_spec))
        self.repeat_structure = tuple(plan.engine.repeated_spec)  # (tf.data takes tuples)
        repeat_specs = tf.nest.flatten(self.repeat_structure)
        self.specs = [
            *tf.nest.flatten(self.x_spec), tf.TensorSpec([None], tf.float32),
            tf.TensorSpec([2], tf.float32), y_spec, tf.TensorSpec([None], tf.float32),
            *repeat_specs,
        ]  # fmt: skip
        self.dtypes = [spec.dtype for spec in self.specs]

    def arrays(self, idx: np.ndarray, denominator: float, noise: np.ndarray) -> list[np.ndarray]:
        """Rows ``idx`` (sorted) with their noise, padded with masked rows to
        :func:`padded_rows`; an empty batch becomes masked rows only."""
        import tensorflow as tf

        plan, engine = self.plan, self.plan.engine
        weight = 1.0
        if len(idx) == 0:  # one masked row keeps every shape non-empty
            idx, weight = np.zeros(1, np.int64), 0.0
        w = np.full(len(idx), weight, np.float32)
        if plan.weights is not None and weight:
            w = plan.weights[idx].astype(np.float32)
        size = padded_rows(len(idx))
        if size > len(idx):  # masked copies of the last row (weight 0: they add nothing)
            idx = np.concatenate([idx, np.full(size - len(idx), idx[-1], idx.dtype)])
            w = np.concatenate([w, np.zeros(size - len(w), np.float32)])
        meta = np.array([denominator, weight], np.float32)
        rows = _take(plan.x, idx)
        repeated = self.repeat_structure
        found = [a for r in engine.host_repeat_arrays(rows) for a in r] if repeated else []
        return [*tf.nest.flatten(rows), noise, meta, _take(plan.y, idx), w, *found]

    def unpack(self, out: list[Any]) -> tuple[dict[str, Any], Any, Any]:
        """``(inputs, y, w)`` from the tensors of :meth:`arrays` (shapes set from the specs)."""
        import tensorflow as tf

        for t, spec in zip(out, self.specs, strict=True):
            t.set_shape(spec.shape)
        k = self.leaves
        inputs = {"x": tf.nest.pack_sequence_as(self.x_spec, out[:k]), "noise": out[k],
                  "meta": out[k + 1]}  # fmt: skip
        if self.repeat_structure:
            inputs["repeated"] = tf.nest.pack_sequence_as(self.repeat_structure, out[k + 4 :])
        return inputs, out[k + 2], out[k + 3]


def _pipeline(plan: FitPlan) -> Any:
    """The ``tf.data`` pipeline of Poisson batches: rows gathered on the host (and an
    input-reading Embedding's repeated tokens). The step draws its noise itself."""
    import tensorflow as tf

    from .sampling import make_rng, make_sampler

    mechanism = plan.mechanism
    seed = run_seed(plan.state)
    sampler = make_sampler(mechanism.sampling, mechanism.n, mechanism.batch_size, make_rng(seed))
    empty = np.zeros(0, np.float32)
    epoch: list[np.ndarray] = []
    element = Element(plan)

    def batch(i: Any) -> list[np.ndarray]:
        # Batch i of the epoch; batch 0 draws the epoch's Poisson batches (tf.data calls this
        # in order, once per batch, and again from 0 for the next epoch).
        if int(i) == 0 or not epoch:
            epoch[:] = [np.sort(np.asarray(b, np.int64)) for b in sampler.epoch()]
        idx = epoch[int(i)]
        return element.arrays(idx, float(sampler.denominator(idx)), empty)

    def fetch(i: Any) -> Any:
        return element.unpack(tf.numpy_function(batch, [i], element.dtypes, stateful=True))

    # (numpy_function costs half of what Dataset.from_generator does per batch.)
    dataset = tf.data.Dataset.range(mechanism.steps_per_epoch).map(fetch)
    dataset = dataset.apply(tf.data.experimental.assert_cardinality(mechanism.steps_per_epoch))
    return dataset.prefetch(2)


def _dtype(a: Any) -> Any:
    import tensorflow as tf

    dtype = np.dtype(getattr(a, "dtype", np.float32))
    if dtype.kind in "fb":
        return tf.float32
    return tf.as_dtype(dtype)


def _set_card(
    plan: FitPlan, steps: int, history: Any, started: float, interrupted: bool, traces: int
) -> None:
    from .trainer import DPFitResult

    state, engine, mechanism, delta = plan.state, plan.engine, plan.mechanism, plan.delta
    event = state.event()
    eps, used = (0.0, state.accountant)
    if event is not None:
        eps, used = accounting.account(event, delta, state.accountant)
    spe = mechanism.steps_per_epoch
    planned = plan.planned_curve
    done = steps // spe
    curve = accounting.EpsilonCurve(
        epochs=planned.epochs[:done], epsilon=planned.epsilon[:done], steps=planned.steps[:done],
        delta=delta, accountant=planned.accountant, sampling=mechanism.sampling,
        noise_multiplier=mechanism.noise_multiplier, n=mechanism.n,
        batch_size=mechanism.batch_size,
    )  # fmt: skip
    card = DPFitResult(
        model=plan.model, history=dict(getattr(history, "history", {}) or {}),
        epsilon=float(eps), epsilon_curve=curve, noise_multiplier=mechanism.noise_multiplier,
        delta=delta, steps=sum(s for _, s in state.runs), clipping=engine.report,
        l2_norm_clip=state.l2_norm_clip, batch_size=mechanism.batch_size, n=mechanism.n,
        sampling=mechanism.sampling, accountant=used, epochs_completed=done,
        planned_curve=planned, target_epsilon=state.target_epsilon, interrupted=interrupted,
        ledger_name=plan.ledger_name, reservation_id=getattr(plan.reservation, "id", None),
        seconds=time.perf_counter() - started, trace_count=traces,
        training_metrics=state.include_training_metrics,
        self_check_seconds=0.0 if plan.engine_reused else engine.clipper.self_check_seconds or 0.0,
        validation_split=plan.validation_split, delta_source=plan.delta_source,
        fresh_data=state.fresh_data, fits=len(state.runs), fit_steps=steps,
    )  # fmt: skip
    object.__setattr__(plan.model, "privacy", card)
