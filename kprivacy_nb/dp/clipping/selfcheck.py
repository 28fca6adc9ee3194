"""The engine checks itself before training: the ε it prints depends on two facts about the model.

1. **No layer mixes examples.** In training mode (dropout and the like included: their random
   state is put back between runs), changing one example must change no other example's output or
   loss. A model that mixes examples (BatchNormalization, a layer subtracting the batch mean…) has
   no per-example gradient, so clipping cannot bound one example's influence: it is refused.
2. **Every clipping path is exact.** On the same real examples, each layer's per-example squared
   gradient norm from its fast path (or from the vectorised fallback) is compared with an exact
   reference — one ``GradientTape`` per example, the textbook definition. A fast layer that is off
   by more than :data:`TOLERANCE` moves to the fallback; a vectorised fallback that is off is
   replaced by the one-example-at-a-time form; if that is still off, the model is refused.

3. **The traced step has sensitivity C.** Layers can behave differently when traced, or for a
   larger batch, or mix examples only in the backward pass (a custom gradient). So the last check
   (:func:`probe_sensitivity`) runs the clipped sum exactly as the training step does — traced,
   on a real batch of the training batch size — and measures the definition itself: for a few
   examples ``k``, removing ``k`` (weight 0) changes the clipped sum by exactly ``k``'s own
   clipped gradient, of norm ≤ C, and changing ``k``'s input and label while it is removed changes
   nothing.

This costs a few forward/backward passes on :data:`EXAMPLES` examples plus a dozen traced steps;
``run.clipping`` reports each layer as "verified" and the trainer reports the time taken.

What it does not do: prove anything about model code written to deceive it. A model's Python code
runs in your kernel next to your data; code that behaves one way while checked and another way
later (after N steps, on a flag) can leak anything, with or without DP. The checks catch honest
mistakes — a layer that uses batch statistics, a wrong vectorised jacobian, a formula that loses
precision — on the model and batch size you actually train.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import tensorflow as tf

from ...errors import InvalidParameterError, TrainingError

__all__ = ["EXAMPLES", "TOLERANCE", "example_count", "probe_sensitivity", "verify"]

#: How many real examples the self-check uses.
EXAMPLES = 8
#: Largest relative error between a fast per-example norm² and the exact one.
TOLERANCE = 1e-3


#: An input or label value from which float32 sums of squares may overflow, and a gradient
#: norm² close to float32's limit (2¹²⁸).
EXTREME, EXTREME_NORM_SQ = 2.0**60, 2.0**120


def _row_max(data: Any, batch: int) -> np.ndarray:
    """Each example's largest |value| over every leaf of ``data`` (float64)."""
    out = np.zeros(batch)
    for leaf in tf.nest.flatten(data):
        a = np.abs(np.asarray(leaf, np.float64)).reshape(batch, -1)
        if a.shape[1]:
            out = np.maximum(out, np.max(a, axis=1))
    return out


def _rows(data: Any, rows: Any) -> Any:
    return tf.nest.map_structure(lambda t: tf.gather(t, rows), data)


def _perturbed(x: Any, row: int) -> Any:
    """``x`` with example ``row`` changed in every input: floats moved by a large amount,
    integer ids (and whole numbers stored as floats) shifted to another id present in the
    batch."""
    rng = np.random.default_rng(row)

    def change(t: Any) -> Any:
        a = np.array(t)
        whole = a.dtype.kind == "f" and np.all(np.isfinite(a)) and np.all(a == np.round(a))
        if whole or a.dtype.kind in "iu":
            # Ids (and whole numbers stored as floats, most likely ids: a float move would take
            # them out of an Embedding's range) move to another id present in the batch — or,
            # where every row holds the same value, to a neighbour (0 ↔ 1, 2 ↔ 3, …): the
            # example must change, or the check would not look at this input at all.
            low, high = a.min(), a.max()
            if low < high:
                a[row] = np.where(a[row] < high, a[row] + 1, low)
            else:
                a[row] = np.where(a[row] % 2 == 0, a[row] + 1, a[row] - 1)
        elif a.dtype.kind == "f":
            a[row] = a[row] + (1.0 + np.abs(a[row])) * rng.standard_normal(a[row].shape)
        elif a.dtype.kind == "b":
            a[row] = ~a[row]
        return tf.constant(a)

    return tf.nest.map_structure(change, x)


