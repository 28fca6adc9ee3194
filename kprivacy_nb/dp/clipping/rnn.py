"""LSTM, GRU and SimpleRNN: exact per-example gradients through the recurrence, no jacobian.

Every cell computes pre-activations ``z_t = x_t W + b`` and ``r_t = h_{t-1} U (+ b_r)``; back-
propagation through time gives the kernels' gradients as sums over time steps,
``G_W = Σ_t x_t dz_tᵀ`` and ``G_U = Σ_t h_{t-1} dr_tᵀ`` — each a Dense layer applied at T positions
(:mod:`.linear`, ghost norm or per-example gradients by cost), and ‖G‖² is the sum of the two.

The rule runs the recurrence itself: ``z`` for all steps in one matmul (exposed to the tape, so
one backward pass gives every ``dz_t``), then a ``tf.scan`` over time that saves each
``h_{t-1}``. For LSTM and SimpleRNN ``r_t`` enters the cell added to ``z_t``, so ``dr_t = dz_t``;
for GRU (``reset_after=True``, Keras' default) the update and reset gates see ``z + r`` too and the
candidate sees ``x_h + g_t ⊙ r_h``, so ``dr_t = [dz_t^{zr}, g_t ⊙ dz_t^h]`` with the reset gate
``g_t`` saved by the scan. Masks attached to the input (``Embedding(mask_zero=True)``,
``Masking``) are applied as Keras applies them: a masked step keeps the state, and its output is
the previous one (or 0 with ``zero_output_for_mask``).

Not covered (they take the fallback): dropout, stateful layers, GRU with ``reset_after=False``,
custom cells, a layer whose ``initial_state``/``mask`` is passed explicitly in a functional model.
A mask or initial state passed explicitly from a subclassed model's ``call`` is not seen by the
rule: the self-check then finds the norms wrong and moves the layer to the fallback.
"""

from __future__ import annotations

from typing import Any

import keras
import tensorflow as tf

from .linear import linear_grads
from .registry import (
    Handler,
    LayerGrads,
    Recorder,
    RowFilter,
    Tap,
    common_reason,
    materialized,
    register,
)

try:  # where Keras 3 keeps the mask a layer's input carries
    from keras.src.backend.common.masking import get_keras_mask
except ImportError:  # pragma: no cover - other Keras layouts

    def get_keras_mask(x: Any) -> Any:
        return getattr(x, "_keras_mask", None)


__all__ = ["CellHandler", "GRUHandler", "LSTMHandler", "SimpleRNNHandler"]


def _explicit_kwargs(layer: Any) -> str | None:
    """An initial state or a mask other than the one the input carries, given in a functional
    model (the rule sees only the input)."""
    for node in getattr(layer, "_inbound_nodes", []):
        arguments = getattr(node, "arguments", None)
        kwargs = getattr(arguments, "kwargs", {}) or {}
        args = getattr(arguments, "args", ()) or ()
        for name in ("initial_state", "constants"):
            if kwargs.get(name) is not None:
                return f"{name} passed explicitly"
        mask = kwargs.get("mask")
        if mask is not None and not (args and mask is get_keras_mask(args[0])):
            return "mask passed explicitly"
    return None


def _time_major(t: tf.Tensor) -> tf.Tensor:
    return tf.transpose(t, [1, 0, *range(2, t.shape.rank)])


def _batch_major(t: tf.Tensor) -> tf.Tensor:
    return tf.transpose(t, [1, 0, *range(2, t.shape.rank)])


