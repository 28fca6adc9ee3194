"""The registry of per-layer clipping rules, and what every rule is made of.

A rule (:class:`Handler`) knows how to run one layer family with a *tap* — the layer computes its
output itself, saves what it needs and exposes its pre-activation output ``z`` to the tape — and
how to turn the tap and ``dL/dz`` into per-example squared gradient norms and a function that
gives the clipped gradient sum (:class:`LayerGrads`). Each family lives in its own module and
registers itself::

    @register(keras.layers.Dense)
    class DenseHandler(Handler): ...

so a new fast path is a new module, not an edit to a dispatcher. :func:`handler_for` finds the
rule of a layer by its type (most specific class first).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import tensorflow as tf

__all__ = [
    "Handler",
    "LayerGrads",
    "Recorder",
    "RowFilter",
    "Tap",
    "activate",
    "common_reason",
    "handler_for",
    "materialized",
    "register",
]

_REGISTRY: dict[type, type[Handler]] = {}


def register(*layer_types: type) -> Callable[[type[Handler]], type[Handler]]:
    """Class decorator: ``handler_cls`` clips layers of ``layer_types`` (and their subclasses)."""

    def add(handler_cls: type[Handler]) -> type[Handler]:
        for layer_type in layer_types:
            _REGISTRY[layer_type] = handler_cls
        return handler_cls

    return add


def handler_for(layer: Any) -> tuple[Handler | None, str]:
    """The fast rule for ``layer``, or ``(None, why not)``."""
    for cls in type(layer).__mro__:
        handler_cls = _REGISTRY.get(cls)
        if handler_cls is not None:
            handler = handler_cls()
            reason = handler.reason_unsupported(layer)
            return (None, reason) if reason else (handler, "")
    return None, f"no fast path for {type(layer).__name__}"


@dataclass
class Tap:
    layer: Any
    kind: str
    saved: dict[str, Any]
    probe: tf.Tensor


@dataclass
class Recorder:
    """Collects the taps of one forward pass."""

    tape: tf.GradientTape
    taps: list[Tap] = field(default_factory=list)
    host: dict[int, Any] = field(default_factory=dict)  # id(layer) → RepeatedTokens tensors
    inputs: Any = None  # the model's input batch (the ids host-side repeats were found from)

    def probe(self, layer: Any, kind: str, z: tf.Tensor, **saved: Any) -> tf.Tensor:
        # Watching the layer's output makes the tape give dLoss/dz for it directly.
        z = tf.identity(z)
        self.tape.watch(z)
        self.taps.append(Tap(layer, kind, saved, z))
        return z


class RowFilter:
    """Zeroes the rows (examples) whose gradient is not finite, before they enter a sum.

    A clip factor of 0 alone is not enough: ``0 · inf`` is NaN. The clipper builds the sums twice
    under one ``tf.cond`` — with an inactive filter (every example finite, the usual case: no
    extra work) and with an active one — so the common path pays nothing.
    """

    def __init__(self, keep: tf.Tensor, active: bool = True) -> None:
        self.keep = keep
        self.active = active

    def __call__(self, t: tf.Tensor) -> tf.Tensor:
        return self.rows(t, None, None)

    def rows(self, t: tf.Tensor, start: Any, stop: Any) -> tf.Tensor:
        """The filter applied to ``t``, the per-example tensor of examples ``start:stop``."""
        if not self.active:
            return t
        keep = self.keep if start is None and stop is None else self.keep[start:stop]
        mask = tf.reshape(keep, [-1] + [1] * (t.shape.rank - 1))
        return tf.where(mask, t, tf.zeros_like(t))


@dataclass
class LayerGrads:
    """Per-example squared norms of one tap and a function giving its clipped sum.

    ``clipped(c, rows)`` returns ``[(variable, Σ_i c_i g_i)]``; ``rows`` (a :class:`RowFilter`)
    must be applied to every per-example tensor that enters the sum.
    """

    sq: tf.Tensor
    clipped: Callable[[tf.Tensor, RowFilter], list[tuple[Any, tf.Tensor]]]
    method: str
    layer: Any = None


def materialized(pairs: list[tuple[Any, tf.Tensor]], method: str, layer: Any = None) -> LayerGrads:
    """Per-example gradients given explicitly as ``(variable, (B, *shape))`` pairs.

    The norm is taken of exactly the tensors that are summed, so it cannot disagree with them.
    """
    sq = tf.add_n(
        [tf.reduce_sum(tf.reshape(tf.square(g), [tf.shape(g)[0], -1]), 1) for _, g in pairs]
    )

    def clipped(c: tf.Tensor, rows: RowFilter) -> list[tuple[Any, tf.Tensor]]:
        return [(v, tf.tensordot(c, rows(g), axes=1)) for v, g in pairs]

    return LayerGrads(sq, clipped, method, layer)


class Handler:
    """How to run one supported layer type with a tap, and how to clip from its tap."""

    kind = ""
    base: type | None = None  # the Keras class whose ``call`` this rule re-implements

    def reason_unsupported(self, layer: Any) -> str | None:  # None = supported
        return common_reason(layer, self.base) if self.base is not None else None

    def forward(self, layer: Any, rec: Recorder, inputs: Any) -> Any:
        raise NotImplementedError

    def grads(self, tap: Tap, dz: tf.Tensor) -> LayerGrads:
        raise NotImplementedError


def common_reason(layer: Any, cls: type) -> str | None:
    """Why a layer of family ``cls`` can't use its fast rule (None when it can)."""
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


def activate(layer: Any, z: Any) -> Any:
    return layer.activation(z) if getattr(layer, "activation", None) is not None else z
