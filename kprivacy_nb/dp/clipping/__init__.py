"""Fast, verified per-example gradient clipping for Keras 3 models on TensorFlow.

DP-SGD needs, for every example ``i`` of a batch, its gradient ``g_i`` over *all* trainable
weights, scaled by ``min(1, C / ‖g_i‖)``, and then only the *sum* of the scaled gradients.
Materialising every ``g_i`` is what makes naive DP-SGD 40–95× slower than normal training.

* :mod:`.registry` — per-layer rules, registered by layer type (one module per family:
  :mod:`.dense`, :mod:`.conv`, :mod:`.embedding` (and :mod:`.position_embedding`),
  :mod:`.normalization`, :mod:`.einsum_dense` (so MultiHeadAttention), :mod:`.rms_normalization`,
  :mod:`.rnn` (LSTM, GRU, SimpleRNN); shared linear algebra in :mod:`.linear`);
* :mod:`.clipper` — :class:`FastClipper` runs the model with taps, assembles norms and clipped
  sums, and falls back to per-example gradients for everything else;
* :mod:`.selfcheck` — before training, every path is checked against an exact reference on real
  examples, and models that mix examples are refused.

BatchNormalization mixes examples of a batch, so a per-example gradient does not exist; such
models are refused before training.
"""

from __future__ import annotations

# Importing the family modules registers their rules.
from . import (  # noqa: F401
    conv,
    dense,
    einsum_dense,
    embedding,
    normalization,
    position_embedding,
    rms_normalization,
    rnn,
)
from .clipper import EXACT_FALLBACK, FALLBACK, ClippedBatch, FastClipper, reads_model_input
from .embedding import RepeatedTokens, graph_repeats, repeats
from .losses import per_example_loss_fn
from .model import check_model, flatten_layers
from .registry import handler_for, register

__all__ = [
    "EXACT_FALLBACK",
    "FALLBACK",
    "ClippedBatch",
    "FastClipper",
    "RepeatedTokens",
    "check_model",
    "flatten_layers",
    "graph_repeats",
    "handler_for",
    "per_example_loss_fn",
    "reads_model_input",
    "register",
    "repeats",
]
