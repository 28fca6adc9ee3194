"""Attacks on the DP guarantee, each built from a case that once broke it.

The attacker's yardstick: with σ = 0, the change of one step's update when one example is added
must be at most C (the definition of sensitivity DP-SGD's ε rests on); and each example's clipped
contribution must equal the naive definition (one GradientTape per example).
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from kprivacy_nb import dp_fit, make_private  # noqa: E402
from kprivacy_nb.dp import accounting  # noqa: E402
from kprivacy_nb.dp.clipping import EXACT_FALLBACK, FastClipper, per_example_loss_fn  # noqa: E402
from kprivacy_nb.dp.engine import DPSGDEngine  # noqa: E402
from kprivacy_nb.dp.ledger import Ledger  # noqa: E402
from kprivacy_nb.errors import (  # noqa: E402
    BudgetExceededError,
    InvalidParameterError,
    LedgerError,
    TrainingError,
)

pytestmark = [
    pytest.mark.filterwarnings("ignore:noise_multiplier=0"),
    pytest.mark.filterwarnings("ignore:ε is huge"),
]

k = keras.layers


def _engine(model, x, y, clip, loss="mse"):
    model.compile(loss=loss)
    return DPSGDEngine(
        model, per_example_loss_fn(loss), keras.optimizers.SGD(1.0), l2_norm_clip=clip,
        noise_multiplier=0.0, X=tf.constant(x), Y=tf.constant(y),
    )  # fmt: skip


def _update(engine, x, y, rows):
    """One σ = 0 step of SGD(1) with denominator 1 on ``rows``: the clipped sum itself."""
    before = [v.numpy().astype(np.float64) for v in engine.variables]
    engine.step(tf.constant(x), tf.constant(y), np.asarray(rows, np.int32), 1.0)
    after = [v.numpy().astype(np.float64) for v in engine.variables]
    for v, b in zip(engine.variables, before, strict=True):
        v.assign(b.astype(np.float32))
    return np.concatenate([(b - a).ravel() for b, a in zip(before, after, strict=True)])


def _sensitivity(engine, x, y, victim):
    """‖update(all rows) − update(all rows but ``victim``)‖."""
    everyone = np.arange(len(x))
    without = everyone[everyone != victim]
    return float(np.linalg.norm(_update(engine, x, y, everyone) - _update(engine, x, y, without)))


def _naive_norms(model, loss, x, y):
    fn = per_example_loss_fn(loss)
    out = []
    for i in range(len(x)):
        with tf.GradientTape() as tape:
            value = tf.reduce_sum(fn(y[i : i + 1], model(x[i : i + 1], training=False)))
        grads = tape.gradient(value, model.trainable_variables)
        out.append(
            np.sqrt(
                sum(
                    np.sum(np.square(tf.convert_to_tensor(g).numpy(), dtype=np.float64))
                    for g in grads
                )
            )
        )
    return np.array(out)


# --------------------------------------------------------------------------- 1. grouped convs


@pytest.mark.parametrize("conv", ["conv2d", "conv1d"])
def test_grouped_convolution_is_clipped_to_c(conv):
    rng = np.random.default_rng(0)
    if conv == "conv2d":
        layers = [
            k.Conv2D(6, 3, groups=3, padding="same"),
            k.Conv2D(6, 2, groups=2),
            k.Flatten(),
            k.Dense(2),
        ]
        x = rng.normal(size=(8, 6, 6, 3)).astype("float32")
    else:
        layers = [k.Conv1D(4, 3, groups=2), k.Flatten(), k.Dense(2)]
        x = rng.normal(size=(8, 7, 4)).astype("float32")
    y = rng.normal(size=(8, 2)).astype("float32")
    model = keras.Sequential([keras.Input(x.shape[1:]), *layers])
    clip = 1e-3
    engine = _engine(model, x, y, clip)
    assert "groups" in " ".join(engine.report.values())
    for victim in range(3):
        assert _sensitivity(engine, x, y, victim) <= clip * (1 + 1e-4)
    clipper = FastClipper(model, per_example_loss_fn("mse"), l2_norm_clip=clip, sample_x=x[:2])
    parts = clipper.parts(tf.constant(x), tf.constant(y), tf.ones([8]), training=False)
    fast = np.sqrt(sum(np.asarray(p.sq, np.float64) for p in parts.layers))
    np.testing.assert_allclose(fast, _naive_norms(model, "mse", x, y), rtol=1e-4)


class OpaqueConv(keras.layers.Conv2D):
    """A grouped convolution with its own call(): no fast path, so it takes the fallback."""

    def call(self, inputs):
        return super().call(inputs)


def test_fallback_is_verified_and_made_exact_when_the_vectorised_jacobian_is_wrong():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(8, 5, 5, 4)).astype("float32")
    y = rng.normal(size=(8, 2)).astype("float32")
    model = keras.Sequential(
        [keras.Input((5, 5, 4)), OpaqueConv(4, 3, groups=2), k.Flatten(), k.Dense(2)]
    )
    clip = 1e-3
    engine = _engine(model, x, y, clip)
    path = engine.report[model.layers[0].name]
    assert "fallback" in path and "verified" in path
    for victim in range(3):
        assert _sensitivity(engine, x, y, victim) <= clip * (1 + 1e-4)
    # TensorFlow's pfor jacobian is wrong for grouped convolutions: the self-check noticed.
    assert EXACT_FALLBACK in path


# --------------------------------------------------------------------------- 2. cancellation


@pytest.mark.parametrize("seed", [0, 1, 3])
def test_large_nearly_constant_sequence_input_is_still_clipped(seed):
    # Inputs ~1e5–1e6, almost the same at every position; the next layer reads positions with
    # alternating signs, so the ghost norm's terms nearly cancel. In float32 the norm came out
    # ≤ 0 and the record went unclipped (update norm in the hundreds with C = 1).
    rng = np.random.default_rng(seed)
    steps, width = 8, 48
    # The record sits past the examples the self-check looks at: only the norms protect it.
    x = rng.normal(size=(12, steps, width)).astype("float32")
    y = rng.normal(size=(12, 1)).astype("float32")
    model = keras.Sequential([keras.Input((steps, width)), k.Dense(width), k.Flatten(), k.Dense(1)])
    w = rng.normal(size=(width, 1))
    signs = np.where(np.arange(steps) % 2 == 0, 1.0, -1.0)[:, None, None]
    model.layers[-1].kernel.assign(
        (signs * w[None] * 10).reshape(steps * width, 1).astype("float32")
    )
    model.layers[-1].trainable = False  # only the ghost-norm layer's own norm can clip it
    clip = 1.0
    engine = _engine(model, x, y, clip)
    assert "ghost norm (8 positions" in engine.report[model.layers[0].name]
    for amplitude in (1e5, 1e6):
        x[10] = amplitude + rng.normal(size=(steps, width)).astype("float32")
        assert _sensitivity(engine, x, y, 10) <= clip * (1 + 1e-4)


def test_tiny_inputs_read_with_a_huge_output_gradient_are_still_clipped():
    # ‖G‖ = ‖a‖·‖dz‖ for a Dense on vectors. Inputs of 1e-24 square to 1e-48, below float32's
    # range: summed naively, ‖a‖² is 0 and the record goes unclipped, although a target of
    # ~1e18 makes its gradient norm ~8e-6 — eight times C.
    rng = np.random.default_rng(11)
    x = rng.normal(size=(12, 16)).astype("float32")
    y = rng.normal(size=(12, 1)).astype("float32")
    model = keras.Sequential([keras.Input((16,)), k.Dense(1, use_bias=False)])
    clip = 1e-6
    engine = _engine(model, x, y, clip)
    x[10], y[10] = 1e-24, 1e18  # past the self-check's rows: only the norms protect it
    assert _sensitivity(engine, x, y, 10) <= clip * (1 + 1e-4)


def test_a_record_whose_repeated_token_gradients_cancel_cannot_erase_the_others():
    # Per-record weights on the tokens (think TF-IDF) of +1e20, 1 and -1e20 on one token repeated
    # three times: that token's gradient is small, so the record is not clipped. The clipped sum
    # once added every position's row to the table in float32: adding ±1e20 wiped out what the
    # other records had put in that row, an effect of one record of 4·C. Public API only.

    vocab, n, clip = 10, 40, 0.1
    rng = np.random.default_rng(21)
    ids = np.stack([rng.permutation(np.arange(4, vocab))[:3] for _ in range(n)]).astype("int32")
    ids[:, 1] = 3  # every record puts something in row 3
    weights = np.tile(np.array([0.0, 1.0, 0.0], "float32"), (n, 1))
    ids[5], weights[5] = 3, [1e20, 1.0, -1e20]  # the attacker (not a row the probe looks at)
    y = np.full((n, 1), 0.6, "float32")

    def table_after(sample_weight):
        keras.utils.set_random_seed(0)
        tokens, w = keras.Input((3,), dtype="int32"), keras.Input((3,))
        h = k.Embedding(vocab, 1, embeddings_initializer="ones")(tokens)
        out = k.Lambda(lambda a: keras.ops.sum(a[0][..., 0] * a[1], axis=1, keepdims=True))([h, w])
        model = keras.Model([tokens, w], out)
        model.compile(optimizer=keras.optimizers.SGD(1.0), loss="mse")
        make_private(model, noise_multiplier=0.0, sampling="shuffle", delta=1e-3,
                     l2_norm_clip=clip)  # fmt: skip
        model.fit([ids, weights], y, epochs=1, batch_size=n, sample_weight=sample_weight,
                  verbose=0)  # fmt: skip
        return model.get_weights()[0].astype(np.float64).ravel()

    without = np.ones(n, "float32")
    without[5] = 0.0  # weight 0: the record is left out of the sum
    moved = np.linalg.norm(table_after(np.ones(n, "float32")) - table_after(without)) * n
    assert moved <= clip * (1 + 1e-3), moved / clip


@pytest.mark.parametrize("width", [4000, 20000])  # float32 sums / float64 sums
def test_rounding_of_the_sums_of_squares_cannot_lift_a_record_past_c(width):
    # a = [1, δ, δ, …] with δ² just under half an ulp of 1: summed in float32 every δ² rounds
    # away and ‖a‖² comes out ~(width·δ²) too small — the record's contribution would exceed C.
    rng = np.random.default_rng(16)
    x = rng.normal(size=(10, width)).astype("float32")
    y = rng.normal(size=(10, 1)).astype("float32")
    model = keras.Sequential([keras.Input((width,)), k.Dense(1, use_bias=False)])
    model.layers[0].kernel.assign(np.zeros((width, 1), "float32"))
    clip = 1e-3
    engine = _engine(model, x, y, clip)
    x[9], y[9] = np.sqrt(5.9e-8), 1.0
    x[9, 0] = 1.0
    assert _sensitivity(engine, x, y, 9) <= clip * (1 + 2e-7)


@pytest.mark.parametrize("where", ["float ids", "ids computed in the model"])
def test_an_out_of_range_id_past_the_checked_rows_never_stops_training_midway(where):
    # An id the table does not have, in a record the self-check does not look at: training must
    # not stop at the step that happens to sample it (that step would tell on the record).
    rng = np.random.default_rng(17)
    ids = rng.integers(0, 20, (300, 5))
    ids[250, 2] = 25
    y = rng.integers(0, 2, 300)
    if where == "float ids":  # a model reading the ids directly: refused before anything runs
        model = keras.Sequential([keras.Input((5,), dtype="int32"), k.Embedding(20, 3),
                                  k.GlobalAveragePooling1D(), k.Dense(2)])  # fmt: skip
        with pytest.raises(InvalidParameterError, match="row [0-9]+ has token id 25, out of range"):
            dp_fit(model, ids.astype("float32"), y, epochs=1, batch_size=30,
                   noise_multiplier=1.0, delta=1e-3, loss="sparse_categorical_crossentropy",
                   verbose=0)  # fmt: skip
        return
    # Ids computed in the model (here trivially): not range-checked up front like the ids an
    # Embedding reads straight from the data.
    tokens, extra = keras.Input((5,), dtype="int32", name="t"), keras.Input((2,), name="e")
    pooled = k.GlobalAveragePooling1D()(k.Embedding(20, 3)(keras.ops.add(tokens, 0)))
    model = keras.Model([tokens, extra], k.Dense(2)(k.Concatenate()([pooled, extra])))
    x = {"t": ids.astype("int32"), "e": rng.normal(size=(300, 2)).astype("float32")}
    run = dp_fit(model, x, y, epochs=2, batch_size=30, noise_multiplier=1.0, delta=1e-3,
                 loss="sparse_categorical_crossentropy", verbose=0)  # fmt: skip
    assert run.steps == 20  # every planned step ran; the record was dropped where sampled


def test_huge_but_finite_records_are_clipped_not_dropped():
    # An input of 1e19 squares to the edge of float32's range, yet with a tiny weight its loss
    # and its gradient (norm ~2e15) are finite: it must be clipped like any other record, not
    # dropped as "non-finite".
    rng = np.random.default_rng(12)
    x = rng.normal(size=(12, 4)).astype("float32")
    y = rng.normal(size=(12, 1)).astype("float32")
    model = keras.Sequential([keras.Input((4,)), k.Dense(1, use_bias=False)])
    model.layers[0].kernel.assign(np.full((4, 1), 1e-19, "float32"))
    engine = _engine(model, x, y, 1.0)
    x[10], y[10] = [1e19, 0.0, 0.0, 0.0], 1.0001
    assert _sensitivity(engine, x, y, 10) == pytest.approx(1.0, rel=1e-4)
    stats = engine.step(tf.constant(x), tf.constant(y), np.arange(12, dtype=np.int32), 1.0)
    assert stats.nonfinite == 0 and stats.applied


def test_a_huge_clipping_norm_still_applies_every_finite_update():
    # With C = 1e37 the noise sum overflows float32 although every entry is finite: the
    # update must still be applied (the sum alone must not decide).
    rng = np.random.default_rng(13)
    x = rng.normal(size=(32, 8)).astype("float32")
    y = rng.normal(size=(32, 1)).astype("float32")
    model = keras.Sequential([keras.Input((8,)), k.Dense(256), k.Dense(1)])
    model.compile(loss="mse")
    engine = DPSGDEngine(
        model, per_example_loss_fn("mse"), keras.optimizers.SGD(1e-30), l2_norm_clip=1e37,
        noise_multiplier=1.0, X=tf.constant(x), Y=tf.constant(y), seed=0,
    )  # fmt: skip
    try:
        for _ in range(6):
            stats = engine.step(tf.constant(x), tf.constant(y), np.arange(8, dtype=np.int32), 1.0)
            assert stats.applied
    finally:
        engine.close()


@pytest.mark.parametrize("row", [3, 30], ids=["checked-row", "later-row"])
def test_one_extreme_label_is_dropped_wherever_it_is_not_a_reason_to_refuse(row):
    """A label of 1e19 makes that record's float32 gradient norm² overflow: the step drops it.
    Among the rows the self-check reads it used to refuse the whole model instead — one record
    deciding whether training runs at all."""
    rng = np.random.default_rng(row)
    x = rng.normal(size=(40, 6, 3)).astype("float32")
    y = rng.normal(size=(40, 1)).astype("float32")
    y[row] = 1e19
    weights = {}
    for kept in (True, False):
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((6, 3)), k.LSTM(4), k.Dense(1)])
        start = [w.copy() for w in model.get_weights()]
        sample_weight = np.ones(40, np.float32)
        if not kept:
            sample_weight[row] = 0.0
        model.compile(optimizer=keras.optimizers.SGD(1.0), loss="mse")
        make_private(model, noise_multiplier=0.0, l2_norm_clip=1.0, sampling="shuffle",
                     delta=1e-3)  # fmt: skip
        model.fit(x, y, epochs=1, batch_size=40, verbose=0, sample_weight=sample_weight)
        weights[kept] = [w - s for w, s in zip(model.get_weights(), start, strict=True)]
    assert max(float(np.abs(w).max()) for w in weights[True]) > 1e-4  # the others trained
    for with_it, without in zip(weights[True], weights[False], strict=True):
        np.testing.assert_allclose(with_it, without, rtol=1e-5, atol=1e-7)


def test_the_self_check_never_passes_on_nan():
    # Non-finite examples are dropped by the step, so the self-check compares the others —
    # and refuses when there are none, instead of reporting "verified (rel. err nan)".
    rng = np.random.default_rng(14)
    x = rng.normal(size=(16, 4)).astype("float32")
    y = rng.normal(size=(16, 1)).astype("float32")
    y[1] = np.nan
    model = keras.Sequential([keras.Input((4,)), k.Dense(3), k.Dense(1)])
    report = _engine(model, x, y, 1.0).report
    assert all("verified (rel. err" in r and "nan" not in r for r in report.values()), report
    y[:8] = np.nan
    with pytest.raises(TrainingError, match="could not compare any gradient norm"):
        _engine(keras.Sequential([keras.Input((4,)), k.Dense(1)]), x, y, 1.0)


def test_ids_stored_as_floats_train():
    rng = np.random.default_rng(15)
    x = rng.integers(0, 50, (64, 6)).astype("float32")
    y = rng.integers(0, 2, 64)
    for dtype in ("int32", "float32"):
        model = keras.Sequential([keras.Input((6,), dtype=dtype), k.Embedding(50, 4),
                                  k.GlobalAveragePooling1D(), k.Dense(2)])  # fmt: skip
        run = dp_fit(model, x, y, epochs=1, batch_size=16, noise_multiplier=1.0, delta=1e-3,
                     loss="sparse_categorical_crossentropy", verbose=0)  # fmt: skip
        assert run.steps == 4


@pytest.mark.parametrize(
    "clip",
    [0.0, 1e-7, float("nan"), float("inf"), "one", "1.0", True, np.float32(1e-6), 1e39, 10**400],
)
def test_a_clipping_norm_below_the_supported_range_is_refused(clip):
    from kprivacy_nb import make_private
    from kprivacy_nb.compat.tensorflow_privacy import DPKerasSGDOptimizer
    from kprivacy_nb.errors import InvalidParameterError

    model = keras.Sequential([keras.Input((4,)), k.Dense(1)])
    with pytest.raises(
        InvalidParameterError, match="l2_norm_clip must be a number from 1e-06 to 3.4e\\+38"
    ):
        make_private(model, noise_multiplier=1.0, l2_norm_clip=clip)
    with pytest.raises(
        InvalidParameterError, match="l2_norm_clip must be a number from 1e-06 to 3.4e\\+38"
    ):
        DPKerasSGDOptimizer(l2_norm_clip=clip, noise_multiplier=1.0)
    if isinstance(clip, np.float32):  # what was compared is shown, not a rounded 1e-06
        with pytest.raises(InvalidParameterError, match=r"got 9\.99999997"):
            make_private(model, noise_multiplier=1.0, l2_norm_clip=clip)
    x = np.zeros((8, 4), "float32")
    with pytest.raises(InvalidParameterError, match="l2_norm_clip"):
        dp_fit(model, x, np.zeros((8, 1), "float32"), epochs=1, batch_size=4,
               noise_multiplier=1.0, loss="mse", l2_norm_clip=clip, verbose=0)  # fmt: skip


# --------------------------------------------------------------------------- 3. mixing


def test_a_layer_that_mixes_examples_is_refused():
    x = np.random.default_rng(3).normal(size=(16, 4)).astype("float32")
    y = np.zeros((16, 1), "float32")
    centred = keras.Sequential(
        [
            keras.Input((4,)),
            k.Dense(4),
            k.Lambda(lambda t: t - keras.ops.mean(t, axis=0)),
            k.Dense(1),
        ]
    )
    with pytest.raises(TrainingError, match="mixes the examples"):
        dp_fit(centred, x, y, epochs=1, batch_size=8, noise_multiplier=1.0, delta=1e-3, loss="mse",
               verbose=0)  # fmt: skip


def test_mixing_through_an_input_that_is_constant_in_the_checked_rows_is_refused():
    # An indicator input that happens to be all ones in the first rows still gets changed by
    # the check (whole-number floats move like ids; a constant one to a neighbour): a layer
    # dividing it by its batch mean is found.
    rng = np.random.default_rng(18)
    feat = rng.normal(size=(64, 4)).astype("float32")
    flags = np.ones((64, 3), "float32")
    y = rng.normal(size=(64, 1)).astype("float32")
    fi, mi = keras.Input((4,)), keras.Input((3,))
    mixed = k.Lambda(lambda m: m / (keras.ops.mean(m, axis=0, keepdims=True) + 1e-3))(mi)
    model = keras.Model([fi, mi], k.Dense(1)(k.Concatenate()([k.Dense(4)(fi), mixed])))
    with pytest.raises(TrainingError, match="mixes the examples"):
        dp_fit(model, [feat, flags], y, epochs=1, batch_size=16, noise_multiplier=1.0,
               delta=1e-3, loss="mse", verbose=0)  # fmt: skip


class TrainingOnlyMix(keras.layers.Layer):
    """Mixes examples only in training mode (as BatchNormalization does)."""

    def call(self, x, training=False):
        return x - keras.ops.mean(x, axis=0) if training else x


def test_mixing_only_in_training_mode_is_refused_and_dropout_is_not():
    x = np.random.default_rng(4).normal(size=(16, 4)).astype("float32")
    y = np.zeros((16, 1), "float32")
    sneaky = keras.Sequential([keras.Input((4,)), k.Dense(4), TrainingOnlyMix(), k.Dense(1)])
    with pytest.raises(TrainingError, match="mixes the examples"):
        dp_fit(sneaky, x, y, epochs=1, batch_size=8, noise_multiplier=1.0, delta=1e-3, loss="mse",
               verbose=0)  # fmt: skip
    fine = keras.Sequential(
        [keras.Input((4,)), k.Dense(8), k.Dropout(0.5), k.GaussianNoise(0.1), k.Dense(1)]
    )
    run = dp_fit(fine, x, y, epochs=1, batch_size=8, noise_multiplier=1.0, delta=1e-3, loss="mse",
                 verbose=0)  # fmt: skip
    assert run.verified


class GraphOnlyMix(keras.layers.Layer):
    """Mixes examples only when traced (the eager self-check sees an honest layer)."""

    def call(self, x):
        return x if tf.executing_eagerly() else x - keras.ops.mean(x, axis=0)


class LargeBatchMix(keras.layers.Layer):
    """Mixes examples only in batches larger than the eager self-check's 8 examples."""

    def call(self, x):
        mixed = x - keras.ops.mean(x, axis=0)
        return keras.ops.where(keras.ops.shape(x)[0] > 8, mixed, x)