def _outputs(clipper: Any, x: Any, y: Any, state: list[np.ndarray]) -> list[np.ndarray]:
    """Per-example outputs and losses in training mode, from the same random state."""
    model = clipper.model
    for var, value in zip(model.non_trainable_variables, state, strict=True):
        var.assign(value)
    preds = model(x, training=True)
    losses = clipper.loss_fn(y, preds)
    return [np.asarray(t, np.float64) for t in [*tf.nest.flatten(preds), losses]]


def _check_mixing(clipper: Any, x: Any, y: Any, batch: int) -> None:
    model = clipper.model
    state = [np.array(v.numpy()) for v in model.non_trainable_variables]
    try:
        base = _outputs(clipper, x, y, state)
        for var, before in zip(model.non_trainable_variables, state, strict=True):
            if "seed_generator" in var.path:
                continue
            if not np.array_equal(np.asarray(var.numpy()), before, equal_nan=True):
                raise TrainingError(
                    f"the non-trainable weight {var.path!r} changes when the model runs in "
                    "training mode: state computed from the data without noise would leave with "
                    "the model, outside the privacy guarantee. Freeze it or remove the layer"
                )
        again = _outputs(clipper, x, y, state)
        if not all(np.array_equal(a, b, equal_nan=True) for a, b in zip(base, again, strict=True)):
            raise TrainingError(
                "the model gives different outputs for the same batch in training mode even with "
                "its random state restored (randomness outside keras.random?): the self-check "
                "cannot verify that it treats examples independently, so it is refused"
            )
        for row in sorted({0, batch // 2, batch - 1}):
            changed = _outputs(clipper, _perturbed(x, row), y, state)
            others = np.arange(batch) != row
            for a, b in zip(base, changed, strict=True):
                a, b = a[others], b[others]
                scale = np.maximum(np.abs(a), 1.0)
                with np.errstate(invalid="ignore"):
                    same = (a == b) | (np.abs(a - b) <= 1e-5 * scale) | (np.isnan(a) & np.isnan(b))
                if not np.all(same):
                    raise TrainingError(
                        "the model mixes the examples of a batch: in training mode, changing one "
                        "example changed other examples' outputs. Per-example gradients (and so "
                        "DP-SGD's guarantee) do not exist for such a model. Remove layers that "
                        "use batch statistics (BatchNormalization, batch-mean subtraction, "
                        "custom layers reducing over axis 0)"
                    )
    finally:
        for var, value in zip(model.non_trainable_variables, state, strict=True):
            var.assign(value)


def _reference(clipper: Any, x: Any, y: Any, batch: int) -> dict[str, np.ndarray]:
    """Exact per-example squared norms per reporting name: one tape per example."""
    out: dict[str, np.ndarray] = {}
    for i in range(batch):
        xi, yi = _rows(x, [i]), _rows(y, [i])
        with tf.GradientTape() as tape:
            preds = clipper.model(xi, training=False)
            loss = tf.reduce_sum(tf.cast(clipper.loss_fn(yi, preds), tf.float32))
        grads = tape.gradient(
            loss, clipper.variables, unconnected_gradients=tf.UnconnectedGradients.ZERO
        )
        for v, g in zip(clipper.variables, grads, strict=True):
            name = clipper.owner_name(v)
            value = float(np.sum(np.square(np.asarray(tf.convert_to_tensor(g), np.float64))))
            out.setdefault(name, np.zeros(batch))[i] += value
    return out


def _fast(clipper: Any, x: Any, y: Any, batch: int) -> dict[str, tuple[np.ndarray, str]]:
    parts = clipper.parts(x, y, tf.ones([batch]), training=False)
    out: dict[str, tuple[np.ndarray, str]] = {}
    for part in parts.layers:
        sq = np.asarray(part.sq, np.float64)
        if sq.shape != (batch,):  # not one norm per example: the rule misread the layer's input
            sq = np.full(batch, np.inf)
        if part.layer in out:
            sq = sq + out[part.layer][0]
        out[part.layer] = (sq, part.method)
    return out


def _errors(clipper: Any, x: Any, y: Any, batch: int) -> dict[str, tuple[float, str]]:
    """Relative error of every layer's fast norm² against the reference."""
    ref = _reference(clipper, x, y, batch)
    fast = _fast(clipper, x, y, batch)
    total = sum(ref.values())
    # An example whose loss or gradient is not finite is dropped by the step: nothing to compare.
    # So is one whose fast norm overflows float32 because the example is extreme (a value past
    # EXTREME, or a gradient norm² near float32's limit): the step drops it too, which adds
    # nothing; refusing the model for it would let one record stop training. The check must
    # not pass on NaNs, so the others must be enough.
    fast_total = sum(sq for sq, _ in fast.values())
    extreme = (
        (total >= EXTREME_NORM_SQ)
        | (_row_max(x, batch) >= EXTREME)
        | (_row_max(y, batch) >= EXTREME)
    )
    usable = np.isfinite(total) & ~(~np.isfinite(fast_total) & extreme)
    if not np.any(usable):
        raise TrainingError(
            f"the self-check could not compare any gradient norm: the loss or gradient of each "
            f"of the first {batch} training examples is not finite (NaN or ∞). Check the data "
            "and the model (an all-padding row under a masked mean divides 0 by 0)"
        )
    floor = 1e-6 * float(np.max(total[usable])) + 1e-30
    errors = {}
    for name in set(ref) | set(fast):
        r = ref.get(name, np.zeros(batch))[usable]
        f, method = fast.get(name, (np.zeros(batch), "missing"))
        f, t = f[usable], total[usable]
        # Both sides are float32 computations; an example whose norm is tiny next to the layer's
        # largest is measured against that scale (a wrong formula is off for every example).
        # And the guarantee needs each example's *total* norm right: a layer that carries a
        # sliver of it (a float32 cancellation-dominated gradient) is measured against the total
        # (an error of 1e-3 of the total norm² moves the clipped norm by 0.05%). A fast norm
        # that is not finite where the reference is counts as infinitely wrong.
        scale = floor + 1e-2 * float(np.max(r))
        err = np.where(np.isfinite(f), np.abs(f - r) / (r + scale + 1e-3 * t), np.inf)
        errors[name] = (float(np.max(err)), method)
    return errors


def example_count(x: Any) -> int:
    """How many examples of ``x`` the self-check runs on: :data:`EXAMPLES`, or the next count
    that is not also a size of the inputs. Position ids (:mod:`.position_embedding`) are told
    from examples by their length on this first run: with a sequence as long as the batch they
    could not be, and the positions would take the slow fallback."""
    sizes = {d for t in tf.nest.flatten(x) for d in t.shape[1:] if d is not None}
    count = EXAMPLES
    while count in sizes:
        count += 1
    return count


def verify(clipper: Any, x: Any, y: Any) -> None:
    """Check ``clipper``'s model and every clipping path on ``x, y`` (a few real examples).

    Adjusts ``clipper`` (slow exact paths where a fast one failed) and fills
    ``clipper.verified``; raises :class:`TrainingError` when the guarantee cannot be verified.
    """
    batch = int(tf.nest.flatten(x)[0].shape[0])
    if batch < 2:
        raise TrainingError("the self-check needs at least 2 training examples")
    x = tf.nest.map_structure(tf.convert_to_tensor, x)
    y = tf.nest.map_structure(tf.convert_to_tensor, y)
    try:
        _check_mixing(clipper, x, y, batch)
    except (tf.errors.OpError, ValueError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InvalidParameterError(
            f"the model failed on the first training examples: {first}"
        ) from None
    for _ in range(len(clipper.methods) + 2):
        try:
            errors = _errors(clipper, x, y, batch)
        except (tf.errors.OpError, ValueError, TypeError):
            # A position embedding's output gains a batch axis on its fast path; code that
            # indexes it as (T, d) (``pos[None]``, a reshape) then fails. Such a layer takes
            # the fallback; any other failure is the model's own and is raised as it is.
            positions = clipper.broadcast_positions()
            if not positions:
                raise
            for name in positions:
                clipper.demote(
                    name, "position ids: the model's shapes do not allow a batch axis on "
                    "this layer's output"
                )  # fmt: skip
            continue
        bad = {name: e for name, e in errors.items() if e[0] > TOLERANCE}
        if not bad:
            clipper.verified = {name: e[0] for name, e in errors.items()}
            return
        fast_bad = [name for name, (_, m) in bad.items() if "fallback" not in m]
        if fast_bad:
            for name in fast_bad:
                clipper.demote(
                    name, f"fast path failed the self-check (rel. err {bad[name][0]:.2g})"
                )
        elif not clipper.exact_fallback:
            clipper.use_exact_fallback()
        else:
            names = ", ".join(f"{n!r} (rel. err {e:.2g})" for n, (e, _) in sorted(bad.items()))
            raise TrainingError(
                f"the per-example gradient norms of {names} could not be verified against an "
                "exact reference, so clipping could not be guaranteed: the model is refused. "
                "Does the model compute differently for one example alone than within a batch "
                "(code depending on the batch size or on other examples)? If not, please "
                "report the model architecture as a bug"
            )
    raise TrainingError("the self-check did not converge; please report the model as a bug")


def _probe_rows(batch: int) -> list[int]:
    """Examples whose removal the traced probe measures (positions in the probe batch)."""
    return sorted({0, batch // 2, batch - 1})


def probe_sensitivity(
    run: Any, x: Any, y: Any, state: Any, l2_norm_clip: float, perturb: Any = None
) -> float:
    """Check the clipped sum of the traced step on a real batch: see the module docstring (3).

    ``run(x, y, weights)`` returns the flat clipped sum exactly as the training step computes it;
    ``state`` is the model's non-trainable variables (their values — random seeds included — are
    put back before every run, so every run sees the same dropout masks); ``perturb(x, row)``
    changes example ``row`` of ``x`` (default: :func:`_perturbed`). Returns the largest removal
    effect found, divided by C (≤ 1 when the check passes); raises :class:`TrainingError`.
    """
    perturb = perturb or _perturbed
    batch = int(tf.nest.flatten(x)[0].shape[0])
    saved = [np.array(v.numpy()) for v in state]
    clip = float(l2_norm_clip)

    def flat(xs: Any, weights: np.ndarray, ys: Any = None) -> np.ndarray:
        for var, value in zip(state, saved, strict=True):
            var.assign(value)
        ys = y if ys is None else ys
        return np.asarray(run(xs, ys, tf.constant(weights, tf.float32)), np.float64)

    worst = 0.0
    try:
        ones = np.ones(batch, np.float32)
        everyone = flat(x, ones)
        tol = 1e-3 * clip + 1e-5 * float(np.linalg.norm(everyone))
        for k in _probe_rows(batch):
            alone = np.zeros(batch, np.float32)
            alone[k] = 1.0
            without = flat(x, ones - alone)
            own = flat(x, alone)
            moved = flat(perturb(x, k), ones - alone, perturb(y, k))
            if not np.all(np.isfinite(own)):
                continue  # a non-finite example is dropped by the step: nothing to measure
            if np.linalg.norm(moved - without) > tol:
                raise TrainingError(
                    "the model mixes the examples of a batch: in the traced training step, "
                    f"changing one example (of a batch of {batch}) changed the other examples' "
                    "gradients. Per-example gradients (and so DP-SGD's guarantee) do not exist "
                    "for such a model. Remove layers that use batch statistics "
                    "(BatchNormalization, batch-mean subtraction, custom layers reducing over "
                    "axis 0, or behaving differently when traced)"
                )
            removal = float(np.linalg.norm(everyone - without))
            worst = max(worst, removal / clip)
            if (
                float(np.linalg.norm(own)) > clip + tol
                or np.linalg.norm(everyone - without - own) > tol
            ):
                raise TrainingError(
                    "the model mixes the examples of a batch in its gradients: in the traced "
                    f"training step, removing one example changed the clipped sum by "
                    f"{removal / clip:.3g}·C, not by that example's own clipped gradient "
                    "(at most 1·C). A custom gradient or layer that combines examples in the "
                    "backward pass breaks DP-SGD's guarantee; the model is refused"
                )
    finally:
        for var, value in zip(state, saved, strict=True):
            var.assign(value)
    return worst
