"""Accounting core: agreement with TF Privacy's statement, calibration, curves, bad input."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import dp_accounting
import pytest

from kprivacy_nb.dp import accounting as acc
from kprivacy_nb.errors import InvalidParameterError

MNIST = {"n": 60000, "batch_size": 256, "noise_multiplier": 1.1, "delta": 1e-5}
# TF Privacy's compute_dp_sgd_privacy_statement counts ceil(epochs * n / batch) Poisson steps.
TFP_STEPS_15 = math.ceil(15 * 60000 / 256)


def close(a: float, b: float, rel: float = 0.01) -> bool:
    return abs(a - b) <= rel * abs(b)


# ---------------------------------------------------------------- TF Privacy reference numbers


@pytest.mark.parametrize(
    ("accountant", "expected"),
    [("rdp", 1.281), ("pld", 1.134)],
)
def test_poisson_matches_tf_privacy_statement(accountant, expected):
    # Same steps as TF Privacy: within 0.1%.
    eps = acc.compute_epsilon(**MNIST, steps=TFP_STEPS_15, accountant=accountant)
    assert close(eps, expected, 0.001), eps
    # Our own epoch convention (round(n / B) steps per epoch): still within 1%.
    eps_epochs = acc.compute_epsilon(**MNIST, epochs=15, accountant=accountant)
    assert close(eps_epochs, expected), eps_epochs
    assert eps_epochs <= eps  # 3510 ≤ 3516 steps


def test_shuffle_matches_tf_privacy_once_per_epoch_figure():
    eps = acc.compute_epsilon(**MNIST, epochs=15, sampling="shuffle", accountant="rdp")
    assert close(eps, 21.901, 0.001), eps
    # Shuffling claims no amplification: the batch size does not matter.
    other = acc.compute_epsilon(60000, 1000, 15, 1.1, 1e-5, sampling="shuffle", accountant="rdp")
    assert other == pytest.approx(eps)
    # ... and a partial epoch counts as a whole one.
    spe = acc.steps_per_epoch(60000, 256, "shuffle")
    partial = acc.compute_epsilon(**MNIST, steps=14 * spe + 1, sampling="shuffle", accountant="rdp")
    assert partial == pytest.approx(eps)


@pytest.mark.parametrize(
    ("n", "batch", "sigma", "epochs", "delta"),
    [(60000, 256, 1.1, 60, 1e-5), (50000, 512, 0.8, 30, 1e-5), (10000, 100, 2.0, 5, 1e-5)],
)
def test_matches_dp_accounting_directly_for_tf_privacy_settings(n, batch, sigma, epochs, delta):
    # The same event TF Privacy builds, accounted by dp_accounting's accountants directly.
    steps = math.ceil(epochs * n / batch)
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(batch / n, dp_accounting.GaussianDpEvent(sigma)), steps
    )
    for accountant, fresh in (
        ("rdp", dp_accounting.rdp.RdpAccountant),
        ("pld", dp_accounting.pld.PLDAccountant),
    ):
        ref = fresh().compose(event).get_epsilon(delta)
        ours = acc.compute_epsilon(n, batch, steps=steps, noise_multiplier=sigma, delta=delta,
                                   accountant=accountant)  # fmt: skip
        assert ours == pytest.approx(ref, rel=1e-9)
        assert close(acc.compute_epsilon(n, batch, epochs, sigma, delta, accountant=accountant),
                     ref)  # fmt: skip


def test_pld_is_tighter_than_rdp_and_eps_grows_with_epochs():
    rdp = acc.compute_epsilon(**MNIST, epochs=15, accountant="rdp")
    pld = acc.compute_epsilon(**MNIST, epochs=15, accountant="pld")
    assert pld < rdp
    assert acc.compute_epsilon(**MNIST, epochs=30, accountant="rdp") > rdp


# ---------------------------------------------------------------- δ, steps, events


@pytest.mark.parametrize(
    ("n", "delta"),
    [(60000, 1e-6), (100000, 1e-6), (100001, 1e-7), (300, 1e-4), (1, 0.1), (1234567, 1e-8)],
)
def test_default_delta_is_a_power_of_ten_at_most_a_tenth_of_one_over_n(n, delta):
    assert acc.default_delta(n) == delta
    assert acc.default_delta(n) <= 1 / (10 * n) < 10 * acc.default_delta(n)


def test_steps_per_epoch_conventions():
    assert acc.steps_per_epoch(60000, 256) == 234  # round(234.375)
    assert acc.steps_per_epoch(60000, 256, "shuffle") == 235  # ceil
    assert acc.steps_per_epoch(100, 100) == 1
    assert acc.steps_per_epoch(10, 7) == 1


def test_dpsgd_event_shapes():
    ev = acc.dpsgd_event(n=1000, batch_size=10, noise_multiplier=1.0, steps=50)
    assert ev == dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(0.01, dp_accounting.GaussianDpEvent(1.0)), 50
    )
    sh = acc.dpsgd_event(n=1000, batch_size=10, noise_multiplier=1.0, steps=150, sampling="shuffle")
    assert sh == dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(1.0), 2)


def test_steps_override_epochs():
    a = acc.compute_epsilon(**MNIST, epochs=15, steps=234)
    b = acc.compute_epsilon(**MNIST, epochs=1)
    assert a == pytest.approx(b)


# ---------------------------------------------------------------- calibration


@pytest.mark.parametrize("accountant", ["rdp", "pld"])
def test_calibrate_noise_never_above_target_and_nearly_minimal(accountant):
    target = 2.0
    kw = {"n": 60000, "batch_size": 256, "epochs": 5, "delta": 1e-5, "accountant": accountant}
    sigma = acc.calibrate_noise(target, **kw)
    eps = acc.compute_epsilon(noise_multiplier=sigma, **kw)
    assert eps <= target
    assert acc.compute_epsilon(noise_multiplier=sigma * 0.99, **kw) > target  # smallest σ (1%)
    # (PLD searches on a coarser grid, then checks on the reporting one: still within 0.1%.)
    assert acc.compute_epsilon(noise_multiplier=sigma / 1.001, **kw) > target


@pytest.mark.parametrize("target, epochs", [(0.3, 15), (1.0, 50), (3.0, 15)])
def test_pld_calibration_is_minimal_on_the_reporting_grid(target, epochs):
    # σ is searched on a coarser PLD grid first: at small ε that grid alone gave σ 3.6% too
    # large (ε = 0.288 for a target of 0.3).
    kw = {"n": 60000, "batch_size": 256, "epochs": epochs, "delta": 1e-5}
    sigma = acc.calibrate_noise(target, **kw)
    assert acc.compute_epsilon(noise_multiplier=sigma, **kw) <= target
    assert acc.compute_epsilon(noise_multiplier=sigma / 1.001, **kw) > target


def test_calibrate_shuffle():
    sigma = acc.calibrate_noise(10.0, 60000, 256, 10, 1e-5, sampling="shuffle", accountant="rdp")
    assert acc.compute_epsilon(60000, 256, 10, sigma, 1e-5, sampling="shuffle",
                               accountant="rdp") <= 10.0  # fmt: skip


def test_unreachable_target_says_what_is_reachable():
    with pytest.raises(InvalidParameterError, match=r"unreachable.*Reachable targets are ≥"):
        acc.calibrate_noise(1e-6, 60000, 256, 15, 1e-5, accountant="rdp")
    with pytest.raises(InvalidParameterError, match="target_epsilon must be > 0"):
        acc.calibrate_noise(0, 60000, 256, 15)


def test_a_target_spent_by_earlier_runs_says_so_and_bounds_never_round_down():
    # A third fit under target_epsilon=2 once read "target ε=2 is unreachable: even σ=1000
    # gives ε=2 … Reachable targets are ≥ 2", and suggested smaller batches.
    prior = acc.dpsgd_event(n=2700, batch_size=100, noise_multiplier=0.9, steps=200)
    spent = acc.epsilon_of_event(prior, 1e-5, "rdp")
    with pytest.raises(InvalidParameterError, match="already spent") as err:
        acc.calibrate_noise(spent, 2700, 50, 3, 1e-5, accountant="rdp", prior=prior)
    assert "smaller batches" not in str(err.value)
    with pytest.raises(InvalidParameterError, match="unreachable") as err:
        acc.calibrate_noise(1e-6, 60000, 256, 15, 1e-5, accountant="rdp")
    shown = float(str(err.value).split("Reachable targets are ≥ ")[1].split(";")[0])
    floor = acc.compute_epsilon(60000, 256, 15, acc.MAX_NOISE_MULTIPLIER, 1e-5, accountant="rdp")
    assert floor <= shown <= floor * 1.001


# ---------------------------------------------------------------- curves


@pytest.mark.parametrize("accountant", ["rdp", "pld"])
@pytest.mark.parametrize("sampling", ["poisson", "shuffle"])
def test_curve_agrees_with_compute_epsilon_and_is_increasing(accountant, sampling):
    curve = acc.epsilon_curve(60000, 256, 6, 1.1, 1e-5, accountant=accountant, sampling=sampling)
    assert curve.epochs == [1, 2, 3, 4, 5, 6]
    spe = acc.steps_per_epoch(60000, 256, sampling)
    assert curve.steps == [k * spe for k in curve.epochs]
    assert curve.delta == 1e-5 and curve.accountant == accountant and curve.sampling == sampling
    assert all(b > a for a, b in zip(curve.epsilon, curve.epsilon[1:], strict=False))
    for k in (1, 6):
        exact = acc.compute_epsilon(60000, 256, k, 1.1, 1e-5, accountant=accountant,
                                    sampling=sampling)  # fmt: skip
        assert curve.epsilon[k - 1] == pytest.approx(exact, rel=0.005)
    doc = json.loads(json.dumps(curve.to_dict()))
    assert doc["epochs"] == curve.epochs and len(doc["epsilon"]) == 6


def test_curve_is_incremental(monkeypatch):
    # RDP: the accountant composes one epoch once; PLD: one Gaussian PLD is built once.
    calls = {"rdp": 0, "pld": 0}
    real_compose = dp_accounting.rdp.RdpAccountant.compose
    real_pld = acc._pld.from_gaussian_mechanism

    def count_compose(self, *a, **k):
        calls["rdp"] += 1
        return real_compose(self, *a, **k)

    def count_pld(*a, **k):
        calls["pld"] += 1
        return real_pld(*a, **k)

    monkeypatch.setattr(dp_accounting.rdp.RdpAccountant, "compose", count_compose)
    monkeypatch.setattr(acc._pld, "from_gaussian_mechanism", count_pld)
    acc.epsilon_curve(60000, 256, 40, 1.1, accountant="rdp")
    assert calls == {"rdp": 1, "pld": 0}
    calls["rdp"] = 0
    acc.epsilon_curve(60000, 256, 40, 1.1, accountant="pld", value_discretization_interval=1e-3)
    assert calls == {"rdp": 1, "pld": 1}  # rdp: the whole-run size check before PLD


def test_coarse_pld_curve_is_a_pessimistic_bound():
    fine = acc.epsilon_curve(60000, 256, 10, 1.1)
    coarse = acc.epsilon_curve(60000, 256, 10, 1.1, value_discretization_interval=1e-3)
    for f, c in zip(fine.epsilon, coarse.epsilon, strict=True):
        assert f <= c <= f * 1.01


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n": 0}, "n .dataset size. must be at least 1"),
        ({"n": -5}, "at least 1"),
        ({"batch_size": 0}, "batch_size must be at least 1"),
        ({"batch_size": 70000}, "larger than the dataset"),
        ({"epochs": 0}, "epochs must be at least 1"),
        ({"epochs": 1.5}, "whole number"),
        ({"noise_multiplier": -1.0}, "noise_multiplier must be ≥ 0"),
        ({"noise_multiplier": float("nan")}, "finite"),
        ({"delta": 0.0}, "between 0 and 1"),
        ({"delta": 1.0}, "between 0 and 1"),
        ({"delta": 2e-5}, "not below 1/n"),
        ({"sampling": "uniform"}, "sampling must be one of"),
        ({"accountant": "moments"}, "accountant must be one of"),
    ],
)
def test_bad_input_is_refused_with_a_reason(kwargs, message):
    args = dict(MNIST, epochs=15) | kwargs
    with pytest.raises(InvalidParameterError, match=message):
        acc.compute_epsilon(**args)


def test_delta_at_one_over_n_explains_why():
    with pytest.raises(InvalidParameterError, match="publishes one random example"):
        acc.validate(100000, 256, delta=1e-5)


def test_sigma_zero_only_when_explicit_and_then_infinite():
    with pytest.raises(InvalidParameterError, match="no privacy"):
        acc.validate(60000, 256, epochs=1, noise_multiplier=0.0)
    assert acc.validate(60000, 256, epochs=1, noise_multiplier=0.0, allow_no_noise=True) == 1e-6
    with pytest.warns(RuntimeWarning, match="NO PRIVACY"):
        assert acc.compute_epsilon(60000, 256, 1, 0.0) == math.inf
    with pytest.warns(RuntimeWarning):
        curve = acc.epsilon_curve(60000, 256, 3, 0.0)
    assert curve.epsilon == [math.inf] * 3
    assert curve.to_dict()["epsilon"] == [None, None, None]


def test_no_tensorflow_or_ipython_import():
    code = (
        "import sys, kprivacy_nb.dp.accounting, kprivacy_nb.dp.ledger;"
        "print(sorted(m for m in ('tensorflow', 'keras', 'IPython', 'ipywidgets') "
        "if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_huge_epsilon_under_pld_falls_back_to_the_rdp_bound_loudly():
    # A PLD grid for ε in the thousands would need GBs: the RDP upper bound is reported instead.
    with pytest.warns(RuntimeWarning, match="RDP upper bound"):
        eps = acc.compute_epsilon(60000, 256, 15, 0.1, 1e-5, accountant="pld")
    assert eps == pytest.approx(acc.compute_epsilon(60000, 256, 15, 0.1, 1e-5, accountant="rdp"))
    assert eps > acc.PLD_MAX_EPSILON
    with pytest.warns(RuntimeWarning, match="uses the RDP accountant"):
        curve = acc.epsilon_curve(60000, 256, 3, 0.1, accountant="pld")
    assert curve.accountant == "rdp"


def test_rdp_orders_left_out_are_not_logged(caplog):
    """dp-accounting logs a warning for every RDP order whose series does not converge (7 at
    q = 0.2, σ = 1); the order is just left out of the bound, so these stay quiet."""
    import logging

    logger = logging.getLogger("absl")
    ours = [f for f in logger.filters if type(f).__name__ == "_OrderLeftOut"]
    assert len(ours) == 1
    event = acc.dpsgd_event(n=40, batch_size=8, noise_multiplier=1.0, steps=5)
    caplog.set_level(logging.WARNING, logger="absl")
    logger.removeFilter(ours[0])
    try:
        acc.make_accountant("rdp").compose(event).get_epsilon(1e-3)
        assert any("Excluding this order" in r.getMessage() for r in caplog.records)
    finally:
        logger.addFilter(ours[0])
    caplog.clear()
    eps = acc.compute_epsilon(40, 8, 1, 1.0, 1e-3)
    assert math.isfinite(eps)
    assert not [r for r in caplog.records if "Excluding this order" in r.getMessage()]