@tf.custom_gradient
def _leaky_identity(t):
    def grad(dy):  # every example's gradient gets every other example's
        return dy + tf.reduce_sum(dy, axis=0, keepdims=True)

    return tf.identity(t), grad


class BackwardMix(keras.layers.Layer):
    """Honest forward pass; when traced, the backward pass adds the whole batch's gradient to
    each example (eagerly — as the per-example reference runs — it is an honest identity)."""

    def call(self, x):
        return x if tf.executing_eagerly() else _leaky_identity(x)


@pytest.mark.parametrize("layer", [GraphOnlyMix, LargeBatchMix, BackwardMix])
def test_mixing_the_eager_check_cannot_see_is_caught_in_the_traced_step(layer):
    x = np.random.default_rng(5).normal(size=(64, 4)).astype("float32")
    y = np.random.default_rng(6).normal(size=(64, 1)).astype("float32")
    model = keras.Sequential([keras.Input((4,)), k.Dense(4), layer(), k.Dense(1)])
    with pytest.raises(TrainingError, match="mixes the examples"):
        dp_fit(model, x, y, epochs=1, batch_size=32, noise_multiplier=1.0, delta=1e-3,
               loss="mse", l2_norm_clip=0.01, verbose=0)  # fmt: skip


def test_the_traced_probe_measures_at_most_c_on_an_honest_model():
    x = np.random.default_rng(7).normal(size=(64, 4)).astype("float32")
    y = np.random.default_rng(8).normal(size=(64, 1)).astype("float32")
    model = keras.Sequential([keras.Input((4,)), k.Dense(8), k.Dropout(0.3), k.Dense(1)])
    engine = _engine(model, x, y, clip=0.01)
    worst = engine.check_sensitivity(tf.constant(x), tf.constant(y), 32)
    assert 0.5 < worst <= 1.0 + 1e-3  # tiny C: every example is clipped to exactly C


