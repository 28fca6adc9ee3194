"""Gaussian noise for DP-SGD: AES-CTR random bits and the Box–Muller transform, off the hot path.

Each step needs one N(0, σ²C²) draw per trainable coordinate (hundreds of thousands per step), so
the sampler matters. TensorFlow's stateless Philox normal sampler costs ~8 ns per value on the
2-core machines we target, which alone made a DP step of a 320k-parameter embedding model half
again as slow as a plain Keras step. Here the random bits come from AES-256 in counter mode (the
``cryptography`` package; OpenSSL uses the CPU's AES instructions: 1.3 MB in ~0.17 ms) and
vectorised NumPy turns them into normals (~1.3 ns per value). Both release the GIL, so
:class:`GaussianNoise` prepares the next step's noise on a background thread while TensorFlow runs
the current step, already multiplied by the step's standard deviation.

Properties, stated so the privacy claim stays honest:

* **Source.** AES-256-CTR keyed with 32 bytes from ``os.urandom`` is a cryptographically secure
  generator (it is the core of NIST SP 800-90A's CTR_DRBG). Only when a ``seed`` is given (tests)
  is the key derived from the seed, by SHA-256. Each step uses its own counter block (the step
  number in the high 64 bits), so no two steps share bits.
* **Transform.** Each pair of 32-bit words ``(a, b)`` gives two independent normals
  ``r·cos θ, r·sin θ`` with ``r = sqrt(-2 ln u)``, ``u = (a + ½)·2⁻³²`` and ``θ = 2π·b·2⁻³²``,
  computed in float32. The smallest ``u`` is 2⁻³³, so magnitudes reach 6.77 σ (TensorFlow's
  float32 sampler stops at 5.68 σ); a true Gaussian exceeds 6.77 σ with probability 1.3·10⁻¹¹.
* **Floating point.** Like TF Privacy and Opacus (outside its ``secure_mode``), the noise is a
  float32 approximation of a Gaussian; we make no claim of resistance to floating-point attacks
  on the low-order bits (Mironov 2012; Jin et al. 2022).
"""

from __future__ import annotations

import hashlib
import math
import os
import sys
import threading
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

__all__ = [
    "ALIGN",
    "BACKGROUND_NICENESS",
    "MAX_ABS",
    "PATIENCE",
    "GaussianNoise",
    "lower_priority",
    "normals_from_words",
    "ready_within",
]

#: Largest |z| the transform can produce (the smallest u is 2^-33).
MAX_ABS = math.sqrt(66 * math.log(2))

#: Chunks of the flat noise vector start at multiples of 16 floats (64 bytes) so TensorFlow can
#: slice them out without copying.
ALIGN = 16


#: Niceness of the noise thread: it should use the gaps the training step leaves rather than take
#: CPU from it. (Not Linux ``SCHED_IDLE``: under outside load that can starve the thread for
#: seconds while it holds the GIL, and the trainer with it; a nice thread still gets a slice.)
BACKGROUND_NICENESS = 19


#: How long the trainer waits for the background thread before doing its work itself (s). While
#: it waits, the cores are free, so a draw that is nearly done finishes; a starved one costs this
#: much at most.
PATIENCE = 0.002


def ready_within(future: Future[Any], seconds: float) -> Any:
    """The future's result if it is ready within ``seconds``, else None."""
    if not future.done():
        try:
            return future.result(timeout=seconds)
        except TimeoutError:
            return None
    return future.result()


def lower_priority() -> None:
    """Make the calling thread nicer (Linux: niceness is per thread); a no-op elsewhere."""
    if not sys.platform.startswith("linux"):  # elsewhere the id could name a whole process
        return
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), BACKGROUND_NICENESS)
    except (AttributeError, OSError):
        pass


