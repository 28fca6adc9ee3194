"""``dp_fit``: train a Keras 3 model with DP-SGD and account for exactly what was run.

The algorithm (Abadi et al. 2016, as TF Privacy and Opacus implement it), per step: sample a batch
(Poisson with q = B/n by default), clip every example's gradient over all trainable weights to
norm ≤ C, sum, add N(0, σ²C²) once per coordinate, divide by the expected batch size (Poisson) or
the batch size (shuffle), apply the optimizer. The ε reported is the accountant's ε for the steps
actually applied (:func:`kprivacy_nb.dp.accounting.dpsgd_event`).

This module imports TensorFlow only when training starts, and never imports IPython: progress
goes to callback objects (see :class:`TrainingCallback`); the notebook monitor lives in
:mod:`kprivacy_nb.widgets.monitor`.
"""

from __future__ import annotations

import dataclasses
import html
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import InvalidParameterError
from . import accounting
from .reporting import LogReporter, TrainingCallback, _call, _default_reporter, _fmt

__all__ = ["dp_fit", "DPFitResult", "TrainingPlan", "TrainingCallback", "LogReporter"]

#: What the card says when training-set metrics are kept (they are computed without noise).
TRAINING_METRICS_NOTE = "included — training-set loss/accuracy are NOT covered by ε"
#: What the card says about attached audits (counts over the training data, without noise).
AUDIT_NOTE = (
    "empirical lower bounds from attacks on this run's training data: evidence, not a guarantee; "
    "their counts and AUC are computed without noise and are NOT covered by ε"
)


@dataclass
class TrainingPlan:
    """Everything known before the first step (shown by monitors)."""

    n: int
    batch_size: int
    epochs: int
    steps_per_epoch: int
    noise_multiplier: float
    l2_norm_clip: float
    delta: float
    sampling: str
    accountant: str
    planned_curve: accounting.EpsilonCurve
    target_epsilon: float | None = None
    ledger_name: str | None = None
    ledger_cap: float | None = None
    ledger_spent: float | None = None
    clipping: dict[str, str] = field(default_factory=dict)
    delta_source: str = "given"


