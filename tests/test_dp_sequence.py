"""Fast per-example norms for sequence models: EinsumDense / MultiHeadAttention, LSTM, GRU,
SimpleRNN, RMSNormalization, and Dense / Conv1D / LayerNormalization on sequences.

Every rule is held to the definition: each layer's per-example squared gradient norm equals the
one from a GradientTape per example (tighter than the self-check's 1e-3, which a misaligned
recurrence once passed at 3e-4), the layer runs on its fast path (not the fallback), and with
σ = 0 one example moves the traced step by at most C.
"""

from __future__ import annotations

import logging
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from kprivacy_nb import dp_fit  # noqa: E402
from kprivacy_nb.dp.clipping import FALLBACK, FastClipper, per_example_loss_fn  # noqa: E402
from kprivacy_nb.dp.engine import DPSGDEngine  # noqa: E402

pytestmark = [
    pytest.mark.filterwarnings("ignore:noise_multiplier=0"),
    pytest.mark.filterwarnings("ignore:ε is huge"),
    pytest.mark.filterwarnings("ignore:.*does not support masking"),
]

k = keras.layers
VOCAB, T = 9, 6


def _ids(rng, n=6, length=T, pad=False):
    x = rng.integers(1 if pad else 0, VOCAB, (n, length)).astype("int32")
    if pad:  # ragged sequences, padded with 0 at the end
        for i, n_real in enumerate(rng.integers(1, length + 1, n)):
            x[i, n_real:] = 0
    return x


def _per_layer_tapes(clipper, x, y):
    """Exact per-example squared norms per layer (as the clipper names them): one tape each."""
    out = {}
    for i in range(len(x)):
        with tf.GradientTape() as tape:
            pred = clipper.model(x[i : i + 1], training=False)
            loss = tf.reduce_sum(clipper.loss_fn(y[i : i + 1], pred))
        grads = tape.gradient(loss, clipper.variables)
        for v, g in zip(clipper.variables, grads, strict=True):
            sq = float(np.sum(np.square(tf.convert_to_tensor(g).numpy(), dtype=np.float64)))
            out.setdefault(clipper.owner_name(v), np.zeros(len(x)))[i] += sq
    return out


def _per_layer_fast(clipper, x, y):
    parts = clipper.parts(tf.constant(x), tf.constant(y), tf.ones([len(x)]), training=False)
    out = {}
    for part in parts.layers:
        out[part.layer] = out.get(part.layer, 0) + np.asarray(part.sq, np.float64)
    return out, parts


def _check_fast_and_exact(layers, x, rtol=1e-4):
    """Build ``Sequential(layers)``, assert every weighted layer is on a fast path and that its
    per-example norms equal the tapes'; returns the clipper's report and the model."""
    rng = np.random.default_rng(len(layers))
    model = keras.Sequential([keras.Input(x.shape[1:], dtype=x.dtype), *layers])
    y = rng.normal(size=(len(x), 2)).astype("float32")
    # C so large that nothing is clipped: the clipped sum must be the batch gradient.
    clipper = FastClipper(model, per_example_loss_fn("mse"), l2_norm_clip=1e12, sample_x=x)
    fast, parts = _per_layer_fast(clipper, x, y)
    np.testing.assert_allclose(parts.predictions, model(x, training=False), rtol=1e-5, atol=1e-6)
    report = clipper.report
    assert not [name for name, path in report.items() if "fallback" in path], report
    ref = _per_layer_tapes(clipper, x, y)
    assert set(fast) == set(ref)
    # What the guarantee needs is each example's total norm: a layer carrying a sliver of it
    # (float32-rounding-dominated, e.g. LayerNorm over 2 features) is held to that scale.
    total = sum(ref.values())
    for name, sq in ref.items():
        scale = 1e-6 * float(np.max(sq)) + 1e-6 * total + 1e-20
        bad = np.abs(fast[name] - sq) > rtol * np.abs(sq) + scale
        assert not bad.any(), (name, fast[name][bad], sq[bad], total[bad])
    summed = clipper.clipped_sum(tf.constant(x), tf.constant(y), tf.ones([len(x)])).grads
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(clipper.loss_fn(y, model(x, training=False)))
    wants = [tf.convert_to_tensor(w).numpy() for w in tape.gradient(loss, clipper.variables)]
    # Held to the whole gradient's scale: a weight whose gradient is float32 rounding after a
    # cancellation (a LayerNorm over 3 features) differs by rounding, not by a formula error.
    biggest = max(float(np.max(np.abs(w))) for w in wants)
    for v, got, want in zip(clipper.variables, summed, wants, strict=True):
        np.testing.assert_allclose(
            got, want, rtol=1e-3, atol=1e-5 * np.max(np.abs(want)) + 1e-5 * biggest + 1e-7,
            err_msg=v.path,
        )  # fmt: skip
    return report, model


