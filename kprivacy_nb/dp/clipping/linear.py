"""Norms and clipped sums of ``z = a @ W (+ b)`` applied at T positions of each example.

Shared by Dense (on vectors and sequences) and convolutions (on input patches). Per layer, the
cheaper of two exact forms is chosen from the shapes, as Bu et al. (*Scalable and Efficient
Training of Large CNNs with DP*) and Opacus do:

* **ghost norm**: ``‖G‖² = Σ_ts (a_t·a_s)(dz_t·dz_s)`` costs ``T²(p + o)``;
* **per-example gradients**: ``G = Σ_t a_t dz_tᵀ`` costs ``T·p·o`` and ``p·o`` memory per example.

The ghost form subtracts large terms when an example's inputs are large and nearly constant across
positions while the output-gradients alternate in sign: in float32 the result can even come out
≤ 0 and the example would go unclipped. So the ghost form is evaluated in float64, and an upper
bound of its rounding error is *added* (``‖G‖ ≤ Σ_t ‖a_t‖‖dz_t‖ =: U`` holds with no cancellation
and bounds every term): the norm used for clipping is never below the true one. The clipped sum of
that path (book-keeping, ``aᵀ(c ⊙ dz)``) is accumulated in float64 too, so the rounding of one
example's huge terms cannot leak past its clip factor.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import tensorflow as tf

from .registry import LayerGrads, RowFilter

__all__ = ["chunked_grads", "flat3", "linear_grads", "static_positions"]

_EPS64 = float(np.finfo(np.float64).eps)
_TINY32 = float(np.finfo(np.float32).tiny)  # 2⁻¹²⁶, the smallest normal float32


def static_positions(t: tf.Tensor) -> int | None:
    dims = t.shape[1:-1]
    if any(d is None for d in dims):
        return None
    return math.prod(dims)


def flat3(t: tf.Tensor) -> tf.Tensor:
    """(B, ..., d) → (B, T, d), keeping T static when it is known."""
    positions = static_positions(t)
    if positions is not None:
        return tf.reshape(t, [-1, positions, t.shape[-1]])
    return tf.reshape(t, [tf.shape(t)[0], -1, t.shape[-1]])


def _ghost_sq(parts: list[tf.Tensor], dz: tf.Tensor, positions: int) -> tf.Tensor:
    """Per-example ‖Σ_t a_t dz_tᵀ‖², never below the exact value (see the module docstring)."""
    a64 = [tf.cast(t, tf.float64) for t in parts]
    g64 = tf.cast(dz, tf.float64)
    aa = tf.add_n([tf.matmul(t, t, transpose_b=True) for t in a64])  # (B, T, T)
    gg = tf.matmul(g64, g64, transpose_b=True)
    sq = tf.reduce_sum(aa * gg, axis=[1, 2])
    a_norm = tf.sqrt(tf.add_n([tf.reduce_sum(tf.square(t), -1) for t in a64]))  # (B, T)
    upper = tf.reduce_sum(a_norm * tf.norm(g64, axis=-1), axis=1)  # U ≥ ‖G‖
    p = len(parts) * parts[0].shape[-1]
    # |computed − exact| ≤ (p + o + T² + 2)·ε₆₄·U²; the rounding of the float64 book-keeping
    # sum over B·T rows adds at most B·T·ε₆₄·U to the norm.
    terms = p + dz.shape[-1] + positions * positions + 2
    sq = tf.minimum(tf.maximum(sq, 0.0) + terms * _EPS64 * tf.square(upper), tf.square(upper))
    rows = tf.cast(tf.shape(dz)[0] * positions, tf.float64)
    norm = tf.sqrt(sq) + rows * _EPS64 * upper
    return tf.cast(tf.square(norm), tf.float32)


#: Widest layer (inputs + outputs) whose norms use float32 sums: their rounding bound (below)
#: stays under 5e-4, half the self-check's tolerance. Wider layers sum in float64.
FLOAT32_SUMS_MAX_WIDTH = 4096


def _single_position_sq(a: tf.Tensor, dz: tf.Tensor, with_bias: bool) -> tf.Tensor:
    """Per-example ‖a‖²·‖dz‖² (+ ‖dz‖², the bias) for a (B, p), dz (B, o), never below the exact
    value.

    Both factors are sums of squares: no cancellation. Up to :data:`FLOAT32_SUMS_MAX_WIDTH` they
    are float32 sums (one cheap pass over ``a`` and ``dz``); each gets its count times 2⁻¹²⁶
    added (what flushing tiny squares to 0 can lose) and is multiplied by ``1 + (n + 2)·2⁻²³`` —
    twice the worst-case relative rounding error of summing n squares in any order — so tiny
    inputs read by huge output-gradients can't make the norm 0, nor rounding make it smaller.
    Wider layers sum in float64. The per-example products are formed in float64. A factor or a
    norm² beyond float32's range (an entry above ~1.8e19) becomes ∞ and the example is dropped,
    as a non-finite one.
    """
    p, o = a.shape[-1], dz.shape[-1]
    if p + o > FLOAT32_SUMS_MAX_WIDTH:
        a_sq = tf.reduce_sum(tf.square(tf.cast(a, tf.float64)), 1)
        dz_sq = tf.reduce_sum(tf.square(tf.cast(dz, tf.float64)), 1)
        sq = (a_sq + 1.0) * dz_sq if with_bias else a_sq * dz_sq
        return tf.cast(sq * (1.0 + 2.0**-23), tf.float32)  # (the cast rounds to nearest)

    def sum_sq(t: tf.Tensor, n: int) -> tf.Tensor:
        s = tf.reduce_sum(tf.square(t), 1) + n * _TINY32
        return tf.cast(s, tf.float64) * (1.0 + (n + 2) * 2.0**-23)

    a_sq, dz_sq = sum_sq(a, p), sum_sq(dz, o)
    return tf.cast((a_sq + 1.0) * dz_sq if with_bias else a_sq * dz_sq, tf.float32)


def linear_grads(
    parts: list[tf.Tensor], dz: tf.Tensor, kernel: Any, bias: Any, kernel_shape: Any, name: str
) -> LayerGrads:
    """``a`` (B, T, p) is given as K pieces (B, T, c) with p = K·c, in the order of ``W``'s rows:
    one piece for Dense; one per kernel offset for a convolution, so its patches are never
    assembled. ``dz``: (B, T, o). ``W`` has ``p*o`` entries."""
    positions = static_positions(parts[0])
    c_in, o = parts[0].shape[-1], dz.shape[-1]
    p = len(parts) * c_in
    bias_g = tf.reduce_sum(dz, axis=1) if bias is not None else None
    bias_sq = bias_g is not None
    if positions == 1:
        # ‖G‖² = ‖a‖²·‖dz‖² (+ ‖dz‖² for the bias): see _single_position_sq.
        a2, dz2 = tf.concat([t[:, 0, :] for t in parts], 1), dz[:, 0, :]
        sq = _single_position_sq(a2, dz2, with_bias=bias_sq)
        bias_sq = False
        method = f"{name}: ghost norm"

        def kernel_sum(c: tf.Tensor, rows: RowFilter) -> tf.Tensor:
            return tf.matmul(rows(a2), rows(dz2) * c[:, None], transpose_a=True)

    elif positions is not None and positions * (p + o) <= p * o:
        sq = _ghost_sq(parts, dz, positions)
        method = f"{name}: ghost norm ({positions} positions, float64)"

        def kernel_sum(c: tf.Tensor, rows: RowFilter) -> tf.Tensor:
            weighted = tf.reshape(
                tf.cast(rows(dz), tf.float64) * tf.cast(c, tf.float64)[:, None, None], [-1, o]
            )
            pieces = [tf.cast(tf.reshape(rows(t), [-1, c_in]), tf.float64) for t in parts]
            out = tf.concat([tf.matmul(t, weighted, transpose_a=True) for t in pieces], 0)
            return tf.cast(out, tf.float32)

    else:
        per_ex = tf.concat([tf.matmul(t, dz, transpose_a=True) for t in parts], 1)  # (B, p, o)
        sq = tf.reduce_sum(tf.square(per_ex), axis=[1, 2])
        method = f"{name}: per-example kernel gradients ({positions or '?'} positions)"

        def kernel_sum(c: tf.Tensor, rows: RowFilter) -> tf.Tensor:
            return tf.tensordot(c, rows(per_ex), axes=1)

    if bias_sq:
        sq = sq + tf.reduce_sum(tf.square(bias_g), 1)

    def clipped(c: tf.Tensor, rows: RowFilter) -> list[tuple[Any, tf.Tensor]]:
        out = [(kernel, tf.reshape(kernel_sum(c, rows), kernel_shape))]
        if bias_g is not None:
            out.append((bias, tf.linalg.matvec(rows(bias_g), c, transpose_a=True)))
        return out

    return LayerGrads(sq, clipped, method)


#: Per-example gradients formed at one time by :func:`chunked_grads` (floats, ~1 MiB).
CHUNK_FLOATS = 2**18


def chunked_grads(
    blocks: list[tuple[Any, Callable[[Any, Any], tuple[tf.Tensor, tf.Tensor]]]],
    batch: tf.Tensor,
    name: str,
) -> LayerGrads:
    """Norms and clipped sums of kernels ``G_k = Σ_t a_tᵀ g_t`` from per-example gradients formed
    a few examples at a time, so a batch never holds more than :data:`CHUNK_FLOATS` of them.

    ``blocks``: ``(kernel, chunk)`` where ``chunk(start, stop)`` gives ``a`` (n, T, p) and ``g``
    (n, T, o) of examples ``start:stop``. The norms take one pass over the chunks and the clipped
    sum another, which forms the same per-example gradients again (the same computation on the
    same data): what is summed is what was measured, each example scaled by its own clip factor
    before it meets another example's (as :func:`linear_grads`' per-example form). Costs one more
    pass of the per-example products than forming them all at once.
    """
    width = sum(math.prod(kernel.shape) for kernel, _ in blocks)
    size = max(1, CHUNK_FLOATS // width)
    count = (batch + size - 1) // size

    def bounds(i: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        return i * size, tf.minimum((i + 1) * size, batch)

    def per_example(chunk: Callable[..., Any], start: Any, stop: Any) -> tf.Tensor:
        a, g = chunk(start, stop)
        return tf.matmul(a, g, transpose_a=True)  # (n, p, o)

    def norm_body(i: tf.Tensor, out: tf.TensorArray) -> tuple[tf.Tensor, tf.TensorArray]:
        start, stop = bounds(i)
        sq = tf.add_n(
            [tf.reduce_sum(tf.square(per_example(chunk, start, stop)), [1, 2])
             for _, chunk in blocks]
        )  # fmt: skip
        return i + 1, out.write(i, sq)

    pieces = tf.TensorArray(tf.float32, size=count, infer_shape=False, element_shape=[None])
    _, pieces = tf.while_loop(
        lambda i, _: i < count, norm_body, (tf.constant(0), pieces), parallel_iterations=1
    )
    sq = pieces.concat()

    def clipped(c: tf.Tensor, rows: RowFilter) -> list[tuple[Any, tf.Tensor]]:
        def body(i: tf.Tensor, sums: list[tf.Tensor]) -> tuple[tf.Tensor, list[tf.Tensor]]:
            start, stop = bounds(i)
            added = []
            for (_, chunk), total in zip(blocks, sums, strict=True):
                g = rows.rows(per_example(chunk, start, stop), start, stop)
                added.append(total + tf.tensordot(c[start:stop], g, axes=1))
            return i + 1, added

        start = [tf.zeros(kernel.shape, tf.float32) for kernel, _ in blocks]
        _, sums = tf.while_loop(
            lambda i, _: i < count, body, (tf.constant(0), start), parallel_iterations=1
        )
        return [(kernel, s) for (kernel, _), s in zip(blocks, sums, strict=True)]

    return LayerGrads(
        sq, clipped, f"{name}: per-example kernel gradients, a few examples at a time"
    )
