"""Embedding layers: per-example gradients of the table without forming them.

An example's gradient of the table has one row per distinct token it contains: the sum of the
output-gradients at that token's positions. Tokens that occur once contribute their ``dz`` row as
it is; repeated tokens are found by one sort of the batch's positions by token (on the host with
NumPy when the layer reads the model input, see :func:`repeats`; in the graph otherwise) and
their rows summed once per (example, token). The norms are taken of exactly those rows, and the
clipped sum adds those same rows, times their example's clip factor, to their tokens' rows of the
table: one segment sum over the positions sorted by token, where each (example, repeated token)
run is its sum in its first slot and zeros after.

Summing the positions' rows straight into the table, as this module once did, let a record whose
repeated token has huge rows that cancel (+1e20, 1, -1e20 after per-token weights) wipe out in
float32 what the other records had put in that row: one record moved the sum by several C.
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
    example. ``order`` (B·T,) every flat position, sorted by token (then position);
    ``sorted_ids`` (B·T,) the tokens in that order — the clipped table is one sorted segment sum.
    """

    single: Any
    rows: Any
    group: Any
    owner: Any
    order: Any
    sorted_ids: Any


def repeats(ids: np.ndarray, vocabulary: int) -> RepeatedTokens:
    """The :class:`RepeatedTokens` of a batch of token ids (B, ...) as NumPy arrays.

    One vectorised (SIMD) sort of ``token·2^bits + flat position`` on the host — several times
    cheaper than the same work in the graph — orders every position by token; positions of one
    token in one example are then neighbours.
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
    size = batch * length
    bits = max(1, (size - 1).bit_length())
    # 32-bit keys when they fit (NumPy sorts and shifts them twice as fast), else 64-bit.
    wide = np.int32 if int(vocabulary).bit_length() + bits <= 31 else np.int64
    tokens = ids.ravel().astype(wide)
    positions = np.arange(size, dtype=wide)
    if int(vocabulary).bit_length() + bits <= 62:
        keys = (tokens << bits) | positions
        keys.sort()
        order, ranked = keys & ((1 << bits) - 1), keys >> bits
    else:  # (keys would overflow 64 bits)
        order = np.lexsort((positions, tokens))
        ranked = tokens[order]
    example = order // max(length, 1)
    same = (ranked[1:] == ranked[:-1]) & (example[1:] == example[:-1])
    repeated = np.zeros(size, bool)
    repeated[:-1] |= same
    repeated[1:] |= same
    starts = np.ones(size, bool)
    starts[1:] = ~same
    where = np.flatnonzero(repeated)
    rows = order[where].astype(np.int32)
    first = starts[where]
    group = (np.cumsum(first) - 1).astype(np.int32)
    owner = example[where][first].astype(np.int32)
    single = np.ones(size, bool)
    single[rows] = False
    # (A table can't have 2^31 rows: the step reads the ids as int32.)
    return RepeatedTokens(
        single.reshape(batch, length), rows, group, owner, order.astype(np.int32),
        ranked.astype(np.int32),
    )  # fmt: skip


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
    flat = tf.reshape(tf.cast(idx, tf.int32), [-1])
    order = tf.argsort(flat, stable=True)
    return RepeatedTokens(
        tf.reshape(single, [batch, length]), rows, group, owner, order, tf.gather(flat, order)
    )


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
        host = rec.host.get(id(layer))
        if host is not None:  # every id of the data was range-checked before training
            z = tf.gather(layer.embeddings, idx)
            host = _checked(host, idx, rec.inputs, layer.input_dim)
        else:
            # Ids computed in the model were not: an id out of range would stop training at the
            # step that samples its record — a signal outside the accounting. Its example's
            # rows become NaN instead, and the step drops the example as a non-finite one.
            bad = (idx < 0) | (idx >= tf.cast(layer.input_dim, idx.dtype))
            idx = tf.where(bad, tf.zeros_like(idx), idx)
            z = tf.gather(layer.embeddings, idx)
            z = tf.where(bad[..., None], tf.constant(float("nan"), z.dtype), z)
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
            # One row per example: the rows are the per-example gradients.

            def clipped(c: tf.Tensor, rows: RowFilter) -> list[tuple[Any, tf.Tensor]]:
                weighted = tf.reshape(rows(dz) * c[:, None, None], [-1, dim])
                table = tf.math.unsorted_segment_sum(weighted, tokens, layer.input_dim)
                return [(layer.embeddings, table)]

            return LayerGrads(tf.reduce_sum(pos_sq, axis=1), clipped, "Embedding: per-example rows")

        rep = tap.saved["repeats"]  # found on the host from the input ids, or here
        if rep is None:
            rep = graph_repeats(idx, layer.input_dim)
        # Each (example, repeated token) row, summed once: these rows and the single rows are the
        # per-example gradients, and the norms and the clipped sum are taken of the same tensors.
        sums = tf.math.segment_sum(tf.gather(tf.reshape(dz, [-1, dim]), rep.rows), rep.group)
        run_sq = tf.reduce_sum(tf.square(sums), axis=1)
        sq = tf.reduce_sum(tf.where(rep.single, pos_sq, 0.0), axis=1)
        sq = sq + tf.math.unsorted_segment_sum(run_sq, rep.owner, batch)
        positions = tf.shape(idx)[1]
        # In the sorted order every (example, repeated token) is a run of neighbours: its first
        # slot takes the run's sum (the very tensor the norm was taken of), the others 0.
        single = tf.gather(tf.reshape(rep.single, [-1]), rep.order)
        firsts = tf.math.segment_min(tf.range(tf.shape(rep.rows)[0]), rep.group)
        slots = tf.gather(tf.math.invert_permutation(rep.order), tf.gather(rep.rows, firsts))

        def clipped(c: tf.Tensor, rows: RowFilter) -> list[tuple[Any, tf.Tensor]]:
            factor = tf.gather(tf.reshape(tf.tile(c[:, None], [1, positions]), [-1]), rep.order)
            factor = tf.where(single, factor, 0.0)  # (rows of a kept example are finite)
            flat = tf.gather(tf.reshape(rows(dz), [-1, dim]), rep.order) * factor[:, None]
            runs = sums
            if rows.active:
                runs = tf.where(tf.gather(rows.keep, rep.owner)[:, None], sums, 0.0)
            runs = runs * tf.gather(c, rep.owner)[:, None]
            flat = tf.tensor_scatter_nd_update(flat, slots[:, None], runs)
            table = tf.math.segment_sum(flat, rep.sorted_ids)
            missing = layer.input_dim - tf.shape(table)[0]  # rows after the largest id seen
            return [(layer.embeddings, tf.pad(table, [[0, missing], [0, 0]]))]

        return LayerGrads(sq, clipped, "Embedding: per-example token sums")