class Scale(keras.layers.Layer):
    """A layer with no fast path: its weights take the per-example jacobian fallback."""

    def build(self, shape):
        self.w = self.add_weight(shape=(shape[-1],), initializer="ones")

    def call(self, x):
        return x * self.w


def test_an_overflowing_record_cannot_silence_the_rest_of_its_batch():
    # In the batched jacobian every example's gradient is a sum over rows, so one row with
    # 0·∞ = NaN made every example non-finite: one record dropped the whole batch.
    x = np.random.default_rng(9).normal(size=(16, 4)).astype("float32")
    y = np.random.default_rng(10).normal(size=(16, 1)).astype("float32")
    x[10] = 3e38  # finite, but the forward pass overflows
    model = keras.Sequential([keras.Input((4,)), Scale(), k.Dense(3), k.Dense(1)])
    engine = _engine(model, x, y, clip=0.05)
    assert any("fallback" in m for m in engine.report.values())
    everyone = _update(engine, x, y, np.arange(16))
    honest = _update(engine, x, y, np.delete(np.arange(16), 10))
    assert np.linalg.norm(honest) > 0.05  # the 15 others (each clipped to 0.05) do count
    np.testing.assert_allclose(everyone, honest, atol=1e-6)


# --------------------------------------------------------------------------- 4. metrics