class _RecurrentHandler(Handler):
    """What LSTM, GRU and SimpleRNN share: checks, masks, the scan and the kernels' norms."""

    cell: type = object
    name = ""
    extra_states = 0  # LSTM carries c besides h

    def reason_unsupported(self, layer: Any) -> str | None:
        reason = common_reason(layer, self.base)
        if reason:
            return reason
        cell = layer.cell
        if type(cell) is not self.cell:
            return f"custom cell {type(cell).__name__}"
        if layer.stateful:
            return "stateful"
        if cell.dropout or cell.recurrent_dropout:
            return "dropout inside the recurrence"
        policy = getattr(cell, "dtype_policy", None)
        if policy is not None and policy.compute_dtype != "float32":
            return f"compute dtype {policy.compute_dtype}"
        return _explicit_kwargs(layer)

    # -- forward

    def step(self, layer: Any, z_t: tf.Tensor, states: tuple) -> tuple[tf.Tensor, tuple, Any]:
        """One cell step from the input pre-activation: (h, new states, what to save)."""
        raise NotImplementedError

    def forward(self, layer: Any, rec: Recorder, inputs: Any) -> Any:
        cell = layer.cell
        x = tf.cast(tf.convert_to_tensor(inputs), tf.float32)
        mask = get_keras_mask(inputs)
        z = tf.matmul(x, cell.kernel)
        if cell.use_bias:
            z = z + self.input_bias(cell)
        z = rec.probe(layer, self.kind, z, x=x)
        tap = rec.taps[-1]
        batch = tf.shape(x)[0]
        zeros = tf.zeros([batch, cell.units], z.dtype)
        start = (zeros,) * (1 + self.extra_states)
        z_t = _time_major(z)
        m_t = None if mask is None else _time_major(tf.cast(mask, tf.bool))
        if layer.go_backwards:
            z_t = tf.reverse(z_t, [0])
            m_t = None if m_t is None else tf.reverse(m_t, [0])
        zero_masked = bool(getattr(layer, "zero_output_for_mask", False))

        def body(carry: tuple, elems: tuple) -> tuple:
            states, prev_out = carry[0], carry[1]
            h, new, saved = self.step(layer, elems[0], states)
            out = h
            if m_t is not None:
                keep = elems[1][:, None]
                new = tuple(tf.where(keep, n, s) for n, s in zip(new, states, strict=True))
                out = tf.where(keep, h, tf.zeros_like(h) if zero_masked else prev_out)
            return new, out, states[0], saved

        first = (start, zeros, zeros, self.empty_saved(layer, batch))
        elems = (z_t,) if m_t is None else (z_t, m_t)
        states, outs, h_prev, saved = tf.scan(body, elems, initializer=first)
        # Saved in the input's time order, which is the order of ``dz``.
        steps = (lambda t: tf.reverse(t, [0])) if layer.go_backwards else (lambda t: t)
        tap.saved["h_prev"] = _batch_major(steps(h_prev))
        tap.saved["extra"] = tf.nest.map_structure(lambda t: _batch_major(steps(t)), saved)
        outputs = _batch_major(outs)
        output = outputs if layer.return_sequences else outs[-1]
        output = tf.cast(output, layer.compute_dtype)
        if layer.return_state:
            final = [tf.cast(s[-1], layer.compute_dtype) for s in states]
            return (output, *final)
        return output

    def input_bias(self, cell: Any) -> tf.Tensor:
        return cell.bias

    def empty_saved(self, layer: Any, batch: tf.Tensor) -> Any:
        return ()

    # -- gradients

    def recurrent_dz(self, tap: Tap, dz: tf.Tensor) -> tf.Tensor:
        """The gradient of the recurrent pre-activation ``h_{t-1} U (+ b_r)`` at every step."""
        return dz

    def grads(self, tap: Tap, dz: tf.Tensor) -> LayerGrads:
        cell = tap.layer.cell
        x, h_prev = tap.saved["x"], tap.saved["h_prev"]
        dr = self.recurrent_dz(tap, dz)
        separate_bias = self.recurrent_bias_grads(cell, dz, dr)
        bias = cell.bias if cell.use_bias and separate_bias is None else None
        parts = [
            linear_grads([x], dz, cell.kernel, bias, cell.kernel.shape, self.name),
            linear_grads([h_prev], dr, cell.recurrent_kernel, None, cell.recurrent_kernel.shape,
                         self.name),
        ]  # fmt: skip
        if separate_bias is not None:
            parts.append(materialized([(cell.bias, separate_bias)], ""))
        sq = tf.add_n([p.sq for p in parts])
        kinds = sorted({p.method.split(": ", 1)[-1] for p in parts[:2]})
        method = f"{self.name}: through time, input and recurrent kernels by {' / '.join(kinds)}"

        def clipped(c: tf.Tensor, rows: RowFilter) -> list[tuple[Any, tf.Tensor]]:
            return [pair for p in parts for pair in p.clipped(c, rows)]

        return LayerGrads(sq, clipped, method)

    def recurrent_bias_grads(self, cell: Any, dz: tf.Tensor, dr: tf.Tensor) -> Any:
        """Per-example gradients of a bias holding both input and recurrent parts (GRU)."""
        return None


