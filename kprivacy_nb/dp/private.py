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

import math
import time
import types
import weakref
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import InvalidParameterError, TrainingError
from . import accounting

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
    original_fit: Any = None
    engine: Any = None  # cached per loss/shape (see _Engine)

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
) -> Any:
    """Make ``model.fit`` train with DP-SGD; returns the same (compiled) model.

    Give ``noise_multiplier`` (σ) or ``target_epsilon`` (σ is calibrated when ``fit`` starts, from
    n, epochs and batch_size, so that every ``fit`` call on this model together stays within the
    target). ``delta`` defaults to 1/n rounded down to a power of ten, fixed at the first ``fit``.
    ``physical_batch_size`` splits each (Poisson) batch into micro-batches of at most that many
    rows (same result, less memory). ``ledger`` (a budget name, or ``(name, Ledger)``) is charged
    for every ``fit``. After ``fit``: ``history.history["epsilon"]`` (ε after each epoch, all
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
    if (noise_multiplier is None) == (target_epsilon is None):
        raise InvalidParameterError(
            "give exactly one of noise_multiplier (σ) or target_epsilon (σ is then calibrated)"
        )
    clip = _positive("l2_norm_clip", l2_norm_clip)
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
        physical_batch_size = accounting._check_int("physical_batch_size", physical_batch_size)
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
    if old is not None:  # made private again: the spending so far stays with the model
        state.runs = old.runs
        if old.delta is not None and state.delta is None:
            state.delta = old.delta
        elif old.runs and state.delta != old.delta:
            raise InvalidParameterError(
                f"this model was already trained privately with δ={old.delta:g}; runs on the "
                "same data compose only at one δ — keep it (or omit delta)"
            )
    _STATES[model] = state
    object.__setattr__(model, "fit", types.MethodType(_private_fit, model))
    return model


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
        return data.to_numpy()
    if pd is not None and isinstance(data, pd.Series):
        return data.to_numpy()
    if isinstance(data, dict):
        return {k: _as_columns(v, f"{what}[{k!r}]") for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        if data and all(np.ndim(v) == 0 for v in data):
            return np.asarray(data)
        return type(data)(_as_columns(v, f"{what}[{i}]") for i, v in enumerate(data))
    if isinstance(data, np.ndarray):
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


def _scan_finite(data: Any, what: str) -> None:
    """Refuse NaN/inf before anything is spent, reading ``SCAN_ROWS`` rows at a time."""
    for leaf in _leaves(data):
        dtype = np.dtype(getattr(leaf, "dtype", np.float32))
        if dtype.kind == "O":
            raise InvalidParameterError(f"{what} must be numeric (got an object array)")
        if dtype.kind != "f":
            continue
        for start in range(0, len(leaf), SCAN_ROWS):
            chunk = np.asarray(leaf[start : start + SCAN_ROWS], dtype=np.float32)
            bad = ~np.isfinite(chunk)
            if bad.any():
                where = [int(i) for i in np.argwhere(bad)[0]]
                at = f"row {start + where[0]}" + (
                    f", column {tuple(where[1:])}" if len(where) > 1 else ""
                )
                raise InvalidParameterError(
                    f"{what} has a non-finite value (NaN or inf, or too large for float32) at "
                    f"{at}: clean or drop such rows before training (nothing was spent)"
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


# --------------------------------------------------------------------------- the DP step


class _Engine:
    """The clipper, the traced DP ``train_step`` and the step counter of one model."""

    def __init__(self, model: Any, state: PrivacyState, loss_obj: Any) -> None:
        import tensorflow as tf

        from .clipping import FastClipper, per_example_loss_fn

        self.model, self.state = model, state
        self.loss_obj = loss_obj
        self.loss_fn = per_example_loss_fn(loss_obj)
        self.clipper: Any = None
        self.steps = tf.Variable(0, dtype=tf.int64, trainable=False, name="kp_dp_steps")
        self.bad = tf.Variable(0, dtype=tf.int64, trainable=False, name="kp_dp_not_finite")
        self.nonfinite = tf.Variable(0, dtype=tf.int64, trainable=False, name="kp_dp_dropped")
        self._clipper_cls = FastClipper

    def plan(self, x_rows: Any, y_rows: Any, batch_size: int) -> None:
        """Build the clipper and run the whole self-check on real rows."""
        import tensorflow as tf

        from .clipping.selfcheck import probe_sensitivity

        x8 = _map(lambda a: tf.constant(a[:8]), x_rows)
        y8 = tf.constant(y_rows[:8])
        self.clipper = self._clipper_cls(
            self.model, self.loss_fn, l2_norm_clip=self.state.l2_norm_clip,
            sample_x=_map(lambda a: a[:2], x8),
        )  # fmt: skip
        self.clipper.verify(x8, y8)
        # Keras reads every compiled metric at the end of an epoch: they must be built. One
        # update builds them; the values are thrown away at once (the DP step never updates them).
        self.model.compute_metrics(x8, y8, self.model(x8, training=False), sample_weight=None)
        self.model.reset_metrics()
        spec = _map(lambda a: tf.TensorSpec([None, *a.shape[1:]], tf.as_dtype(a.dtype)), x_rows)
        y_spec = tf.TensorSpec([None, *y_rows.shape[1:]], tf.as_dtype(y_rows.dtype))
        probe = tf.function(
            lambda x, y, w: tf.concat(
                [tf.reshape(tf.cast(g, tf.float32), [-1]) for g in self._clipped(x, y, w, 1.0)[0]],
                0,
            ),
            input_signature=[spec, y_spec, tf.TensorSpec([None], tf.float32)],
        )
        rows = min(len(y_rows), max(16, min(int(batch_size), 512)))
        started = time.perf_counter()
        probe_sensitivity(
            probe, _map(lambda a: tf.constant(a[:rows]), x_rows), tf.constant(y_rows[:rows]),
            self.model.non_trainable_variables, self.state.l2_norm_clip,
        )  # fmt: skip
        self.clipper.self_check_seconds += time.perf_counter() - started
        self.sizes = [int(np.prod(v.shape)) for v in self.clipper.variables]

    def _clipped(self, x: Any, y: Any, w: Any, scale: Any) -> tuple[list[Any], Any, Any]:
        """Clipped sum (× scale), summed losses and dropped count, in micro-batches if asked."""
        import tensorflow as tf

        physical = self.state.physical_batch_size
        if physical is None:
            out = self.clipper.clipped_sum(x, y, w, scale=scale)
            return out.grads, tf.reduce_sum(out.losses), out.nonfinite
        batch = tf.shape(w)[0]
        chunks = (batch + physical - 1) // physical

        def body(i: Any, sums: list[Any], loss: Any, dropped: Any) -> Any:
            lo = i * physical
            hi = tf.minimum(lo + physical, batch)
            part = self.clipper.clipped_sum(
                tf.nest.map_structure(lambda t: t[lo:hi], x), y[lo:hi], w[lo:hi], scale=scale
            )
            sums = [s + g for s, g in zip(sums, part.grads, strict=True)]
            return i + 1, sums, loss + tf.reduce_sum(part.losses), dropped + part.nonfinite

        start = (
            tf.constant(0), [tf.zeros(v.shape, v.dtype) for v in self.clipper.variables],
            tf.constant(0.0), tf.constant(0),
        )  # fmt: skip
        _, sums, loss, dropped = tf.while_loop(lambda i, *_: i < chunks, body, start)
        return sums, loss, dropped

    def train_step(self, data: Any) -> dict[str, Any]:
        import tensorflow as tf

        inputs, y, w = data
        x, noise, meta = inputs["x"], inputs["noise"], inputs["meta"]
        self.steps.assign_add(1)  # counted before anything else: every step that ran counts
        grads, loss_sum, dropped = self._clipped(x, y, w, 1.0 / meta[0])
        variables = self.clipper.variables
        if self.add_noise:  # set by each fit before Keras traces this step
            offsets = self.offsets
            grads = [
                g + tf.cast(tf.reshape(noise[o : o + n], v.shape), g.dtype)
                for g, v, o, n in zip(grads, variables, offsets, self.sizes, strict=True)
            ]
        regularized = [v for v in variables if getattr(v, "regularizer", None)]
        if regularized:
            with tf.GradientTape() as tape:
                reg = tf.add_n([tf.cast(v.regularizer(v), tf.float32) for v in regularized])
            found = dict(zip(map(id, regularized), tape.gradient(reg, regularized), strict=True))
            grads = [
                g + tf.cast(found[id(v)], g.dtype) if id(v) in found and found[id(v)] is not None
                else g
                for g, v in zip(grads, variables, strict=True)
            ]  # fmt: skip
        self.nonfinite.assign_add(tf.cast(dropped, tf.int64))
        finite = tf.reduce_all([tf.reduce_all(tf.math.is_finite(g)) for g in grads])

        def apply() -> Any:
            self.model.optimizer.apply(grads, variables)
            return tf.constant(0, tf.int64)

        self.bad.assign_add(tf.cond(finite, apply, lambda: tf.constant(1, tf.int64)))
        if self.state.include_training_metrics:
            count = tf.maximum(tf.reduce_sum(tf.cast(w > 0, tf.float32)), 1.0)
            return {"loss": loss_sum / count}
        # Keras needs at least one value per step; the step count is public.
        return {"dp_steps": self.steps.value()}


# --------------------------------------------------------------------------- fit


def _callback(engine: _Engine, account: Any) -> Any:
    """A Keras callback: ε into each epoch's logs (before History records them); stops ``fit``
    when a noisy update was not finite."""
    import keras

    class EpsilonLogger(keras.callbacks.Callback):
        def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
            if int(engine.bad.numpy()):
                self.model.stop_training = True

        def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
            if logs is not None:
                logs.pop("dp_steps", None)
                logs["epsilon"] = account(int(engine.steps.numpy()))

    return EpsilonLogger()


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
    """Keras ``fit`` with DP-SGD (see :func:`make_private`); returns Keras' ``History``."""

    state = _STATES[model]
    if steps_per_epoch is not None:
        raise InvalidParameterError(
            "steps_per_epoch is fixed by DP-SGD's sampling (n / batch_size); leave it out"
        )
    if getattr(model, "optimizer", None) is None or getattr(model, "loss", None) is None:
        raise TrainingError(
            "compile the model first (model.compile(optimizer=..., loss=..., metrics=...)): "
            "make_private uses the compiled optimizer, loss and metrics"
        )
    if x is None or y is None:
        raise InvalidParameterError("fit needs x and y (unsupervised losses are not supported)")
    _refuse_streams(x)
    x, y = _as_columns(x, "x"), _as_columns(y, "y")
    if isinstance(y, (dict, list, tuple)):
        raise InvalidParameterError("models with several outputs/losses are not supported yet")
    n_all = _rows(x, "x")
    if _rows(y, "y") != n_all:
        raise InvalidParameterError(f"x has {n_all} rows but y has {len(y)}: they must match")
    weights = _sample_weights(n_all, y, sample_weight, class_weight)
    if validation_data is None and validation_split:
        if not 0 < float(validation_split) < 1:
            raise InvalidParameterError(
                f"validation_split must be in (0, 1), got {validation_split}"
            )
        cut = int(n_all * (1.0 - float(validation_split)))
        validation_data = (
            _map(lambda a: np.asarray(a[cut:]), x), np.asarray(y[cut:]),
        )  # fmt: skip
        x, y = _split(x, 0, cut), y[:cut]
        weights = None if weights is None else weights[:cut]
    n = _rows(x, "x")
    batch_size = 32 if batch_size is None else accounting._check_int("batch_size", batch_size)
    epochs = accounting._check_int("epochs", epochs)
    initial_epoch = int(initial_epoch)
    if not 0 <= initial_epoch < epochs:
        raise InvalidParameterError(f"initial_epoch must be in [0, epochs), got {initial_epoch}")
    run_epochs = epochs - initial_epoch
    _scan_finite(x, "x")
    _scan_finite(y, "y")
    delta = state.delta
    if delta is None:
        delta = accounting.default_delta(n)
    no_noise = state.noise_multiplier == 0
    accounting.validate(
        n, batch_size, epochs=run_epochs, noise_multiplier=state.noise_multiplier, delta=delta,
        sampling=state.sampling, accountant=state.accountant, allow_no_noise=no_noise,
    )  # fmt: skip
    prior = state.event()
    if state.target_epsilon is not None:
        sigma = accounting.calibrate_noise(
            state.target_epsilon, n, batch_size, run_epochs, delta, sampling=state.sampling,
            accountant=state.accountant, prior=prior,
        )  # fmt: skip
    else:
        sigma = float(state.noise_multiplier)
    mechanism = accounting.Mechanism(n, batch_size, sigma, state.sampling)
    spe = mechanism.steps_per_epoch

    # The engine (clipper + traced step) is rebuilt when the loss or the data's shapes change.
    probe_rows = _take(x, np.arange(min(n, max(16, min(batch_size, 512)))))
    probe_y = _take(y, np.arange(min(n, max(16, min(batch_size, 512)))))
    engine = state.engine
    if engine is None or engine.loss_obj is not model.loss:
        engine = _Engine(model, state, model.loss)
    engine.plan(probe_rows, probe_y, batch_size)  # the self-check, every fit
    state.engine = engine

    def account(steps: int) -> float:
        event = state.event((mechanism, steps))
        return 0.0 if event is None else accounting.epsilon_of_event(event, delta, state.accountant)

    reservation = None
    ledger_name = None
    if state.ledger is not None:
        from .ledger import resolve_ledger

        target = resolve_ledger(state.ledger)
        if target is not None:
            ledger_name = target.name
            reservation = target.reserve(
                mechanism.event(run_epochs * spe), accountant=state.accountant,
                description=f"fit {getattr(model, 'name', 'model')}: {run_epochs} epochs, "
                f"batch {batch_size}, σ={sigma:.4g}, C={state.l2_norm_clip:g}",
            )  # fmt: skip

    dataset, noise = _pipeline(model, state, engine, x, y, weights, mechanism, sigma)
    engine.offsets = list(noise.offsets)
    engine.add_noise = sigma > 0
    bad_before = int(engine.bad.numpy())
    user_callbacks = list(callbacks or [])
    original_step = model.__dict__.get("train_step")
    saved_jit = getattr(model, "jit_compile", False)
    history = None
    started = time.perf_counter()
    interrupted = False
    engine.steps.assign(0)
    try:
        object.__setattr__(model, "train_step", engine.train_step)
        model.jit_compile = False
        model.train_function = None  # Keras traces the DP step on this fit
        history = state.original_fit(
            model, dataset, epochs=epochs, verbose=verbose,
            callbacks=[_callback(engine, account), *user_callbacks],
            validation_data=validation_data, initial_epoch=initial_epoch,
            validation_steps=validation_steps, validation_batch_size=validation_batch_size,
            validation_freq=validation_freq, shuffle=False,
        )  # fmt: skip
    except KeyboardInterrupt:
        interrupted = True
        raise
    finally:
        noise.close()
        if original_step is None:
            model.__dict__.pop("train_step", None)
        else:
            object.__setattr__(model, "train_step", original_step)
        model.train_function = None
        model.jit_compile = saved_jit
        steps = int(engine.steps.numpy())
        if reservation is not None:
            if steps > 0:
                reservation.settle(mechanism.event(steps))
            else:
                reservation.cancel()
        state.runs.append((mechanism, steps))
        state.delta = delta
        _set_card(model, state, engine, mechanism, delta, steps, history, started, interrupted,
                  ledger_name, getattr(reservation, "id", None))  # fmt: skip
    if int(engine.bad.numpy()) > bad_before:
        raise TrainingError(
            "a noisy update was not finite: the weights or the optimizer diverged. Training "
            f"stopped after {steps} steps (charged) with the weights from before that update. "
            "Lower the learning rate"
        )
    return history


