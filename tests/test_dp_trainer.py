"""dp_fit behaviour: sampling, accounting of the steps run, target ε, ledger, interrupts, errors."""

from __future__ import annotations

import io
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

from kprivacy_nb import dp_fit  # noqa: E402
from kprivacy_nb.dp import accounting  # noqa: E402
from kprivacy_nb.dp.sampling import PoissonSampler, ShuffleSampler, make_rng  # noqa: E402
from kprivacy_nb.errors import (  # noqa: E402
    BudgetExceededError,
    InvalidParameterError,
    TrainingError,
)

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _data(n=400, d=10, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype("float32")
    y = (x @ rng.normal(size=(d, 3))).argmax(1)
    return x, y


def _model(d=10, compile_loss=True):
    model = keras.Sequential(
        [keras.Input((d,)), keras.layers.Dense(16, activation="relu"), keras.layers.Dense(3)]
    )
    if compile_loss:
        model.compile(loss=LOSS, metrics=["accuracy"])
    return model


def _weights(model):
    return [v.numpy().copy() for v in model.trainable_variables]


# --------------------------------------------------------------------------- sampling


def test_poisson_batch_sizes_and_inclusion_are_binomial():
    n, b, draws = 1000, 50, 3000
    sampler = PoissonSampler(n, b, make_rng(7))
    batches = [sampler.sample() for _ in range(draws)]
    sizes = np.array([len(s) for s in batches])
    q = b / n
    assert abs(sizes.mean() - b) < 4 * np.sqrt(n * q * (1 - q) / draws)
    assert abs(sizes.var() / (n * q * (1 - q)) - 1) < 0.1
    assert all(len(set(s.tolist())) == len(s) for s in batches)  # no duplicates in a batch
    counts = np.bincount(np.concatenate(batches), minlength=n)
    # every example is included independently with probability q
    assert abs(counts.mean() / (draws * q) - 1) < 0.01
    assert abs(counts.var() / (draws * q * (1 - q)) - 1) < 0.15
    assert sampler.denominator(batches[0]) == b


def test_shuffle_epoch_covers_every_example_once():
    sampler = ShuffleSampler(10, 4, make_rng(0))
    batches = list(sampler.epoch())
    assert [len(b) for b in batches] == [4, 4, 2]
    assert sorted(np.concatenate(batches).tolist()) == list(range(10))
    assert sampler.denominator(batches[-1]) == 2


def test_poisson_training_runs_variable_batches_in_one_trace():
    x, y = _data()
    run = dp_fit(_model(), x, y, epochs=2, batch_size=40, noise_multiplier=1.0, delta=1e-3,
                 verbose=0, seed=1)  # fmt: skip
    assert run.steps == 2 * accounting.steps_per_epoch(400, 40, "poisson")
    assert run.trace_count == 1


# --------------------------------------------------------------------------- accounting


def test_reported_epsilon_matches_accounting_for_steps_run():
    x, y = _data()
    run = dp_fit(_model(), x, y, epochs=2, batch_size=40, noise_multiplier=1.2, delta=1e-3,
                 verbose=0, accountant="rdp", seed=2)  # fmt: skip
    event = accounting.dpsgd_event(n=400, batch_size=40, noise_multiplier=1.2, steps=run.steps)
    assert run.epsilon == pytest.approx(accounting.epsilon_of_event(event, 1e-3, "rdp"))
    assert run.epsilon == pytest.approx(run.epsilon_curve.epsilon[-1])
    assert run.history["epsilon"] == pytest.approx(run.epsilon_curve.epsilon)
    # Training-set metrics are not covered by ε: kept out of the result unless asked for.
    assert set(run.history) == {"epsilon"}
    assert run.summary()["training_metrics"] == "not included"
    assert run.summary()["clipping_verified"] is True
    card = run._repr_html_()
    for text in ("ε", "δ", "σ", "poisson", "RDP", str(run.steps)):
        assert text in card


def test_target_epsilon_run_ends_at_or_below_target():
    x, y = _data()
    run = dp_fit(_model(), x, y, epochs=3, batch_size=50, target_epsilon=2.0, delta=1e-3,
                 verbose=0, seed=3, validation_data=(x[:100], y[:100]))  # fmt: skip
    assert run.epsilon <= 2.0
    assert run.epsilon > 1.5  # calibrated, not wildly over-noised
    assert len(run.history["val_loss"]) == 3


def test_shuffle_sampling_is_accounted_as_shuffle():
    x, y = _data()
    run = dp_fit(_model(), x, y, epochs=1, batch_size=64, noise_multiplier=1.0, delta=1e-3,
                 sampling="shuffle", verbose=0)  # fmt: skip
    assert run.steps == 7
    expected = accounting.compute_epsilon(400, 64, 1, 1.0, 1e-3, sampling="shuffle")
    assert run.epsilon == pytest.approx(expected)


# --------------------------------------------------------------------------- ledger & interrupts


def test_ledger_overspend_is_refused_before_training(tmp_path):
    from kprivacy_nb.dp.ledger import Ledger

    ledger = Ledger(tmp_path / "l.sqlite3")
    ledger.create("small", epsilon=0.5, delta=1e-3)
    x, y = _data()
    model = _model()
    before = _weights(model)
    with pytest.raises(BudgetExceededError):
        dp_fit(model, x, y, epochs=2, batch_size=40, target_epsilon=2.0, delta=1e-3,
               ledger=("small", ledger), verbose=0)  # fmt: skip
    for b, v in zip(before, model.trainable_variables, strict=False):
        np.testing.assert_array_equal(b, v.numpy())
    assert ledger.budget("small").runs == 0


class _StopAfter:
    def __init__(self, epochs):
        self.epochs = epochs

    def on_epoch_end(self, epoch, logs):
        if epoch >= self.epochs:
            raise KeyboardInterrupt


def test_interrupt_stops_cleanly_and_ledger_records_steps_run(tmp_path):
    from kprivacy_nb.dp.ledger import Ledger

    ledger = Ledger(tmp_path / "l.sqlite3")
    ledger.create("b", epsilon=10.0, delta=1e-3)
    x, y = _data()
    model = _model()
    before = _weights(model)
    run = dp_fit(model, x, y, epochs=5, batch_size=40, noise_multiplier=1.0, delta=1e-3,
                 ledger=("b", ledger), verbose=0, callbacks=[_StopAfter(1)])  # fmt: skip
    assert run.interrupted and run.epochs_completed == 1
    assert run.steps == 10
    event = accounting.dpsgd_event(n=400, batch_size=40, noise_multiplier=1.0, steps=10)
    assert run.epsilon == pytest.approx(accounting.epsilon_of_event(event, 1e-3))
    assert any(
        not np.array_equal(b, v.numpy())
        for b, v in zip(before, model.trainable_variables, strict=False)
    )
    budget = ledger.budget("b")
    assert budget.runs == 1 and budget.reserved == 0
    assert budget.spent_epsilon == pytest.approx(run.epsilon, rel=1e-3)


# --------------------------------------------------------------------------- bad input


def test_batchnorm_is_refused_with_a_suggestion():
    model = keras.Sequential([keras.Input((10,)), keras.layers.BatchNormalization(),
                              keras.layers.Dense(3)])  # fmt: skip
    x, y = _data()
    with pytest.raises(TrainingError, match="LayerNormalization"):
        dp_fit(model, x, y, epochs=1, batch_size=40, noise_multiplier=1.0, loss=LOSS, verbose=0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"batch_size": 1000}, "larger than the dataset"),
        ({"noise_multiplier": None}, "exactly one"),
        ({"target_epsilon": 1.0}, "exactly one"),
        ({"l2_norm_clip": 0}, "l2_norm_clip"),
        ({"optimizer": "nope"}, "unknown optimizer"),
        ({"sampling": "random"}, "sampling"),
    ],
)
def test_bad_parameters(kwargs, match):
    x, y = _data()
    args = {"epochs": 1, "batch_size": 40, "noise_multiplier": 1.0, "verbose": 0, **kwargs}
    with pytest.raises(InvalidParameterError, match=match):
        dp_fit(_model(), x, y, **args)


