"""make_private: Keras' own fit, private — tried the way a Keras user (and an attacker) would."""

from __future__ import annotations

import csv
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

import kprivacy_nb  # noqa: E402
from kprivacy_nb.dp import accounting  # noqa: E402
from kprivacy_nb.dp.ledger import Ledger  # noqa: E402
from kprivacy_nb.errors import InvalidParameterError, TrainingError  # noqa: E402

pytestmark = [
    pytest.mark.filterwarnings("ignore:noise_multiplier=0"),
    pytest.mark.filterwarnings("ignore:ε is huge"),
]


def _data(n=600, d=10, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype("float32")
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).astype("int64")
    return x, y


def _binary(d=10, optimizer=None):
    model = keras.Sequential(
        [keras.Input((d,)), keras.layers.Dense(8, activation="relu"),
         keras.layers.Dense(1, activation="sigmoid")]
    )  # fmt: skip
    model.compile(
        optimizer=optimizer or keras.optimizers.Adam(1e-2), loss="binary_crossentropy",
        metrics=["accuracy", keras.metrics.AUC(name="auc")],
    )  # fmt: skip
    return model


def test_a_keras_notebook_runs_privately_after_one_line(tmp_path):
    x, y = _data()
    model = _binary()
    kprivacy_nb.make_private(model, target_epsilon=3.0, delta=1e-4)
    history = model.fit(
        x, y, epochs=3, batch_size=50, validation_split=0.2, verbose=0,
        callbacks=[
            keras.callbacks.EarlyStopping(monitor="val_loss", patience=5),
            keras.callbacks.ModelCheckpoint(str(tmp_path / "best.keras")),
            keras.callbacks.CSVLogger(str(tmp_path / "log.csv")),
            keras.callbacks.TensorBoard(str(tmp_path / "tb")),
        ],
    )  # fmt: skip
    logs = history.history
    assert len(logs["epsilon"]) == 3 and logs["epsilon"] == sorted(logs["epsilon"])
    assert {"val_loss", "val_accuracy", "val_auc"} <= set(logs)
    # Training-set metrics are computed without noise: not in the history (nor the CSV).
    assert "loss" not in logs and "accuracy" not in logs and "dp_steps" not in logs
    card = model.privacy
    assert card.epsilon <= 3.0 + 1e-9 and card.epsilon == pytest.approx(logs["epsilon"][-1])
    assert card.n == 480 and card.steps == 3 * accounting.steps_per_epoch(480, 50)
    assert card.verified and card.delta == 1e-4
    with open(tmp_path / "log.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 3 and "epsilon" in rows[0] and "loss" not in rows[0]
    assert (tmp_path / "best.keras").exists() and any((tmp_path / "tb").iterdir())
    assert logs["val_auc"][-1] > 0.6  # it learns


def _one_full_batch_update(model, x, y, **private):
    """Weights after one σ = 0 step on the whole set (shuffle sampling, batch = n)."""
    kprivacy_nb.make_private(model, noise_multiplier=0.0, sampling="shuffle", delta=1e-3,
                             **private)  # fmt: skip
    model.fit(x, y, epochs=1, batch_size=len(x), verbose=0)
    return [w.copy() for w in model.get_weights()]


def test_the_compiled_optimizer_is_the_one_that_trains():
    # σ = 0 and a clip too large to bind: one private step must equal Keras' own Adam step on
    # the mean gradient. SGD (what dp_fit once used regardless) gives different weights.
    x, y = _data(n=64)
    model = _binary()
    reference = keras.models.clone_model(model)
    reference.set_weights(model.get_weights())
    reference.compile(optimizer=keras.optimizers.Adam(1e-2), loss="binary_crossentropy")
    reference.fit(x, y, epochs=1, batch_size=64, shuffle=False, verbose=0)
    private = _one_full_batch_update(model, x, y, l2_norm_clip=1e6)
    for a, b in zip(private, reference.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_a_huge_sample_weight_cannot_push_one_example_past_c():
    x, y = _data(n=40)
    clip = 0.01
    heavy = np.ones(40, "float32")
    heavy[3] = 1e6
    absent = np.ones(40, "float32")
    absent[3] = 0.0
    start = _binary(optimizer=keras.optimizers.SGD(1.0))
    weights = start.get_weights()
    out = []
    for sw in (heavy, absent):
        model = _binary(optimizer=keras.optimizers.SGD(1.0))
        model.set_weights(weights)
        kprivacy_nb.make_private(model, noise_multiplier=0.0, sampling="shuffle", delta=1e-3,
                                 l2_norm_clip=clip)  # fmt: skip
        model.fit(x, y, epochs=1, batch_size=40, sample_weight=sw, verbose=0)
        out.append(np.concatenate([w.ravel() for w in model.get_weights()]))
    # SGD(1) with denominator 40: one example moves the update by at most C / 40.
    assert np.linalg.norm(out[0] - out[1]) <= clip / 40 * (1 + 1e-3)
    assert np.linalg.norm(out[0] - out[1]) > 0.5 * clip / 40  # and it does count


def test_a_callback_watching_an_unreported_training_metric_is_named_before_training():
    # EarlyStopping(monitor="loss") did nothing at all on a private fit (training-set metrics
    # are not reported by default); only Keras' own warning at each epoch's end hinted at it.
    x, y = _data(n=120)
    model = _binary()
    kprivacy_nb.make_private(model, noise_multiplier=1.0, delta=1e-3)
    stop = keras.callbacks.EarlyStopping(monitor="loss")
    watch_val = keras.callbacks.EarlyStopping(monitor="val_loss")
    with pytest.warns(UserWarning, match="EarlyStopping monitors 'loss', which a private fit does "
                      "not report") as seen:  # fmt: skip
        model.fit(x, y, epochs=1, batch_size=40, validation_split=0.2, verbose=0,
                  callbacks=[stop, watch_val])  # fmt: skip
    assert not [w for w in seen if "monitors 'val_loss'" in str(w.message)]


def test_included_training_metrics_carry_the_compiled_accuracy():
    # include_training_metrics=True reported the loss only, although accuracy was compiled.
    x, y = _data(n=120)
    model = _binary()
    kprivacy_nb.make_private(model, noise_multiplier=1.0, delta=1e-3, include_training_metrics=True)
    history = model.fit(x, y, epochs=2, batch_size=40, verbose=0)
    assert {"loss", "accuracy", "epsilon"} <= set(history.history)
    assert all(0.0 <= a <= 1.0 for a in history.history["accuracy"])
    hidden = _binary()
    kprivacy_nb.make_private(hidden, noise_multiplier=1.0, delta=1e-3)
    assert "accuracy" not in hidden.fit(x, y, epochs=1, batch_size=40, verbose=0).history
    # Under the compiled metric's own name, which callbacks may then watch; AUC is not reported.
    named = _binary()
    named.compile(optimizer="adam", loss="binary_crossentropy",
                  metrics=[keras.metrics.BinaryAccuracy(), keras.metrics.AUC(name="auc")])  # fmt: skip
    kprivacy_nb.make_private(named, noise_multiplier=1.0, delta=1e-3, include_training_metrics=True)
    watch = [keras.callbacks.EarlyStopping(monitor="binary_accuracy", mode="max"),
             keras.callbacks.EarlyStopping(monitor="auc", mode="max")]  # fmt: skip
    with pytest.warns(UserWarning, match="monitors 'auc'") as seen:
        history = named.fit(x, y, epochs=1, batch_size=40, verbose=0, callbacks=watch)
    assert "binary_accuracy" in history.history
    assert not [w for w in seen if "monitors 'binary_accuracy'" in str(w.message)]
    # The string spelling of a sparse categorical accuracy.
    keras.utils.set_random_seed(0)
    three = keras.Sequential([keras.Input((10,)), keras.layers.Dense(3, activation="softmax")])
    three.compile(optimizer="sgd", loss="sparse_categorical_crossentropy",
                  metrics=["sparse_categorical_accuracy"])  # fmt: skip
    kprivacy_nb.make_private(three, noise_multiplier=1.0, delta=1e-3, include_training_metrics=True)
    labels = (x[:, 0] > 0).astype("int64") + (x[:, 1] > 0).astype("int64")
    history = three.fit(x, labels, epochs=1, batch_size=40, verbose=0)
    assert "sparse_categorical_accuracy" in history.history


def test_a_ledger_budget_that_does_not_exist_is_refused_before_any_work(kp_home, capsys):
    # --ledger nosuch once printed "σ = 1; checking per-example clipping on … examples" and ran
    # the self-check before saying the budget did not exist.
    from kprivacy_nb.errors import LedgerError

    x, y = _data(n=120)
    model = _binary()
    kprivacy_nb.make_private(model, noise_multiplier=1.0, delta=1e-3, ledger="ghost")
    with pytest.raises(LedgerError, match="no budget named 'ghost'"):
        model.fit(x, y, epochs=1, batch_size=40, verbose=1)
    assert "checking per-example clipping" not in capsys.readouterr().out


def test_no_noise_warns_about_no_privacy_only():
    # σ = 0 also warned "ε is huge (inf by RDP): … PLD accounting at this scale would need
    # gigabytes of memory", which has nothing to do with it.
    import warnings

    x, y = _data(n=120)
    model = _binary()
    kprivacy_nb.make_private(model, noise_multiplier=0.0, delta=1e-3)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        model.fit(x, y, epochs=1, batch_size=40, verbose=0)
    messages = [str(w.message) for w in seen]
    assert any("NO PRIVACY" in m for m in messages)
    assert not any("huge" in m for m in messages), messages
    assert model.privacy.epsilon == float("inf")


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float64"])
def test_weights_other_than_float32_are_refused_with_the_fix(dtype):
    # An Embedding(dtype="bfloat16") crashed inside the step ("TensorArray dtype is float32 but
    # Op is trying to write dtype bfloat16"); float64 weights with a raw TensorFlow TypeError.
    from kprivacy_nb.errors import TrainingError

    ids = keras.Input((8,), dtype="int32")
    rows = keras.layers.Embedding(20, 4, dtype=dtype)(ids)
    model = keras.Model(ids, keras.layers.Dense(1)(keras.ops.sum(rows, axis=1)))
    model.compile(optimizer="sgd", loss="mse")
    kprivacy_nb.make_private(model, noise_multiplier=1.0, delta=1e-3)
    x = np.random.default_rng(0).integers(0, 20, (64, 8))
    with pytest.raises(TrainingError, match=f"held in {dtype}.*mixed_bfloat16"):
        model.fit(x, np.zeros((64, 1), "float32"), batch_size=16, verbose=0)


def test_fitting_again_under_a_spent_target_stays_within_it_or_says_it_is_spent():
    # A fit under target_epsilon=2 after ones that spent it failed with dp-accounting's "Unable
    # to find bracketing interval within 2**30 of initial guess". Now each further fit either
    # trains on what is left (and says it is mostly noise) or is refused as spent.
    from kprivacy_nb.errors import PrivacyBudgetWarning

    x, y = _data(n=1000)
    model = _binary()
    kprivacy_nb.make_private(model, target_epsilon=2.0, delta=1e-5)
    model.fit(x, y, epochs=2, batch_size=100, verbose=0)
    import warnings

    for _ in range(2):
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            try:
                model.fit(x, y, epochs=2, batch_size=100, verbose=0)
            except InvalidParameterError as refused:
                assert "target ε=2 is already spent" in str(refused)
            else:
                said = [w for w in seen if issubclass(w.category, PrivacyBudgetWarning)]
                assert said and "mostly noise" in str(said[0].message)
        assert model.privacy.epsilon <= 2.0 + 1e-9


def test_micro_batches_give_the_same_step():
    x, y = _data(n=96)
    a, b = _binary(optimizer=keras.optimizers.SGD(0.5)), None
    b = keras.models.clone_model(a)
    b.set_weights(a.get_weights())
    b.compile(optimizer=keras.optimizers.SGD(0.5), loss="binary_crossentropy")
    whole = _one_full_batch_update(a, x, y, l2_norm_clip=0.1)
    split = _one_full_batch_update(b, x, y, l2_norm_clip=0.1, physical_batch_size=10)
    for u, v in zip(whole, split, strict=True):
        np.testing.assert_allclose(u, v, rtol=1e-4, atol=1e-6)


def _token_model(vocab=50, length=64, seed=0):
    # An Embedding reading the input ids (its repeated tokens are found on the host when the
    # batch is not split) and a Dense on the sequence.
    keras.utils.set_random_seed(seed)
    ids = keras.Input((length,), dtype="int32", name="ids")
    h = keras.layers.Dense(64, activation="relu")(keras.layers.Embedding(vocab, 64)(ids))
    out = keras.layers.Dense(1, activation="sigmoid")(keras.layers.GlobalAveragePooling1D()(h))
    model = keras.Model(ids, out)
    model.compile(optimizer=keras.optimizers.SGD(0.5), loss="binary_crossentropy")
    return model


def _tokens(n=128, vocab=50, length=64):
    rng = np.random.default_rng(1)
    x = rng.integers(0, vocab, (n, length)).astype("int32")  # many repeated tokens per example
    return x, (x[:, 0] % 2).astype("int64")


def test_micro_batches_of_token_inputs_give_the_same_step_in_less_memory():
    # physical_batch_size once did nothing for a model whose Embedding reads the input ids:
    # the whole batch ran at once. Split, the step must be the same and the peak of the
    # tensors TensorFlow holds clearly lower.
    x, y = _tokens()

    def run(**private):
        model = _token_model()
        tf.config.experimental.reset_memory_stats("CPU:0")
        before = tf.config.experimental.get_memory_info("CPU:0")["current"]
        weights = _one_full_batch_update(model, x, y, l2_norm_clip=0.1, **private)
        peak = tf.config.experimental.get_memory_info("CPU:0")["peak"] - before
        return weights, peak

    whole, whole_peak = run()
    split, split_peak = run(physical_batch_size=16)
    for u, v in zip(whole, split, strict=True):
        np.testing.assert_allclose(u, v, rtol=1e-4, atol=1e-6)
    assert split_peak < 0.5 * whole_peak, (split_peak, whole_peak)


def test_more_micro_batches_never_take_more_memory():
    # TensorFlow ran up to ten micro-batches at once (a while_loop's default), each holding its
    # activations and its dense table gradient: 32 micro-batches of 4 peaked at twice the
    # memory of 4 micro-batches of 32.
    x, y = _tokens(n=128, vocab=5000)

    def peak(physical):
        model = _token_model(vocab=5000)
        tf.config.experimental.reset_memory_stats("CPU:0")
        before = tf.config.experimental.get_memory_info("CPU:0")["current"]
        _one_full_batch_update(model, x, y, l2_norm_clip=0.1, physical_batch_size=physical)
        return tf.config.experimental.get_memory_info("CPU:0")["peak"] - before

    few, many = peak(32), peak(4)
    assert many < 1.2 * few, (many, few)


def test_a_physical_batch_size_too_large_to_split_anything_is_no_split():
    # 2^31 - 1 once overflowed the chunk count in the graph: every update was silently zero
    # while the steps (and ε) were counted. Beyond 32 bits it is refused, with the limit named.
    x, y = _data(n=37)
    start = _binary(optimizer=keras.optimizers.SGD(1.0))
    weights = start.get_weights()
    out = []
    for physical in (None, 2**31 - 1):
        model = _binary(optimizer=keras.optimizers.SGD(1.0))
        model.set_weights(weights)
        out.append(_one_full_batch_update(model, x, y, physical_batch_size=physical))
    moved = [np.abs(a - b).max() for a, b in zip(out[1], weights, strict=True)]
    assert max(moved) > 1e-3
    for u, v in zip(out[0], out[1], strict=True):
        np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-7)
    for bad in (2**31, 10**30):
        with pytest.raises(InvalidParameterError, match="at most 2147483647"):
            kprivacy_nb.make_private(_binary(), noise_multiplier=1.0, physical_batch_size=bad)


@pytest.mark.parametrize("physical", [None, 5])
@pytest.mark.parametrize("wrap", ["dict", "list"])
def test_an_out_of_range_id_in_a_dict_or_list_input_is_refused_before_anything_runs(wrap, physical):
    # A single-input model given its ids in a dict or a list: they are range-checked up front
    # like a bare array — not dropped silently (micro-batches), nor refused by a graph error
    # in the middle of training.
    x, y = _tokens(n=24, vocab=20, length=16)
    x[20, 4] = 20  # the table has 20 rows; row 20 is past the self-check's first rows
    model = _token_model(vocab=20, length=16)
    before = [w.copy() for w in model.get_weights()]
    kprivacy_nb.make_private(model, noise_multiplier=1.0, delta=1e-3,
                             physical_batch_size=physical)  # fmt: skip
    data = {"ids": x} if wrap == "dict" else [x]
    with pytest.raises(
        InvalidParameterError, match=r"row 20 has token id 20, out of range.*spent nothing\)$"
    ):
        model.fit(data, y, epochs=1, batch_size=8, verbose=0)
    for a, b in zip(model.get_weights(), before, strict=True):
        np.testing.assert_array_equal(a, b)


def test_token_ids_that_are_not_whole_numbers_are_refused_naming_the_row():
    x, y = _tokens(n=24, vocab=20, length=16)
    ids = x.astype("float32")
    ids[7, 3] += 0.5
    model = _token_model(vocab=20, length=16)
    kprivacy_nb.make_private(model, noise_multiplier=1.0, delta=1e-3)
    with pytest.raises(InvalidParameterError, match="row 7 has a token id that is not a whole"):
        model.fit(ids, y, epochs=1, batch_size=8, verbose=0)
    model.fit(x.astype("float32"), y, epochs=1, batch_size=8, verbose=0)  # whole numbers: fine


def test_a_larger_target_after_earlier_fits_is_not_called_mostly_noise():
    """Spent ε = 2, then a new target of 5: this fit gets less noise than the first, which is
    not "mostly noise" however much of the new target was spent."""
    import warnings

    from kprivacy_nb.errors import PrivacyBudgetWarning

    x, y = _data(n=400)
    model = _binary()
    kprivacy_nb.make_private(model, target_epsilon=2.0, delta=1e-4)
    model.fit(x, y, epochs=2, batch_size=40, verbose=0)
    first_sigma = model.privacy.noise_multiplier
    kprivacy_nb.make_private(model, target_epsilon=5.0, delta=1e-4)
    with warnings.catch_warnings():
        warnings.simplefilter("error", PrivacyBudgetWarning)
        model.fit(x, y, epochs=2, batch_size=40, verbose=0)
    assert model.privacy.noise_multiplier < first_sigma
    assert model.privacy.epsilon <= 5.0 + 1e-9


@pytest.mark.parametrize("wrap", ["dict", "list"])
def test_an_out_of_range_id_for_one_input_of_several_is_refused_before_anything_runs(wrap):
    # An Embedding reading one input of a two-input model: its ids come straight from the data
    # too, and are range-checked up front (they were dropped silently as non-finite examples).
    rng = np.random.default_rng(4)
    ids = rng.integers(0, 20, (40, 5)).astype("int32")
    ids[30, 1] = 20
    extra = rng.normal(size=(40, 2)).astype("float32")
    y = rng.integers(0, 2, 40)
    tokens, side = keras.Input((5,), dtype="int32", name="t"), keras.Input((2,), name="e")
    pooled = keras.layers.GlobalAveragePooling1D()(keras.layers.Embedding(20, 3)(tokens))
    out = keras.layers.Dense(1, activation="sigmoid")(keras.layers.Concatenate()([pooled, side]))
    model = keras.Model([tokens, side], out)
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="binary_crossentropy")
    before = [w.copy() for w in model.get_weights()]
    kprivacy_nb.make_private(model, noise_multiplier=1.0, delta=1e-3)
    data = {"t": ids, "e": extra} if wrap == "dict" else [ids, extra]
    with pytest.raises(InvalidParameterError, match="row [0-9]+ has token id 20, out of range"):
        model.fit(data, y, epochs=1, batch_size=8, verbose=0)
    for a, b in zip(model.get_weights(), before, strict=True):
        np.testing.assert_array_equal(a, b)
    ids[30, 1] = 19  # in range: it trains
    model.fit({"t": ids, "e": extra} if wrap == "dict" else [ids, extra], y, epochs=1,
              batch_size=8, verbose=0)  # fmt: skip
    assert model.privacy.steps > 0


