"""The line filter: what is noise, what is kept, nothing lost, secrets masked."""

from __future__ import annotations

import threading

import pytest

from kprivacy_nb.quiet import HeldBack, LineFilter, classify
from kprivacy_nb.secrets import REGISTRY, Secret

NOISE = [
    "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
    "I0000 00:00:1795619555.351061    5738 port.cc:153] oneDNN custom operations are on. You may"
    " see slightly different numerical results",
    "I0000 00:00:1795619555.352265    5738 cudart_stub.cc:31] Could not find cuda drivers on your"
    " machine, GPU will not be used.",
    "To enable the following instructions: AVX2 FMA, in other operations, rebuild TensorFlow with"
    " the appropriate compiler flags.",
    "E0000 00:00:1795619557.694436    5738 cuda_platform.cc:52] failed call to cuInit: INTERNAL:"
    " CUDA error: Failed call to cuInit: UNKNOWN ERROR (303)",
    "2024-05-01 10:00:00.123456: W tensorflow/core/framework/op_kernel.cc:1] something benign",
    "WARNING:tensorflow:5 out of the last 5 calls to <function> triggered tf.function retracing",
    "\x1b[1m1/4\x1b[0m \x1b[32m━━━━━\x1b[0m\x1b[37m━━━━━━━━━━━━━━━\x1b[0m 0s 212ms/step - loss: 0.8",
]
KEEP = [
    "E0000 00:00:1795619557.694436    5738 op_kernel.cc:1] INVALID_ARGUMENT: a real failure",
    "ERROR:tensorflow:Something really went wrong",
    "Traceback (most recent call last):",
    "ValueError: Input 0 of layer dense is incompatible",
    "user output 123",
    "/home/me/analysis.py:3: UserWarning: my own warning",
]


@pytest.mark.parametrize("line", NOISE)
def test_noise_is_recognised(line):
    assert classify(line) == "noise"


@pytest.mark.parametrize("line", KEEP)
def test_real_lines_are_kept(line):
    assert classify(line) == "keep"


def test_library_deprecation_warning_is_held_back():
    line = "/x/site-packages/keras/src/layers/core.py:12: UserWarning: Do not pass an input_shape"
    assert classify(line) == "warning"
    assert classify("/tmp/ipykernel_1/2.py:1: DeprecationWarning: old") == "warning"


def make_filter(enabled=True):
    out: list[str] = []
    held = HeldBack()
    held.start_cell("cell [1]")
    f = LineFilter("stderr", out.append, held, lambda: enabled)
    return f, out, held


def test_filter_drops_noise_keeps_errors_and_records_what_it_held():
    f, out, held = make_filter()
    f.write(NOISE[1][:30])  # lines arrive in arbitrary chunks (fd pipe reads)
    f.write(NOISE[1][30:] + "\nreal line\n" + KEEP[0] + "\n")
    f.finish()
    text = "".join(out)
    assert "oneDNN" not in text
    assert "real line" in text and "a real failure" in text
    assert "oneDNN" in held.render()
    assert held.count() == 1


def test_filter_off_passes_everything():
    f, out, held = make_filter(enabled=False)
    f.write("\n".join(NOISE) + "\n")
    assert "".join(out).count("\n") == len(NOISE)
    assert held.count() == 0


def test_warning_source_line_goes_with_the_warning():
    f, out, held = make_filter()
    f.write("/x/keras/src/a.py:1: UserWarning: noisy\n  warnings.warn(msg)\nafter\n")
    assert "".join(out) == "after\n"
    assert held.count() == 2


def test_keras_progress_becomes_one_line_per_epoch():
    f, out, held = make_filter()
    bar = "\x1b[1m{i}/4\x1b[0m \x1b[32m━━━━━━━━\x1b[0m 0s 5ms/step - loss: 0.{i}"
    f.write("Epoch 1/2\n")
    for i in range(1, 5):
        f.write("\b" * 10 + "\r" + bar.format(i=i))
        f.flush()
    f.write("\n")
    f.write("Epoch 2/2\n")
    f.write("\r" + bar.format(i=4) + "\n")
    f.finish()
    lines = "".join(out).splitlines()
    assert lines == [
        "Epoch 1/2 · 4/4 · 0s 5ms/step - loss: 0.4",
        "Epoch 2/2 · 4/4 · 0s 5ms/step - loss: 0.4",
    ]