def _pipeline(
    model: Any, state: PrivacyState, engine: _Engine, x: Any, y: Any, weights: Any,
    mechanism: accounting.Mechanism, sigma: float,
) -> tuple[Any, Any]:  # fmt: skip
    """The ``tf.data`` pipeline of Poisson batches: rows gathered on the host, with noise."""
    import tensorflow as tf

    from .noise import GaussianNoise
    from .sampling import make_rng, make_sampler

    noise_std = sigma * state.l2_norm_clip
    # A seed (tests only) gives each fit call of the model its own stream.
    seed = None if state.seed is None else int(state.seed) + 7919 * len(state.runs)
    noise = GaussianNoise(engine.sizes, seed, prefetch=noise_std > 0)
    sampler = make_sampler(mechanism.sampling, mechanism.n, mechanism.batch_size, make_rng(seed))
    empty = np.zeros(0, np.float32)
    epoch: list[np.ndarray] = []
    x_spec = _map(lambda a: tf.TensorSpec([None, *a.shape[1:]], _dtype(a)), x)
    y_spec = tf.TensorSpec([None, *np.shape(y)[1:]], _dtype(y))
    leaf_specs = tf.nest.flatten(x_spec)
    specs = [
        *leaf_specs, tf.TensorSpec([None], tf.float32), tf.TensorSpec([2], tf.float32), y_spec,
        tf.TensorSpec([None], tf.float32),
    ]  # fmt: skip

    def batch(i: Any) -> list[np.ndarray]:
        # Batch i of the epoch; batch 0 draws the epoch's Poisson batches (tf.data calls this
        # in order, once per batch, and again from 0 for the next epoch).
        if int(i) == 0 or not epoch:
            epoch[:] = [np.sort(np.asarray(b, np.int64)) for b in sampler.epoch()]
        idx = epoch[int(i)]
        denominator = float(sampler.denominator(idx))
        weight = 1.0
        if len(idx) == 0:  # one masked row keeps every shape non-empty
            idx, weight = np.zeros(1, np.int64), 0.0
        w = np.full(len(idx), weight, np.float32)
        if weights is not None and weight:
            w = weights[idx].astype(np.float32)
        flat = noise.next(noise_std / denominator) if noise_std > 0 else empty
        meta = np.array([denominator, weight], np.float32)
        rows = tf.nest.flatten(_take(x, idx))
        return [*rows, flat, meta, _take(y, idx), w]

    def fetch(i: Any) -> Any:
        out = tf.numpy_function(batch, [i], [s.dtype for s in specs], stateful=True)
        for t, spec in zip(out, specs, strict=True):
            t.set_shape(spec.shape)
        k = len(leaf_specs)
        x_part = tf.nest.pack_sequence_as(x_spec, out[:k])
        return {"x": x_part, "noise": out[k], "meta": out[k + 1]}, out[k + 2], out[k + 3]

    # (numpy_function costs half of what Dataset.from_generator does per batch.)
    dataset = tf.data.Dataset.range(mechanism.steps_per_epoch).map(fetch)
    dataset = dataset.apply(tf.data.experimental.assert_cardinality(mechanism.steps_per_epoch))
    return dataset.prefetch(2), noise


