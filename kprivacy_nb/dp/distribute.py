"""DP-SGD under ``tf.distribute``: several devices (``MirroredStrategy``) or hosts
(``MultiWorkerMirroredStrategy``).

A model built, compiled and made private inside ``strategy.scope()`` trains with ``model.fit``;
``fit`` then runs its own epoch loop (Keras' ``fit`` cannot run under
``MultiWorkerMirroredStrategy`` with Keras 3, keras-team/keras#20585) with Keras' callbacks,
``History`` and progress bar. One step:

1. **Sampling.** Worker ``w`` of ``W`` owns the rows ``[w·n/W, (w+1)·n/W)`` and includes each of
   them independently with ``q = B/n`` — the same q as on one machine, so the union over workers
   is exactly one Poisson sample of the whole set (inclusion stays independent per example), and
   the accounting is one machine's: ``PoissonSampled(q, Gaussian(σ))`` per step, steps = n/B per
   epoch on every worker. A worker's batch is split between its local replicas.
2. **Clipping** on each replica, of its own examples, × 1/B (B the *global* expected batch size).
3. **Noise once.** Replica 0 (on the chief) adds the whole ``N(0, σ²C²)/B`` draw (the chief's
   CSPRNG); the other replicas add none. Then **one all-reduce (sum)** of the gradients, and the
   summed update — the same on every replica — is applied once, in cross-replica context (Keras'
   optimizer would all-reduce, i.e. sum, it again if called per replica).
4. **The ledger** is reserved and settled by the chief only; every worker waits for its answer.
"""

from __future__ import annotations

import threading
import time
import weakref
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import InvalidParameterError, TrainingError

__all__ = ["Topology", "agree", "chief_only", "run_distributed_fit", "strategy_for", "topology"]


def strategy_for(model: Any) -> Any | None:
    """The model's ``tf.distribute`` strategy when it needs the distributed loop (several
    replicas, or any ``MultiWorkerMirroredStrategy``); None for one device (Keras' own fit)."""
    import tensorflow as tf

    strategy = model.distribute_strategy
    multi_worker = isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
    if strategy.num_replicas_in_sync > 1 or multi_worker:
        return strategy
    return None


def check_distributable(state: Any) -> None:
    if state.sampling != "poisson":
        raise InvalidParameterError(
            "under tf.distribute only sampling='poisson' is supported (each worker samples its "
            "own rows with the same q); drop sampling='shuffle'"
        )


@dataclass(frozen=True)
class Topology:
    """Where this process sits: ``worker`` of ``workers`` (0 is the chief), each with
    ``local_replicas`` devices."""

    workers: int
    worker: int
    local_replicas: int

    @property
    def is_chief(self) -> bool:
        return self.worker == 0

    def shard(self, n: int) -> tuple[int, int]:
        """This worker's rows ``[lo, hi)``."""
        return n * self.worker // self.workers, n * (self.worker + 1) // self.workers


def topology(strategy: Any) -> Topology:
    """This process's place in the strategy's cluster (one worker for ``MirroredStrategy``)."""
    local = len(strategy.extended.worker_devices)
    resolver = getattr(strategy, "cluster_resolver", None)
    spec = resolver.cluster_spec().as_dict() if resolver is not None else {}
    if not spec:
        return Topology(1, 0, local)
    chiefs = len(spec.get("chief", []))
    workers = chiefs + len(spec.get("worker", []))
    # (replica ids in the sync group are worker-major: the chief first, then worker 0, 1, …)
    worker = 0 if resolver.task_type == "chief" else chiefs + int(resolver.task_id)
    if workers * local != strategy.num_replicas_in_sync:  # pragma: no cover - defensive
        raise TrainingError(
            f"unexpected cluster: {workers} workers × {local} devices ≠ "
            f"{strategy.num_replicas_in_sync} replicas"
        )
    return Topology(workers, worker, local)


