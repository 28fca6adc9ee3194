"""The clipper: per-example clipped gradient sums of a Keras model, fast where layers allow it.

While the model runs, every layer with a registered rule (:mod:`.registry`) computes its output
itself and exposes it to the tape; one backward pass to those outputs gives every such layer's
output-gradient ``dz`` (the loss is a sum over examples and — checked by :mod:`.selfcheck` — no
layer mixes examples, so ``dz_i`` depends on example ``i`` only). Norms and clipped sums are then
assembled per layer without forming per-example gradients where that is cheaper.

Any other layer with trainable weights (or a shared layer, or weights used outside a layer call)
falls back to per-example gradients of those weights (``GradientTape.jacobian``, vectorised with
``pfor``, or — when the self-check finds the vectorised form wrong for this model — one example
at a time). The self-check verifies every path on real examples before training.

An example whose loss or gradient norm is not finite contributes nothing to the step (its clip
factor is 0 and its tensors are zeroed), so the step stays within the bound and training never
stops at a point that depends on one record.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import keras
import tensorflow as tf

from ...errors import TrainingError
from ..accounting import check_clip
from .embedding import EmbeddingHandler, RepeatedTokens
from .model import check_model, flatten_layers
from .registry import Handler, LayerGrads, Recorder, RowFilter, handler_for, materialized

__all__ = ["ClippedBatch", "FastClipper", "FALLBACK", "EXACT_FALLBACK"]

FALLBACK = "fallback: vectorised per-example gradients"
EXACT_FALLBACK = "fallback: per-example gradients, one example at a time"


@dataclass
class ClippedBatch:
    """Result of one batch: clipped gradient sum (aligned with ``variables``) and diagnostics."""

    grads: list[tf.Tensor]
    losses: tf.Tensor  # per-example losses (0 for masked and non-finite rows)
    predictions: Any
    norms: tf.Tensor  # per-example gradient norms (before clipping)
    nonfinite: tf.Tensor  # how many examples were dropped for a non-finite loss or gradient
    kept: tf.Tensor  # (B,) bool: the example's loss and gradient were finite
    regularization_grads: list[tf.Tensor] | None = None


class _DensifyNotice(logging.Filter):
    """Drops TensorFlow's "Converting IndexedSlices … to a dense representation may make it
    slow": per-example gradients of an embedding table are dense by design on the fallback path
    (its cost is in the clipping report)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Converting IndexedSlices")


@contextlib.contextmanager
def _no_densify_notice() -> Iterator[None]:
    logger, notice = logging.getLogger("tensorflow"), _DensifyNotice()
    logger.addFilter(notice)
    try:
        yield
    finally:
        logger.removeFilter(notice)


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


def model_input_read(model: Any, layer: Any) -> int | None:
    """The position of the model input ``layer`` is called on, once and directly; else None."""
    try:
        inputs = model.inputs
        nodes = layer._inbound_nodes
    except (AttributeError, ValueError):
        return None
    if not inputs or len(nodes) != 1:
        return None
    args = nodes[0].input_tensors
    if len(args) != 1:
        return None
    return next((i for i, t in enumerate(inputs) if args[0] is t), None)


def reads_model_input(model: Any, layer: Any) -> bool:
    """True if ``layer`` is called once, directly on the input of a single-input model."""
    if model_input_read(model, layer) != 0 or len(model.inputs) != 1:
        return False
    # Only integer inputs: Keras converts the data to the input's dtype first, and a float32
    # input would merge ids above 2^24 that the host still tells apart.
    return str(getattr(model.inputs[0], "dtype", "")) in ("int32", "int64")


@dataclass
class Parts:
    """One forward/backward pass: every layer's :class:`LayerGrads` and the batch outputs."""

    layers: list[LayerGrads]
    losses: tf.Tensor
    predictions: Any
    regularization_grads: list[tf.Tensor] | None


