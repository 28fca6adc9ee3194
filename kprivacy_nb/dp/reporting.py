"""Progress reporting for DP training, free of IPython and TensorFlow.

``dp_fit`` calls callback objects (:class:`TrainingCallback`); by default a :class:`LogReporter`
prints one line per epoch. The IPython extension installs ``default_reporter_factory`` so that in a
notebook the live monitor (:mod:`kprivacy_nb.widgets.monitor`) is used instead — without the core
importing IPython.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Sequence
from typing import Any, Protocol

__all__ = ["TrainingCallback", "LogReporter", "default_reporter_factory"]


class TrainingCallback(Protocol):
    """What ``dp_fit`` tells its callbacks (every method optional).

    ``on_prepare`` hears what is being done before the first step when it takes time
    (calibrating σ for a target ε, the clipping self-check); ``on_step`` follows an epoch step
    by step (keep it cheap: it runs after every step).

    ``on_epoch_end`` logs hold ``loss``/``accuracy``/``val_*`` (when known), ``epsilon`` (spent
    so far), ``delta``, ``epochs``, ``steps`` and ``seconds``.
    """

    def on_prepare(self, message: str) -> None: ...
    def on_train_begin(self, plan: Any) -> None: ...
    def on_step(self, epoch: int, step: int, steps_per_epoch: int) -> None: ...
    def on_epoch_end(self, epoch: int, logs: dict[str, float]) -> None: ...
    def on_train_end(self, result: Any) -> None: ...


def _fmt(eps: float) -> str:
    return "∞" if math.isinf(eps) else f"{eps:.4g}"


class LogReporter:
    """One plain log line per epoch (the default outside notebooks)."""

    def __init__(self, stream: Any = None) -> None:
        self.stream = stream

    def _print(self, text: str) -> None:
        stream = self.stream or sys.stdout
        print(text, file=stream, flush=True)

    def on_prepare(self, message: str) -> None:
        self._print(message)

    def on_train_begin(self, plan: Any) -> None:
        self._print(
            f"DP-SGD: n={plan.n}, batch {plan.batch_size} ({plan.sampling}), {plan.epochs} epochs "
            f"× {plan.steps_per_epoch} steps, σ={plan.noise_multiplier:.4g}, "
            f"C={plan.l2_norm_clip:g}, δ={plan.delta:g}, planned ε={_fmt(plan.planned_curve.final_epsilon)}"
        )
        source = getattr(plan, "delta_source", "given")
        if source != "given":
            self._print(f"δ = {plan.delta:g}: {source}")

    def on_epoch_end(self, epoch: int, logs: dict[str, float]) -> None:
        parts = [f"epoch {epoch}/{logs.get('epochs', '?')}"]
        # Training-set metrics come from the private data without noise: labelled as such
        # (this line may end up in a saved notebook or a log file).
        train = [f"{key} {logs[key]:.4f}" for key in ("loss", "accuracy") if key in logs]
        if train:
            parts.append(f"train {', '.join(train)} (not private: not covered by ε)")
        for key in ("val_loss", "val_accuracy"):
            if key in logs:
                parts.append(f"{key} {logs[key]:.4f}")
        parts.append(f"ε {_fmt(logs['epsilon'])} (δ={logs['delta']:g})")
        parts.append(f"{logs.get('seconds', 0):.1f}s")
        self._print(" — ".join(parts))

    def on_train_end(self, result: Any) -> None:
        if result.interrupted:
            self._print(f"interrupted after {result.steps} steps: ε={_fmt(result.epsilon)}")


# A callable returning a callback (or None for the plain log line); set by the IPython extension.
default_reporter_factory: Callable[[], Any] | None = None


def _default_reporter() -> Any:
    if default_reporter_factory is not None:
        reporter = default_reporter_factory()
        if reporter is not None:
            return reporter
    return LogReporter()


def _call(callbacks: Sequence[Any], method: str, *args: Any) -> None:
    for cb in callbacks:
        fn = getattr(cb, method, None)
        if fn is not None:
            fn(*args)