def test_training_metrics_stay_in_the_notebook_unless_asked(tmp_path):
    from kprivacy_nb import secure_load, secure_save
    from kprivacy_nb.crypto.keys import generate_identity

    rng = np.random.default_rng(5)
    x = rng.normal(size=(64, 4)).astype("float32")
    y = rng.integers(0, 2, 64)
    model = keras.Sequential([keras.Input((4,)), k.Dense(2)])
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    live = []

    class Live:
        def on_epoch_end(self, epoch, logs):
            live.append(logs)

    run = dp_fit(model, x, y, epochs=1, batch_size=16, noise_multiplier=1.0, delta=1e-3, verbose=0,
                 validation_data=(x[:8], y[:8]), callbacks=[Live()])  # fmt: skip
    assert "loss" in live[0]  # the live monitor still sees it
    assert set(run.history) == {"epsilon", "val_loss", "val_accuracy"}
    identity = generate_identity(output=tmp_path / "me.key")
    path = tmp_path / "run.age"
    secure_save(run, path, recipients=[identity.public])
    loaded = secure_load(path, identities=[identity.path])
    assert "loss" not in loaded.history and "accuracy" not in loaded.history
    assert loaded.privacy_card["training_metrics"] == "not included"


# --------------------------------------------------------------------------- 6. ledger


