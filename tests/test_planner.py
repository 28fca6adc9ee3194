"""The budget planner widget (no browser) and the %dp_budget / %dp_ledger magics."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from IPython.core.error import UsageError

from kprivacy_nb.dp import accounting as acc
from kprivacy_nb.dp.ledger import Ledger
from kprivacy_nb.magics.budget import BudgetView, LedgerTable
from kprivacy_nb.widgets._common import Debouncer
from kprivacy_nb.widgets.planner import BudgetPlanner


def test_planner_defaults_match_the_accounting_core():
    p = BudgetPlanner(n=60000, batch_size=256, epochs=15, noise_multiplier=1.1, accountant="rdp")
    exact = acc.compute_epsilon(60000, 256, 15, 1.1, 1e-6, accountant="rdp")
    assert p.error is None
    assert p.epsilon == pytest.approx(exact)
    assert p.steps == 15 * 234 and p.delta == 1e-6 and p.noise_multiplier == 1.1
    assert "δ = 1e-06: defaulted" in p.summary.value
    xs, ys = p.line.get_data()
    assert list(xs) == list(range(1, 16))
    assert np.allclose(ys, p.curve.epsilon)
    assert p.image.value[:4] == b"\x89PNG"
    assert f"ε = {exact:.4f}" in p.summary.value


def test_pld_planner_is_an_upper_bound_close_to_exact():
    p = BudgetPlanner(n=60000, batch_size=256, epochs=15, noise_multiplier=1.1)
    exact = p.exact_epsilon()
    assert exact == pytest.approx(acc.compute_epsilon(60000, 256, 15, 1.1, 1e-6))
    assert exact <= p.epsilon <= exact * 1.01
    assert "upper bound" in p.summary.value


def test_changing_inputs_recomputes_state_and_plot():
    p = BudgetPlanner(n=60000, batch_size=256, epochs=5, noise_multiplier=1.1, accountant="rdp")
    before = p.epsilon
    p.epochs_slider.value = 30
    assert len(p.curve.epsilon) == 30 and len(p.line.get_xdata()) == 30
    assert p.epsilon > before
    p.sigma_slider.value = 2.0
    assert p.noise_multiplier == 2.0
    assert p.epsilon == pytest.approx(acc.compute_epsilon(60000, 256, 30, 2.0, 1e-6,
                                                          accountant="rdp"))  # fmt: skip
    p.sampling_dd.value = "shuffle"
    assert p.curve.sampling == "shuffle" and "no amplification" in p.summary.value
    assert "--sampling shuffle" in p.fit_line


def test_delta_follows_n_until_typed():
    p = BudgetPlanner(n=60000, batch_size=256, epochs=2, accountant="rdp")
    p.n_input.value = 200000
    assert p.delta_input.value == 1e-7 and p.delta == 1e-7  # ≤ 1/(10·n)
    p.delta_input.value = 1e-8
    p.n_input.value = 3000
    assert p.delta == 1e-8  # typed: it stays
    assert "defaulted" not in p.summary.value


def test_target_epsilon_mode_calibrates_sigma():
    p = BudgetPlanner(n=60000, batch_size=256, epochs=10, target_epsilon=2.0, accountant="rdp")
    assert p.mode.value == "target" and p.sigma_slider.disabled
    sigma = p.noise_multiplier
    assert acc.compute_epsilon(60000, 256, 10, sigma, 1e-5, accountant="rdp") <= 2.0
    assert p.epsilon <= 2.0
    assert f"{sigma:.4f}" in p.summary.value
    assert "--target-epsilon 2 " in p.fit_line and "--noise-multiplier" not in p.fit_line
    p.target_input.value = 4.0
    assert p.noise_multiplier < sigma
    p.mode.value = "sigma"
    assert p.noise_multiplier == p.sigma_slider.value


def test_copy_button_puts_the_dp_fit_line_in_the_output():
    p = BudgetPlanner(n=50000, batch_size=128, epochs=7, noise_multiplier=0.9, accountant="rdp",
                      model="net", x="xs", y="ys")  # fmt: skip
    assert p.fit_output.value == ""
    p.copy_button.click()
    expected = (
        "%dp_fit net xs ys --epochs 7 --batch-size 128 --noise-multiplier 0.9 --delta 1e-06 "
        "--accountant rdp"
    )
    assert p.fit_output.value == p.fit_line == expected


def test_ledger_remaining_budget_line(kp_home):
    with Ledger() as led:
        led.create("customers", 3.0, 1e-5, accountant="rdp")
        led.reserve("customers", acc.dpsgd_event(n=60000, batch_size=256, noise_multiplier=1.1,
                                                 steps=234 * 5)).settle()  # fmt: skip
        remaining = led.budget("customers").remaining_epsilon
    p = BudgetPlanner(n=60000, batch_size=256, epochs=40, noise_multiplier=1.1,
                      accountant="rdp", ledger="customers")  # fmt: skip
    assert p.remaining_epsilon == pytest.approx(remaining)
    assert p.budget_line.get_visible()
    assert list(p.budget_line.get_ydata()) == pytest.approx([remaining, remaining])
    assert "--ledger customers" in p.fit_line
    assert f"{p.curve.epochs_within(remaining)} epoch(s)" in p.summary.value
    p.ledger_dd.value = "(none)"
    assert p.remaining_epsilon is None and not p.budget_line.get_visible()


def test_unknown_ledger_is_refused(kp_home):
    with pytest.raises(Exception, match="no budget named 'nope'"):
        BudgetPlanner(ledger="nope")


def test_bad_settings_show_an_error_instead_of_crashing():
    p = BudgetPlanner(n=1000, batch_size=100, epochs=3, noise_multiplier=1.0, accountant="rdp")
    p.batch_input.value = 5000
    assert p.error and "larger than the dataset" in p.error
    assert p.curve is None and p.fit_line == "" and "⚠" in p.summary.value
    assert len(p.line.get_xdata()) == 0
    p.batch_input.value = 10
    assert p.error is None and p.curve is not None


def test_debouncer_coalesces_calls_inside_an_event_loop():
    calls = []
    d = Debouncer(lambda: calls.append(1), delay=0.05)
    d.trigger()
    assert calls == [1]  # no running loop: immediate

    async def drag():
        for _ in range(10):
            d.trigger()
            await asyncio.sleep(0.005)
        assert d.pending and calls == [1]
        await asyncio.sleep(0.15)

    asyncio.run(drag())
    assert calls == [1, 1]


def test_sliders_only_update_on_release():
    p = BudgetPlanner(epochs=3, accountant="rdp")
    assert p.epochs_slider.continuous_update is False
    assert p.sigma_slider.continuous_update is False


# ---------------------------------------------------------------- magics


def test_dp_budget_magic_prefills_the_planner(ip):
    p = ip.run_line_magic(
        "dp_budget", "--n 50000 --batch-size 500 --epochs 4 --noise-multiplier 1.3 "
        "--accountant rdp"
    )  # fmt: skip
    assert isinstance(p, BudgetPlanner)
    assert (p.n_input.value, p.batch_input.value, p.epochs_slider.value) == (50000, 500, 4)
    assert p.noise_multiplier == 1.3 and p.accountant_dd.value == "rdp"
    assert p.epsilon == pytest.approx(acc.compute_epsilon(50000, 500, 4, 1.3, 1e-6,
                                                          accountant="rdp"))  # fmt: skip
    t = ip.run_line_magic("dp_budget", "--n 50000 --batch-size 500 --epochs 4 --target-epsilon 3"
                          " --accountant rdp")  # fmt: skip
    assert t.mode.value == "target" and t.epsilon <= 3


def test_dp_budget_magic_config_and_errors(ip):
    ip.run_line_magic("config", 'BudgetMagics.accountant = "rdp"')
    try:
        p = ip.run_line_magic("dp_budget", "--n 1000 --batch-size 10 --epochs 2")
        assert p.accountant_dd.value == "rdp"
    finally:
        ip.run_line_magic("config", 'BudgetMagics.accountant = "pld"')
    with pytest.raises(UsageError, match="larger than the dataset"):
        ip.run_line_magic("dp_budget", "--n 10 --batch-size 100")
    with pytest.raises(UsageError, match="not both"):
        ip.run_line_magic("dp_budget", "--noise-multiplier 1 --target-epsilon 2")
    with pytest.raises(UsageError, match="no budget named"):
        ip.run_line_magic("dp_budget", "--ledger missing")


def test_dp_ledger_magic_lifecycle(ip, kp_home):
    empty = ip.run_line_magic("dp_ledger", "")
    assert isinstance(empty, LedgerTable) and "No budgets" in empty._repr_html_()
    created = ip.run_line_magic("dp_ledger", "create customers --epsilon 8 --delta 1e-5")
    assert [b.name for b in created.budgets] == ["customers"]
    with Ledger() as led:
        for _ in range(2):
            led.reserve("customers", acc.dpsgd_event(n=60000, batch_size=256,
                                                     noise_multiplier=1.1, steps=234)).settle()  # fmt: skip
        spent = led.budget("customers").spent_epsilon
    table = ip.run_line_magic("dp_ledger", "")
    html = table._repr_html_()
    assert "customers" in html and f"{spent:.4g}" in html and "width:" in html  # the bar
    assert "customers" in repr(table)
    view = ip.run_line_magic("dp_ledger", "show customers --plot")
    assert isinstance(view, BudgetView) and view.figure is not None
    assert len(view.cumulative) == 2 and view.cumulative[-1][1] == pytest.approx(spent)
    assert "data:image/png;base64," in view._repr_html_()
    with pytest.raises(UsageError, match="already exists"):
        ip.run_line_magic("dp_ledger", "create customers --epsilon 8 --delta 1e-5")
    with pytest.raises(UsageError, match="--yes"):
        ip.run_line_magic("dp_ledger", "delete customers")
    ip.run_line_magic("dp_ledger", "delete customers --yes")
    assert ip.run_line_magic("dp_ledger", "").budgets == []


def test_dp_ledger_magic_bad_input(ip):
    with pytest.raises(UsageError, match="no budget named 'ghost'"):
        ip.run_line_magic("dp_ledger", "show ghost")
    with pytest.raises(UsageError, match="needs --epsilon"):
        ip.run_line_magic("dp_ledger", "create x --delta 1e-5")
    with pytest.raises(UsageError, match="unknown %dp_ledger action"):
        ip.run_line_magic("dp_ledger", "explode x")
    with pytest.raises(UsageError, match="needs a budget name"):
        ip.run_line_magic("dp_ledger", "show")


def test_corrupted_ledger_through_the_magic(ip, kp_home):
    (kp_home / "ledger.sqlite3").write_bytes(b"garbage" * 1000)
    with pytest.raises(UsageError, match="corrupted"):
        ip.run_line_magic("dp_ledger", "")


def test_magics_have_help_with_examples(ip):
    from kprivacy_nb.magics.budget import BudgetMagics

    for name in ("dp_budget", "dp_ledger"):
        doc = getattr(BudgetMagics, name).__doc__
        assert "Example" in doc and f"%{name}" in doc and "--" in doc
