"""Membership inference against a trained model: how well can its outputs tell members apart?

>>> report = membership_inference(model, train=(x_train, y_train), holdout=(x_test, y_test))
>>> report.auc, report.auc_interval, report.tpr_at, report.epsilon_lower_bound   # doctest: +SKIP
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from ..errors import InvalidParameterError
from . import alarm, stats, view
from . import scores as sc
from .roc import ROC, roc

__all__ = ["membership_inference", "membership_inference_from_losses", "MIAReport", "SliceReport"]

#: Fewer members or non-members than this and the report says its numbers are rough.
SMALL = 50


@dataclass
class SliceReport:
    """The attack restricted to one class."""

    label: int
    n_in: int
    n_out: int
    auc: float | None
    auc_interval: tuple[float, float] | None


@dataclass
class MIAReport:
    """Result of :func:`membership_inference`."""

    attack: str
    roc: ROC
    epsilon_lower_bound: float
    threshold: float | None  # score ≥ threshold → "member", chosen on the selection half
    tpr: float  # (TPR, FPR) at that threshold on the held-out half
    fpr: float
    confidence: float
    delta: float
    proven_epsilon: float | None = None
    slices: list[SliceReport] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    scores_in: np.ndarray | None = field(default=None, repr=False)
    scores_out: np.ndarray | None = field(default=None, repr=False)
    n_reference: int = 0  # calibrated attack: holdout examples used only to calibrate

    @property
    def auc(self) -> float:
        return self.roc.auc

    @property
    def auc_interval(self) -> tuple[float, float]:
        return self.roc.auc_interval

    @property
    def tpr_at(self) -> dict[float, float | None]:
        return self.roc.tpr_at

    @property
    def exceeds_proven(self) -> bool:
        p = self.proven_epsilon
        return p is not None and math.isfinite(p) and self.epsilon_lower_bound > p + 1e-9

    @property
    def verdict(self) -> str:
        return view.verdict(
            self.epsilon_lower_bound, self.proven_epsilon, self.confidence, valid_test=False
        )

    def summary(self) -> dict[str, Any]:
        """Plain numbers (what a privacy card or an export would carry)."""
        return {
            "kind": "membership_inference", "attack": self.attack, "auc": self.auc,
            "auc_interval": list(self.auc_interval),
            "tpr_at_fpr": {f"{k:g}": v for k, v in self.tpr_at.items()},
            "epsilon_lower_bound": stats.finite(self.epsilon_lower_bound),
            "confidence": self.confidence, "delta": self.delta,
            "proven_epsilon": None if self.proven_epsilon is None else stats.finite(self.proven_epsilon),
            "n_in": self.roc.n_in, "n_out": self.roc.n_out, "n_reference": self.n_reference,
            "exceeds_proven": self.exceeds_proven, "verdict": self.verdict,
        }  # fmt: skip

    def plot(self) -> Any:
        """Log–log ROC and ε comparison (a matplotlib Figure)."""
        return view.roc_figure(
            self.roc, f"{self.attack} attack", self.epsilon_lower_bound, self.proven_epsilon,
            self.confidence,
        )  # fmt: skip

    def __repr__(self) -> str:
        lo, hi = self.auc_interval
        alarm_text = (
            f", {view.ABOVE_PROVEN}: check the split, then run audit.one_run"
            if self.exceeds_proven
            else ""
        )
        return (
            f"MIAReport(attack={self.attack}, AUC={self.auc:.3f} [{lo:.3f}, {hi:.3f}], "
            f"ε ≥ {view.fmt_eps(self.epsilon_lower_bound)} (heuristic, {self.confidence:.0%}), "
            f"proven ε={view.fmt_eps(self.proven_epsilon)}, n_in={self.roc.n_in}, "
            f"n_out={self.roc.n_out}{alarm_text})"
        )

    def _repr_html_(self) -> str:
        lo, hi = self.auc_interval
        rows = [
            ("attack", self.attack),
            ("members / non-members scored", f"{self.roc.n_in} / {self.roc.n_out}"
             + (f" (+ {self.n_reference} holdout examples that only calibrate)"
                if self.n_reference else "")),
            ("ROC AUC", f"{self.auc:.3f} ({self.confidence:.0%} CI {lo:.3f}–{hi:.3f}, DeLong "
             "widened to the score interval)"),
            *view.tpr_rows(self.roc),
            ("ε lower bound (heuristic, implied by TPR/FPR)",
             f"{view.fmt_eps(self.epsilon_lower_bound)} at δ={self.delta:g}, "
             f"{self.confidence:.0%} (TPR {self.tpr:.3g}, FPR {self.fpr:.3g})"),
            ("proven ε", view.fmt_eps(self.proven_epsilon)),
        ]  # fmt: skip
        parts = [view.table(rows)]
        if self.slices:
            parts.append("<p><b>By class</b></p>")
            parts.append(
                view.table(
                    [
                        (
                            str(s.label),
                            str(s.n_in),
                            str(s.n_out),
                            "—" if s.auc is None else f"{s.auc:.3f}",
                            "—"
                            if s.auc_interval is None
                            else f"{s.auc_interval[0]:.3f}–{s.auc_interval[1]:.3f}",
                        )
                        for s in self.slices
                    ],  # fmt: skip
                    header=("class", "members", "non-members", "AUC", "CI"),
                )
            )
        parts.extend(f"<p>{view.html.escape(n)}</p>" for n in self.notes)
        parts.append(view.png_html(self.plot()))
        return view.card("Membership inference", self.verdict, self.exceeds_proven, parts)


def _threshold_bound(
    s_in: np.ndarray, s_out: np.ndarray, delta: float, confidence: float, rng: np.random.Generator
) -> tuple[float, float | None, float, float]:
    """ε lower bound with an honestly chosen threshold: pick it on a random half of members and
    non-members, measure (TPR, FPR) with Clopper–Pearson on the other half. Choosing and measuring
    on the same scores would overstate the bound."""
    pick_in, test_in = _halves(s_in, rng)
    pick_out, test_out = _halves(s_out, rng)
    if min(len(pick_in), len(test_in), len(pick_out), len(test_out)) == 0:
        return 0.0, None, 0.0, 0.0
    curve = roc(pick_in, pick_out)
    eps = stats.epsilon_from_counts(
        curve.tp, curve.n_in, curve.fp, curve.n_out, delta=delta, confidence=confidence
    )
    threshold = float(curve.thresholds[int(np.argmax(eps))])
    tp, fp = int((test_in >= threshold).sum()), int((test_out >= threshold).sum())
    bound = stats.epsilon_from_counts(
        tp, len(test_in), fp, len(test_out), delta=delta, confidence=confidence
    )
    return float(bound), threshold, tp / len(test_in), fp / len(test_out)


def _halves(values: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    perm = rng.permutation(len(values))
    return values[perm[: len(values) // 2]], values[perm[len(values) // 2 :]]


def _slices(labels_in: np.ndarray, labels_out: np.ndarray, s_in, s_out, confidence):
    out = []
    for label in np.union1d(labels_in, labels_out):
        a, b = s_in[labels_in == label], s_out[labels_out == label]
        curve = roc(a, b, confidence) if len(a) > 0 and len(b) > 0 else None
        out.append(
            SliceReport(
                label=int(label),
                n_in=len(a),
                n_out=len(b),
                auc=None if curve is None else curve.auc,
                auc_interval=None if curve is None else curve.auc_interval,
            )
        )
    return out


def _audited(model: Any, run: Any) -> tuple[Any, Any]:
    """The Keras model to attack and the run whose proven ε it is compared with."""
    if run is None and hasattr(model, "epsilon") and hasattr(model, "model"):
        model, run = model.model, model  # a DPFitResult: audit its model against its ε
    if run is None and hasattr(getattr(model, "privacy", None), "attach_audit"):
        run = model.privacy  # a model trained with make_private: its card
    if not callable(model) or not hasattr(model, "predict"):
        raise InvalidParameterError(
            f"model must be a compiled Keras model (or a dp_fit result); got {type(model).__name__}"
        )
    return model, run


def _proven(epsilon: Any, delta: Any, run: Any) -> tuple[float | None, float, bool]:
    """``(proven ε or None, δ of the bound, attach to the run's card?)``."""
    attach = run is not None and epsilon is None and delta is None
    if run is not None:
        epsilon = run.epsilon if epsilon is None else epsilon
        delta = run.delta if delta is None else delta
    if epsilon is not None:
        try:
            epsilon = float(epsilon)
        except (TypeError, ValueError):
            epsilon = math.nan
        if math.isnan(epsilon) or epsilon < 0:
            raise InvalidParameterError(
                f"epsilon (the proven ε to compare with) must be a number ≥ 0; got {epsilon!r}"
            )
        if delta is None:
            raise InvalidParameterError(
                f"epsilon={epsilon:g} needs the δ of that guarantee: pass delta too (the bound is "
                "computed at that δ), or run= to take both from the run"
            )
    return epsilon, stats.check_delta(0.0 if delta is None else delta), attach


def _check_batch_size(batch_size: Any) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)):
        raise InvalidParameterError(f"batch_size must be an integer ≥ 1, got {batch_size!r}")
    if batch_size < 1:
        raise InvalidParameterError(f"batch_size must be an integer ≥ 1, got {batch_size!r}")
    return int(batch_size)