def test_reservation_is_checked_under_the_budgets_accountant(tmp_path):
    ledger = Ledger(tmp_path / "l.db")
    ledger.create("rdp-budget", epsilon=5.0, delta=1e-5, accountant="rdp")
    event = accounting.dpsgd_event(n=1000, batch_size=100, noise_multiplier=0.9, steps=20)
    eps_pld = accounting.epsilon_of_event(event, 1e-5, "pld")
    eps_rdp = accounting.epsilon_of_event(event, 1e-5, "rdp")
    assert eps_pld <= 5.0 < eps_rdp  # fits under PLD, not under the budget's RDP
    with pytest.raises(BudgetExceededError):
        ledger.reserve("rdp-budget", event, accountant="pld")
    assert ledger.budget("rdp-budget").committed_epsilon == 0


def test_settle_never_records_more_than_reserved_past_the_cap(tmp_path):
    ledger = Ledger(tmp_path / "l.db")
    ledger.create("b", epsilon=2.0, delta=1e-5)

    def event(steps):
        return accounting.dpsgd_event(n=1000, batch_size=100, noise_multiplier=2.0, steps=steps)

    reservation = ledger.reserve("b", event(10))
    with pytest.raises(BudgetExceededError):
        reservation.settle(event(5000))
    budget = ledger.budget("b")
    assert budget.committed_epsilon <= budget.epsilon_cap
    reservation.settle(event(10))  # still pending, settles as reserved
    with pytest.raises(LedgerError):
        reservation.settle(event(10))
    more = ledger.reserve("b", event(10))
    more.settle(event(20))  # more than reserved but within the cap: fine
    assert ledger.budget("b").committed_epsilon <= 2.0


