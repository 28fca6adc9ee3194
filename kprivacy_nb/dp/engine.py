"""One DP-SGD step as a single traced TensorFlow function.

``step(X, Y, idx, denominator)`` gathers the batch ``idx`` from the whole training set (kept as
tensors, so nothing is copied per step), computes the clipped per-example gradient sum
(:mod:`.clipping`), adds ``N(0, σ²C²)`` once per coordinate, divides by ``denominator`` (the
expected batch size for Poisson sampling, the batch size for shuffling) and applies the Keras
optimizer — unless something is non-finite, in which case nothing is applied and the step reports
it. The batch dimension is left unknown in the traced signature, so Poisson batches of any size
run through the same graph: no padding, no truncation, no retracing.

The noise is made outside the graph (:mod:`.noise`: AES-CTR bits from OS entropy, Box–Muller), on
a background thread, one step ahead; repeated tokens of embeddings that read the input ids are
found on the host (:func:`.clipping.repeats`). Both are plain inputs of the traced step.
"""

from __future__ import annotations

import contextlib
import contextvars
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, NamedTuple

import keras
import numpy as np
import tensorflow as tf

from .clipping import FastClipper, RepeatedTokens, repeats
from .clipping.selfcheck import example_count
from .noise import PATIENCE, GaussianNoise, lower_priority, ready_within

__all__ = ["DPSGDEngine", "PRIVATE_UPDATE", "StepStats", "accuracy_fn", "private_update"]


#: True while the DP step hands its noisy gradients to the optimizer; optimizers that must never
#: see other gradients (:mod:`kprivacy_nb.compat.tensorflow_privacy`'s DP optimizers) check it
#: (when the step is traced).
PRIVATE_UPDATE: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "kprivacy_private_update", default=False
)


@contextlib.contextmanager
def private_update() -> Iterator[None]:
    """Mark the optimizer call of a DP step (see :data:`PRIVATE_UPDATE`)."""
    token = PRIVATE_UPDATE.set(True)
    try:
        yield
    finally:
        PRIVATE_UPDATE.reset(token)


class StepStats(NamedTuple):
    """What one step reports back (sums over the batch; none of it leaves the notebook)."""

    loss_sum: float
    count: float
    correct_sum: float
    applied: bool  # False only if the noisy update itself was not finite
    nonfinite: int  # examples dropped for a non-finite loss or gradient


def accuracy_fn(loss: Any) -> Callable[[Any, Any], tf.Tensor] | None:
    """Per-example correctness (0/1) matching the loss, or None when accuracy makes no sense."""
    name = loss if isinstance(loss, str) else getattr(loss, "name", getattr(loss, "__name__", ""))
    name = str(name).lower()
    logits = bool(getattr(loss, "from_logits", False)) or bool(
        getattr(loss, "_fn_kwargs", {}).get("from_logits", False)
    )
    if "sparse_categorical" in name:

        def sparse(y: Any, p: Any) -> tf.Tensor:
            guess = tf.argmax(p, axis=-1)  # (B,) or, for sequence outputs, (B, T, …)
            y = tf.reshape(tf.cast(y, tf.int64), tf.shape(guess))
            return _per_example(tf.equal(guess, y))

        return sparse
    if "categorical_crossentropy" in name or "categorical_focal" in name:

        def categorical(y: Any, p: Any) -> tf.Tensor:
            return _per_example(tf.equal(tf.argmax(p, -1), tf.argmax(y, -1)))

        return categorical
    if "binary" in name:
        threshold = 0.0 if logits else 0.5

        def binary(y: Any, p: Any) -> tf.Tensor:
            hit = tf.equal(
                tf.cast(p > threshold, tf.float32), tf.cast(tf.reshape(y, tf.shape(p)), tf.float32)
            )
            hit = tf.cast(hit, tf.float32)
            return tf.reduce_mean(tf.reshape(hit, [tf.shape(hit)[0], -1]), axis=1)

        return binary
    return None


def _per_example(hit: tf.Tensor) -> tf.Tensor:
    """Each example's share of correct guesses (over its time steps, for sequence outputs)."""
    hit = tf.cast(hit, tf.float32)
    return tf.reduce_mean(tf.reshape(hit, [tf.shape(hit)[0], -1]), axis=1)


