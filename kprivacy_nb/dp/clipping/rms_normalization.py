"""RMSNormalization (vectors or sequences): ``y = x · rsqrt(mean(x²) + ε) · scale``. The scale's
per-example gradient is one value per feature — ``Σ_positions x̂ ⊙ dz`` — so it is formed
directly, as for LayerNormalization (:mod:`.normalization`)."""

from __future__ import annotations

from typing import Any

import keras
import tensorflow as tf

from .registry import Handler, LayerGrads, Recorder, Tap, materialized, register


def _axes(layer: Any, ndim: int) -> list[int]:
    axes = layer.axis if isinstance(layer.axis, (list, tuple)) else [layer.axis]
    return sorted(a % ndim for a in axes)


@register(keras.layers.RMSNormalization)
class RMSNormHandler(Handler):
    kind = "rmsnorm"
    base = keras.layers.RMSNormalization

    def forward(self, layer: Any, rec: Recorder, inputs: Any) -> Any:
        x = tf.cast(tf.convert_to_tensor(inputs), tf.float32)
        axes = _axes(layer, x.shape.rank)
        mean_sq = tf.reduce_mean(tf.square(x), axis=axes, keepdims=True)
        xhat = x * tf.math.rsqrt(mean_sq + layer.epsilon)
        # The scale broadcasts against the trailing axes, as in Keras.
        y = rec.probe(layer, self.kind, xhat * tf.cast(layer.scale, x.dtype), xhat=xhat)
        return tf.cast(y, layer.compute_dtype)

    def grads(self, tap: Tap, dz: tf.Tensor) -> LayerGrads:
        layer, xhat = tap.layer, tap.saved["xhat"]
        scale_rank = len(layer.scale.shape)
        other = list(range(1, dz.shape.rank - scale_rank))
        g = tf.reduce_sum(xhat * dz, axis=other) if other else xhat * dz
        pairs = [(layer.scale, tf.reshape(g, [tf.shape(dz)[0], *layer.scale.shape]))]
        return materialized(pairs, "RMSNormalization: per-example gradients")
