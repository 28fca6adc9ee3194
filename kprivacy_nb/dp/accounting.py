"""Privacy accounting for DP-SGD: one facade over Google's ``dp_accounting``.

Every ε here comes from a ``dp_accounting`` accountant applied to a ``DpEvent`` that describes the
training run; nothing is re-derived by hand. Two accountants are offered: ``"pld"`` (privacy loss
distributions, the default and the tightest) and ``"rdp"`` (Rényi DP, fast and classic).

Sampling, and what the ε means (add-or-remove-one-example adjacency, all checkpoints released):

* ``"poisson"`` — each step includes every example independently with probability ``q = B / n``
  (the trainer implements this for real). One step is ``PoissonSampled(q, Gaussian(σ))``; a run of
  ``T`` steps is that event self-composed ``T`` times. One epoch is ``round(n / B)`` steps
  (at least 1), the expected number of batches needed to see ``n`` examples.
* ``"shuffle"`` — each epoch visits every example exactly once, in batches, in an arbitrary order.
  No amplification by subsampling is claimed: every epoch counts as one full ``Gaussian(σ)``
  release per example, so a run is ``Gaussian(σ)`` self-composed once per epoch *started*
  (a partial epoch counts as a whole one). This is TF Privacy's "each example occurring once per
  epoch" figure.

>>> compute_epsilon(n=60000, batch_size=256, epochs=15, noise_multiplier=1.1,
...                 delta=1e-5)  # doctest: +SKIP
1.133...
"""

from __future__ import annotations

import functools
import logging
import math
import numbers
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import dp_accounting
from dp_accounting.pld import privacy_loss_distribution as _pld
from dp_accounting.pld import privacy_loss_mechanism as _mechanism
from dp_accounting.rdp import rdp_privacy_accountant as _rdp

from ..errors import InvalidParameterError, caller_stacklevel
from .names import ACCOUNTANTS, SAMPLINGS  # noqa: E402  (re-exported)

#: PLD grid step used by :func:`compute_epsilon` (dp_accounting's own default).
PLD_DISCRETIZATION = 1e-4
#: The coarser grid :func:`calibrate_noise` searches σ on (~10× faster per ε; its ε differs from
#: the fine grid's by ~0.05% at ε ≈ 3); the σ found is then checked on the fine grid.
PLD_SEARCH_DISCRETIZATION = 1e-3
#: Above this RDP ε, PLD accounting is skipped (its grid would need GBs) and the RDP bound is used.
PLD_MAX_EPSILON = 100.0
#: Largest σ :func:`calibrate_noise` will propose; beyond it training is pointless.
MAX_NOISE_MULTIPLIER = 1000.0
#: An unreachable target of which earlier runs on the same data spent this share is called spent.
SPENT = 0.99