# --------------------------------------------------------------------------- EinsumDense


@pytest.mark.parametrize(
    ("equation", "output_shape", "bias_axes", "shape"),
    [
        ("abc,cd->abd", (T, 5), "d", (T, 4)),  # Dense on a sequence
        ("abc,cde->abde", (T, 2, 3), "de", (T, 4)),  # MHA's query/key/value projection
        ("abcd,cde->abe", (T, 5), "e", (T, 2, 3)),  # MHA's output projection
        ("abc,cd->adb", (5, T), "d", (T, 4)),  # the output transposed, bias on a middle axis
        ("...b,bc->...c", 5, "c", (3, T, 4)),  # an ellipsis of two position axes
        ("ab,bc->ac", 7, None, (4,)),  # vectors, no bias
        ("abc,bcd->abd", (T, 3), "d", (T, 4)),  # a kernel per position: einsum per example
        ("abc,dc->abd", (T, 64), "d", (T, 40)),  # ghost norm (p·o > T·(p + o))
    ],
)
def test_einsum_dense_norms_equal_per_example_tapes(equation, output_shape, bias_axes, shape):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, *shape)).astype("float32")
    layer = k.EinsumDense(equation, output_shape, bias_axes=bias_axes, activation="tanh")
    report, _ = _check_fast_and_exact([layer, k.Flatten(), k.Dense(2)], x)
    assert report[layer.name].startswith("EinsumDense: ")
    if equation == "abc,dc->abd":
        assert "ghost norm" in report[layer.name]


def test_multi_head_attention_projections_take_the_einsum_path():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(6, T, 8)).astype("float32")
    inputs = keras.Input((T, 8))
    attention = k.MultiHeadAttention(2, 3, value_dim=4)
    out = k.Dense(2)(k.GlobalAveragePooling1D()(attention(inputs, inputs)))
    model = keras.Model(inputs, out)
    report, _ = _check_fast_and_exact([model], x)
    for sub in ("query", "key", "value", "attention_output"):
        assert report[sub].startswith("EinsumDense: "), report


# --------------------------------------------------------------------------- recurrences


RECURRENT = {
    "lstm": lambda: k.LSTM(4),
    "lstm_sequences_backwards": lambda: k.LSTM(3, return_sequences=True, go_backwards=True),
    "lstm_no_bias_state": lambda: k.LSTM(3, use_bias=False, return_state=True),
    "gru": lambda: k.GRU(3),
    "gru_backwards_no_bias": lambda: k.GRU(3, use_bias=False, go_backwards=True),
    "gru_sequences": lambda: k.GRU(4, return_sequences=True),
    "simple_rnn": lambda: k.SimpleRNN(3),
    "simple_rnn_backwards": lambda: k.SimpleRNN(3, go_backwards=True, return_sequences=True),
}


def _recurrent_model(make, mask_zero=False):
    layer = make()
    inputs = keras.Input((T,), dtype="int32")
    h = layer(k.Embedding(VOCAB, 3, mask_zero=mask_zero)(inputs))
    if layer.return_state:
        h = k.Concatenate()(list(h))
    if layer.return_sequences:
        h = k.Flatten()(h)
    return layer, keras.Model(inputs, k.Dense(2)(h))


@pytest.mark.parametrize("masked", [False, True], ids=["dense", "padded"])
@pytest.mark.parametrize("case", sorted(RECURRENT))
def test_recurrent_norms_equal_per_example_tapes(case, masked):
    rng = np.random.default_rng(2)
    layer, model = _recurrent_model(RECURRENT[case], mask_zero=masked)
    x = _ids(rng, pad=masked)
    report, _ = _check_fast_and_exact([model], x)
    assert "through time" in report[layer.name], report


