"""Empirical privacy audit: the statistics (Clopper–Pearson, ε lower bounds, AUC), membership
inference on a trained model, the one-run canary audit end to end, and ``%dp_audit``.

The end-to-end one-run tests are the regression test of the DP engine an audit is for: a DP run
must never be shown to have ε above its proven ε, and a run whose engine lies about its ε (trained
without noise, reported at ε = 1) must be caught.
"""

from __future__ import annotations

import math
import os
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from IPython.core.error import UsageError  # noqa: E402

from kprivacy_nb import audit  # noqa: E402
from kprivacy_nb.audit import stats  # noqa: E402
from kprivacy_nb.dp import accounting, trainer  # noqa: E402
from kprivacy_nb.errors import InvalidParameterError  # noqa: E402

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
D, K = 20, 4

# --------------------------------------------------------------------------- statistics


def test_clopper_pearson_matches_known_values():
    lo, hi = audit.clopper_pearson(5, 10)
    assert lo == pytest.approx(0.187086, abs=1e-6) and hi == pytest.approx(0.812914, abs=1e-6)
    assert audit.clopper_pearson(0, 10) == (0.0, pytest.approx(0.308497, abs=1e-6))
    assert audit.clopper_pearson(10, 10) == (pytest.approx(0.691503, abs=1e-6), 1.0)
    lo, hi = audit.clopper_pearson(5, 10, side="lower")  # one-sided 95%: all α in one tail
    assert lo == pytest.approx(0.222441, abs=1e-6) and hi == 1.0


@pytest.mark.parametrize("p", [0.03, 0.3, 0.5])
def test_clopper_pearson_covers_at_least_the_confidence(p):
    """Exact coverage (summing the binomial pmf over k): never below 95% — an interval that is
    too narrow, or with the tails swapped, fails this."""
    n = 40
    ks = np.arange(n + 1)
    lo, hi = audit.clopper_pearson(ks, np.full(n + 1, n))
    pmf = np.array([math.comb(n, k) * p**k * (1 - p) ** (n - k) for k in ks])
    coverage = pmf[(lo <= p) & (p <= hi)].sum()
    assert 0.95 <= coverage < 0.999


def test_epsilon_from_rates_and_counts():
    assert audit.epsilon_from_rates(0.5, 0.05) == pytest.approx(math.log(10))
    assert audit.epsilon_from_rates(0.5, 0.05, delta=0.1) == pytest.approx(math.log(8))
    assert audit.epsilon_from_rates(0.99, 0.5) == pytest.approx(math.log(0.5 / 0.01))  # TNR/FNR
    assert audit.epsilon_from_rates(0.3, 0.3) == 0.0  # random guessing implies nothing
    # With counts the rates are replaced by their confidence bounds: smaller than the point ε.
    point = audit.epsilon_from_rates(50 / 100, 5 / 100)
    bounded = audit.epsilon_from_counts(50, 100, 5, 100)
    assert 0 < bounded < point
    assert audit.epsilon_from_counts(500, 1000, 50, 1000) > bounded  # more data, tighter bound


def test_one_run_bound_perfect_attack_grows_with_guesses_and_matches_closed_form():
    bounds = [audit.one_run_epsilon(r, r, r, delta=0.0) for r in (10, 100, 1000)]
    assert 0 < bounds[0] < bounds[1] < bounds[2]
    # δ = 0: P[all r right] = q^r ≤ 0.05 ⇔ q ≥ 0.05^(1/r); ε = logit(q).
    q = 0.05 ** (1 / 100)
    assert bounds[1] == pytest.approx(math.log(q / (1 - q)), abs=1e-5)
    with_delta = audit.one_run_epsilon(1000, 1000, 1000, delta=1e-5)
    assert 0 < with_delta < bounds[2]  # δ > 0 only ever weakens the bound


def test_one_run_bound_is_zero_for_random_guessing_and_monotone():
    assert audit.one_run_epsilon(1000, 1000, 500, delta=1e-5) == 0.0
    assert audit.one_run_epsilon(1000, 1000, 520, delta=1e-5) == 0.0  # within chance
    by_correct = [audit.one_run_epsilon(1000, 1000, v, delta=1e-5) for v in (600, 700, 800, 900)]
    assert by_correct == sorted(by_correct) and by_correct[0] > 0
    by_delta = [audit.one_run_epsilon(1000, 500, 450, delta=d) for d in (0, 1e-6, 1e-4)]
    assert by_delta[0] > by_delta[1] > by_delta[2]
    by_conf = [audit.one_run_epsilon(1000, 500, 450, 1e-5, c) for c in (0.9, 0.95, 0.99)]
    assert by_conf[0] > by_conf[1] > by_conf[2]