def test_fit_calls_compose_and_a_target_covers_them_all():
    x, y = _data()
    model = _binary()
    kprivacy_nb.make_private(model, noise_multiplier=1.0, delta=1e-4)
    model.fit(x, y, epochs=1, batch_size=60, verbose=0)
    first = model.privacy.epsilon
    model.fit(x, y, epochs=1, batch_size=60, verbose=0)
    event = accounting.Mechanism(600, 60, 1.0).event(2 * 10)
    assert model.privacy.epsilon == pytest.approx(
        accounting.epsilon_of_event(event, 1e-4, "pld"), rel=1e-9
    )
    assert model.privacy.epsilon > first and model.privacy.steps == 20

    targeted = _binary()
    kprivacy_nb.make_private(targeted, target_epsilon=2.0, delta=1e-4)
    targeted.fit(x, y, epochs=2, batch_size=60, verbose=0)
    targeted.fit(x, y, epochs=2, batch_size=60, verbose=0)
    assert targeted.privacy.epsilon <= 2.0 + 1e-9
    assert targeted.privacy.steps == 40


def test_early_stopping_and_the_ledger_charge_the_steps_that_ran(tmp_path):
    x, y = _data()
    ledger = Ledger(tmp_path / "ledger.db")
    ledger.create("synth", epsilon=50.0, delta=1e-4)
    model = _binary(optimizer=keras.optimizers.SGD(0.0))  # never improves: stops after 2
    kprivacy_nb.make_private(model, noise_multiplier=1.0, delta=1e-4, ledger=("synth", ledger))
    history = model.fit(
        x, y, epochs=10, batch_size=60, validation_split=0.1, verbose=0,
        callbacks=[keras.callbacks.EarlyStopping(monitor="val_loss", patience=1)],
    )  # fmt: skip
    ran = len(history.history["epsilon"])
    assert ran < 10 and model.privacy.steps == ran * accounting.steps_per_epoch(540, 60)
    spent = ledger.budget("synth").committed_epsilon
    assert spent == pytest.approx(model.privacy.epsilon, rel=1e-6)


