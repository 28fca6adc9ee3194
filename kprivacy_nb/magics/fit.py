"""``%dp_fit``: train a Keras model with DP-SGD from one line.

Thin layer over :func:`kprivacy_nb.dp.trainer.dp_fit`: look the variables up in the notebook
namespace, call ``dp_fit`` with the live monitor, store the :class:`DPFitResult` under ``-o NAME``
and return it (it renders as a privacy card). Settings (``%config FitMagics.accountant = "rdp"``):
``accountant``, ``sampling``, ``optimizer``. TensorFlow is imported on first use only.
"""

from __future__ import annotations

from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring
from traitlets import CaselessStrEnum, Unicode

from ..dp.names import ACCOUNTANTS as _ACCOUNTANTS  # cheap: no dp-accounting import
from ..dp.names import SAMPLINGS as _SAMPLINGS
from ._base import lookup, user_errors


@magics_class
class FitMagics(Magics):
    """DP-SGD training of Keras models."""

    accountant = CaselessStrEnum(
        _ACCOUNTANTS, default_value="pld", help="Accountant for ε (pld or rdp)"
    ).tag(config=True)
    sampling = CaselessStrEnum(
        _SAMPLINGS, default_value="poisson", help="Batch sampling (poisson or shuffle)"
    ).tag(config=True)
    optimizer = Unicode(
        "", help="Default optimizer name (sgd, adam, …); empty: the model's compiled optimizer"
    ).tag(config=True)

    def on_load(self) -> None:
        from ..dp import reporting
        from ..widgets.monitor import auto_monitor

        reporting.default_reporter_factory = auto_monitor

    def on_unload(self) -> None:
        from ..dp import reporting

        reporting.default_reporter_factory = None

    @magic_arguments()
    @argument("model", help="name of the Keras model variable")
    @argument("x", help="name of the training features variable")
    @argument("y", help="name of the training labels variable")
    @argument("--epochs", type=int, required=True, help="number of epochs")
    @argument("--batch-size", type=int, required=True, help="(expected) batch size")
    @argument("--target-epsilon", type=float, default=None, help="calibrate σ to end at this ε")
    @argument("--noise-multiplier", type=float, default=None, help="noise multiplier σ")
    @argument(
        "--delta",
        type=float,
        default=None,
        help="δ (default: the ledger's δ with --ledger, else the largest power of ten ≤ 1/(10·n))",
    )
    @argument(
        "--l2-norm-clip", type=float, default=1.0, help="per-example clipping norm C (default 1.0)"
    )
    @argument(
        "--optimizer", default=None,
        help="sgd, adam, … or a variable name (default: the model's compiled optimizer, else "
        "SGD with learning rate 0.1)",
    )  # fmt: skip
    @argument("--learning-rate", type=float, default=None, help="learning rate")
    @argument("--loss", default=None, help="loss name or variable (default: the compiled loss)")
    @argument("--sampling", choices=_SAMPLINGS, default=None, help="poisson (default) or shuffle")
    @argument("--accountant", choices=_ACCOUNTANTS, default=None, help="pld (default) or rdp")
    @argument("--validation", nargs=2, metavar=("X", "Y"), default=None, help="validation data")
    @argument(
        "--ledger", default=None, help="budget name to charge (refused if it would overspend)"
    )
    @argument(
        "--physical-batch-size", type=int, default=None, metavar="N",
        help="run each batch in micro-batches of at most N rows: the same step in less memory, "
        "a little slower",
    )  # fmt: skip
    @argument("--seed", type=int, default=None, help="reproducible sampling and noise (tests only)")
    @argument(
        "--fresh-data", action="store_true",
        help="this run uses other people's data than the model's earlier private runs (they are "
        "then not composed into its ε; the card says so)",
    )  # fmt: skip
    @argument("--quiet", action="store_true", help="no monitor / log lines")
    @argument("-o", "--output", default=None, help="store the DPFitResult in this variable")
    @line_magic
    @user_errors
    def dp_fit(self, line: str = "") -> Any:
        """Train a Keras model with DP-SGD (per-example clipping + Gaussian noise) and report ε.

        Example::

            %dp_fit model x_train y_train --epochs 10 --batch-size 256 --target-epsilon 3 --delta 1e-5 -o run
            %dp_fit model x_train y_train --epochs 5 --batch-size 128 --noise-multiplier 1.1 --optimizer adam --ledger customers
        """
        args = parse_argstring(self.dp_fit, line)
        if args.output is not None and not args.output.isidentifier():
            raise UsageError(f"-o needs a variable name, got {args.output!r}")
        shell = self.shell
        model, x, y = (lookup(shell, name) for name in (args.model, args.x, args.y))
        optimizer: Any = args.optimizer or self.optimizer or None
        if args.optimizer and args.optimizer.split(".")[0] in shell.user_ns:
            optimizer = lookup(shell, args.optimizer)
        loss: Any = args.loss
        if loss and loss.split(".")[0] in shell.user_ns:
            loss = lookup(shell, loss)
        validation = None
        if args.validation:
            validation = (lookup(shell, args.validation[0]), lookup(shell, args.validation[1]))
        from ..dp.trainer import dp_fit

        before = getattr(model, "privacy", None)
        try:
            result = dp_fit(
                model, x, y, epochs=args.epochs, batch_size=args.batch_size,
                l2_norm_clip=args.l2_norm_clip, noise_multiplier=args.noise_multiplier,
                target_epsilon=args.target_epsilon, delta=args.delta, optimizer=optimizer,
                learning_rate=args.learning_rate, sampling=args.sampling or self.sampling,
                accountant=args.accountant or self.accountant, validation_data=validation,
                ledger=args.ledger, seed=args.seed, verbose=0 if args.quiet else 1, loss=loss,
                fresh_data=args.fresh_data, physical_batch_size=args.physical_batch_size,
            )  # fmt: skip
        except Exception:
            # A run that stopped part-way still has a card (steps run, ε spent): keep it.
            card = getattr(model, "privacy", None)
            if args.output and card is not None and card is not before:
                shell.user_ns[args.output] = card
            raise
        if args.output:
            shell.user_ns[args.output] = result
        return result