def test_one_run_p_value_matches_exact_binomial_sums():
    m, r, v, eps, delta = 50, 30, 24, 0.7, 1e-3
    q = math.exp(eps) / (1 + math.exp(eps))
    pmf = [math.comb(r, j) * q**j * (1 - q) ** (r - j) for j in range(r + 1)]
    tail = sum(pmf[v:])
    alpha = max(sum(pmf[v - i : v]) / i for i in range(1, v + 1))
    expected = tail + alpha * 2 * m * delta
    assert audit.one_run_p_value(m, r, v, eps, delta) == pytest.approx(expected, rel=1e-9)


def test_one_run_bound_holds_for_a_truly_eps_dp_mechanism():
    """Randomised response at ε = 1 *is* 1-DP: the 95% bound may exceed 1 in at most ~5% of
    trials (an optimistic bound, or one without the Bonferroni step, exceeds it far more)."""
    rng = np.random.default_rng(0)
    eps, m, trials = 1.0, 200, 300
    q = math.exp(eps) / (1 + math.exp(eps))
    over = 0
    for _ in range(trials):
        included = rng.random(m) < 0.5
        # The ε-DP output: each canary's bit reported truthfully with probability q.
        reported = np.where(rng.random(m) < q, included, ~included)
        scores = reported + rng.random(m) * 0.1  # ties broken at random
        guess, _ = stats.best_guess(scores, included, delta=0.0)
        over += guess.epsilon > eps
    assert over / trials <= 0.05 + 2 * math.sqrt(0.05 * 0.95 / trials)


def test_abstaining_guesses_use_the_extremes():
    scores = np.arange(100.0)
    included = scores >= 50  # a perfect score
    guess, shapes = stats.best_guess(scores, included, delta=0.0, guesses=(20, 20))
    assert (guess.k_in, guess.k_out, guess.correct, shapes) == (20, 20, 40, 1)
    guess, shapes = stats.best_guess(scores, ~included, delta=0.0, guesses=40)
    assert guess.correct == 0 and guess.epsilon == 0.0
    with pytest.raises(InvalidParameterError, match="guesses"):
        stats.best_guess(scores, included, delta=0.0, guesses=101)


# --------------------------------------------------------------------------- ROC


def _hand_auc(s_in, s_out):
    return sum(1.0 if a > b else 0.5 if a == b else 0.0 for a in s_in for b in s_out) / (
        len(s_in) * len(s_out)
    )


def test_auc_and_delong_match_hand_computation():
    rng = np.random.default_rng(3)
    s_in = np.round(rng.normal(0.7, 1, 60), 1)  # rounding makes ties
    s_out = np.round(rng.normal(0, 1, 45), 1)
    assert audit.auc(s_in, s_out) == pytest.approx(_hand_auc(s_in, s_out), abs=1e-12)
    curve = audit.roc(s_in, s_out)
    assert np.trapezoid(curve.tpr, curve.fpr) == pytest.approx(curve.auc, abs=1e-12)
    # DeLong by its definition: ψ matrix, structural components, their variances.
    psi = (s_in[:, None] > s_out[None]) + 0.5 * (s_in[:, None] == s_out[None])
    var = psi.mean(1).var(ddof=1) / len(s_in) + psi.mean(0).var(ddof=1) / len(s_out)
    lo, hi = audit.delong_interval(s_in, s_out)
    assert (hi - lo) / 2 == pytest.approx(1.959964 * math.sqrt(var), rel=1e-5)
    # The reports' interval is DeLong's, widened where the score interval is wider.
    assert curve.auc_interval[0] <= lo and curve.auc_interval[1] >= hi
    assert audit.auc([1, 2, 3], [0, 0.5]) == 1.0 and audit.auc([0], [0]) == 0.5
    big_in, big_out = rng.normal(0.3, 1, 800), rng.normal(0, 1, 700)  # the ranking path
    assert audit.auc(big_in, big_out) == pytest.approx(_hand_auc(big_in, big_out), abs=1e-12)


def test_auc_interval_behaves_at_the_edges_and_with_few_scores():
    """At perfect separation the interval keeps a width (DeLong's is a point), and with 5 scores
    a side it covers the true AUC of 0.5 at least ~95% of the time (DeLong's: about 90%)."""
    for n in (5, 1000):
        lo, hi = audit.roc(np.arange(n) + n, np.arange(n)).auc_interval
        assert hi == 1.0 and 0.5 < lo < 1.0, (n, lo)
    assert audit.delong_interval(np.arange(5) + 5, np.arange(5)) == (1.0, 1.0)
    lo, hi = audit.score_interval(1.0, 1000, 1000)
    assert 0.99 < lo < 1.0 and hi == 1.0
    rng = np.random.default_rng(0)
    runs = 2000
    covered = sum(
        lo <= 0.5 <= hi
        for lo, hi in (audit.roc(rng.normal(size=5), rng.normal(size=5)).auc_interval
                       for _ in range(runs))
    )  # fmt: skip
    assert covered / runs >= 0.94, covered / runs  # measured 0.945; DeLong alone 0.901