def _dtype(a: Any) -> Any:
    import tensorflow as tf

    dtype = np.dtype(getattr(a, "dtype", np.float32))
    if dtype.kind in "fb":
        return tf.float32
    return tf.as_dtype(dtype)


def _set_card(
    model: Any, state: PrivacyState, engine: _Engine, mechanism: accounting.Mechanism,
    delta: float, steps: int, history: Any, started: float, interrupted: bool,
    ledger_name: str | None, reservation_id: Any,
) -> None:  # fmt: skip
    from .trainer import DPFitResult

    event = state.event()
    eps, used = (0.0, state.accountant)
    if event is not None:
        eps, used = accounting.account(event, delta, state.accountant)
    spe = mechanism.steps_per_epoch
    planned = accounting.epsilon_curve(
        mechanism.n, mechanism.batch_size, max(1, -(-steps // spe)), mechanism.noise_multiplier,
        delta, sampling=mechanism.sampling, accountant=state.accountant,
    ) if steps else accounting.EpsilonCurve(
        epochs=[], epsilon=[], steps=[], delta=delta, accountant=state.accountant,
        sampling=mechanism.sampling, noise_multiplier=mechanism.noise_multiplier,
        n=mechanism.n, batch_size=mechanism.batch_size,
    )  # fmt: skip
    hist = dict(getattr(history, "history", {}) or {})
    card = DPFitResult(
        model=model, history=hist, epsilon=float(eps), epsilon_curve=planned,
        noise_multiplier=mechanism.noise_multiplier, delta=delta,
        steps=sum(s for _, s in state.runs), clipping=engine.clipper.report if engine.clipper else {},
        l2_norm_clip=state.l2_norm_clip, batch_size=mechanism.batch_size, n=mechanism.n,
        sampling=mechanism.sampling, accountant=used, epochs_completed=steps // spe,
        planned_curve=planned, target_epsilon=state.target_epsilon, interrupted=interrupted,
        ledger_name=ledger_name, reservation_id=reservation_id,
        seconds=time.perf_counter() - started, training_metrics=state.include_training_metrics,
        self_check_seconds=(engine.clipper.self_check_seconds or 0.0) if engine.clipper else 0.0,
    )  # fmt: skip
    object.__setattr__(model, "privacy", card)