@pytest.mark.parametrize("case", ["lstm", "gru", "simple_rnn_backwards"])
def test_recurrent_kernels_taken_a_few_examples_at_a_time_are_exact(case, monkeypatch):
    # Chunks of 3 examples over 7 (the last one shorter), with one example's loss infinite:
    # it is dropped from every chunk's sum, and the others' sum is the batch gradient.
    from kprivacy_nb.dp.clipping import linear

    rng = np.random.default_rng(12)
    layer, model = _recurrent_model(RECURRENT[case])
    kernels = (layer.cell.kernel, layer.cell.recurrent_kernel)
    monkeypatch.setattr(linear, "CHUNK_FLOATS", 3 * sum(int(np.prod(k.shape)) for k in kernels))
    x = _ids(rng, n=7)
    _check_fast_and_exact([model], x)
    y = rng.normal(size=(7, 2)).astype("float32")
    y[4] = np.inf
    clipper = FastClipper(model, per_example_loss_fn("mse"), l2_norm_clip=1e12, sample_x=x)
    out = clipper.clipped_sum(tf.constant(x), tf.constant(y), tf.ones([7]))
    assert out.kept.numpy().tolist() == [True] * 4 + [False] + [True] * 2
    keep = [0, 1, 2, 3, 5, 6]
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(clipper.loss_fn(y[keep], model(x[keep], training=False)))
    wants = tape.gradient(loss, clipper.variables)
    for v, got, want in zip(clipper.variables, out.grads, wants, strict=True):
        want = tf.convert_to_tensor(want).numpy()
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6, err_msg=v.path)


class _Scale(k.Layer):
    """No fast rule: its weight takes the vectorised fallback, whose jacobian runs back through
    the recurrence's hand-written backward pass."""

    def build(self, shape):
        self.w = self.add_weight(shape=(shape[-1],), initializer="ones")

    def call(self, x):
        return x * self.w


@pytest.mark.parametrize("case", ["lstm", "gru_backwards_no_bias", "simple_rnn_backwards"])
def test_a_fallback_layer_before_a_recurrence_is_verified(case):
    rng = np.random.default_rng(13)
    x = rng.normal(size=(8, T, 3)).astype("float32")
    y = rng.normal(size=(8, 2)).astype("float32")
    inputs = keras.Input((T, 3))
    scale, layer = _Scale(), RECURRENT[case]()
    h = layer(scale(inputs))
    model = keras.Model(inputs, k.Dense(2)(k.Flatten()(h) if layer.return_sequences else h))
    clipper = FastClipper(model, per_example_loss_fn("mse"), l2_norm_clip=1.0, sample_x=x)
    clipper.verify(x, y)
    assert "through time" in clipper.report[layer.name]
    assert clipper.report[scale.name].startswith(FALLBACK)
    assert "verified" in clipper.report[scale.name]


def test_explicit_initial_state_takes_the_fallback_and_stays_exact():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(6, T, 3)).astype("float32")
    inputs = keras.Input((T, 3))
    state = k.Dense(4)(k.GlobalAveragePooling1D()(inputs))
    lstm = k.LSTM(4)
    model = keras.Model(inputs, k.Dense(2)(lstm(inputs, initial_state=[state, state])))
    y = rng.normal(size=(6, 2)).astype("float32")
    clipper = FastClipper(model, per_example_loss_fn("mse"), l2_norm_clip=1.0, sample_x=x)
    # reported under the layer's name, with the reason that applied
    assert "initial_state passed explicitly" in clipper.report[lstm.name]
    clipper.verify(x, y)
    assert FALLBACK in clipper.report[lstm.name]
    assert "verified" in clipper.report[lstm.name]
    assert lstm.cell.name not in clipper.report


def test_recurrent_layers_off_their_fast_path_are_named_and_said_out_loud():
    """Two stacked LSTMs with dropout: each reported under its own name with its reason (their
    cells share the name "lstm_cell"), and a warning before training says what it costs."""
    from kprivacy_nb import make_private
    from kprivacy_nb.errors import SlowPathWarning

    rng = np.random.default_rng(14)
    x, y = _ids(rng, n=64), rng.integers(0, 2, 64)
    first, second = k.LSTM(3, dropout=0.2, return_sequences=True), k.LSTM(3, recurrent_dropout=0.1)
    model = keras.Sequential([keras.Input((T,), dtype="int32"), k.Embedding(VOCAB, 3), first,
                              second, k.Dense(2)])  # fmt: skip
    model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    make_private(model, noise_multiplier=1.0, delta=1e-3)
    with pytest.warns(SlowPathWarning) as said:
        model.fit(x, y, epochs=1, batch_size=32, verbose=0)
    text = [str(w.message) for w in said if issubclass(w.category, SlowPathWarning)]
    assert len(text) == 2 and all("keras.layers.Dropout" in t for t in text), text
    assert all(w.filename == __file__ for w in said if issubclass(w.category, SlowPathWarning))
    report = model.privacy.clipping
    for layer in (first, second):
        assert "dropout inside the recurrence" in report[layer.name], report
        assert "verified" in report[layer.name]