def test_interrupted_epoch_header_is_not_lost():
    f, out, _ = make_filter()
    f.write("Epoch 1/3\n")
    f.write("\r1/4 ━━━━ 0s")
    f.finish()
    assert "Epoch 1/3" in "".join(out)


def test_partial_user_text_is_released_on_flush():
    f, out, _ = make_filter()
    f.write("Loading… ")
    f.flush()
    assert "".join(out) == "Loading… "


def test_threads_do_not_mix_half_lines():
    f, out, _ = make_filter()
    half = NOISE[2]

    def worker():
        for _ in range(50):
            f.write(half[:20])
            f.write(half[20:] + "\n")

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for _ in range(50):
        f.write("kept\n")
    for t in threads:
        t.join()
    f.finish()
    assert "".join(out) == "kept\n" * 50


def test_registered_secret_is_masked_even_with_quiet_off():
    Secret("correct horse battery staple")
    try:
        f, out, _ = make_filter(enabled=False)
        f.write("the passphrase is correct horse battery staple!\n")
        assert "".join(out) == "the passphrase is ***!\n"
    finally:
        REGISTRY.forget_all()


def test_held_back_buffer_is_bounded():
    held = HeldBack(max_cells=2, max_lines_per_cell=3)
    for c in range(5):
        held.start_cell(f"cell [{c}]")
        for i in range(10):
            held.add("stderr", f"line {i}")
    text = held.render()
    assert "cell [4]" in text and "cell [3]" in text and "cell [2]" not in text
    assert "and 7 more" in text


def test_redraw_after_a_released_partial_line_overwrites_it():
    # A tqdm-style bar: each state flushed without a newline, redrawn with \r.
    f, out, _ = make_filter()
    f.write(" 50%|#####     |")
    f.flush()
    f.write("\r 60%|######    |")
    f.flush()
    f.write("\r100%|##########|\n")
    assert "".join(out) == " 50%|#####     |\r 60%|######    |\r100%|##########|\n"


def test_rdp_non_convergence_lines_are_noise_in_any_format():
    message = (
        "_compute_log_a_frac failed to converge after 1000 iterations with q=0.125000, "
        "sigma=0.600000, alpha=1.500000. Excluding this order from the epsilon computation."
    )
    for line in (message, f"WARNING:absl:{message}", f"W0000 00:00:1.2 77 rdp.py:1] {message}"):
        assert classify(line) == "noise", line


def test_rdp_non_convergence_is_held_back_at_the_logging_level():
    import io
    import logging

    from absl import logging as absl_logging

    from kprivacy_nb.dp import accounting
    from kprivacy_nb.quiet.filter import LogNoiseFilter

    def run(held: HeldBack) -> str:
        sink = io.StringIO()
        handler = logging.StreamHandler(sink)
        handler.setFormatter(logging.Formatter("%(message)s"))  # no prefix the line filter knows
        logger.addHandler(handler)
        log_filter = LogNoiseFilter(held, lambda: True)
        log_filter.attach()
        try:
            absl_logging.warning(
                "_compute_log_a_frac failed to converge after %d iterations with q=%f, sigma=%f, "
                "alpha=%f. Excluding this order from the epsilon computation.",
                1000, 0.125, 0.6, 1.5,
            )  # fmt: skip
            absl_logging.warning("a real absl warning")
        finally:
            log_filter.detach()
            logger.removeHandler(handler)
        return sink.getvalue()

    # The accounting module drops these at the logger (nothing to act on) ...
    logger = logging.getLogger("absl")
    dropper = [f for f in logger.filters if isinstance(f, accounting._OrderLeftOut)]
    assert dropper
    held = HeldBack()
    assert run(held) == "a real absl warning\n"
    assert "_compute_log_a_frac" not in held.render()
    # ... and without that, the quiet filter holds them back.
    for f in dropper:
        logger.removeFilter(f)
    try:
        held = HeldBack()
        assert run(held) == "a real absl warning\n"
    finally:
        for f in dropper:
            logger.addFilter(f)
    assert "WARNING:absl:_compute_log_a_frac failed to converge" in held.render()
