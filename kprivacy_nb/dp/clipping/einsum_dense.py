"""EinsumDense — and so MultiHeadAttention, whose four projections are EinsumDense layers called
through ``__call__`` (each gets its own tap; the attention in between has no weights).

An EinsumDense is a Dense layer in disguise: its input axes are the batch, *position* axes (in
input and output, not in the kernel: sequence, heads of the output projection…), *contracted*
axes (input and kernel) and its kernel's *free* axes (kernel and output). Transposed to
``(B, positions, contracted)`` and ``(B, positions, free)`` it is :mod:`.linear`'s
``z = a @ W`` at T positions, with its choice of ghost norm or per-example gradients by cost. An
axis in all three (a kernel applied per group) has per-example gradients formed by one einsum.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import keras
import tensorflow as tf
from keras import ops

from .linear import linear_grads
from .registry import (
    Handler,
    LayerGrads,
    Recorder,
    RowFilter,
    Tap,
    activate,
    common_reason,
    materialized,
    register,
)

__all__ = ["Equation", "bias_grads", "parse_equation"]


@dataclass(frozen=True)
class Equation:
    """``inputs,kernel->output`` with any ellipsis spelled out as letters."""

    inputs: str
    kernel: str
    output: str

    @property
    def batch(self) -> str:
        return self.inputs[0]

    @property
    def positions(self) -> str:
        return "".join(c for c in self.inputs[1:] if c not in self.kernel and c in self.output)

    @property
    def contracted(self) -> str:
        return "".join(c for c in self.inputs if c in self.kernel and c not in self.output)

    @property
    def free(self) -> str:
        return "".join(c for c in self.kernel if c not in self.inputs and c in self.output)

    @property
    def grouped(self) -> str:
        return "".join(c for c in self.kernel if c in self.inputs and c in self.output)

    def problem(self) -> str | None:
        """Why per-example gradients can't be read off this equation (None when they can)."""
        if self.inputs[0] != self.output[0] or self.batch in self.kernel:
            return f"equation {self.spelled!r}: the first axis is not a batch axis"
        for c in self.inputs:
            if c not in self.kernel and c not in self.output:
                return f"equation {self.spelled!r} sums the input over {c!r}"
        for c in self.kernel:
            if c not in self.inputs and c not in self.output:
                return f"equation {self.spelled!r} sums the kernel over {c!r}"
        if len(set(self.inputs)) != len(self.inputs) or len(set(self.output)) != len(self.output):
            return f"equation {self.spelled!r} repeats an axis"
        return None

    @property
    def spelled(self) -> str:
        return f"{self.inputs},{self.kernel}->{self.output}"


def parse_equation(equation: str, input_rank: int | None = None) -> Equation | None:
    """Parse an EinsumDense equation; an ellipsis becomes fresh letters (needs ``input_rank``)."""
    match = re.fullmatch(r"\s*([a-zA-Z.]+)\s*,\s*([a-zA-Z]+)\s*->\s*([a-zA-Z.]+)\s*", equation)
    if match is None:
        return None
    inputs, kernel, output = match.groups()
    if "..." in inputs or "..." in output:
        if input_rank is None or inputs.count("...") != 1 or output.count("...") != 1:
            return None
        used = set(inputs + kernel + output)
        spare = [c for c in "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ" if c not in used]
        width = input_rank - (len(inputs) - 3)
        if width < 0:
            return None
        fill = "".join(spare[:width])
        inputs, output = inputs.replace("...", fill), output.replace("...", fill)
    if "." in inputs + output:
        return None
    return Equation(inputs, kernel, output)


def bias_grads(dz: tf.Tensor, bias: Any) -> tf.Tensor:
    """Per-example gradients (B, *bias.shape) of a bias broadcast-added to ``dz``'s shape."""
    rank = dz.shape.rank
    aligned = [1] * (rank - len(bias.shape)) + list(bias.shape)
    summed = [a for a in range(1, rank) if aligned[a] == 1 and dz.shape[a] != 1]
    g = tf.reduce_sum(dz, axis=summed, keepdims=True) if summed else dz
    return tf.reshape(g, [tf.shape(dz)[0], *bias.shape])


