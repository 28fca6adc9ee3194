"""Fast per-example gradient clipping for Keras 3 models on TensorFlow.

DP-SGD needs, for every example ``i`` of a batch, its gradient ``g_i`` over *all* trainable
weights, scaled by ``min(1, C / ‖g_i‖)``, and then only the *sum* of the scaled gradients.
Materialising every ``g_i`` is what makes naive DP-SGD 40–95× slower than normal training. Here:

1. **Taps.** While the model runs, each supported layer (Dense, Embedding, Conv1D/2D,
   LayerNormalization, GroupNormalization) computes its output itself, saves its input and adds a
   zero "probe" tensor to its pre-activation output. One backward pass to the probes gives every
   layer's output-gradient ``dz_i`` (the loss is a sum over examples and no layer mixes examples,
   so ``dz_i`` depends on example ``i`` only).
2. **Norms.** ``‖g_i‖²`` is assembled layer by layer from the saved inputs and ``dz``
   without forming ``g_i``: for a Dense layer on vectors ``‖x_i‖²·‖dz_i‖²``; on sequences (and
   for convolutions, on input patches) either the "ghost" form ``Σ_ts (a_t·a_s)(dz_t·dz_s)`` or the
   small per-example gradient, whichever is cheaper for the shapes at hand (the rule of
   Bu et al., *Scalable and Efficient Training of Large CNNs with DP*); for an Embedding the
   output-gradients of repeated tokens are summed per example before taking the norm; for
   normalisation layers and biases the per-example gradients are tiny and formed directly.
3. **Book-keeping.** The clipped sum reuses the same inputs and ``dz``:
   ``Σ_i c_i g_i = aᵀ (c ⊙ dz)`` for Dense/Conv, a segment-sum for Embedding — no second
   backward pass.

Any other layer with trainable weights (or a shared layer, or weights used outside a layer call)
falls back to exact vectorised per-example gradients of those weights (``GradientTape.jacobian``
with ``pfor`` over the batch). :attr:`FastClipper.report` says, per layer, which path is used.

BatchNormalization mixes examples of a batch, so a per-example gradient does not exist; such
models are refused before training.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from ..errors import TrainingError

__all__ = [
    "FastClipper",
    "ClippedBatch",
    "RepeatedTokens",
    "flatten_layers",
    "check_model",
    "per_example_loss_fn",
    "repeats",
]

FALLBACK = "fallback: vectorised per-example gradients"


# --------------------------------------------------------------------------- model inspection


def flatten_layers(model: Any) -> list[Any]:
    """Every layer nested in ``model`` (not ``model`` itself), each once."""
    if hasattr(model, "_flatten_layers"):
        return list(model._flatten_layers(include_self=False, recursive=True))
    out, seen, stack = [], set(), list(getattr(model, "layers", []))
    while stack:
        layer = stack.pop(0)
        if id(layer) in seen:
            continue
        seen.add(id(layer))
        out.append(layer)
        stack.extend(getattr(layer, "layers", []))
    return out


def check_model(model: Any) -> None:
    """Refuse models DP-SGD can't train per example (BatchNormalization, activity regularizers)."""
    for layer in flatten_layers(model):
        if isinstance(layer, keras.layers.BatchNormalization):
            raise TrainingError(
                f"layer {layer.name!r} is BatchNormalization, which mixes the examples of a batch: "
                "per-example gradients (and so DP-SGD) are not defined for it. Replace it with "
                "keras.layers.LayerNormalization() or keras.layers.GroupNormalization(groups=…)"
            )
        if getattr(layer, "activity_regularizer", None) is not None:
            raise TrainingError(
                f"layer {layer.name!r} has an activity regularizer: that loss depends on the data "
                "but is not clipped per example, which would break the privacy guarantee. Remove it"
            )


# --------------------------------------------------------------------------- losses