@dataclass
class DPFitResult:
    """Outcome of :func:`dp_fit`: the trained model, its history and its privacy cost."""

    model: Any
    history: dict[str, list[float]]
    epsilon: float
    epsilon_curve: accounting.EpsilonCurve
    noise_multiplier: float
    delta: float
    steps: int
    clipping: dict[str, str]
    l2_norm_clip: float
    batch_size: int
    n: int
    sampling: str
    accountant: str
    epochs_completed: int
    planned_curve: accounting.EpsilonCurve
    target_epsilon: float | None = None
    interrupted: bool = False
    ledger_name: str | None = None
    reservation_id: Any = None
    seconds: float = 0.0
    trace_count: int = 0
    training_metrics: bool = False  # history holds training-set metrics (not covered by ε)
    self_check_seconds: float = 0.0
    validation_split: float = 0.0  # validation rows split off the training data passed in
    delta_source: str = "given"  # where δ came from (given, the ledger's, defaulted)
    fresh_data: bool = False  # earlier private runs of the model declared on other data
    fits: int = 1  # private fits of the model the ε covers (this one included)
    fit_steps: int | None = None  # the steps of this fit alone (None: all of ``steps``)
    audits: list[dict[str, Any]] = field(default_factory=list)  # see attach_audit

    def attach_audit(self, audit: Any) -> None:
        """Put an empirical audit of this run (:func:`kprivacy_nb.audit.one_run`,
        :func:`~kprivacy_nb.audit.membership_inference`) on its card: ``summary()``, the card
        view and saved files carry it. An audit done against another ε or δ, or of a model
        trained without DP, is refused. ``one_run`` and ``membership_inference(run, …)`` attach
        themselves.
        """
        entry = dict(audit if isinstance(audit, dict) else audit.summary())
        proven = entry.get("epsilon", entry.get("proven_epsilon"))
        if entry.get("private") is False or proven is None or entry.get("delta") is None:
            raise InvalidParameterError(
                "this audit has no proven ε to compare with (trained without DP, or run without "
                "run=): audit this run with membership_inference(run, …) or one_run(…)"
            )
        if not math.isclose(proven, self.epsilon, rel_tol=1e-9) or not math.isclose(
            entry["delta"], self.delta, rel_tol=1e-9
        ):
            raise InvalidParameterError(
                f"this audit compared with ε={proven:.4g}, δ={entry['delta']:g}, but this run has "
                f"ε={self.epsilon:.4g}, δ={self.delta:g}: attach it to the run it audited"
            )
        if entry not in self.audits:
            self.audits.append(entry)

    def summary(self) -> dict[str, Any]:
        """The privacy card: what the ε covers (this is what saved files carry)."""
        return self._card() | (
            {"audits": self.audits, "audit_note": AUDIT_NOTE} if self.audits else {}
        )

    def _card(self) -> dict[str, Any]:
        return {
            "epsilon": self.epsilon, "delta": self.delta, "noise_multiplier": self.noise_multiplier,
            "l2_norm_clip": self.l2_norm_clip, "sampling": self.sampling, "steps": self.steps,
            "epochs_completed": self.epochs_completed, "accountant": self.accountant,
            "batch_size": self.batch_size, "n": self.n, "interrupted": self.interrupted,
            "ledger": self.ledger_name, "clipping_verified": self.verified,
            "training_metrics": TRAINING_METRICS_NOTE if self.training_metrics else "not included",
            "delta_source": self.delta_source,
            "composition": self.covers,
            "fits": self.fits, "fit_steps": self.steps if self.fit_steps is None else self.fit_steps,
            "validation_metrics": (
                f"computed on the last {self.validation_split:.0%} of the data passed in "
                "(validation_split): if those rows are private, the val_* values are NOT "
                "covered by ε" if self.validation_split else "on the validation data given"
            ),
        }  # fmt: skip

    @property
    def covers(self) -> str:
        """What the ε covers, in words (the card's "ε covers" line)."""
        if self.fresh_data:
            return "this run only (fresh data declared: earlier runs were on other data)"
        if self.fits > 1:
            return f"every private run of this model ({self.fits} fits, composed)"
        return "every private run of this model"

    def _steps_text(self) -> str:
        this = self.steps if self.fit_steps is None else self.fit_steps
        if self.fits > 1:
            return (
                f"{self.steps} over {self.fits} fits (this fit: {this} steps, "
                f"{self.epochs_completed} epochs)"
            )
        return f"{self.steps} ({self.epochs_completed} epochs)"

    @property
    def verified(self) -> bool:
        """Every layer's clipping path passed the engine's self-check."""
        return bool(self.clipping) and all("verified" in v for v in self.clipping.values())

    def __repr__(self) -> str:
        stop = ", interrupted" if self.interrupted else ""
        fits = f", fits={self.fits}" if self.fits > 1 else ""
        fresh = ", fresh_data=True" if self.fresh_data else ""
        return (
            f"DPFitResult(ε={_fmt(self.epsilon)}, δ={self.delta:g}, σ={self.noise_multiplier:.4g}, "
            f"C={self.l2_norm_clip:g}, sampling={self.sampling}, steps={self.steps}, "
            f"epochs={self.epochs_completed}{fits}{fresh}, accountant={self.accountant}{stop})"
        )

    def _repr_html_(self) -> str:
        rows = [
            ("ε (spent)", _fmt(self.epsilon)),
            ("δ", f"{self.delta:g}" + ("" if self.delta_source == "given"
                                       else f" ({self.delta_source})")),
            ("σ (noise multiplier)", f"{self.noise_multiplier:.4g}"),
            ("C (clipping norm)", f"{self.l2_norm_clip:g}"),
            ("sampling", f"{self.sampling} (batch {self.batch_size} of n={self.n})"),
            ("steps", self._steps_text()),
            ("ε covers", self.covers),
            ("accountant", self.accountant.upper()),
        ]  # fmt: skip
        if self.target_epsilon is not None:
            rows.append(("target ε", _fmt(self.target_epsilon)))
        if self.ledger_name:
            rows.append(("ledger", self.ledger_name))
        rows.append(
            ("clipping", "verified by the self-check" if self.verified else "see .clipping")
        )
        for entry in self.audits:
            lower = entry.get("epsilon_lower_bound")  # None: ∞
            alarm = "⚠ " if lower is None or lower > self.epsilon + 1e-9 else ""
            rows.append((f"audit ({entry['kind'].replace('_', ' ')})", alarm + entry["verdict"]))
        for key in ("loss", "accuracy", "val_loss", "val_accuracy"):
            if self.history.get(key):
                label = f"{key} (not private)" if key in ("loss", "accuracy") else key
                rows.append((label, f"{self.history[key][-1]:.4f}"))
        body = "".join(
            f"<tr><th style='text-align:left'>{html.escape(k)}</th>"
            f"<td style='text-align:left'>{html.escape(v)}</td></tr>"
            for k, v in rows
        )
        note = " — <b>interrupted</b>" if self.interrupted else ""
        return (
            "<div class='kprivacy-card'><b>DP-SGD privacy card</b>"
            f"{note}<table>{body}</table></div>"
        )