def test_tpr_at_fpr_is_the_best_tpr_within_the_fpr():
    s_out = np.arange(100.0)  # non-members 0..99
    s_in = np.r_[[99.5, 98.5, 97.2], np.zeros(7)]  # 3 members above most non-members
    curve = audit.roc(s_in, s_out)
    assert curve.tpr_at[1e-2] == pytest.approx(0.2)  # FPR ≤ 1% allows one non-member (99)
    assert curve.tpr_at[1e-1] == pytest.approx(0.3)
    assert curve.tpr_at[1e-3] is None  # 100 non-members cannot measure FPR 10⁻³


# --------------------------------------------------------------------------- MIA soundness
# The attacks on precomputed losses (no training): on a model that saw neither set, members and
# non-members are draws from one distribution, so a sound attack shows ε > 0 in at most ~5% of
# runs; and on randomised response at ε = 1 (members confident with probability e/(1+e),
# non-members with 1/(1+e)) its bound exceeds 1 in at most ~5%.

CONFIDENT, UNSURE = math.log1p(math.exp(-5.0)), math.log(2.0)  # cross-entropy at margin 5 and 0


def _tied(rng, n):
    """Two outputs, half each (a model on data with duplicate rows): one class."""
    return np.where(rng.random(n) < 0.5, CONFIDENT, UNSURE), np.zeros(n, int)


def _tabular(rng, n):
    """Tabular data with 8 distinct rows, two classes: every loss is one of 16 values."""
    x = rng.integers(0, 2, (n, 3))
    labels = (x.sum(1) + (rng.random(n) < 0.3)) % 2
    return np.linspace(0.05, 2.0, 16).reshape(8, 2)[x @ [1, 2, 4], labels], labels


def _small_classes(rng, n, k=300):
    """Continuous losses, 300 classes: about 3 non-members per class."""
    return np.log1p(np.exp(-rng.normal(0, 1.5, n))), rng.integers(0, k, n)


def _null_rate(draw, n_in, n_out, runs, attack="calibrated"):
    rng = np.random.default_rng(0)
    shown = 0
    for i in range(runs):
        (l_in, y_in), (l_out, y_out) = draw(rng, n_in), draw(rng, n_out)
        report = audit.membership_inference_from_losses(
            l_in, l_out, labels_in=y_in, labels_out=y_out, attack=attack, seed=i
        )
        shown += report.epsilon_lower_bound > 0
    return shown / runs


def _allowed(runs, rate=0.05):
    return rate + 2 * math.sqrt(rate * (1 - rate) / runs)


@pytest.mark.parametrize(
    ("draw", "n_in", "n_out", "runs"),
    [(_tied, 1000, 1000, 200), (_tabular, 1000, 1000, 200), (_small_classes, 3000, 1000, 80)],
    ids=["tied", "tabular-ties", "small-classes"],
)
@pytest.mark.parametrize("attack", ["loss", "calibrated"])
def test_membership_inference_shows_nothing_on_a_model_that_saw_neither_set(
    draw, n_in, n_out, runs, attack
):
    """The calibration must treat members and non-members alike (the old one standardised each
    non-member against the *other* non-members only: > 0 in 100% of tied runs, ~30% here with
    small classes)."""
    if attack == "loss" and draw is _small_classes:
        runs = 20  # the loss attack ignores classes: a few runs are enough
    rate = _null_rate(draw, n_in, n_out, runs, attack)
    assert rate <= _allowed(runs), rate


def test_calibrated_bound_holds_for_randomised_response():
    eps, n, runs = 1.0, 2000, 200
    p = math.exp(eps) / (1 + math.exp(eps))
    rng = np.random.default_rng(1)
    over = 0
    for i in range(runs):
        l_in = np.where(rng.random(n) < p, CONFIDENT, UNSURE)
        l_out = np.where(rng.random(n) < 1 - p, CONFIDENT, UNSURE)
        zeros = np.zeros(n, int)
        report = audit.membership_inference_from_losses(
            l_in, l_out, labels_in=zeros, labels_out=zeros, attack="calibrated", seed=i
        )
        over += report.epsilon_lower_bound > eps
    assert over / runs <= _allowed(runs), over / runs