# --------------------------------------------------------------------------- normalisation


@pytest.mark.parametrize("layer", ["rms", "rms_two_axes", "layernorm", "dense", "conv1d"])
def test_sequence_layers_norms_equal_per_example_tapes(layer):
    rng = np.random.default_rng(4)
    x = rng.normal(size=(6, T, 4)).astype("float32") * 3.0
    made = {
        "rms": lambda: k.RMSNormalization(),
        "rms_two_axes": lambda: k.RMSNormalization(axis=[1, 2]),
        "layernorm": lambda: k.LayerNormalization(),
        "dense": lambda: k.Dense(5, activation="relu"),
        "conv1d": lambda: k.Conv1D(5, 3, padding="causal"),
    }[layer]()
    report, _ = _check_fast_and_exact([k.Dense(4), made, k.Flatten(), k.Dense(2)], x)
    assert "fallback" not in report[made.name]


# --------------------------------------------------------------------------- positions


class TokenAndPosition(k.Layer):
    """keras.io's token + position embedding: the positions have no batch axis."""

    def __init__(self, length, vocab, width, **kwargs):
        super().__init__(**kwargs)
        self.tokens = k.Embedding(vocab, width)
        self.positions = k.Embedding(length, width)

    def call(self, x):
        return self.tokens(x) + self.positions(keras.ops.arange(0, keras.ops.shape(x)[-1], 1))


def test_position_embeddings_are_clipped_per_example():
    rng = np.random.default_rng(7)
    embed = TokenAndPosition(T, VOCAB, 3)
    x = _ids(rng, n=8)  # T = 6 positions, 8 examples
    report, _ = _check_fast_and_exact([embed, k.Flatten(), k.Dense(2)], x)
    assert report[embed.positions.name].startswith("Embedding (position ids): ")


def test_positions_as_many_as_examples_are_still_exact():
    # T ids in a batch of T: the rule can't tell positions from examples, so the self-check
    # decides (the plain Embedding rule is wrong here and moves to the fallback).
    rng = np.random.default_rng(8)
    embed = TokenAndPosition(8, VOCAB, 3)
    model = keras.Sequential([keras.Input((8,), dtype="int32"), embed, k.Flatten(), k.Dense(2)])
    x, y = _ids(rng, n=8, length=8), rng.normal(size=(8, 2)).astype("float32")
    clipper = FastClipper(model, per_example_loss_fn("mse"), l2_norm_clip=1.0, sample_x=x)
    clipper.verify(x, y)
    assert "verified" in clipper.report[embed.positions.name]
    engine = _engine(model, x, y, clip=1e-3)
    assert engine.check_sensitivity(tf.constant(x), tf.constant(y), 8) <= 1.0 + 1e-3


def test_a_sequence_as_long_as_the_self_check_batch_keeps_its_positions_fast():
    # The self-check ran on 8 examples: 8 position ids could not be told from 8 examples, and
    # keras.io's position embedding took the slow fallback for every T = 8 model.
    from kprivacy_nb import make_private

    rng = np.random.default_rng(3)
    embed = TokenAndPosition(8, VOCAB, 3)
    model = keras.Sequential([keras.Input((8,), dtype="int32"), embed, k.Flatten(), k.Dense(1)])
    model.compile(optimizer="sgd", loss="mse")
    make_private(model, noise_multiplier=1.0, delta=1e-5)
    x, y = _ids(rng, n=64, length=8), rng.normal(size=(64, 1)).astype("float32")
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    path = model.privacy.clipping[embed.positions.name]
    assert path.startswith("Embedding (position ids): ") and "verified" in path, path


class PositionsGivenABatchAxis(TokenAndPosition):
    """The model itself gives the positions a batch axis of 1 (``positions[None]``)."""

    def call(self, x):
        positions = self.positions(keras.ops.arange(0, keras.ops.shape(x)[-1], 1))
        return self.tokens(x) + positions[None]


class PositionIdsGivenABatchAxis(TokenAndPosition):
    """The position ids get a batch axis of 1 before the lookup (``arange(T)[None]``)."""

    def call(self, x):
        ids = keras.ops.arange(0, keras.ops.shape(x)[-1], 1)[None]
        return self.tokens(x) + self.positions(ids)