def per_example_loss_fn(loss: Any) -> Callable[[Any, Any], tf.Tensor]:
    """Turn a Keras loss (name, function or ``Loss`` object) into ``f(y, pred) -> (batch,)``."""
    if loss is None:
        raise TrainingError(
            "no loss: compile the model with a loss (model.compile(loss=...)) or pass loss=..., "
            "e.g. loss='sparse_categorical_crossentropy'"
        )
    if isinstance(loss, (dict, list, tuple)):
        raise TrainingError(
            "models with several outputs/losses are not supported by dp_fit yet; give one loss"
        )
    if isinstance(loss, str):
        try:
            loss = keras.losses.get(loss)
        except ValueError as exc:
            raise TrainingError(f"unknown loss {loss!r}: {exc}") from None
    if isinstance(loss, keras.losses.Loss):
        fn = loss.call
    elif callable(loss):
        fn = loss
    else:
        raise TrainingError(f"loss must be a name, a function or a keras Loss, got {loss!r}")

    def per_example(y_true: Any, y_pred: Any) -> tf.Tensor:
        values = tf.convert_to_tensor(fn(y_true, y_pred))
        if values.shape.rank is not None and values.shape.rank > 1:
            values = tf.reduce_mean(values, axis=list(range(1, values.shape.rank)))
        return values

    per_example.keras_loss = loss  # type: ignore[attr-defined]
    return per_example


# --------------------------------------------------------------------------- taps


@dataclass
class _Tap:
    layer: Any
    kind: str
    saved: dict[str, Any]
    probe: tf.Tensor


@dataclass
class _Recorder:
    tape: tf.GradientTape
    taps: list[_Tap] = field(default_factory=list)
    host: dict[int, Any] = field(default_factory=dict)  # id(layer) → RepeatedTokens tensors

    def probe(self, layer: Any, kind: str, z: tf.Tensor, **saved: Any) -> tf.Tensor:
        # Watching the layer's output makes the tape give dLoss/dz for it directly.
        z = tf.identity(z)
        self.tape.watch(z)
        self.taps.append(_Tap(layer, kind, saved, z))
        return z


@dataclass
class _LayerGrads:
    """Per-example squared norms of one tap and a function giving its clipped sum."""

    sq: tf.Tensor
    clipped: Callable[[tf.Tensor], list[tuple[Any, tf.Tensor]]]
    method: str


def _materialized(pairs: list[tuple[Any, tf.Tensor]], method: str) -> _LayerGrads:
    """Per-example gradients given explicitly as ``(variable, (B, *shape))`` pairs."""
    sq = tf.add_n(
        [tf.reduce_sum(tf.reshape(tf.square(g), [tf.shape(g)[0], -1]), 1) for _, g in pairs]
    )

    def clipped(c: tf.Tensor) -> list[tuple[Any, tf.Tensor]]:
        return [(v, tf.tensordot(c, g, axes=1)) for v, g in pairs]

    return _LayerGrads(sq, clipped, method)


def _flat3(t: tf.Tensor) -> tf.Tensor:
    """(B, ..., d) → (B, T, d), keeping T static when it is known."""
    positions = _static_positions(t)
    if positions is not None:
        return tf.reshape(t, [-1, positions, t.shape[-1]])
    return tf.reshape(t, [tf.shape(t)[0], -1, t.shape[-1]])


def _static_positions(t: tf.Tensor) -> int | None:
    dims = t.shape[1:-1]
    if any(d is None for d in dims):
        return None
    return math.prod(dims)


