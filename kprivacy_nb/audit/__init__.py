"""Empirical privacy audits: evidence about a trained model next to its proven ε.

* :func:`membership_inference` — loss / calibrated-score attacks on members vs a holdout: ROC AUC
  with a confidence interval, TPR at low FPR, a log–log ROC, slices by class, and the ε implied
  by the best (TPR, FPR) pair with Clopper–Pearson confidence — a heuristic bound (one trained
  model; scores treated as independent). :func:`membership_inference_from_losses` does the same
  on losses computed elsewhere.
* :func:`one_run` — the one-training-run canary audit of Steinke, Nasr & Jagielski (2023): a
  statistically valid ε lower bound at 95% confidence, which must stay ≤ the proven ε; if it
  doesn't, the result says "the audit contradicts the guarantee".

A bound above the proven ε is shown in the result (view and repr) and warned about with
:class:`EpsilonExceededWarning`.

A lower bound is not a guarantee: only the proven ε bounds every attack.
"""

from __future__ import annotations

from .alarm import EpsilonExceededWarning
from .mia import MIAReport, membership_inference, membership_inference_from_losses
from .one_run import OneRunAudit, one_run
from .roc import ROC, auc, auc_interval, delong_interval, roc, score_interval
from .stats import (
    clopper_pearson,
    epsilon_from_counts,
    epsilon_from_rates,
    one_run_epsilon,
    one_run_p_value,
)

__all__ = [
    "EpsilonExceededWarning",
    "MIAReport",
    "OneRunAudit",
    "ROC",
    "auc",
    "auc_interval",
    "clopper_pearson",
    "delong_interval",
    "epsilon_from_counts",
    "epsilon_from_rates",
    "membership_inference",
    "membership_inference_from_losses",
    "one_run",
    "one_run_epsilon",
    "one_run_p_value",
    "roc",
    "score_interval",
]
