"""``%dp_audit``: an empirical privacy audit next to the proven ε.

Thin layer over :mod:`kprivacy_nb.audit`: ``mia`` runs
:func:`~kprivacy_nb.audit.membership_inference` on a trained model, ``one-run`` runs the canary
audit :func:`~kprivacy_nb.audit.one_run` (it trains a model from a ``make_model`` function). The
result renders as a card (proven ε, lower bound, ROC, verdict) and is stored under ``-o NAME``.
Settings (``%config AuditMagics.confidence = 0.99``): ``confidence``, ``canaries``, ``attack``.
"""

from __future__ import annotations

from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring
from traitlets import CaselessStrEnum, Float, Integer

from ..dp.names import ACCOUNTANTS as _ACCOUNTANTS  # cheap: no dp-accounting import
from ..dp.names import SAMPLINGS as _SAMPLINGS
from ._base import lookup, user_errors

_USAGE = {
    "mia": "%dp_audit mia MODEL X_TRAIN Y_TRAIN X_HOLDOUT Y_HOLDOUT [--run RUN]",
    "one-run": "%dp_audit one-run MAKE_MODEL X Y --epochs E --batch-size B [--target-epsilon T]",
}


#: Options of one kind of audit (names of the parsed arguments).
ONE_RUN_ONLY = ("epochs", "batch_size", "target_epsilon", "noise_multiplier", "canaries",
                "canary_kind", "guesses", "l2_norm_clip", "optimizer", "learning_rate",
                "sampling", "accountant")  # fmt: skip
DP_ONLY = ("target_epsilon", "noise_multiplier")  # a conflict with --no-dp


def _given(args: Any, names: tuple[str, ...]) -> list[str]:
    """The options among ``names`` given on the line, spelled as flags."""
    return ["--" + n.replace("_", "-") for n in names if getattr(args, n) is not None]


