"""kprivacy_nb.compat.tensorflow_privacy: TF Privacy scripts on Keras 3, with its numbers."""

from __future__ import annotations

import os
import subprocess
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

import kprivacy_nb.compat.tensorflow_privacy as tensorflow_privacy  # noqa: E402
from kprivacy_nb.datasets import load_nsl_kdd  # noqa: E402
from kprivacy_nb.dp import accounting  # noqa: E402
from kprivacy_nb.errors import InvalidParameterError, TrainingError  # noqa: E402

RDP, PLD = tensorflow_privacy.AccountantType.RDP, tensorflow_privacy.AccountantType.PLD


@pytest.fixture(scope="module")
def nsl_kdd():
    data = load_nsl_kdd(limit=2000)
    # 1,500 training rows (15 batches of 100 per epoch), 500 held out.
    return data.x_train[:1500], data.y_train[:1500], data.x_train[1500:], data.y_train[1500:]


def _poisson_line(statement: str) -> str:
    return next(ln for ln in statement.splitlines() if "assuming Poisson" in ln).split()[-1]


# --------------------------------------------------------------------------- training


def test_tf_privacy_tutorial_dp_adam_epsilon_one(nsl_kdd):
    """Written as TF Privacy's tutorials are; only the import differs."""
    train_data, train_labels, test_data, test_labels = nsl_kdd
    n, batch_size, epochs, delta = len(train_data), 100, 3, 1e-4
    l2_norm_clip = 1.0
    noise_multiplier = tensorflow_privacy.compute_noise(
        n, batch_size, target_epsilon=1.0, epochs=epochs, delta=delta, noise_lbd=0.7
    )
    optimizer = tensorflow_privacy.DPKerasAdamOptimizer(
        l2_norm_clip=l2_norm_clip, noise_multiplier=noise_multiplier,
        num_microbatches=batch_size, learning_rate=5e-3,
    )  # fmt: skip
    loss = keras.losses.SparseCategoricalCrossentropy(
        from_logits=True, reduction=tf.losses.Reduction.NONE
    )
    model = keras.Sequential([
        keras.Input((train_data.shape[1],)),
        keras.layers.Dense(32, activation="relu"),
        keras.layers.Dense(2),
    ])  # fmt: skip
    model.compile(optimizer=optimizer, loss=loss, metrics=["accuracy"])
    tensorflow_privacy.make_private(model, delta=delta)  # the one line TF Privacy doesn't need
    history = model.fit(
        train_data, train_labels, epochs=epochs, validation_data=(test_data, test_labels),
        batch_size=batch_size, verbose=0,
    )  # fmt: skip

    card = model.privacy
    assert card.noise_multiplier == noise_multiplier and card.l2_norm_clip == l2_norm_clip
    assert card.steps == epochs * n // batch_size and card.sampling == "poisson"
    ours = accounting.compute_epsilon(n, batch_size, epochs, noise_multiplier, delta)
    assert card.epsilon == pytest.approx(ours, rel=1e-9)
    assert history.history["epsilon"][-1] == pytest.approx(card.epsilon, rel=1e-9)
    # compute_noise aimed at ε = 1 under RDP; PLD (what the card reports) is a little tighter.
    assert 0.7 < card.epsilon <= 1.0
    statement = tensorflow_privacy.compute_dp_sgd_privacy_statement(
        number_of_examples=n, batch_size=batch_size, num_epochs=epochs,
        noise_multiplier=noise_multiplier, delta=delta, used_microbatching=False,
        accountant_type=PLD,
    )  # fmt: skip
    assert _poisson_line(statement) == f"{card.epsilon:.3f}"
    rdp = tensorflow_privacy.compute_dp_sgd_privacy_statement(
        n, batch_size, epochs, noise_multiplier, delta, used_microbatching=False
    )
    assert float(_poisson_line(rdp)) == pytest.approx(1.0, abs=2e-3)
    assert history.history["val_accuracy"][-1] > 0.85  # and it learns