def test_shape_mismatches_are_clear():
    x, y = _data()
    with pytest.raises(InvalidParameterError, match="rows"):
        dp_fit(_model(), x, y[:-1], epochs=1, batch_size=40, noise_multiplier=1.0, verbose=0)
    with pytest.raises(InvalidParameterError, match="input"):
        dp_fit(_model(d=7), x, y, epochs=1, batch_size=40, noise_multiplier=1.0, verbose=0)
    with pytest.raises(TrainingError, match="no loss"):
        dp_fit(_model(compile_loss=False), x, y, epochs=1, batch_size=40, noise_multiplier=1.0,
               verbose=0)  # fmt: skip


def test_a_non_finite_example_is_dropped_not_a_reason_to_stop():
    # A record whose gradient overflows used to stop training exactly at its step: a
    # data-dependent signal outside the accounting. Now it contributes exactly nothing.
    from kprivacy_nb.dp.clipping import FastClipper, per_example_loss_fn

    x, y = _data(n=8)
    x[5] = 3e38  # finite, but the forward pass overflows
    model = _model()
    kernel = model.layers[0].kernel
    kernel.assign(np.abs(kernel.numpy()) + 0.1)  # every unit overflows to +inf on that row
    clipper = FastClipper(model, per_example_loss_fn(LOSS), l2_norm_clip=1.0, sample_x=x[:2])
    out = clipper.clipped_sum(tf.constant(x), tf.constant(y), tf.ones([8]))
    assert int(out.nonfinite) == 1
    weights = np.ones(8, "float32")
    weights[5] = 0
    without = clipper.clipped_sum(tf.constant(x), tf.constant(y), tf.constant(weights))
    for a, b in zip(out.grads, without.grads, strict=True):
        assert np.isfinite(a.numpy()).all()
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-6)


