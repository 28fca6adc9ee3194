"""Conv1D / Conv2D (channels_last; valid, same or causal padding; strides, dilation, groups).

The convolution is a Dense layer applied to every input patch (:mod:`.linear`), with the patch
split by kernel tap so it is never assembled. A grouped convolution is ``groups`` such layers side
by side, each reading its slice of the input channels and writing its slice of the filters; their
per-example norms add up and their clipped sums are put back side by side.
"""

from __future__ import annotations

from typing import Any

import keras
import tensorflow as tf
from keras import ops

from .linear import flat3, linear_grads
from .registry import (
    Handler,
    LayerGrads,
    Recorder,
    RowFilter,
    Tap,
    activate,
    common_reason,
    register,
)


def conv_pieces(
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


@register(keras.layers.Conv1D, keras.layers.Conv2D)
class ConvHandler(Handler):
    kind = "conv"

    def reason_unsupported(self, layer: Any) -> str | None:
        cls = keras.layers.Conv1D if isinstance(layer, keras.layers.Conv1D) else keras.layers.Conv2D
        reason = common_reason(layer, cls)
        if reason:
            return reason
        if layer.data_format != "channels_last":
            return "channels_first"
        if layer.padding not in ("valid", "same", "causal"):
            return f"padding={layer.padding!r}"
        return None

    def forward(self, layer: Any, rec: Recorder, inputs: Any) -> Any:
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
        return activate(layer, rec.probe(layer, self.kind, z, x=x, padding=padding))

    def grads(self, tap: Tap, dz: tf.Tensor) -> LayerGrads:
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
        pieces = conv_pieces(x, size, stride, rate, padding)
        if pieces is None:  # spatial size unknown until run time
            patches = tf.image.extract_patches(
                x,
                sizes=[1, *size, 1],
                strides=[1, *stride, 1],
                rates=[1, *rate, 1],
                padding=padding.upper(),
            )
            # Patches are laid out (tap, channel): the same row order as the kernel's.
            pieces = _flat3_split(patches, x.shape[-1])
        name = f"Conv{layer.rank}D"
        bias = layer.bias if layer.use_bias else None
        groups = int(getattr(layer, "groups", 1) or 1)
        dz3 = flat3(dz)
        if groups == 1:
            return linear_grads(pieces, dz3, layer.kernel, bias, layer.kernel.shape, name)
        return _grouped(pieces, dz3, layer, bias, groups, f"{name} ({groups} groups)")


def _flat3_split(patches: tf.Tensor, channels: int) -> list[tf.Tensor]:
    """Patches (B, ..., taps·c) → one (B, T, c) piece per tap."""
    flat = flat3(patches)
    taps = flat.shape[-1] // channels
    return [flat[:, :, i * channels : (i + 1) * channels] for i in range(taps)]


def _grouped(
    pieces: list[tf.Tensor], dz: tf.Tensor, layer: Any, bias: Any, groups: int, name: str
) -> LayerGrads:
    c_group = pieces[0].shape[-1] // groups
    f_group = dz.shape[-1] // groups
    group_shape = (*layer.kernel.shape[:-1], f_group)
    per_group = [
        linear_grads(
            [t[..., g * c_group : (g + 1) * c_group] for t in pieces],
            dz[..., g * f_group : (g + 1) * f_group],
            layer.kernel,
            None,
            group_shape,
            name,
        )  # fmt: skip
        for g in range(groups)
    ]
    sq = tf.add_n([part.sq for part in per_group])
    bias_g = tf.reduce_sum(dz, axis=1) if bias is not None else None
    if bias_g is not None:
        sq = sq + tf.reduce_sum(tf.square(bias_g), 1)

    def clipped(c: tf.Tensor, rows: RowFilter) -> list[tuple[Any, tf.Tensor]]:
        sums = [part.clipped(c, rows)[0][1] for part in per_group]
        out = [(layer.kernel, tf.concat(sums, axis=-1))]
        if bias_g is not None:
            out.append((bias, tf.linalg.matvec(rows(bias_g), c, transpose_a=True)))
        return out

    return LayerGrads(sq, clipped, per_group[0].method)
