"""LSTM, GRU and SimpleRNN: exact per-example gradients through the recurrence, no jacobian.

Every cell computes pre-activations ``z_t = x_t W + b`` and ``r_t = h_{t-1} U (+ b_r)``; back-
propagation through time gives the kernels' gradients as sums over time steps,
``G_W = Σ_t x_t dz_tᵀ`` and ``G_U = Σ_t h_{t-1} dr_tᵀ``, and ‖G‖² is the sum of the two (plus the
bias's). For LSTM and SimpleRNN ``r_t`` enters the cell added to ``z_t``, so ``dr_t = dz_t``; for
GRU (``reset_after=True``, Keras' default) the update and reset gates see ``z + r`` too and the
candidate sees ``x_h + g_t ⊙ r_h``, so ``dr_t = [dz_t^{zr}, g_t ⊙ dz_t^h]`` with the reset gate
``g_t`` saved by the forward pass.

The rule runs the recurrence itself: ``z`` for all steps in one matmul (exposed to the tape, so
one backward pass gives every ``dz_t``), then a loop over time with a hand-written backward pass
(:class:`_Recurrence`) that keeps only the states and recomputes each step from them — less
memory than TensorFlow's gradient of the loop, which keeps every gate of every step, and faster.
The kernels' per-example gradients are then formed a few examples at a time
(:func:`.linear.chunked_grads`): a batch never holds all of them at once. Masks attached to the
input (``Embedding(mask_zero=True)``, ``Masking``) are applied as Keras applies them: a masked
step keeps the state, and its output is the previous one (or 0 with ``zero_output_for_mask``).

Not covered (they take the fallback): dropout, stateful layers, GRU with ``reset_after=False``,
custom cells, a layer whose ``initial_state``/``mask`` is passed explicitly in a functional model.
A mask or initial state passed explicitly from a subclassed model's ``call`` is not seen by the
rule: the self-check then finds the norms wrong and moves the layer to the fallback.
"""

from __future__ import annotations

from typing import Any

import keras
import tensorflow as tf

from .linear import chunked_grads
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
    """(B, T, …) → (T, B, …); the same swap takes it back (:func:`_batch_major`)."""
    return tf.transpose(t, [1, 0, *range(2, t.shape.rank)])


_batch_major = _time_major