class FastClipper:
    """Per-example clipping of a Keras model's gradients, fast where the layers allow it.

    >>> clipper = FastClipper(model, per_example_loss_fn("mse"), l2_norm_clip=1.0,
    ...                       sample_x=x[:8])                          # doctest: +SKIP
    >>> clipper.verify(x[:8], y[:8])                                   # doctest: +SKIP
    >>> batch = clipper.clipped_sum(x, y, tf.ones(len(x)))             # doctest: +SKIP
    """

    def __init__(
        self, model: Any, loss_fn: Callable, *, l2_norm_clip: float, sample_x: Any
    ) -> None:
        check_model(model)
        self.model = model
        self.loss_fn = loss_fn
        self.l2_norm_clip = check_clip(l2_norm_clip)
        self.variables = list(model.trainable_variables)
        if not self.variables:
            raise TrainingError("the model has no trainable weights: nothing to train")
        self._index = {id(v): i for i, v in enumerate(self.variables)}
        self.methods: dict[str, str] = {}  # layer name → path (refined when the step runs)
        self.verified: dict[str, float] = {}  # layer name → relative error found by the check
        self.self_check_seconds: float | None = None
        self.exact_fallback = False
        self._fast: list[tuple[Any, Handler]] = []
        self._plan(sample_x)

    @property
    def report(self) -> dict[str, str]:
        """Per layer with trainable weights: the clipping path, and whether it was verified."""
        out = {}
        for name, method in self.methods.items():
            if name in self.verified:
                method = f"{method} — verified (rel. err {self.verified[name]:.0e})"
            out[name] = method
        return out

    # -- planning

    def _plan(self, sample_x: Any) -> None:
        layers = [layer for layer in flatten_layers(self.model) if layer.trainable_variables]
        candidates: dict[int, tuple[Any, Handler]] = {}
        self._reasons: dict[int, str] = {}
        for layer in layers:
            if not layer.trainable:
                continue
            handler, reason = handler_for(layer)
            if handler is None:
                self._reasons[id(layer)] = reason
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

        state = [v.numpy() for v in self.model.non_trainable_variables]
        try:
            with _patched([(layer, counting(layer)) for layer, _ in candidates.values()]):
                self.model(sample_x, training=True)  # as the step will call it
        finally:
            for var, value in zip(self.model.non_trainable_variables, state, strict=True):
                var.assign(value)
        # Variables each layer owns directly; a fast layer's variable owned elsewhere too is tied.
        owners: dict[int, int] = {}
        self._owner: dict[int, str] = {}  # id(variable) → the name it is reported under
        for layer in [self.model, *flatten_layers(self.model)]:
            for v in getattr(layer, "_trainable_variables", []):
                owners[id(v)] = owners.get(id(v), 0) + 1
                self._owner.setdefault(id(v), layer.name)
        # An RNN's weights belong to its cell: they are reported (and self-checked) under the
        # RNN layer's name, with the reason its rule did not apply (not the cell's generic one).
        self._parent: dict[int, Any] = {}
        for layer in flatten_layers(self.model):
            cell = getattr(layer, "cell", None)
            if isinstance(layer, keras.layers.RNN) and cell is not None:
                self._parent[id(cell)] = layer
                for v in cell.trainable_variables:
                    self._owner[id(v)] = layer.name
        for key, (layer, handler) in candidates.items():
            if counts[key] != 1:
                self._reasons[key] = (
                    "layer called more than once (shared)" if counts[key] else "layer not called"
                )
            elif any(owners.get(id(v), 0) > 1 for v in layer.trainable_variables):
                self._reasons[key] = "weights shared with another layer"
            else:
                self._fast.append((layer, handler))
        self._layers = layers
        self._refresh()

    def _refresh(self) -> None:
        """Recompute the fallback set and the report after the fast set changed."""
        covered = set()
        self.methods = {}
        for layer, handler in self._fast:
            covered.update(id(v) for v in layer.trainable_variables)
            for v in layer.trainable_variables:
                self._owner[id(v)] = layer.name
            self.methods[layer.name] = handler.kind  # refined with the method when run
        self.fallback_variables = [v for v in self.variables if id(v) not in covered]
        fb = {id(v) for v in self.fallback_variables}
        label = EXACT_FALLBACK if self.exact_fallback else FALLBACK
        for layer in self._layers:
            own = getattr(layer, "_trainable_variables", layer.trainable_variables)
            named = self._parent.get(id(layer), layer)  # (an RNN's cell: the RNN)
            if any(id(v) in fb for v in own) and named.name not in self.methods:
                why = self._reasons.get(id(named)) or self._reasons.get(
                    id(layer), f"no fast path for {type(layer).__name__}"
                )
                self.methods[named.name] = f"{label} ({why})"
        if any(id(v) in fb for v in getattr(self.model, "_trainable_variables", [])):
            self.methods[self.model.name] = f"{label} (weights used outside a layer)"
        # Embeddings reading the model's only input directly: their ids are known before the
        # step, so the engine can find repeated tokens on the host (see ``repeats``).
        self.host_embeddings = [
            layer
            for layer, handler in self._fast
            if isinstance(handler, EmbeddingHandler) and reads_model_input(self.model, layer)
        ]
        # Every Embedding reading a model input directly (any input of the model, fast or not):
        # its ids come straight from the data and are range-checked before training.
        self.input_embeddings = [
            (layer, index)
            for layer in self._layers
            if isinstance(layer, keras.layers.Embedding)
            and (index := model_input_read(self.model, layer)) is not None
        ]

    def demote(self, layer_name: str, reason: str) -> None:
        """Move a fast layer to the exact fallback path (used by the self-check)."""
        for i, (layer, _) in enumerate(self._fast):
            if layer.name == layer_name:
                del self._fast[i]
                self._reasons[id(layer)] = reason
                break
        self._refresh()

    def broadcast_positions(self) -> list[str]:
        """Fast Embeddings that gave their unbatched (position) ids a batch axis
        (:mod:`.position_embedding`): the model's own shapes may not allow it."""
        return [layer.name for layer, h in self._fast if getattr(h, "unbatched", False)]

    def use_exact_fallback(self) -> None:
        """Per-example gradients of the fallback weights one example at a time (no pfor)."""
        self.exact_fallback = True
        self._refresh()

    def verify(self, x: Any, y: Any) -> None:
        """Run the self-check (:func:`.selfcheck.verify`) on a few real examples."""
        from .selfcheck import verify

        started = time.perf_counter()
        verify(self, x, y)
        self.self_check_seconds = time.perf_counter() - started

    def owner_name(self, variable: Any) -> str:
        """The layer name a variable's norm is reported (and self-checked) under."""
        return self._owner.get(id(variable), self.model.name)

    def regularization_grads(self) -> list[tf.Tensor] | None:
        """Gradients of the weight regularizers (they don't depend on the data), or None."""
        regularized = [v for v in self.variables if getattr(v, "regularizer", None)]
        if not regularized:
            return None
        with tf.GradientTape() as tape:
            reg = tf.add_n([tf.cast(v.regularizer(v), tf.float32) for v in regularized])
        found = dict(zip(map(id, regularized), tape.gradient(reg, regularized), strict=True))
        return [
            tf.zeros(v.shape, v.dtype) if found.get(id(v)) is None else found[id(v)]
            for v in self.variables
        ]

    @property
    def uses_fallback(self) -> bool:
        return bool(self.fallback_variables)

    # -- per batch (call inside tf.function for speed)

    def parts(
        self,
        x: Any,
        y: Any,
        weights: tf.Tensor,
        repeated: Sequence[RepeatedTokens] = (),
        training: bool = True,
    ) -> Parts:
        """Per-layer norms and clipped-sum functions of one batch (one forward, one backward)."""
        weights = tf.cast(weights, tf.float32)
        with tf.GradientTape(persistent=True) as tape:
            rec = Recorder(tape)
            rec.host = {id(la): r for la, r in zip(self.host_embeddings, repeated, strict=False)}
            rec.inputs = x

            def tapped(layer: Any, handler: Handler) -> Callable[..., Any]:
                def call(inputs: Any, *args: Any, **kwargs: Any) -> Any:
                    return handler.forward(layer, rec, inputs)

                return call

            with _patched([(layer, tapped(layer, h)) for layer, h in self._fast]):
                preds = self.model(x, training=training)
            losses = tf.cast(self.loss_fn(y, preds), tf.float32) * weights
            total = tf.reduce_sum(tf.where(tf.math.is_finite(losses), losses, 0.0))
            # Only weight regularizers may add to the loss: they don't depend on the data. A
            # loss added with add_loss() may, and it would reach the update unclipped.
            regularized = [v for v in self.variables if getattr(v, "regularizer", None)]
            if len(self.model.losses) > len(regularized):
                raise TrainingError(
                    "a layer adds a loss with add_loss(): such a loss can depend on the data and "
                    "is not clipped per example, which would break the privacy guarantee. Use "
                    "weight regularizers (kernel_regularizer=…) or put the term in the loss"
                )
            reg_terms = [tf.cast(v.regularizer(v), tf.float32) for v in regularized]
            reg = tf.add_n(reg_terms) if reg_terms else None
        zero = tf.UnconnectedGradients.ZERO
        handler_of = {id(layer): h for layer, h in self._fast}
        out: list[LayerGrads] = []
        tapped_layers = [id(t.layer) for t in rec.taps]
        if len(set(tapped_layers)) != len(tapped_layers):
            raise TrainingError(
                "a layer on a fast clipping path was called more than once in a training step "
                "(but once when the model was planned): the model's structure depends on the "
                "training flag, which the per-layer norms cannot follow. Please report the model"
            )
        if rec.taps:
            dzs = tape.gradient(total, [t.probe for t in rec.taps], unconnected_gradients=zero)
            for tap, dz in zip(rec.taps, dzs, strict=False):
                part = handler_of[id(tap.layer)].grads(tap, dz)
                part.layer = tap.layer.name
                self.methods[tap.layer.name] = part.method
                out.append(part)
        if self.fallback_variables:
            with _no_densify_notice():
                jac = tape.jacobian(
                    losses, self.fallback_variables, unconnected_gradients=zero,
                    experimental_use_pfor=not self.exact_fallback,
                )  # fmt: skip
            label = EXACT_FALLBACK if self.exact_fallback else FALLBACK
            by_owner: dict[str, list[tuple[Any, tf.Tensor]]] = {}
            for v, g in zip(self.fallback_variables, jac, strict=True):
                by_owner.setdefault(self.owner_name(v), []).append((v, g))
            out.extend(materialized(pairs, label, name) for name, pairs in by_owner.items())
        reg_grads = None
        if reg is not None:
            found = dict(zip(map(id, regularized), tape.gradient(reg, regularized), strict=True))
            reg_grads = [
                tf.zeros(v.shape, v.dtype) if found.get(id(v)) is None else found[id(v)]
                for v in self.variables
            ]
        del tape
        return Parts(out, losses, preds, reg_grads)

    def clipped_sum(
        self,
        x: Any,
        y: Any,
        weights: tf.Tensor,
        scale: Any = 1.0,
        repeated: Sequence[RepeatedTokens] = (),
    ) -> ClippedBatch:
        """Clipped per-example gradient sum of the batch, times ``scale``; rows with weight 0
        contribute nothing, nor do rows whose loss or gradient is not finite. (Scaling the clip
        factors costs nothing; scaling the sums later would be one more pass over every
        weight.)"""
        weights = tf.cast(weights, tf.float32)
        first = self._clipped_sum(x, y, weights, scale, repeated)
        if not self.fallback_variables:
            return first
        # The jacobian back-propagates every example's one-hot loss through the whole batch: a
        # weight's gradient is a sum over rows, and an overflowing row adds 0·∞ = NaN to every
        # example's gradient, so every example would be dropped — one record silencing the
        # batch. When a row was dropped (rare), the step is computed again the textbook way: one
        # example at a time, each on its own forward pass, so no row can touch another.
        dropped = ~first.kept & (weights > 0)

        def again() -> tuple[Any, ...]:
            return self._one_at_a_time(x, y, weights, scale)

        def as_is() -> tuple[Any, ...]:
            return first.grads, first.losses, first.norms, first.kept

        grads, losses, norms, kept = tf.cond(tf.reduce_any(dropped), again, as_is)
        return ClippedBatch(
            list(grads), losses, first.predictions, norms,
            tf.reduce_sum(tf.cast(~kept & (weights > 0), tf.int32)), kept,
            first.regularization_grads,
        )  # fmt: skip

    def _one_at_a_time(self, x: Any, y: Any, weights: tf.Tensor, scale: Any) -> tuple[Any, ...]:
        """Clipped sum with one forward/backward pass per example (no vectorisation, no batch)."""
        batch = tf.shape(weights)[0]
        clip = tf.constant(self.l2_norm_clip, tf.float32)
        scale = tf.cast(scale, tf.float32)

        def body(i: tf.Tensor, sums: list[tf.Tensor], losses: Any, norms: Any, kept: Any) -> Any:
            xi = tf.nest.map_structure(lambda t: t[i : i + 1], x)
            with tf.GradientTape() as tape:
                loss = weights[i] * tf.reduce_sum(
                    tf.cast(self.loss_fn(y[i : i + 1], self.model(xi, training=True)), tf.float32)
                )
            grads = tape.gradient(
                loss, self.variables, unconnected_gradients=tf.UnconnectedGradients.ZERO
            )
            sq = tf.add_n([tf.reduce_sum(tf.square(tf.cast(g, tf.float32))) for g in grads])
            ok = tf.math.is_finite(sq) & tf.math.is_finite(loss) & (weights[i] > 0)
            norm = tf.sqrt(tf.where(ok, sq, 0.0))
            factor = tf.where(norm > clip, clip / tf.maximum(norm, 1e-30), 1.0)
            factor = tf.where(ok, factor * scale, 0.0)
            sums = [
                s + tf.where(ok, tf.cast(factor, g.dtype) * g, tf.zeros_like(g))
                for s, g in zip(sums, grads, strict=True)
            ]
            return (
                i + 1, sums, losses.write(i, tf.where(ok, loss, 0.0)), norms.write(i, norm),
                kept.write(i, ok | (weights[i] <= 0)),
            )  # fmt: skip

        start = (
            tf.constant(0), [tf.zeros(v.shape, v.dtype) for v in self.variables],
            tf.TensorArray(tf.float32, batch), tf.TensorArray(tf.float32, batch),
            tf.TensorArray(tf.bool, batch),
        )  # fmt: skip
        _, sums, losses, norms, kept = tf.while_loop(lambda i, *_: i < batch, body, start)
        return sums, losses.stack(), norms.stack(), kept.stack()

    def _clipped_sum(
        self,
        x: Any,
        y: Any,
        weights: tf.Tensor,
        scale: Any,
        repeated: Sequence[RepeatedTokens],
    ) -> ClippedBatch:
        run = self.parts(x, y, weights, repeated)
        batch = tf.shape(run.losses)[0]
        sq = tf.zeros([batch], tf.float32)
        for part in run.layers:
            sq = sq + tf.cast(part.sq, tf.float32)
        # A norm² that is NaN or ∞ (overflow, a NaN input) never means "no clipping": the example
        # is dropped. Round-off can't take a norm² below 0 on any path (see .linear), but a
        # negative value is treated as 0 rather than as a reason to skip clipping.
        keep = tf.math.is_finite(sq) & tf.math.is_finite(run.losses)
        norms = tf.sqrt(tf.maximum(tf.where(keep, sq, 0.0), 0.0))
        clip = tf.constant(self.l2_norm_clip, tf.float32)
        factors = tf.where(norms > clip, clip / tf.maximum(norms, 1e-30), 1.0)
        # The weights are already inside each example's loss (so inside its gradient and its
        # norm): a weight of 10 cannot push a contribution past C. Here they only select rows.
        factors = tf.where(keep & (weights > 0), factors, 0.0) * tf.cast(scale, tf.float32)

        def summed(rows: RowFilter) -> list[tf.Tensor]:
            sums: list[tf.Tensor | None] = [None] * len(self.variables)
            for part in run.layers:
                for var, g in part.clipped(factors, rows):
                    i = self._index[id(var)]
                    g = tf.cast(g, var.dtype)
                    sums[i] = g if sums[i] is None else sums[i] + g
            return [
                tf.zeros(v.shape, v.dtype) if g is None else g
                for v, g in zip(self.variables, sums, strict=False)
            ]

        grads = tf.cond(
            tf.reduce_all(keep),
            lambda: summed(RowFilter(keep, active=False)),
            lambda: summed(RowFilter(keep)),
        )
        dropped = tf.reduce_sum(tf.cast(~keep & (weights > 0), tf.int32))
        losses = tf.where(keep, run.losses, 0.0)
        return ClippedBatch(
            grads, losses, run.predictions, norms, dropped, keep, run.regularization_grads
        )