@pytest.mark.parametrize(
    "make_x, match",
    [
        (lambda x, y: tf.data.Dataset.from_tensor_slices((x, y)).batch(10), "Poisson-sampled"),
        (lambda x, y: (row for row in x), "Poisson-sampled"),
    ],
)
def test_streams_that_cannot_be_poisson_sampled_are_refused(make_x, match):
    x, y = _data(n=50)
    model = kprivacy_nb.make_private(_binary(), noise_multiplier=1.0, delta=1e-3)
    with pytest.raises(InvalidParameterError, match=match):
        model.fit(make_x(x, y), y, epochs=1, batch_size=10, verbose=0)


def test_clear_errors_for_keras_users():
    x, y = _data(n=50)
    raw = keras.Sequential([keras.Input((10,)), keras.layers.Dense(1)])
    kprivacy_nb.make_private(raw, noise_multiplier=1.0)
    with pytest.raises(TrainingError, match="compile the model first"):
        raw.fit(x, y, epochs=1, batch_size=10)
    model = kprivacy_nb.make_private(_binary(), noise_multiplier=1.0, delta=1e-3)
    with pytest.raises(InvalidParameterError, match="steps_per_epoch"):
        model.fit(x, y, epochs=1, batch_size=10, steps_per_epoch=3)
    bad = x.copy()
    bad[7, 2] = np.nan
    with pytest.raises(InvalidParameterError, match=r"row 7, column \(2,\)"):
        model.fit(bad, y, epochs=1, batch_size=10)
    with pytest.raises(InvalidParameterError, match="exactly one"):
        kprivacy_nb.make_private(_binary())