def test_calibrated_attack_scores_identical_outputs_identically():
    """A model whose logits are its inputs, shown rows of two kinds in both sets: members and
    non-members get exactly the same two scores, and nothing is shown (the old calibration gave
    them different scores, a bound > 0 and a false alarm against ε = 2)."""
    model = keras.Sequential(
        [keras.Input((2,)), keras.layers.Dense(2, use_bias=False, kernel_initializer="identity")]
    )
    model.compile(loss=LOSS)
    rng = np.random.default_rng(0)

    def draw(n):
        rows = np.where(rng.random(n)[:, None] < 0.5, [[5.0, 0.0]], [[0.0, 0.0]])
        return rows.astype("float32"), np.zeros(n, int)

    with warnings.catch_warnings():
        warnings.simplefilter("error", audit.EpsilonExceededWarning)
        report = audit.membership_inference(
            model, draw(2000), draw(2000), attack="calibrated", epsilon=2.0, delta=1e-5
        )
    assert set(np.unique(report.scores_in)) == set(np.unique(report.scores_out))
    assert len(np.unique(report.scores_in)) == 2
    assert report.epsilon_lower_bound == 0 and not report.exceeds_proven
    assert report.n_reference == 1000 and report.roc.n_out == 1000
    assert "only calibrate" in report._repr_html_()


def _separated(n=400, shift=3.0, seed=0):
    """Losses of members far below those of non-members: a strong (heuristic) bound."""
    rng = np.random.default_rng(seed)
    return np.exp(rng.normal(-shift, 1, n)), np.exp(rng.normal(0, 1, n))


def test_a_membership_bound_above_the_proven_epsilon_is_loud():
    """repr/str, the verdict, summary() and a dedicated warning all say it (not only the HTML)."""
    l_in, l_out = _separated()
    with pytest.warns(audit.EpsilonExceededWarning, match="ABOVE THE PROVEN ε"):
        report = audit.membership_inference_from_losses(l_in, l_out, epsilon=0.1, delta=1e-5)
    assert report.exceeds_proven and report.epsilon_lower_bound > 1
    for text in (repr(report), str(report), report.verdict):
        assert "⚠ ABOVE THE PROVEN ε" in text and "one_run" in text, text
    assert report.summary()["exceeds_proven"] is True
    with warnings.catch_warnings():
        warnings.simplefilter("error", audit.EpsilonExceededWarning)  # below the proven ε: quiet
        quiet = audit.membership_inference_from_losses(l_in, l_out, epsilon=50.0, delta=1e-5)
    assert "ABOVE" not in repr(quiet) and "Consistent with the guarantee" in quiet.verdict


def test_membership_verdicts_say_the_bound_is_heuristic():
    l_in, l_out = _separated()
    leak = audit.membership_inference_from_losses(l_in, l_out)
    assert leak.epsilon_lower_bound > 1 and leak.proven_epsilon is None
    for text in (leak.verdict, repr(leak), leak._repr_html_()):
        assert "heuristic" in text, text
    assert "independent" in leak.verdict and "audit.one_run is the rigorous audit" in leak.verdict
    assert "at 95% confidence" not in leak.verdict


# --------------------------------------------------------------------------- training helpers


def _data(n=600, seed=0, scale=1.0, d=D):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(K, d)) * scale
    y = rng.integers(0, K, n)
    x = (centers[y] + rng.normal(size=(n, d))).astype("float32")
    return x, y


def make_model():
    model = keras.Sequential(
        [keras.Input((D,)), keras.layers.Dense(128, activation="relu"), keras.layers.Dense(K)]
    )
    model.compile(loss=LOSS)
    return model


# Same training in every one-run test; only the privacy differs.
RUN = dict(canaries=200, epochs=30, batch_size=50, optimizer="adam", learning_rate=1e-2,
           l2_norm_clip=10.0, delta=1e-5, seed=1)  # fmt: skip
# The grouped-convolution audit: a small clipping norm, so a missing clip factor is a large leak
# (RDP: its σ is calibrated in milliseconds).
GCONV_RUN = dict(RUN, l2_norm_clip=0.1, accountant="rdp")


# --------------------------------------------------------------------------- membership inference


@pytest.fixture(scope="module")
def overfit():
    """A model that memorised 200 examples with 30% random labels, and 200 non-members."""
    keras.utils.set_random_seed(0)
    x, y = _data(400, scale=0.5)
    noisy = np.random.default_rng(1).random(400) < 0.3
    y = np.where(noisy, (y + 1) % K, y)
    model = make_model()
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss=LOSS)
    model.fit(x[:200], y[:200], epochs=60, batch_size=32, verbose=0)
    return model, (x[:200], y[:200]), (x[200:], y[200:])