# --------------------------------------------------------------------------- 7. labels


def test_shuffle_pld_is_exact_at_large_epsilon_and_labelled():
    # TF Privacy's PLD statement for this run: ε = 169.08. The RDP bound is 175.3.
    eps = accounting.compute_epsilon(100_000, 1000, 100, 0.7, 1e-6, sampling="shuffle")
    assert eps == pytest.approx(169.08, abs=0.05)
    event = accounting.dpsgd_event(n=100_000, batch_size=1000, noise_multiplier=0.7,
                                   steps=100 * 100, sampling="shuffle")  # fmt: skip
    assert accounting.account(event, 1e-6, "pld") == (pytest.approx(eps), "pld")
    curve = accounting.epsilon_curve(100_000, 1000, 100, 0.7, 1e-6, sampling="shuffle")
    assert curve.accountant == "pld" and curve.epsilon[-1] == pytest.approx(eps)


def test_a_fallback_to_rdp_is_named_in_the_result():
    x = np.random.default_rng(6).normal(size=(40, 3)).astype("float32")
    model = keras.Sequential([keras.Input((3,)), k.Dense(1)])
    with pytest.warns(RuntimeWarning, match="RDP upper bound"):
        run = dp_fit(model, x, np.zeros((40, 1), "float32"), epochs=20, batch_size=20,
                     noise_multiplier=0.1, delta=1e-5, loss="mse", verbose=0)  # fmt: skip
    assert run.accountant == "rdp" and run.epsilon > accounting.PLD_MAX_EPSILON


