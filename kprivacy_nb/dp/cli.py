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
    p.add_argument(
        "--sampling",
        choices=SAMPLINGS,
        default="poisson",
        help="how batches are drawn: poisson (default; amplification by sampling) or shuffle "
        "(no amplification claimed)",
    )
    p.add_argument(
        "--accountant",
        choices=ACCOUNTANTS,
        default="pld",
        help="privacy accountant: pld (default; tighter) or rdp",
    )
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
    p.add_argument("--target-epsilon", type=float, required=True, help="the ε to reach (> 0)")
    _common(p, sigma=False)
    p.set_defaults(func=cmd_calibrate, quiet_output=True)

    p = subparsers.add_parser(
        "curve",
        help="ε after each epoch",
        description="ε after each epoch. Example: kprivacy-nb curve --n 60000 --batch-size 256 "
        "--epochs 30 --noise-multiplier 1.1 --delta 1e-5",
    )
    _common(p, sigma=True)
    p.add_argument("--allow-no-noise", action="store_true", help="accept σ = 0 (no privacy: ε = ∞)")
    p.set_defaults(func=cmd_curve, quiet_output=True)

    register_ledger(subparsers)


def _validate(**kw: Any) -> float:
    """:func:`accounting.validate`, its hints spelled as command-line flags."""
    from ..errors import InvalidParameterError
    from . import accounting

    try:
        return accounting.validate(**kw)
    except InvalidParameterError as exc:
        text = str(exc).replace("allow_no_noise=True", "--allow-no-noise")
        raise InvalidParameterError(text) from None


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

    delta = _validate(
        n=args.n,
        batch_size=args.batch_size,
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

    delta = _validate(
        n=args.n,
        batch_size=args.batch_size,
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

    _validate(
        n=args.n,
        batch_size=args.batch_size,
        epochs=args.epochs,
        noise_multiplier=args.noise_multiplier,
        delta=args.delta,
        sampling=args.sampling,
        accountant=args.accountant,
        allow_no_noise=args.allow_no_noise,
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


# --- kprivacy-nb ledger ---------------------------------------------------------------------------

LEDGER_ACTIONS = ("list", "create", "show", "settle", "cancel", "delete")


def register_ledger(subparsers: argparse._SubParsersAction) -> None:
    """``kprivacy-nb ledger ACTION [NAME]``: the same actions as ``%dp_ledger``."""
    p = subparsers.add_parser(
        "ledger",
        help="named privacy budgets: list, create, show, settle, cancel, delete",
        description="The privacy-budget ledger %dp_ledger and dp_fit(ledger=…) use. Examples: "
        "kprivacy-nb ledger  |  kprivacy-nb ledger create customers --epsilon 8 --delta 1e-5  |  "
        "kprivacy-nb ledger show customers --json  |  kprivacy-nb ledger settle customers --run 7"
        "  |  kprivacy-nb ledger --url postgresql://me@db.internal/privacy",
    )
    p.add_argument(
        "action",
        nargs="?",
        default="list",
        help="list (default), create, show, settle, cancel or delete; a budget name alone "
        "shows that budget",
    )
    p.add_argument("name", nargs="?", help="budget name")
    p.add_argument("--epsilon", type=float, help="create: the ε cap (required)")
    p.add_argument("--delta", type=float, help="create: δ of the budget (required, e.g. 1e-5)")
    p.add_argument(
        "--accountant", choices=ACCOUNTANTS, default="pld", help="create: accountant (default pld)"
    )
    p.add_argument(
        "--run",
        type=int,
        help="settle/cancel: id of a pending run (settle charges all it reserved; cancel only "
        "if you know no step of it ran)",
    )
    p.add_argument("--yes", action="store_true", help="delete: confirm dropping budget and runs")
    p.add_argument(
        "--url",
        help="postgresql://USER@HOST/DB (password from PGPASSWORD or ~/.pgpass), sqlite:///PATH "
        "or a file (default: $KPRIVACY_NB_LEDGER_URL, else the home folder's ledger.sqlite3)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.set_defaults(func=cmd_ledger, quiet_output=True)


def fmt_epsilon(eps: float) -> str:
    return "∞" if math.isinf(eps) else f"{eps:.4g}"


def budgets_text(budgets: list[Any], location: str) -> str:
    """The ledger's budgets as a text table (``%dp_ledger`` / ``kprivacy-nb ledger``)."""
    if not budgets:
        return f"no budgets in {location} (create one: %dp_ledger create NAME --epsilon 8)"
    lines = [f"{'budget':20} {'cap ε':>8} {'spent ε':>9} {'left ε':>8} {'runs':>5} δ"]
    for b in budgets:
        pending = f" (+{b.reserved} reserved)" if b.reserved else ""
        lines.append(
            f"{b.name:20} {b.epsilon_cap:8.4g} {fmt_epsilon(b.spent_epsilon):>9} "
            f"{b.remaining_epsilon:8.4g} {b.runs:5d} {b.delta:g}{pending}"
        )
    return "\n".join(lines)


def budget_text(budget: Any, cumulative: list[tuple[Any, float]]) -> str:
    """One budget and its runs (ε composed after each) as text."""
    b = budget
    lines = [
        f"budget {b.name!r}: cap ε={b.epsilon_cap:g} at δ={b.delta:g} ({b.accountant}); "
        f"spent ε={fmt_epsilon(b.spent_epsilon)}, remaining ε={b.remaining_epsilon:.4g}, "
        f"{b.runs} run(s), {b.reserved} reserved"
    ]
    for rec, eps in cumulative:
        lines.append(f"  #{rec.id} {rec.status:8} ε so far={fmt_epsilon(eps)} {rec.description}")
    return "\n".join(lines)


def _budget_doc(budget: Any, cumulative: list[tuple[Any, float]]) -> dict[str, Any]:
    doc = budget.to_dict()
    doc["runs_detail"] = [
        {
            "id": rec.id,
            "status": rec.status,
            "epsilon_after": None if math.isinf(eps) else eps,
            "description": rec.description,
            "created_at": rec.created_at,
            "settled_at": rec.settled_at,
        }
        for rec, eps in cumulative
    ]
    return doc


def _ledger_url(url: str | None) -> str | None:
    """``--url``; a password in it is masked in anything printed, with a warning."""
    if url:
        from ..secrets import register_secret
        from .ledger_pg import url_password

        password = url_password(url)
        if password:
            register_secret(password)
            print(
                "kprivacy-nb: warning: a password on the command line is visible to other users "
                "and kept in your shell history; use PGPASSWORD or ~/.pgpass instead",
                file=sys.stderr,
            )
    return url


def ledger_action(
    ledger: Any, args: Any, prog: str = "kprivacy-nb ledger"
) -> tuple[Any, list | None]:
    """Do ``args.action`` on ``ledger`` (``%dp_ledger`` and ``kprivacy-nb ledger`` alike);
    return ``(budgets, None)`` to list, or ``(budget, its runs with composed ε)``."""
    from ..errors import InvalidParameterError

    action, name = args.action.lower(), args.name
    if action not in LEDGER_ACTIONS and name is None:
        action, name = "show", args.action  # `ledger NAME` = `ledger show NAME`
    if action not in LEDGER_ACTIONS:
        raise InvalidParameterError(
            f"unknown {prog} action {args.action!r}; use {', '.join(LEDGER_ACTIONS)}"
        )
    if action != "list" and not name:
        raise InvalidParameterError(f"{prog} {action} needs a budget name")
    if action == "list":
        return ledger.budgets(), None
    if action == "create":
        if args.epsilon is None or args.delta is None:
            raise InvalidParameterError(
                f"{prog} create NAME needs --epsilon (the cap) and --delta (e.g. 1e-5)"
            )
        ledger.create(name, args.epsilon, args.delta, accountant=args.accountant or "pld")
        return [ledger.budget(name)], None
    if action in ("settle", "cancel"):
        pending = {r.id: r for r in ledger.runs(name) if r.status == "reserved"}
        if args.run not in pending:
            ids = ", ".join(str(i) for i in pending) or "none"
            raise InvalidParameterError(
                f"give the pending run to {action} with --run ID (pending in {name!r}: {ids})"
            )
        if action == "settle":
            ledger.settle(args.run, pending[args.run].event)
        else:
            ledger.cancel(args.run)
    elif action == "delete":
        if not args.yes:
            ledger.budget(name)  # an unknown name is the clearer error
            raise InvalidParameterError(
                f"deleting {name!r} drops its budget and every run record; repeat with --yes: "
                f"{prog} delete {name} --yes"
            )
        ledger.delete(name)
        return ledger.budgets(), None
    return ledger.budget(name), ledger.cumulative_epsilon(name)


def cmd_ledger(args: argparse.Namespace) -> int:
    from .ledger import Ledger

    with Ledger(_ledger_url(args.url)) as ledger:
        result, runs = ledger_action(ledger, args)
        if runs is None:
            doc = {"ledger": ledger.location, "budgets": [b.to_dict() for b in result]}
            return _emit(args, doc, budgets_text(result, ledger.location))
        return _emit(args, _budget_doc(result, runs), budget_text(result, runs))
