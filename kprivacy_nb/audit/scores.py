"""Membership scores of examples under a trained model (higher = "more likely a member").

* ``"loss"`` — minus the per-example loss (Yeom et al. 2018): members were fit, so their loss is
  lower. Works for any per-example Keras loss.
* ``"calibrated"`` — the logit-scaled confidence of the true class, ``log(p/(1−p))`` with
  ``p = exp(−cross-entropy)`` (Carlini et al. 2022), standardised per class: a per-class Gaussian
  test, LiRA's offline test with the class as reference. The reference is a random half of the
  holdout that is used for nothing else: its per-class mean and spread give one map from
  confidence to score, applied alike to members and to the other half of the holdout (the scored
  non-members). Identical outputs get identical scores whatever their membership, so a model that
  saw neither set gives members and non-members the same score distribution. Needs class labels;
  for non-cross-entropy losses the base score is minus the loss.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import special

from ..errors import InvalidParameterError

__all__ = [
    "ATTACKS", "Outputs", "Calibration", "per_example_loss", "model_outputs", "class_labels",
    "num_rows", "loss_scores", "calibrated_scores", "check_finite",
]  # fmt: skip

ATTACKS = ("loss", "calibrated")
#: The calibrated attack needs this many reference non-members (a class with fewer is
#: standardised against the whole reference).
MIN_REFERENCE = 3


def num_rows(data: Any, what: str) -> int:
    """Rows of an array (or of every array of a dict/list of inputs, which must agree)."""
    leaves = list(data.values()) if isinstance(data, dict) else data
    if isinstance(leaves, (list, tuple)):
        sizes = {num_rows(leaf, what) for leaf in leaves}
        if len(sizes) != 1:
            raise InvalidParameterError(f"{what}: inputs have different numbers of rows {sizes}")
        return sizes.pop()
    shape = np.shape(leaves)
    if not shape:
        raise InvalidParameterError(f"{what} must be an array with one row per example")
    return int(shape[0])


def take(data: Any, idx: np.ndarray) -> Any:
    """Rows ``idx`` of an array (or of each array of a dict/list)."""
    if isinstance(data, dict):
        return {k: take(v, idx) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return type(data)(take(v, idx) for v in data)
    return np.asarray(data)[idx]


def model_inputs(model: Any) -> int:
    """How many inputs ``model`` takes (1 when it can't tell)."""
    try:
        return max(1, len(model.inputs or []))
    except (AttributeError, TypeError, ValueError):
        return 1


def as_inputs(data: Any, n_inputs: int = 1) -> Any:
    """``data`` as Keras takes it: one NumPy array (from a DataFrame, a list of rows, …), or a
    dict/list of arrays when the model has several inputs."""
    if isinstance(data, dict):
        return {k: np.asarray(v) for k, v in data.items()}
    if n_inputs > 1 and isinstance(data, (list, tuple)):
        return type(data)(np.asarray(v) for v in data)
    return np.asarray(data)


def check_fits(model: Any, x: Any, y: np.ndarray, loss: Any, what: str) -> None:
    """Clear errors for the usual mistakes, before Keras' long ones: rows of the wrong shape,
    class labels the model has no output for, one-hot labels for a sparse loss."""
    if isinstance(x, np.ndarray):
        try:
            expected = tuple(model.input_shape[1:])
        except (AttributeError, TypeError, ValueError, IndexError):
            expected = None
        got = x.shape[1:]
        if expected is not None and (
            len(expected) != len(got)
            or any(e is not None and e != g for e, g in zip(expected, got, strict=True))
        ):
            raise InvalidParameterError(
                f"{what} x rows have shape {got} but the model expects {expected}"
            )
    labels = class_labels(y)
    name = loss_name(loss)
    if labels is None or "crossentropy" not in name:
        return
    y = np.asarray(y)
    if "sparse" in name and y.ndim >= 2 and y.shape[-1] > 1:
        raise InvalidParameterError(
            f"{what} y is one-hot (rows of shape {y.shape[1:]}) but the loss is {name}, which "
            "takes integer labels: pass y.argmax(-1), or compile with categorical_crossentropy"
        )
    try:
        k = int(model.output_shape[-1])
    except (AttributeError, TypeError, ValueError, IndexError):
        return
    top = max(k, 2) - 1
    if labels.min() < 0 or labels.max() > top:
        raise InvalidParameterError(
            f"{what} labels go from {labels.min()} to {labels.max()} but the model's {k} "
            f"output(s) allow classes 0…{top}"
        )


def check_finite(x: Any, what: str) -> None:
    """Refuse NaN or ±∞ in the numeric inputs (a model cannot be scored, or audited, on them)."""
    leaves = list(x.values()) if isinstance(x, dict) else x
    if isinstance(leaves, (list, tuple)):
        for leaf in leaves:
            check_finite(leaf, what)
        return
    arr = np.asarray(leaves)
    if arr.dtype.kind not in "fc" or arr.ndim == 0:
        return
    bad = ~np.isfinite(arr).reshape(len(arr), -1).all(axis=1)
    if bad.any():
        raise InvalidParameterError(
            f"{what} has {int(bad.sum())} row(s) with NaN or ∞ (the first is row "
            f"{int(np.flatnonzero(bad)[0])}): drop or impute them before the audit"
        )


def _keras_message(exc: Exception) -> str:
    """The informative line of a (long, multi-line) Keras/TensorFlow error."""
    lines = [re.sub(r"\{\{.*?\}\}", "", ln).strip() for ln in str(exc).splitlines()]
    lines = [ln for ln in lines if ln]
    for ln in lines:
        if "expected" in ln.lower() or "received" in ln.lower() or "incompatible" in ln:
            return ln[:300]
    return (lines or [type(exc).__name__])[0][:300]


def pair(data: Any, what: str, n_inputs: int = 1) -> tuple[Any, Any]:
    """Check ``data`` is an ``(x, y)`` pair with matching rows; return it as arrays."""
    if not isinstance(data, (tuple, list)) or len(data) != 2:
        raise InvalidParameterError(f"{what} must be a pair (x, y), got {type(data).__name__}")
    x, y = as_inputs(data[0], n_inputs), np.asarray(data[1])
    nx, ny = num_rows(x, f"{what} x"), num_rows(y, f"{what} y")
    if nx != ny:
        raise InvalidParameterError(f"{what}: x has {nx} rows but y has {ny}; they must match")
    if nx == 0:
        raise InvalidParameterError(f"{what} is empty")
    return x, y


def loss_name(loss: Any) -> str:
    name = loss if isinstance(loss, str) else getattr(loss, "name", getattr(loss, "__name__", ""))
    return str(name).lower()


def _logit_margin(loss: Any, pred: np.ndarray, y: np.ndarray) -> np.ndarray | None:
    """φ = z_y − logsumexp_{j≠y} z_j in float64 when the loss is a cross-entropy on logits with
    hard labels (then the loss is exactly softplus(−φ)); None otherwise. Float32 losses of
    well-fit examples round to exactly 0, which ties members at the top of the ROC; φ doesn't."""
    kw = getattr(loss, "_fn_kwargs", None) or {}
    if not kw.get("from_logits") or kw.get("label_smoothing") or kw.get("ignore_class") is not None:
        return None
    name = loss_name(loss)
    z = pred.reshape(len(pred), -1)
    if "binary_crossentropy" == name and z.shape[1] == 1:
        t = y.reshape(len(y), -1)
        if t.shape[1] != 1 or not np.isin(t, (0, 1)).all():
            return None
        return np.where(t[:, 0] == 1, z[:, 0], -z[:, 0])
    if name == "sparse_categorical_crossentropy":
        labels = y.reshape(-1).astype(np.int64)
    elif name == "categorical_crossentropy" and y.shape == z.shape and np.isin(y, (0, 1)).all():
        if not (y.sum(-1) == 1).all():
            return None
        labels = y.argmax(-1)
    else:
        return None
    if len(labels) != len(z) or labels.min() < 0 or labels.max() >= z.shape[1] or z.shape[1] < 2:
        return None
    rows = np.arange(len(z))
    own = z[rows, labels]
    others = z.copy()
    others[rows, labels] = -np.inf
    return own - special.logsumexp(others, axis=1)


def per_example_loss(
    model: Any, x: Any, y: Any, *, loss: Any = None, batch_size: int = 1024
) -> tuple[np.ndarray, np.ndarray | None]:
    """The loss of every example under ``model`` (inference mode) as float64, and the logit
    margin φ (see :func:`_logit_margin`) when the loss allows computing it exactly."""
    import tensorflow as tf

    from ..dp.clipping import per_example_loss_fn

    loss = loss if loss is not None else getattr(model, "loss", None)
    loss_fn = per_example_loss_fn(loss)
    n = num_rows(x, "x")
    losses, margins = [], []
    for start in range(0, n, batch_size):
        idx = np.arange(start, min(n, start + batch_size))
        xb = tf.nest.map_structure(tf.constant, take(x, idx))
        yb = np.asarray(y)[idx]
        try:
            pred = model(xb, training=False)
            values = loss_fn(tf.constant(yb), pred)
        except InvalidParameterError:
            raise
        except Exception as exc:  # Keras raises many types for shape mistakes; name them once
            raise InvalidParameterError(
                f"the model and its loss cannot score these examples (y rows of shape "
                f"{np.shape(yb)[1:]}): {_keras_message(exc)}"
            ) from None
        values = np.asarray(values, dtype=np.float64).reshape(-1)
        if values.shape[0] != len(idx):
            raise InvalidParameterError(
                f"the loss must give one value per example; got {values.shape[0]} for {len(idx)}"
            )
        margin = _logit_margin(loss, np.asarray(pred, dtype=np.float64), yb)
        if margin is not None:
            values = np.logaddexp(0.0, -margin)  # the same loss, without float32 rounding
        losses.append(values)
        margins.append(margin)
    exact = all(m is not None for m in margins)
    return np.concatenate(losses), np.concatenate(margins) if exact else None


def class_labels(y: Any) -> np.ndarray | None:
    """Integer class of each example (one-hot → argmax), or None when y isn't class labels."""
    arr = np.asarray(y)
    if arr.ndim >= 2 and arr.shape[-1] > 1:
        return arr.reshape(len(arr), -1).argmax(-1)
    flat = arr.reshape(len(arr), -1)
    if flat.shape[1] != 1:
        return None
    flat = flat[:, 0]
    if flat.dtype.kind in "iub":
        return flat.astype(np.int64)
    if flat.dtype.kind == "f" and np.all(np.isfinite(flat)) and np.all(flat == np.round(flat)):
        if len(np.unique(flat)) <= 1000:
            return flat.astype(np.int64)
    return None


def _logit_confidence(losses: np.ndarray) -> np.ndarray:
    """log(p/(1−p)) with p = exp(−loss), computed stably (p near 1 is the interesting end)."""
    losses = np.clip(losses, 1e-30, None)
    return -losses - np.log(-np.expm1(-losses))


@dataclass(frozen=True)
class Outputs:
    """What an attack sees of a model on a set of examples: each example's loss, its class (None
    when y is not class labels), the exact logit margin φ when the loss allows it (see
    :func:`_logit_margin`), and whether the loss is a cross-entropy (−log p of the true class)."""

    losses: np.ndarray
    labels: np.ndarray | None = None
    margins: np.ndarray | None = None
    crossentropy: bool = False

    def __len__(self) -> int:
        return len(self.losses)

    def take(self, idx: np.ndarray) -> Outputs:
        labels = None if self.labels is None else self.labels[idx]
        margins = None if self.margins is None else self.margins[idx]
        return Outputs(self.losses[idx], labels, margins, self.crossentropy)

    def confidence(self) -> np.ndarray:
        """The calibrated attack's base score: φ when exact, else log(p/(1−p)) for a
        cross-entropy, else minus the loss."""
        if self.margins is not None:
            return self.margins
        return _logit_confidence(self.losses) if self.crossentropy else -self.losses


def model_outputs(
    model: Any, x: Any, y: Any, *, loss: Any = None, batch_size: int = 1024
) -> Outputs:
    """:class:`Outputs` of ``model`` on ``(x, y)`` (inference mode)."""
    loss = loss if loss is not None else getattr(model, "loss", None)
    losses, margins = per_example_loss(model, x, y, loss=loss, batch_size=batch_size)
    return Outputs(losses, class_labels(y), margins, "crossentropy" in loss_name(loss))


def loss_scores(outputs: Outputs) -> np.ndarray:
    """The loss attack's scores: −loss; with exact margins the ranking is by φ (the loss is
    softplus(−φ), monotone), which keeps the order of examples whose float64 loss underflows."""
    return outputs.margins if outputs.margins is not None else -outputs.losses


@dataclass(frozen=True)
class Calibration:
    """Per-class mean and standard deviation of the reference non-members' confidence, and the
    same over the whole reference (for classes with fewer than :data:`MIN_REFERENCE`)."""

    per_class: dict[int, tuple[float, float]]
    pooled: tuple[float, float]

    @classmethod
    def fit(cls, base: np.ndarray, labels: np.ndarray) -> Calibration:
        def moments(values: np.ndarray) -> tuple[float, float]:
            return float(values.mean()), float(values.std(ddof=1))

        per_class = {
            int(c): moments(base[labels == c])
            for c in np.unique(labels)
            if (labels == c).sum() >= MIN_REFERENCE
        }
        return cls(per_class, moments(base))

    def __call__(self, base: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """z-scores: a function of (confidence, class) alone, the same for every example."""
        mean, sd = np.full(len(base), self.pooled[0]), np.full(len(base), self.pooled[1])
        for c, (m, s) in self.per_class.items():
            rows = labels == c
            mean[rows], sd[rows] = m, s
        return (base - mean) / np.sqrt(sd**2 + 1e-12)


def calibrated_scores(
    members: Outputs, nonmembers: Outputs, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Scores of the calibrated attack: ``(members' scores, scored non-members' scores, rows of
    the scored non-members)``. A random half of the non-members is the reference: it calibrates
    and is not scored, so members and scored non-members go through the same map."""
    if members.labels is None or nonmembers.labels is None:
        raise InvalidParameterError(
            "attack='calibrated' needs class labels (integers or one-hot); use attack='loss'"
        )
    if len(nonmembers) < 2 * MIN_REFERENCE:
        raise InvalidParameterError(
            f"attack='calibrated' needs at least {2 * MIN_REFERENCE} holdout examples: a random "
            "half calibrates the scores and only the other half is scored"
        )
    perm = rng.permutation(len(nonmembers))
    reference, scored = perm[: len(perm) // 2], np.sort(perm[len(perm) // 2 :])
    ref = nonmembers.take(reference)
    calibrate = Calibration.fit(ref.confidence(), ref.labels)
    out = nonmembers.take(scored)
    return (
        calibrate(members.confidence(), members.labels),
        calibrate(out.confidence(), out.labels),
        scored,
    )
