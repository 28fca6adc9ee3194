"""Live training monitor for ``dp_fit``: one view updated in place, or one log line per epoch.

In a Jupyter kernel the monitor shows a single display (a matplotlib figure rendered to PNG) and
updates it through its display handle after every epoch — ε spent so far against the planned curve
with the target and ledger lines, the loss, and the accuracy (train and validation). Elsewhere
(terminal IPython, scripts) it prints one plain line per epoch, like
:class:`kprivacy_nb.dp.reporting.LogReporter`. Frontend detection follows TensorBoard's
``notebook.py``: a kernel app in the IPython config means a notebook frontend.
"""

from __future__ import annotations

import io
import math
import time
from typing import Any

from ..dp.reporting import LogReporter

__all__ = ["TrainingMonitor", "auto_monitor", "in_notebook"]

#: Fewest seconds between two step-progress updates of the status line.
STEP_UPDATE_SECONDS = 0.5


def in_notebook() -> bool:
    """True inside a Jupyter kernel (where rich display updates work)."""
    try:
        from IPython import get_ipython
    except ImportError:  # pragma: no cover - IPython is a dependency
        return False
    shell = get_ipython()
    return shell is not None and "IPKernelApp" in getattr(shell, "config", {})


class TrainingMonitor:
    """``dp_fit`` callback drawing ε / loss / accuracy per epoch into one updating display.

    >>> run = dp_fit(model, x, y, epochs=5, batch_size=256, target_epsilon=3,
    ...              callbacks=[TrainingMonitor()], verbose=0)          # doctest: +SKIP
    """

    def __init__(self, notebook: bool | None = None, stream: Any = None) -> None:
        self.notebook = in_notebook() if notebook is None else notebook
        self._log = LogReporter(stream)
        self.plan: Any = None
        self.epochs: list[int] = []
        self.logs: list[dict[str, float]] = []
        self._handle: Any = None
        self._status: Any = None  # one text line above the figure: what is happening now
        self._status_at = 0.0
        self._started = 0.0
        self.renders = 0

    # -- callback protocol

    def on_prepare(self, message: str) -> None:
        """Before the first step (σ calibration, self-check): say so at once."""
        if self.notebook:
            self._say(message)
        else:
            self._log.on_prepare(message)

    def on_train_begin(self, plan: Any) -> None:
        self.plan = plan
        self.epochs, self.logs = [], []
        self._started = time.monotonic()
        if self.notebook:
            from IPython.display import display

            self._say(f"training: epoch 1/{plan.epochs}, {plan.steps_per_epoch} steps per epoch…")
            self._handle = display(self._image(), display_id=True)
        else:
            self._log.on_train_begin(plan)

    def on_step(self, epoch: int, step: int, steps_per_epoch: int) -> None:
        """Progress inside an epoch, in the status line (at most a few updates a second)."""
        if not self.notebook or self._status is None:
            return
        now = time.monotonic()
        if now - self._status_at < STEP_UPDATE_SECONDS and step != steps_per_epoch:
            return
        epochs = self.plan.epochs if self.plan is not None else "?"
        self._say(
            f"training: epoch {epoch}/{epochs}, step {step}/{steps_per_epoch} "
            f"({now - self._started:.0f} s)"
        )

    def on_epoch_end(self, epoch: int, logs: dict[str, float]) -> None:
        self.epochs.append(epoch)
        self.logs.append(dict(logs))
        if self.notebook and self._handle is not None:
            self._handle.update(self._image())
        else:
            self._log.on_epoch_end(epoch, logs)

    def on_train_end(self, result: Any) -> None:
        if self.notebook and self._handle is not None:
            how = "interrupted" if result.interrupted else "done"
            self._say(f"{how}: {result.steps} steps in {time.monotonic() - self._started:.1f} s")
            self._handle.update(self._image(final=result))
        else:
            self._log.on_train_end(result)

    def _say(self, message: str) -> None:
        from IPython.display import display

        text = {"text/plain": message}
        if self._status is None:
            self._status = display(text, raw=True, display_id=True)
        else:
            self._status.update(text, raw=True)
        self._status_at = time.monotonic()

    # -- drawing

    def figure(self, final: Any = None) -> Any:
        """The current matplotlib ``Figure`` (no pyplot global state involved)."""
        from matplotlib.figure import Figure

        fig = Figure(figsize=(11, 3.2), dpi=90)
        ax_eps, ax_loss, ax_acc = fig.subplots(1, 3)
        plan = self.plan
        if plan is not None:
            curve = plan.planned_curve
            finite = [
                (e, v)
                for e, v in zip(curve.epochs, curve.epsilon, strict=False)
                if math.isfinite(v)
            ]
            if finite:
                ax_eps.plot(
                    *zip(*finite, strict=False),
                    "--",
                    color="grey",
                    lw=2.5,
                    alpha=0.7,
                    zorder=3,
                    label="planned",
                )  # fmt: skip  (on top, wide: visible where the spent line follows it)
            if plan.target_epsilon is not None:
                ax_eps.axhline(plan.target_epsilon, color="tab:red", lw=1, label="target")
            if plan.ledger_cap is not None:
                left = plan.ledger_cap - (plan.ledger_spent or 0.0)
                ax_eps.axhline(left, color="tab:purple", lw=1, ls=":", label="ledger left")
        spent = [(e, lg["epsilon"]) for e, lg in zip(self.epochs, self.logs, strict=False)]
        spent = [(e, v) for e, v in spent if math.isfinite(v)]
        if spent:
            ax_eps.plot(*zip(*spent, strict=False), "o-", color="tab:blue", label="spent")
        title = "ε spent"
        if plan is not None:
            defaulted = getattr(plan, "delta_source", "given") != "given"
            title += f" (δ={plan.delta:g}{', ' + _short(plan.delta_source) if defaulted else ''})"
        ax_eps.set_title(title)
        ax_eps.set_xlabel("epoch")
        for ax, key in ((ax_loss, "loss"), (ax_acc, "accuracy")):
            for prefix, style in (("", "o-"), ("val_", "s--")):
                pts = [
                    (e, lg[prefix + key])
                    for e, lg in zip(self.epochs, self.logs, strict=False)
                    if prefix + key in lg
                ]
                if pts:
                    ax.plot(
                        *zip(*pts, strict=False),
                        style,
                        label="validation" if prefix else "train (not private)",
                    )
            ax.set_title(key)
            ax.set_xlabel("epoch")
        from matplotlib.ticker import MaxNLocator

        for ax in (ax_eps, ax_loss, ax_acc):
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs: 1, 2, 3 — no 1.5
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8)
        if plan is not None:
            status = f"epoch {len(self.epochs)}/{plan.epochs}"
            if final is not None:
                status = f"done: {final.steps} steps" + (
                    " (interrupted)" if final.interrupted else ""
                )
            fig.suptitle(
                f"DP-SGD — {status} — σ={plan.noise_multiplier:.3g}, C={plan.l2_norm_clip:g}, "
                f"{plan.sampling} batch {plan.batch_size}", fontsize=10,
            )  # fmt: skip
        fig.tight_layout()
        return fig

    def _image(self, final: Any = None) -> Any:
        from IPython.display import Image

        buf = io.BytesIO()
        self.figure(final).savefig(buf, format="png")
        self.renders += 1
        return Image(data=buf.getvalue(), format="png")


def auto_monitor() -> TrainingMonitor | None:
    """The default reporter installed by ``%load_ext``: the live view in notebooks, else None
    (``dp_fit`` then prints its plain log line per epoch)."""
    return TrainingMonitor(notebook=True) if in_notebook() else None


def _short(source: str) -> str:
    """A few words for where δ came from (the card has the full sentence)."""
    if source.startswith("defaulted"):
        return "default"
    if source.startswith("the ledger"):
        return "ledger's"
    return "earlier run's"