def _linear_grads(
    parts: list[tf.Tensor], dz: tf.Tensor, kernel: Any, bias: Any, kernel_shape: Any, name: str
) -> _LayerGrads:
    """Norms and clipped sums for ``z = a @ W (+ b)`` applied at T positions of each example.

    ``a`` (B, T, p) is given as K pieces (B, T, c) with p = K·c, in the order of ``W``'s rows:
    one piece for Dense; one per kernel offset for a convolution, so its patches are never
    assembled. ``dz``: (B, T, o). ``W`` has ``p*o`` entries.
    """
    positions = _static_positions(parts[0])
    c_in, o = parts[0].shape[-1], dz.shape[-1]
    p = len(parts) * c_in
    bias_g = tf.reduce_sum(dz, axis=1) if bias is not None else None
    if positions == 1:
        a2, dz2 = tf.concat([t[:, 0, :] for t in parts], 1), dz[:, 0, :]
        sq = tf.reduce_sum(tf.square(a2), 1) * tf.reduce_sum(tf.square(dz2), 1)
        method = f"{name}: ghost norm"

        def kernel_sum(c: tf.Tensor) -> tf.Tensor:
            return tf.matmul(a2, dz2 * c[:, None], transpose_a=True)

    elif positions is not None and positions * (p + o) <= p * o:
        aa = tf.add_n([tf.matmul(t, t, transpose_b=True) for t in parts])  # (B, T, T)
        gg = tf.matmul(dz, dz, transpose_b=True)
        sq = tf.reduce_sum(aa * gg, axis=[1, 2])
        method = f"{name}: ghost norm ({positions} positions)"

        def kernel_sum(c: tf.Tensor) -> tf.Tensor:
            weighted = tf.reshape(dz * c[:, None, None], [-1, o])
            return tf.concat(
                [tf.matmul(tf.reshape(t, [-1, c_in]), weighted, transpose_a=True) for t in parts],
                0,
            )

    else:
        per_ex = tf.concat([tf.matmul(t, dz, transpose_a=True) for t in parts], 1)  # (B, p, o)
        sq = tf.reduce_sum(tf.square(per_ex), axis=[1, 2])
        method = f"{name}: per-example kernel gradients ({positions or '?'} positions)"

        def kernel_sum(c: tf.Tensor) -> tf.Tensor:
            return tf.tensordot(c, per_ex, axes=1)

    if bias_g is not None:
        sq = sq + tf.reduce_sum(tf.square(bias_g), 1)

    def clipped(c: tf.Tensor) -> list[tuple[Any, tf.Tensor]]:
        out = [(kernel, tf.reshape(kernel_sum(c), kernel_shape))]
        if bias_g is not None:
            out.append((bias, tf.linalg.matvec(bias_g, c, transpose_a=True)))
        return out

    return _LayerGrads(sq, clipped, method)