class _Recurrence:
    """The cell run over the steps, with a hand-written backward pass.

    TensorFlow's own gradient of a loop keeps every intermediate of every step (gates,
    activations) until the backward pass reaches it. This backward pass keeps only what the
    forward pass returns anyway — each step's states and output — and recomputes each step from
    them (its input pre-activation from ``x``): one more forward step per step, several times
    less memory, and faster on CPU. Gradients flow to the input pre-activations ``z`` only: the
    rule assembles the per-example kernel gradients from ``dz`` itself.
    """

    def __init__(
        self, handler: Any, layer: Any, x_t: tf.Tensor, m_t: Any, project: Any, weights: tuple
    ) -> None:
        self.handler, self.layer, self.x_t, self.m_t = handler, layer, x_t, m_t
        self.project, self.weights = project, weights
        self.units = layer.cell.units
        self.n_states = 1 + handler.extra_states
        self.n_saved = handler.saved_count()
        self.zero_masked = bool(getattr(layer, "zero_output_for_mask", False))

    def step(self, z: tf.Tensor, states: tuple, prev_out: tf.Tensor, t: tf.Tensor) -> tuple:
        """One step, masks applied as Keras applies them: (new states, output, saved)."""
        h, new, saved = self.handler.step(self.layer, z, states, self.weights)
        if self.m_t is None:
            return new, h, saved
        keep = self.m_t[t][:, None]
        new = tuple(tf.where(keep, n, s) for n, s in zip(new, states, strict=True))
        out = tf.where(keep, h, tf.zeros_like(h) if self.zero_masked else prev_out)
        return new, out, saved

    def __call__(self, z: tf.Tensor) -> tuple[tf.Tensor, tuple, tuple]:
        steps, batch = tf.shape(self.x_t)[0], tf.shape(self.x_t)[1]
        zeros = tf.zeros([batch, self.units], tf.float32)
        start = (zeros,) * self.n_states
        # Without a mask a step's output is its h: the output sequence is not kept twice.
        count = self.n_states + self.n_saved + (0 if self.m_t is None else 1)
        shape = [self.x_t.shape[0], self.x_t.shape[1], self.units]

        @tf.custom_gradient
        def run(z_in: tf.Tensor) -> Any:
            def body(t: tf.Tensor, states: tuple, prev_out: tf.Tensor, acc: list) -> tuple:
                new, out, saved = self.step(z_in[t], states, prev_out, t)
                kept = (*new, *saved) if self.m_t is None else (*new, *saved, out)
                return t + 1, new, out, [a.write(t, v) for a, v in zip(acc, kept, strict=True)]

            acc = [tf.TensorArray(tf.float32, size=steps, element_shape=[None, self.units])
                   for _ in range(count)]  # fmt: skip
            _, _, _, acc = tf.while_loop(
                lambda t, *_: t < steps, body, (tf.constant(0), start, zeros, acc)
            )
            stacked = [a.stack() for a in acc]
            for s in stacked:
                s.set_shape(shape)

            def grad(*upstream: Any) -> tf.Tensor:
                return self._backward(z_in, stacked, upstream, start)

            return stacked, grad

        stacked = run(z)
        states = tuple(stacked[: self.n_states])
        saved = tuple(stacked[self.n_states : self.n_states + self.n_saved])
        seq = stacked[-1] if self.m_t is not None else states[0]
        return seq, states, saved

    def _backward(self, z: tf.Tensor, stacked: list, upstream: Any, start: tuple) -> tf.Tensor:
        """``dz`` from the gradients of the stacked states (and outputs), one step at a time
        from the last, each step recomputed from the states before it."""
        ups = [tf.zeros_like(o) if u is None else u for u, o in zip(upstream, stacked, strict=True)]
        seq_states, d_states = stacked[: self.n_states], ups[: self.n_states]
        masked = self.m_t is not None
        seq, d_outs = (stacked[-1], ups[-1]) if masked else (seq_states[0], None)
        zeros = start[0]

        def earlier(s: tf.Tensor, t: tf.Tensor) -> tf.Tensor:
            return tf.cond(t > 0, lambda: s[tf.maximum(t - 1, 0)], lambda: zeros)

        def back(t: tf.Tensor, d_new: tuple, d_out: tf.Tensor, dz: Any) -> tuple:
            prev = tuple(earlier(s, t) for s in seq_states)
            prev_out = earlier(seq, t)
            with tf.GradientTape() as tape:
                z_t = self.project(self.x_t[t])
                tape.watch([z_t, *prev, prev_out])
                new, out, _ = self.step(z_t, prev, prev_out, t)
            # Without a mask a step's output is its h: the output sequence's gradient arrives
            # on the state's.
            given = [a + b[t] for a, b in zip(d_new, d_states, strict=True)]
            targets = [*new, out] if masked else [*new]
            if masked:
                given.append(d_out + d_outs[t])
            found = tape.gradient(
                targets, [z_t, *prev, prev_out], output_gradients=given,
                unconnected_gradients=tf.UnconnectedGradients.ZERO,
            )  # fmt: skip
            return t - 1, tuple(found[1 : 1 + self.n_states]), found[-1], dz.write(t, found[0])

        steps = tf.shape(z)[0]
        dz = tf.TensorArray(tf.float32, size=steps, element_shape=[None, z.shape[-1]])
        _, _, _, dz = tf.while_loop(lambda t, *_: t >= 0, back, (steps - 1, start, zeros, dz))
        dz = dz.stack()
        dz.set_shape(z.shape)
        return dz