def test_dp_sequential_compile_makes_fit_private(nsl_kdd):
    x, y, x_val, y_val = nsl_kdd
    model = tensorflow_privacy.DPSequential(
        l2_norm_clip=1.5, noise_multiplier=1.1, num_microbatches=10,
        layers=[keras.Input((x.shape[1],)), keras.layers.Dense(16, activation="relu"),
                keras.layers.Dense(1, activation="sigmoid")],
    )  # fmt: skip
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="binary_crossentropy",
                  metrics=["accuracy"])  # fmt: skip
    history = model.fit(x, y, epochs=2, batch_size=150, verbose=0, validation_data=(x_val, y_val))
    card = model.privacy
    assert (card.noise_multiplier, card.l2_norm_clip, card.batch_size) == (1.1, 1.5, 150)
    assert card.epsilon == pytest.approx(
        accounting.compute_epsilon(len(x), 150, 2, 1.1, card.delta), rel=1e-9
    )
    assert len(history.history["epsilon"]) == 2
    assert "loss" not in history.history  # the DP step reports no noise-free training loss


def test_dp_model_functional_saves_and_loads_private(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 6)).astype("float32")
    y = (x[:, 0] > 0).astype("float32")
    inputs = keras.Input((6,))
    outputs = keras.layers.Dense(1, activation="sigmoid")(keras.layers.Dense(8)(inputs))
    model = tensorflow_privacy.DPModel(1.0, 1.3, inputs=inputs, outputs=outputs)
    optimizer = tensorflow_privacy.DPKerasSGDOptimizer(1.0, 1.3, learning_rate=0.2)
    model.compile(optimizer=optimizer, loss="binary_crossentropy")
    model.fit(x, y, epochs=1, batch_size=30, verbose=0)
    assert model.privacy.noise_multiplier == 1.3
    model.save(tmp_path / "m.keras")

    loaded = keras.models.load_model(tmp_path / "m.keras")
    assert type(loaded) is tensorflow_privacy.DPModel
    assert loaded.dp_settings == model.dp_settings
    assert type(loaded.optimizer) is tensorflow_privacy.DPKerasSGDOptimizer
    assert loaded.optimizer.dp_settings.noise_multiplier == 1.3
    loaded.fit(x, y, epochs=1, batch_size=30, verbose=0)  # compiled and private again
    assert loaded.privacy.noise_multiplier == 1.3 and loaded.privacy.steps == 10


def test_plain_model_with_dp_optimizer_refuses_its_first_step():
    x = np.random.default_rng(1).normal(size=(64, 4)).astype("float32")
    y = (x[:, 0] > 0).astype("float32")
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1, activation="sigmoid")])
    optimizer = tensorflow_privacy.DPKerasSGDOptimizer(
        l2_norm_clip=1.0, noise_multiplier=1.1, num_microbatches=1, learning_rate=0.1
    )
    model.compile(optimizer=optimizer, loss="binary_crossentropy")
    before = [w.copy() for w in model.get_weights()]
    with pytest.raises(TrainingError, match=r"not private.*make_private\(model\)"):
        model.fit(x, y, epochs=1, batch_size=16, verbose=0)
    assert all(np.array_equal(a, b) for a, b in zip(before, model.get_weights(), strict=True))
    assert int(optimizer.iterations.numpy()) == 0
    # A custom training loop is refused as well.
    with pytest.raises(TrainingError, match="outside a DP-SGD step"):
        variables = model.trainable_variables
        optimizer.apply_gradients(zip([tf.ones_like(v) for v in variables], variables, strict=True))
    assert all(np.array_equal(a, b) for a, b in zip(before, model.get_weights(), strict=True))