def test_a_memmap_is_sampled_without_being_loaded(tmp_path):
    n, d = 400_000, 256  # 410 MB of float32 on disk
    path = tmp_path / "x.f32"
    x = np.lib.format.open_memmap(path, mode="w+", dtype="float32", shape=(n, d))
    rng = np.random.default_rng(1)
    block = rng.normal(size=(20_000, d)).astype("float32")
    for start in range(0, n, 20_000):
        x[start : start + 20_000] = block + start
    x.flush()
    del x
    x = np.load(path, mmap_mode="r")
    y = (np.arange(n) % 2).astype("int64")
    model = kprivacy_nb.make_private(_binary(d=d), noise_multiplier=1.0, delta=1e-6)
    before = _anon_kib()
    model.fit(x, y, epochs=1, batch_size=4096, verbose=0)
    grown_mib = (_anon_kib() - before) / 1024
    assert model.privacy.steps == round(n / 4096)
    # Loading it would take 410 MB; TensorFlow's own warm-up (tracing, allocator) ~70 MiB.
    assert grown_mib < 160, f"anonymous memory grew by {grown_mib:.0f} MiB for a 410 MB memmap"


def _anon_kib() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
    raise AssertionError("no RssAnon in /proc/self/status")


def test_every_other_way_into_the_training_step_is_refused():
    # Found by an attacker: after make_private, train_on_batch (and keras.Model.fit called
    # unbound) trained without clipping, noise or accounting.
    x, y = _data(n=40)
    model = kprivacy_nb.make_private(_binary(), noise_multiplier=1.0, delta=1e-3)
    before = [w.copy() for w in model.get_weights()]
    with pytest.raises(TrainingError, match="made private"):
        model.train_on_batch(x, y)
    with pytest.raises(TrainingError, match="made private"):
        keras.Model.fit(model, x, y, epochs=1, verbose=0)
    for a, b in zip(before, model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    model.fit(x, y, epochs=1, batch_size=10, verbose=0)  # the private path still works
    with pytest.raises(TrainingError, match="made private"):
        model.train_on_batch(x, y)  # and the door stays shut after it


def test_mixed_precision_does_not_shrink_the_private_update():
    x, y = _data(n=40)
    updates = []
    for policy in ("float32", "mixed_float16"):
        keras.mixed_precision.set_global_policy(policy)
        try:
            keras.utils.set_random_seed(0)
            model = _binary(optimizer=keras.optimizers.SGD(1.0))
            start = np.concatenate([w.ravel() for w in model.get_weights()])
            kprivacy_nb.make_private(model, noise_multiplier=0.0, sampling="shuffle",
                                     delta=1e-3)  # fmt: skip
            model.fit(x, y, epochs=1, batch_size=40, verbose=0)
            after = np.concatenate([w.ravel() for w in model.get_weights()])
            updates.append(np.linalg.norm(after - start))
        finally:
            keras.mixed_precision.set_global_policy("float32")
    assert updates[1] == pytest.approx(updates[0], rel=0.05)


def test_a_validation_split_of_private_rows_is_named_on_the_card():
    x, y = _data(n=100)
    model = kprivacy_nb.make_private(_binary(), noise_multiplier=1.0, delta=1e-3)
    model.fit(x, y, epochs=1, batch_size=10, validation_split=0.2, verbose=0)
    assert "NOT covered by ε" in model.privacy.summary()["validation_metrics"]
    model.fit(x, y, epochs=1, batch_size=10, validation_data=(x[:10], y[:10]), verbose=0)
    assert "NOT" not in model.privacy.summary()["validation_metrics"]


def test_the_first_hour_label_and_data_mistakes_get_their_fix():
    import pandas as pd

    x, y = _data(n=40)
    # The standard binary classifier with labels of shape (n,) just trains.
    run = kprivacy_nb.dp_fit(_binary(), x, y, epochs=1, batch_size=10, noise_multiplier=1.0,
                             verbose=0)  # fmt: skip
    assert run.steps == 4 and run.delta_source.startswith("defaulted")
    assert run.delta == 1e-3  # the largest power of ten ≤ 1/(10·40)
    sparse = keras.Sequential([keras.Input((10,)), keras.layers.Dense(3)])
    sparse.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    onehot = np.eye(3, dtype="float32")[np.arange(40) % 3]
    with pytest.raises(InvalidParameterError, match=r"one-hot .* y\.argmax\(1\)"):
        kprivacy_nb.dp_fit(sparse, x, onehot, epochs=1, batch_size=10, noise_multiplier=1.0)
    words = np.array(["cat", "dog"] * 20)
    with pytest.raises(InvalidParameterError, match="factorize"):
        kprivacy_nb.dp_fit(_binary(), x, words, epochs=1, batch_size=10, noise_multiplier=1.0)
    frame = pd.DataFrame(x, columns=[f"f{i}" for i in range(10)])
    frame["f3"] = frame["f3"].astype(str)
    with pytest.raises(InvalidParameterError, match="'f3'"):
        kprivacy_nb.dp_fit(_binary(), frame, y, epochs=1, batch_size=10, noise_multiplier=1.0)
    model = kprivacy_nb.make_private(_binary(), noise_multiplier=1.0)
    with pytest.raises(InvalidParameterError, match="'f3'"):
        model.fit(frame, y, epochs=1, batch_size=10)
    # A binary model with a categorical loss would spend ε learning nothing: refused with the fix.
    wrong = _binary()
    wrong.compile(optimizer="adam", loss="categorical_crossentropy")
    with pytest.raises(InvalidParameterError, match="one output unit .*binary_crossentropy"):
        kprivacy_nb.dp_fit(wrong, x, y, epochs=1, batch_size=10, noise_multiplier=1.0)
    # The wrong number of features: one line with both shapes (the data's, not the probe's).
    with pytest.raises(InvalidParameterError) as caught:
        kprivacy_nb.dp_fit(_binary(d=12), x, y, epochs=1, batch_size=10, noise_multiplier=1.0)
    message = str(caught.value)
    assert message.startswith(
        "x does not fit the model's input: the model expects rows of shape (12,), x has rows "
        "of shape (10,) ("
    )
    assert "\n" not in message and "\x1b" not in message and "(2, " not in message
    # A dict whose key is not the input's name: Keras' reason, not two identical shapes.
    with pytest.raises(InvalidParameterError) as caught:
        kprivacy_nb.dp_fit(_binary(), {"features": x}, y, epochs=1, batch_size=10,
                           noise_multiplier=1.0)  # fmt: skip
    message = str(caught.value)
    assert message.startswith(
        "x does not fit the model's input: x is a dict with keys ['features'], the model's "
        "inputs are named ['"
    )
    assert "rows of shape" not in message
    # A Python list of rows: one short line asking for an array — it listed every row's shape
    # and echoed a row's values (4,250 characters).
    with pytest.raises(InvalidParameterError) as caught:
        model.fit(x.tolist(), y.tolist(), epochs=1, batch_size=10, verbose=0)
    message = str(caught.value)
    assert "np.asarray(x)" in message and len(message) < 300
    assert f"{x[0, 0]:.4f}"[:6] not in message
    # A tf.data Dataset is refused for what it is (it carries its own y).
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(10)
    with pytest.raises(InvalidParameterError, match="tf.data.Dataset: .*Poisson"):
        kprivacy_nb.make_private(_binary(), noise_multiplier=1.0).fit(dataset, epochs=1)


def test_retraining_composes_unless_fresh_data_is_declared(tmp_path):
    x, y = _data(n=200)
    model = _binary()
    first = kprivacy_nb.dp_fit(model, x, y, epochs=1, batch_size=20, noise_multiplier=1.0,
                               delta=1e-4, verbose=0)  # fmt: skip
    again = kprivacy_nb.dp_fit(model, x, y, epochs=1, batch_size=20, noise_multiplier=1.0,
                               delta=1e-4, verbose=0)  # fmt: skip
    assert again.steps == 20 and again.epsilon > first.epsilon
    assert again.summary()["composition"] == "every private run of this model (2 fits, composed)"
    assert (again.summary()["fits"], again.summary()["fit_steps"]) == (2, 10)
    card = again._repr_html_()  # what the notebook shows says it too
    assert "20 over 2 fits (this fit: 10 steps, 1 epochs)" in card
    assert "every private run of this model (2 fits, composed)" in card
    assert "fits=2" in repr(again)
    fresh = kprivacy_nb.dp_fit(model, x, y, epochs=1, batch_size=20, noise_multiplier=1.0,
                               delta=1e-4, verbose=0, fresh_data=True)  # fmt: skip
    assert fresh.steps == 10 and fresh.epsilon == pytest.approx(first.epsilon)
    assert "fresh data" in fresh.summary()["composition"]
    assert "fresh data declared" in fresh._repr_html_() and "fresh_data=True" in repr(fresh)
    ledger = Ledger(tmp_path / "l.db")
    ledger.create("synth", epsilon=20.0, delta=1e-5)
    charged = kprivacy_nb.dp_fit(_binary(), x, y, epochs=1, batch_size=20, noise_multiplier=1.0,
                                 ledger=("synth", ledger), verbose=0)  # fmt: skip
    assert charged.delta == 1e-5 and "ledger" in charged.delta_source


def test_a_verbose_fit_says_what_it_does_before_the_first_step(capsys):
    """Calibrating σ takes seconds: a verbose fit says so (and the σ it chose) before Keras'
    first progress line; verbose=0 prints nothing of ours."""
    x, y = _data()
    model = _binary()
    kprivacy_nb.make_private(model, target_epsilon=2.0, delta=1e-4)
    model.fit(x, y, epochs=1, batch_size=60, verbose=2)
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "calibrating σ for ε = 2 at δ = 0.0001 (1 epochs, batch 60 of 600)…"
    sigma = model.privacy.noise_multiplier
    assert out[1].startswith(
        f"σ = {sigma:.4g}; checking per-example clipping on 8 real examples (and the traced "
        "step on 60)"
    )
    assert "epsilon:" in out[-1]  # then Keras' own progress
    model.fit(x, y, epochs=1, batch_size=60, verbose=0)
    assert capsys.readouterr().out == ""


def test_a_target_mostly_spent_by_earlier_fits_is_said_out_loud():
    """A second fit under the same target ε gets what is left: when that is little, the user
    hears it (σ would otherwise jump silently to mostly noise)."""
    from kprivacy_nb.errors import PrivacyBudgetWarning

    x, y = _data(n=400)
    model = _binary()
    kprivacy_nb.make_private(model, target_epsilon=2.0, delta=1e-4)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", PrivacyBudgetWarning)  # the first fit: nothing to say
        model.fit(x, y, epochs=2, batch_size=40, verbose=0)
    first_sigma = model.privacy.noise_multiplier
    with pytest.warns(
        PrivacyBudgetWarning, match=r"already spent ε = 2 of its target 2 .*fresh_data=True"
    ):
        model.fit(x, y, epochs=1, batch_size=40, verbose=0)
    assert model.privacy.noise_multiplier > 5 * first_sigma  # why it matters
    assert model.privacy.epsilon <= 2.0 + 1e-9


def test_dataframes_with_mixed_or_nullable_columns_train():
    import pandas as pd

    x, y = _data(n=200, d=8)
    frame = pd.DataFrame(x[:, :6], columns=[f"f{i}" for i in range(6)])
    frame["flag"] = x[:, 6] > 0  # floats and booleans: one float array
    frame["count"] = pd.array((x[:, 7] * 10).round().astype(int), dtype="Int64")  # nullable
    run = kprivacy_nb.dp_fit(_binary(d=8), frame, pd.Series(y), epochs=1, batch_size=20,
                             noise_multiplier=1.0, delta=1e-3, verbose=0)  # fmt: skip
    assert run.steps == 10
    frame.loc[7, "count"] = pd.NA  # a missing value is named, not an "object array"
    with pytest.raises(InvalidParameterError, match="count|column 7|NaN|not finite"):
        kprivacy_nb.dp_fit(_binary(d=8), frame, y, epochs=1, batch_size=20,
                           noise_multiplier=1.0, delta=1e-3, verbose=0)  # fmt: skip


def test_a_fit_per_epoch_loop_has_the_epsilon_of_one_long_fit():
    """k fits of one epoch are k epochs of one mechanism: the card (and the last epoch's ε in
    the history) says exactly the ε of one fit of k epochs — composed as one run, so the
    accountant's work does not grow with the number of calls."""
    from kprivacy_nb.dp import accounting

    x, y = _data(n=300)
    model = _binary()
    kprivacy_nb.make_private(model, noise_multiplier=1.0, delta=1e-4, seed=0)
    for _ in range(4):
        history = model.fit(x, y, epochs=1, batch_size=30, verbose=0)
    one_run = accounting.compute_epsilon(300, 30, 4, 1.0, 1e-4)
    assert model.privacy.fits == 4 and model.privacy.steps == 40
    assert model.privacy.epsilon == pytest.approx(one_run, rel=1e-9)
    assert history.history["epsilon"][-1] == pytest.approx(one_run, rel=1e-9)
    # Another batch size is another mechanism: composed with the first, never merged into it.
    model.fit(x, y, epochs=1, batch_size=60, verbose=0)
    acct = accounting.make_accountant("pld")
    acct.compose(accounting.Mechanism(300, 30, 1.0).event(40))
    mixed = acct.compose(accounting.Mechanism(300, 60, 1.0).event(5)).get_epsilon(1e-4)
    assert model.privacy.epsilon == pytest.approx(mixed, rel=1e-9) and mixed > one_run


def test_fitting_again_reuses_the_checked_engine_and_its_trace_only_when_nothing_changed():
    """A fit-per-epoch loop pays the self-check and the trace once; the same step keeps running
    (ε composes as ever), and any change the check depends on — data, clip, loss, optimizer —
    gets a fresh engine and check."""
    x, y = _data(n=300)
    model = _binary()
    kprivacy_nb.make_private(model, noise_multiplier=1.0, delta=1e-4, seed=0)
    model.fit(x, y, epochs=1, batch_size=30, verbose=0)
    first = model.privacy
    assert first.self_check_seconds > 0 and first.trace_count == 1
    model.fit(x, y, epochs=1, batch_size=30, verbose=0)
    again = model.privacy
    assert again.self_check_seconds == 0.0 and again.trace_count == 0  # reused, not retraced
    assert again.steps == 20 and again.fits == 2 and again.epsilon > first.epsilon
    assert keras.Model.fit is not None and model.train_function is None  # not left on the model
    # Changed data (same array object, edited in place): checked and traced again.
    x[0, 0] += 1.0
    model.fit(x, y, epochs=1, batch_size=30, verbose=0)
    assert model.privacy.self_check_seconds > 0 and model.privacy.trace_count == 1
    # Another batch size (the traced probe ran at the old one): checked again.
    model.fit(x, y, epochs=1, batch_size=20, verbose=0)
    assert model.privacy.self_check_seconds > 0
    # Recompiled (new optimizer): checked again, and the new optimizer is the one that trains.
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss="binary_crossentropy")
    before = [w.copy() for w in model.get_weights()]
    model.fit(x, y, epochs=1, batch_size=20, verbose=0)
    assert model.privacy.self_check_seconds > 0
    for a, b in zip(model.get_weights(), before, strict=True):
        np.testing.assert_array_equal(a, b)  # learning rate 0: nothing moved


