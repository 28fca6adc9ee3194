"""Membership scores of examples under a trained model (higher = "more likely a member").

* ``"loss"`` — minus the per-example loss (Yeom et al. 2018): members were fit, so their loss is
  lower. Works for any per-example Keras loss.
* ``"calibrated"`` — the logit-scaled confidence of the true class, ``log(p/(1−p))`` with
  ``p = exp(−cross-entropy)`` (Carlini et al. 2022), standardised against the non-members of the
  same class (a per-class Gaussian test, i.e. LiRA's offline test with the class as reference).
  Each non-member is standardised with the statistics of the *other* non-members (leave-one-out),
  so no score is judged against itself. Needs class labels; for non-cross-entropy losses the
  base score is minus the loss.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
from scipy import special

from ..errors import InvalidParameterError

__all__ = ["ATTACKS", "per_example_loss", "class_labels", "num_rows", "attack_scores"]

ATTACKS = ("loss", "calibrated")


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
    class labels the model has no output for."""
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
    if labels is None or "crossentropy" not in loss_name(loss):
        return
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


def _standardise(base: np.ndarray, cls: np.ndarray, out: np.ndarray) -> np.ndarray:
    """z-score of every score against the non-members of its class (all non-members when the
    class has fewer than 3); a non-member is judged against the *other* non-members only."""
    z = np.empty_like(base)
    for c in np.unique(cls):
        rows = cls == c
        ref = rows & out if (rows & out).sum() >= 3 else out
        vals, own = base[rows], out[rows].astype(float)  # own: the row is in its reference
        ref_vals = base[ref]
        cnt = len(ref_vals) - own
        mean = (ref_vals.sum() - own * vals) / cnt
        sq = ((ref_vals**2).sum() - own * vals**2) / cnt
        var = np.maximum(sq - mean**2, 0) * cnt / (cnt - 1)
        z[rows] = (vals - mean) / np.sqrt(var + 1e-12)
    return z


def attack_scores(
    attack: str,
    losses: np.ndarray,
    labels: np.ndarray | None,
    is_out: np.ndarray,
    loss: Any,
    margins: np.ndarray | None = None,
) -> np.ndarray:
    """Scores (higher = member) of examples with ``losses`` under ``attack``; ``is_out`` marks the
    non-members (the reference for calibration)."""
    if attack == "loss":
        # −loss; with exact margins the ranking is by φ (the loss is softplus(−φ), monotone), which
        # keeps the order of examples whose float64 loss still underflows.
        return margins if margins is not None else -losses
    if attack != "calibrated":
        raise InvalidParameterError(f"attack must be one of {', '.join(ATTACKS)}; got {attack!r}")
    if labels is None:
        raise InvalidParameterError(
            "attack='calibrated' needs class labels (integers or one-hot); use attack='loss'"
        )
    if is_out.sum() < 3:
        raise InvalidParameterError(
            "attack='calibrated' needs at least 3 holdout examples to calibrate against"
        )
    if margins is not None:
        base = margins
    elif "crossentropy" in loss_name(loss):
        base = _logit_confidence(losses)
    else:
        base = -losses
    return _standardise(base, labels, is_out)
