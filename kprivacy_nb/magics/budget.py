"""``%dp_budget`` (the planner widget) and ``%dp_ledger`` (named privacy budgets).

Thin layer: parse the line, call :mod:`kprivacy_nb.dp.ledger` / :mod:`kprivacy_nb.widgets.planner`,
return a result object that renders itself. Settings (``%config BudgetMagics.accountant = "rdp"``):
``accountant``, ``sampling``, ``ledger_path``, ``debounce``. Heavy imports happen on first use, so
``%load_ext`` stays fast.
"""

from __future__ import annotations

import base64
import html
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring
from traitlets import CaselessStrEnum, Float, Unicode

from ..dp.cli import fmt_epsilon as _fmt  # cheap: no dp-accounting import
from ..dp.names import ACCOUNTANTS as _ACCOUNTANTS  # cheap: no dp-accounting import
from ..dp.names import SAMPLINGS as _SAMPLINGS
from ._base import user_errors


def _bar(fraction: float, width: int = 160) -> str:
    fraction = max(0.0, min(1.0, fraction))
    color = "#2a9d8f" if fraction < 0.75 else ("#e9c46a" if fraction < 1 else "#e76f51")
    return (
        f"<div style='width:{width}px;height:10px;background:#eee;border-radius:3px'>"
        f"<div style='width:{fraction * width:.0f}px;height:10px;background:{color};"
        "border-radius:3px'></div></div>"
    )


class LedgerTable:
    """``%dp_ledger``: every budget with spent / remaining ε, runs and a usage bar."""

    def __init__(self, budgets: list[Any], location: str) -> None:
        self.budgets = budgets
        self.location = location

    def __repr__(self) -> str:
        from ..dp.cli import budgets_text

        return budgets_text(self.budgets, self.location)

    def _repr_html_(self) -> str:
        if not self.budgets:
            return f"<p>No budgets in <code>{html.escape(self.location)}</code>.</p>"
        rows = []
        for b in self.budgets:
            pending = f" <small>(+{b.reserved} reserved)</small>" if b.reserved else ""
            rows.append(
                f"<tr><td><b>{html.escape(b.name)}</b></td><td>{b.epsilon_cap:.4g}</td>"
                f"<td>{b.delta:g}</td><td>{_fmt(b.spent_epsilon)}</td>"
                f"<td>{b.remaining_epsilon:.4g}</td><td>{b.runs}{pending}</td>"
                f"<td>{_bar(b.fraction_used)}</td></tr>"
            )
        return (
            "<table><thead><tr><th>budget</th><th>cap ε</th><th>δ</th><th>spent ε</th>"
            "<th>remaining ε</th><th>runs</th><th>used</th></tr></thead><tbody>"
            + "".join(rows)
            + f"</tbody></table><small>ledger: {html.escape(self.location)}; spent = "
            "composition of all runs' DP events, not a sum</small>"
        )


class BudgetView:
    """``%dp_ledger show NAME [--plot]``: one budget and its runs (cumulative ε per run)."""

    def __init__(self, budget: Any, cumulative: list[tuple[Any, float]], plot: bool) -> None:
        self.budget = budget
        self.cumulative = cumulative
        self.figure = self._figure() if plot else None

    def _figure(self) -> Any:
        from matplotlib.figure import Figure

        fig = Figure(figsize=(5.5, 2.8), dpi=72)
        ax = fig.add_subplot(1, 1, 1)
        xs = list(range(1, len(self.cumulative) + 1))
        ax.step(xs, [eps for _, eps in self.cumulative], where="post", marker="o", label="spent ε")
        ax.axhline(self.budget.epsilon_cap, color="tab:red", ls="--", label="cap")
        ax.set_xlabel("run")
        ax.set_ylabel("ε (composed)")
        ax.set_ylim(0, self.budget.epsilon_cap * 1.15)
        ax.legend(loc="upper left", fontsize=8)
        ax.set_title(f"budget {self.budget.name!r}", fontsize=9)
        return fig

    def __repr__(self) -> str:
        from ..dp.cli import budget_text

        return budget_text(self.budget, self.cumulative)

    def _repr_html_(self) -> str:
        b = self.budget
        head = (
            f"<p><b>{html.escape(b.name)}</b>: cap ε = {b.epsilon_cap:g} at δ = {b.delta:g} "
            f"({b.accountant.upper()}); spent ε = {_fmt(b.spent_epsilon)}, remaining ε = "
            f"{b.remaining_epsilon:.4g}</p>{_bar(b.fraction_used, 240)}"
        )
        rows = "".join(
            f"<tr><td>{rec.id}</td><td>{rec.status}</td><td>{_fmt(eps)}</td>"
            f"<td>{html.escape(rec.description)}</td><td>{html.escape(rec.created_at)}</td></tr>"
            for rec, eps in self.cumulative
        )
        table = (
            "<table><thead><tr><th>run</th><th>status</th><th>ε after this run</th>"
            f"<th>description</th><th>when</th></tr></thead><tbody>{rows}</tbody></table>"
        )
        img = ""
        if self.figure is not None:
            from ..widgets._common import figure_png

            data = base64.b64encode(figure_png(self.figure)).decode()
            img = f"<img src='data:image/png;base64,{data}'/>"
        return head + table + img