def _sizes(eq: Equation, x: tf.Tensor, dz: tf.Tensor) -> dict[str, int | None]:
    sizes = dict(zip(eq.inputs, x.shape, strict=True))
    sizes.update(zip(eq.output, dz.shape, strict=True))
    return sizes


def einsum_grads(
    eq: Equation, x: tf.Tensor, dz: tf.Tensor, kernel: Any, bias: Any, name: str
) -> LayerGrads:
    """Norms and clipped sums of ``z = einsum(eq, x, kernel) (+ bias)``, given ``dz``."""
    sizes = _sizes(eq, x, dz)
    b = eq.batch
    if eq.grouped or any(sizes[c] is None for c in eq.contracted + eq.free):
        per_ex = tf.einsum(f"{eq.inputs},{eq.output}->{b}{eq.kernel}", x, dz)
        pairs = [(kernel, per_ex)]
        if bias is not None:
            pairs.append((bias, bias_grads(dz, bias)))
        return materialized(pairs, f"{name}: per-example kernel gradients (einsum)")
    # (B, positions, contracted) and (B, positions, free), positions in the same order.
    a = tf.einsum(f"{eq.inputs}->{b}{eq.positions}{eq.contracted}", x)
    g = tf.einsum(f"{eq.output}->{b}{eq.positions}{eq.free}", dz)
    p = math.prod(sizes[c] for c in eq.contracted)
    o = math.prod(sizes[c] for c in eq.free)
    t = [sizes[c] for c in eq.positions]
    length = math.prod(t) if all(s is not None for s in t) else -1
    a3 = tf.reshape(a, [tf.shape(x)[0], length, p])
    g3 = tf.reshape(g, [tf.shape(dz)[0], length, o])
    order = eq.contracted + eq.free  # the letter order of linear_grads' kernel sum
    shape = [sizes[c] for c in order]
    perm = [order.index(c) for c in eq.kernel]
    base = linear_grads([a3], g3, kernel, None, shape, name)
    sq = base.sq
    bias_g = bias_grads(dz, bias) if bias is not None else None
    if bias_g is not None:
        sq = sq + tf.reduce_sum(tf.reshape(tf.square(bias_g), [tf.shape(dz)[0], -1]), 1)

    def clipped(c: tf.Tensor, rows: RowFilter) -> list[tuple[Any, tf.Tensor]]:
        (_, kernel_sum), *_ = base.clipped(c, rows)
        out = [(kernel, tf.transpose(kernel_sum, perm))]
        if bias_g is not None:
            out.append((bias, tf.tensordot(c, rows(bias_g), axes=1)))
        return out

    return LayerGrads(sq, clipped, base.method)


@register(keras.layers.EinsumDense)
class EinsumDenseHandler(Handler):
    kind = "einsum_dense"
    base = keras.layers.EinsumDense

    def reason_unsupported(self, layer: Any) -> str | None:
        reason = common_reason(layer, keras.layers.EinsumDense)
        if reason:
            return reason
        eq = parse_equation(layer.equation, getattr(layer.input_spec, "ndim", None))
        if eq is None:
            return f"equation {layer.equation!r} not understood"
        return eq.problem()

    def forward(self, layer: Any, rec: Recorder, inputs: Any) -> Any:
        x = tf.convert_to_tensor(inputs)
        z = ops.einsum(layer.equation, x, layer.kernel)
        if layer.bias is not None:
            z = ops.add(z, layer.bias)
        return activate(layer, rec.probe(layer, self.kind, z, x=x))

    def grads(self, tap: Tap, dz: tf.Tensor) -> LayerGrads:
        layer, x = tap.layer, tap.saved["x"]
        eq = parse_equation(layer.equation, x.shape.rank)
        return einsum_grads(eq, x, dz, layer.kernel, layer.bias, "EinsumDense")
