"""TF Privacy's Keras API on Keras 3, trained by kprivacy_nb's DP-SGD engine.

TF Privacy cannot be imported next to TensorFlow ≥ 2.16 (see DESIGN.md). A TF Privacy script runs
here with one import changed::

    import kprivacy_nb.compat.tensorflow_privacy as tensorflow_privacy

    model = tensorflow_privacy.DPSequential(l2_norm_clip=1.0, noise_multiplier=1.1, layers=[...])
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(x, y, epochs=5, batch_size=250)          # DP-SGD (kprivacy_nb.make_private)
    print(tensorflow_privacy.compute_dp_sgd_privacy_statement(
        number_of_examples=len(x), batch_size=250, num_epochs=5, noise_multiplier=1.1,
        delta=1e-5, used_microbatching=False))
    model.privacy.epsilon                              # ε of the run as trained (Poisson, PLD)

What differs from TF Privacy, and why:

* **Where DP happens.** ``DPSequential``/``DPModel`` make ``fit`` private when they are compiled
  (:func:`kprivacy_nb.make_private` with their clip and σ). The ``DPKeras*Optimizer`` classes only
  *carry* C and σ: a model compiled with one is private once it is a ``DPSequential``/``DPModel``
  or goes through :func:`make_private` (which takes C and σ from the optimizer). On any other
  model its first update raises :class:`~kprivacy_nb.errors.TrainingError` — the gradients it
  was given are unclipped and noise-free, and it never applies them.
* **Microbatches.** Every example's gradient is clipped by itself (TF Privacy's
  ``num_microbatches=None``, the finest grouping), whatever ``num_microbatches`` says: the
  sensitivity is one example's clipped gradient, so the privacy statement to report is the one
  with ``used_microbatching=False``. ``num_microbatches`` is accepted (and checked) so scripts
  run; to bound memory use ``make_private(..., physical_batch_size=...)``.
* **Sampling.** Batches are Poisson-sampled for real, so ``model.privacy.epsilon`` is the
  statement's "assuming Poisson sampling" figure (PLD, ``used_microbatching=False``), for the
  steps that actually ran.
* ``use_xla`` and ``layer_registry`` are accepted and ignored: the DP step is traced without XLA
  and the fast per-layer clipping rules are kprivacy_nb's own (``kprivacy_nb/dp/clipping``),
  checked against an exact reference before every run.

The statement and :func:`compute_noise` reproduce TF Privacy 0.9's text and numbers, conventions
included (``ceil(epochs · n / batch_size)`` steps; σ halved when microbatching; RDP with TF
Privacy's orders in ``compute_noise``), with ``dp_accounting`` accountants doing every ε.
"""

from __future__ import annotations

import contextvars
import dataclasses
import enum
import functools
import math
import textwrap
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import dp_accounting

from ..dp import accounting
from ..errors import InvalidParameterError, TrainingError

__all__ = [
    "AccountantType",
    "DPKerasAdagradOptimizer",
    "DPKerasAdamOptimizer",
    "DPKerasSGDOptimizer",
    "DPModel",
    "DPSequential",
    "DPSettings",
    "compute_dp_sgd_privacy",
    "compute_dp_sgd_privacy_statement",
    "compute_noise",
    "in_private_step",
    "make_dp_model_class",
    "make_dp_optimizer_class",
    "make_private",
]

if TYPE_CHECKING:  # built on first use by the module's __getattr__ (Keras is imported then)
    DPSequential: type
    DPModel: type
    DPKerasSGDOptimizer: type
    DPKerasAdamOptimizer: type
    DPKerasAdagradOptimizer: type

#: RDP orders of TF Privacy's ``compute_noise`` and ``compute_dp_sgd_privacy``.
TF_PRIVACY_RDP_ORDERS = (
    [1.25, 1.5, 1.75, 2.0, 2.25, 2.5, 3.0, 3.5, 4.0, 4.5] + list(range(5, 64)) + [128, 256, 512]
)