def test_contradicting_dp_settings_are_refused():
    layers = [keras.Input((4,)), keras.layers.Dense(1)]
    model = tensorflow_privacy.DPSequential(1.0, 1.2, layers=layers)
    with pytest.raises(InvalidParameterError, match="give the DP settings once"):
        model.compile(optimizer=tensorflow_privacy.DPKerasSGDOptimizer(1.0, 0.5), loss="mse")
    plain = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    plain.compile(optimizer=tensorflow_privacy.DPKerasAdamOptimizer(1.0, 1.2), loss="mse")
    with pytest.raises(InvalidParameterError, match="drop target_epsilon"):
        tensorflow_privacy.make_private(plain, target_epsilon=1.0)
    with pytest.raises(InvalidParameterError, match="noise_multiplier=0.5 contradicts"):
        tensorflow_privacy.make_private(plain, noise_multiplier=0.5)
    with pytest.raises(InvalidParameterError, match="Did you intend it for use_xla"):
        tensorflow_privacy.DPSequential(1.0, 1.2, True, layers=layers)
    with pytest.raises(InvalidParameterError, match="l2_norm_clip must be a number from 1e-06"):
        tensorflow_privacy.DPKerasAdamOptimizer(0.0, 1.0)


# --------------------------------------------------------------------------- the statement

_KW = dict(number_of_examples=10000, batch_size=64, num_epochs=5.0, noise_multiplier=2.0,
           delta=1e-6)  # fmt: skip
_HEAD = """\
DP-SGD performed over 10000 examples with 64 examples per iteration, noise
multiplier 2.0 for 5.0 epochs with microbatching, and {bound}

This privacy guarantee protects the release of all model checkpoints in addition
to the final model.

Example-level DP with add-or-remove-one adjacency at delta = 1e-06 computed with
{acct} accounting:
    Epsilon with each example occurring once per epoch:        {once}
    Epsilon assuming Poisson sampling (*):                      {poisson}

"""
_NO_BOUND = """\
No user-level privacy guarantee is possible without a bound on the number of
examples per user.

"""
_FOOT = """\
(*) Poisson sampling is not usually done in training pipelines, but assuming
that the data was randomly shuffled, it is believed that the actual epsilon
should be closer to this value than the conservative assumption of an arbitrary
data order.
"""
_PER_USER = "no bound on number of\nexamples per user."
_THREE = "at most 3 examples per\nuser."
_TEN = "at most 10 examples per\nuser."


def _rdp(bound):
    return _HEAD.format(bound=bound, acct="RDP", once="13.376", poisson="1.616")


# TF Privacy 0.9's expected statements (compute_dp_sgd_privacy_test.py), verbatim.
TF_PRIVACY_STATEMENTS = {
    "rdp": ({}, _rdp(_PER_USER) + _NO_BOUND + _FOOT),
    "rdp_user": (
        {"max_examples_per_user": 3},
        _rdp(_THREE) + """\
User-level DP with add-or-remove-one adjacency at delta = 1e-06 computed using
RDP accounting and group privacy:
    Epsilon with each example occurring once per epoch:        85.940
    Epsilon assuming Poisson sampling (*):                      6.425

""" + _FOOT,
    ),
    "rdp_user_infinite": (
        {"max_examples_per_user": 10},
        _rdp(_TEN) + """\
User-level DP with add-or-remove-one adjacency at delta = 1e-06 computed using
RDP accounting and group privacy:
    Epsilon with each example occurring once per epoch:      inf (**)
    Epsilon assuming Poisson sampling (*):                   inf (**)

""" + _FOOT + """
(**) A finite example-level epsilon implies a finite user-level epsilon at any
`max_examples_per_user`, but because conversion from example-level to user-level
DP is not exact, it is possible for the upper bound on the user-level epsilon to
still be infinite.
""",
    ),
    "pld": (
        {"accountant_type": PLD},
        _HEAD.format(bound=_PER_USER, acct="PLD", once="12.595", poisson="1.199")
        + _NO_BOUND + _FOOT,
    ),
    "pld_user": (
        {"accountant_type": PLD, "max_examples_per_user": 3},
        _HEAD.format(bound=_THREE, acct="PLD", once="12.595", poisson="1.199") + """\
User-level DP epsilon computation is not supported for PLD accounting at this
time. Use RDP accounting to obtain user-level DP guarantees.

""" + _FOOT,
    ),
}  # fmt: skip


@pytest.mark.filterwarnings("ignore:no finite user-level")
@pytest.mark.parametrize("case", sorted(TF_PRIVACY_STATEMENTS))
def test_statement_is_tf_privacys_text_and_numbers(case):
    extra, expected = TF_PRIVACY_STATEMENTS[case]
    assert tensorflow_privacy.compute_dp_sgd_privacy_statement(**_KW, **extra) == expected