def test_a_multi_input_model_takes_a_list_of_arrays_as_plain_fit_does():
    rng = np.random.default_rng(3)
    a = rng.normal(size=(40, 6, 4)).astype("float32")
    b = rng.normal(size=(40, 3)).astype("float32")
    y = rng.normal(size=(40, 1)).astype("float32")
    first, second = keras.Input((6, 4)), keras.Input((3,))
    joined = keras.layers.Concatenate()([keras.layers.Flatten()(first), second])
    model = keras.Model([first, second], keras.layers.Dense(1)(joined))
    model.compile(optimizer="sgd", loss="mse")
    kprivacy_nb.make_private(model, noise_multiplier=1.0, delta=1e-3)
    history = model.fit([a, b], y, epochs=2, batch_size=10, verbose=0)
    assert len(history.history["epsilon"]) == 2 and model.privacy.steps == 8


def test_each_step_adds_gaussian_noise_of_the_stated_scale():
    """The noise is what the card says: N(0, σ²C²) on the clipped sum, divided by the expected
    batch size — measured on the updates of a kernel whose gradient is exactly 0 (zero inputs),
    so what moves it is the noise alone."""
    n, batch, sigma, clip, width = 512, 64, 1.5, 0.5, 64
    x = np.zeros((n, width), np.float32)
    y = np.zeros((n, width), np.float32)
    model = keras.Sequential([keras.Input((width,)), keras.layers.Dense(width, use_bias=False)])
    model.compile(optimizer=keras.optimizers.SGD(1.0), loss="mse")
    kprivacy_nb.make_private(model, noise_multiplier=sigma, l2_norm_clip=clip, delta=1e-3)
    steps = []
    for _ in range(3):
        before = model.get_weights()[0].copy()
        model.fit(x, y, epochs=1, batch_size=batch, verbose=0)
        steps.append(model.get_weights()[0] - before)
    # An epoch is n / batch steps, each adding independent noise of std σC / batch.
    want = sigma * clip / batch * np.sqrt(n // batch)
    for update in steps:
        z = update.ravel() / want  # should be N(0, 1), width² draws
        assert abs(z.mean()) < 5 / np.sqrt(z.size)
        assert abs(z.std() - 1) < 5 / np.sqrt(2 * z.size)
    # fresh noise every step
    assert np.abs(np.corrcoef(steps[0].ravel(), steps[1].ravel())[0, 1]) < 0.1


def test_a_class_label_out_of_range_is_refused_before_anything_runs():
    """Unchecked, the first step sampling the row stopped training halfway, and TensorFlow's
    error listed the labels of every other example in that batch."""
    rng = np.random.default_rng(3)
    x = rng.integers(1, 20, (64, 5)).astype("int32")
    y = rng.integers(0, 3, 64)
    y[50] = 3
    model = keras.Sequential([keras.Input((5,), dtype="int32"), keras.layers.Embedding(20, 4),
                              keras.layers.LSTM(4), keras.layers.Dense(3)])  # fmt: skip
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="sparse_categorical_crossentropy")
    kprivacy_nb.make_private(model, noise_multiplier=1.0, delta=1e-3)
    before = model.get_weights()
    with pytest.raises(InvalidParameterError, match="row 50 has a class label outside 0…2") as exc:
        model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    assert "Label values" not in str(exc.value)
    assert getattr(model, "privacy", None) is None  # no run recorded: nothing was spent
    for a, b in zip(before, model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    # ignore_class labels are fine, and so is every label in range
    y[50] = -1
    model.compile(optimizer=keras.optimizers.SGD(0.1),
                  loss=keras.losses.SparseCategoricalCrossentropy(ignore_class=-1))  # fmt: skip
    kprivacy_nb.make_private(model, noise_multiplier=1.0, delta=1e-3)
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)


