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

import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, NamedTuple

import keras
import numpy as np
import tensorflow as tf

from .clipping import FastClipper, RepeatedTokens, repeats
from .clipping.selfcheck import EXAMPLES as SELF_CHECK_EXAMPLES
from .noise import PATIENCE, GaussianNoise, lower_priority, ready_within

__all__ = ["DPSGDEngine", "StepStats", "accuracy_fn"]


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
            y = tf.reshape(tf.cast(y, tf.int64), [-1])
            return tf.cast(tf.equal(tf.argmax(p, axis=-1), y), tf.float32)

        return sparse
    if "categorical_crossentropy" in name or "categorical_focal" in name:

        def categorical(y: Any, p: Any) -> tf.Tensor:
            return tf.cast(tf.equal(tf.argmax(p, -1), tf.argmax(y, -1)), tf.float32)

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


def _spec(data: Any) -> Any:
    return tf.nest.map_structure(lambda t: tf.TensorSpec(t.shape, t.dtype), data)


def _batch_spec(data: Any) -> Any:
    return tf.nest.map_structure(lambda t: tf.TensorSpec([None, *t.shape[1:]], t.dtype), data)


class DPSGDEngine:
    """DP-SGD training step for one model (see module docstring).

    Data are passed as whole-dataset tensors ``X``, ``Y`` (nested structures allowed for ``X``)
    plus batch indices; ``step`` returns a :class:`StepStats`.
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
        host_x: np.ndarray | None = None,
    ) -> None:
        sample_x = tf.nest.map_structure(lambda t: t[:2], X)
        self.clipper = FastClipper(model, loss_fn, l2_norm_clip=l2_norm_clip, sample_x=sample_x)
        if host_x is not None:
            self._check_ids(host_x)
        # The self-check (exact reference norms, no mixing of examples) before anything runs.
        check_x = tf.nest.map_structure(lambda t: t[:SELF_CHECK_EXAMPLES], X)
        self.clipper.verify(check_x, Y[:SELF_CHECK_EXAMPLES])
        self.model, self.loss_fn, self.optimizer = model, loss_fn, optimizer
        self.variables = self.clipper.variables
        self.noise_std = float(noise_multiplier) * float(l2_norm_clip)
        self.accuracy = accuracy
        sizes = [int(np.prod(v.shape)) for v in self.variables]
        self.noise = None
        if self.noise_std > 0:
            self.noise = GaussianNoise(sizes, seed, prefetch=True)
        self._no_noise = tf.zeros([0], tf.float32)
        self.optimizer.build(self.variables)
        signature = [
            _spec(X), _spec(Y), tf.TensorSpec([None], tf.int32),
            tf.TensorSpec([2], tf.float32), tf.TensorSpec([None], tf.float32),
        ]  # fmt: skip
        # Embeddings that read the input ids directly get their repeated tokens found on the
        # host (``host_x`` is the same data as ``X``, as a NumPy array).
        self._host_x, self._host_vocab, self._host_dtype = host_x, [], None
        if host_x is not None and self.clipper.host_embeddings:
            self._host_vocab = [layer.input_dim for layer in self.clipper.host_embeddings]
            # The ids as the model sees them: converted to its input's integer dtype.
            self._host_dtype = np.dtype(str(model.inputs[0].dtype))
        if self._host_vocab:
            vector = tf.TensorSpec([None], tf.int32)
            spec = RepeatedTokens(tf.TensorSpec([None, None], tf.bool), vector, vector, vector)
            signature.extend(spec for _ in self._host_vocab)
        self._step = tf.function(self._step_impl, input_signature=signature)
        probe_signature = [_batch_spec(X), _batch_spec(Y), tf.TensorSpec([None], tf.float32)]
        probe_signature.extend(signature[5:])
        self._probe = tf.function(self._probe_impl, input_signature=probe_signature)
        self.sensitivity_checked: float | None = None  # largest removal effect / C found
        self._eval = tf.function(self._eval_impl, input_signature=[_batch_spec(X), _batch_spec(Y)])
        self._concrete: Any = None
        self._pool: ThreadPoolExecutor | None = None  # host inputs of the next step
        self._ahead: tuple[np.ndarray, Future[list[RepeatedTokens]]] | None = None

    @property
    def report(self) -> dict[str, str]:
        return dict(self.clipper.report)

    def _check_ids(self, host_x: np.ndarray) -> None:
        """Token ids out of an input-reading Embedding's range, found before any step runs."""
        from ..errors import InvalidParameterError

        for layer in self.clipper.host_embeddings:
            if host_x.size == 0:
                return
            low, high = int(host_x.min()), int(host_x.max())
            if high >= layer.input_dim or low < -layer.input_dim:
                bad = high if high >= layer.input_dim else low
                raise InvalidParameterError(
                    f"x: token id {bad} is out of range for the Embedding {layer.name!r} of "
                    f"{layer.input_dim} rows"
                )

    @property
    def trace_count(self) -> int:
        return int(self._step.experimental_get_tracing_count())

    def trace(self) -> None:
        """Trace the step now (errors in the model surface before any update is applied)."""
        self._concrete = self._step.get_concrete_function()

    def _stats(self, y: Any, preds: Any, losses: tf.Tensor, weights: tf.Tensor) -> list[tf.Tensor]:
        correct = tf.constant(0.0)
        if self.accuracy is not None:
            correct = tf.reduce_sum(self.accuracy(y, preds) * weights)
        return [tf.reduce_sum(losses), tf.reduce_sum(weights), correct]

    def _noise(self, flat: tf.Tensor) -> list[tf.Tensor]:
        """The per-variable views of the step's flat noise vector (see :class:`.GaussianNoise`)."""
        return [
            tf.cast(tf.reshape(flat[o : o + n], v.shape), v.dtype)
            for o, n, v in zip(self.noise.offsets, self.noise.sizes, self.variables, strict=True)
        ]

    def _step_impl(
        self,
        X: Any,
        Y: Any,
        idx: tf.Tensor,
        meta: tf.Tensor,
        noise: tf.Tensor,
        *repeated: RepeatedTokens,
    ) -> tf.Tensor:
        # (No parameter with a default here: TensorFlow then takes a much slower call path.)
        # meta = [denominator, row weight]; the weight is 0 only for an empty batch's dummy row.
        weights = tf.fill(tf.shape(idx), meta[1])
        # (Σ clipped + N(0, σ²C²)) / denom: 1/denom is folded into the clip factors here and into
        # the noise's standard deviation by ``step``.
        scale = 1.0 / meta[0]
        x = tf.nest.map_structure(lambda t: tf.gather(t, idx), X)
        y = tf.gather(Y, idx)
        out = self.clipper.clipped_sum(x, y, weights, scale=scale, repeated=repeated)
        noisy = out.grads
        if self.noise is not None:
            noisy = [g + n for g, n in zip(noisy, self._noise(noise), strict=True)]
        if out.regularization_grads is not None:
            noisy = [
                g + tf.cast(r, g.dtype)
                for g, r in zip(noisy, out.regularization_grads, strict=False)
            ]

        def apply() -> tf.Tensor:
            self.optimizer.apply(noisy, self.variables)
            return tf.constant(1.0)

        # Every example's contribution is finite and bounded (non-finite ones are dropped), so
        # this decision is made on the noisy update alone: post-processing, covered by ε.
        finite = tf.reduce_all([tf.reduce_all(tf.math.is_finite(g)) for g in noisy])
        applied = tf.cond(finite, apply, lambda: tf.constant(0.0))
        kept = weights * tf.cast(out.kept, tf.float32)
        stats = self._stats(y, out.predictions, out.losses, kept)
        return tf.stack([*stats, applied, tf.cast(out.nonfinite, tf.float32)])

    def _probe_impl(self, x: Any, y: Any, weights: tf.Tensor, *repeated: RepeatedTokens) -> Any:
        out = self.clipper.clipped_sum(x, y, weights, repeated=repeated)
        return tf.concat([tf.reshape(tf.cast(g, tf.float32), [-1]) for g in out.grads], 0)

    def check_sensitivity(self, X: Any, Y: Any, batch_size: int) -> float:
        """The traced-step probe of the self-check (:func:`.clipping.selfcheck.probe_sensitivity`)
        on the first ``batch_size`` rows (at least 16, at most 512): the clipped sum computed as
        training computes it moves by at most C when one example is removed."""
        from .clipping.selfcheck import probe_sensitivity

        n = int(tf.nest.flatten(X)[0].shape[0])
        rows = min(n, max(16, min(int(batch_size), 512)))
        x = tf.nest.map_structure(lambda t: t[:rows], X)
        y = Y[:rows]

        def run(xs: Any, ys: Any, weights: tf.Tensor) -> Any:
            extra = []
            if self._host_vocab:
                ids = np.asarray(tf.nest.flatten(xs)[0]).astype(self._host_dtype, copy=False)
                extra = [
                    RepeatedTokens(*map(tf.constant, repeats(ids, v))) for v in self._host_vocab
                ]
            return self._probe(xs, ys, weights, *extra)

        started = time.perf_counter()
        self.sensitivity_checked = probe_sensitivity(
            run, x, y, self.model.non_trainable_variables, self.clipper.l2_norm_clip
        )
        seconds = time.perf_counter() - started
        self.clipper.self_check_seconds = (self.clipper.self_check_seconds or 0.0) + seconds
        return self.sensitivity_checked

    def step(
        self,
        X: Any,
        Y: Any,
        idx: np.ndarray,
        denominator: float,
        upcoming: np.ndarray | None = None,
    ) -> StepStats:
        """Run one DP-SGD step on rows ``idx``; an empty batch still adds (and applies) noise.

        ``upcoming``, the rows of the next step if known, lets the host-side work for it start
        in the background now.
        """
        weight = 1.0
        if len(idx) == 0:  # one masked dummy row keeps every shape non-empty
            idx, weight = np.zeros(1, np.int32), 0.0
        noise = self._no_noise
        if self.noise is not None:
            noise = tf.constant(self.noise.next(self.noise_std / denominator))
        meta = np.array([denominator, weight], np.float32)
        args = [X, Y, tf.constant(idx, tf.int32), tf.constant(meta), noise]
        if self._host_vocab:
            args.extend(self._host_inputs_for(idx, upcoming))
        if self._concrete is None:
            self.trace()
        # The concrete function skips the signature matching of a tf.function call (~0.2 ms).
        out = self._concrete(*args).numpy()
        return StepStats(float(out[0]), float(out[1]), float(out[2]), out[3] > 0.5, int(out[4]))

    def _host_inputs(self, idx: np.ndarray) -> list[RepeatedTokens]:
        ids = self._host_x[idx].astype(self._host_dtype, copy=False)
        try:
            found = [repeats(ids, vocabulary) for vocabulary in self._host_vocab]
        except ValueError as exc:
            from ..errors import InvalidParameterError

            raise InvalidParameterError(f"x: {exc}") from None
        return [RepeatedTokens(*map(tf.constant, r)) for r in found]

    def _host_inputs_for(self, idx: np.ndarray, upcoming: np.ndarray | None) -> list[Any]:
        ahead, self._ahead = self._ahead, None
        if upcoming is not None and len(upcoming):
            if self._pool is None:
                self._pool = ThreadPoolExecutor(1, "kprivacy-nb-host", initializer=lower_priority)
            self._ahead = (upcoming, self._pool.submit(self._host_inputs, upcoming))
        if ahead is not None and ahead[0] is idx:
            ready = ready_within(ahead[1], PATIENCE)
            if ready is not None:
                return ready
        if ahead is not None:  # not ready soon: never wait long for the low-priority thread
            ahead[1].cancel()
        return self._host_inputs(idx)

    def close(self) -> None:
        """Stop the background threads (training is over)."""
        if self.noise is not None:
            self.noise.close()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool, self._ahead = None, None

    def _eval_impl(self, x: Any, y: Any) -> tf.Tensor:
        preds = self.model(x, training=False)
        losses = tf.cast(self.loss_fn(y, preds), tf.float32)
        return tf.stack(self._stats(y, preds, losses, tf.ones_like(losses)))

    def evaluate(self, X: Any, Y: Any, batch_size: int = 1024) -> dict[str, float]:
        """Mean loss (and accuracy) of the model on ``X, Y`` — no privacy cost (not training data
        updates), but note validation data must not be private data you account for."""
        n = int(tf.nest.flatten(X)[0].shape[0])
        total = np.zeros(3)
        for start in range(0, n, batch_size):
            rows = slice(start, start + batch_size)
            xb = tf.nest.map_structure(lambda t, rows=rows: t[rows], X)
            total += self._eval(xb, Y[rows]).numpy()
        logs = {"loss": total[0] / max(total[1], 1)}
        if self.accuracy is not None:
            logs["accuracy"] = total[2] / max(total[1], 1)
        return logs


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