def _spec(data: Any) -> Any:
    return tf.nest.map_structure(lambda t: tf.TensorSpec(t.shape, t.dtype), data)


def _batch_spec(data: Any) -> Any:
    return tf.nest.map_structure(lambda t: tf.TensorSpec([None, *t.shape[1:]], t.dtype), data)


class DPSGDEngine:
    """DP-SGD for one model: the self-check, then one traced step per batch (module docstring).

    ``X``, ``Y``: training rows to plan and check on (the whole set, or its first few hundred
    rows; nested structures allowed for ``X``). :meth:`update` is the step itself, callable inside
    any ``tf.function`` (``make_private``'s Keras ``train_step`` calls it); :meth:`step` runs it
    on rows ``idx`` of ``X, Y`` (``dp_fit``'s tests drive it directly). ``optimizer=None`` uses
    the model's compiled optimizer at each step.
    """

    def __init__(
        self,
        model: Any,
        loss_fn: Callable[[Any, Any], tf.Tensor],
        optimizer: Any,
        *,
        l2_norm_clip: float,
        noise_multiplier: float,
        X: Any,
        Y: Any,
        seed: int | None = None,
        accuracy: Callable[[Any, Any], tf.Tensor] | None = None,
        input_arrays: Sequence[np.ndarray | None] | None = None,
        physical_batch_size: int | None = None,
        batch_spec: tuple[Any, Any] | None = None,
    ) -> None:
        sample_x = tf.nest.map_structure(lambda t: t[:2], X)
        self.clipper = FastClipper(model, loss_fn, l2_norm_clip=l2_norm_clip, sample_x=sample_x)
        if input_arrays is not None:
            self.check_input_ids(input_arrays)
        # The self-check (exact reference norms, no mixing of examples) before anything runs.
        count = example_count(X)
        check_x = tf.nest.map_structure(lambda t: t[:count], X)
        self.clipper.verify(check_x, Y[:count])
        self.model, self.loss_fn, self._optimizer = model, loss_fn, optimizer
        self.variables = self.clipper.variables
        self.physical_batch_size = physical_batch_size
        self.noise_std = float(noise_multiplier) * float(l2_norm_clip)
        self.accuracy = accuracy
        self.sizes = [int(np.prod(v.shape)) for v in self.variables]
        self.offsets = list(GaussianNoise(self.sizes, 0).offsets)
        self.seed = seed
        self.noise: GaussianNoise | None = None  # made by ``step`` when first needed
        self._no_noise = tf.zeros([0], tf.float32)
        # Embeddings that read the input ids directly get their repeated tokens found on the
        # host (the ids as the model sees them: converted to its input's integer dtype).
        # (Micro-batches find them in the graph, per micro-batch.)
        self._host_vocab, self._host_dtype = [], None
        if self.clipper.host_embeddings and physical_batch_size is None:
            self._host_vocab = [layer.input_dim for layer in self.clipper.host_embeddings]
            self._host_dtype = np.dtype(str(model.inputs[0].dtype))
        vector = tf.TensorSpec([None], tf.int32)
        self.repeated_spec = [
            RepeatedTokens(tf.TensorSpec([None, None], tf.bool), *[vector] * 5)
            for _ in self._host_vocab
        ]
        # The batches' structure, dtypes and shapes (batch dimension unknown) as the training
        # pipeline delivers them; by default those of X, Y.
        self.batch_spec = batch_spec or (_batch_spec(X), _batch_spec(Y))
        x_spec, y_spec = self.batch_spec
        rows = tf.TensorSpec([None], tf.float32)
        # The clipped sum is traced once, as a function of its own: the training step (Keras'
        # train function, or ``step``) calls it, and so does the self-check's probe — which so
        # measures the very graph that trains, and the model is not traced twice (memory).
        # No AutoGraph (as in Keras' own train step): the step has no data-dependent Python
        # control flow, and converting the model's code was most of the set-up time (a one-
        # block transformer's first fit: 10 → 5.4 s).
        self._clip_fn = tf.function(
            self._clipped_traced,
            input_signature=[x_spec, y_spec, rows, tf.TensorSpec([], tf.float32),
                             *self.repeated_spec],
            autograph=False,
        )  # fmt: skip
        signature = [
            x_spec, y_spec, rows, tf.TensorSpec([2], tf.float32), rows, *self.repeated_spec,
        ]  # fmt: skip
        self._step = tf.function(self.update, input_signature=signature, autograph=False)
        self.sensitivity_checked: float | None = None  # largest removal effect / C found
        self._concrete: Any = None
        self._pool: ThreadPoolExecutor | None = None  # host inputs of the next step
        self._ahead: tuple[np.ndarray, Future[list[RepeatedTokens]]] | None = None

    @property
    def optimizer(self) -> Any:
        opt = self._optimizer if self._optimizer is not None else self.model.optimizer
        # Mixed precision wraps the optimizer in a LossScaleOptimizer, which divides every
        # update by its loss scale — meant for a scaled loss, which the DP step never uses.
        inner = getattr(opt, "inner_optimizer", None)
        if inner is not None and type(opt).__name__ == "LossScaleOptimizer":
            opt = inner
        if getattr(opt, "loss_scale_factor", None) not in (None, 1, 1.0):
            from ..errors import InvalidParameterError

            raise InvalidParameterError(
                f"the optimizer has loss_scale_factor={opt.loss_scale_factor}: the DP step "
                "does not scale the loss, so every update would shrink by that factor. "
                "Leave loss_scale_factor unset"
            )
        return opt

    @property
    def report(self) -> dict[str, str]:
        return dict(self.clipper.report)

    def check_input_ids(self, arrays: Sequence[np.ndarray | None]) -> None:
        """Refuse token ids that an Embedding reading a model input directly does not have,
        before any step runs. ``arrays``: the data of each model input, in the model's input
        order (None where it is not a NumPy array)."""
        from ..errors import InvalidParameterError

        for layer, index in self.clipper.input_embeddings:
            ids = arrays[index] if index < len(arrays) else None
            if ids is None or ids.size == 0:
                continue
            if ids.dtype.kind == "f":
                fractional = ids != np.floor(ids)
                if fractional.any():
                    row = int(np.argwhere(fractional)[0][0])
                    raise InvalidParameterError(
                        f"x: row {row} has a token id that is not a whole number (the Embedding "
                        f"{layer.name!r} reads ids): convert the ids to integers"
                    )
            low, high = int(ids.min()), int(ids.max())
            if high >= layer.input_dim or low < -layer.input_dim:
                bad = high if high >= layer.input_dim else low
                row = int(np.argwhere(ids == bad)[0][0])
                raise InvalidParameterError(
                    f"x: row {row} has token id {bad}, out of range for the Embedding "
                    f"{layer.name!r} of {layer.input_dim} rows"
                )

    @property
    def trace_count(self) -> int:
        return int(self._step.experimental_get_tracing_count())

    def trace(self) -> None:
        """Trace the step now (errors in the model surface before any update is applied)."""
        self._concrete = self._step.get_concrete_function()

    def _noise(self, flat: tf.Tensor) -> list[tf.Tensor]:
        """The per-variable views of the step's flat noise vector (see :class:`.GaussianNoise`)."""
        return [
            tf.cast(tf.reshape(flat[o : o + n], v.shape), v.dtype)
            for o, n, v in zip(self.offsets, self.sizes, self.variables, strict=True)
        ]

    def _clipped(self, x: Any, y: Any, weights: tf.Tensor, scale: Any, repeated: Any) -> Any:
        """Clipped sum (× ``scale``) and batch statistics, in micro-batches when asked."""
        physical = self.physical_batch_size

        def stats(out: Any, yb: Any, wb: tf.Tensor) -> list[tf.Tensor]:
            kept = tf.cast(wb > 0, tf.float32) * tf.cast(out.kept, tf.float32)
            correct = tf.constant(0.0)
            if self.accuracy is not None:
                correct = tf.reduce_sum(self.accuracy(yb, out.predictions) * kept)
            return [
                tf.reduce_sum(out.losses), tf.reduce_sum(kept), correct,
                tf.cast(out.nonfinite, tf.float32),
            ]  # fmt: skip

        if physical is None or repeated:
            out = self.clipper.clipped_sum(x, y, weights, scale=scale, repeated=repeated)
            return out.grads, stats(out, y, weights), out.regularization_grads
        batch = tf.shape(weights)[0]
        chunks = (batch - 1) // physical + 1  # (no int32 overflow, whatever physical is)

        def body(i: Any, sums: list[Any], totals: list[Any]) -> Any:
            lo = i * physical
            hi = tf.minimum(lo + physical, batch)
            xb = tf.nest.map_structure(lambda t: t[lo:hi], x)
            out = self.clipper.clipped_sum(xb, y[lo:hi], weights[lo:hi], scale=scale)
            sums = [s + g for s, g in zip(sums, out.grads, strict=True)]
            part = stats(out, y[lo:hi], weights[lo:hi])
            return i + 1, sums, [t + p for t, p in zip(totals, part, strict=True)]

        start = (
            tf.constant(0), [tf.zeros(v.shape, v.dtype) for v in self.variables],
            [tf.constant(0.0)] * 4,
        )  # fmt: skip
        # One micro-batch at a time: by default TensorFlow runs up to ten iterations at once
        # (they depend on each other only through the sums), each holding its activations and
        # gradients — more micro-batches then took more memory, not less.
        _, sums, totals = tf.while_loop(
            lambda i, *_: i < chunks, body, start, parallel_iterations=1
        )
        reg = self.clipper.regularization_grads()
        return sums, totals, reg

    def _clipped_traced(
        self, x: Any, y: Any, weights: tf.Tensor, scale: tf.Tensor, *repeated: RepeatedTokens
    ) -> Any:
        return self._clipped(x, y, weights, scale, repeated)

    def conform(self, x: Any, y: Any) -> tuple[Any, Any]:
        """``x, y`` as tensors of :attr:`batch_spec`'s structure and dtypes."""
        x_spec, y_spec = self.batch_spec
        leaves = [
            tf.cast(t, s.dtype)
            for t, s in zip(tf.nest.flatten(x), tf.nest.flatten(x_spec), strict=True)
        ]
        return tf.nest.pack_sequence_as(x_spec, leaves), tf.cast(y, y_spec.dtype)

    def update(
        self, x: Any, y: Any, weights: tf.Tensor, meta: tf.Tensor, noise: tf.Tensor,
        *repeated: RepeatedTokens,
    ) -> tf.Tensor:  # fmt: skip
        """One DP-SGD step on a batch (call inside a ``tf.function``); applies the optimizer.

        ``weights``: per-row sample weights (0 masks a row); ``meta = [denominator, _]``;
        ``noise``: the flat N(0, σ²C²/denominator²) vector of :class:`.GaussianNoise` (empty
        for σ = 0). Returns ``[loss_sum, count, correct_sum, applied, nonfinite]``.
        """
        # (No parameter with a default here: TensorFlow then takes a much slower call path.)
        # (Σ clipped + N(0, σ²C²)) / denom: 1/denom is folded into the clip factors here and
        # into the noise's standard deviation by whoever draws it.
        scale = 1.0 / meta[0]
        grads, stats, reg_grads = self._clip_fn(x, y, weights, scale, *repeated)
        noisy = self._with_noise(grads, noise, reg_grads)
        # Every example's contribution is finite and bounded (non-finite ones are dropped), so
        # this decision is made on the noisy update alone: post-processing, covered by ε.
        applied = tf.cond(_finite(noisy), lambda: self.apply(noisy), lambda: tf.constant(0.0))
        return tf.stack([stats[0], stats[1], stats[2], applied, stats[3]])

    def _with_noise(self, grads: list[Any], noise: tf.Tensor, reg_grads: Any) -> list[Any]:
        """The clipped sum plus the step's noise and the (data-independent) regularisation."""
        if self.noise_std > 0:
            grads = [g + n for g, n in zip(grads, self._noise(noise), strict=True)]
        if reg_grads is not None:
            grads = [g + tf.cast(r, g.dtype) for g, r in zip(grads, reg_grads, strict=False)]
        return grads

    def apply(self, update: list[Any]) -> tf.Tensor:
        """Hand the final (noisy, divided) update to the optimizer; returns 1.0."""
        with private_update():
            self.optimizer.apply(update, self.variables)
        return tf.constant(1.0)

    def replica_update(
        self, x: Any, y: Any, weights: tf.Tensor, meta: tf.Tensor, noise: tf.Tensor,
        *repeated: RepeatedTokens,
    ) -> tuple[list[tf.Tensor], tf.Tensor, tf.Tensor]:  # fmt: skip
        """One replica's part of a DP-SGD step under ``tf.distribute`` (inside ``strategy.run``).

        Each replica clips its own examples (× 1/denominator, the *global* expected batch size);
        replica 0 alone adds the noise and the regularisation gradients, so they count once;
        then one all-reduce (sum) of the gradients and the batch statistics. Returns the summed
        update — ``(Σ clipped + N(0, σ²C²)) / B``, the same on every replica — the summed
        ``[loss_sum, count, correct_sum, nonfinite]`` and whether the update is finite. The
        caller applies it once, in cross-replica context (:meth:`apply`): Keras' optimizer would
        otherwise all-reduce (sum) it a second time.
        """
        ctx = tf.distribute.get_replica_context()
        grads, stats, reg_grads = self._clipped(x, y, weights, 1.0 / meta[0], repeated)
        grads = list(grads)
        if self.noise_std > 0 or reg_grads is not None:
            lead = tf.equal(ctx.replica_id_in_sync_group, 0)
            grads = tf.cond(
                lead, lambda: self._with_noise(grads, noise, reg_grads), lambda: list(grads)
            )
        *total, sums = ctx.all_reduce(tf.distribute.ReduceOp.SUM, [*grads, tf.stack(stats)])
        # The decision is made on the summed noisy update alone (post-processing, as in update).
        return total, sums, _finite(total)

    def check_sensitivity(self, X: Any, Y: Any, batch_size: int) -> float:
        """The traced-step probe of the self-check (:func:`.clipping.selfcheck.probe_sensitivity`)
        on the first ``batch_size`` rows (at least 16, at most 512): the clipped sum computed as
        training computes it moves by at most C when one example is removed."""
        from .clipping.selfcheck import probe_sensitivity

        n = int(tf.nest.flatten(X)[0].shape[0])
        rows = min(n, max(16, min(int(batch_size), 512)))
        x = tf.nest.map_structure(lambda t: tf.convert_to_tensor(t[:rows]), X)
        y = tf.convert_to_tensor(Y[:rows])

        def run(xs: Any, ys: Any, weights: tf.Tensor) -> Any:
            xs, ys = self.conform(xs, ys)
            grads, _, _ = self._clip_fn(xs, ys, weights, tf.constant(1.0), *self.host_repeats(xs))
            return tf.concat([tf.reshape(tf.cast(g, tf.float32), [-1]) for g in grads], 0)

        started = time.perf_counter()
        self.sensitivity_checked = probe_sensitivity(
            run, x, y, self.model.non_trainable_variables, self.clipper.l2_norm_clip
        )
        seconds = time.perf_counter() - started
        self.clipper.self_check_seconds = (self.clipper.self_check_seconds or 0.0) + seconds
        return self.sensitivity_checked

    def host_repeats(self, x: Any) -> list[RepeatedTokens]:
        """The repeated tokens of a batch's ids, found on the host (empty when no Embedding
        reads the model input directly)."""
        if not self._host_vocab:
            return []
        return [RepeatedTokens(*map(tf.constant, r)) for r in self.host_repeat_arrays(x)]

    def host_repeat_arrays(self, x: Any) -> list[tuple[np.ndarray, ...]]:
        ids = np.asarray(tf.nest.flatten(x)[0]).astype(self._host_dtype, copy=False)
        try:
            return [repeats(ids, vocabulary) for vocabulary in self._host_vocab]
        except ValueError as exc:
            from ..errors import InvalidParameterError

            raise InvalidParameterError(f"x: {exc}") from None

    def step(
        self,
        X: Any,
        Y: Any,
        idx: np.ndarray,
        denominator: float,
        upcoming: np.ndarray | None = None,
    ) -> StepStats:
        """Run one DP-SGD step on rows ``idx`` of ``X, Y``; an empty batch still adds (and
        applies) noise. ``upcoming``, the rows of the next step if known, lets the host-side
        work for it start in the background now."""
        weight = 1.0
        if len(idx) == 0:  # one masked dummy row keeps every shape non-empty
            idx, weight = np.zeros(1, np.int32), 0.0
        noise = self._no_noise
        if self.noise_std > 0:
            if self.noise is None:
                self.noise = GaussianNoise(self.sizes, self.seed, prefetch=True)
            noise = tf.constant(self.noise.next(self.noise_std / denominator))
        rows = tf.constant(idx, tf.int32)
        x, y = self.conform(
            tf.nest.map_structure(lambda t: tf.gather(t, rows), X), tf.gather(Y, rows)
        )
        weights = tf.fill([len(idx)], weight)
        meta = tf.constant(np.array([denominator, weight], np.float32))
        args = [x, y, weights, meta, noise]
        if self._host_vocab:
            args.extend(self._host_inputs_for(X, idx, upcoming))
        if self._concrete is None:
            self.trace()
        # The concrete function skips the signature matching of a tf.function call (~0.2 ms).
        out = self._concrete(*args).numpy()
        return StepStats(float(out[0]), float(out[1]), float(out[2]), out[3] > 0.5, int(out[4]))

    def _host_inputs_for(self, X: Any, idx: np.ndarray, upcoming: np.ndarray | None) -> list:
        def work(rows: np.ndarray) -> list[RepeatedTokens]:
            return self.host_repeats(tf.nest.map_structure(lambda t: np.asarray(t)[rows], X))

        ahead, self._ahead = self._ahead, None
        if upcoming is not None and len(upcoming):
            if self._pool is None:
                self._pool = ThreadPoolExecutor(1, "kprivacy-nb-host", initializer=lower_priority)
            self._ahead = (upcoming, self._pool.submit(work, upcoming))
        if ahead is not None and ahead[0] is idx:
            ready = ready_within(ahead[1], PATIENCE)
            if ready is not None:
                return ready
        if ahead is not None:  # not ready soon: never wait long for the low-priority thread
            ahead[1].cancel()
        return work(idx)

    def close(self) -> None:
        """Stop the background threads (training is over)."""
        if self.noise is not None:
            self.noise.close()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool, self._ahead = None, None


