"""Dense layers, on vectors or on sequences (any rank): see :mod:`.linear`."""

from __future__ import annotations

from typing import Any

import keras
import tensorflow as tf
from keras import ops

from .linear import flat3, linear_grads
from .registry import Handler, LayerGrads, Recorder, Tap, activate, register


@register(keras.layers.Dense)
class DenseHandler(Handler):
    kind = "dense"
    base = keras.layers.Dense

    def forward(self, layer: Any, rec: Recorder, inputs: Any) -> Any:
        x = tf.convert_to_tensor(inputs)
        z = ops.matmul(x, layer.kernel)
        if layer.bias is not None:
            z = ops.add(z, layer.bias)
        return activate(layer, rec.probe(layer, self.kind, z, x=x))

    def grads(self, tap: Tap, dz: tf.Tensor) -> LayerGrads:
        layer, x = tap.layer, tap.saved["x"]
        return linear_grads(
            [flat3(x)], flat3(dz), layer.kernel, layer.bias, layer.kernel.shape, "Dense"
        )
