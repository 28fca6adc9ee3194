"""The statistics of an audit: Clopper–Pearson intervals and ε lower bounds.

Two bounds, both from a hypothesis test against "the algorithm is (ε, δ)-DP":

* :func:`epsilon_from_rates` — the ε an attack with true/false positive rates (TPR, FPR) implies:
  (ε, δ)-DP forces ``TPR ≤ e^ε·FPR + δ`` and ``1−FPR ≤ e^ε·(1−TPR) + δ``; with counts, the rates
  are replaced by their Clopper–Pearson bounds so the ε holds at the stated confidence.
* :func:`one_run_epsilon` — Steinke, Nasr & Jagielski (2023), "Privacy Auditing with One (1)
  Training Run", the bound with δ > 0 (their Theorem 5.2 / Algorithm 2 in our own code): with m
  canaries each included independently with probability ½ and r non-abstaining guesses of which
  v are right, the p-value of "(ε, δ)-DP" is ``P[Binom(r, e^ε/(1+e^ε)) ≥ v] + 2mδ·α`` with
  ``α = max_i P[v−i ≤ Binom(r, ·) < v] / i``; the bound is the largest ε rejected.

No IPython and no TensorFlow here: numbers in, numbers out.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import optimize, special, stats

from ..errors import InvalidParameterError

__all__ = [
    "clopper_pearson",
    "epsilon_from_rates",
    "epsilon_from_counts",
    "one_run_p_value",
    "one_run_epsilon",
    "Guess",
    "best_guess",
]


def check_confidence(confidence: float) -> float:
    confidence = float(confidence)
    if not 0 < confidence < 1:
        raise InvalidParameterError(f"confidence must be in (0, 1), e.g. 0.95; got {confidence}")
    return confidence


def check_delta(delta: float) -> float:
    delta = float(delta)
    if not 0 <= delta < 1:
        raise InvalidParameterError(f"delta must be in [0, 1), got {delta}")
    return delta


def clopper_pearson(
    k: int | np.ndarray, n: int | np.ndarray, confidence: float = 0.95, *, side: str = "two-sided"
) -> tuple[np.ndarray | float, np.ndarray | float]:
    """Exact (Clopper–Pearson) confidence interval ``(low, high)`` for a binomial proportion k/n.

    ``side="two-sided"`` puts (1−confidence)/2 in each tail; ``"lower"``/``"upper"`` give a
    one-sided bound at ``confidence`` (the other end is 0 or 1).

    >>> clopper_pearson(5, 10)                       # doctest: +ELLIPSIS
    (0.187..., 0.812...)
    """
    confidence = check_confidence(confidence)
    k, n = np.asarray(k, dtype=float), np.asarray(n, dtype=float)
    if np.any(n < 1) or np.any(k < 0) or np.any(k > n):
        raise InvalidParameterError("clopper_pearson needs 0 ≤ k ≤ n and n ≥ 1")
    alpha = 1 - confidence
    tail = {"two-sided": alpha / 2, "lower": alpha, "upper": alpha}.get(side)
    if tail is None:
        raise InvalidParameterError(f"side must be two-sided, lower or upper; got {side!r}")
    with np.errstate(invalid="ignore"):
        low = np.where(k > 0, stats.beta.ppf(tail, k, n - k + 1), 0.0)
        high = np.where(k < n, stats.beta.ppf(1 - tail, k + 1, n - k), 1.0)
    if side == "lower":
        high = np.ones_like(high)
    elif side == "upper":
        low = np.zeros_like(low)
    if low.ndim == 0:
        return float(low), float(high)
    return low, high


def epsilon_from_rates(tpr: np.ndarray | float, fpr: np.ndarray | float, delta: float = 0.0):
    """The ε that (TPR, FPR) implies under (ε, δ)-DP: ``max(0, log((TPR−δ)/FPR),
    log((1−FPR−δ)/(1−TPR)))`` (∞ when a rate of 0 makes the ratio unbounded)."""
    delta = check_delta(delta)
    tpr, fpr = np.asarray(tpr, dtype=float), np.asarray(fpr, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        a = np.log(np.clip(tpr - delta, 0, None)) - np.log(fpr)
        b = np.log(np.clip(1 - fpr - delta, 0, None)) - np.log(1 - tpr)
    eps = np.fmax(np.nan_to_num(np.fmax(a, b), nan=0.0, posinf=np.inf, neginf=0.0), 0.0)
    return float(eps) if eps.ndim == 0 else eps


def epsilon_from_counts(
    tp: np.ndarray | int,
    n_pos: int,
    fp: np.ndarray | int,
    n_neg: int,
    *,
    delta: float = 0.0,
    confidence: float = 0.95,
):
    """ε lower bound at ``confidence`` from tp of n_pos members and fp of n_neg non-members
    flagged: TPR by its Clopper–Pearson lower bound, FPR by its upper bound, each at
    1 − (1−confidence)/2 so both hold together."""
    confidence = check_confidence(confidence)
    each = 1 - (1 - confidence) / 2
    tpr_lo, _ = clopper_pearson(tp, n_pos, each, side="lower")
    _, fpr_hi = clopper_pearson(fp, n_neg, each, side="upper")
    return epsilon_from_rates(tpr_lo, fpr_hi, delta)


# --------------------------------------------------------------------------- one run


def one_run_p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """Probability, if the training is (ε, δ)-DP, of ≥ v right out of r guesses about m canaries
    each included independently with probability ½ (Steinke, Nasr & Jagielski 2023, Thm 5.2)."""
    if not 0 <= v <= r <= m:
        raise InvalidParameterError(f"need 0 ≤ correct ({v}) ≤ guesses ({r}) ≤ canaries ({m})")
    if r == 0 or v == 0:
        return 1.0
    q = float(special.expit(epsilon))  # accuracy of ε-DP randomized response
    tail = float(stats.binom.sf(v - 1, r, q))  # P[Binom(r, q) ≥ v]
    if delta == 0:
        return tail
    i = np.arange(1, v + 1)
    below = stats.binom.sf(v - i - 1, r, q) - tail  # P[v−i ≤ Binom(r, q) < v]
    alpha = float(np.max(below / i))
    return min(tail + alpha * 2 * m * delta, 1.0)


def one_run_epsilon(m: int, r: int, v: int, delta: float, confidence: float = 0.95) -> float:
    """Largest ε that v right out of r guesses about m canaries rejects at ``confidence``
    (0 when not even ε = 0 is rejected). It grows with v and shrinks as δ or confidence grow."""
    alpha = 1 - check_confidence(confidence)
    delta = check_delta(delta)

    def excess(eps: float) -> float:  # > 0 while (ε, δ)-DP is still rejected
        return alpha - one_run_p_value(m, r, v, eps, delta)

    if excess(0.0) <= 0:
        return 0.0
    lo, hi = 0.0, 1.0
    while excess(hi) > 0:
        lo, hi = hi, hi * 2
        if hi > 1e4:  # only reachable with δ = 0 and absurd counts; keep the search finite
            return lo
    return float(optimize.brentq(excess, lo, hi, xtol=1e-7))


@dataclass(frozen=True)
class Guess:
    """One abstaining guess: the ``k_in`` highest scores guessed "in", the ``k_out`` lowest
    guessed "out", the rest abstain; ``correct`` of the ``k_in + k_out`` guesses were right."""

    k_in: int
    k_out: int
    correct: int
    epsilon: float

    @property
    def guesses(self) -> int:
        return self.k_in + self.k_out


def guess_candidates(m: int) -> list[tuple[int, int]]:
    """The (k_in, k_out) shapes tried when the number of guesses is not fixed: r ∈ {2, 5, 10,
    20, 50, 100}% of m, guessing "in" only or half "in" and half "out"."""
    shapes: set[tuple[int, int]] = set()
    for frac in (0.02, 0.05, 0.1, 0.2, 0.5, 1.0):
        r = max(1, round(m * frac))
        shapes.add((r, 0))
        if r >= 2:
            shapes.add((r - r // 2, r // 2))
    return sorted(shapes)


def best_guess(
    scores: Sequence[float] | np.ndarray,
    included: Sequence[bool] | np.ndarray,
    *,
    delta: float,
    confidence: float = 0.95,
    guesses: int | tuple[int, int] | None = None,
) -> tuple[Guess, int]:
    """Abstaining guesses from canary scores (higher = "more likely in"), and the best ε bound.

    With ``guesses`` fixed (an int r: half in / half out, or ``(k_in, k_out)``) one test is made
    at ``confidence``. Otherwise every shape of :func:`guess_candidates` is tried, each at
    confidence ``1 − (1−confidence)/K`` (Bonferroni over the K shapes), so the best of them still
    holds at ``confidence``. Returns the best :class:`Guess` and K.
    """
    scores, included = np.asarray(scores, dtype=float), np.asarray(included, dtype=bool)
    m = len(scores)
    if m == 0 or included.shape != scores.shape:
        raise InvalidParameterError("scores and included must be non-empty and of equal length")
    if np.isnan(scores).any():
        raise InvalidParameterError("canary scores contain NaN: the model's loss is not finite")
    if guesses is None:
        shapes = guess_candidates(m)
    elif isinstance(guesses, (tuple, list)):
        shapes = [(int(guesses[0]), int(guesses[1]))]
    else:
        r = int(guesses)
        shapes = [(r - r // 2, r // 2)]
    if any(a < 0 or b < 0 or a + b == 0 or a + b > m for a, b in shapes):
        raise InvalidParameterError(f"guesses must be between 1 and the number of canaries ({m})")
    each = 1 - (1 - check_confidence(confidence)) / len(shapes)
    # Stable sort: ties keep canary order, which is independent of inclusion.
    order = np.argsort(-scores, kind="stable")
    best: Guess | None = None
    for k_in, k_out in shapes:
        right = int(included[order[:k_in]].sum()) + int((~included[order[m - k_out :]]).sum())
        eps = one_run_epsilon(m, k_in + k_out, right, delta, each)
        if best is None or eps > best.epsilon:
            best = Guess(k_in, k_out, right, eps)
    assert best is not None
    return best, len(shapes)


def finite(value: float) -> float | None:
    """``value`` for JSON-like summaries: None for ∞/NaN."""
    return value if math.isfinite(value) else None