class _RecurrentHandler(Handler):
    """What LSTM, GRU and SimpleRNN share: checks, masks, the recurrence and the kernels' norms."""

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

    def recurrent_weights(self, cell: Any) -> tuple[tf.Tensor, ...]:
        """The weights a step reads besides its input, as tensors (read once per batch)."""
        return (tf.convert_to_tensor(cell.recurrent_kernel),)

    def step(
        self, layer: Any, z_t: tf.Tensor, states: tuple, weights: tuple
    ) -> tuple[tf.Tensor, tuple, tuple]:
        """One cell step from the input pre-activation: (h, new states, what to save)."""
        raise NotImplementedError

    def saved_count(self) -> int:
        """How many per-step tensors ``step`` saves for the gradients (GRU: its reset gate)."""
        return 0

    def forward(self, layer: Any, rec: Recorder, inputs: Any) -> Any:
        cell = layer.cell
        x = tf.cast(tf.convert_to_tensor(inputs), tf.float32)
        mask = get_keras_mask(inputs)
        # Time-major, in the order the cell reads the steps (reversed for go_backwards): the
        # norms and sums are over steps, so every tensor of the rule stays in that order.
        x_t = _time_major(x)
        m_t = None if mask is None else _time_major(tf.cast(mask, tf.bool))
        if layer.go_backwards:
            x_t = tf.reverse(x_t, [0])
            m_t = None if m_t is None else tf.reverse(m_t, [0])
        kernel = tf.convert_to_tensor(cell.kernel)
        bias = self.input_bias(cell) if cell.use_bias else None

        def project(a: tf.Tensor) -> tf.Tensor:
            z = tf.matmul(a, kernel)
            return z if bias is None else z + bias

        z = rec.probe(layer, self.kind, project(x_t), x=x_t)
        tap = rec.taps[-1]
        recurrence = _Recurrence(self, layer, x_t, m_t, project, self.recurrent_weights(cell))
        seq, states, saved = recurrence(z)
        tap.saved["states"] = states  # (T, B, units) each, in step order
        tap.saved["extra"] = saved
        outputs = _batch_major(seq)
        output = outputs if layer.return_sequences else seq[-1]
        output = tf.cast(output, layer.compute_dtype)
        if layer.return_state:
            final = [tf.cast(s[-1], layer.compute_dtype) for s in states]
            return (output, *final)
        return output

    def input_bias(self, cell: Any) -> tf.Tensor:
        return tf.convert_to_tensor(cell.bias)

    # -- gradients

    def recurrent_g(self, tap: Tap, dz: tf.Tensor, start: Any, stop: Any) -> tf.Tensor:
        """The gradient of the recurrent pre-activation ``h_{t-1} U (+ b_r)`` of examples
        ``start:stop``, from their ``dz`` (time-major)."""
        return dz

    def grads(self, tap: Tap, dz: tf.Tensor) -> LayerGrads:
        cell = tap.layer.cell
        x_t, h_seq = tap.saved["x"], tap.saved["states"][0]

        def rows(start: Any, stop: Any) -> tf.Tensor:
            return dz[:, start:stop]

        def inputs(start: Any, stop: Any) -> tuple[tf.Tensor, tf.Tensor]:
            return _batch_major(x_t[:, start:stop]), _batch_major(rows(start, stop))

        def recurrent(start: Any, stop: Any) -> tuple[tf.Tensor, tf.Tensor]:
            h = h_seq[:-1, start:stop]
            h_prev = tf.concat([tf.zeros_like(h_seq[:1, start:stop]), h], 0)
            g = self.recurrent_g(tap, rows(start, stop), start, stop)
            return _batch_major(h_prev), _batch_major(g)

        batch = tf.shape(x_t)[1]
        kernels = chunked_grads(
            [(cell.kernel, inputs), (cell.recurrent_kernel, recurrent)], batch, self.name
        )
        bias = self.bias_grads(tap, dz, batch)
        parts = [kernels] if bias is None else [kernels, materialized([(cell.bias, bias)], "")]
        sq = tf.add_n([p.sq for p in parts])
        method = (
            f"{self.name}: through time, input and recurrent kernels by per-example "
            "gradients a few examples at a time"
        )

        def clipped(c: tf.Tensor, rows: RowFilter) -> list[tuple[Any, tf.Tensor]]:
            return [pair for p in parts for pair in p.clipped(c, rows)]

        return LayerGrads(sq, clipped, method)

    def bias_grads(self, tap: Tap, dz: tf.Tensor, batch: tf.Tensor) -> Any:
        """Per-example gradients of the bias (B, …), or None without one."""
        if not tap.layer.cell.use_bias:
            return None
        return tf.reduce_sum(dz, 0)


