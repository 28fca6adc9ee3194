"""Plant known bugs one at a time in a copy of the project and check the tests catch each.

Not part of ``make test`` (each mutant re-runs a slice of the suite); run ``make mutate`` after
changing the engine, the accounting, the ledger or the age format. A mutant that survives is a
gap in the tests: write the test that kills it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# (name, file, original text, planted bug, tests that must fail)
MUTANTS = [
    (
        "no clipping",
        "kprivacy_nb/dp/clipping/clipper.py",
        "factors = tf.where(norms > clip, clip / tf.maximum(norms, 1e-30), 1.0)",
        "factors = tf.ones_like(norms)",
        "tests/test_dp_clipping.py",
    ),
    (
        "half the noise",
        "kprivacy_nb/dp/engine.py",
        "self.noise_std = float(noise_multiplier) * float(l2_norm_clip)",
        "self.noise_std = 0.5 * float(noise_multiplier) * float(l2_norm_clip)",
        "tests/test_dp_clipping.py",
    ),
    (
        "Poisson divides by the actual batch size",
        "kprivacy_nb/dp/sampling.py",
        "        return float(self.batch_size)",
        "        return float(max(len(batch), 1))",
        "tests/test_dp_trainer.py",
    ),
    (
        "one step fewer accounted",
        "kprivacy_nb/dp/private.py",
        "        steps = counters.step_count()\n        finish_fit(",
        "        steps = max(counters.step_count() - 1, 0)\n        finish_fit(",
        "tests/test_dp_private.py",
    ),
    (
        "float32 ghost norm",
        "kprivacy_nb/dp/clipping/linear.py",
        "    a64 = [tf.cast(t, tf.float64) for t in parts]\n    g64 = tf.cast(dz, tf.float64)",
        "    a64 = parts\n    g64 = dz\n    return tf.reduce_sum(tf.add_n([tf.matmul(t, t, "
        "transpose_b=True) for t in a64]) * tf.matmul(g64, g64, transpose_b=True), axis=[1, 2])",
        "tests/test_dp_guarantee.py",
    ),
    (
        "no underflow floor in single-position norms",
        "kprivacy_nb/dp/clipping/linear.py",
        "        s = tf.reduce_sum(tf.square(t), 1) + n * _TINY32",
        "        s = tf.reduce_sum(tf.square(t), 1)",
        "tests/test_dp_guarantee.py",
    ),
    (
        "no rounding margin on float32 sums of squares",
        "kprivacy_nb/dp/clipping/linear.py",
        "        return tf.cast(s, tf.float64) * (1.0 + (n + 2) * 2.0**-23)",
        "        return tf.cast(s, tf.float64)",
        "tests/test_dp_guarantee.py",
    ),
    (
        "self-check compares NaN norms",
        "kprivacy_nb/dp/clipping/selfcheck.py",
        "    usable = np.isfinite(total)",
        "    usable = np.ones(len(total), bool)",
        "tests/test_dp_guarantee.py",
    ),
    (
        "an overflowing sum decides that the update is not finite",
        "kprivacy_nb/dp/engine.py",
        "        lambda: tf.reduce_all([tf.reduce_all(tf.math.is_finite(g)) for g in tensors]),",
        "        lambda: tf.constant(False),",
        "tests/test_dp_guarantee.py",
    ),
    (
        "no mixing check",
        "kprivacy_nb/dp/clipping/selfcheck.py",
        "        _check_mixing(clipper, x, y, batch)",
        "        pass",
        "tests/test_dp_guarantee.py",
    ),
    (
        "no ledger cap",
        "kprivacy_nb/dp/ledger.py",
        "            if after > cap:",
        "            if False:",
        "tests/test_ledger.py tests/test_dp_guarantee.py",
    ),
    (
        "settle skips the cap",
        "kprivacy_nb/dp/ledger.py",
        "                if after > row[1]:",
        "                if False:",
        "tests/test_dp_guarantee.py",
    ),
    (
        "SGD instead of the chosen optimizer",
        "kprivacy_nb/dp/trainer.py",
        "    opt = engine.resolve_optimizer(optimizer, learning_rate)",
        "    opt = engine.resolve_optimizer('sgd', learning_rate)",
        "tests/test_dp_trainer.py",
    ),
    (
        "micro-batch chunk count overflows",
        "kprivacy_nb/dp/engine.py",
        "        chunks = (batch - 1) // physical + 1",
        "        chunks = (batch + physical - 1) // physical",
        "tests/test_dp_private.py",
    ),
    (
        "ids of a multi-input model not range-checked",
        "kprivacy_nb/dp/private.py",
        "input_arrays=_input_arrays(model, x),",
        "input_arrays=None,",
        "tests/test_dp_private.py",
    ),
    (
        "embedding sum of raw rows, not of the rows the norms were taken of",
        "kprivacy_nb/dp/clipping/embedding.py",
        "            flat = tf.tensor_scatter_nd_update(flat, slots[:, None], runs)\n",
        "            flat = tf.gather(tf.reshape(rows(dz), [-1, dim]), rep.order) * tf.gather(\n"
        "                tf.reshape(tf.tile(c[:, None], [1, positions]), [-1]), rep.order)[:, None]\n",
        "tests/test_dp_guarantee.py",
    ),
    (
        "recurrence backward forgets the later steps",
        "kprivacy_nb/dp/clipping/rnn.py",
        "return t - 1, tuple(found[1 : 1 + self.n_states]), found[-1], dz.write(t, found[0])",
        "return t - 1, start, found[-1], dz.write(t, found[0])",
        "tests/test_dp_sequence.py",
    ),
    (
        "chunked per-example gradients skip the last, shorter chunk",
        "kprivacy_nb/dp/clipping/linear.py",
        "count = (batch + size - 1) // size",
        "count = batch // size",
        "tests/test_dp_sequence.py",
    ),
    (
        "the fit draws its noise without dividing by the batch size",
        "kprivacy_nb/dp/private.py",
        "return self.noise.next(self.noise_std / float(denominator))",
        "return self.noise.next(self.noise_std)",
        "tests/test_dp_private.py",
    ),
]


def _copy() -> Path:
    target = Path(tempfile.mkdtemp(prefix="kp-mutant-"))
    ignore = shutil.ignore_patterns(".git", ".venv", "__pycache__", "*.egg-info", "demo-output")
    shutil.copytree(ROOT, target / "src", ignore=ignore)
    return target / "src"


def main() -> int:
    python = str(ROOT / ".venv" / "bin" / "python")
    survived = []
    for name, rel, old, new, tests in MUTANTS:
        tree = _copy()
        path = tree / rel
        text = path.read_text()
        if text.count(old) != 1:
            print(
                f"?? {name}: the original text is not in {rel} exactly once; update tools/mutate.py"
            )
            survived.append(name)
            continue
        path.write_text(text.replace(old, new))
        env = os.environ | {"PYTHONPATH": str(tree), "TF_CPP_MIN_LOG_LEVEL": "3"}
        run = subprocess.run(
            [python, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests.split()],
            cwd=tree,
            env=env,
            capture_output=True,
            text=True,
        )
        shutil.rmtree(tree.parent, ignore_errors=True)
        caught = run.returncode != 0
        print(f"{'caught  ' if caught else 'SURVIVED'} {name}", flush=True)
        if not caught:
            survived.append(name)
    print(f"{len(MUTANTS) - len(survived)}/{len(MUTANTS)} planted bugs caught")
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