def _finite(tensors: list[Any]) -> tf.Tensor:
    """Whether every entry is finite. One sum per tensor decides the usual case (a sum is finite
    only if every term is, unless finite terms overflow it — a huge C); only then is every entry
    tested."""
    tensors = [tf.cast(g, tf.float32) for g in tensors]
    total = tf.add_n([tf.reduce_sum(g) for g in tensors])
    return tf.cond(
        tf.math.is_finite(total),
        lambda: tf.constant(True),
        lambda: tf.reduce_all([tf.reduce_all(tf.math.is_finite(g)) for g in tensors]),
    )


def resolve_optimizer(optimizer: Any, learning_rate: float | None) -> Any:
    """A Keras optimizer from a name ("sgd", "adam", …) or an optimizer object.

    Default learning rates: 0.1 for SGD (DP-SGD usually wants a larger step than Keras' 0.01),
    Keras' own default for the others. An optimizer object keeps its own rate unless
    ``learning_rate`` is given.
    """
    from ..errors import InvalidParameterError

    if isinstance(optimizer, str):
        try:
            opt = keras.optimizers.get(optimizer.lower())
        except ValueError:
            raise InvalidParameterError(
                f"unknown optimizer {optimizer!r}; use 'sgd', 'adam', 'rmsprop', 'adagrad', "
                "'adamw' or a keras.optimizers.Optimizer object"
            ) from None
        if learning_rate is None and optimizer.lower() == "sgd":
            learning_rate = 0.1
    elif isinstance(optimizer, keras.optimizers.Optimizer):
        opt = optimizer
    else:
        raise InvalidParameterError(
            f"optimizer must be a name or a keras.optimizers.Optimizer, got {type(optimizer).__name__}"
        )
    if learning_rate is not None:
        if not learning_rate > 0:
            raise InvalidParameterError(f"learning_rate must be > 0, got {learning_rate}")
        opt.learning_rate = float(learning_rate)
    return opt