@pytest.mark.parametrize(
    "layer, reason",
    [
        # The fast rule gives the positions' output a batch axis; ``positions[None]`` then makes
        # the sum 4-D and the model failed on the fast path (it runs in plain Keras).
        (PositionsGivenABatchAxis, "batch axis"),
        # (1, T) ids read as one example of T tokens: one norm for a batch of 8 — the
        # self-check once crashed comparing them.
        (PositionIdsGivenABatchAxis, "rel. err inf"),
    ],
)
def test_positions_the_model_shapes_itself_take_the_verified_fallback(layer, reason):
    # The positions take the fallback, verified; the tokens stay fast; one example moves the
    # step by at most C.
    rng = np.random.default_rng(9)
    embed = layer(T, VOCAB, 3)
    model = keras.Sequential([keras.Input((T,), dtype="int32"), embed,
                              k.GlobalAveragePooling1D(), k.Dense(2)])  # fmt: skip
    x, y = _ids(rng, n=10), rng.normal(size=(10, 2)).astype("float32")
    seen = []
    catch = logging.Handler()
    catch.emit = lambda record: seen.append(record.getMessage())
    logging.getLogger("tensorflow").addHandler(catch)
    try:
        clipper = FastClipper(model, per_example_loss_fn("mse"), l2_norm_clip=1.0, sample_x=x)
        clipper.verify(x[:8], y[:8])
    finally:
        logging.getLogger("tensorflow").removeHandler(catch)
    # (TensorFlow's "Converting IndexedSlices to a dense representation" is not for users.)
    assert not [m for m in seen if "IndexedSlices" in m], seen
    report = clipper.report
    assert FALLBACK in report[embed.positions.name] and "verified" in report[embed.positions.name]
    assert reason in report[embed.positions.name]
    assert report[embed.tokens.name].startswith("Embedding: ")
    engine = _engine(model, x, y, clip=1e-3)
    assert engine.check_sensitivity(tf.constant(x), tf.constant(y), 10) <= 1.0 + 1e-3


# --------------------------------------------------------------------------- the transformer