# --------------------------------------------------------------------------- DP settings


@dataclass(frozen=True)
class DPSettings:
    """The DP-SGD settings a TF Privacy model or optimizer carries (``.dp_settings``)."""

    l2_norm_clip: float
    noise_multiplier: float
    num_microbatches: int | None = None

    def __post_init__(self) -> None:
        clip = accounting.check_clip(self.l2_norm_clip)
        sigma = _number("noise_multiplier", self.noise_multiplier)
        if sigma < 0:
            raise InvalidParameterError(
                f"noise_multiplier must be ≥ 0, got {self.noise_multiplier!r}"
            )
        micro = self.num_microbatches
        if isinstance(micro, bool):  # TF Privacy's check: an old positional use_xla
            raise InvalidParameterError(
                "Boolean value supplied for num_microbatches. Did you intend it for use_xla?"
            )
        if micro is not None and not (isinstance(micro, int) and micro >= 1):
            raise InvalidParameterError(
                f"num_microbatches must be None or a positive integer, got {micro!r}"
            )
        object.__setattr__(self, "l2_norm_clip", clip)
        object.__setattr__(self, "noise_multiplier", sigma)

    def config(self) -> dict:
        """The keyword arguments that rebuild these settings (for ``get_config``)."""
        return dataclasses.asdict(self)

    def same_mechanism(self, other: DPSettings) -> bool:
        return (self.l2_norm_clip, self.noise_multiplier) == (
            other.l2_norm_clip,
            other.noise_multiplier,
        )


def _number(name: str, value: Any) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise InvalidParameterError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(out):
        raise InvalidParameterError(f"{name} must be finite, got {value!r}")
    return out


def make_private(model: Any, **options: Any) -> Any:
    """:func:`kprivacy_nb.make_private` taking C and σ from the model's TF Privacy settings.

    The settings come from a ``DPSequential``/``DPModel`` or from the ``DPKeras*Optimizer`` the
    model was compiled with; other options (``delta``, ``ledger``, ``physical_batch_size``,
    ``accountant``…) pass through. Settings that contradict each other are refused.

    >>> model.compile(optimizer=DPKerasAdamOptimizer(1.0, 1.1, learning_rate=1e-3),
    ...               loss="binary_crossentropy")                        # doctest: +SKIP
    >>> make_private(model, delta=1e-5).fit(x, y, epochs=3, batch_size=64)  # doctest: +SKIP
    """
    from ..dp.private import make_private as _make_private

    carried = [
        s
        for s in (
            getattr(model, "dp_settings", None),
            getattr(getattr(model, "optimizer", None), "dp_settings", None),
        )
        if isinstance(s, DPSettings)
    ]
    if not carried:
        return _make_private(model, **options)
    settings = carried[0]
    if any(not settings.same_mechanism(s) for s in carried[1:]):
        raise InvalidParameterError(
            f"the model says l2_norm_clip={settings.l2_norm_clip:g}, "
            f"noise_multiplier={settings.noise_multiplier:g} but its optimizer says "
            f"l2_norm_clip={carried[1].l2_norm_clip:g}, "
            f"noise_multiplier={carried[1].noise_multiplier:g}: give the DP settings once "
            "(a DP model with a plain Keras optimizer is enough)"
        )
    if options.get("target_epsilon") is not None:
        raise InvalidParameterError(
            f"noise_multiplier={settings.noise_multiplier:g} is already set by the TF Privacy "
            "model/optimizer: drop target_epsilon, or use a plain Keras model and optimizer "
            "with kprivacy_nb.make_private(model, target_epsilon=...)"
        )
    for name in ("l2_norm_clip", "noise_multiplier"):
        given = options.pop(name, None)
        if given is not None and float(given) != getattr(settings, name):
            raise InvalidParameterError(
                f"{name}={given!r} contradicts the TF Privacy setting "
                f"{name}={getattr(settings, name):g}: give it once"
            )
    return _make_private(
        model,
        l2_norm_clip=settings.l2_norm_clip,
        noise_multiplier=settings.noise_multiplier,
        **options,
    )