@pytest.mark.parametrize("attack", ["loss", "calibrated"])
def test_membership_inference_on_an_overfit_model(overfit, attack):
    model, train, holdout = overfit
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = audit.membership_inference(
            model, train, holdout, attack=attack, epsilon=1.0, delta=1e-5
        )
    warned = any(issubclass(w.category, audit.EpsilonExceededWarning) for w in caught)
    assert report.auc > 0.7 and report.auc_interval[0] > 0.5
    assert report.epsilon_lower_bound > 0.5
    assert report.tpr_at[1e-1] > 0.1 and report.tpr_at[1e-3] is None
    assert {s.label for s in report.slices} == set(range(K))
    assert all(s.auc > 0.5 for s in report.slices)
    html = report._repr_html_()
    assert "not a guarantee" in html and "data:image/png;base64," in html
    assert "proven ε" in html and "By class" in html
    assert report.exceeds_proven == (report.epsilon_lower_bound > 1.0) == warned


def test_membership_inference_on_a_fresh_model_finds_nothing(overfit):
    _, train, holdout = overfit
    keras.utils.set_random_seed(5)
    report = audit.membership_inference(make_model(), train, holdout)
    assert report.auc_interval[0] < 0.5 < report.auc_interval[1]
    assert report.epsilon_lower_bound < 0.5


def test_membership_inference_refuses_bad_shapes_with_clear_messages(overfit):
    model, (x, y), (xh, yh) = overfit
    with pytest.raises(InvalidParameterError, match="x has 200 rows but y has 199"):
        audit.membership_inference(model, (x, y[:-1]), (xh, yh))
    with pytest.raises(
        InvalidParameterError, match=r"rows have shape \(5,\) but the model expects \(20,\)"
    ):
        audit.membership_inference(model, (x[:, :5], y), (xh, yh))
    with pytest.raises(InvalidParameterError, match="labels go from 1 to 4 .* classes 0…3"):
        audit.membership_inference(model, (x, y), (xh, yh + 1))
    as_lists = audit.membership_inference(model, (x.tolist(), list(y)), (xh, yh))  # rows
    assert as_lists.auc == audit.membership_inference(model, (x, y), (xh, yh)).auc
    with pytest.raises(InvalidParameterError, match="pair"):
        audit.membership_inference(model, x, (xh, yh))
    with pytest.raises(InvalidParameterError, match="attack"):
        audit.membership_inference(model, (x, y), (xh, yh), attack="lira")
    with pytest.raises(InvalidParameterError, match="at least 6 holdout"):
        audit.membership_inference(model, (x, y), (xh[:5], yh[:5]), attack="calibrated")
    tiny = audit.membership_inference(model, (x, y), (xh[:3], yh[:3]))
    assert "Only 200 members and 3 non-members scored" in tiny._repr_html_()
    assert "approximate" in tiny._repr_html_()


def test_membership_inference_refuses_what_it_cannot_compare_or_run(overfit):
    model, train, holdout = overfit
    for bad in (-1.0, float("nan"), "one"):
        with pytest.raises(InvalidParameterError, match="epsilon .*must be a number ≥ 0"):
            audit.membership_inference(model, train, holdout, epsilon=bad, delta=1e-5)
    with pytest.raises(InvalidParameterError, match="needs the δ of that guarantee"):
        audit.membership_inference(model, train, holdout, epsilon=1.0)
    with pytest.raises(InvalidParameterError, match="needs the δ"):
        audit.membership_inference_from_losses([0.1, 0.2], [0.3, 0.4], epsilon=1.0)
    for bad in (0, -5, 2.5, True):
        with pytest.raises(InvalidParameterError, match="batch_size must be an integer ≥ 1"):
            audit.membership_inference(model, train, holdout, batch_size=bad)
    for bad in (None, np.zeros(3), "model"):
        with pytest.raises(InvalidParameterError, match="must be a compiled Keras model"):
            audit.membership_inference(bad, train, holdout)
    x, y = train
    with pytest.raises(InvalidParameterError, match="one-hot .*sparse_categorical_crossentropy"):
        audit.membership_inference(model, (x, np.eye(K)[y]), holdout)


# --------------------------------------------------------------------------- one run, end to end


def test_one_run_without_dp_shows_a_clear_leak():
    x, y = _data()
    result = audit.one_run(make_model, x, y, private=False, **RUN)
    assert result.epsilon_lower_bound > 1.5, result
    assert math.isinf(result.epsilon) and not result.contradicts
    assert result.roc is not None and result.roc.auc > 0.9
    assert 60 < result.included.sum() < 140  # each canary in with probability ½
    assert result.n_train == 600 - 200 + result.included.sum()
    assert "Leak shown" in result.verdict and "no DP" in result._repr_html_()


