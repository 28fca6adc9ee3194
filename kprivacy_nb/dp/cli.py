"""``kprivacy-nb epsilon | calibrate | curve``: DP-SGD accounting from the command line.

Each subcommand calls the function of the same name in :mod:`kprivacy_nb.dp.accounting`.
With ``--json`` the only stdout line is one JSON object (``{"epsilon": …}``,
``{"noise_multiplier": …, "epsilon": …}``, ``{"epochs": […], "epsilon": […]}``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import warnings
from typing import Any

from .names import ACCOUNTANTS, SAMPLINGS

_SAMPLING_NOTE = {
    "poisson": "Poisson subsampling (amplification by sampling)",
    "shuffle": "shuffled epochs, no amplification claimed (each epoch = one Gaussian release)",
}


def _common(p: argparse.ArgumentParser, *, sigma: bool, epochs_required: bool = True) -> None:
    p.add_argument("--n", type=int, required=True, help="number of training examples")
    p.add_argument("--batch-size", type=int, required=True, help="(expected) batch size")
    p.add_argument("--epochs", type=int, required=epochs_required, help="number of epochs")
    if sigma:
        p.add_argument("--noise-multiplier", type=float, required=True, help="σ (noise / clip)")
    p.add_argument(
        "--delta", type=float, default=None, help="δ (default: the largest power of ten ≤ 1/(10·n))"
    )
    p.add_argument("--sampling", choices=SAMPLINGS, default="poisson")
    p.add_argument("--accountant", choices=ACCOUNTANTS, default="pld")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``epsilon``, ``calibrate`` and ``curve`` to the ``kprivacy-nb`` parser."""
    p = subparsers.add_parser(
        "epsilon",
        help="ε of a DP-SGD run",
        description="ε spent by DP-SGD. Example: kprivacy-nb epsilon --n 60000 --batch-size 256 "
        "--epochs 15 --noise-multiplier 1.1 --delta 1e-5",
    )
    _common(p, sigma=True, epochs_required=False)
    p.add_argument("--steps", type=int, default=None, help="steps actually run (overrides epochs)")
    p.add_argument("--allow-no-noise", action="store_true", help="accept σ = 0 (no privacy: ε = ∞)")
    p.set_defaults(func=cmd_epsilon, quiet_output=True)

    p = subparsers.add_parser(
        "calibrate",
        help="smallest σ reaching a target ε",
        description="Smallest noise multiplier whose ε ≤ the target. Example: kprivacy-nb "
        "calibrate --target-epsilon 1 --n 60000 --batch-size 256 --epochs 15 --delta 1e-5",
    )
    p.add_argument("--target-epsilon", type=float, required=True)
    _common(p, sigma=False)
    p.set_defaults(func=cmd_calibrate, quiet_output=True)

    p = subparsers.add_parser(
        "curve",
        help="ε after each epoch",
        description="ε after each epoch. Example: kprivacy-nb curve --n 60000 --batch-size 256 "
        "--epochs 30 --noise-multiplier 1.1 --delta 1e-5",
    )
    _common(p, sigma=True)
    p.set_defaults(func=cmd_curve, quiet_output=True)


def _emit(args: argparse.Namespace, doc: dict[str, Any], text: str) -> int:
    if args.json:
        print(json.dumps(doc, allow_nan=False))
    else:
        print(text)
    return 0


def _fmt_eps(eps: float) -> str:
    return "∞ (NO PRIVACY: σ = 0)" if math.isinf(eps) else f"{eps:.4f}"


def cmd_epsilon(args: argparse.Namespace) -> int:
    from . import accounting  # lazily: the crypto subcommands don't need it

    delta = accounting.validate(
        args.n,
        args.batch_size,
        epochs=args.epochs,
        steps=args.steps,
        noise_multiplier=args.noise_multiplier,
        delta=args.delta,
        sampling=args.sampling,
        accountant=args.accountant,
        allow_no_noise=args.allow_no_noise,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        eps = accounting.compute_epsilon(
            args.n,
            args.batch_size,
            args.epochs,
            args.noise_multiplier,
            delta,
            steps=args.steps,
            sampling=args.sampling,
            accountant=args.accountant,
        )
    steps = args.steps or args.epochs * accounting.steps_per_epoch(
        args.n, args.batch_size, args.sampling
    )
    if math.isinf(eps):
        print(
            "kprivacy-nb: WARNING: noise multiplier 0 — no privacy at all (ε = ∞)", file=sys.stderr
        )
    doc = {
        "epsilon": None if math.isinf(eps) else eps,
        "delta": delta,
        "steps": steps,
        "noise_multiplier": args.noise_multiplier,
        "sampling": args.sampling,
        "accountant": args.accountant,
    }
    if math.isinf(eps):
        doc["no_privacy"] = True
    text = (
        f"ε = {_fmt_eps(eps)} at δ = {delta:g} after {steps} steps, σ = {args.noise_multiplier:g} "
        f"({args.accountant.upper()}; {_SAMPLING_NOTE[args.sampling]})"
    )
    return _emit(args, doc, text)


def cmd_calibrate(args: argparse.Namespace) -> int:
    from . import accounting  # lazily: the crypto subcommands don't need it

    delta = accounting.validate(
        args.n,
        args.batch_size,
        epochs=args.epochs,
        delta=args.delta,
        sampling=args.sampling,
        accountant=args.accountant,
    )
    sigma = accounting.calibrate_noise(
        args.target_epsilon,
        args.n,
        args.batch_size,
        args.epochs,
        delta,
        sampling=args.sampling,
        accountant=args.accountant,
    )
    eps = accounting.compute_epsilon(
        args.n,
        args.batch_size,
        args.epochs,
        sigma,
        delta,
        sampling=args.sampling,
        accountant=args.accountant,
    )
    steps = args.epochs * accounting.steps_per_epoch(args.n, args.batch_size, args.sampling)
    doc = {
        "noise_multiplier": sigma,
        "epsilon": eps,
        "target_epsilon": args.target_epsilon,
        "delta": delta,
        "steps": steps,
        "sampling": args.sampling,
        "accountant": args.accountant,
    }
    text = (
        f"noise multiplier σ = {sigma:.4f} gives ε = {eps:.4f} ≤ {args.target_epsilon:g} at "
        f"δ = {delta:g} over {steps} steps ({args.accountant.upper()}; "
        f"{_SAMPLING_NOTE[args.sampling]})"
    )
    return _emit(args, doc, text)


def cmd_curve(args: argparse.Namespace) -> int:
    from . import accounting  # lazily: the crypto subcommands don't need it

    accounting.validate(
        args.n,
        args.batch_size,
        epochs=args.epochs,
        noise_multiplier=args.noise_multiplier,
        delta=args.delta,
        sampling=args.sampling,
        accountant=args.accountant,
    )
    curve = accounting.epsilon_curve(
        args.n,
        args.batch_size,
        args.epochs,
        args.noise_multiplier,
        args.delta,
        sampling=args.sampling,
        accountant=args.accountant,
    )
    lines = [
        f"ε per epoch at δ = {curve.delta:g}, σ = {curve.noise_multiplier:g} "
        f"({curve.accountant.upper()}; {_SAMPLING_NOTE[curve.sampling]})",
        "epoch  steps  epsilon",
    ]
    lines += [
        f"{e:5d}  {s:5d}  {_fmt_eps(v)}"
        for e, s, v in zip(curve.epochs, curve.steps, curve.epsilon, strict=True)
    ]
    return _emit(args, curve.to_dict(), "\n".join(lines))