# --------------------------------------------------------------------------- data


def _num_rows(data: Any, what: str) -> int:
    import tensorflow as tf

    leaves = tf.nest.flatten(data)
    if not leaves:
        raise InvalidParameterError(f"{what} is empty")
    sizes = {int(np.shape(leaf)[0]) if np.ndim(leaf) else -1 for leaf in leaves}
    if len(sizes) != 1 or -1 in sizes:
        raise InvalidParameterError(
            f"{what}: every input array needs the same number of rows (first dimension); got {sorted(sizes)}"
        )
    return sizes.pop()


def _to_tensors(data: Any, what: str = "x") -> Any:
    """Numeric tensors of ``data``; NaN/inf refused up front (before any ε is spent), naming
    where they are."""
    import tensorflow as tf

    def convert(a: Any) -> Any:
        arr = np.asarray(a)
        if arr.dtype == object:
            raise InvalidParameterError(f"{what} must be numeric (got an object array)")
        if arr.dtype.kind == "f" and arr.dtype != np.float32:
            arr = arr.astype(np.float32)
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            where = [int(i) for i in np.argwhere(~np.isfinite(arr))[0]]
            at = f"row {where[0]}" + (f", column {tuple(where[1:])}" if len(where) > 1 else "")
            raise InvalidParameterError(
                f"{what} has a non-finite value (NaN or inf, or too large for float32) at {at}: "
                "clean or drop such rows before training (nothing was spent)"
            )
        if arr.dtype.kind == "b":
            arr = arr.astype(np.float32)
        return tf.constant(arr)

    return tf.nest.map_structure(convert, data)


# --------------------------------------------------------------------------- dp_fit


