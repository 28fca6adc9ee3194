"""ROC of a membership score: the curve, its AUC with a DeLong interval, TPR at fixed FPR.

Convention everywhere: a higher score means "more likely a member"; members are the positives.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy import stats

from ..errors import InvalidParameterError

__all__ = ["ROC", "roc", "auc", "delong_interval", "FPR_LEVELS"]

#: The false positive rates the literature reports TPR at (Carlini et al. 2022).
FPR_LEVELS = (1e-3, 1e-2, 1e-1)


def _scores(s_in: np.ndarray, s_out: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    s_in, s_out = np.asarray(s_in, dtype=float).ravel(), np.asarray(s_out, dtype=float).ravel()
    if len(s_in) == 0 or len(s_out) == 0:
        raise InvalidParameterError("an ROC needs at least one member and one non-member score")
    if np.isnan(s_in).any() or np.isnan(s_out).any():
        raise InvalidParameterError("scores contain NaN: the model's loss is not finite")
    return s_in, s_out


def auc(s_in: np.ndarray, s_out: np.ndarray) -> float:
    """P[member score > non-member score] + ½·P[tie] (the Mann–Whitney statistic)."""
    s_in, s_out = _scores(s_in, s_out)
    ranks = stats.rankdata(np.concatenate([s_in, s_out]))  # midranks: ties count ½
    n1, n0 = len(s_in), len(s_out)
    return float((ranks[:n1].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def delong_interval(
    s_in: np.ndarray, s_out: np.ndarray, confidence: float = 0.95
) -> tuple[float, float]:
    """DeLong et al. (1988) confidence interval of the AUC (normal approximation with the
    structural-components variance), clipped to [0, 1]. Needs ≥ 2 scores on each side."""
    s_in, s_out = _scores(s_in, s_out)
    n1, n0 = len(s_in), len(s_out)
    if n1 < 2 or n0 < 2:
        return (0.0, 1.0)
    both = stats.rankdata(np.concatenate([s_in, s_out]))
    v10 = (both[:n1] - stats.rankdata(s_in)) / n0  # share of non-members below each member
    v01 = 1 - (both[n1:] - stats.rankdata(s_out)) / n1  # share of members above each non-member
    a = float(v10.mean())
    se = math.sqrt(v10.var(ddof=1) / n1 + v01.var(ddof=1) / n0)
    z = float(stats.norm.ppf(0.5 + confidence / 2))
    return (max(0.0, a - z * se), min(1.0, a + z * se))


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
    curve = ROC(
        fpr=fp / len(s_out), tpr=tp / len(s_in), thresholds=thresholds, tp=tp, fp=fp,
        n_in=len(s_in), n_out=len(s_out), auc=auc(s_in, s_out),
        auc_interval=delong_interval(s_in, s_out, confidence),
    )  # fmt: skip
    curve.tpr_at = {level: curve.tpr_at_fpr(level) for level in FPR_LEVELS}
    return curve
