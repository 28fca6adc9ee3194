"""Position embeddings: an Embedding called on ids without a batch axis.

The usual token-and-position layer adds ``Embedding(T, d)(arange(T))`` — a (T, d) table slice —
to every example. Its output-gradient is then already summed over the batch, and the plain
Embedding rule (:mod:`.embedding`) would read T rows as T examples. This rule, which replaces the
plain one for every Embedding, broadcasts such ids to (B, T) first: the layer's output gains the
batch axis (``x + positions`` is unchanged), each example's gradient is its own rows, and the
rest is the Embedding rule. Ids are taken as unbatched when their leading size is known and is not
the model input's — decided on the first (self-checked) run and kept, so the traced step cannot
decide otherwise for a batch that happens to be T long. (That run's example count is chosen to
differ from every size of the inputs, :func:`.selfcheck.example_count`.)
"""

from __future__ import annotations

from typing import Any

import keras
import tensorflow as tf

from .embedding import EmbeddingHandler
from .registry import LayerGrads, Recorder, Tap, register

__all__ = ["PositionEmbeddingHandler", "unbatched"]


def unbatched(idx: tf.Tensor, model_inputs: Any) -> bool:
    """True if ``idx`` (rank 1) has a static length other than the model input's batch size."""
    flat = tf.nest.flatten(model_inputs) if model_inputs is not None else []
    if idx.shape.rank != 1 or idx.shape[0] is None or not flat:
        return False
    batch = getattr(flat[0], "shape", [None])[0]
    return idx.shape[0] != batch


@register(keras.layers.Embedding)
class PositionEmbeddingHandler(EmbeddingHandler):
    def __init__(self) -> None:
        self.unbatched: bool | None = None

    def forward(self, layer: Any, rec: Recorder, inputs: Any) -> Any:
        idx = tf.convert_to_tensor(inputs)
        if self.unbatched is None:
            self.unbatched = unbatched(idx, rec.inputs)
        if not self.unbatched:
            return super().forward(layer, rec, inputs)
        batch = tf.shape(tf.nest.flatten(rec.inputs)[0])[0]
        idx = tf.broadcast_to(idx[None], tf.stack([batch, tf.shape(idx)[0]]))
        return super().forward(layer, rec, idx)

    def grads(self, tap: Tap, dz: tf.Tensor) -> LayerGrads:
        part = super().grads(tap, dz)
        if self.unbatched:
            part.method = part.method.replace("Embedding:", "Embedding (position ids):", 1)
        return part