def dp_fit(
    model: Any,
    x: Any,
    y: Any = None,
    *,
    epochs: int,
    batch_size: int,
    l2_norm_clip: float = 1.0,
    noise_multiplier: float | None = None,
    target_epsilon: float | None = None,
    delta: float | None = None,
    optimizer: Any = None,
    learning_rate: float | None = None,
    sampling: str = "poisson",
    accountant: str = "pld",
    validation_data: tuple[Any, Any] | None = None,
    ledger: Any = None,
    seed: int | None = None,
    verbose: int = 1,
    loss: Any = None,
    callbacks: Sequence[Any] | None = None,
    include_training_metrics: bool = False,
    physical_batch_size: int | None = None,
    fresh_data: bool = False,
) -> DPFitResult:
    """Train ``model`` on ``(x, y)`` with DP-SGD; return a :class:`DPFitResult`.

    A thin layer over :func:`kprivacy_nb.make_private` and Keras' ``model.fit`` (one engine, one
    accounting): the model is compiled with ``optimizer`` (``None``: the one it was compiled
    with) and ``loss`` (default: the compiled loss), made private and fitted. Give either
    ``noise_multiplier`` (σ) or ``target_epsilon`` (σ is then calibrated so that everything the
    model was trained on privately ends at ε ≤ target). ``delta`` defaults to 1/n rounded down
    to a power of ten. ``ledger`` (a budget name, or ``(name, Ledger)``) reserves the planned
    spend before training and records the actual spend afterwards (refused up front if it
    would overspend). Ctrl-C stops cleanly: the model keeps its weights and the result (and
    ledger) record the steps run. ``seed`` makes sampling and noise reproducible (tests only).
    ``callbacks``: Keras callbacks, or objects with ``on_train_begin(plan)`` /
    ``on_epoch_end(epoch, logs)`` / ``on_train_end(result)``. ``history`` holds ε and
    validation metrics; training-set loss/accuracy (computed from the private data without
    noise, so not covered by ε) are shown live and kept only with
    ``include_training_metrics=True`` — the card then says so. Training the same model again
    composes: the result's ε covers every private run of that model, unless ``fresh_data=True``
    declares that this run uses other people's data (named on the card). ``delta`` defaults to
    the ledger budget's δ with ``ledger``, else to the largest power of ten ≤ 1/(10·n); the card
    says where δ came from.

    >>> run = dp_fit(model, x_train, y_train, epochs=10, batch_size=256,
    ...              target_epsilon=3.0, delta=1e-5)                       # doctest: +SKIP
    >>> run.epsilon <= 3.0                                                 # doctest: +SKIP
    True
    """
    started = time.perf_counter()
    if y is None:
        raise InvalidParameterError("dp_fit needs labels y (unsupervised losses are not supported)")
    if (noise_multiplier is None) == (target_epsilon is None):
        raise InvalidParameterError(
            "give exactly one of noise_multiplier (σ) or target_epsilon (σ is then calibrated)"
        )
    accounting.check_clip(l2_norm_clip)
    if target_epsilon is not None and not float(target_epsilon) > 0:
        raise InvalidParameterError(f"target_epsilon must be > 0, got {target_epsilon}")
    n = _num_rows(x, "x")
    n_y = _num_rows(y, "y")
    if n != n_y:
        raise InvalidParameterError(f"x has {n} rows but y has {n_y}: they must match")
    sampling = str(sampling).lower()
    accountant = str(accountant).lower()
    no_noise = noise_multiplier is not None and float(noise_multiplier) == 0
    if no_noise and ledger is not None:
        raise InvalidParameterError(
            "noise_multiplier=0 has ε = ∞: it cannot be charged to a ledger"
        )
    accounting.validate(
        n, batch_size, epochs=epochs, noise_multiplier=noise_multiplier, delta=delta,
        sampling=sampling, accountant=accountant, allow_no_noise=no_noise,
    )  # fmt: skip

    import keras

    from . import clipping, engine, private

    if not isinstance(model, keras.Model):
        raise InvalidParameterError(f"model must be a keras.Model, got {type(model).__name__}")
    clipping.check_model(model)
    loss_obj = loss if loss is not None else getattr(model, "loss", None)
    loss_fn = clipping.per_example_loss_fn(loss_obj)
    x, y = private._as_columns(x, "x"), private._as_columns(y, "y")  # clear errors for text
    _check_fits(model, loss_fn, _head(x, "x"), _head(y, "y"))
    if validation_data is not None:
        if not isinstance(validation_data, (tuple, list)) or len(validation_data) != 2:
            raise InvalidParameterError("validation_data must be a pair (x_val, y_val)")
        if _num_rows(validation_data[0], "validation x") != _num_rows(
            validation_data[1], "validation y"
        ):
            raise InvalidParameterError("validation x and y have different numbers of rows")
        validation_data = (
            _finite(validation_data[0], "validation x"),
            _finite(validation_data[1], "validation y"),
        )
    if optimizer is None:  # the compiled optimizer, as model.fit would use; else SGD(0.1)
        opt = getattr(model, "optimizer", None)
        opt = engine.resolve_optimizer("sgd" if opt is None else opt, learning_rate)
    else:
        opt = engine.resolve_optimizer(optimizer, learning_rate)
    accuracy = engine.accuracy_fn(loss_obj)
    keras_callbacks = [cb for cb in callbacks or [] if isinstance(cb, keras.callbacks.Callback)]
    ours = [cb for cb in callbacks or [] if not isinstance(cb, keras.callbacks.Callback)]
    if verbose:
        ours.insert(0, _default_reporter())
    model.compile(optimizer=opt, loss=loss_obj, metrics=["accuracy"] if accuracy else None)
    private.make_private(
        model, l2_norm_clip=float(l2_norm_clip), noise_multiplier=noise_multiplier,
        target_epsilon=target_epsilon, delta=delta, sampling=sampling, accountant=accountant,
        ledger=ledger, seed=seed, include_training_metrics=include_training_metrics,
        physical_batch_size=physical_batch_size, fresh_data=fresh_data,
    )  # fmt: skip
    plan = private.plan_fit(
        model, x, y, batch_size=batch_size, epochs=epochs, validation_data=validation_data,
        accuracy=accuracy, status=lambda message: _call(ours, "on_prepare", message),
    )  # fmt: skip
    sigma = plan.mechanism.noise_multiplier
    private.reserve(
        plan, f"dp_fit {getattr(model, 'name', 'model')}: {epochs} epochs, batch {batch_size}, "
        f"σ={sigma:.4g}, C={l2_norm_clip:g}",
    )  # fmt: skip
    spe = plan.mechanism.steps_per_epoch
    training_plan = TrainingPlan(
        n=n, batch_size=int(batch_size), epochs=int(epochs), steps_per_epoch=spe,
        noise_multiplier=sigma, l2_norm_clip=float(l2_norm_clip), delta=plan.delta,
        sampling=sampling, accountant=accountant,
        planned_curve=plan.planned_curve,
        target_epsilon=None if target_epsilon is None else float(target_epsilon),
        ledger_name=plan.ledger_name, ledger_cap=plan.ledger_cap,
        ledger_spent=plan.ledger_spent, clipping=plan.engine.report,
        delta_source=plan.delta_source,
    )  # fmt: skip
    if any(hasattr(cb, "on_step") for cb in ours):
        epoch_now = [0]  # our callbacks' on_step(epoch, step, steps_per_epoch), from Keras'
        keras_callbacks = [*keras_callbacks, keras.callbacks.LambdaCallback(
            on_epoch_begin=lambda epoch, logs: epoch_now.__setitem__(0, epoch + 1),
            on_train_batch_end=lambda batch, logs: _call(
                ours, "on_step", epoch_now[0], batch + 1, spe
            ),
        )]  # fmt: skip

    def on_epoch(epoch: int, train: dict, logs: dict, steps: int, seconds: float, dropped: int):
        val = {k: v for k, v in logs.items() if k.startswith("val_")}
        _call(ours, "on_epoch_end", epoch, {
            **train, **val, "epsilon": logs["epsilon"], "delta": plan.delta,
            "epochs": int(epochs), "steps": steps, "seconds": seconds,
            "nonfinite_examples": dropped,
        })  # fmt: skip

    try:
        _call(ours, "on_train_begin", training_plan)
    except BaseException:
        if plan.reservation is not None:
            plan.reservation.cancel()
        raise
    try:
        private.run_fit(plan, callbacks=keras_callbacks, verbose=0, on_epoch=on_epoch)
    except KeyboardInterrupt:
        pass  # the card says "interrupted"; the ledger was charged for the steps that ran
    result = dataclasses.replace(model.privacy, seconds=time.perf_counter() - started)
    object.__setattr__(model, "privacy", result)
    _call(ours, "on_train_end", result)
    return result


