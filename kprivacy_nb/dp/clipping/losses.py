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
        values = tf.convert_to_tensor(fn(y_true, y_pred))
        if values.shape.rank is not None and values.shape.rank > 1:
            values = tf.reduce_mean(values, axis=list(range(1, values.shape.rank)))
        return values

    per_example.keras_loss = loss  # type: ignore[attr-defined]
    return per_example
