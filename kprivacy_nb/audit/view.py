"""How audit results look: matplotlib figures (ROC on log–log axes, ε bars) and HTML tables.

Figures are built with :class:`matplotlib.figure.Figure` (no pyplot state), and embedded in the
HTML view as a PNG, so a result renders in any notebook frontend.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from .roc import ROC

__all__ = [
    "NOT_A_GUARANTEE",
    "CONTRADICTION",
    "ABOVE_PROVEN",
    "verdict",
    "roc_figure",
    "table",
    "png_html",
]

NOT_A_GUARANTEE = (
    "An empirical lower bound is evidence about this run, not a guarantee: it is what this attack "
    "could prove at the stated confidence. Only the proven ε bounds every possible attack; a lower "
    "bound far below it does not mean the model is more private than ε says."
)
CONTRADICTION = "the audit contradicts the guarantee — please report a bug"
ABOVE_PROVEN = "⚠ ABOVE THE PROVEN ε"  # (not .upper(): that would make it Ε)


def fmt_eps(eps: float | None) -> str:
    if eps is None:
        return "—"
    return "∞" if math.isinf(eps) else f"{eps:.3g}"


def verdict(lower: float, proven: float | None, confidence: float, *, valid_test: bool) -> str:
    """One line comparing the empirical lower bound with the proven ε. ``valid_test``: the bound
    is a statistically valid test (one_run); otherwise (membership inference on one trained
    model) it is heuristic and the line says so."""
    conf = f"{confidence:.0%} confidence"
    if proven is not None and math.isfinite(proven) and lower > proven + 1e-9:
        if valid_test:
            return (
                f"{CONTRADICTION.upper()}: this run is shown to have ε ≥ {fmt_eps(lower)} at "
                f"{conf}, above the proven ε = {fmt_eps(proven)}. Re-run with the same seed and "
                "settings and report it."
            )
        return (
            f"{ABOVE_PROVEN}: the attack implies ε ≥ {fmt_eps(lower)}, above the proven "
            f"ε = {fmt_eps(proven)}. That is {heuristic(confidence)}. Check that members and "
            "non-members were split at random, then run audit.one_run — if it agrees, report a bug."
        )
    if lower <= 0:
        tail = "" if proven is None else f" (proven ε = {fmt_eps(proven)})"
        return f"This attack proves nothing about this run (ε ≥ 0){tail}: a weak attack is not a private model."
    no_guarantee = proven is None or math.isinf(proven)
    if valid_test and no_guarantee:
        return f"Leak shown: ε ≥ {fmt_eps(lower)} at {conf}, and no DP guarantee covers this model."
    if valid_test:
        return (
            f"Consistent with the guarantee: ε ≥ {fmt_eps(lower)} shown at {conf}, "
            f"proven ε = {fmt_eps(proven)}."
        )
    shown = f"the attack implies ε ≥ {fmt_eps(lower)}, {heuristic(confidence)}"
    if no_guarantee:
        return f"Leak indicated: {shown}; no DP guarantee covers this model."
    return f"Consistent with the guarantee: {shown}; proven ε = {fmt_eps(proven)}."


def heuristic(confidence: float) -> str:
    """What a membership-inference ε bound is (and is not)."""
    return (
        f"a heuristic bound at {confidence:.0%}: it treats the scores of members and non-members "
        "as independent draws, which one trained model does not guarantee (audit.one_run is the "
        "rigorous audit)"
    )


def roc_axes(ax: Any, curve: ROC, label: str) -> None:
    """ROC on log–log axes (low FPR is where membership inference matters)."""
    floor = 0.5 / max(curve.n_out, 1)
    fpr = np.maximum(curve.fpr, floor)
    ax.plot(fpr, np.maximum(curve.tpr, 0.5 / max(curve.n_in, 1)), label=label, lw=1.5)
    grid = np.logspace(math.log10(floor), 0, 50)
    ax.plot(grid, grid, ls="--", color="gray", lw=1, label="chance")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(floor, 1)
    ax.set_ylim(0.5 / max(curve.n_in, 1), 1.05)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(f"ROC (AUC {curve.auc:.3f})")
    ax.legend(loc="lower right", fontsize=8)


def eps_axes(ax: Any, lower: float, proven: float | None, confidence: float) -> None:
    """Bars: empirical lower bound beside the proven ε (∞ drawn as an arrow past the bound)."""
    top = max(lower, proven if proven is not None and math.isfinite(proven) else 0, 1e-3) * 1.3
    ax.barh([1], [lower], color="tab:orange")
    ax.text(lower, 1, f" ≥ {fmt_eps(lower)}", va="center")
    if proven is not None:
        shown = top if math.isinf(proven) else proven
        ax.barh([0], [shown], color="tab:blue", hatch="//" if math.isinf(proven) else None)
        ax.text(shown, 0, f" {fmt_eps(proven)}", va="center")
    ax.set_yticks([0, 1], ["proven ε", f"empirical lower\nbound ({confidence:.0%})"])
    ax.set_xlim(0, top * 1.35)
    ax.set_xlabel("ε")
    ax.set_title("ε: proven vs shown by the audit")


def roc_figure(curve: ROC, label: str, lower: float, proven: float | None, confidence: float):
    """The result figure: log–log ROC and the ε comparison side by side."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 3.4), layout="constrained")
    ax_roc, ax_eps = fig.subplots(1, 2, width_ratios=[1, 1.2])
    roc_axes(ax_roc, curve, label)
    eps_axes(ax_eps, lower, proven, confidence)
    return fig


def png_html(fig: Any) -> str:
    """An <img> of ``fig`` as an inline PNG."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return f"<img src='data:image/png;base64,{data}' alt='audit plot'/>"


def table(rows: Sequence[tuple[str, str]], header: Sequence[str] | None = None) -> str:
    """A small escaped HTML table."""
    head = ""
    if header:
        head = "<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>"
    body = "".join(
        "<tr>"
        + "".join(f"<td style='text-align:left'>{html.escape(c)}</td>" for c in row)
        + "</tr>"
        for row in rows
    )
    return f"<table>{head}{body}</table>"


def card(title: str, verdict_line: str, alarm: bool, parts: Sequence[str]) -> str:
    """The whole result view: title, verdict (red when the guarantee is contradicted), parts,
    and the "not a guarantee" note."""
    style = "color:#b00;font-weight:bold" if alarm else "font-weight:bold"
    return (
        f"<div class='kprivacy-audit'><b>{html.escape(title)}</b>"
        f"<p style='{style}'>{html.escape(verdict_line)}</p>{''.join(parts)}"
        f"<p style='font-size:smaller'><i>{html.escape(NOT_A_GUARANTEE)}</i></p></div>"
    )


def tpr_rows(curve: ROC) -> list[tuple[str, str]]:
    rows = []
    for level, value in curve.tpr_at.items():
        shown = (
            f"n/a (needs ≥ {math.ceil(1 / level)} non-members)" if value is None else f"{value:.3g}"
        )
        rows.append((f"TPR at FPR {level:g}", shown))
    return rows