# --------------------------------------------------------------------------- property test


def _layer_stack(draw):
    family = draw(st.sampled_from(["dense2d", "dense3d", "embedding", "conv1d", "conv2d"]))
    if family == "dense2d":
        layers = [
            k.Dense(draw(st.integers(1, 6)), activation="tanh"),
            k.LayerNormalization(),
            k.Dense(2),
        ]
        return layers, (5,), "float"
    if family == "dense3d":
        units = draw(st.integers(1, 40))
        return (
            [k.Dense(units), k.LayerNormalization(), k.GlobalAveragePooling1D(), k.Dense(2)],
            (draw(st.integers(1, 6)), 5),
            "float",
        )
    if family == "embedding":
        return (
            [k.Embedding(draw(st.integers(2, 9)), 3), k.Flatten(), k.Dense(2)],
            (draw(st.integers(1, 6)),),
            "int",
        )
    groups = draw(st.sampled_from([1, 2]))
    common = dict(
        strides=draw(st.integers(1, 2)),
        padding=draw(st.sampled_from(["valid", "same"])),
        groups=groups,
    )
    if family == "conv1d":
        conv = k.Conv1D(
            2 * draw(st.integers(1, 3)), draw(st.integers(1, 3)), dilation_rate=1, **common
        )
        return [conv, k.Flatten(), k.Dense(2)], (7, 4), "float"
    # (LayerNormalization over only 2 channels is so ill-conditioned that float32 per-example
    # tapes disagree with themselves by ~0.5%: the self-check refuses it, loudly.)
    conv = k.Conv2D(4 * draw(st.integers(1, 2)), draw(st.integers(1, 3)), **common)
    norm = k.GroupNormalization(groups=2) if draw(st.booleans()) else k.LayerNormalization()
    return [conv, norm, k.Flatten(), k.Dense(2)], (6, 6, 4), "float"