def _head(data: Any, what: str) -> Any:
    """The first two rows of ``data`` as tensors (for a clear shape error before anything)."""
    import tensorflow as tf

    def two(a: Any) -> Any:
        arr = np.asarray(a[:2])
        if arr.dtype.kind == "O":
            raise InvalidParameterError(f"{what} must be numeric (got an object array)")
        if arr.dtype.kind in "fb" and arr.dtype != np.float32:
            arr = arr.astype(np.float32)
        return tf.constant(arr)

    if hasattr(data, "iloc"):
        data = data.to_numpy()
    return tf.nest.map_structure(two, data)


def _finite(data: Any, what: str) -> Any:
    """``data`` as float32/integer arrays with NaN/inf refused, naming the place."""

    def convert(a: Any) -> Any:
        arr = np.asarray(a)
        if arr.dtype == object:
            raise InvalidParameterError(f"{what} must be numeric (got an object array)")
        if arr.dtype.kind in "fb" and arr.dtype != np.float32:
            arr = arr.astype(np.float32)
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            where = [int(i) for i in np.argwhere(~np.isfinite(arr))[0]]
            at = f"row {where[0]}" + (f", column {tuple(where[1:])}" if len(where) > 1 else "")
            raise InvalidParameterError(
                f"{what} has a non-finite value (NaN or inf, or too large for float32) at {at}"
            )
        return arr

    import tensorflow as tf

    return tf.nest.map_structure(convert, data)