def membership_inference(
    model: Any,
    train: tuple[Any, Any],
    holdout: tuple[Any, Any],
    *,
    attack: str = "loss",
    confidence: float = 0.95,
    delta: float | None = None,
    epsilon: float | None = None,
    run: Any = None,
    loss: Any = None,
    seed: int | None = 0,
    batch_size: int = 1024,
) -> MIAReport:
    """Attack ``model`` with its members ``train=(x, y)`` against non-members ``holdout=(x, y)``.

    ``attack``: ``"loss"`` (threshold on the per-example loss) or ``"calibrated"`` (logit-scaled
    confidence standardised per class against a random half of the holdout, which is then not
    scored: members and the other half go through the same map). The report holds the ROC AUC
    with a confidence interval, TPR at FPR 10⁻³/10⁻²/10⁻¹, the log–log ROC (``.plot()``), a slice
    per class, and the ε lower bound implied by the best (TPR, FPR) pair with Clopper–Pearson
    confidence (threshold picked on half the scores, measured on the other half). That ε is a
    heuristic bound: it treats the scores as independent draws, which one trained model does not
    guarantee, and it needs members and non-members split at random;
    :func:`kprivacy_nb.audit.one_run` is the rigorous audit. ``run`` (a ``DPFitResult``, which may
    also be passed as ``model``; a model trained with ``make_private`` brings its
    ``model.privacy``) or ``epsilon`` with ``delta`` give the proven ε to compare with; a bound
    above it is flagged in the report and warned about (:class:`EpsilonExceededWarning`).
    Compared with a run's own ε and δ, the report is attached to the run's card
    (:meth:`~kprivacy_nb.dp.trainer.DPFitResult.attach_audit`), so saved files carry it.

    >>> membership_inference(model, (x_train, y_train), (x_test, y_test))   # doctest: +SKIP
    MIAReport(attack=loss, AUC=0.731 [0.702, 0.760], ε ≥ 0.912 (heuristic, 95%), ...)
    """
    _check_attack(attack)
    confidence = stats.check_confidence(confidence)
    batch_size = _check_batch_size(batch_size)
    model, run = _audited(model, run)
    epsilon, delta, attach = _proven(epsilon, delta, run)
    x_in, y_in = sc.pair(train, "train", sc.model_inputs(model))
    x_out, y_out = sc.pair(holdout, "holdout", sc.model_inputs(model))
    loss = loss if loss is not None else getattr(model, "loss", None)
    sc.check_fits(model, x_in, y_in, loss, "train")
    sc.check_fits(model, x_out, y_out, loss, "holdout")
    members = sc.model_outputs(model, x_in, y_in, loss=loss, batch_size=batch_size)
    nonmembers = sc.model_outputs(model, x_out, y_out, loss=loss, batch_size=batch_size)
    if members.margins is None or nonmembers.margins is None:  # score both sets alike
        members, nonmembers = (replace(o, margins=None) for o in (members, nonmembers))
    report = _attack(members, nonmembers, attack, confidence, delta, epsilon, seed)
    if attach and hasattr(run, "attach_audit"):
        run.attach_audit(report)  # compared with the run's own ε and δ: its card carries it
    return _warn_if_above(report)