def _conv_pieces(
    x: tf.Tensor, size: Any, strides: Any, rates: Any, padding: str
) -> list[tf.Tensor] | None:
    """The convolution's input seen through each kernel offset: kh·kw tensors (B, T, c).

    Piece (i, j) holds, at every output position, the input pixel that kernel tap (i, j) reads;
    together they are the image patches, split by tap — strided slices instead of TensorFlow's
    ExtractImagePatches, which is several times slower on CPU. None if the spatial size is not
    static.
    """
    height, width = x.shape[1], x.shape[2]
    if height is None or width is None:
        return None
    (kh, kw), (sh, sw), (rh, rw) = size, strides, rates
    if padding == "same":
        pads = []
        for n, k, s, r in ((height, kh, sh, rh), (width, kw, sw, rw)):
            total = max((-(-n // s) - 1) * s + (k - 1) * r + 1 - n, 0)
            pads.append([total // 2, total - total // 2])
        x = tf.pad(x, [[0, 0], *pads, [0, 0]])
        height, width = height + sum(pads[0]), width + sum(pads[1])
    oh = (height - (kh - 1) * rh - 1) // sh + 1
    ow = (width - (kw - 1) * rw - 1) // sw + 1
    pieces = []
    for i in range(kh):
        for j in range(kw):
            piece = x[
                :,
                i * rh : i * rh + (oh - 1) * sh + 1 : sh,
                j * rw : j * rw + (ow - 1) * sw + 1 : sw,
            ]
            pieces.append(tf.reshape(piece, [-1, oh * ow, x.shape[-1]]))
    return pieces


# --------------------------------------------------------------------------- handlers


class _Handler:
    """How to run one supported layer type with a tap, and how to clip from its tap."""

    kind = ""

    def reason_unsupported(self, layer: Any) -> str | None:  # None = supported
        raise NotImplementedError

    def forward(self, layer: Any, rec: _Recorder, inputs: Any) -> Any:
        raise NotImplementedError

    def grads(self, tap: _Tap, dz: tf.Tensor) -> _LayerGrads:
        raise NotImplementedError


def _common_reason(layer: Any, cls: type) -> str | None:
    if type(layer).call is not cls.call:
        return f"{type(layer).__name__} overrides call()"
    if getattr(layer, "lora_enabled", False):
        return "LoRA enabled"
    if getattr(layer, "quantization_mode", None):
        return "quantized"
    policy = getattr(layer, "dtype_policy", None)
    if policy is not None and policy.compute_dtype != policy.variable_dtype:
        return "mixed precision"
    return None


def _activate(layer: Any, z: Any) -> Any:
    return layer.activation(z) if getattr(layer, "activation", None) is not None else z


class _DenseHandler(_Handler):
    kind = "dense"

    def reason_unsupported(self, layer: Any) -> str | None:
        return _common_reason(layer, keras.layers.Dense)

    def forward(self, layer: Any, rec: _Recorder, inputs: Any) -> Any:
        x = tf.convert_to_tensor(inputs)
        z = ops.matmul(x, layer.kernel)
        if layer.bias is not None:
            z = ops.add(z, layer.bias)
        return _activate(layer, rec.probe(layer, self.kind, z, x=x))

    def grads(self, tap: _Tap, dz: tf.Tensor) -> _LayerGrads:
        layer, x = tap.layer, tap.saved["x"]
        return _linear_grads(
            [_flat3(x)], _flat3(dz), layer.kernel, layer.bias, layer.kernel.shape, "Dense"
        )


class _ConvHandler(_Handler):
    kind = "conv"

    def reason_unsupported(self, layer: Any) -> str | None:
        cls = keras.layers.Conv1D if isinstance(layer, keras.layers.Conv1D) else keras.layers.Conv2D
        reason = _common_reason(layer, cls)
        if reason:
            return reason
        if layer.data_format != "channels_last":
            return "channels_first"
        if getattr(layer, "groups", 1) != 1:
            return "grouped convolution"
        if layer.padding not in ("valid", "same", "causal"):
            return f"padding={layer.padding!r}"
        return None

    def forward(self, layer: Any, rec: _Recorder, inputs: Any) -> Any:
        x = tf.convert_to_tensor(inputs)
        padding = layer.padding
        if padding == "causal":
            x = ops.pad(x, layer._compute_causal_padding())
            padding = "valid"
        z = ops.conv(
            x,
            layer.kernel,
            strides=list(layer.strides),
            padding=padding,
            dilation_rate=layer.dilation_rate,
            data_format="channels_last",
        )
        if layer.use_bias:
            z = ops.add(z, ops.reshape(layer.bias, (1,) * (layer.rank + 1) + (layer.filters,)))
        return _activate(layer, rec.probe(layer, self.kind, z, x=x, padding=padding))

    def grads(self, tap: _Tap, dz: tf.Tensor) -> _LayerGrads:
        layer, x = tap.layer, tap.saved["x"]
        if layer.rank == 1:
            x = x[:, None, :, :]
            size, stride, rate = (
                (1, *layer.kernel_size),
                (1, *layer.strides),
                (1, *layer.dilation_rate),
            )
        else:
            size, stride, rate = layer.kernel_size, layer.strides, layer.dilation_rate
        padding = tap.saved["padding"]
        pieces = _conv_pieces(x, size, stride, rate, padding)
        if pieces is None:  # spatial size unknown until run time
            patches = tf.image.extract_patches(
                x,
                sizes=[1, *size, 1],
                strides=[1, *stride, 1],
                rates=[1, *rate, 1],
                padding=padding.upper(),
            )
            pieces = [_flat3(patches)]
        name = f"Conv{layer.rank}D"
        return _linear_grads(
            pieces, _flat3(dz), layer.kernel, layer.bias if layer.use_bias else None,
            layer.kernel.shape, name,
        )  # fmt: skip


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


def _graph_repeats(idx: tf.Tensor, vocabulary: int) -> RepeatedTokens:
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


def _repeated_sq(rep: RepeatedTokens, flat_dz: tf.Tensor, pos_sq: tf.Tensor) -> tf.Tensor:
    """Per-example ‖gradient of the table‖²: Σ over positions whose token occurs once in the
    example of ‖dz‖² (``pos_sq``) + Σ over repeated tokens of ‖their dz summed‖²."""
    total = tf.reduce_sum(tf.where(rep.single, pos_sq, 0.0), axis=1)
    sums = tf.math.segment_sum(tf.gather(flat_dz, rep.rows), rep.group)
    run_sq = tf.reduce_sum(tf.square(sums), axis=1)
    return total + tf.math.unsorted_segment_sum(run_sq, rep.owner, tf.shape(pos_sq)[0])


class _EmbeddingHandler(_Handler):
    kind = "embedding"

    def reason_unsupported(self, layer: Any) -> str | None:
        return _common_reason(layer, keras.layers.Embedding)

    def forward(self, layer: Any, rec: _Recorder, inputs: Any) -> Any:
        idx = tf.convert_to_tensor(inputs)
        if idx.dtype not in (tf.int32, tf.int64):
            idx = tf.cast(idx, tf.int32)
        idx = tf.where(idx < 0, idx + tf.cast(layer.input_dim, idx.dtype), idx)  # as ops.take
        z = tf.gather(layer.embeddings, idx)
        z = rec.probe(layer, self.kind, z, idx=idx, repeats=rec.host.get(id(layer)))
        return ops.cast(z, layer.compute_dtype)

    def grads(self, tap: _Tap, dz: tf.Tensor) -> _LayerGrads:
        layer = tap.layer
        dim = dz.shape[-1]
        batch = tf.shape(dz)[0]
        idx = tf.reshape(tf.cast(tap.saved["idx"], tf.int32), [batch, -1])
        dz = tf.reshape(dz, [batch, -1, dim])
        flat_dz = tf.reshape(dz, [-1, dim])
        sq = tf.reduce_sum(tf.square(dz), axis=2)  # (batch, positions): one row each
        if tap.saved["idx"].shape.rank == 1 or _static_positions(dz) == 1:
            sq = tf.reduce_sum(sq, axis=1)
            method = "Embedding: per-example rows"
        else:
            rep = tap.saved["repeats"]  # found on the host from the input ids, or here
            if rep is None:
                rep = _graph_repeats(idx, layer.input_dim)
            sq = _repeated_sq(rep, flat_dz, sq)
            method = "Embedding: per-example token sums"
        tokens = tf.reshape(idx, [-1])

        def clipped(c: tf.Tensor) -> list[tuple[Any, tf.Tensor]]:
            weighted = tf.reshape(dz * c[:, None, None], [-1, dim])
            return [
                (layer.embeddings, tf.math.unsorted_segment_sum(weighted, tokens, layer.input_dim))
            ]

        return _LayerGrads(sq, clipped, method)


def _norm_axes(layer: Any, ndim: int) -> list[int]:
    axes = layer.axis if isinstance(layer.axis, (list, tuple)) else [layer.axis]
    return sorted(a % ndim for a in axes)


class _LayerNormHandler(_Handler):
    kind = "layernorm"

    def reason_unsupported(self, layer: Any) -> str | None:
        if getattr(layer, "rms_scaling", False):
            return "rms_scaling"
        return _common_reason(layer, keras.layers.LayerNormalization)

    def forward(self, layer: Any, rec: _Recorder, inputs: Any) -> Any:
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

    def grads(self, tap: _Tap, dz: tf.Tensor) -> _LayerGrads:
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
        return _materialized(pairs, "LayerNormalization: per-example gradients")


class _GroupNormHandler(_Handler):
    kind = "groupnorm"

    def reason_unsupported(self, layer: Any) -> str | None:
        if layer.axis not in (-1,):
            return f"axis={layer.axis}"
        return _common_reason(layer, keras.layers.GroupNormalization)

    def forward(self, layer: Any, rec: _Recorder, inputs: Any) -> Any:
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

    def grads(self, tap: _Tap, dz: tf.Tensor) -> _LayerGrads:
        layer, xhat = tap.layer, tap.saved["xhat"]
        other = list(range(1, dz.shape.rank - 1))
        pairs = []
        if layer.gamma is not None:
            g = xhat * dz
            pairs.append((layer.gamma, tf.reduce_sum(g, axis=other) if other else g))
        if layer.beta is not None:
            pairs.append((layer.beta, tf.reduce_sum(dz, axis=other) if other else dz))
        return _materialized(pairs, "GroupNormalization: per-example gradients")


def _handler_for(layer: Any) -> tuple[_Handler | None, str]:
    if isinstance(layer, keras.layers.Dense):
        handler: _Handler = _DenseHandler()
    elif isinstance(layer, (keras.layers.Conv1D, keras.layers.Conv2D)):
        handler = _ConvHandler()
    elif isinstance(layer, keras.layers.Embedding):
        handler = _EmbeddingHandler()
    elif isinstance(layer, keras.layers.LayerNormalization):
        handler = _LayerNormHandler()
    elif isinstance(layer, keras.layers.GroupNormalization):
        handler = _GroupNormHandler()
    else:
        return None, f"no fast path for {type(layer).__name__}"
    reason = handler.reason_unsupported(layer)
    return (None, reason) if reason else (handler, "")


# --------------------------------------------------------------------------- the clipper


@dataclass
class ClippedBatch:
    """Result of one batch: clipped gradient sum (aligned with ``variables``) and diagnostics."""

    grads: list[tf.Tensor]
    losses: tf.Tensor  # per-example losses (0 for masked rows)
    predictions: Any
    finite: tf.Tensor  # scalar bool: losses, norms and gradients all finite
    norms: tf.Tensor  # per-example gradient norms (before clipping)
    regularization_grads: list[tf.Tensor] | None = None


@contextlib.contextmanager
def _patched(layers: list[tuple[Any, Callable[..., Any]]]) -> Iterator[None]:
    """Temporarily replace ``layer.call`` on instances (restored even on error)."""
    done = []
    try:
        for layer, fn in layers:
            object.__setattr__(layer, "call", fn)
            done.append(layer)
        yield
    finally:
        for layer in done:
            with contextlib.suppress(AttributeError):
                object.__delattr__(layer, "call")


def _reads_model_input(model: Any, layer: Any) -> bool:
    """True if ``layer`` is called once, directly on the input of a single-input model."""
    try:
        inputs = model.inputs
        nodes = layer._inbound_nodes
    except (AttributeError, ValueError):
        return False
    if not inputs or len(inputs) != 1 or len(nodes) != 1:
        return False
    # Only integer inputs: Keras converts the data to the input's dtype first, and a float32
    # input would merge ids above 2^24 that the host still tells apart.
    if str(getattr(inputs[0], "dtype", "")) not in ("int32", "int64"):
        return False
    args = nodes[0].input_tensors
    return len(args) == 1 and args[0] is inputs[0]


class FastClipper:
    """Per-example clipping of a Keras model's gradients, fast where the layers allow it.

    >>> clipper = FastClipper(model, per_example_loss_fn("mse"), l2_norm_clip=1.0,
    ...                       sample_x=x[:2])                          # doctest: +SKIP
    >>> batch = clipper.clipped_sum(x, y, tf.ones(len(x)))             # doctest: +SKIP
    """

    def __init__(
        self, model: Any, loss_fn: Callable, *, l2_norm_clip: float, sample_x: Any
    ) -> None:
        check_model(model)
        self.model = model
        self.loss_fn = loss_fn
        self.l2_norm_clip = float(l2_norm_clip)
        self.variables = list(model.trainable_variables)
        if not self.variables:
            raise TrainingError("the model has no trainable weights: nothing to train")
        self._index = {id(v): i for i, v in enumerate(self.variables)}
        self.report: dict[str, str] = {}
        self._fast: list[tuple[Any, _Handler]] = []
        self._plan(sample_x)

    # -- planning

    def _plan(self, sample_x: Any) -> None:
        layers = [layer for layer in flatten_layers(self.model) if layer.trainable_variables]
        candidates: dict[int, tuple[Any, _Handler]] = {}
        reasons: dict[int, str] = {}
        for layer in layers:
            if not layer.trainable:
                continue
            handler, reason = _handler_for(layer)
            if handler is None:
                reasons[id(layer)] = reason
            else:
                candidates[id(layer)] = (layer, handler)
        # One dry run to count how often each candidate is called (a shared layer's per-example
        # gradient sums over its calls, which the per-call formulas don't see).
        counts = dict.fromkeys(candidates, 0)

        def counting(layer: Any) -> Callable[..., Any]:
            original = type(layer).call

            def call(*args: Any, **kwargs: Any) -> Any:
                counts[id(layer)] += 1
                return original(layer, *args, **kwargs)

            return call

        with _patched([(layer, counting(layer)) for layer, _ in candidates.values()]):
            self.model(sample_x, training=False)
        # Variables each layer owns directly; a fast layer's variable owned elsewhere too is tied.
        owners: dict[int, int] = {}
        for layer in [self.model, *flatten_layers(self.model)]:
            for v in getattr(layer, "_trainable_variables", []):
                owners[id(v)] = owners.get(id(v), 0) + 1
        covered: set[int] = set()
        for key, (layer, handler) in candidates.items():
            own = [v for v in layer.trainable_variables]
            if counts[key] != 1:
                reasons[key] = (
                    "layer called more than once (shared)" if counts[key] else "layer not called"
                )
            elif any(owners.get(id(v), 0) > 1 for v in own):
                reasons[key] = "weights shared with another layer"
            else:
                self._fast.append((layer, handler))
                covered.update(id(v) for v in own)
                self.report[layer.name] = handler.kind  # refined with the method when traced
        self.fallback_variables = [v for v in self.variables if id(v) not in covered]
        # Embeddings reading the model's only input directly: their ids are known before the
        # step, so the engine can find repeated tokens on the host (see ``repeats``).
        self.host_embeddings = [
            layer
            for layer, handler in self._fast
            if isinstance(handler, _EmbeddingHandler) and _reads_model_input(self.model, layer)
        ]
        if self.fallback_variables:
            fb = {id(v) for v in self.fallback_variables}
            for layer in layers:
                own = getattr(layer, "_trainable_variables", layer.trainable_variables)
                if any(id(v) in fb for v in own) and layer.name not in self.report:
                    why = reasons.get(id(layer), f"no fast path for {type(layer).__name__}")
                    self.report[layer.name] = f"{FALLBACK} ({why})"
            model_own = getattr(self.model, "_trainable_variables", [])
            if any(id(v) in fb for v in model_own):
                self.report[self.model.name] = f"{FALLBACK} (weights used outside a layer)"

    @property
    def uses_fallback(self) -> bool:
        return bool(self.fallback_variables)

    # -- per batch (call inside tf.function for speed)

    def clipped_sum(
        self,
        x: Any,
        y: Any,
        weights: tf.Tensor,
        scale: Any = 1.0,
        repeated: Sequence[RepeatedTokens] = (),
    ) -> ClippedBatch:
        """Clipped per-example gradient sum of the batch, times ``scale``; rows with weight 0
        contribute nothing. (Scaling the clip factors costs nothing; scaling the sums later would
        be one more pass over every weight.)"""
        weights = tf.cast(weights, tf.float32)
        with tf.GradientTape(persistent=self.uses_fallback) as tape:
            rec = _Recorder(tape)
            rec.host = {id(la): r for la, r in zip(self.host_embeddings, repeated, strict=False)}

            def tapped(layer: Any, handler: _Handler) -> Callable[..., Any]:
                def call(inputs: Any, *args: Any, **kwargs: Any) -> Any:
                    return handler.forward(layer, rec, inputs)

                return call

            with _patched([(layer, tapped(layer, h)) for layer, h in self._fast]):
                preds = self.model(x, training=True)
            losses = tf.cast(self.loss_fn(y, preds), tf.float32) * weights
            total = tf.reduce_sum(losses)
            reg_losses = list(self.model.losses)
            reg = tf.add_n([tf.cast(r, tf.float32) for r in reg_losses]) if reg_losses else None
        zero = tf.UnconnectedGradients.ZERO
        handler_of = dict((id(layer), h) for layer, h in self._fast)
        parts: list[_LayerGrads] = []
        if rec.taps:
            dzs = tape.gradient(total, [t.probe for t in rec.taps], unconnected_gradients=zero)
            for tap, dz in zip(rec.taps, dzs, strict=False):
                part = handler_of[id(tap.layer)].grads(tap, dz)
                self.report[tap.layer.name] = part.method
                parts.append(part)
        jac = []
        if self.fallback_variables:
            jac = tape.jacobian(
                losses, self.fallback_variables, unconnected_gradients=zero,
                experimental_use_pfor=True,
            )  # fmt: skip
            parts.append(
                _materialized(list(zip(self.fallback_variables, jac, strict=False)), FALLBACK)
            )
        batch = tf.shape(losses)[0]
        sq = tf.zeros([batch], tf.float32)
        for part in parts:
            sq = sq + tf.cast(part.sq, tf.float32)
        norms = tf.sqrt(tf.maximum(sq, 0.0))  # float round-off can take a ghost norm² below 0
        clip = tf.constant(self.l2_norm_clip, tf.float32)
        factors = tf.where(norms > clip, clip / tf.maximum(norms, 1e-30), 1.0) * weights
        factors = factors * tf.cast(scale, tf.float32)
        sums: list[tf.Tensor | None] = [None] * len(self.variables)
        for part in parts:
            for var, g in part.clipped(factors):
                i = self._index[id(var)]
                g = tf.cast(g, var.dtype)
                sums[i] = g if sums[i] is None else sums[i] + g
        grads = [
            tf.zeros(v.shape, v.dtype) if g is None else g
            for v, g in zip(self.variables, sums, strict=False)
        ]
        finite = tf.reduce_all(tf.math.is_finite(sq)) & tf.reduce_all(tf.math.is_finite(losses))
        # A finite squared norm for every example bounds each clipped sum by (batch size)·C, so
        # checking ``sq`` covers every fast-path gradient; only the fallback's are checked again.
        fallback = {id(v) for v in self.fallback_variables}
        for v, g in zip(self.variables, grads, strict=False):
            if id(v) in fallback:
                finite = finite & tf.reduce_all(tf.math.is_finite(g))
        reg_grads = None
        if reg is not None:
            reg_grads = tape.gradient(reg, self.variables, unconnected_gradients=zero)
        del tape
        return ClippedBatch(grads, losses, preds, finite, norms, reg_grads)