def test_the_no_noise_warning_points_at_the_users_line():
    x, y = _data(n=64)
    with pytest.warns(RuntimeWarning, match="NO PRIVACY") as said:
        kprivacy_nb.dp_fit(_binary(), x, y, epochs=1, batch_size=16, noise_multiplier=0.0,
                           delta=1e-3, verbose=0)  # fmt: skip
    where = [w.filename for w in said if "NO PRIVACY" in str(w.message)]
    assert where and all(name == __file__ for name in where), where


def test_making_a_model_private_after_plain_training_is_said_out_loud():
    """ε covers the private fits only: a model already trained without privacy (on the same
    data, perhaps) gets a warning instead of a card that looks like the whole story."""
    import warnings

    from kprivacy_nb.errors import PrivacyBudgetWarning

    x, y = _data(n=64)
    fresh = _binary()
    with warnings.catch_warnings():
        warnings.simplefilter("error", PrivacyBudgetWarning)
        kprivacy_nb.make_private(fresh, noise_multiplier=1.0, delta=1e-3)  # nothing to say
    trained = _binary()
    trained.fit(x, y, epochs=1, batch_size=16, verbose=0)
    with pytest.warns(PrivacyBudgetWarning, match="already taken 4 steps outside make_private"):
        kprivacy_nb.make_private(trained, noise_multiplier=1.0, delta=1e-3)
    trained.fit(x, y, epochs=1, batch_size=16, verbose=0)
    with warnings.catch_warnings():  # made private again after private fits: nothing new
        warnings.simplefilter("error", PrivacyBudgetWarning)
        kprivacy_nb.make_private(trained, noise_multiplier=1.0, delta=1e-3)
