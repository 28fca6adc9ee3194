"""Batch samplers for DP-SGD: real Poisson subsampling and plain shuffling.

Poisson sampling includes every example independently with probability ``q = B / n``, so batch
sizes vary (Binomial(n, q)). We draw it as: size ``k ~ Binomial(n, q)``, then ``k`` distinct
indices uniformly at random. That is exactly the same distribution over subsets as n independent
coin flips (given its size, a Poisson subset is uniform among subsets of that size), but costs
O(k) instead of O(n) per step. Batches are never truncated or padded: the training step handles
any batch size without retracing, so the accounting (``PoissonSampled(q, Gaussian(σ))`` per step)
describes exactly what happened.

Randomness comes from the operating system's entropy pool unless a ``seed`` is given (tests).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from .accounting import steps_per_epoch

__all__ = ["PoissonSampler", "ShuffleSampler", "make_rng", "make_sampler"]


def make_rng(seed: int | None = None) -> np.random.Generator:
    """A NumPy generator seeded from ``seed`` or, when ``seed`` is None, from OS entropy."""
    return np.random.default_rng(seed)


class PoissonSampler:
    """Poisson-subsampled batches: each example is in a batch independently with q = B / n.

    ``denominator`` is the *expected* batch size B: DP-SGD divides the noisy clipped sum by it
    (dividing by the realised size would leak it).
    """

    sampling = "poisson"

    def __init__(self, n: int, batch_size: int, rng: np.random.Generator) -> None:
        self.n, self.batch_size, self.rng = int(n), int(batch_size), rng
        self.q = self.batch_size / self.n
        self.steps_per_epoch = steps_per_epoch(self.n, self.batch_size, "poisson")

    def sample(self) -> np.ndarray:
        """Indices of one Poisson batch (possibly empty), as int32."""
        k = int(self.rng.binomial(self.n, self.q))
        if k == 0:
            return np.zeros(0, dtype=np.int32)
        return self.rng.choice(self.n, size=k, replace=False, shuffle=False).astype(np.int32)

    def denominator(self, batch: np.ndarray) -> float:
        return float(self.batch_size)

    def epoch(self) -> Iterator[np.ndarray]:
        for _ in range(self.steps_per_epoch):
            yield self.sample()


class ShuffleSampler:
    """Shuffled fixed-size batches (the last one of an epoch may be smaller); no amplification
    is claimed for it in the accounting. The clipped sum is divided by the actual batch size."""

    sampling = "shuffle"

    def __init__(self, n: int, batch_size: int, rng: np.random.Generator) -> None:
        self.n, self.batch_size, self.rng = int(n), int(batch_size), rng
        self.steps_per_epoch = steps_per_epoch(self.n, self.batch_size, "shuffle")

    def denominator(self, batch: np.ndarray) -> float:
        return float(len(batch))

    def epoch(self) -> Iterator[np.ndarray]:
        order = self.rng.permutation(self.n).astype(np.int32)
        for start in range(0, self.n, self.batch_size):
            yield order[start : start + self.batch_size]


def make_sampler(
    sampling: str, n: int, batch_size: int, rng: np.random.Generator
) -> PoissonSampler | ShuffleSampler:
    """The sampler for ``sampling`` ("poisson" or "shuffle")."""
    if sampling == "poisson":
        return PoissonSampler(n, batch_size, rng)
    if sampling == "shuffle":
        return ShuffleSampler(n, batch_size, rng)
    from ..errors import InvalidParameterError

    raise InvalidParameterError(f"unknown sampling {sampling!r}; use 'poisson' or 'shuffle'")