def first_replica(strategy: Any) -> Any:
    """A replica context for this worker's first device (eager code — the self-check — then
    reads and differentiates the local copy of mirrored weights)."""
    import tensorflow as tf

    topo = topology(strategy)
    return tf.distribute.ReplicaContext(strategy, topo.worker * topo.local_replicas)


def agree(strategy: Any, ok: bool) -> bool:
    """True on every worker iff ``ok`` is true on every worker (one small all-reduce)."""
    import tensorflow as tf

    if strategy not in _AGREE:

        def replica(flag: Any) -> Any:
            ctx = tf.distribute.get_replica_context()
            return ctx.all_reduce(tf.distribute.ReduceOp.SUM, tf.identity(flag))

        _AGREE[strategy] = tf.function(lambda f: strategy.run(replica, args=(f,)))
    failed = _AGREE[strategy](tf.constant(0.0 if ok else 1.0))
    return float(strategy.experimental_local_results(failed)[0]) == 0.0


_AGREE: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()


def chief_only(strategy: Any, action: Any) -> None:
    """Run ``action`` on the chief; every worker raises if it failed (the chief re-raises its
    own error), so no worker starts a run the ledger refused."""
    error = None
    if topology(strategy).is_chief:
        try:
            action()
        except Exception as exc:  # noqa: BLE001 - re-raised below, after the others are told
            error = exc
    if not agree(strategy, error is None):
        if error is not None:
            raise error
        raise TrainingError("the chief worker could not start this run (see its error)")


class HostFeed:
    """Each replica's inputs for step ``i``, made on this worker's host: its share of the
    worker's Poisson sample (drawn once per step, split between the local replicas) and, for
    replica 0 only, the step's noise. Called from ``tf.numpy_function`` inside ``strategy.run``
    (the local replicas may call it concurrently)."""

    def __init__(self, plan: Any, topo: Topology) -> None:
        from .noise import GaussianNoise
        from .private import Element, run_seed
        from .sampling import PoissonSampler, make_rng

        self.plan, self.topo, self.element = plan, topo, Element(plan)
        mechanism = plan.mechanism
        seed = run_seed(plan.state)
        worker_seed = None if seed is None else seed + 104729 * topo.worker
        self.lo, hi = topo.shard(mechanism.n)
        # Each of this worker's rows is in a step's batch with q = B/n (the global q).
        self.sampler = PoissonSampler(max(hi - self.lo, 1), 1, make_rng(worker_seed))
        self.sampler.n, self.sampler.q = hi - self.lo, mechanism.batch_size / mechanism.n
        self.denominator = float(mechanism.batch_size)
        noise_std = plan.engine.noise_std
        self.noise = None
        if topo.is_chief and noise_std > 0:
            self.noise = GaussianNoise(plan.engine.sizes, seed, prefetch=True)
        self.noise_std = noise_std / self.denominator
        self._lock = threading.Lock()
        self._step, self._parts = -1, []
        self._empty = np.zeros(0, np.float32)

    def fetch(self, step: Any, replica: Any) -> list[np.ndarray]:
        step, replica = int(step), int(replica)
        with self._lock:
            if step != self._step:
                idx = np.sort(self.sampler.sample().astype(np.int64) + self.lo)
                self._step, self._parts = step, np.array_split(idx, self.topo.local_replicas)
            part = self._parts[replica % self.topo.local_replicas]
            noise = self._empty
            if replica == 0 and self.noise is not None:
                noise = self.noise.next(self.noise_std)
        return self.element.arrays(part, self.denominator, noise)

    def close(self) -> None:
        if self.noise is not None:
            self.noise.close()


class HostCounters:
    """The counters :func:`.private.epoch_callback` reads, kept on the host (the step returns
    the all-reduced sums)."""

    def __init__(self) -> None:
        self.steps, self.not_applied, self.traces = 0, 0.0, 0
        self.sums = np.zeros(4)

    def reset_epoch(self) -> None:
        self.sums[:] = 0.0

    def step_count(self) -> int:
        return self.steps

    def epoch_sums(self) -> list[float]:
        return [float(v) for v in self.sums]

    def failed(self) -> bool:
        return self.not_applied > 0