@st.composite
def _models(draw):
    layers, shape, kind = _layer_stack(draw)
    nested = draw(st.booleans())
    if nested:  # the same stack inside a functional model inside a Sequential
        inner_in = keras.Input(shape, dtype="int32" if kind == "int" else "float32")
        out = inner_in
        for layer in layers[:-1]:
            out = layer(out)
        layers = [keras.Model(inner_in, out), layers[-1]]
    seed = draw(st.integers(0, 2**16))
    return layers, shape, kind, seed


@settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(_models())
def test_fast_norms_equal_per_example_tapes_on_random_models(spec):
    layers, shape, kind, seed = spec
    rng = np.random.default_rng(seed)
    if kind == "int":
        x = rng.integers(0, 2, size=(6, *shape)).astype("int32")
    else:
        x = rng.normal(size=(6, *shape)).astype("float32") * rng.choice([0.1, 1.0, 100.0])
    y = rng.normal(size=(6, 2)).astype("float32")
    model = keras.Sequential(
        [keras.Input(shape, dtype="int32" if kind == "int" else "float32"), *layers]
    )
    clip = 1e-2
    engine = _engine(model, x, y, clip)
    assert all("verified" in v for v in engine.report.values())
    clipper = engine.clipper
    parts = clipper.parts(tf.constant(x), tf.constant(y), tf.ones([6]), training=False)
    fast = np.sqrt(sum(np.asarray(p.sq, np.float64) for p in parts.layers))
    np.testing.assert_allclose(fast, _naive_norms(model, "mse", x, y), rtol=2e-3, atol=1e-6)
    assert _sensitivity(engine, x, y, int(rng.integers(0, 6))) <= clip * (1 + 1e-4)