# --------------------------------------------------------------------------- the private step


def in_private_step() -> bool:
    """True while kprivacy_nb's DP ``train_step`` hands its noisy gradients to the optimizer.

    It is read when the step is traced (the DP optimizers check it in ``apply``), so a compiled
    plain ``fit`` fails at its first step, before any update.
    """
    from ..dp.engine import PRIVATE_UPDATE

    return bool(PRIVATE_UPDATE.get())


# --------------------------------------------------------------------------- Keras classes

_MISSING: Any = object()
#: DP settings handed to ``__init__`` while Keras rebuilds a saved DP model from its config.
_FROM_CONFIG: contextvars.ContextVar[dict | None] = contextvars.ContextVar(
    "kprivacy_tfp_from_config", default=None
)
_MODEL_CONFIG_KEYS = ("l2_norm_clip", "noise_multiplier", "num_microbatches", "use_xla")


def make_dp_model_class(cls: type) -> type:
    """A DP subclass of a ``keras.Model`` class (TF Privacy's ``make_dp_model_class``).

    ``DPX(l2_norm_clip, noise_multiplier, num_microbatches=None, use_xla=True,
    layer_registry=None, *args, **kwargs)``; ``args``/``kwargs`` go to ``X``. ``compile`` makes
    ``fit`` DP-SGD with that clip and σ (see the module docstring for what the other two mean).
    """

    class DPModelClass(cls):  # type: ignore[misc, valid-type]
        def __init__(
            self,
            l2_norm_clip: float = _MISSING,
            noise_multiplier: float = _MISSING,
            num_microbatches: int | None = None,
            use_xla: bool = True,
            layer_registry: Any = None,
            *args: Any,
            **kwargs: Any,
        ) -> None:
            saved = _FROM_CONFIG.get()
            if saved is not None and l2_norm_clip is _MISSING:
                l2_norm_clip, noise_multiplier = saved["l2_norm_clip"], saved["noise_multiplier"]
                num_microbatches = saved.get("num_microbatches")
                use_xla = saved.get("use_xla", True)
            if l2_norm_clip is _MISSING or noise_multiplier is _MISSING:
                raise TypeError(
                    f"{type(self).__name__} needs l2_norm_clip and noise_multiplier, e.g. "
                    f"{type(self).__name__}(l2_norm_clip=1.0, noise_multiplier=1.1, ...)"
                )
            settings = DPSettings(l2_norm_clip, noise_multiplier, num_microbatches)
            super().__init__(*args, **kwargs)
            self.dp_settings = settings
            self.use_xla = bool(use_xla)
            self.layer_registry = layer_registry

        def compile(self, *args: Any, **kwargs: Any) -> None:
            super().compile(*args, **kwargs)
            make_private(self)

        def compile_from_config(self, config: dict) -> None:
            # Keras does not call an overridden compile when loading; this one only adds
            # make_private, so a loaded DP model is compiled, and private, as it was saved.
            import keras

            self.compile(**keras.saving.deserialize_keras_object(config))
            if getattr(self, "optimizer", None) is not None and self.built:
                self.optimizer.build(self.trainable_variables)

        def get_config(self) -> dict:
            config = super().get_config()
            config.update(self.dp_settings.config(), use_xla=self.use_xla)
            return config

        @classmethod
        def from_config(cls, config: dict, custom_objects: Any = None) -> Any:
            config = dict(config)
            saved = {k: config.pop(k) for k in _MODEL_CONFIG_KEYS if k in config}
            token = _FROM_CONFIG.set(saved)
            try:
                return super().from_config(config, custom_objects=custom_objects)
            finally:
                _FROM_CONFIG.reset(token)

    DPModelClass.__doc__ = (
        f"Differentially private ``keras.{cls.__name__}``: ``compile`` then ``fit`` trains with "
        "DP-SGD (:func:`kprivacy_nb.compat.tensorflow_privacy.make_private`)."
    )
    return DPModelClass