@register(keras.layers.LSTM)
class LSTMHandler(_RecurrentHandler):
    kind = "lstm"
    base = keras.layers.LSTM
    cell = keras.layers.LSTMCell
    name = "LSTM"
    extra_states = 1

    def step(self, layer: Any, z_t: tf.Tensor, states: tuple) -> tuple[tf.Tensor, tuple, Any]:
        cell = layer.cell
        h_tm1, c_tm1 = states
        z = z_t + tf.matmul(h_tm1, cell.recurrent_kernel)
        z0, z1, z2, z3 = tf.split(z, 4, axis=1)
        i = cell.recurrent_activation(z0)
        f = cell.recurrent_activation(z1)
        c = f * c_tm1 + i * cell.activation(z2)
        o = cell.recurrent_activation(z3)
        h = o * cell.activation(c)
        return h, (h, c), ()


@register(keras.layers.SimpleRNN)
class SimpleRNNHandler(_RecurrentHandler):
    kind = "simple_rnn"
    base = keras.layers.SimpleRNN
    cell = keras.layers.SimpleRNNCell
    name = "SimpleRNN"

    def step(self, layer: Any, z_t: tf.Tensor, states: tuple) -> tuple[tf.Tensor, tuple, Any]:
        cell = layer.cell
        h = z_t + tf.matmul(states[0], cell.recurrent_kernel)
        if cell.activation is not None:
            h = cell.activation(h)
        return h, (h,), ()


@register(keras.layers.GRU)
class GRUHandler(_RecurrentHandler):
    kind = "gru"
    base = keras.layers.GRU
    cell = keras.layers.GRUCell
    name = "GRU"

    def reason_unsupported(self, layer: Any) -> str | None:
        if not layer.cell.reset_after:
            return "reset_after=False"
        return super().reason_unsupported(layer)

    def input_bias(self, cell: Any) -> tf.Tensor:
        return cell.bias[0]

    def empty_saved(self, layer: Any, batch: tf.Tensor) -> Any:
        return tf.zeros([batch, layer.cell.units])

    def step(self, layer: Any, z_t: tf.Tensor, states: tuple) -> tuple[tf.Tensor, tuple, Any]:
        cell, units = layer.cell, layer.cell.units
        h_tm1 = states[0]
        inner = tf.matmul(h_tm1, cell.recurrent_kernel)
        if cell.use_bias:
            inner = inner + cell.bias[1]
        x_z, x_r, x_h = tf.split(z_t, 3, axis=-1)
        z = cell.recurrent_activation(x_z + inner[:, :units])
        r = cell.recurrent_activation(x_r + inner[:, units : 2 * units])
        hh = cell.activation(x_h + r * inner[:, 2 * units :])
        h = z * h_tm1 + (1 - z) * hh
        return h, (h,), r

    def recurrent_dz(self, tap: Tap, dz: tf.Tensor) -> tf.Tensor:
        units = tap.layer.cell.units
        reset = tap.saved["extra"]
        return tf.concat([dz[..., : 2 * units], reset * dz[..., 2 * units :]], -1)

    def recurrent_bias_grads(self, cell: Any, dz: tf.Tensor, dr: tf.Tensor) -> Any:
        if not cell.use_bias:
            return None
        return tf.stack([tf.reduce_sum(dz, 1), tf.reduce_sum(dr, 1)], 1)


@register(keras.layers.LSTMCell, keras.layers.GRUCell, keras.layers.SimpleRNNCell)
class CellHandler(Handler):
    """A cell's weights are clipped by its RNN layer's rule; a cell left with them (reported
    under its own name) is there because that rule did not apply."""

    def reason_unsupported(self, layer: Any) -> str | None:
        return (
            "the cell of an RNN layer not on its fast path (dropout, stateful, explicit "
            "initial_state or mask, GRU reset_after=False, keras.layers.RNN(cell))"
        )