def normals_from_words(words: np.ndarray, size: int, std: float = 1.0) -> np.ndarray:
    """``size`` float32 normals N(0, std²) from ``2·⌈size/2⌉`` uint32 words (Box–Muller, above;
    ``std`` scales the radius, one pass fewer than scaling the result)."""
    half = (int(size) + 1) // 2
    if words.shape != (2 * half,) or words.dtype != np.uint32:
        raise ValueError(f"need {2 * half} uint32 words for {size} normals")
    # (In place throughout: each temporary array would cost a page-faulting allocation.)
    radius = words[:half].astype(np.float32)  # exact below 2^24, rounded above (harmless: u ≈ 1)
    radius += np.float32(0.5)
    radius *= np.float32(2.0**-32)  # u
    np.log(radius, out=radius)
    radius *= np.float32(-2.0)
    np.sqrt(radius, out=radius)
    if std != 1.0:
        radius *= np.float32(std)
    theta = words[half:].astype(np.float32)
    theta *= np.float32(2.0 * math.pi * 2.0**-32)
    out = np.empty(2 * half, np.float32)
    np.cos(theta, out=out[:half])
    np.sin(theta, out=theta)
    out[:half] *= radius
    np.multiply(theta, radius, out=out[half:])
    return out[: int(size)]


class GaussianNoise:
    """Per-step Gaussian noise for tensors of the given ``sizes``.

    ``next(std)`` returns one flat float32 vector holding N(0, std²) values for every coordinate;
    chunk ``i`` (``sizes[i]`` values) starts at ``offsets[i]``, a multiple of :data:`ALIGN` (the
    few padding values in between are noise too, and unused).

    With ``prefetch=True`` the next step's vector is made on a background thread while the
    current step trains; step k's values are the same either way. Call ``close()`` when done.

    >>> noise = GaussianNoise([5, 3], seed=1)
    >>> noise.offsets, noise.next(2.0).shape
    ([0, 16], (19,))
    """

    def __init__(
        self,
        sizes: Sequence[int],
        seed: int | None = None,
        *,
        prefetch: bool = False,
    ) -> None:
        sizes = [int(n) for n in sizes]
        if not sizes or min(sizes) < 1:
            raise ValueError("sizes must be ≥ 1")
        self.sizes, self.offsets, end = sizes, [], 0
        for n in sizes:
            self.offsets.append(end)
            end = -(-(end + n) // ALIGN) * ALIGN
        self.total = self.offsets[-1] + sizes[-1]
        if seed is None:
            self._key = os.urandom(32)
        else:
            self._key = hashlib.sha256(f"kprivacy-nb noise seed {int(seed)}".encode()).digest()
        self._zeros = bytes(8 * ((self.total + 1) // 2))
        self._step = 0
        self.seeded = seed is not None
        self._pool = (
            ThreadPoolExecutor(1, "kprivacy-nb-noise", initializer=lower_priority)
            if prefetch
            else None
        )
        self._pending: deque[tuple[int, float, Future[np.ndarray]]] = deque()
        self.depth = 1 if prefetch else 0

    def words(self, step: int) -> np.ndarray:
        """The random words of step ``step`` (≥ 1) as uint32."""
        counter = (int(step) << 64).to_bytes(16, "big")
        encryptor = Cipher(algorithms.AES(self._key), modes.CTR(counter)).encryptor()
        return np.frombuffer(encryptor.update(self._zeros), dtype=np.uint32)

    def _draw(self, step: int, std: float) -> np.ndarray:
        return normals_from_words(self.words(step), self.total, std)

    def next(self, std: float = 1.0) -> np.ndarray:
        """The next step's noise with standard deviation ``std``."""
        self._step += 1
        if self._pool is None:
            return self._draw(self._step, std)
        while len(self._pending) < self.depth + 1:  # this step's and the next ``depth`` steps'
            step = self._step + len(self._pending)
            future = self._pool.submit(self._draw, step, std)
            self._pending.append((step, std, future))
        step, made_with, pending = self._pending.popleft()
        if made_with == std:
            ready = ready_within(pending, PATIENCE)
            if ready is not None:
                return ready
        # Not ready (a busy machine: the low-priority thread is never waited for long) or made
        # for another σ/denominator (the short last batch of a shuffled epoch): draw it here.
        # Step k's values are the same either way; a background draw still running is dropped.
        pending.cancel()
        return self._draw(step, std)

    def close(self) -> None:
        """Stop the background thread (``next`` still works afterwards, without prefetching)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
            self._pending.clear()