def test_nan_or_inf_in_the_data_is_refused_before_training_with_its_place():
    x, y = _data()
    x[7, 3] = np.nan
    with pytest.raises(
        InvalidParameterError, match=r"x has a non-finite value .* row 7, column \(3,\)"
    ):
        dp_fit(_model(), x, y, epochs=1, batch_size=40, noise_multiplier=1.0, delta=1e-3, verbose=0)


def test_adam_and_log_lines():
    x, y = _data()
    out = io.StringIO()
    from kprivacy_nb.dp.reporting import LogReporter

    run = dp_fit(_model(), x, y, epochs=2, batch_size=40, noise_multiplier=1.0, delta=1e-3,
                 optimizer="adam", learning_rate=0.01, verbose=0, include_training_metrics=True,
                 callbacks=[LogReporter(out)])  # fmt: skip
    prepare, *lines = out.getvalue().strip().splitlines()
    assert prepare.startswith("σ = 1; checking per-example clipping")
    assert len(lines) == 3 and lines[1].startswith("epoch 1/2") and "ε" in lines[2]
    assert "train loss" in lines[1] and "not private" in lines[1]
    assert run.history["loss"][-1] < run.history["loss"][0] + 0.5
    assert "NOT covered by ε" in run.summary()["training_metrics"]