def test_one_run_with_dp_stays_below_the_proven_epsilon():
    """The regression test of the guarantee: the same training as above, with DP-SGD at ε = 1.
    A broken engine (noise missing, mis-scaled, or ε mis-accounted) shows up here as a lower
    bound above the proven ε (see the next test for how large that signal is)."""
    x, y = _data()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # the contradiction warning fails the test
        result = audit.one_run(make_model, x, y, target_epsilon=1.0, **RUN)
    assert result.epsilon <= 1.0 and result.delta == 1e-5
    assert result.epsilon_lower_bound <= result.epsilon, result
    assert not result.contradicts
    assert "Consistent" in result.verdict or "proves nothing" in result.verdict
    assert result.run is not None and result.run.epsilon == result.epsilon
    # The audit is on the run's card (model.privacy), so a saved run carries it.
    assert result.model.privacy is result.run
    (entry,) = result.run.summary()["audits"]
    assert entry == result.summary() and entry["kind"] == "one_run"
    assert "audit (one run)" in result.run._repr_html_()


def test_one_run_catches_an_engine_that_lies_about_epsilon(monkeypatch):
    """A stand-in dp_fit that trains without noise but reports ε = 1: the audit must say the
    guarantee is contradicted (loudly: a warning, the verdict and the card)."""
    real = trainer.dp_fit

    def lying_dp_fit(model, x, y, **kw):
        kw.pop("target_epsilon")
        run = real(model, x, y, noise_multiplier=0.0, **kw)
        run.epsilon = 1.0
        return run

    monkeypatch.setattr(trainer, "dp_fit", lying_dp_fit)
    warnings.filterwarnings("ignore", "noise_multiplier=0|ε is huge", RuntimeWarning)
    x, y = _data()
    with pytest.warns(audit.EpsilonExceededWarning, match="(?i)contradicts the guarantee"):
        result = audit.one_run(make_model, x, y, target_epsilon=1.0, **RUN)
    assert result.contradicts and result.epsilon_lower_bound > 1.5
    assert "CONTRADICTS THE GUARANTEE" in result._repr_html_()
    (entry,) = result.run.summary()["audits"]  # the card says so too
    assert entry["contradicts"] is True and "⚠ THE AUDIT CONTRADICTS" in result.run._repr_html_()


def test_one_run_baseline_says_how_its_delta_was_chosen():
    """Without delta= the baseline's δ comes from the training set's size: the result says so
    (two baselines of different sizes are bounded at different δ)."""
    x, y = _data(200)
    small = dict(canaries=20, epochs=1, batch_size=20, private=False, seed=0)
    result = audit.one_run(make_model, x, y, **small)
    n = result.n_train
    assert result.delta == accounting.default_delta(n)
    assert result.delta_source.startswith("defaulted")
    assert f"n={n}" in repr(result) and f"n={n}" in result._repr_html_()
    assert "pass delta=" in result._repr_html_()
    assert result.summary()["delta_source"] == result.delta_source
    given = audit.one_run(make_model, x, y, delta=1e-5, **small)
    assert given.delta == 1e-5 and given.delta_source == "given" and "n=" not in repr(given)


# A model whose every trainable layer is a grouped convolution: Conv2D(64, 2×2, 2 groups) on 2×2×6
# inputs, then Conv2D(4, 1×1, 2 groups) to the logits.
def _conv_data(n=600):
    x, y = _data(n, seed=2, d=24)
    return x.reshape(n, 2, 2, 6), y


def make_grouped_conv_model():
    model = keras.Sequential(
        [
            keras.Input((2, 2, 6)),
            keras.layers.Conv2D(64, 2, groups=2, activation="relu"),
            keras.layers.Conv2D(K, 1, groups=2),
            keras.layers.Flatten(),
        ]
    )
    model.compile(loss=LOSS)
    return model


def _break_grouped_clipping(monkeypatch):
    """Grouped convolutions' clipped sum without the clip factor (each example's full gradient),
    with the traced-step probe of the self-check (which catches exactly this) switched off: a
    clipping bug that got past the engine's own checks."""
    import tensorflow as tf

    from kprivacy_nb.dp.clipping import conv, selfcheck
    from kprivacy_nb.dp.clipping.registry import LayerGrads

    real = conv._grouped

    def unclipped(*args, **kwargs):
        grads = real(*args, **kwargs)
        return LayerGrads(
            grads.sq, lambda c, rows: grads.clipped(tf.ones_like(c), rows), grads.method
        )

    monkeypatch.setattr(conv, "_grouped", unclipped)
    monkeypatch.setattr(selfcheck, "probe_sensitivity", lambda *args, **kwargs: 1.0)