def make_dp_optimizer_class(cls: type) -> type:
    """A subclass of a Keras 3 optimizer class carrying DP-SGD settings.

    ``DPX(l2_norm_clip, noise_multiplier, num_microbatches=None, gradient_accumulation_steps=1,
    *args, **kwargs)``; ``args``/``kwargs`` go to ``X`` (``learning_rate=...``). Its ``apply``
    runs only inside kprivacy_nb's DP ``train_step``; anywhere else it raises
    :class:`~kprivacy_nb.errors.TrainingError` — never a silently non-private update.
    ``gradient_accumulation_steps`` > 1 averages that many noisy updates before applying them
    (Keras' own accumulation: post-processing, every step is still accounted).
    """

    class DPOptimizerClass(cls):  # type: ignore[misc, valid-type]
        def __init__(
            self,
            l2_norm_clip: float,
            noise_multiplier: float,
            num_microbatches: int | None = None,
            gradient_accumulation_steps: int | None = 1,
            *args: Any,
            **kwargs: Any,
        ) -> None:
            settings = DPSettings(l2_norm_clip, noise_multiplier, num_microbatches)
            steps = gradient_accumulation_steps
            if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int)):
                raise InvalidParameterError(
                    f"gradient_accumulation_steps must be a positive integer, got {steps!r}"
                )
            if steps is not None and steps < 1:
                raise InvalidParameterError(f"gradient_accumulation_steps must be ≥ 1, got {steps}")
            super().__init__(
                *args, gradient_accumulation_steps=steps if steps and steps > 1 else None, **kwargs
            )
            self.dp_settings = settings

        def apply(self, grads: Any, trainable_variables: Any = None) -> Any:
            if not in_private_step():
                name = type(self).__name__
                raise TrainingError(
                    f"{name} was given gradients outside a DP-SGD step: this model's fit is not "
                    "private (its gradients are unclipped and noise-free), so no update was "
                    f"applied. In kprivacy_nb, {name} only carries l2_norm_clip and "
                    "noise_multiplier: after compile, call "
                    "kprivacy_nb.compat.tensorflow_privacy.make_private(model) (it uses "
                    "them), or build the model as DPSequential / DPModel"
                )
            return super().apply(grads, trainable_variables)

        def get_config(self) -> dict:
            config = super().get_config()
            config.update(self.dp_settings.config())
            return config

    DPOptimizerClass.__doc__ = (
        f"``keras.optimizers.{cls.__name__}`` carrying DP-SGD settings (see "
        ":func:`make_dp_optimizer_class`)."
    )
    return DPOptimizerClass


@functools.cache
def _keras_classes() -> dict[str, type]:
    import keras

    bases = {
        "DPSequential": (make_dp_model_class, keras.Sequential),
        "DPModel": (make_dp_model_class, keras.Model),
        "DPKerasSGDOptimizer": (make_dp_optimizer_class, keras.optimizers.SGD),
        "DPKerasAdamOptimizer": (make_dp_optimizer_class, keras.optimizers.Adam),
        "DPKerasAdagradOptimizer": (make_dp_optimizer_class, keras.optimizers.Adagrad),
    }
    out = {}
    for name, (factory, base) in bases.items():
        klass = factory(base)
        klass.__name__ = klass.__qualname__ = name
        klass.__module__ = __name__
        out[name] = keras.saving.register_keras_serializable(package="kprivacy_nb.compat")(klass)
    return out


