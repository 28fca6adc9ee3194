"""The privacy-budget planner: ε vs epoch for DP-SGD settings, live, with the ledger's remaining.

>>> planner = BudgetPlanner(n=60000, batch_size=256, epochs=15)  # doctest: +SKIP
>>> planner             # in Jupyter: sliders, the ε curve, the calibrated σ and a %dp_fit line
>>> planner.epsilon     # the same numbers, without a browser
1.13...

Every number comes from :mod:`kprivacy_nb.dp.accounting`. Under PLD the curve (and, when σ is
given, the headline ε) uses a coarser grid (:data:`PLANNER_PLD_DISCRETIZATION`) so a redraw
stays under a second: a coarser PLD grid is a pessimistic upper bound, never an underestimate
(≈0.3% above ``compute_epsilon``). In target-ε mode the headline ε is ``compute_epsilon``'s own,
so it can be compared with the target; :meth:`BudgetPlanner.exact_epsilon` gives it in σ mode.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import ipywidgets as widgets
from matplotlib.figure import Figure

from ..dp import accounting
from ..errors import InvalidParameterError, KPrivacyError
from ._common import Debouncer, figure_png

#: PLD grid used for the planner's curve (pessimistic; ~0.3% above the 1e-4 grid at ε≈1).
PLANNER_PLD_DISCRETIZATION = 1e-3
NO_LEDGER = "(none)"


def _ceil_sig(x: float, digits: int = 4) -> float:
    """Round ``x`` up to ``digits`` significant digits (a rounded σ must not lower the noise)."""
    if x <= 0 or not math.isfinite(x):
        return x
    scale = 10 ** (digits - 1 - math.floor(math.log10(x)))
    return math.ceil(x * scale - 1e-9) / scale


class BudgetPlanner:
    """Plan a DP-SGD run: n, batch size, epochs, σ *or* target ε, δ, accountant, sampling, ledger.

    State after each :meth:`refresh` (automatic on every change, debounced in Jupyter):
    ``curve`` (an :class:`~kprivacy_nb.dp.accounting.EpsilonCurve`), ``epsilon`` (final, exact),
    ``noise_multiplier`` (given or calibrated), ``steps``, ``delta``, ``remaining_epsilon``
    (ledger), ``error`` (message or None) and ``fit_line`` (the matching ``%dp_fit`` line).
    """

    def __init__(
        self,
        n: int = 60000,
        batch_size: int = 256,
        epochs: int = 15,
        noise_multiplier: float | None = 1.1,
        *,
        target_epsilon: float | None = None,
        delta: float | None = None,
        accountant: str = "pld",
        sampling: str = "poisson",
        ledger: str | None = None,
        ledger_obj: Any = None,
        debounce: float = 0.3,
        model: str = "model",
        x: str = "x",
        y: str = "y",
    ) -> None:
        accounting.validate(
            n, batch_size, epochs=epochs, delta=delta, sampling=sampling, accountant=accountant
        )
        if target_epsilon is not None and not 0 < target_epsilon < float("inf"):
            # the same refusal as dp_fit's, not a silent clamp to the slider's minimum
            raise InvalidParameterError(f"target_epsilon must be > 0, got {target_epsilon}")
        self._ledger_obj = ledger_obj
        self._fit_names = (model, x, y)
        self._delta_auto = delta is None
        self.curve: accounting.EpsilonCurve | None = None
        self.epsilon: float | None = None
        self.noise_multiplier: float | None = None
        self.steps: int | None = None
        self.delta: float | None = None
        self.remaining_epsilon: float | None = None
        self.error: str | None = None
        self.fit_line: str = ""
        self.redraws = 0

        style = {"description_width": "130px"}
        self.n_input = widgets.BoundedIntText(
            value=n, min=1, max=10**10, description="examples n", style=style
        )
        self.batch_input = widgets.BoundedIntText(
            value=batch_size, min=1, max=10**10, description="batch size", style=style
        )
        self.epochs_slider = widgets.IntSlider(
            value=epochs, min=1, max=max(100, epochs), description="epochs",
            continuous_update=False, style=style,
        )  # fmt: skip
        self.mode = widgets.ToggleButtons(
            options=[("noise σ", "sigma"), ("target ε", "target")],
            value="target" if target_epsilon is not None else "sigma",
            description="choose",
            style=style,
        )
        self.sigma_slider = widgets.FloatSlider(
            value=noise_multiplier if noise_multiplier is not None else 1.1,
            min=0.1, max=max(10.0, noise_multiplier or 0), step=0.01, description="noise σ",
            continuous_update=False, readout_format=".3f", style=style,
        )  # fmt: skip
        self.target_input = widgets.BoundedFloatText(
            value=target_epsilon if target_epsilon is not None else 3.0,
            min=1e-3, max=max(1e4, target_epsilon or 0), step=0.1, description="target ε", style=style,
        )  # fmt: skip
        self.delta_input = widgets.BoundedFloatText(
            value=delta if delta is not None else accounting.default_delta(n),
            min=0.0, max=1.0, step=1e-6, description="δ", style=style,
        )  # fmt: skip
        self.accountant_dd = widgets.Dropdown(
            options=list(accounting.ACCOUNTANTS), value=accountant.lower(),
            description="accountant", style=style,
        )  # fmt: skip
        self.sampling_dd = widgets.Dropdown(
            options=list(accounting.SAMPLINGS), value=sampling.lower(),
            description="sampling", style=style,
        )  # fmt: skip
        self.ledger_dd = widgets.Dropdown(
            options=self._ledger_options(ledger), value=ledger or NO_LEDGER,
            description="ledger budget", style=style,
        )  # fmt: skip
        self.summary = widgets.HTML()
        self.image = widgets.Image(format="png", layout=widgets.Layout(max_width="640px"))
        self.copy_button = widgets.Button(
            description="copy %dp_fit line", icon="clipboard", tooltip="put the line below"
        )
        self.fit_output = widgets.Textarea(
            value="", layout=widgets.Layout(width="100%", height="3em"), disabled=False
        )
        self.copy_button.on_click(self._on_copy)

        self._debouncer = Debouncer(self.refresh, debounce)
        for w in self._inputs():
            w.observe(self._on_change, names="value")
        self.delta_input.observe(self._on_delta_typed, names="value")
        self.n_input.observe(self._on_n_changed, names="value")
        self.mode.observe(self._on_mode, names="value")
        self._on_mode()

        self.figure = Figure(figsize=(6.0, 3.2), dpi=72)
        self.ax = self.figure.add_subplot(1, 1, 1)
        (self.line,) = self.ax.plot([], [], marker=".", label="ε after epoch")
        self.budget_line = self.ax.axhline(0, color="tab:red", ls="--", label="remaining budget")
        self.budget_line.set_visible(False)

        controls = widgets.VBox(
            [
                self.n_input, self.batch_input, self.epochs_slider, self.mode,
                self.sigma_slider, self.target_input, self.delta_input, self.accountant_dd,
                self.sampling_dd, self.ledger_dd,
            ]
        )  # fmt: skip
        self.widget = widgets.VBox(
            [
                widgets.HBox([controls, self.image]),
                self.summary,
                widgets.HBox([self.copy_button]),
                self.fit_output,
            ]
        )
        self.refresh()

    # ------------------------------------------------------------------ plumbing
    def _inputs(self) -> list[widgets.Widget]:
        return [
            self.n_input, self.batch_input, self.epochs_slider, self.mode, self.sigma_slider,
            self.target_input, self.delta_input, self.accountant_dd, self.sampling_dd,
            self.ledger_dd,
        ]  # fmt: skip

    def _ledger(self) -> Any:
        if self._ledger_obj is None:
            from ..dp.ledger import Ledger

            self._ledger_obj = Ledger()
        return self._ledger_obj

    def _ledger_options(self, wanted: str | None) -> list[str]:
        names: list[str] = []
        try:
            if wanted is not None or self._ledger_obj is not None:
                names = self._ledger().names()
            else:
                from ..dp.ledger import LEDGER_FILENAME
                from ..paths import home_dir

                if (home_dir(create=False) / LEDGER_FILENAME).exists():
                    names = self._ledger().names()
        except KPrivacyError:
            names = []
        if wanted is not None and wanted not in names:
            from ..errors import LedgerError

            raise LedgerError(
                f"no budget named {wanted!r} in the ledger; create it with "
                f"%dp_ledger create {wanted} --epsilon 8 --delta 1e-5"
            )
        return [NO_LEDGER, *names]

    def _on_change(self, _change: Any = None) -> None:
        self._debouncer.trigger()

    def _on_delta_typed(self, change: Any) -> None:
        if not getattr(self, "_setting_delta", False):
            self._delta_auto = False

    def _on_n_changed(self, change: Any) -> None:
        if self._delta_auto:
            self._setting_delta = True
            try:
                self.delta_input.value = accounting.default_delta(max(1, int(change["new"])))
            finally:
                self._setting_delta = False

    def _on_mode(self, _change: Any = None) -> None:
        target = self.mode.value == "target"
        self.target_input.layout.display = None if target else "none"
        self.sigma_slider.disabled = target

    def _on_copy(self, _button: Any = None) -> None:
        self.refresh()
        self.fit_output.value = self.fit_line

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.widget)

    def __repr__(self) -> str:
        eps = "?" if self.epsilon is None else f"{self.epsilon:.4g}"
        return (
            f"BudgetPlanner(n={self.n_input.value}, batch_size={self.batch_input.value}, "
            f"epochs={self.epochs_slider.value}, σ={self.noise_multiplier}, ε={eps})"
        )

    # ------------------------------------------------------------------ computing
    def settings(self) -> dict[str, Any]:
        """The current inputs as keyword arguments of the accounting functions."""
        return {
            "n": int(self.n_input.value),
            "batch_size": int(self.batch_input.value),
            "epochs": int(self.epochs_slider.value),
            "delta": float(self.delta_input.value),
            "sampling": self.sampling_dd.value,
            "accountant": self.accountant_dd.value,
        }

    def refresh(self) -> None:
        """Recompute everything from the current inputs and redraw (also called on changes)."""
        self.redraws += 1
        s = self.settings()
        try:
            self._compute(s)
            self.error = None
        except KPrivacyError as exc:
            self.error = str(exc)
            self.curve = None
            self.epsilon = None
            self.fit_line = ""
        self._draw()
        self._summarise()

    def _compute(self, s: dict[str, Any]) -> None:
        self.delta_source = "given"
        if self._delta_auto:
            # Not typed: the ledger budget's δ when one is chosen (the ε it charges is at that
            # δ), else the default; either way the summary says so.
            self.delta_source = "defaulted (largest power of ten ≤ 1/(10·n))"
            if self.ledger_dd.value != NO_LEDGER:
                budget_delta = self._ledger().budget(self.ledger_dd.value).delta
                if budget_delta != s["delta"]:
                    self._setting_delta = True
                    try:
                        self.delta_input.value = budget_delta
                    finally:
                        self._setting_delta = False
                s["delta"] = budget_delta
                self.delta_source = f"the ledger budget {self.ledger_dd.value!r}"
        delta = accounting.validate(
            s["n"], s["batch_size"], epochs=s["epochs"], delta=s["delta"],
            sampling=s["sampling"], accountant=s["accountant"],
        )  # fmt: skip
        if self.mode.value == "target":
            sigma = accounting.calibrate_noise(
                float(self.target_input.value), s["n"], s["batch_size"], s["epochs"], delta,
                sampling=s["sampling"], accountant=s["accountant"],
            )  # fmt: skip
            sigma = _ceil_sig(sigma)  # shown rounded up, so its ε is still ≤ target
        else:
            sigma = float(self.sigma_slider.value)
        interval = PLANNER_PLD_DISCRETIZATION if s["accountant"] == "pld" else None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            self.curve = accounting.epsilon_curve(
                s["n"], s["batch_size"], s["epochs"], sigma, delta, sampling=s["sampling"],
                accountant=s["accountant"], value_discretization_interval=interval,
            )  # fmt: skip
            if self.mode.value == "target":
                # Exact (same grid as compute_epsilon), so it can be compared with the target.
                self.epsilon = accounting.compute_epsilon(
                    s["n"], s["batch_size"], s["epochs"], sigma, delta, sampling=s["sampling"],
                    accountant=s["accountant"],
                )  # fmt: skip
            else:
                self.epsilon = self.curve.final_epsilon
        self.noise_multiplier = sigma
        self.delta = delta
        self.steps = self.curve.steps[-1]
        self.remaining_epsilon = None
        if self.ledger_dd.value != NO_LEDGER:
            self.remaining_epsilon = self._ledger().budget(self.ledger_dd.value).remaining_epsilon
        self.fit_line = self._make_fit_line(s, sigma, delta)

    def exact_epsilon(self) -> float:
        """ε of the current settings exactly as :func:`compute_epsilon` computes it."""
        s = self.settings()
        if self.noise_multiplier is None:
            raise KPrivacyError(self.error or "no valid settings yet")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            return accounting.compute_epsilon(
                s["n"], s["batch_size"], s["epochs"], self.noise_multiplier, self.delta,
                sampling=s["sampling"], accountant=s["accountant"],
            )  # fmt: skip

    def _make_fit_line(self, s: dict[str, Any], sigma: float, delta: float) -> str:
        model, x, y = self._fit_names
        parts = [f"%dp_fit {model} {x} {y}", f"--epochs {s['epochs']}"]
        parts.append(f"--batch-size {s['batch_size']}")
        if self.mode.value == "target":
            parts.append(f"--target-epsilon {float(self.target_input.value):g}")
        else:
            parts.append(f"--noise-multiplier {sigma:g}")
        parts.append(f"--delta {delta:g}")
        if s["sampling"] != "poisson":
            parts.append(f"--sampling {s['sampling']}")
        if s["accountant"] != "pld":
            parts.append(f"--accountant {s['accountant']}")
        if self.ledger_dd.value != NO_LEDGER:
            parts.append(f"--ledger {self.ledger_dd.value}")
        return " ".join(parts)

    # ------------------------------------------------------------------ showing
    def _draw(self) -> None:
        ax = self.ax
        if self.curve is None:
            self.line.set_data([], [])
            self.budget_line.set_visible(False)
            ax.set_title("invalid settings")
        else:
            xs = self.curve.epochs
            ys = [e if math.isfinite(e) else float("nan") for e in self.curve.epsilon]
            self.line.set_data(xs, ys)
            if self.remaining_epsilon is not None:
                self.budget_line.set_ydata([self.remaining_epsilon, self.remaining_epsilon])
                self.budget_line.set_visible(True)
            else:
                self.budget_line.set_visible(False)
            ax.set_title(
                f"ε vs epoch (δ={self.delta:g}, σ={self.noise_multiplier:g}, "
                f"{self.curve.accountant.upper()}, {self.curve.sampling})",
                fontsize=9,
            )
            finite = [v for v in ys if math.isfinite(v)]
            top = max(finite + [self.remaining_epsilon or 0.0, 1e-3])
            ax.set_xlim(0.5, max(xs) + 0.5)
            ax.set_ylim(0, top * 1.1)
        ax.set_xlabel("epoch")
        ax.set_ylabel("ε")
        ax.legend(
            handles=[h for h in (self.line, self.budget_line) if h.get_visible()],
            loc="upper left",
            fontsize=8,
        )
        self.image.value = figure_png(self.figure)

    def _summarise(self) -> None:
        if self.error:
            self.summary.value = f"<b style='color:#b00'>⚠ {_esc(self.error)}</b>"
            return
        eps = self.epsilon
        eps_txt = "∞ — NO PRIVACY (σ = 0)" if eps is None or math.isinf(eps) else f"{eps:.4f}"
        if (
            self.curve is not None
            and self.curve.accountant == "pld"
            and self.mode.value != "target"
        ):
            eps_txt += " (PLD on a coarse grid: an upper bound)"
        rows = [
            f"<b>ε = {eps_txt}</b> at δ = {self.delta:g} after {self.steps} steps "
            f"({self.epochs_slider.value} epochs × {self.curve.steps[0]} steps)",
        ]
        if getattr(self, "delta_source", "given") != "given":
            rows.append(f"δ = {self.delta:g}: {_esc(self.delta_source)}")
        if self.mode.value == "target":
            rows.append(
                f"calibrated noise σ = <b>{self.noise_multiplier:.4f}</b> for target ε = "
                f"{self.target_input.value:g}"
            )
        else:
            rows.append(f"noise σ = {self.noise_multiplier:g}")
        if self.sampling_dd.value == "shuffle":
            rows.append("shuffled epochs: no amplification by sampling is claimed")
        if self.remaining_epsilon is not None and self.curve is not None:
            fits = self.curve.epochs_within(self.remaining_epsilon)
            rows.append(
                f"ledger {_esc(self.ledger_dd.value)!s}: ε = {self.remaining_epsilon:.4g} left; "
                f"≈{fits} epoch(s) of this run stay below it (exact check composes all runs "
                "when training starts)"
            )
        self.summary.value = "<br>".join(rows)


def _esc(text: str) -> str:
    import html

    return html.escape(str(text))