@pytest.mark.parametrize("clipping", ["correct", "broken"])
def test_one_run_audits_grouped_convolutions(monkeypatch, clipping):
    """The engine's regression test on grouped convolutions: at ε = 1 the audit's bound stays
    below the proven ε; with the grouped layers' clipping broken (and the self-check's probe
    off) the same audit contradicts the guarantee."""
    if clipping == "broken":
        _break_grouped_clipping(monkeypatch)
    x, y = _conv_data()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        result = audit.one_run(make_grouped_conv_model, x, y, target_epsilon=1.0, **GCONV_RUN)
    assert all("groups" in how and "verified" in how for how in result.run.clipping.values())
    contradiction = [w for w in caught if "contradicts the guarantee" in str(w.message).lower()]
    if clipping == "correct":
        assert result.epsilon_lower_bound <= result.epsilon <= 1.0 and not contradiction, result
    else:
        assert result.contradicts and contradiction, result


def test_audits_go_on_the_card_and_into_saved_files(tmp_path):
    """membership_inference on a model trained with DP attaches itself to the model's card; the
    card shows it and secure_save'd files carry it; audits of something else are refused."""
    import kprivacy_nb

    x, y = _data(300)
    run = trainer.dp_fit(
        make_model(), x[:200], y[:200], epochs=1, batch_size=50, noise_multiplier=1.0,
        delta=1e-4, optimizer="adam", verbose=0, seed=0,
    )  # fmt: skip
    train, holdout = (x[:200], y[:200]), (x[200:], y[200:])
    assert "audits" not in run.summary()
    report = audit.membership_inference(run.model, train, holdout)  # brings model.privacy
    assert report.proven_epsilon == run.epsilon and report.delta == run.delta
    card = run.summary()
    assert card["audits"] == [report.summary()] and "NOT covered by ε" in card["audit_note"]
    assert "audit (membership inference)" in run._repr_html_()
    run.attach_audit(report)  # the same audit twice is kept once
    assert len(run.summary()["audits"]) == 1

    other = audit.membership_inference(run, train, holdout, epsilon=2 * run.epsilon)
    assert len(run.summary()["audits"]) == 1  # compared with another ε: not attached
    with pytest.raises(InvalidParameterError, match="attach it to the run it audited"):
        run.attach_audit(other)
    with pytest.raises(InvalidParameterError, match="no proven ε"):
        run.attach_audit(audit.membership_inference(make_model(), train, holdout))

    kprivacy_nb.secure_save(run, tmp_path / "run.age", passphrase="audit-test", work_factor=18)
    with pytest.warns(UserWarning, match="unsigned"):
        loaded = kprivacy_nb.secure_load(tmp_path / "run.age", passphrase="audit-test")
    (saved,) = loaded.privacy_card["audits"]
    assert saved["kind"] == "membership_inference" and saved["auc"] == report.auc
    assert saved["verdict"] == report.verdict and loaded.privacy_card["audit_note"]


def test_one_run_refuses_what_it_cannot_audit():
    x, y = _data(100)
    built = []

    def counted():
        built.append(1)
        return make_model()

    # Refused before anything is built or trained.
    with pytest.raises(InvalidParameterError, match="noise_multiplier=0 adds no noise"):
        audit.one_run(counted, x, y, canaries=10, epochs=1, batch_size=10, noise_multiplier=0.0)
    with pytest.raises(InvalidParameterError, match="private=False .*target_epsilon"):
        audit.one_run(counted, x, y, canaries=10, epochs=1, batch_size=10, private=False,
                      target_epsilon=1.0, delta=1e-5)  # fmt: skip
    assert not built
    # Refused before training.
    with pytest.raises(InvalidParameterError, match="one-hot .*sparse_categorical_crossentropy"):
        audit.one_run(make_model, x, np.eye(K)[y], canaries=10, epochs=1, batch_size=10,
                      private=False)  # fmt: skip
    nan = x.copy()
    nan[7, 3] = np.nan
    with pytest.raises(InvalidParameterError, match="1 row.* NaN or ∞ .*row 7"):
        audit.one_run(make_model, nan, y, canaries=10, epochs=1, batch_size=10, private=False)

    def regression():
        model = keras.Sequential([keras.Input((D,)), keras.layers.Dense(1)])
        model.compile(loss="mse")
        return model

    with pytest.raises(InvalidParameterError, match="audits a classifier.*regression loss"):
        audit.one_run(regression, x, y.astype("float32"), canaries=10, epochs=1, batch_size=10,
                      private=False)  # fmt: skip

    def one_output():
        model = keras.Sequential([keras.Input((D,)), keras.layers.Dense(1)])
        model.compile(loss=keras.losses.BinaryCrossentropy(from_logits=True))
        return model

    with pytest.raises(InvalidParameterError, match="one output is a binary classifier"):
        audit.one_run(one_output, x, y, canaries=10, epochs=1, batch_size=10, private=False)
    with pytest.raises(InvalidParameterError, match="canaries=200 but x has only 100"):
        audit.one_run(make_model, x, y, canaries=200, epochs=1, batch_size=10, private=False)
    with pytest.raises(InvalidParameterError, match="unknown setting"):
        audit.one_run(make_model, x, y, canaries=10, epochs=1, batch_size=10, noise=1.0)
    with pytest.raises(InvalidParameterError, match="class labels"):
        audit.one_run(make_model, x, y + 0.5, canaries=10, epochs=1, batch_size=10)
    with pytest.raises(InvalidParameterError, match="function"):
        audit.one_run(make_model(), x, y, canaries=10, epochs=1, batch_size=10)
    with pytest.raises(InvalidParameterError, match="batch_size=95 is larger than the training"):
        audit.one_run(make_model, x, y, canaries=20, epochs=1, batch_size=95, private=False, seed=0)
    with pytest.raises(InvalidParameterError, match="epochs must be an integer ≥ 1"):
        audit.one_run(make_model, x, y, canaries=20, epochs=0, batch_size=10, private=False)


