"""Embedding layers: per-example gradients of the table without forming them.

An example's gradient of the table has one row per distinct token it contains: the sum of the
output-gradients at that token's positions. Tokens that occur once contribute their ``dz`` row as
it is; repeated tokens are found by one sort per example (on the host with NumPy when the layer
reads the model input, see :func:`repeats`; in the graph otherwise) and their rows summed. The
clipped sum is assembled from exactly those per-example rows, so the norm that sets an example's
clip factor is the norm of what that example adds.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from .linear import static_positions
from .registry import Handler, LayerGrads, Recorder, RowFilter, Tap, register

__all__ = ["RepeatedTokens", "graph_repeats", "repeats"]


class RepeatedTokens(NamedTuple):
    """Where an example repeats a token, found from its ids before the step (:func:`repeats`).

    ``single`` (B, T) bool: the token at this position occurs once in its example.
    ``rows`` (K,) flat positions ``b·T + t`` of the repeated occurrences, grouped by (example,
    token); ``group`` (K,) their group number (non-decreasing); ``owner`` (R,) each group's
    example.
    """

    single: Any
    rows: Any
    group: Any
    owner: Any


def repeats(ids: np.ndarray, vocabulary: int) -> RepeatedTokens:
    """The :class:`RepeatedTokens` of a batch of token ids (B, ...) as NumPy arrays.

    NumPy's vectorised (SIMD) sort makes this several times cheaper on the host than the same
    work in the graph.
    """
    ids = np.asarray(ids).reshape(len(ids), -1)
    if ids.dtype.kind != "i" and ids.dtype.kind != "u":
        ids = ids.astype(np.int64)
    batch, length = ids.shape
    if ids.size:
        low, high = int(ids.min()), int(ids.max())
        if high >= vocabulary or low < -vocabulary:
            bad = high if high >= vocabulary else low
            raise ValueError(
                f"token id {bad} is out of range for an Embedding of {vocabulary} rows"
            )
        if low < 0:  # wrapped, as ops.take does
            ids = np.where(ids < 0, ids + vocabulary, ids)
    # One vectorised sort of token·2^bits + position gives both the order and the sorted tokens.
    bits = max(1, (length - 1).bit_length())
    wide = np.int32 if vocabulary < 2 ** (31 - bits) else np.int64
    keys = (ids.astype(wide) << bits) | np.arange(length, dtype=wide)
    keys.sort(axis=1)
    ranked, order = keys >> bits, (keys & ((1 << bits) - 1)).astype(np.int32)
    same = ranked[:, 1:] == ranked[:, :-1]
    repeated = np.zeros((batch, length), bool)
    repeated[:, :-1] |= same
    repeated[:, 1:] |= same
    starts = np.ones((batch, length), bool)
    starts[:, 1:] = ~same
    where = np.flatnonzero(repeated)
    flat_order = (order + (np.arange(batch) * length)[:, None]).ravel()
    rows = flat_order[where].astype(np.int32)
    first = starts.ravel()[where]
    group = (np.cumsum(first) - 1).astype(np.int32)
    owner = (where[first] // max(length, 1)).astype(np.int32)
    single = np.ones(batch * length, bool)
    single[rows] = False
    return RepeatedTokens(single.reshape(batch, length), rows, group, owner)


def graph_repeats(idx: tf.Tensor, vocabulary: int) -> RepeatedTokens:
    """:func:`repeats` inside the graph, for ids (B, T) not known before the step.

    One sort of token · 2^bits + position per example (shifts and masks: TensorFlow's integer
    division is slow) gives both the sorted tokens and where each came from.
    """
    batch, length = tf.shape(idx)[0], tf.shape(idx)[1]
    # Out-of-range ids would corrupt the packed keys (gather only rejects them on CPU).
    tf.debugging.assert_less(idx, tf.cast(vocabulary, idx.dtype), "token id out of range")
    bits = max(1, int(idx.shape[1] - 1).bit_length()) if idx.shape[1] else 31
    dtype = tf.int32 if vocabulary < 2 ** (31 - bits) else tf.int64
    packed = tf.bitwise.left_shift(tf.cast(idx, dtype), tf.cast(bits, dtype)) | tf.range(
        length, dtype=dtype
    )
    packed = tf.sort(packed, axis=1)
    tok = tf.bitwise.right_shift(packed, tf.cast(bits, dtype))
    pos = tf.cast(packed & tf.cast(2**bits - 1, dtype), tf.int32)  # original position
    same = tok[:, 1:] == tok[:, :-1]  # (batch, length - 1): equal to the next sorted token
    edge = tf.zeros([batch, 1], tf.bool)
    repeated = tf.concat([same, edge], 1) | tf.concat([edge, same], 1)
    where = tf.cast(tf.where(tf.reshape(repeated, [-1]))[:, 0], tf.int32)
    first = tf.gather(tf.reshape(tf.concat([~edge, ~same], 1), [-1]), where)
    group = tf.cumsum(tf.cast(first, tf.int32)) - 1
    example = where // length
    rows = example * length + tf.gather(tf.reshape(pos, [-1]), where)
    single = tf.tensor_scatter_nd_update(
        tf.ones([batch * length], tf.bool), rows[:, None], tf.zeros_like(rows, tf.bool)
    )
    owner = tf.boolean_mask(example, first)
    return RepeatedTokens(tf.reshape(single, [batch, length]), rows, group, owner)


def _checked(host: RepeatedTokens, idx: tf.Tensor, inputs: Any, vocabulary: int) -> Any:
    """The host's repeats if the ids the layer reads are the model input they were found from;
    otherwise (a nested model feeding the same Input other ids…) the repeats found in the graph."""
    raw = tf.convert_to_tensor(inputs) if not isinstance(inputs, (dict, list, tuple)) else None
    if raw is None or raw.shape.rank != idx.shape.rank:
        return graph_repeats(tf.reshape(tf.cast(idx, tf.int32), [tf.shape(idx)[0], -1]), vocabulary)
    raw = tf.cast(raw, idx.dtype)
    raw = tf.where(raw < 0, raw + tf.cast(vocabulary, raw.dtype), raw)
    same = tf.reduce_all(tf.equal(tf.shape(raw), tf.shape(idx)))
    same = tf.cond(same, lambda: tf.reduce_all(tf.equal(raw, idx)), lambda: tf.constant(False))
    flat = tf.reshape(tf.cast(idx, tf.int32), [tf.shape(idx)[0], -1])
    return tf.cond(same, lambda: host, lambda: graph_repeats(flat, vocabulary))


@register(keras.layers.Embedding)
class EmbeddingHandler(Handler):
    kind = "embedding"
    base = keras.layers.Embedding

    def forward(self, layer: Any, rec: Recorder, inputs: Any) -> Any:
        idx = tf.convert_to_tensor(inputs)
        if idx.dtype not in (tf.int32, tf.int64):
            idx = tf.cast(idx, tf.int32)
        idx = tf.where(idx < 0, idx + tf.cast(layer.input_dim, idx.dtype), idx)  # as ops.take
        z = tf.gather(layer.embeddings, idx)
        host = rec.host.get(id(layer))
        if host is not None:
            host = _checked(host, idx, rec.inputs, layer.input_dim)
        z = rec.probe(layer, self.kind, z, idx=idx, repeats=host)
        return ops.cast(z, layer.compute_dtype)

    def grads(self, tap: Tap, dz: tf.Tensor) -> LayerGrads:
        layer = tap.layer
        dim = dz.shape[-1]
        batch = tf.shape(dz)[0]
        idx = tf.reshape(tf.cast(tap.saved["idx"], tf.int32), [batch, -1])
        dz = tf.reshape(dz, [batch, -1, dim])
        tokens = tf.reshape(idx, [-1])
        pos_sq = tf.reduce_sum(tf.square(dz), axis=2)  # (batch, positions): one row each
        if tap.saved["idx"].shape.rank == 1 or static_positions(dz) == 1:

            def clipped(c: tf.Tensor, rows: RowFilter) -> list[tuple[Any, tf.Tensor]]:
                weighted = tf.reshape(rows(dz) * c[:, None, None], [-1, dim])
                table = tf.math.unsorted_segment_sum(weighted, tokens, layer.input_dim)
                return [(layer.embeddings, table)]

            return LayerGrads(tf.reduce_sum(pos_sq, axis=1), clipped, "Embedding: per-example rows")

        rep = tap.saved["repeats"]  # found on the host from the input ids, or here
        if rep is None:
            rep = graph_repeats(idx, layer.input_dim)
        # Rows of tokens that occur once in their example, and per-(example, token) sums of
        # the repeated ones: together, each example's gradient rows.
        single_dz = tf.where(rep.single[:, :, None], dz, 0.0)
        sums = tf.math.segment_sum(tf.gather(tf.reshape(dz, [-1, dim]), rep.rows), rep.group)
        run_sq = tf.reduce_sum(tf.square(sums), axis=1)
        sq = tf.reduce_sum(tf.where(rep.single, pos_sq, 0.0), axis=1)
        sq = sq + tf.math.unsorted_segment_sum(run_sq, rep.owner, batch)
        run_token = tf.math.segment_max(tf.gather(tokens, rep.rows), rep.group)

        def clipped(c: tf.Tensor, rows: RowFilter) -> list[tuple[Any, tf.Tensor]]:
            weighted = tf.reshape(rows(single_dz) * c[:, None, None], [-1, dim])
            table = tf.math.unsorted_segment_sum(weighted, tokens, layer.input_dim)
            run_sums = sums
            if rows.active:  # a dropped example's sums may be NaN: 0 · NaN is NaN
                run_sums = tf.where(tf.gather(rows.keep, rep.owner)[:, None], sums, 0.0)
            run_rows = run_sums * tf.gather(c, rep.owner)[:, None]
            table += tf.math.unsorted_segment_sum(run_rows, run_token, layer.input_dim)
            return [(layer.embeddings, table)]

        return LayerGrads(sq, clipped, "Embedding: per-example token sums")