def _check_fits(model: Any, loss_fn: Callable, X: Any, Y: Any) -> Any:
    """Run the model and loss on two examples so shape mistakes fail with a clear message;
    returns the predictions."""
    import tensorflow as tf

    xs = tf.nest.map_structure(lambda t: t[:2], X)
    try:
        preds = model(xs, training=False)
    except Exception as exc:  # Keras raises many types; re-word them once
        raise InvalidParameterError(_input_mismatch(model, xs, exc)) from None
    hint = _label_hint(loss_fn, Y, preds)
    if hint:
        raise InvalidParameterError(hint)
    try:
        values = loss_fn(Y[:2], preds)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InvalidParameterError(
            f"y does not fit the model's output and loss (prediction shape {tuple(preds.shape)}, "
            f"y shape {tuple(Y.shape)}): {first}"
        ) from None
    if values.shape.rank != 1 or values.shape[0] != preds.shape[0]:
        raise InvalidParameterError(
            f"the loss must give one value per example; got shape {tuple(values.shape)}"
        )
    return preds


def _input_mismatch(model: Any, xs: Any, exc: Exception) -> str:
    """One line for "x does not fit the model": the shapes on both sides and Keras' own reason
    (its first informative line, without terminal colour codes)."""
    import tensorflow as tf

    from ..quiet.filter import strip_ansi

    lines = [strip_ansi(line).strip() for line in str(exc).splitlines()]
    reason = next(
        (line for line in lines if line and not line.startswith("Exception encountered")),
        type(exc).__name__,
    )
    reason = reason.replace("(2, ", "(batch, ")  # the check runs on two rows, not the data's n
    inputs = getattr(model, "inputs", None) or []
    leaves = tf.nest.flatten(xs)
    if isinstance(xs, (list, tuple)) and len(leaves) > max(len(inputs), 1):
        # A Python list of rows: Keras reads a list as one array per model input (and its
        # message would list every row, values included).
        return (
            f"x does not fit the model's input: x is a list of {len(leaves)} items, which is "
            f"read as one array per model input (the model has {max(len(inputs), 1)}). Pass "
            "the rows as one array: np.asarray(x), or a pandas DataFrame"
        )
    rows = ", ".join(str(tuple(t.shape[1:])) for t in leaves)
    want = ", ".join(str(tuple(i.shape[1:])) for i in inputs)
    names = [str(getattr(i, "name", "?")) for i in inputs]
    keys = sorted(map(str, xs)) if isinstance(xs, dict) else None
    if keys is not None and keys != sorted(names):
        return (
            f"x does not fit the model's input: x is a dict with keys {keys}, the model's "
            f"inputs are named {names} ({reason})"
        )
    if want == rows:  # the shapes agree: the reason is elsewhere (a dtype…)
        return f"x does not fit the model's input: {reason}"
    expects = f"the model expects rows of shape {want}, " if want else ""
    return f"x does not fit the model's input: {expects}x has rows of shape {rows} ({reason})"


def _label_hint(loss_fn: Callable, Y: Any, preds: Any) -> str | None:
    """The usual label mistakes, with their fix (None when nothing is recognisably wrong)."""
    loss = getattr(loss_fn, "keras_loss", None)
    name = loss if isinstance(loss, str) else getattr(loss, "name", getattr(loss, "__name__", ""))
    name = str(name).lower()
    y_rows, p_rows = tuple(Y.shape[1:]), tuple(preds.shape[1:])
    if "categorical" in name and "crossentropy" in name and p_rows and p_rows[-1] == 1:
        return (
            f"the model has one output unit but the loss is {name}: over one class it is "
            "constant and nothing would be learned (ε would be spent for nothing). For two "
            "classes use a sigmoid output with loss='binary_crossentropy', or Dense(K) with "
            "softmax and a categorical loss"
        )
    if "sparse" in name and len(y_rows) == 1 and y_rows[-1] > 1 and y_rows[-1] == p_rows[-1]:
        return (
            f"y looks one-hot (rows of shape {y_rows}) but the loss is sparse (integer labels): "
            "pass y.argmax(1), or use a categorical (non-sparse) loss"
        )
    if "sparse" not in name and "categorical" in name and not y_rows and p_rows[-1] > 1:
        return (
            "y holds class ids (one number per row) but the loss is categorical (one-hot "
            "labels): use loss='sparse_categorical_crossentropy', or one-hot encode y"
        )
    return None