def _step_function(strategy: Any, plan: Any, feed: HostFeed, counters: HostCounters) -> Any:
    """The traced global step: every replica's part (``strategy.run``), then the update applied
    once if finite. Returns ``[loss_sum, count, correct_sum, dropped, applied]``."""
    import tensorflow as tf

    engine, element = plan.engine, feed.element

    def replica(step: Any) -> Any:
        rid = tf.distribute.get_replica_context().replica_id_in_sync_group
        out = tf.numpy_function(feed.fetch, [step, rid], element.dtypes, stateful=True)
        inputs, y, w = element.unpack(out)
        return engine.replica_update(
            inputs["x"], y, w, inputs["meta"], inputs["noise"], *inputs.get("repeated", ())
        )

    def step(i: Any) -> Any:
        counters.traces += 1
        update, sums, finite = strategy.run(replica, args=(i,))
        # All replicas hold the same all-reduced values: take this worker's first copy.
        first = strategy.experimental_local_results
        update, sums, finite = [first(g)[0] for g in update], first(sums)[0], first(finite)[0]
        applied = tf.cond(finite, lambda: engine.apply(update), lambda: tf.constant(0.0))
        return tf.concat([sums, [applied]], 0)

    return tf.function(step, autograph=False)


def run_distributed_fit(
    plan: Any,
    *,
    callbacks: Any = None,
    verbose: Any = "auto",
    on_epoch: Any = None,
    validation_steps: int | None = None,
    validation_batch_size: int | None = None,
    validation_freq: int = 1,
) -> Any:
    """The epoch loop of ``fit`` under a strategy (module docstring); returns Keras' History.
    The card and (on the chief) the ledger are written when it ends, however it ends."""
    import keras
    import tensorflow as tf

    from .private import epoch_callback, finish_fit

    model, strategy = plan.model, plan.strategy
    topo = topology(strategy)
    counters = HostCounters()
    feed = HostFeed(plan, topo)
    spe = plan.mechanism.steps_per_epoch
    history, interrupted, started = None, False, time.perf_counter()
    try:
        step = _step_function(strategy, plan, feed, counters)
        verbose = 1 if verbose == "auto" else verbose
        cbs = keras.callbacks.CallbackList(
            [epoch_callback(plan, counters, on_epoch), *(callbacks or [])], add_history=True,
            add_progbar=bool(verbose), verbose=verbose, epochs=plan.epochs, steps=spe, model=model,
        )  # fmt: skip
        model.stop_training = False
        cbs.on_train_begin()
        logs: dict[str, Any] = {}
        for epoch in range(plan.initial_epoch, plan.epochs):
            cbs.on_epoch_begin(epoch)
            for batch in range(spe):
                cbs.on_train_batch_begin(batch)
                counters.steps += 1  # counted before it runs: every step that ran is charged
                out = step(tf.constant(counters.steps - 1, tf.int64)).numpy()
                counters.sums += out[:4]
                counters.not_applied += 1.0 - float(out[4])
                cbs.on_train_batch_end(batch, {"dp_steps": counters.steps})
                if counters.failed():
                    break
            logs = {}
            if plan.validation_data is not None and (epoch + 1) % validation_freq == 0:
                x_val, y_val = plan.validation_data[:2]
                val = model.evaluate(
                    x_val, y_val, batch_size=validation_batch_size, steps=validation_steps,
                    verbose=0, return_dict=True,
                )  # fmt: skip
                logs.update({f"val_{k}": v for k, v in val.items()})
            cbs.on_epoch_end(epoch, logs)
            # Every worker stops together (EarlyStopping on one alone would hang the others).
            if not agree(strategy, not (model.stop_training or counters.failed())):
                break
        cbs.on_train_end(logs)
        history = model.history
    except KeyboardInterrupt:
        interrupted = True
        raise
    finally:
        feed.close()
        finish_fit(plan, counters.steps, history, started, interrupted, counters.traces)
    if counters.failed():
        from .private import diverged

        raise diverged(counters.steps)
    return history