class _OrderLeftOut(logging.Filter):
    """Drops dp-accounting's "… failed to converge … Excluding this order from the epsilon
    computation" warnings (several per ε at some q, σ): the order is left out of the minimum
    over orders, so the RDP bound stays valid — nothing for the user to act on."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Excluding this order" not in record.getMessage()


logging.getLogger("absl").addFilter(_OrderLeftOut())

__all__ = [
    "ACCOUNTANTS",
    "MAX_CLIP",
    "MIN_CLIP",
    "Mechanism",
    "composed",
    "SAMPLINGS",
    "EpsilonCurve",
    "account",
    "calibrate_noise",
    "check_clip",
    "compute_epsilon",
    "default_delta",
    "dpsgd_event",
    "epsilon_curve",
    "epsilon_of_event",
    "gaussian_epsilon",
    "make_accountant",
    "steps_per_epoch",
    "validate",
]


# --------------------------------------------------------------------------- validation


def _check_int(name: str, value: object, *, minimum: int = 1, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise InvalidParameterError(f"{name} must be a whole number, got {value!r}")
    value = int(value)
    if value < minimum:
        raise InvalidParameterError(f"{name} must be at least {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise InvalidParameterError(f"{name} must be at most {maximum}, got {value}")
    return value


def _check_float(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InvalidParameterError(f"{name} must be a number, got {value!r}")
    value = float(value)
    if math.isnan(value) or math.isinf(value):
        raise InvalidParameterError(f"{name} must be a finite number, got {value}")
    return value


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> str:
    text = str(value).lower() if isinstance(value, str) else value
    if text not in choices:
        raise InvalidParameterError(f"{name} must be one of {', '.join(choices)}; got {value!r}")
    return text  # type: ignore[return-value]


#: The smallest clipping norm C accepted. Far below any useful C, and far above the norms at which
#: float32 products of sums of squares could underflow (≈1e-19): a norm is never computed as 0
#: while it is above C (see :mod:`.clipping.linear`).
MIN_CLIP = 1e-6
#: The largest: float32's largest finite value (the step computes in float32).
MAX_CLIP = 3.4e38


def check_clip(value: object) -> float:
    """``value`` as the clipping norm C, or :class:`InvalidParameterError` naming the range."""
    clip = math.nan
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        try:
            clip = float(value)
        except OverflowError:  # an int beyond float's range
            clip = math.inf
    if not MIN_CLIP <= clip <= MAX_CLIP:
        shown = repr(clip) if math.isfinite(clip) else repr(value)  # (as compared: 9.99…e-07)
        if len(shown) > 40:
            shown = shown[:37] + "…"
        raise InvalidParameterError(
            f"l2_norm_clip must be a number from {MIN_CLIP:g} to {MAX_CLIP:g}, got {shown}"
        )
    return clip


def default_delta(n: int) -> float:
    """Return the default δ for ``n`` examples: the largest power of ten ≤ 1/(10·n).

    δ is the probability that the ε guarantee fails outright; a common rule is δ well below
    1/n, so that no single record is likely to be exposed. n=60000 → 1e-6, n=300 → 1e-4,
    n=100000 → 1e-6. (Results say when δ was defaulted.)
    """
    n = _check_int("n (dataset size)", n)
    exponent = len(str(10 * n - 1))  # smallest k with 10**k ≥ 10·n
    return float(f"1e-{exponent}")


def validate(
    n: int,
    batch_size: int,
    *,
    epochs: int | None = None,
    steps: int | None = None,
    noise_multiplier: float | None = None,
    delta: float | None = None,
    sampling: str = "poisson",
    accountant: str = "pld",
    allow_no_noise: bool = False,
) -> float:
    """Check DP-SGD parameters; raise :class:`InvalidParameterError` or return the δ to use.

    ``epochs``/``steps``/``noise_multiplier`` are checked only when given. σ = 0 means no privacy
    at all and is refused unless ``allow_no_noise`` is true.
    """
    n = _check_int("n (dataset size)", n)
    batch_size = _check_int("batch_size", batch_size)
    if batch_size > n:
        raise InvalidParameterError(
            f"batch_size ({batch_size}) is larger than the dataset (n={n}); use a batch size ≤ n"
        )
    if epochs is not None:
        _check_int("epochs", epochs)
    if steps is not None:
        _check_int("steps", steps)
    _check_choice("sampling", sampling, SAMPLINGS)
    _check_choice("accountant", accountant, ACCOUNTANTS)
    if noise_multiplier is not None:
        sigma = _check_float("noise_multiplier", noise_multiplier)
        if sigma < 0:
            raise InvalidParameterError(
                f"noise_multiplier must be ≥ 0, got {sigma}; it is the noise std divided by "
                "the clipping norm (typical values 0.5–2)"
            )
        if sigma == 0 and not allow_no_noise:
            raise InvalidParameterError(
                "noise_multiplier=0 adds no noise: there is no privacy (ε = ∞). Pass a "
                "positive noise multiplier, or allow it explicitly (allow_no_noise=True)"
            )
    if delta is None:
        return default_delta(n)
    delta = _check_float("delta", delta)
    if not 0 < delta < 1:
        raise InvalidParameterError(f"delta must be between 0 and 1 (exclusive), got {delta}")
    if delta >= 1 / n:
        raise InvalidParameterError(
            f"delta={delta:g} is not below 1/n = {1 / n:.3g}: with δ ≥ 1/n a mechanism that "
            "publishes one random example in full would satisfy (ε, δ)-DP. Use δ < 1/n, e.g. "
            f"the default {default_delta(n):g}"
        )
    return delta


def steps_per_epoch(n: int, batch_size: int, sampling: str = "poisson") -> int:
    """Steps in one epoch.

    Poisson: ``round(n / B)`` (at least 1) — the expected number of batches of expected size
    ``B`` that make up ``n`` examples. Shuffle: ``ceil(n / B)`` (the last batch may be short).
    """
    n = _check_int("n (dataset size)", n)
    batch_size = _check_int("batch_size", batch_size)
    sampling = _check_choice("sampling", sampling, SAMPLINGS)
    if sampling == "poisson":
        return max(1, round(n / batch_size))
    return -(-n // batch_size)


def _total_steps(
    n: int, batch_size: int, epochs: int | None, steps: int | None, sampling: str
) -> int:
    if steps is not None:
        return _check_int("steps", steps)
    if epochs is None:
        raise InvalidParameterError("give the number of epochs (or of steps)")
    return _check_int("epochs", epochs) * steps_per_epoch(n, batch_size, sampling)


# --------------------------------------------------------------------------- events


def dpsgd_event(
    *, n: int, batch_size: int, noise_multiplier: float, steps: int, sampling: str = "poisson"
) -> dp_accounting.DpEvent:
    """Return the ``DpEvent`` of ``steps`` DP-SGD steps (see the module docstring).

    Poisson: ``SelfComposed(PoissonSampled(q=B/n, Gaussian(σ)), steps)``. Shuffle: no
    amplification, ``SelfComposed(Gaussian(σ), epochs started)`` with
    ``epochs started = ceil(steps / ceil(n / B))``.
    """
    sampling = _check_choice("sampling", sampling, SAMPLINGS)
    steps = _check_int("steps", steps)
    sigma = _check_float("noise_multiplier", noise_multiplier)
    if sigma < 0:
        raise InvalidParameterError(f"noise_multiplier must be ≥ 0, got {sigma}")
    gaussian = dp_accounting.GaussianDpEvent(sigma)
    if sampling == "poisson":
        q = _check_int("batch_size", batch_size) / _check_int("n (dataset size)", n)
        return dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(q, gaussian), steps
        )
    epochs_started = -(-steps // steps_per_epoch(n, batch_size, "shuffle"))
    return dp_accounting.SelfComposedDpEvent(gaussian, epochs_started)


@dataclass(frozen=True)
class Mechanism:
    """One DP-SGD mechanism: what a run's privacy depends on besides its number of steps.

    >>> m = Mechanism(n=60000, batch_size=256, noise_multiplier=1.1)
    >>> m.steps_per_epoch, m.event(m.steps_per_epoch * 15).count
    (234, 3510)
    """

    n: int
    batch_size: int
    noise_multiplier: float
    sampling: str = "poisson"

    def __post_init__(self) -> None:
        _check_int("n (dataset size)", self.n)
        _check_int("batch_size", self.batch_size)
        _check_choice("sampling", self.sampling, SAMPLINGS)

    @property
    def steps_per_epoch(self) -> int:
        return steps_per_epoch(self.n, self.batch_size, self.sampling)

    def event(self, steps: int) -> dp_accounting.DpEvent:
        """The ``DpEvent`` of ``steps`` steps of this mechanism (:func:`dpsgd_event`)."""
        return dpsgd_event(
            n=self.n, batch_size=self.batch_size, noise_multiplier=self.noise_multiplier,
            steps=steps, sampling=self.sampling,
        )  # fmt: skip


def composed(events: Sequence[dp_accounting.DpEvent]) -> dp_accounting.DpEvent:
    """One event for several runs on the same data (their privacy losses add up).

    Runs of one mechanism are merged: ``k₁`` and then ``k₂`` compositions of a mechanism are
    ``k₁ + k₂`` compositions of it. The accountants then build one distribution per mechanism,
    not one per run, so the ε of a fit-per-epoch loop costs as much at its 50th call as at its
    second (and is the ε of one run of all those steps).
    """
    events = tuple(events)
    if len(events) == 1:
        return events[0]
    counts: dict[dp_accounting.DpEvent, int] = {}
    for event in events:
        inner, count = event, 1
        if isinstance(event, dp_accounting.SelfComposedDpEvent):
            inner, count = event.event, int(event.count)
        counts[inner] = counts.get(inner, 0) + count
    merged = [dp_accounting.SelfComposedDpEvent(inner, count) for inner, count in counts.items()]
    # (A tuple: events are hashed by the accountant's cache.)
    return merged[0] if len(merged) == 1 else dp_accounting.ComposedDpEvent(tuple(merged))


def make_accountant(
    accountant: str = "pld", *, value_discretization_interval: float | None = None
) -> dp_accounting.PrivacyAccountant:
    """A fresh ``dp_accounting`` accountant (add-or-remove-one adjacency)."""
    accountant = _check_choice("accountant", accountant, ACCOUNTANTS)
    if accountant == "pld":
        return dp_accounting.pld.PLDAccountant(
            value_discretization_interval=value_discretization_interval or PLD_DISCRETIZATION
        )
    return dp_accounting.rdp.RdpAccountant()


def _gaussian_composition(event: dp_accounting.DpEvent) -> tuple[float, int] | None:
    """``(σ, k)`` if ``event`` is ``k`` compositions of one Gaussian mechanism, else None."""
    count = 1
    if isinstance(event, dp_accounting.SelfComposedDpEvent):
        event, count = event.event, event.count
    if isinstance(event, dp_accounting.GaussianDpEvent) and event.noise_multiplier > 0:
        return float(event.noise_multiplier), int(count)
    return None


def gaussian_epsilon(noise_multiplier: float, count: int, delta: float) -> float:
    """Exact ε of ``count`` compositions of the Gaussian mechanism (sensitivity 1, std σ).

    They compose to one Gaussian mechanism of std ``σ/√count``, whose δ(ε) dp_accounting gives in
    closed form (Balle & Wang's analytic Gaussian); ε is found by bisection and rounded *up*.
    """
    loss = _mechanism.GaussianPrivacyLoss(noise_multiplier / math.sqrt(count), sensitivity=1.0)
    if loss.get_delta_for_epsilon(0.0) <= delta:
        return 0.0
    lo, hi = 0.0, 1.0
    while loss.get_delta_for_epsilon(hi) > delta:
        lo, hi = hi, 2.0 * hi
    while hi - lo > 1e-9 * hi:
        mid = 0.5 * (lo + hi)
        if loss.get_delta_for_epsilon(mid) > delta:
            lo = mid
        else:
            hi = mid
    return hi


def _round_up(value: float, digits: int = 4) -> str:
    """``value`` to ``digits`` significant digits, rounded up: a bound shown as "≥ 2" must not
    be a 2.0003 that 2 does not reach."""
    if not math.isfinite(value) or value <= 0:
        return f"{value:g}"
    scale = 10 ** (digits - 1 - math.floor(math.log10(value)))
    return f"{math.ceil(value * scale - 1e-9) / scale:.{digits}g}"


@functools.lru_cache(maxsize=256)
def _account_cached(
    event: dp_accounting.DpEvent, delta: float, accountant: str, interval: float | None = None
) -> tuple[float, str]:
    if accountant == "pld":
        gaussian = _gaussian_composition(event)
        if gaussian is not None:  # shuffling: exact, at any ε
            return gaussian_epsilon(*gaussian, delta), "pld"
        # A PLD grid spans the privacy-loss range: at ε in the hundreds it needs GBs of memory.
        # The RDP bound (cheap, always ≥ the true ε) tells us beforehand.
        rdp = make_accountant("rdp")
        if rdp.supports(event):
            bound = float(rdp.compose(event).get_epsilon(delta))
            if math.isinf(bound):  # σ = 0 somewhere: no privacy, which is warned about as such
                return bound, accountant
            if bound > PLD_MAX_EPSILON:
                warnings.warn(
                    f"ε is huge ({bound:.4g} by RDP): reporting the RDP upper bound, since PLD "
                    "accounting at this scale would need gigabytes of memory",
                    RuntimeWarning,
                    stacklevel=4,
                )
                return bound, "rdp"
    acct = make_accountant(accountant, value_discretization_interval=interval)
    if not acct.supports(event):
        raise InvalidParameterError(f"the {accountant} accountant cannot account for {event!r}")
    return float(acct.compose(event).get_epsilon(delta)), accountant


def _epsilon_cached(event: dp_accounting.DpEvent, delta: float, accountant: str) -> float:
    return _account_cached(event, delta, accountant)[0]


def account(
    event: dp_accounting.DpEvent, delta: float, accountant: str = "pld"
) -> tuple[float, str]:
    """``(ε, the accountant that produced it)`` for ``event`` at ``delta``.

    The second item differs from ``accountant`` only when PLD was asked for but the run is so far
    from private (RDP ε > 100) that the RDP upper bound is reported instead.
    """
    accountant = _check_choice("accountant", accountant, ACCOUNTANTS)
    delta = _check_float("delta", delta)
    if not 0 < delta < 1:
        raise InvalidParameterError(f"delta must be between 0 and 1 (exclusive), got {delta}")
    return _account_cached(event, delta, accountant)


def epsilon_of_event(event: dp_accounting.DpEvent, delta: float, accountant: str = "pld") -> float:
    """ε of ``event`` at ``delta`` under ``accountant`` (see :func:`account`)."""
    return account(event, delta, accountant)[0]


class _CachingAccountant:
    """The slice of ``PrivacyAccountant`` that ``calibrate_dp_mechanism`` uses, answered through
    :func:`epsilon_of_event`'s cache so no σ is evaluated twice (bracket ends, final checks)."""

    ledger = dp_accounting.NoOpDpEvent()

    def __init__(self, accountant: str, interval: float | None = None) -> None:
        self._accountant = accountant
        self._interval = interval  # a PLD grid other than the reporting one (the search's)
        self._event: dp_accounting.DpEvent | None = None

    def compose(self, event: dp_accounting.DpEvent) -> _CachingAccountant:
        self._event = event
        return self

    def get_epsilon(self, target_delta: float) -> float:
        if self._event is None:
            return 0.0
        with warnings.catch_warnings():  # candidates far from the answer may be "huge": fine
            warnings.filterwarnings("ignore", "ε is huge", RuntimeWarning)
            if self._interval is None:
                return epsilon_of_event(self._event, target_delta, self._accountant)
            return _account_cached(self._event, target_delta, self._accountant, self._interval)[0]


def _warn_no_noise() -> None:
    warnings.warn(
        "noise_multiplier=0: no noise, NO PRIVACY — ε = ∞", RuntimeWarning,
        stacklevel=caller_stacklevel(),
    )  # fmt: skip


# --------------------------------------------------------------------------- public API


def compute_epsilon(
    n: int,
    batch_size: int,
    epochs: int | None = None,
    noise_multiplier: float | None = None,
    delta: float | None = None,
    *,
    steps: int | None = None,
    sampling: str = "poisson",
    accountant: str = "pld",
) -> float:
    """ε spent by DP-SGD with these settings (``steps`` overrides ``epochs`` when given).

    σ = 0 returns ``math.inf`` with a ``RuntimeWarning``: no noise means no privacy.

    >>> compute_epsilon(60000, 256, 15, 1.1, 1e-5, accountant="rdp")  # doctest: +SKIP
    1.28...
    """
    if noise_multiplier is None:
        raise InvalidParameterError("give the noise multiplier (or use calibrate_noise)")
    delta = validate(
        n,
        batch_size,
        epochs=epochs,
        steps=steps,
        noise_multiplier=noise_multiplier,
        delta=delta,
        sampling=sampling,
        accountant=accountant,
        allow_no_noise=True,
    )
    if float(noise_multiplier) == 0:
        _warn_no_noise()
        return math.inf
    total = _total_steps(n, batch_size, epochs, steps, sampling.lower())
    event = dpsgd_event(
        n=n,
        batch_size=batch_size,
        noise_multiplier=float(noise_multiplier),
        steps=total,
        sampling=sampling.lower(),
    )
    return epsilon_of_event(event, delta, accountant.lower())


def calibrate_noise(
    target_epsilon: float,
    n: int,
    batch_size: int,
    epochs: int | None = None,
    delta: float | None = None,
    *,
    steps: int | None = None,
    sampling: str = "poisson",
    accountant: str = "pld",
    prior: dp_accounting.DpEvent | None = None,
) -> float:
    """Smallest σ (within 0.1%) whose ε is ≤ ``target_epsilon``, via ``calibrate_dp_mechanism``.

    ``prior``: what earlier runs on the same data already spent; σ is then calibrated so that
    the earlier runs and this one together stay within the target.

    The returned σ's ε, computed exactly as :func:`compute_epsilon` does, never exceeds the
    target. An unreachable target raises :class:`InvalidParameterError` saying what is reachable.

    >>> calibrate_noise(1.0, 60000, 256, 15, 1e-5)  # doctest: +SKIP
    1.2...
    """
    target = _check_float("target_epsilon", target_epsilon)
    if target <= 0:
        raise InvalidParameterError(f"target_epsilon must be > 0, got {target}")
    delta = validate(
        n, batch_size, epochs=epochs, steps=steps, delta=delta, sampling=sampling,
        accountant=accountant,
    )  # fmt: skip
    sampling, accountant = sampling.lower(), accountant.lower()
    total = _total_steps(n, batch_size, epochs, steps, sampling)

    def event_of(sigma: float) -> dp_accounting.DpEvent:
        this = dpsgd_event(
            n=n, batch_size=batch_size, noise_multiplier=sigma, steps=total, sampling=sampling
        )
        return this if prior is None else composed([prior, this])

    fine = _CachingAccountant(accountant)  # (candidates far from the answer may be "huge")

    def eps(sigma: float) -> float:
        return fine.compose(event_of(sigma)).get_epsilon(delta)

    floor = eps(MAX_NOISE_MULTIPLIER)
    if floor > target:
        spent = None if prior is None else fine.compose(prior).get_epsilon(delta)
        if spent is not None and spent >= SPENT * target:
            raise InvalidParameterError(
                f"target ε={target:g} is already spent: the earlier private runs on this data "
                f"used ε={_round_up(spent)} of it (ε covers them all). Raise target_epsilon, "
                "or — if this run trains on other people's data — say so (fresh_data=True)"
            )
        raise InvalidParameterError(
            f"target ε={target:g} is unreachable: even σ={MAX_NOISE_MULTIPLIER:g} gives "
            f"ε={_round_up(floor)} (δ={delta:g}, {total} steps"
            f"{', with the earlier runs on this data' if prior is not None else ''}). "
            f"Reachable targets are ≥ {_round_up(floor)}; "
            "or train fewer epochs, use smaller batches or a larger δ"
        )

    def solve(acct: _CachingAccountant) -> float:
        """The smallest σ within the tolerance whose ε under ``acct`` is ≤ the target."""

        def eps_of(sigma: float) -> float:
            return acct.compose(event_of(sigma)).get_epsilon(delta)

        bracket: dp_accounting.mechanism_calibration.BracketInterval | None = None
        hi = None
        if accountant == "pld":
            # RDP calibration is ~20x cheaper; its σ is usually a tight upper end for PLD.
            try:
                hi = calibrate_noise(
                    target, n, batch_size, epochs, delta, steps=steps, sampling=sampling,
                    accountant="rdp", prior=prior,
                )  # fmt: skip
            except InvalidParameterError:
                hi = None
            if hi is not None and eps_of(hi) <= target:
                for lo in (0.85 * hi, 0.5 * hi):
                    if eps_of(lo) > target:
                        bracket = dp_accounting.ExplicitBracketInterval(lo, hi)
                        break
                    hi = lo
        if bracket is None:
            # σ = MAX_NOISE_MULTIPLIER reaches the target (checked above on the fine grid): the
            # search never goes past it (the coarse grid may not reach the target there).
            if eps_of(MAX_NOISE_MULTIPLIER) > target:
                raise dp_accounting.mechanism_calibration.NoBracketIntervalFoundError(
                    "the target is not reached on this grid"
                )
            bracket = dp_accounting.ExplicitBracketInterval(1e-3, MAX_NOISE_MULTIPLIER)
        tol = 1e-4 if hi is None else max(1e-5, 5e-4 * hi)
        return float(
            dp_accounting.calibrate_dp_mechanism(
                lambda: acct, event_of, target, delta, bracket_interval=bracket, tol=tol
            )
        )

    try:
        if accountant != "pld":
            sigma = solve(fine)
        else:
            # Searched on a coarser PLD grid (~10× faster), then moved onto the reporting grid
            # with a few evaluations; if that shortcut misses, the search runs on the fine grid.
            coarse = _CachingAccountant(accountant, PLD_SEARCH_DISCRETIZATION)
            try:
                sigma = _refine(solve(coarse), eps, coarse, event_of, delta, target)
            except dp_accounting.mechanism_calibration.NoBracketIntervalFoundError:
                sigma = None
            if sigma is None:
                sigma = solve(fine)
    except (ValueError, dp_accounting.mechanism_calibration.NoBracketIntervalFoundError) as exc:
        raise InvalidParameterError(
            f"could not calibrate σ for ε={target:g}, δ={delta:g}: {exc}"
        ) from None
    sigma = float(sigma)
    # calibrate_dp_mechanism guarantees a non-positive gap; check with our own ε anyway.
    while eps(sigma) > target:
        sigma *= 1.001
    return sigma


def _refine(
    sigma: float, eps_fine: Callable[[float], float], coarse: _CachingAccountant,
    event_of: Callable[[float], dp_accounting.DpEvent], delta: float,
    target: float,
) -> float | None:  # fmt: skip
    """From ``sigma`` calibrated on the coarse grid, the smallest σ (within 0.1%) whose ε on the
    reporting grid is ≤ ``target``, in two or three fine evaluations — or None when the shortcut
    cannot show it (the caller then searches on the fine grid).

    ln ε is nearly linear in ln σ over a few percent, and both grids have the same slope: the
    coarse grid gives the slope, one fine evaluation the offset."""
    here = eps_fine(sigma)
    lower = coarse.compose(event_of(0.99 * sigma)).get_epsilon(delta)
    at = coarse.compose(event_of(sigma)).get_epsilon(delta)
    if not (0 < here and 0 < at < lower and math.isfinite(lower)):
        return None
    slope = math.log(lower / at) / math.log(0.99)  # d ln ε / d ln σ, negative
    guess = sigma * math.exp(math.log(target / here) / slope) * 1.0003
    if eps_fine(guess) <= target < eps_fine(guess / 1.001):
        return guess
    return None


@dataclass
class EpsilonCurve:
    """ε after each epoch: ``epsilon[i]`` holds after ``epochs[i]`` epochs (``steps[i]`` steps)."""

    epochs: list[int]
    epsilon: list[float]
    steps: list[int]
    delta: float
    accountant: str
    sampling: str
    noise_multiplier: float
    n: int = 0
    batch_size: int = 0
    value_discretization_interval: float | None = field(default=None, repr=False)

    @property
    def final_epsilon(self) -> float:
        return self.epsilon[-1] if self.epsilon else 0.0

    def epochs_within(self, budget: float) -> int:
        """How many epochs keep ε ≤ ``budget`` (0 if even one epoch is over)."""
        return sum(1 for e in self.epsilon if e <= budget)

    def to_dict(self) -> dict:
        return {
            "epochs": list(self.epochs),
            "epsilon": [None if math.isinf(e) else e for e in self.epsilon],
            "steps": list(self.steps),
            "delta": self.delta,
            "accountant": self.accountant,
            "sampling": self.sampling,
            "noise_multiplier": self.noise_multiplier,
        }


def epsilon_curve(
    n: int,
    batch_size: int,
    epochs: int,
    noise_multiplier: float,
    delta: float | None = None,
    *,
    sampling: str = "poisson",
    accountant: str = "pld",
    value_discretization_interval: float | None = None,
) -> EpsilonCurve:
    """ε after each of ``epochs`` epochs, computed incrementally.

    RDP: the one-epoch RDP vector is computed once (RDP adds up under composition) and each
    epoch is converted to ε with dp_accounting's conversion. PLD: the one-epoch PLD is built
    once and composed onto the running PLD each epoch. ``value_discretization_interval`` (PLD
    only) trades tightness for speed: a coarser grid is still a valid (pessimistic) upper bound;
    the default is the same grid as :func:`compute_epsilon`.
    """
    delta = validate(
        n, batch_size, epochs=epochs, noise_multiplier=noise_multiplier, delta=delta,
        sampling=sampling, accountant=accountant, allow_no_noise=True,
    )  # fmt: skip
    sampling, accountant = sampling.lower(), accountant.lower()
    epochs = _check_int("epochs", epochs)
    sigma = float(noise_multiplier)
    spe = steps_per_epoch(n, batch_size, sampling)
    epoch_list = list(range(1, epochs + 1))
    curve = EpsilonCurve(
        epochs=epoch_list, epsilon=[], steps=[k * spe for k in epoch_list], delta=delta,
        accountant=accountant, sampling=sampling, noise_multiplier=sigma, n=int(n),
        batch_size=int(batch_size), value_discretization_interval=value_discretization_interval,
    )  # fmt: skip
    if sigma == 0:
        _warn_no_noise()
        curve.epsilon = [math.inf] * epochs
        return curve
    one_epoch = dpsgd_event(
        n=n, batch_size=batch_size, noise_multiplier=sigma, steps=spe, sampling=sampling
    )
    if accountant == "rdp":
        acct = make_accountant("rdp")
        acct.compose(one_epoch)
        orders, rdp_one = acct.orders, acct.rdp
        curve.epsilon = [
            float(_rdp.compute_epsilon(orders, rdp_one * k, delta)[0]) for k in epoch_list
        ]
        return curve
    if sampling == "shuffle":  # one Gaussian release per epoch: exact at any ε
        curve.epsilon = [gaussian_epsilon(sigma, k, delta) for k in epoch_list]
        return curve
    interval = value_discretization_interval or PLD_DISCRETIZATION
    whole_run = dpsgd_event(
        n=n, batch_size=batch_size, noise_multiplier=sigma, steps=spe * epochs, sampling=sampling
    )
    if _epsilon_cached(whole_run, delta, "rdp") > PLD_MAX_EPSILON:
        warnings.warn(
            "ε is huge: the curve uses the RDP accountant (an upper bound); PLD accounting at this "
            "scale would need gigabytes of memory",
            RuntimeWarning,
            stacklevel=2,
        )
        return epsilon_curve(
            n, batch_size, epochs, sigma, delta, sampling=sampling, accountant="rdp"
        )
    if sampling == "poisson":
        step_pld = _pld.from_gaussian_mechanism(
            sigma, value_discretization_interval=interval, sampling_prob=batch_size / n
        )
        epoch_pld = step_pld.self_compose(spe)
    else:
        epoch_pld = _pld.from_gaussian_mechanism(sigma, value_discretization_interval=interval)
    running = epoch_pld
    values = [float(running.get_epsilon_for_delta(delta))]
    for _ in epoch_list[1:]:
        running = running.compose(epoch_pld)
        values.append(float(running.get_epsilon_for_delta(delta)))
    curve.epsilon = values
    return curve