# --------------------------------------------------------------------------- %dp_audit


def test_dp_audit_magic(ip, overfit):
    model, (x, y), (xh, yh) = overfit
    ip.user_ns.update(model=model, x=x, y=y, xh=xh, yh=yh, make_model=make_model)
    report = ip.run_line_magic("dp_audit", "mia model x y xh yh --epsilon 8 --delta 1e-5 -o rep")
    assert ip.user_ns["rep"] is report and report.proven_epsilon == 8.0 and report.auc > 0.7
    with pytest.raises(UsageError, match="needs 5 variable names"):
        ip.run_line_magic("dp_audit", "mia model x y xh")
    with pytest.raises(UsageError, match="only for one-run"):
        ip.run_line_magic("dp_audit", "mia model x y xh yh --epochs 3")
    with pytest.raises(UsageError, match="canaries=500 but x has only 200"):
        ip.run_line_magic(
            "dp_audit", "one-run make_model x y --epochs 1 --batch-size 10 --no-dp --canaries 500"
        )
    with pytest.raises(UsageError, match="--target-epsilon or --noise-multiplier .*--no-dp"):
        ip.run_line_magic("dp_audit", "one-run make_model x y --epochs 1 --batch-size 10")
    with pytest.raises(UsageError, match="--epochs and --batch-size"):
        ip.run_line_magic("dp_audit", "one-run make_model x y")
    result = ip.run_line_magic(
        "dp_audit", "one-run make_model x y --epochs 1 --batch-size 20 --canaries 20 "
        "--noise-multiplier 1.0 --delta 1e-4 --seed 0 -o aud",
    )  # fmt: skip
    assert ip.user_ns["aud"] is result and result.private and result.canaries == 20
    assert result.epsilon_lower_bound <= result.epsilon


def test_dp_audit_magic_refuses_what_it_would_ignore(ip, overfit):
    """An explicit 0 is not the default, and no option is silently dropped."""
    model, (x, y), (xh, yh) = overfit
    ip.user_ns.update(model=model, x=x, y=y, xh=xh, yh=yh, make_model=make_model)
    one_run = "one-run make_model x y --epochs 1 --batch-size 10 "
    with pytest.raises(UsageError, match="canaries must be an integer ≥ 2, got 0"):
        ip.run_line_magic("dp_audit", one_run + "--no-dp --canaries 0")
    with pytest.raises(UsageError, match="--no-dp .*--target-epsilon would be ignored"):
        ip.run_line_magic("dp_audit", one_run + "--no-dp --target-epsilon 1 --delta 1e-5")
    with pytest.raises(UsageError, match="noise_multiplier=0 adds no noise"):
        ip.run_line_magic("dp_audit", one_run + "--noise-multiplier 0 --delta 1e-5")
    with pytest.raises(UsageError, match="--epsilon needs --delta"):
        ip.run_line_magic("dp_audit", "mia model x y xh yh --epsilon 1")
    with pytest.raises(UsageError, match="--canary-kind, --l2-norm-clip: only for one-run"):
        ip.run_line_magic("dp_audit", "mia model x y xh yh --canary-kind random --l2-norm-clip 1")


def test_dp_audit_magic_output_is_loud_above_the_proven_epsilon(ip, overfit, capsys):
    model, (x, y), (xh, yh) = overfit
    ip.user_ns.update(model=model, x=x, y=y, xh=xh, yh=yh)
    with pytest.warns(audit.EpsilonExceededWarning):
        ip.run_cell("%dp_audit mia model x y xh yh --epsilon 0.1 --delta 1e-5 -o loud")
    assert ip.user_ns["loud"].exceeds_proven
    out = capsys.readouterr().out
    assert "⚠ ABOVE THE PROVEN ε" in out, out