@pytest.mark.parametrize(
    "microbatching, accountant, once, poisson",
    [  # TF Privacy's example-level ε for 1.2 epochs, σ = 0.7, δ = 1e-5, q = 1e-2
        (False, RDP, 10.8602036, 3.2391922),
        (True, RDP, 26.2880374, 22.5970358),
        (False, PLD, 10.1224946, 2.4612381),
        (True, PLD, 24.7160779, 18.6977407),
    ],
)
def test_statement_step_conventions(microbatching, accountant, once, poisson):
    """ceil(1.2) = 2 full passes; ceil(1.2 / q) = 120 Poisson steps; σ/2 when microbatching."""
    statement = tensorflow_privacy.compute_dp_sgd_privacy_statement(
        100, 1, 1.2, 0.7, 1e-5, used_microbatching=microbatching, accountant_type=accountant
    )
    flat = statement.replace("\n", " ")
    assert ("with microbatching" if microbatching else "without microbatching") in flat
    once_line = next(ln for ln in statement.splitlines() if "once per epoch" in ln)
    assert once_line.split()[-1] == f"{once:.3f}"
    got = float(_poisson_line(statement))
    if accountant is RDP:
        # TF Privacy 0.9 pinned dp-accounting 0.4.3; 0.6 drops RDP orders whose series does not
        # converge at small σ (a conservative change): the same event gives 22.625 for 22.597.
        assert poisson - 5e-4 <= got <= poisson * 1.002
    else:
        assert got == round(poisson, 3)


def test_statement_rounds_poisson_steps_up():
    # 1.201 epochs at q = 1/100: TF Privacy counts ceil(120.1) = 121 steps, not 120.
    statement = tensorflow_privacy.compute_dp_sgd_privacy_statement(
        100, 1, 1.201, 1.0, 1e-5, used_microbatching=False, accountant_type=PLD
    )
    steps = {s: accounting.compute_epsilon(100, 1, steps=s, noise_multiplier=1.0, delta=1e-5)
             for s in (120, 121)}  # fmt: skip
    assert f"{steps[120]:.3f}" != f"{steps[121]:.3f}"
    assert _poisson_line(statement) == f"{steps[121]:.3f}"


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_compute_noise_and_the_old_epsilon_match_tf_privacy(capsys):
    # TF Privacy's pinned (ε, order) of the deprecated compute_dp_sgd_privacy.
    for args, eps, order in [
        ((60000, 150, 1.3, 15, 1e-5), 0.7242234026109595, 19.0),
        ((100000, 100, 1.0, 30, 1e-7), 1.4154988495444845, 13.0),
    ]:
        got = tensorflow_privacy.compute_dp_sgd_privacy(*args)
        assert got[0] == pytest.approx(eps, rel=1e-9) and got[1] == order
    # compute_noise inverts it (same orders, same steps), and prints TF Privacy's line.
    sigma = tensorflow_privacy.compute_noise(60000, 150, 0.7242234026109595, 15, 1e-5, 1.0)
    assert sigma == pytest.approx(1.3, rel=1e-4)
    assert "iterated over 6000 steps" in capsys.readouterr().out
    assert tensorflow_privacy.compute_noise(60000, 150, 5.0, 15, 1e-5, 1.3) == 0


def test_statement_rejects_bad_arguments():
    with pytest.raises(InvalidParameterError, match="num_epochs"):
        tensorflow_privacy.compute_dp_sgd_privacy_statement(100, 10, -1.0, 1.0, 1e-5)
    with pytest.raises(InvalidParameterError, match="cannot exceed"):
        tensorflow_privacy.compute_dp_sgd_privacy_statement(100, 200, 1.0, 1.0, 1e-5)


def test_statement_needs_no_tensorflow():
    code = (
        "import sys, kprivacy_nb.compat.tensorflow_privacy as t;"
        "t.compute_dp_sgd_privacy_statement(1000, 10, 1, 1.0, 1e-5);"
        "assert 'tensorflow' not in sys.modules and 'keras' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
