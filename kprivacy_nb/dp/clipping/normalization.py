"""LayerNormalization and GroupNormalization: their per-example gradients are small (one value
per feature), so they are formed directly from the normalised input and ``dz``."""

from __future__ import annotations

from typing import Any

import keras
import tensorflow as tf
from keras import ops

from .registry import Handler, LayerGrads, Recorder, Tap, common_reason, materialized, register


def _norm_axes(layer: Any, ndim: int) -> list[int]:
    axes = layer.axis if isinstance(layer.axis, (list, tuple)) else [layer.axis]
    return sorted(a % ndim for a in axes)


@register(keras.layers.LayerNormalization)
class LayerNormHandler(Handler):
    kind = "layernorm"

    def reason_unsupported(self, layer: Any) -> str | None:
        if getattr(layer, "rms_scaling", False):
            return "rms_scaling"
        return common_reason(layer, keras.layers.LayerNormalization)

    def forward(self, layer: Any, rec: Recorder, inputs: Any) -> Any:
        x = tf.convert_to_tensor(inputs)
        ndim = x.shape.rank
        axes = _norm_axes(layer, ndim)
        mean, var = tf.nn.moments(x, axes=axes, keepdims=True)
        xhat = (x - mean) * tf.math.rsqrt(var + layer.epsilon)
        shape = [1] * ndim
        for a in axes:
            shape[a] = x.shape[a]
        y = xhat
        if layer.gamma is not None:
            y = y * tf.reshape(tf.cast(layer.gamma, x.dtype), shape)
        if layer.beta is not None:
            y = y + tf.reshape(tf.cast(layer.beta, x.dtype), shape)
        y = rec.probe(layer, self.kind, y, xhat=xhat, axes=axes)
        return ops.cast(y, layer.compute_dtype)

    def grads(self, tap: Tap, dz: tf.Tensor) -> LayerGrads:
        layer, xhat = tap.layer, tap.saved["xhat"]
        other = [a for a in range(1, dz.shape.rank) if a not in tap.saved["axes"]]
        pairs = []
        batch = tf.shape(dz)[0]
        if layer.gamma is not None:
            g = tf.reduce_sum(xhat * dz, axis=other) if other else xhat * dz
            pairs.append((layer.gamma, tf.reshape(g, [batch, *layer.gamma.shape])))
        if layer.beta is not None:
            g = tf.reduce_sum(dz, axis=other) if other else dz
            pairs.append((layer.beta, tf.reshape(g, [batch, *layer.beta.shape])))
        return materialized(pairs, "LayerNormalization: per-example gradients")


@register(keras.layers.GroupNormalization)
class GroupNormHandler(Handler):
    kind = "groupnorm"

    def reason_unsupported(self, layer: Any) -> str | None:
        if layer.axis not in (-1,):
            return f"axis={layer.axis}"
        return common_reason(layer, keras.layers.GroupNormalization)

    def forward(self, layer: Any, rec: Recorder, inputs: Any) -> Any:
        x = tf.convert_to_tensor(inputs)
        channels = x.shape[-1]
        groups = layer.groups
        grouped = tf.reshape(x, [tf.shape(x)[0], -1, groups, channels // groups])
        mean, var = tf.nn.moments(grouped, axes=[1, 3], keepdims=True)
        xhat = tf.reshape((grouped - mean) * tf.math.rsqrt(var + layer.epsilon), tf.shape(x))
        y = xhat
        if layer.gamma is not None:
            y = y * tf.cast(layer.gamma, x.dtype)
        if layer.beta is not None:
            y = y + tf.cast(layer.beta, x.dtype)
        y = rec.probe(layer, self.kind, y, xhat=xhat)
        return ops.cast(y, layer.compute_dtype)

    def grads(self, tap: Tap, dz: tf.Tensor) -> LayerGrads:
        layer, xhat = tap.layer, tap.saved["xhat"]
        other = list(range(1, dz.shape.rank - 1))
        pairs = []
        if layer.gamma is not None:
            g = xhat * dz
            pairs.append((layer.gamma, tf.reduce_sum(g, axis=other) if other else g))
        if layer.beta is not None:
            pairs.append((layer.beta, tf.reduce_sum(dz, axis=other) if other else dz))
        return materialized(pairs, "GroupNormalization: per-example gradients")
