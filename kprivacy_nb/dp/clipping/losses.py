"""A Keras loss as a per-example function."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import keras
import tensorflow as tf

from ...errors import TrainingError

__all__ = ["per_example_loss_fn"]


def per_example_loss_fn(loss: Any) -> Callable[[Any, Any], tf.Tensor]:
    """Turn a Keras loss (name, function or ``Loss`` object) into ``f(y, pred) -> (batch,)``."""
    if loss is None:
        raise TrainingError(
            "no loss: compile the model with a loss (model.compile(loss=...)) or pass loss=..., "
            "e.g. loss='sparse_categorical_crossentropy'"
        )
    if isinstance(loss, (dict, list, tuple)):
        raise TrainingError(
            "models with several outputs/losses are not supported by dp_fit yet; give one loss"
        )
    if isinstance(loss, str):
        try:
            loss = keras.losses.get(loss)
        except ValueError as exc:
            raise TrainingError(f"unknown loss {loss!r}: {exc}") from None
    if isinstance(loss, keras.losses.Loss):
        fn = loss.call
    elif callable(loss):
        fn = loss
    else:
        raise TrainingError(f"loss must be a name, a function or a keras Loss, got {loss!r}")

    def per_example(y_true: Any, y_pred: Any) -> tf.Tensor:
        mask = getattr(y_pred, "_keras_mask", None)  # Masking / mask_zero upstream
        y_true, y_pred = _same_rank(y_true, y_pred)
        values = tf.convert_to_tensor(fn(y_true, y_pred))
        if values.shape.rank is not None and values.shape.rank > 1:
            axes = list(range(1, values.shape.rank))
            if mask is not None and mask.shape.rank == values.shape.rank:
                # Masked steps are left out, as Keras leaves them out; each example's loss is
                # the mean over its own unmasked steps (Keras divides by the whole batch's
                # count, which would let one example's padding weigh another's loss).
                keep = tf.cast(mask, values.dtype)
                total = tf.reduce_sum(values * keep, axis=axes)
                values = total / tf.maximum(tf.reduce_sum(keep, axis=axes), 1.0)
            else:
                values = tf.reduce_mean(values, axis=axes)
        return values

    per_example.keras_loss = loss  # type: ignore[attr-defined]
    return per_example


def _same_rank(y_true: Any, y_pred: Any) -> tuple[Any, Any]:
    """Labels of shape ``(B,)`` for predictions ``(B, 1)`` (and the reverse), lined up as Keras'
    ``fit`` lines them up. Left alone, a loss function would broadcast them to ``(B, B)`` — every
    example's loss reading every other example's label."""
    y_true = tf.convert_to_tensor(y_true)
    if not isinstance(y_pred, tf.Tensor) or y_true.shape.rank is None or y_pred.shape.rank is None:
        return y_true, y_pred
    if y_true.shape.rank == y_pred.shape.rank - 1 and y_pred.shape[-1] == 1:
        y_true = tf.expand_dims(y_true, -1)
    elif y_true.shape.rank == y_pred.shape.rank + 1 and y_true.shape[-1] == 1:
        y_true = tf.squeeze(y_true, -1)
    return y_true, y_pred
