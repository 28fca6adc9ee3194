"""The DP-SGD noise sampler: exact transform, Gaussian distribution, keys, steps and prefetching."""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest
from scipy import stats

from kprivacy_nb.dp.noise import (
    ALIGN,
    BACKGROUND_NICENESS,
    MAX_ABS,
    GaussianNoise,
    normals_from_words,
)


def test_transform_matches_box_muller_in_float64():
    words = np.random.default_rng(0).integers(0, 2**32, 20_000, dtype=np.uint64).astype(np.uint32)
    got = normals_from_words(words, 19_999)
    a, b = words[:10_000].astype(np.float64), words[10_000:].astype(np.float64)
    radius = np.sqrt(-2 * np.log((a + 0.5) * 2.0**-32))
    theta = 2 * math.pi * b * 2.0**-32
    expected = np.concatenate([radius * np.cos(theta), radius * np.sin(theta)])[:19_999]
    assert got.dtype == np.float32 and got.shape == (19_999,)
    np.testing.assert_allclose(got, expected, atol=2e-5, rtol=1e-5)


def test_extreme_words_stay_finite_and_bounded():
    words = np.array([0, 2**32 - 1, 0, 2**32 - 1], np.uint32)
    got = normals_from_words(words, 4)
    assert np.all(np.isfinite(got))
    assert abs(got[0]) == pytest.approx(MAX_ABS, rel=1e-5)  # u = 2^-33: the largest radius
    assert got[1] == 0.0  # u rounds to 1: radius 0
    with pytest.raises(ValueError):
        normals_from_words(words[:3], 4)


def test_values_are_standard_normal():
    noise = GaussianNoise([1_000_000], seed=7)
    z = np.concatenate([noise.next(), noise.next()]).astype(np.float64)
    assert stats.kstest(z, "norm").pvalue > 1e-3
    assert abs(z.mean()) < 5 / math.sqrt(z.size)
    assert abs(z.std() - 1) < 5 / math.sqrt(2 * z.size)
    # Tails are there, not truncated: P(|Z| > 4) = 6.3e-5, about 127 of 2M values.
    beyond = int((np.abs(z) > 4).sum())
    expected = z.size * 2 * stats.norm.sf(4)
    assert abs(beyond - expected) < 5 * math.sqrt(expected)
    # Neighbouring values (the cos/sin halves of one pair) are uncorrelated.
    half = 500_000
    assert abs(np.corrcoef(z[:half], z[half : 2 * half])[0, 1]) < 5 / math.sqrt(half)


def test_layout_std_and_steps():
    noise = GaussianNoise([5, 40, 1], seed=1)
    assert noise.offsets == [0, 16, 64] and all(o % ALIGN == 0 for o in noise.offsets)
    assert noise.total == 65
    first, second = noise.next(3.0), noise.next(3.0)
    assert first.shape == (65,) and first.dtype == np.float32
    assert not np.array_equal(first, second)  # a fresh counter block every step
    again = GaussianNoise([5, 40, 1], seed=1)
    np.testing.assert_allclose(again.next(1.0) * 3.0, first, rtol=1e-6)
    with pytest.raises(ValueError):
        GaussianNoise([])
    with pytest.raises(ValueError):
        GaussianNoise([3, 0])


def test_prefetching_gives_the_same_values_and_rescales_on_std_change():
    plain = GaussianNoise([1000], seed=3)
    ahead = GaussianNoise([1000], seed=3, prefetch=True)
    try:
        for std in (2.0, 2.0, 2.0, 0.5, 2.0):  # the 0.5 step was prefetched with 2.0
            np.testing.assert_allclose(ahead.next(std), plain.next(std), rtol=1e-6)
    finally:
        ahead.close()
    np.testing.assert_allclose(ahead.next(1.0), plain.next(1.0), rtol=1e-6)  # works after close


def test_keys_come_from_os_entropy_unless_seeded():
    assert not np.array_equal(GaussianNoise([64]).next(), GaussianNoise([64]).next())
    np.testing.assert_array_equal(
        GaussianNoise([64], seed=9).next(), GaussianNoise([64], seed=9).next()
    )
    assert not np.array_equal(
        GaussianNoise([64], seed=9).next(), GaussianNoise([64], seed=10).next()
    )


def test_a_busy_background_thread_never_holds_training_up():
    import threading

    noise = GaussianNoise([1000], seed=4, prefetch=True)
    reference = GaussianNoise([1000], seed=4)
    gate = threading.Event()
    try:
        np.testing.assert_array_equal(noise.next(1.0), reference.next(1.0))
        noise._pool.submit(gate.wait)  # the worker is stuck (a loaded machine): queued draws wait
        for _ in range(3):  # drawn on the calling thread instead — same values, no waiting
            np.testing.assert_array_equal(noise.next(1.0), reference.next(1.0))
    finally:
        gate.set()
        noise.close()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread niceness is Linux's")
def test_background_thread_is_nicer_than_the_trainer():
    import os
    import threading

    main_nice = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    noise = GaussianNoise([1000], seed=5, prefetch=True)
    try:
        noise.next(1.0)
        (worker,) = [t for t in threading.enumerate() if t.name.startswith("kprivacy-nb-noise")]
        assert os.getpriority(os.PRIO_PROCESS, worker.native_id) == max(
            main_nice, BACKGROUND_NICENESS
        )
    finally:
        noise.close()
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == main_nice