def __getattr__(name: str) -> Any:
    """The Keras classes are built on first use, so the statement functions need no TensorFlow."""
    if name in {"DPSequential", "DPModel"} or name.startswith("DPKeras"):
        classes = _keras_classes()
        if name in classes:
            globals().update(classes)
            return classes[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# --------------------------------------------------------------------------- privacy statement


class AccountantType(enum.Enum):
    """The accountant of :func:`compute_dp_sgd_privacy_statement` (TF Privacy's enum)."""

    RDP = "RDP"
    PLD = "PLD"

    def get_accountant(self) -> dp_accounting.PrivacyAccountant:
        """A fresh ``dp_accounting`` accountant with dp_accounting's default settings."""
        return accounting.make_accountant(self.value.lower())


def _example_epsilon(
    n: int,
    batch_size: int,
    num_epochs: float,
    noise_multiplier: float,
    delta: float,
    used_microbatching: bool,
    poisson: bool,
    accountant_type: AccountantType,
) -> float:
    """Example-level ε, TF Privacy's conventions: σ halved when microbatching (sensitivity 2C);
    Poisson: ``ceil(num_epochs / q)`` steps of ``PoissonSampled(q, Gaussian)``, q = B/n;
    otherwise every example once per epoch: ``Gaussian`` composed ``ceil(num_epochs)`` times."""
    sigma = noise_multiplier / 2 if used_microbatching else noise_multiplier
    if poisson:
        steps = math.ceil(num_epochs / (batch_size / n))
        sampling = "poisson"
    else:  # dpsgd_event's "shuffle": Gaussian composed once per epoch started
        steps = math.ceil(num_epochs) * accounting.steps_per_epoch(n, batch_size, "shuffle")
        sampling = "shuffle"
    event = accounting.dpsgd_event(
        n=n, batch_size=batch_size, noise_multiplier=sigma, steps=steps, sampling=sampling
    )
    return float(accountant_type.get_accountant().compose(event).get_epsilon(delta))


def _log_expm1(x: float) -> float:
    """``log(exp(x) - 1)`` without overflow for large ``x``."""
    return x + math.log(-math.expm1(-x))


def _user_epsilon(
    n: int,
    batch_size: int,
    num_epochs: float,
    noise_multiplier: float,
    delta: float,
    used_microbatching: bool,
    poisson: bool,
    max_examples_per_user: int,
) -> float:
    """User-level ε by group privacy (Vadhan 2017, Lemma 2.2, the tighter form in its proof).

    A user with k examples: ε_user = k·ε, δ_user = δ·(e^{kε} − 1)/(e^{ε} − 1), where (ε, δ) is
    the example-level guarantee. The example δ giving the requested user δ is found by a line
    search in log δ (as TF Privacy does; RDP accounting). ``inf`` when no example δ reaches it.
    """
    from scipy import optimize

    def example_eps(log_delta: float) -> float:
        return _cached_eps(math.exp(log_delta))

    @functools.cache
    def _cached_eps(example_delta: float) -> float:
        return _example_epsilon(
            n, batch_size, num_epochs, noise_multiplier, example_delta, used_microbatching,
            poisson, AccountantType.RDP,
        )  # fmt: skip

    k = max_examples_per_user
    if k == 1:
        return _cached_eps(delta)
    target = math.log(delta)

    def gap(log_delta: float) -> float:
        eps = example_eps(log_delta)
        return log_delta + _log_expm1(k * eps) - _log_expm1(eps) - target

    # The user δ grows with the example δ: search downwards (by decades, then by the gap, which
    # is a valid step since ε only grows as δ shrinks) until the user δ is below the target.
    hi = target
    lo = hi - math.log(10)
    low_gap = gap(lo)
    while low_gap > 0:
        hi = lo - low_gap
        lo = hi - math.log(10)
        low_gap = gap(lo)
        if not math.isfinite(low_gap):
            warnings.warn(
                f"no finite user-level ε with {k} examples per user", RuntimeWarning, stacklevel=3
            )
            return math.inf
    lo -= low_gap
    root, result = optimize.brentq(gap, lo, hi, full_output=True)
    if not result.converged:
        raise InvalidParameterError("the user-level ε line search did not converge")
    return k * example_eps(root)


def _fill(text: str) -> str:
    return textwrap.fill(text, width=80)


def compute_dp_sgd_privacy_statement(
    number_of_examples: int,
    batch_size: int,
    num_epochs: float,
    noise_multiplier: float,
    delta: float,
    used_microbatching: bool = True,
    max_examples_per_user: int | None = None,
    accountant_type: AccountantType = AccountantType.RDP,
) -> str:
    """TF Privacy 0.9's privacy statement for DP-SGD: the same text and the same numbers.

    Two example-level ε: every example once per epoch (no amplification), and assuming Poisson
    sampling — the one that applies to kprivacy_nb's training, which samples that way, with
    ``used_microbatching=False`` (each example is clipped by itself). With
    ``max_examples_per_user``, also user-level ε by group privacy (RDP only, as in TF Privacy).

    >>> print(compute_dp_sgd_privacy_statement(60000, 256, 15, 1.1, 1e-5,
    ...                                        used_microbatching=False))  # doctest: +SKIP
    """
    n = accounting._check_int("number_of_examples", number_of_examples)
    batch_size = accounting._check_int("batch_size", batch_size)
    if batch_size > n:
        raise InvalidParameterError(
            f"batch_size ({batch_size}) cannot exceed number_of_examples ({n})"
        )
    if not _number("num_epochs", num_epochs) > 0:
        raise InvalidParameterError(f"num_epochs must be positive, got {num_epochs}")
    if _number("noise_multiplier", noise_multiplier) < 0:
        raise InvalidParameterError(f"noise_multiplier must be ≥ 0, got {noise_multiplier}")
    if not 0 <= _number("delta", delta) <= 1:
        raise InvalidParameterError(f"delta must be between 0 and 1, got {delta}")
    if max_examples_per_user is not None:
        accounting._check_int("max_examples_per_user", max_examples_per_user)
    accountant_type = AccountantType(getattr(accountant_type, "value", accountant_type))
    common = (n, batch_size, num_epochs, noise_multiplier, delta, used_microbatching)

    head = (
        f"DP-SGD performed over {number_of_examples} examples with {batch_size} examples per "
        f"iteration, noise multiplier {noise_multiplier} for {num_epochs} epochs "
        f"{'with' if used_microbatching else 'without'} microbatching"
    )
    if max_examples_per_user is None:
        head += ", and no bound on number of examples per user."
    else:
        head += f", and at most {max_examples_per_user} examples per user."
    paragraphs = [
        _fill(head),
        _fill(
            "This privacy guarantee protects the release of all model checkpoints in addition "
            "to the final model."
        ),
        _fill(
            f"Example-level DP with add-or-remove-one adjacency at delta = {delta} computed with "
            f"{accountant_type.value} accounting:"
        )
        + _two_epsilons(
            f"{_example_epsilon(*common, False, accountant_type):12.3f}",
            f"{_example_epsilon(*common, True, accountant_type):12.3f}",
        ),
    ]
    infinite = False
    if max_examples_per_user is None:
        paragraphs.append(
            _fill(
                "No user-level privacy guarantee is possible without a bound on the number of "
                "examples per user."
            )
        )
    elif accountant_type is AccountantType.PLD:
        paragraphs.append(
            _fill(
                "User-level DP epsilon computation is not supported for PLD accounting at this "
                "time. Use RDP accounting to obtain user-level DP guarantees."
            )
        )
    else:
        shown = []
        for poisson in (False, True):
            eps = _user_epsilon(*common, poisson, max_examples_per_user)
            infinite = infinite or math.isinf(eps)
            shown.append("    inf (**)" if math.isinf(eps) else f"{eps:12.3f}")
        paragraphs.append(
            _fill(
                f"User-level DP with add-or-remove-one adjacency at delta = {delta} computed "
                f"using {accountant_type.value} accounting and group privacy:"
            )
            + _two_epsilons(*shown)
        )
    paragraphs.append(
        _fill(
            "(*) Poisson sampling is not usually done in training pipelines, but assuming that "
            "the data was randomly shuffled, it is believed that the actual epsilon should be "
            "closer to this value than the conservative assumption of an arbitrary data order."
        )
    )
    if infinite:
        paragraphs.append(
            _fill(
                "(**) A finite example-level epsilon implies a finite user-level epsilon at any "
                "`max_examples_per_user`, but because conversion from example-level to user-level "
                "DP is not exact, it is possible for the upper bound on the user-level epsilon to "
                "still be infinite."
            )
        )
    return "\n\n".join(paragraphs) + "\n"


def _two_epsilons(once_per_epoch: str, poisson: str) -> str:
    return (
        f"\n    Epsilon with each example occurring once per epoch:  {once_per_epoch}"
        f"\n    Epsilon assuming Poisson sampling (*):               {poisson}"
    )


# --------------------------------------------------------------------------- noise / old API


def _tf_privacy_rdp_event(n: int, batch_size: int, epochs: float, sigma: float) -> Any:
    """``ceil(epochs · n / B)`` Poisson-sampled Gaussian steps (TF Privacy's convention)."""
    if batch_size > n:
        raise InvalidParameterError("n must be larger than the batch size.")
    steps = math.ceil(epochs * n / batch_size)
    return accounting.dpsgd_event(
        n=n, batch_size=batch_size, noise_multiplier=sigma, steps=steps, sampling="poisson"
    )


def compute_noise(
    n: int,
    batch_size: int,
    target_epsilon: float,
    epochs: float,
    delta: float,
    noise_lbd: float,
) -> float:
    """σ for ``target_epsilon`` as TF Privacy's ``compute_noise`` finds it (and prints it).

    RDP with TF Privacy's orders, ``ceil(epochs · n / batch_size)`` Poisson steps, searched by
    ``dp_accounting.calibrate_dp_mechanism`` upwards from ``noise_lbd``; returns 0 when
    ``noise_lbd`` already gives less than ``target_epsilon``. kprivacy_nb's own
    :func:`kprivacy_nb.calibrate_noise` (PLD, steps as trained) is usually tighter.
    """

    def new_accountant() -> dp_accounting.PrivacyAccountant:
        return dp_accounting.rdp.RdpAccountant(TF_PRIVACY_RDP_ORDERS)

    def event_of(sigma: float) -> Any:
        return _tf_privacy_rdp_event(n, batch_size, epochs, sigma)

    if new_accountant().compose(event_of(noise_lbd)).get_epsilon(delta) < target_epsilon:
        print("noise_lbd too large for target epsilon.")
        return 0
    sigma = dp_accounting.calibrate_dp_mechanism(
        new_accountant,
        event_of,
        target_epsilon,
        delta,
        dp_accounting.LowerEndpointAndGuess(noise_lbd, noise_lbd * 2),
    )
    steps = math.ceil(epochs * n / batch_size)
    print(
        f"DP-SGD with sampling rate = {100 * batch_size / n:.3g}% and noise_multiplier = "
        f"{sigma} iterated over {steps} steps satisfies differential privacy with eps = "
        f"{target_epsilon:.3g} and delta = {delta}."
    )
    return sigma


def compute_dp_sgd_privacy(
    n: int, batch_size: int, noise_multiplier: float, epochs: float, delta: float
) -> tuple[float, float]:
    """TF Privacy's deprecated ``(ε, optimal RDP order)``: Poisson sampling, no microbatching
    factor. Prefer :func:`compute_dp_sgd_privacy_statement`."""
    warnings.warn(
        "compute_dp_sgd_privacy is deprecated (as in TF Privacy): use "
        "compute_dp_sgd_privacy_statement, which says what the ε assumes",
        DeprecationWarning,
        stacklevel=2,
    )
    acct = dp_accounting.rdp.RdpAccountant(TF_PRIVACY_RDP_ORDERS)
    acct.compose(_tf_privacy_rdp_event(n, batch_size, epochs, noise_multiplier))
    eps, order = acct.get_epsilon_and_optimal_order(delta)
    return float(eps), order