def membership_inference_from_losses(
    losses_in: Any,
    losses_out: Any,
    *,
    labels_in: Any = None,
    labels_out: Any = None,
    attack: str = "loss",
    crossentropy: bool = True,
    confidence: float = 0.95,
    delta: float | None = None,
    epsilon: float | None = None,
    seed: int | None = 0,
) -> MIAReport:
    """:func:`membership_inference` on per-example losses computed elsewhere: ``losses_in`` of
    the members, ``losses_out`` of the non-members, their class labels (needed by
    ``attack="calibrated"`` and for the slices), ``crossentropy``: the losses are −log p of the
    true class (the calibrated attack then scores log(p/(1−p))).

    >>> membership_inference_from_losses(member_losses, holdout_losses)   # doctest: +SKIP
    MIAReport(attack=loss, AUC=0.512 [0.469, 0.555], ε ≥ 0 (heuristic, 95%), ...)
    """
    _check_attack(attack)
    confidence = stats.check_confidence(confidence)
    epsilon, delta, _ = _proven(epsilon, delta, None)
    sets = []
    for what, losses, labels in (("losses_in", losses_in, labels_in),
                                 ("losses_out", losses_out, labels_out)):  # fmt: skip
        losses = np.asarray(losses, dtype=np.float64).reshape(-1)
        if len(losses) == 0:
            raise InvalidParameterError(f"{what} is empty")
        if labels is not None:
            labels = sc.class_labels(labels)
            if labels is None or len(labels) != len(losses):
                raise InvalidParameterError(
                    f"the labels of {what} must be one class (integer or one-hot) per loss"
                )
        sets.append(sc.Outputs(losses, labels, None, bool(crossentropy)))
    return _warn_if_above(_attack(*sets, attack, confidence, delta, epsilon, seed))


