"""DP-SGD math: one step equals the naive per-example clipped mean, for every fast path."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

from kprivacy_nb import dp_fit  # noqa: E402
from kprivacy_nb.dp.clipping import (  # noqa: E402
    FastClipper,
    per_example_loss_fn,
    reads_model_input,
    repeats,
)
from kprivacy_nb.errors import InvalidParameterError  # noqa: E402

pytestmark = [
    pytest.mark.filterwarnings("ignore:noise_multiplier=0"),
    pytest.mark.filterwarnings("ignore:ε is huge"),  # the σ = 0 runs that check the math
]

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


class Scale(keras.layers.Layer):
    """A custom layer with no fast path (exercises the vectorised fallback)."""

    def build(self, input_shape):
        self.w = self.add_weight(shape=(input_shape[-1],), initializer="ones")

    def call(self, x):
        return x * self.w


def _models(rng):
    k = keras.layers
    return {
        "dense": ([k.Dense(4, activation="tanh"), k.Dense(3)], rng.normal(size=(8, 5))),
        "dense_seq_ghost": (
            [k.Dense(40, activation="tanh"), k.Dense(40), k.GlobalAveragePooling1D(), k.Dense(3)],
            rng.normal(size=(8, 3, 5)),
        ),
        "dense_seq_per_example": (
            [k.Dense(4), k.GlobalAveragePooling1D(), k.Dense(3)], rng.normal(size=(8, 7, 5)),
        ),
        "conv2d": (
            [k.Conv2D(3, 3, strides=2, padding="same", activation="relu"), k.Conv2D(4, (2, 3)),
             k.Flatten(), k.Dense(3)],
            rng.normal(size=(8, 8, 8, 2)),
        ),
        "conv2d_ghost": ([k.Conv2D(40, 3), k.Flatten(), k.Dense(3)], rng.normal(size=(8, 4, 4, 8))),
        "conv2d_same_dilated": (
            [k.Conv2D(3, (2, 2), padding="same"), k.Conv2D(2, 3, dilation_rate=2, padding="same"),
             k.Flatten(), k.Dense(3)],
            rng.normal(size=(8, 7, 6, 2)),
        ),
        # Declared without a spatial size (dp_fit still traces with the data's size).
        "conv2d_any_size": (
            [k.Conv2D(3, 3, strides=2), k.GlobalAveragePooling2D(), k.Dense(3)],
            rng.normal(size=(8, 7, 7, 2)), (None, None, 2),
        ),
        "conv1d": (
            [k.Conv1D(4, 3, padding="causal", dilation_rate=2), k.Conv1D(2, 2, strides=2),
             k.Flatten(), k.Dense(3)],
            rng.normal(size=(8, 10, 3)),
        ),
        "embedding": (
            [k.Embedding(5, 4), k.GlobalAveragePooling1D(), k.Dense(3)],
            rng.integers(0, 5, (8, 9)),
        ),
        # Ids of any rank; some examples repeat tokens, some don't; a large vocabulary.
        "embedding_2d_ids": (
            [k.Embedding(70000, 3), k.Reshape((12, 3)), k.GlobalAveragePooling1D(), k.Dense(3)],
            np.concatenate([rng.integers(0, 4, (4, 3, 4)), rng.integers(0, 70000, (4, 3, 4))]),
        ),
        # Ids reach the embedding through another layer: repeats are found in the graph.
        "embedding_after_reshape": (
            [k.Reshape((12,)), k.Embedding(7, 3), k.GlobalAveragePooling1D(), k.Dense(3)],
            rng.integers(0, 7, (8, 3, 4)),
        ),
        # Sequence length unknown when traced (64-bit sort keys).
        "embedding_dynamic_length": (
            [k.Embedding(6, 3), k.GlobalAveragePooling1D(), k.Dense(3)],
            rng.integers(0, 6, (8, 10)), (None,),
        ),
        "layernorm": ([k.LayerNormalization(), k.Flatten(), k.Dense(3)], rng.normal(size=(8, 4, 5))),
        "groupnorm": (
            [k.GroupNormalization(groups=3), k.Flatten(), k.Dense(3)], rng.normal(size=(8, 4, 6)),
        ),
        "fallback": ([Scale(), k.Dense(3)], rng.normal(size=(8, 5))),
    }  # fmt: skip


def _naive_clipped_mean(model, x, y, clip):
    """Per-example gradients one example at a time, clipped jointly, averaged."""
    loss_fn = per_example_loss_fn(LOSS)
    total = [np.zeros(v.shape) for v in model.trainable_variables]
    for i in range(len(x)):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(loss_fn(y[i : i + 1], model(x[i : i + 1], training=True)))
        grads = [
            tf.convert_to_tensor(g).numpy() for g in tape.gradient(loss, model.trainable_variables)
        ]
        norm = np.sqrt(sum((g.astype(np.float64) ** 2).sum() for g in grads))
        for acc, g in zip(total, grads, strict=False):
            acc += min(1.0, clip / norm) * g
    return [t / len(x) for t in total], norm


def _build(layers, x, rng, input_shape=None):
    dtype = "int32" if x.dtype.kind == "i" else "float32"
    shape = x.shape[1:] if input_shape is None else input_shape
    model = keras.Sequential([keras.Input(shape, dtype=dtype), *layers])
    for v in model.trainable_variables:
        v.assign(rng.normal(size=v.shape).astype("float32") * 0.5)
    return model


def _one_step(model, x, y, clip, **kw):
    before = [v.numpy().copy() for v in model.trainable_variables]
    run = dp_fit(
        model, x, y, epochs=1, batch_size=len(x), sampling="shuffle", noise_multiplier=0.0,
        l2_norm_clip=clip, optimizer=keras.optimizers.SGD(1.0), loss=LOSS, verbose=0, seed=0, **kw,
    )  # fmt: skip
    after = [v.numpy() for v in model.trainable_variables]
    return run, [b - a for b, a in zip(before, after, strict=False)]


@pytest.mark.parametrize(
    "name",
    ["dense", "dense_seq_ghost", "dense_seq_per_example", "conv2d", "conv2d_ghost",
     "conv2d_same_dilated", "conv2d_any_size", "conv1d", "embedding", "embedding_2d_ids", "embedding_after_reshape", "embedding_dynamic_length",
     "layernorm", "groupnorm", "fallback"],
)  # fmt: skip
def test_step_equals_naive_clipped_mean(name):
    rng = np.random.default_rng(1)
    layers, x, *input_shape = _models(rng)[name]
    x = x.astype("int32") if x.dtype.kind == "i" else x.astype("float32")
    y = rng.integers(0, 3, len(x))
    model = _build(layers, x, rng, *input_shape)
    # Pick C between the per-example norms so that some examples are clipped and some are not.
    loss_fn = per_example_loss_fn(LOSS)
    norms = []
    for i in range(len(x)):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(loss_fn(y[i : i + 1], model(x[i : i + 1])))
        g = tape.gradient(loss, model.trainable_variables)
        norms.append(
            np.sqrt(sum(float(tf.reduce_sum(tf.square(tf.convert_to_tensor(t)))) for t in g))
        )
    clip = float(np.median(norms))
    expected, _ = _naive_clipped_mean(model, x, y, clip)
    run, update = _one_step(model, x, y, clip)
    for e, u in zip(expected, update, strict=False):
        np.testing.assert_allclose(u, e, atol=1e-5, rtol=1e-4)
    assert run.steps == 1
    paths = " ".join(run.clipping.values())
    if name == "fallback":
        assert [k for k, v in run.clipping.items() if "fallback" in v] == [model.layers[0].name]
    else:
        assert "fallback" not in paths
    if name.endswith("ghost"):
        assert "ghost norm (" in paths


def test_in_graph_paths_give_the_same_clipped_sums():
    # Called directly (no repeats found on the host), the embedding finds repeated tokens in the
    # graph: 32-bit sort keys for a known length, 64-bit ones when the length is unknown at
    # trace time. With an unknown spatial size, the conv extracts patches at run time.
    rng = np.random.default_rng(4)
    k = keras.layers
    cases = [
        ([k.Conv2D(3, 3, strides=2, padding="same"), k.GlobalAveragePooling2D(), k.Dense(3)],
         rng.normal(size=(6, 7, 7, 2)).astype("float32"), (None, None, 2), "float32"),
        ([k.Embedding(6, 3), k.GlobalAveragePooling1D(), k.Dense(3)],
         rng.integers(0, 6, (6, 10)).astype("int32"), (None,), "int32"),
        ([k.Embedding(6, 3), k.GlobalAveragePooling1D(), k.Dense(3)],  # 32-bit keys in-graph
         rng.integers(0, 6, (6, 10)).astype("int32"), (10,), "int32"),
    ]  # fmt: skip
    for layers, x, shape, dtype in cases:
        model = _build(layers, x, rng, shape)
        y = rng.integers(0, 3, len(x))
        clipper = FastClipper(model, per_example_loss_fn(LOSS), l2_norm_clip=0.5, sample_x=x[:2])
        spec = tf.TensorSpec([None, *shape], dtype)
        sums = lambda x, y, c=clipper: c.clipped_sum(x, y, tf.ones(6)).grads  # noqa: E731
        dynamic = tf.function(sums, input_signature=[spec, tf.TensorSpec([None], tf.int64)])
        static = tf.function(sums)
        for a, b in zip(dynamic(x, y), static(x, tf.constant(y)), strict=True):
            np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-6)
        expected, _ = _naive_clipped_mean(model, x, y, 0.5)
        for e, g in zip(expected, dynamic(x, y), strict=True):
            np.testing.assert_allclose(g.numpy() / len(x), e, atol=1e-5, rtol=1e-4)


def test_repeats_match_a_direct_count():
    rng = np.random.default_rng(5)
    for ids, vocabulary in [
        (rng.integers(0, 4, (7, 9)), 4),
        (rng.integers(-5, 5, (6, 2, 5)), 5),  # negative ids wrap, as in Keras
        (rng.integers(0, 2**40, (3, 6)).astype(np.int64), 2**40),  # 64-bit keys
        (np.zeros((2, 1), np.int32), 3),
    ]:
        rep = repeats(ids, vocabulary)
        flat = np.where(ids < 0, ids + vocabulary, ids).reshape(len(ids), -1)
        length = flat.shape[1]
        groups: dict[tuple[int, int], list[int]] = {}
        for b, row in enumerate(flat):
            for t, token in enumerate(row):
                groups.setdefault((b, int(token)), []).append(b * length + t)
        single = np.ones(flat.size, bool)
        expected = {}
        for (b, _), positions in groups.items():
            if len(positions) > 1:
                single[positions] = False
                expected[frozenset(positions)] = b
        np.testing.assert_array_equal(rep.single.ravel(), single)
        got = {}
        for g in np.unique(rep.group):
            got[frozenset(rep.rows[rep.group == g].tolist())] = int(rep.owner[g])
        assert got == expected
        assert np.all(np.diff(rep.group) >= 0)


def test_host_path_only_for_embeddings_reading_the_model_input():
    k = keras.layers
    direct = keras.Sequential([keras.Input((5,), dtype="int32"), k.Embedding(9, 2)])
    assert reads_model_input(direct, direct.layers[0])
    # A float input (Keras' default) rounds ids above 2^24 before the embedding sees them.
    floats = keras.Sequential([keras.Input((5,)), k.Embedding(9, 2)])
    assert not reads_model_input(floats, floats.layers[0])
    reshaped = keras.Sequential(
        [keras.Input((1, 5), dtype="int32"), k.Reshape((5,)), k.Embedding(9, 2)]
    )
    assert not reads_model_input(reshaped, reshaped.layers[1])
    inp = keras.Input((5,), dtype="int32")
    shared = k.Embedding(9, 2)
    two_calls = keras.Model(inp, k.Concatenate()([shared(inp), shared(inp)]))
    assert not reads_model_input(two_calls, shared)


def test_host_repeats_are_used_exactly_when_the_embedding_reads_the_input(monkeypatch):
    import kprivacy_nb.dp.engine as engine

    calls = []
    monkeypatch.setattr(engine, "repeats", lambda *a: calls.append(a) or repeats(*a))
    rng = np.random.default_rng(6)
    for name, expect_host in [("embedding", True), ("embedding_after_reshape", False)]:
        calls.clear()
        layers, x, *shape = _models(rng)[name]
        x = x.astype("int32")
        _one_step(_build(layers, x, rng, *shape), x, rng.integers(0, 3, len(x)), 1.0)
        assert bool(calls) == expect_host, name


def test_host_repeats_prepared_a_step_ahead_match_the_in_graph_path(monkeypatch):
    import kprivacy_nb.dp.clipping.clipper as clipper_module

    rng = np.random.default_rng(7)
    x = rng.integers(0, 4, (24, 6)).astype("int32")  # many repeats, different per example
    y = rng.integers(0, 3, 24)
    k = keras.layers
    layers = [k.Embedding(4, 3), k.GlobalAveragePooling1D(), k.Dense(3)]
    start = _build(layers, x, rng)
    weights = [v.numpy() for v in start.trainable_variables]

    def train():
        model = keras.models.clone_model(start)
        for v, w in zip(model.trainable_variables, weights, strict=True):
            v.assign(w)
        dp_fit(
            model,
            x,
            y,
            epochs=2,
            batch_size=4,
            sampling="shuffle",
            noise_multiplier=0.0,
            l2_norm_clip=0.05,
            optimizer=keras.optimizers.SGD(1.0),
            loss=LOSS,
            verbose=0,
            seed=3,
        )  # fmt: skip — 12 steps, each using the previous step's look-ahead
        return [v.numpy() for v in model.trainable_variables]

    host = train()
    monkeypatch.setattr(clipper_module, "reads_model_input", lambda model, layer: False)
    in_graph = train()
    for a, b in zip(host, in_graph, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)
    assert not np.allclose(host[0], weights[0])


def test_noise_thread_is_gone_after_training_ends_or_fails():
    import threading

    def noise_threads():
        return [t for t in threading.enumerate() if t.name.startswith("kprivacy-nb-")]

    x, y = np.arange(48, dtype="int32").reshape(16, 3) % 5, np.zeros(16, "int64")
    k = keras.layers
    model = keras.Sequential(  # an embedding reading the input: noise and host threads both run
        [keras.Input((3,), dtype="int32"), k.Embedding(5, 2), k.Flatten(), k.Dense(2)]
    )
    dp_fit(model, x, y, epochs=2, batch_size=4, noise_multiplier=1.0, delta=1e-3, loss=LOSS,
           verbose=0)  # fmt: skip
    assert noise_threads() == []

    class Boom:
        def on_epoch_end(self, epoch, logs):
            raise RuntimeError("callback failed")

    with pytest.raises(RuntimeError, match="callback failed"):
        dp_fit(model, x, y, epochs=2, batch_size=4, noise_multiplier=1.0, delta=1e-3, loss=LOSS,
               verbose=0, callbacks=[Boom()])  # fmt: skip
    assert noise_threads() == []


def test_embedding_ids_out_of_range_are_refused_clearly():
    with pytest.raises(ValueError, match="token id 12 is out of range"):
        repeats(np.array([[1, 12, 3]]), 10)
    with pytest.raises(ValueError, match="token id -11"):
        repeats(np.array([[1, -11]]), 10)
    k = keras.layers
    model = keras.Sequential(
        [
            keras.Input((4,), dtype="int32"),
            k.Embedding(10, 2),
            k.GlobalAveragePooling1D(),
            k.Dense(2),
        ]
    )
    x = np.array([[1, 2, 3, 4]] * 7 + [[1, 2, 3, 2**30]], "int32")  # 2^30 would wrap int32 keys
    with pytest.raises(InvalidParameterError, match="out of range"):
        dp_fit(model, x, np.zeros(8, "int64"), epochs=1, batch_size=8, sampling="shuffle",
               noise_multiplier=1.0, delta=1e-3, loss=LOSS, verbose=0)  # fmt: skip


def test_tiny_clip_is_mean_of_unit_directions():
    rng = np.random.default_rng(2)
    layers, x = _models(rng)["conv2d"]
    x = x.astype("float32")
    y = rng.integers(0, 3, len(x))
    model = _build(layers, x, rng)
    expected, _ = _naive_clipped_mean(model, x, y, 1e-4)
    _, update = _one_step(model, x, y, 1e-4)
    for e, u in zip(expected, update, strict=False):
        np.testing.assert_allclose(u, e, atol=1e-3 * 1e-4)  # float32 round-off, relative to C


def test_large_clip_no_noise_equals_plain_sgd_step():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(16, 6)).astype("float32")
    y = rng.integers(0, 3, 16)
    model = _build([keras.layers.Dense(8, activation="relu"), keras.layers.Dense(3)], x, rng)
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(per_example_loss_fn(LOSS)(y, model(x, training=True)))
    grads = tape.gradient(loss, model.trainable_variables)
    lr = 0.5
    expected = [
        v.numpy() - lr * g.numpy() for v, g in zip(model.trainable_variables, grads, strict=False)
    ]
    dp_fit(
        model, x, y, epochs=1, batch_size=16, sampling="shuffle", noise_multiplier=0.0,
        l2_norm_clip=1e6, optimizer=keras.optimizers.SGD(lr), loss=LOSS, verbose=0,
    )  # fmt: skip
    for e, v in zip(expected, model.trainable_variables, strict=False):
        np.testing.assert_allclose(v.numpy(), e, atol=1e-6)


def test_noise_has_the_right_scale():
    # Zero inputs and no bias: every gradient is exactly zero, so the update is pure noise
    # N(0, (σC)²) divided by the batch size, times the learning rate.
    n, sigma, clip = 50, 2.0, 0.5
    x = np.zeros((n, 100), "float32")
    y = np.zeros((n, 80), "float32")
    model = keras.Sequential([keras.Input((100,)), keras.layers.Dense(80, use_bias=False)])
    before = model.trainable_variables[0].numpy().copy()
    dp_fit(
        model, x, y, epochs=1, batch_size=n, sampling="shuffle", noise_multiplier=sigma,
        l2_norm_clip=clip, delta=1e-3, optimizer=keras.optimizers.SGD(1.0), loss="mse", verbose=0,
    )  # fmt: skip
    update = (before - model.trainable_variables[0].numpy()).ravel()
    expected_std = sigma * clip / n
    assert abs(update.std() / expected_std - 1) < 0.04
    assert abs(update.mean()) < 5 * expected_std / np.sqrt(update.size)
    # Excess kurtosis of a Gaussian is 0.
    z = update / update.std()
    assert abs((z**4).mean() - 3) < 0.25


def test_noise_per_variable_per_step_and_on_a_short_last_batch(monkeypatch):
    # All gradients are exactly zero (zero inputs, targets and initial weights), so each update
    # is pure noise. Three variables of different sizes, shuffled batches of 8, 8 and 4 (the
    # short last one is divided by 4, not 8), one learning-rate-1 SGD step each.
    sigma, clip = 1.5, 2.0
    x, y = np.zeros((20, 300), "float32"), np.zeros((20, 3), "float32")
    k = keras.layers
    model = keras.Sequential([keras.Input((300,)), k.Dense(200), k.Dense(3, use_bias=False)])
    for v in model.trainable_variables:
        v.assign(np.zeros(v.shape, "float32"))
    steps = []

    class EveryStep(keras.callbacks.Callback):  # dp_fit passes Keras callbacks to Keras' fit
        def on_train_batch_begin(self, batch, logs=None):
            self.before = [v.numpy().copy() for v in model.trainable_variables]

        def on_train_batch_end(self, batch, logs=None):
            after = [v.numpy() for v in model.trainable_variables]
            steps.append([b - a for b, a in zip(self.before, after, strict=True)])

    dp_fit(
        model, x, y, epochs=1, batch_size=8, sampling="shuffle", noise_multiplier=sigma,
        l2_norm_clip=clip, delta=1e-3, optimizer=keras.optimizers.SGD(1.0), loss="mse", verbose=0,
        callbacks=[EveryStep()],
    )  # fmt: skip
    assert len(steps) == 3
    for grads, batch in zip(steps, [8, 8, 4], strict=True):
        flat = np.concatenate([g.ravel() for g in grads])
        assert abs(flat.std() / (sigma * clip / batch) - 1) < 0.03
        for g in grads:  # every variable gets its own noise at the same scale
            assert abs(g.std() / (sigma * clip / batch) - 1) < 5 / np.sqrt(g.size) + 0.02
        kernel, bias = grads[0].ravel(), grads[1].ravel()
        assert not np.allclose(bias, kernel[: bias.size])  # not the same values reused
    assert not np.allclose(steps[0][0], steps[1][0])  # fresh noise every step


def test_noise_is_seeded_only_when_asked():
    def run(seed):
        x = np.zeros((10, 4), "float32")
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2, use_bias=False)])
        model.trainable_variables[0].assign(np.zeros((4, 2), "float32"))
        dp_fit(
            model, x, np.zeros((10, 2), "float32"), epochs=1, batch_size=10, sampling="shuffle",
            noise_multiplier=1.0, delta=1e-2, loss="mse", verbose=0, seed=seed,
        )  # fmt: skip
        return model.trainable_variables[0].numpy()

    np.testing.assert_array_equal(run(5), run(5))
    assert not np.array_equal(run(None), run(None))