def test_one_adam_step_matches_keras_adam_on_the_clipped_mean():
    # Reference: Keras' own Adam applied to the naive clipped mean (σ = 0, one full batch).
    # Plain SGD (or any other optimizer) in its place gives different weights.
    x, y = _data(n=32)
    model = _model()
    reference = keras.models.clone_model(model)
    reference.set_weights(model.get_weights())
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)
    grads = [np.zeros(v.shape) for v in reference.trainable_variables]
    for i in range(len(x)):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(loss_fn(y[i : i + 1], reference(x[i : i + 1])))
        g = [t.numpy() for t in tape.gradient(loss, reference.trainable_variables)]
        factor = min(1.0, 0.1 / np.sqrt(sum((t**2).sum() for t in g)))
        grads = [a + factor * t for a, t in zip(grads, g, strict=True)]
    initial = [v.numpy().copy() for v in reference.trainable_variables]
    adam = keras.optimizers.Adam(0.05)
    adam.apply([(a / len(x)).astype("float32") for a in grads], reference.trainable_variables)
    dp_fit(model, x, y, epochs=1, batch_size=len(x), sampling="shuffle", noise_multiplier=0.0,
           l2_norm_clip=0.1, optimizer=keras.optimizers.Adam(0.05), verbose=0)  # fmt: skip
    # (Adam's first step is about lr·g/|g|: where a gradient entry is near Adam's ε = 1e-7,
    # float32 rounding of the two sums moves it by ~1e-6.)
    for a, b in zip(model.trainable_variables, reference.trainable_variables, strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-5)
    # The same gradient under SGD(0.05) lands elsewhere: the test tells the optimizers apart.
    sgd = [w - 0.05 * g / len(x) for w, g in zip(initial, grads, strict=True)]
    assert not all(
        np.allclose(a.numpy(), b, atol=1e-4)
        for a, b in zip(model.trainable_variables, sgd, strict=True)
    )


def test_poisson_steps_divide_by_the_expected_batch_size(monkeypatch):
    # Poisson batches vary in size; each step's sum (and its noise, std σC/B) is divided by the
    # EXPECTED size B — dividing by the actual size would change the sensitivity per step.
    from kprivacy_nb.dp.noise import GaussianNoise
    from kprivacy_nb.dp.sampling import PoissonSampler

    seen, stds = [], []
    real_denominator, real_next = PoissonSampler.denominator, GaussianNoise.next

    def denominator(self, idx):
        seen.append((len(idx), real_denominator(self, idx)))
        return seen[-1][1]

    def draw(self, std):
        stds.append(std)
        return real_next(self, std)

    monkeypatch.setattr(PoissonSampler, "denominator", denominator)
    monkeypatch.setattr(GaussianNoise, "next", draw)
    x, y = _data(n=200)
    dp_fit(_model(), x, y, epochs=3, batch_size=20, noise_multiplier=1.5, l2_norm_clip=0.7,
           delta=1e-3, verbose=0, seed=4)  # fmt: skip
    assert len({size for size, _ in seen}) > 3  # the batch size really varies
    assert {d for _, d in seen} == {20.0}
    assert stds == pytest.approx([1.5 * 0.7 / 20] * len(seen))


def test_a_poisson_step_without_noise_is_the_naive_clipped_sum_over_b():
    # Engine level: σ = 0, SGD(1): the update is Σ clipped / B even when the batch has k ≠ B rows.
    from kprivacy_nb.dp.clipping import per_example_loss_fn
    from kprivacy_nb.dp.engine import DPSGDEngine

    x, y = _data(n=30)
    model = _model()
    eng = DPSGDEngine(model, per_example_loss_fn(LOSS), keras.optimizers.SGD(1.0),
                      l2_norm_clip=0.05, noise_multiplier=0.0, X=tf.constant(x),
                      Y=tf.constant(y))  # fmt: skip
    rows = np.array([1, 4, 7, 9, 11, 20, 29], np.int32)  # 7 rows, expected batch size 10
    expected = [np.zeros(v.shape) for v in model.trainable_variables]
    for i in rows:
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(per_example_loss_fn(LOSS)(y[i : i + 1], model(x[i : i + 1])))
        g = [t.numpy() for t in tape.gradient(loss, model.trainable_variables)]
        factor = min(1.0, 0.05 / np.sqrt(sum((t.astype(np.float64) ** 2).sum() for t in g)))
        expected = [e + factor * t / 10 for e, t in zip(expected, g, strict=True)]
    before = _weights(model)
    eng.step(tf.constant(x), tf.constant(y), rows, 10.0)
    for b, v, e in zip(before, model.trainable_variables, expected, strict=True):
        np.testing.assert_allclose(b - v.numpy(), e, atol=1e-7)