def _warn_if_above(report: MIAReport) -> MIAReport:
    if report.exceeds_proven:
        alarm.warn(report.verdict, stacklevel=4)  # at the caller of membership_inference…
    return report


def _check_attack(attack: str) -> None:
    if attack not in sc.ATTACKS:
        raise InvalidParameterError(
            f"attack must be one of {', '.join(sc.ATTACKS)}; got {attack!r}"
        )


def _attack(
    members: sc.Outputs,
    nonmembers: sc.Outputs,
    attack: str,
    confidence: float,
    delta: float,
    epsilon: float | None,
    seed: int | None,
) -> MIAReport:
    """The attack and its statistics, on the model's outputs."""
    for name, outputs in (("train", members), ("holdout", nonmembers)):
        bad = int((~np.isfinite(outputs.losses)).sum())
        if bad:
            raise InvalidParameterError(
                f"the model's loss is not finite on {bad} {name} examples: check the data and "
                "the model (a diverged model can't be audited)"
            )
    rng = np.random.default_rng(seed)
    n_reference = 0
    if attack == "calibrated":
        s_in, s_out, scored = sc.calibrated_scores(members, nonmembers, rng)
        n_reference = len(nonmembers) - len(scored)
        nonmembers = nonmembers.take(scored)
    else:
        s_in, s_out = sc.loss_scores(members), sc.loss_scores(nonmembers)

    curve = roc(s_in, s_out, confidence)
    bound, threshold, tpr, fpr = _threshold_bound(s_in, s_out, delta, confidence, rng)
    notes = []
    if n_reference:
        notes.append(
            f"Calibrated attack: {n_reference} holdout examples, drawn at random, only calibrate "
            "(their per-class mean and spread set one map from confidence to score, applied "
            f"alike to members and non-members); the other {len(s_out)} are scored."
        )
    if min(len(s_in), len(s_out)) < SMALL:
        notes.append(
            f"Only {len(s_in)} members and {len(s_out)} non-members scored: the AUC interval is "
            f"approximate and wide, and the ε bound weak; use ≥ {SMALL} of each (a few thousand "
            "for TPR at FPR 10⁻³)."
        )
    labels_in, labels_out = members.labels, nonmembers.labels
    slices = []
    if labels_in is not None and labels_out is not None:
        slices = _slices(labels_in, labels_out, s_in, s_out, confidence)
    return MIAReport(
        attack=attack, roc=curve, epsilon_lower_bound=bound, threshold=threshold, tpr=tpr,
        fpr=fpr, confidence=confidence, delta=delta, proven_epsilon=epsilon, slices=slices,
        notes=notes, scores_in=s_in, scores_out=s_out, n_reference=n_reference,
    )  # fmt: skip
