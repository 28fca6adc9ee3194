"""ROC of a membership score: the curve, its AUC with a confidence interval, TPR at fixed FPR.

Convention everywhere: a higher score means "more likely a member"; members are the positives.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy import optimize, special, stats

from ..errors import InvalidParameterError

__all__ = ["ROC", "roc", "auc", "auc_interval", "delong_interval", "score_interval", "FPR_LEVELS"]

#: The false positive rates the literature reports TPR at (Carlini et al. 2022).
FPR_LEVELS = (1e-3, 1e-2, 1e-1)


def _scores(s_in: np.ndarray, s_out: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    s_in, s_out = np.asarray(s_in, dtype=float).ravel(), np.asarray(s_out, dtype=float).ravel()
    if len(s_in) == 0 or len(s_out) == 0:
        raise InvalidParameterError("an ROC needs at least one member and one non-member score")
    if np.isnan(s_in).any() or np.isnan(s_out).any():
        raise InvalidParameterError("scores contain NaN: the model's loss is not finite")
    return s_in, s_out


def _components(s_in: np.ndarray, s_out: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """DeLong's structural components: for each member the share of non-members below it, for
    each non-member the share of members above it (ties count ½). Their means are the AUC."""
    n1, n0 = len(s_in), len(s_out)
    if n1 * n0 <= 250_000:  # small sets (slices): comparing all pairs beats ranking
        psi = (s_in[:, None] > s_out[None]) + 0.5 * (s_in[:, None] == s_out[None])
        return psi.mean(1), psi.mean(0)
    both = stats.rankdata(np.concatenate([s_in, s_out]))  # midranks: ties count ½
    v10 = (both[:n1] - stats.rankdata(s_in)) / n0
    v01 = 1 - (both[n1:] - stats.rankdata(s_out)) / n1
    return v10, v01


def _z(confidence: float) -> float:
    return float(special.ndtri(0.5 + confidence / 2))


def auc(s_in: np.ndarray, s_out: np.ndarray) -> float:
    """P[member score > non-member score] + ½·P[tie] (the Mann–Whitney statistic)."""
    s_in, s_out = _scores(s_in, s_out)
    return float(_components(s_in, s_out)[0].mean())


def delong_interval(
    s_in: np.ndarray, s_out: np.ndarray, confidence: float = 0.95
) -> tuple[float, float]:
    """DeLong et al. (1988) confidence interval of the AUC (normal approximation with the
    structural-components variance), clipped to [0, 1]. Needs ≥ 2 scores on each side."""
    s_in, s_out = _scores(s_in, s_out)
    return _delong(*_components(s_in, s_out), confidence)


def _delong(v10: np.ndarray, v01: np.ndarray, confidence: float) -> tuple[float, float]:
    n1, n0 = len(v10), len(v01)
    if n1 < 2 or n0 < 2:
        return (0.0, 1.0)
    a = float(v10.mean())
    se = math.sqrt(v10.var(ddof=1) / n1 + v01.var(ddof=1) / n0)
    z = _z(confidence)
    return (max(0.0, a - z * se), min(1.0, a + z * se))


def score_interval(
    a: float, n_in: int, n_out: int, confidence: float = 0.95
) -> tuple[float, float]:
    """Score-type (Wilson-like) interval of an AUC ``a`` from ``n_in`` members and ``n_out``
    non-members (Newcombe 2006): the θ with ``(a − θ)² ≤ z²·V(θ)``, where V is the Hanley–McNeil
    variance of an AUC θ with N = (n_in + n_out)/2 on each side. Unlike a Wald interval it keeps a
    width at a = 0 or 1 and stays inside [0, 1]."""
    z = _z(confidence)
    if n_in < 1 or n_out < 1:
        return (0.0, 1.0)
    half = (n_in + n_out) / 2

    def excess(t: float) -> float:  # > 0 outside the interval
        v = t * (1 - t) / (n_in * n_out)
        v *= 1 + (half - 1) * ((1 - t) / (2 - t) + t / (1 + t))
        return (a - t) ** 2 - z * z * v

    lo = optimize.brentq(excess, 0.0, min(a, 1 - 1e-12)) if a > 0 and excess(0.0) > 0 else 0.0
    hi = optimize.brentq(excess, max(a, 1e-12), 1.0) if a < 1 and excess(1.0) > 0 else 1.0
    return (float(lo), float(hi))


def auc_interval(
    s_in: np.ndarray, s_out: np.ndarray, confidence: float = 0.95
) -> tuple[float, float]:
    """The AUC interval the reports show: DeLong's, widened to the score interval where that is
    wider. DeLong's normal approximation covers too rarely with a few scores a side and shrinks to
    a point at perfect separation; the score interval does neither (both are approximations:
    below ~50 scores a side the reports say so)."""
    s_in, s_out = _scores(s_in, s_out)
    return _interval(*_components(s_in, s_out), confidence)


def _interval(v10: np.ndarray, v01: np.ndarray, confidence: float) -> tuple[float, float]:
    d_lo, d_hi = _delong(v10, v01, confidence)
    w_lo, w_hi = score_interval(float(v10.mean()), len(v10), len(v01), confidence)
    return (min(d_lo, w_lo), max(d_hi, w_hi))


@dataclass
class ROC:
    """Points (FPR, TPR) at every distinct threshold, from (0, 0) to (1, 1), with the counts."""

    fpr: np.ndarray
    tpr: np.ndarray
    thresholds: np.ndarray  # flag "member" when score ≥ threshold; the first is +∞
    tp: np.ndarray
    fp: np.ndarray
    n_in: int
    n_out: int
    auc: float
    auc_interval: tuple[float, float]
    tpr_at: dict[float, float | None] = field(default_factory=dict)

    def tpr_at_fpr(self, level: float) -> float | None:
        """Best TPR with FPR ≤ ``level``; None when there are fewer than 1/level non-members
        (an FPR that small can't be measured)."""
        if self.n_out * level < 1 - 1e-9:
            return None
        return float(self.tpr[self.fpr <= level + 1e-12].max())


def roc(s_in: np.ndarray, s_out: np.ndarray, confidence: float = 0.95) -> ROC:
    """The ROC of ``s_in`` (members) against ``s_out`` (non-members)."""
    s_in, s_out = _scores(s_in, s_out)
    thresholds = np.unique(np.concatenate([s_in, s_out]))[::-1]
    tp = len(s_in) - np.searchsorted(np.sort(s_in), thresholds, side="left")
    fp = len(s_out) - np.searchsorted(np.sort(s_out), thresholds, side="left")
    tp, fp = np.concatenate([[0], tp]), np.concatenate([[0], fp])
    thresholds = np.concatenate([[np.inf], thresholds])
    v10, v01 = _components(s_in, s_out)
    curve = ROC(
        fpr=fp / len(s_out), tpr=tp / len(s_in), thresholds=thresholds, tp=tp, fp=fp,
        n_in=len(s_in), n_out=len(s_out), auc=float(v10.mean()),
        auc_interval=_interval(v10, v01, confidence),
    )  # fmt: skip
    curve.tpr_at = {level: curve.tpr_at_fpr(level) for level in FPR_LEVELS}
    return curve
