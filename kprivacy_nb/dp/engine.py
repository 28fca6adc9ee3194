"""One DP-SGD step as a single traced TensorFlow function.

``step(X, Y, idx, weights, denominator)`` gathers the batch ``idx`` from the whole training set
(kept as tensors, so nothing is copied per step), computes the clipped per-example gradient sum
(:mod:`.clipping`), adds ``N(0, σ²C²)`` once per coordinate, divides by ``denominator`` (the
expected batch size for Poisson sampling, the batch size for shuffling) and applies the Keras
optimizer — unless something is non-finite, in which case nothing is applied and the step reports
it. The batch dimension is left unknown in the traced signature, so Poisson batches of any size
run through the same graph: no padding, no truncation, no retracing.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from .clipping import FastClipper

__all__ = ["DPSGDEngine", "accuracy_fn", "noise_generator"]


def noise_generator(seed: int | None) -> np.random.Generator:
    """Source of the per-step noise keys: OS entropy unless ``seed`` is given (tests).

    Each step draws a fresh 128-bit key from it; the Gaussian noise of that step is TensorFlow's
    stateless Philox normal sampler under that key (one call for all coordinates), so noise
    generation has no state to serialise and can overlap the forward/backward pass.
    """
    if seed is not None:
        return np.random.default_rng([int(seed), 0x6B70])
    return np.random.default_rng(int.from_bytes(os.urandom(32), "little"))


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
    plus batch indices; ``step`` returns ``[loss_sum, count, correct_sum, applied]`` as a NumPy
    array.
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
    ) -> None:
        sample_x = tf.nest.map_structure(lambda t: t[:2], X)
        self.clipper = FastClipper(model, loss_fn, l2_norm_clip=l2_norm_clip, sample_x=sample_x)
        self.model, self.loss_fn, self.optimizer = model, loss_fn, optimizer
        self.variables = self.clipper.variables
        self.noise_std = float(noise_multiplier) * float(l2_norm_clip)
        self.accuracy = accuracy
        self.noise = noise_generator(seed)
        self.optimizer.build(self.variables)
        self._step = tf.function(
            self._step_impl,
            input_signature=[
                _spec(X), _spec(Y), tf.TensorSpec([None], tf.int32),
                tf.TensorSpec([None], tf.float32), tf.TensorSpec([], tf.float32),
                tf.TensorSpec([2], tf.int64),
            ],
        )  # fmt: skip
        self._eval = tf.function(self._eval_impl, input_signature=[_batch_spec(X), _batch_spec(Y)])

    @property
    def report(self) -> dict[str, str]:
        return dict(self.clipper.report)

    @property
    def trace_count(self) -> int:
        return int(self._step.experimental_get_tracing_count())

    def trace(self) -> None:
        """Trace the step now (errors in the model surface before any update is applied)."""
        self._step.get_concrete_function()

    def _stats(self, y: Any, preds: Any, losses: tf.Tensor, weights: tf.Tensor) -> list[tf.Tensor]:
        correct = tf.constant(0.0)
        if self.accuracy is not None:
            correct = tf.reduce_sum(self.accuracy(y, preds) * weights)
        return [tf.reduce_sum(losses), tf.reduce_sum(weights), correct]

    def _noise(self, key: tf.Tensor) -> list[tf.Tensor]:
        sizes = [int(np.prod(v.shape)) for v in self.variables]
        flat = tf.random.stateless_normal(
            [sum(sizes)], seed=key, stddev=self.noise_std, alg="philox"
        )
        return [
            tf.cast(tf.reshape(part, v.shape), v.dtype)
            for part, v in zip(tf.split(flat, sizes), self.variables, strict=False)
        ]

    def _step_impl(
        self, X: Any, Y: Any, idx: tf.Tensor, weights: tf.Tensor, denom: tf.Tensor, key: tf.Tensor
    ) -> tf.Tensor:
        noise = self._noise(key) if self.noise_std > 0 else None
        x = tf.nest.map_structure(lambda t: tf.gather(t, idx), X)
        y = tf.gather(Y, idx)
        out = self.clipper.clipped_sum(x, y, weights)
        noisy = []
        for i, g in enumerate(out.grads):
            if noise is not None:
                g = g + noise[i]
            noisy.append(g / tf.cast(denom, g.dtype))
        if out.regularization_grads is not None:
            noisy = [
                g + tf.cast(r, g.dtype)
                for g, r in zip(noisy, out.regularization_grads, strict=False)
            ]

        def apply() -> tf.Tensor:
            self.optimizer.apply(noisy, self.variables)
            return tf.constant(1.0)

        applied = tf.cond(out.finite, apply, lambda: tf.constant(0.0))
        return tf.stack([*self._stats(y, out.predictions, out.losses, weights), applied])

    def step(self, X: Any, Y: Any, idx: np.ndarray, denominator: float) -> np.ndarray:
        """Run one DP-SGD step on rows ``idx``; an empty batch still adds (and applies) noise."""
        if len(idx) == 0:  # one masked dummy row keeps every shape non-empty
            idx, weights = np.zeros(1, np.int32), np.zeros(1, np.float32)
        else:
            weights = np.ones(len(idx), np.float32)
        key = self.noise.integers(-(2**63), 2**63 - 1, size=2, dtype=np.int64, endpoint=True)
        out = self._step(
            X, Y, tf.constant(idx, tf.int32), tf.constant(weights),
            tf.constant(float(denominator)), tf.constant(key),
        )  # fmt: skip
        return out.numpy()

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