@register(keras.layers.LSTM)
class LSTMHandler(_RecurrentHandler):
    kind = "lstm"
    base = keras.layers.LSTM
    cell = keras.layers.LSTMCell
    name = "LSTM"
    extra_states = 1

    def step(
        self, layer: Any, z_t: tf.Tensor, states: tuple, weights: tuple
    ) -> tuple[tf.Tensor, tuple, tuple]:
        cell = layer.cell
        h_tm1, c_tm1 = states
        z = z_t + tf.matmul(h_tm1, weights[0])
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

    def step(
        self, layer: Any, z_t: tf.Tensor, states: tuple, weights: tuple
    ) -> tuple[tf.Tensor, tuple, tuple]:
        cell = layer.cell
        h = z_t + tf.matmul(states[0], weights[0])
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
        return tf.convert_to_tensor(cell.bias)[0]

    def recurrent_weights(self, cell: Any) -> tuple[tf.Tensor, ...]:
        kernel = tf.convert_to_tensor(cell.recurrent_kernel)
        return (kernel, tf.convert_to_tensor(cell.bias)[1]) if cell.use_bias else (kernel,)

    def saved_count(self) -> int:
        return 1  # the reset gate

    def step(
        self, layer: Any, z_t: tf.Tensor, states: tuple, weights: tuple
    ) -> tuple[tf.Tensor, tuple, tuple]:
        cell, units = layer.cell, layer.cell.units
        h_tm1 = states[0]
        inner = tf.matmul(h_tm1, weights[0])
        if len(weights) > 1:
            inner = inner + weights[1]
        x_z, x_r, x_h = tf.split(z_t, 3, axis=-1)
        z = cell.recurrent_activation(x_z + inner[:, :units])
        r = cell.recurrent_activation(x_r + inner[:, units : 2 * units])
        hh = cell.activation(x_h + r * inner[:, 2 * units :])
        h = z * h_tm1 + (1 - z) * hh
        return h, (h,), (r,)

    def recurrent_g(self, tap: Tap, dz: tf.Tensor, start: Any, stop: Any) -> tf.Tensor:
        # The candidate sees g ⊙ (h U_h + b_h): its recurrent pre-activation's gradient is
        # g ⊙ dz_h; the update and reset gates see h U + b as the input's.
        units = tap.layer.cell.units
        reset = tap.saved["extra"][0][:, start:stop]
        return tf.concat([dz[..., : 2 * units], reset * dz[..., 2 * units :]], -1)

    def bias_grads(self, tap: Tap, dz: tf.Tensor, batch: tf.Tensor) -> Any:
        if not tap.layer.cell.use_bias:
            return None
        recurrent = self.recurrent_g(tap, dz, 0, batch)
        return tf.stack([tf.reduce_sum(dz, 0), tf.reduce_sum(recurrent, 0)], 1)


@register(keras.layers.LSTMCell, keras.layers.GRUCell, keras.layers.SimpleRNNCell)
class CellHandler(Handler):
    """A cell's weights are clipped by its RNN layer's rule; a cell left with them (reported
    under its own name) is there because that rule did not apply."""

    def reason_unsupported(self, layer: Any) -> str | None:
        return (
            "the cell of an RNN layer not on its fast path (dropout, stateful, explicit "
            "initial_state or mask, GRU reset_after=False, keras.layers.RNN(cell))"
        )