def transformer_block(vocab=50, length=12, width=16):
    """Embedding, MultiHeadAttention, residual + LayerNormalization, FFN, residual +
    LayerNormalization, mean pooling, Dense 2 (the bench's shape, small)."""
    ids = keras.Input((length,), dtype="int32")
    h = k.Embedding(vocab, width)(ids)
    h = k.LayerNormalization()(h + k.MultiHeadAttention(2, width // 2)(h, h))
    h = k.LayerNormalization()(h + k.Dense(width)(k.Dense(2 * width, activation="relu")(h)))
    return keras.Model(ids, k.Dense(2)(k.GlobalAveragePooling1D()(h)))


def _engine(model, x, y, clip):
    model.compile(loss="mse")
    return DPSGDEngine(
        model, per_example_loss_fn("mse"), keras.optimizers.SGD(1.0), l2_norm_clip=clip,
        noise_multiplier=0.0, X=tf.constant(x), Y=tf.constant(y),
    )  # fmt: skip


def test_transformer_block_traced_sensitivity_is_at_most_c():
    rng = np.random.default_rng(5)
    x = rng.integers(0, 50, (64, 12)).astype("int32")
    y = rng.normal(size=(64, 2)).astype("float32") * 10
    model = transformer_block()
    clip = 1e-3
    engine = _engine(model, x, y, clip)
    assert all("verified" in path and "fallback" not in path for path in engine.report.values())
    worst = engine.check_sensitivity(tf.constant(x), tf.constant(y), 32)
    assert 0.5 < worst <= 1.0 + 1e-3  # a tiny C clips every example to exactly C
    _check_fast_and_exact([model], x[:6])


def test_dp_fit_runs_every_transformer_layer_on_a_fast_path():
    rng = np.random.default_rng(6)
    x = rng.integers(0, 50, (128, 12)).astype("int32")
    y = rng.integers(0, 2, 128)
    model = transformer_block()
    run = dp_fit(
        model, x, y, epochs=1, batch_size=32, noise_multiplier=1.0, delta=1e-5, verbose=0,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )  # fmt: skip
    weighted = {layer.name for layer in model._flatten_layers() if layer._trainable_variables}
    assert weighted <= set(run.clipping), run.clipping
    for name, path in run.clipping.items():
        assert "fallback" not in path and "verified" in path, (name, path)
    projections = [run.clipping[n] for n in ("query", "key", "value", "attention_output")]
    assert all(p.startswith("EinsumDense: ") for p in projections)


@pytest.mark.parametrize("masking", ["Masking", "mask_zero"])
def test_masked_timesteps_do_not_count_in_a_sequence_loss(masking):
    """As in plain Keras, labels at padded (masked) timesteps change nothing: the private step
    with σ = 0 is the same whatever they are (it used to average the loss over them too)."""
    rng = np.random.default_rng(11)
    n, length = 12, 8
    k = keras.layers
    if masking == "Masking":
        x = rng.normal(size=(n, length, 3)).astype("float32")
        x[:, 5:] = 0.0  # padding
        inputs = keras.Input((length, 3))
        h = k.Masking(0.0)(inputs)
    else:
        x = rng.integers(1, 20, (n, length)).astype("int32")
        x[:, 5:] = 0
        inputs = keras.Input((length,), dtype="int32")
        h = k.Embedding(20, 4, mask_zero=True)(inputs)
    outputs = k.Dense(3)(k.LSTM(4, return_sequences=True)(h))
    y = rng.integers(0, 3, (n, length))
    other = y.copy()
    other[:, 5:] = (y[:, 5:] + 1) % 3  # other labels where the input is padding
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    def update(labels):
        model = keras.Model(inputs, outputs)
        model.set_weights([np.full_like(w, 0.1) + 0.01 * i for i, w in
                           enumerate(keras.Model(inputs, outputs).get_weights())])  # fmt: skip
        before = [w.copy() for w in model.get_weights()]
        dp_fit(model, x, labels, epochs=1, batch_size=n, noise_multiplier=0.0, loss=loss,
               optimizer=keras.optimizers.SGD(1.0), sampling="shuffle", l2_norm_clip=1e6,
               verbose=0, seed=0)  # fmt: skip
        return np.concatenate(
            [(a - b).ravel() for a, b in zip(model.get_weights(), before, strict=True)]
        )

    first, second = update(y), update(other)
    assert np.abs(first).max() > 1e-4  # it did train
    np.testing.assert_allclose(first, second, rtol=0, atol=1e-6)
    # and each example's loss is the mean over its own unmasked steps
    model = keras.Model(inputs, outputs)
    preds = model(x, training=False)
    per_step = loss.call(tf.constant(y), preds).numpy()
    want = per_step[:, :5].mean(axis=1)
    np.testing.assert_allclose(per_example_loss_fn(loss)(y, preds).numpy(), want, rtol=1e-5)


# --------------------------------------------------------------------------- property test


@st.composite
def _sequence_models(draw):
    family = draw(st.sampled_from(["attention", "einsum", "lstm", "gru", "simple_rnn", "rms"]))
    length, width = draw(st.integers(1, 5)), draw(st.integers(1, 4))
    if family == "attention":
        heads, key_dim = draw(st.integers(1, 3)), draw(st.integers(1, 4))
        inputs = keras.Input((length, width))
        out = k.MultiHeadAttention(heads, key_dim)(inputs, inputs)
        body = [keras.Model(inputs, out), k.LayerNormalization()]
    elif family == "einsum":
        units = draw(st.integers(1, 40))
        body = [k.EinsumDense("abc,cd->abd", (length, units), bias_axes="d"), k.RMSNormalization()]
    elif family == "rms":
        body = [k.Dense(draw(st.integers(2, 6))), k.RMSNormalization()]
    else:
        layer = {"lstm": k.LSTM, "gru": k.GRU, "simple_rnn": k.SimpleRNN}[family]
        body = [
            layer(
                draw(st.integers(1, 5)),
                return_sequences=draw(st.booleans()),
                go_backwards=draw(st.booleans()),
                use_bias=draw(st.booleans()),
            )
        ]
    return body + [k.Flatten(), k.Dense(2)], (length, width), draw(st.integers(0, 2**16))


@settings(max_examples=20, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(_sequence_models())
def test_fast_sequence_norms_equal_per_example_tapes_on_random_models(spec):
    layers, shape, seed = spec
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(6, *shape)).astype("float32") * rng.choice([0.1, 1.0, 30.0])
    model = _check_fast_and_exact(layers, x, rtol=1e-3)[1]
    y = rng.normal(size=(6, 2)).astype("float32")
    engine = _engine(model, x, y, clip=1e-2)
    assert engine.check_sensitivity(tf.constant(x), tf.constant(y), 6) <= 1.0 + 1e-3