@magics_class
class BudgetMagics(Magics):
    """Privacy budgets: the planner widget and the persistent ledger."""

    accountant = CaselessStrEnum(
        _ACCOUNTANTS, default_value="pld", help="Accountant for the planner (pld or rdp)"
    ).tag(config=True)
    sampling = CaselessStrEnum(
        _SAMPLINGS, default_value="poisson", help="Sampling assumed by the planner"
    ).tag(config=True)
    ledger_path = Unicode(
        "",
        help="Ledger file or URL (postgresql://…, sqlite:///…); empty = KPRIVACY_NB_LEDGER_URL, "
        "else KPRIVACY_NB_HOME/ledger.sqlite3",
    ).tag(config=True)
    debounce = Float(0.3, help="Seconds to wait after the last slider change before redrawing").tag(
        config=True
    )

    def _ledger(self, url: str | None = None) -> Any:
        from ..dp.ledger import Ledger

        if url:
            from .. import secrets
            from ..dp.ledger_pg import url_password

            password = url_password(url)
            if password:
                from ._base import Refused, scrub_line

                secrets.register_secret(password)  # masked if anything prints it later
                raise Refused(
                    "refused: the --url has a password in it, and secrets never go on a magic "
                    "line (the line was removed from the input history). Leave it out and let "
                    "PostgreSQL find it in PGPASSWORD or ~/.pgpass, or set the whole URL in "
                    "KPRIVACY_NB_LEDGER_URL (%env) and drop --url",
                    scrub_line(self.shell, url),
                )
        return Ledger(url or self.ledger_path or None)

    @magic_arguments()
    @argument("--n", type=int, default=60000, help="number of training examples")
    @argument("--batch-size", type=int, default=256, help="(expected) batch size")
    @argument("--epochs", type=int, default=15, help="epochs")
    @argument("--noise-multiplier", type=float, default=None, help="noise multiplier σ")
    @argument("--target-epsilon", type=float, default=None, help="plan for this ε instead of σ")
    @argument(
        "--delta", type=float, default=None, help="δ (default: the largest power of ten ≤ 1/(10·n))"
    )
    @argument("--accountant", choices=_ACCOUNTANTS, default=None, help="pld (default) or rdp")
    @argument("--sampling", choices=_SAMPLINGS, default=None, help="poisson (default) or shuffle")
    @argument("--ledger", default=None, help="budget name to draw the remaining ε of")
    @argument("--model", default="model", help="variable name used in the %%dp_fit line")
    @argument("--x", default="x", help="features variable name for the %%dp_fit line")
    @argument("--y", default="y", help="labels variable name for the %%dp_fit line")
    @line_magic
    @user_errors
    def dp_budget(self, line: str = "") -> Any:
        """Open the privacy-budget planner: ε vs epoch, calibrated σ, a %dp_fit line.

        Example::

            %dp_budget --n 60000 --batch-size 256 --epochs 15 --noise-multiplier 1.1
            %dp_budget --n 60000 --batch-size 256 --epochs 30 --target-epsilon 3 --ledger customers
        """
        args = parse_argstring(self.dp_budget, line)
        from ..widgets.planner import BudgetPlanner

        if args.noise_multiplier is not None and args.target_epsilon is not None:
            raise UsageError("give --noise-multiplier or --target-epsilon, not both")
        return BudgetPlanner(
            n=args.n,
            batch_size=args.batch_size,
            epochs=args.epochs,
            noise_multiplier=args.noise_multiplier if args.noise_multiplier is not None else 1.1,
            target_epsilon=args.target_epsilon,
            delta=args.delta,
            accountant=args.accountant or self.accountant,
            sampling=args.sampling or self.sampling,
            ledger=args.ledger,
            ledger_obj=self._ledger() if (args.ledger or self.ledger_path) else None,
            debounce=self.debounce,
            model=args.model,
            x=args.x,
            y=args.y,
        )

    @magic_arguments()
    @argument(
        "action",
        nargs="?",
        default="list",
        help="list (default), create, show, settle, cancel or delete; a budget name alone "
        "shows that budget",
    )
    @argument("name", nargs="?", default=None, help="budget name")
    @argument("--epsilon", type=float, default=None, help="create: the ε cap")
    @argument("--delta", type=float, default=None, help="create: δ of the budget")
    @argument("--accountant", choices=_ACCOUNTANTS, default=None, help="create: accountant")
    @argument("--plot", action="store_true", help="show: plot cumulative ε per run")
    @argument("--yes", action="store_true", help="delete: confirm deleting the budget and runs")
    @argument("--run", type=int, default=None, help="settle/cancel: id of a run left pending")
    @argument(
        "--url",
        default=None,
        help="ledger to use: postgresql://USER@HOST/DB (password from PGPASSWORD or ~/.pgpass), "
        "sqlite:///PATH or a file; default KPRIVACY_NB_LEDGER_URL, else the home folder",
    )
    @line_magic
    @user_errors
    def dp_ledger(self, line: str = "") -> Any:
        """Privacy-budget ledger: list, create, show, settle, cancel or delete named budgets.

        Examples::

            %dp_ledger                                      # table of budgets
            %dp_ledger create customers --epsilon 8 --delta 1e-5
            %dp_ledger show customers --plot
            %dp_ledger customers                            # the same as show customers
            %dp_ledger settle customers --run 7              # a run a crashed kernel left
            %dp_ledger cancel customers --run 8              # one you know never trained
            %dp_ledger delete customers --yes
            %dp_ledger --url postgresql://me@db.internal/privacy   # the team's ledger

        ``settle`` records a pending reservation (say, of a kernel that died mid-training) as
        fully spent: nobody knows how many of its steps ran, so the conservative answer is all.
        ``cancel`` releases it as unspent: only for a run you know took no step.
        """
        args = parse_argstring(self.dp_ledger, line)
        from ..dp.cli import ledger_action

        args.accountant = args.accountant or self.accountant
        with self._ledger(args.url) as ledger:
            result, runs = ledger_action(ledger, args, prog="%dp_ledger")
            if runs is None:
                return LedgerTable(result, ledger.location)
            return BudgetView(result, runs, args.plot)