@magics_class
class AuditMagics(Magics):
    """Membership inference and one-run canary audits."""

    confidence = Float(0.95, help="Confidence of the ε lower bounds").tag(config=True)
    canaries = Integer(1000, help="Canaries of a one-run audit").tag(config=True)
    attack = CaselessStrEnum(
        ("loss", "calibrated"), default_value="loss", help="Membership inference attack"
    ).tag(config=True)

    @magic_arguments()
    @argument("kind", choices=("mia", "one-run"), help="mia (attack a trained model) or one-run")
    @argument("names", nargs="+", help="mia: MODEL X_TRAIN Y_TRAIN X_HOLDOUT Y_HOLDOUT; "
              "one-run: MAKE_MODEL X Y")  # fmt: skip
    @argument("--attack", choices=("loss", "calibrated"), default=None, help="mia attack")
    @argument("--run", default=None, help="mia: the DPFitResult whose proven ε to compare with")
    @argument("--epsilon", type=float, default=None, help="mia: proven ε to compare with")
    @argument("--epochs", type=int, default=None, help="one-run: epochs")
    @argument("--batch-size", type=int, default=None, help="one-run: (expected) batch size")
    @argument("--canaries", type=int, default=None, help="one-run: number of canaries (1000)")
    @argument("--canary-kind", choices=("mislabel", "random"), default=None,
              help="one-run: mislabel (default) or random")  # fmt: skip
    @argument("--no-dp", action="store_true", help="one-run: train without DP (the baseline)")
    @argument("--guesses", type=int, default=None, help="one-run: fix the number of guesses")
    @argument("--target-epsilon", type=float, default=None, help="one-run: calibrate σ to this ε")
    @argument("--noise-multiplier", type=float, default=None, help="one-run: noise multiplier σ")
    @argument("--delta", type=float, default=None, help="δ of the bound (default: the run's)")
    @argument("--l2-norm-clip", type=float, default=None, help="one-run: clipping norm C")
    @argument("--optimizer", default=None, help="one-run: sgd (default), adam, …")
    @argument("--learning-rate", type=float, default=None, help="one-run: learning rate")
    @argument("--sampling", choices=_SAMPLINGS, default=None, help="one-run: poisson or shuffle")
    @argument("--accountant", choices=_ACCOUNTANTS, default=None, help="one-run: pld or rdp")
    @argument("--confidence", type=float, default=None, help="confidence (default 0.95)")
    @argument("--seed", type=int, default=None, help="reproducible canaries/noise (tests only)")
    @argument("-o", "--output", default=None, help="store the result in this variable")
    @line_magic
    @user_errors
    def dp_audit(self, line: str = "") -> Any:
        """Audit privacy empirically: the ε an attack can prove, beside the proven ε.

        A lower bound is evidence, not a guarantee. A one-run bound above the proven ε means a
        bug; a mia bound is heuristic (one trained model): check one above ε with one-run.

        Examples::

            %dp_audit mia model x_train y_train x_test y_test --run run -o report
            %dp_audit mia model x_train y_train x_test y_test --attack calibrated
            %dp_audit one-run make_model x y --epochs 10 --batch-size 256 --target-epsilon 3 --delta 1e-5 -o audit
            %dp_audit one-run make_model x y --epochs 10 --batch-size 256 --no-dp --canaries 500
        """
        args = parse_argstring(self.dp_audit, line)
        if args.output is not None and not args.output.isidentifier():
            raise UsageError(f"-o needs a variable name, got {args.output!r}")
        confidence = self.confidence if args.confidence is None else args.confidence
        if args.kind == "mia":
            result = self._mia(args, confidence)
        else:
            result = self._one_run(args, confidence)
        if args.output is not None:
            self.shell.user_ns[args.output] = result
        return result

    def _names(self, args: Any, count: int) -> list[Any]:
        if len(args.names) != count:
            raise UsageError(
                f"{args.kind} needs {count} variable names, got {len(args.names)}: "
                f"{_USAGE[args.kind]}"
            )
        return [lookup(self.shell, name) for name in args.names]

    def _mia(self, args: Any, confidence: float) -> Any:
        ignored = _given(args, ONE_RUN_ONLY)
        if ignored or args.no_dp:
            flags = ", ".join(ignored) or "--no-dp"
            raise UsageError(f"{flags}: only for one-run (mia audits a model already trained)")
        if args.epsilon is not None and args.delta is None and args.run is None:
            raise UsageError(
                "--epsilon needs --delta, the δ of that guarantee (or --run RUN for both)"
            )
        model, xt, yt, xh, yh = self._names(args, 5)
        from ..audit import membership_inference

        run = None if args.run is None else lookup(self.shell, args.run)
        attack = self.attack if args.attack is None else args.attack
        return membership_inference(
            model, (xt, yt), (xh, yh), attack=attack, confidence=confidence, delta=args.delta,
            epsilon=args.epsilon, run=run, seed=args.seed,
        )  # fmt: skip

    def _one_run(self, args: Any, confidence: float) -> Any:
        if args.epochs is None or args.batch_size is None:
            raise UsageError(f"one-run needs --epochs and --batch-size: {_USAGE['one-run']}")
        if args.run is not None or args.epsilon is not None or args.attack is not None:
            raise UsageError("--run/--epsilon/--attack are for mia; one-run trains its own model")
        dp_flags = _given(args, DP_ONLY)
        if args.no_dp and dp_flags:
            raise UsageError(
                f"--no-dp trains without DP, so {', '.join(dp_flags)} would be ignored: drop "
                f"{'it' if len(dp_flags) == 1 else 'them'}, or drop --no-dp"
            )
        if not args.no_dp and (args.target_epsilon is None) == (args.noise_multiplier is None):
            raise UsageError(
                "one-run needs exactly one of --target-epsilon or --noise-multiplier "
                "(or --no-dp for the non-private baseline)"
            )
        make_model, x, y = self._names(args, 3)
        settings = {
            key: value
            for key, value in (
                ("target_epsilon", args.target_epsilon),
                ("noise_multiplier", args.noise_multiplier),
                ("delta", args.delta),
                ("l2_norm_clip", args.l2_norm_clip),
                ("optimizer", args.optimizer),
                ("learning_rate", args.learning_rate),
                ("sampling", args.sampling),
                ("accountant", args.accountant),
            )  # fmt: skip
            if value is not None
        }
        from ..audit import one_run

        canaries = self.canaries if args.canaries is None else args.canaries
        kind = "mislabel" if args.canary_kind is None else args.canary_kind
        return one_run(
            make_model, x, y, canaries=canaries, epochs=args.epochs, batch_size=args.batch_size,
            private=not args.no_dp, canary_kind=kind, guesses=args.guesses, confidence=confidence,
            seed=args.seed, **settings,
        )  # fmt: skip
