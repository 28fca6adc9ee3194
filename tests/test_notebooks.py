"""The example notebooks run top to bottom in a real Jupyter kernel and show what they claim.

Every notebook in ``example_notebooks/`` is executed (nbclient + ipykernel, kernel "python3") at CI
size (``KPRIVACY_NB_CI=1``) in a temporary working folder with a temporary ``KPRIVACY_NB_HOME``;
any error fails the test. The quickstart runs through ``python -m kprivacy_nb.demo --small`` so the
``make demo`` path is covered too. Each known notebook then gets checks on what it printed.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nbformat
import pytest
from nbclient import NotebookClient

from kprivacy_nb import demo

from ci_support import in_ci

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK_DIR = ROOT / "example_notebooks"
NOTEBOOKS = sorted(p.name for p in NOTEBOOK_DIR.glob("*.ipynb"))
QUICKSTART = "01_quickstart.ipynb"
EXPECTED = {
    QUICKSTART,
    "02_budget_planning.ipynb",
    "03_secure_sharing.ipynb",
    "04_intrusion_detection.ipynb",
    "05_privacy_audit.ipynb",
}
SECRET_MARKERS = ("AGE-SECRET-KEY-1", "KPRIVACY-SIGNING-KEY-1")
WIDGET_MIME = "application/vnd.jupyter.widget-view+json"
AGE_HEADER = b"age-encryption.org/v1\n"


# ----------------------------------------------------------------------------- helpers


def kernel_env(home: Path) -> dict[str, str]:
    """A user's environment at CI size. ipykernel changes its output capture when it sees
    PYTEST_CURRENT_TEST, and conftest's MPLBACKEND=Agg would hide the inline plots."""
    drop = ("PYTEST_CURRENT_TEST", "MPLBACKEND")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    return env | {"KPRIVACY_NB_CI": "1", "KPRIVACY_NB_HOME": str(home)}


def execute(name: str, workdir: Path, home: Path) -> Any:
    nb = nbformat.read(NOTEBOOK_DIR / name, as_version=4)
    client = NotebookClient(
        nb,
        timeout=600,
        startup_timeout=120,
        kernel_name="python3",
        allow_errors=False,
        resources={"metadata": {"path": str(workdir)}},
    )
    client.execute(env=kernel_env(home))
    return nb


def cell_text(cell: Any) -> str:
    """Everything a code cell showed as text: streams, text/plain, HTML and Markdown."""
    parts = []
    for out in cell.get("outputs", []):
        if out.output_type == "stream":
            parts.append(out.text)
        elif out.output_type in ("execute_result", "display_data"):
            data = out.get("data", {})
            parts += [data[k] for k in ("text/plain", "text/html", "text/markdown") if k in data]
        elif out.output_type == "error":
            parts.append(f"{out.ename}: {out.evalue}")
    return "\n".join(parts)


def code_cell(nb: Any, source_part: str) -> Any:
    """The (first) code cell whose source contains ``source_part``."""
    for cell in nb.cells:
        if cell.cell_type == "code" and source_part in cell.source:
            return cell
    raise AssertionError(f"no code cell contains {source_part!r}")


def mimetypes(cell: Any) -> set[str]:
    return {m for out in cell.get("outputs", []) for m in out.get("data", {})}


def json_line(text: str, key: str) -> dict:
    """The last printed line that is a JSON object containing ``key``."""
    for line in reversed(text.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            obj = json.loads(line)
            if key in obj:
                return obj
    raise AssertionError(f"no JSON line with {key!r} in:\n{text[-2000:]}")


def all_text(nb: Any) -> str:
    return "\n".join(cell_text(c) for c in nb.cells if c.cell_type == "code")


def check_common(nb: Any) -> None:
    """What every executed notebook must satisfy: no errors, no secrets, no tracebacks."""
    text = all_text(nb)
    for marker in SECRET_MARKERS:
        assert marker not in text, f"a secret key ({marker}…) was shown in a cell output"
    assert "Traceback" not in text
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert all(o.output_type != "error" for o in cell.get("outputs", []))


def check_age_file(path: Path) -> None:
    assert path.is_file()
    assert path.read_bytes().startswith(AGE_HEADER)
    assert path.stat().st_mode & 0o077 == 0, "encrypted files are written 0600"


# ----------------------------------------------------------------------------- checks per notebook


def check_budget_planning(nb: Any, workdir: Path) -> None:
    for part in ("planner = %dp_budget", "--noise-multiplier 2.0 --ledger nsl-kdd"):
        assert WIDGET_MIME in mimetypes(code_cell(nb, part)), "the planner widget was not shown"
    moved = cell_text(code_cell(nb, "planner.epochs_slider.value = 20"))
    eps = [float(x) for x in re.findall(r"epochs → ε = ([0-9.]+)", moved)]
    assert len(eps) == 2 and eps[1] > eps[0], moved  # more epochs, same σ → more ε
    assert "%dp_fit model x_train y_train --epochs 20" in moved

    py = cell_text(code_cell(nb, "kprivacy_nb.calibrate_noise("))
    sigma = float(re.search(r"σ = ([0-9.]+) → ε = ([0-9.]+)", py).group(1))
    cli = json_line(cell_text(code_cell(nb, "-m kprivacy_nb calibrate")), "noise_multiplier")
    assert cli["epsilon"] <= 2.0 and abs(cli["noise_multiplier"] - sigma) < 1e-3

    refusal = cell_text(code_cell(nb, "except BudgetExceededError"))
    assert "Run 3 refused:" in refusal and "refused before starting" in refusal, refusal
    assert "budget 'nsl-kdd'" in refusal

    table = cell_text(_ledger_list_cell(nb))
    row = re.search(r"nsl-kdd\s+2\.5\s+([0-9.]+)\s+([0-9.]+)\s+(\d+)", table)
    assert row, table
    spent, left, runs = float(row.group(1)), float(row.group(2)), int(row.group(3))
    assert runs == 2 and spent <= 2.5 and math.isclose(spent + left, 2.5, rel_tol=1e-3)
    # the fitted runs were charged: the per-run ε of both is in the ledger view
    assert "2 run(s)" in cell_text(code_cell(nb, "%dp_ledger show nsl-kdd"))


def _ledger_list_cell(nb: Any) -> Any:
    for cell in nb.cells:
        if cell.cell_type == "code" and cell.source.strip() == "%dp_ledger":
            return cell
    raise AssertionError("no `%dp_ledger` cell")


def check_intrusion_detection(nb: Any, workdir: Path) -> None:
    prep = cell_text(code_cell(nb, "pd.get_dummies(raw_train[col]"))
    assert "features: 118" in prep
    assert "DP-SGD privacy card" in cell_text(code_cell(nb, "%dp_fit detector"))
    card = [c for c in nb.cells if c.cell_type == "code" and c.source.strip() == "run"]
    assert card and "DP-SGD privacy card" in cell_text(card[0])
    assert "poisson" in cell_text(card[0])
    assert "verified" in cell_text(code_cell(nb, "%secure_load ids_detector.age"))
    result = json_line(all_text(nb), "dp_recall")
    assert math.isfinite(result["epsilon"]) and 0 < result["epsilon"] <= 2.0
    for key in ("dp_accuracy", "dp_recall", "non_dp_accuracy", "non_dp_recall"):
        assert 0.5 < result[key] <= 1.0, (key, result)
    assert result["identical_after_load"] is True
    check_age_file(Path(result["export"]))
    assert Path(result["export"]).parent == workdir


def check_secure_sharing(nb: Any, workdir: Path) -> None:
    hidden = code_cell(nb, "%%secure_output -r alice")
    assert "encrypted output" in cell_text(hidden)
    assert "neptune" not in cell_text(hidden) and "ftp_data" not in cell_text(hidden)
    shown = code_cell(nb, "%secure_show -i alice")  # a button: plaintext only on a live click
    assert WIDGET_MIME in mimetypes(shown) and "neptune" not in cell_text(shown)
    assert "signature verified" in cell_text(code_cell(nb, "%secure_load detector.age"))
    forged = cell_text(code_cell(nb, "except SignatureError"))
    assert forged.startswith("Refused:") and "signed by" in forged
    assert WIDGET_MIME in mimetypes(code_cell(nb, "panel = %secure_export"))
    assert "Encrypted export written" in cell_text(code_cell(nb, "panel.export_button.click()"))
    check_age_file(workdir / "share.age")
    if shutil.which("age") or in_ci():  # .ci/run installs the age CLI: in CI it must be there
        opened = cell_text(code_cell(nb, "!age -d -i"))
        assert "kprivacy-nb container v1" in opened, opened
    assert "entry 'sample': numpy.ndarray" in cell_text(code_cell(nb, "kprivacy_nb inspect"))
    assert "bundle round-trips exactly: True" in all_text(nb)


def check_privacy_audit(nb: Any, workdir: Path) -> None:
    result = json_line(all_text(nb), "one_run_no_dp_bound")
    # Without DP the canary audit proves a leak; with DP every bound stays ≤ the proven ε.
    assert result["one_run_no_dp_bound"] > 1.0, result
    assert [r["target"] for r in result["one_run"]] == [1.0, 8.0]  # CI size
    for run in result["one_run"]:
        assert 0 < run["epsilon"] <= run["target"] and not run["contradicts"], run
        assert 0 <= run["bound"] <= run["epsilon"], run
    for key in ("mia_no_dp_auc", "mia_dp_auc"):
        assert 0.3 < result[key] < 0.8, result
    assert 0 < result["mia_dp_epsilon"] <= 3.0
    # The audits went onto the DP runs' cards, and the exported card carries them.
    assert result["mia_dp_attached"] == ["membership_inference"]
    assert result["exported_audits"] == ["one_run"]
    assert result["exported_bound"] == result["one_run"][0]["bound"]
    check_age_file(Path(result["export"]))
    assert Path(result["export"]).parent == workdir
    # The views: ROC + ε plots in every audit card, the figure, the verdicts and the caveat.
    for part in ("mia_baseline = audit.membership_inference", "%dp_audit mia private", "no_dp"):
        html = cell_text(code_cell(nb, part))
        assert "data:image/png;base64," in html and "not a guarantee" in html, part
    assert "proves nothing" in cell_text(code_cell(nb, "%dp_audit mia private"))
    assert "Leak shown" in cell_text(code_cell(nb, "no_dp = audit.one_run"))
    assert "image/png" in mimetypes(code_cell(nb, "plt.subplots"))
    card = cell_text(code_cell(nb, "card = one_runs"))
    assert "DP-SGD privacy card" in card and "audit (one run)" in card, card
    assert "Consistent with the guarantee" in card or "proves nothing" in card, card
    assert "verified" in cell_text(code_cell(nb, "%secure_load audited_detector.age"))


CHECKS: dict[str, Callable[[Any, Path], None]] = {
    "02_budget_planning.ipynb": check_budget_planning,
    "03_secure_sharing.ipynb": check_secure_sharing,
    "04_intrusion_detection.ipynb": check_intrusion_detection,
    "05_privacy_audit.ipynb": check_privacy_audit,
}


# ----------------------------------------------------------------------------- tests


def test_example_notebooks_are_committed_clean() -> None:
    """Committed without outputs, runnable by the kernel `make test` registers."""
    assert EXPECTED <= set(NOTEBOOKS)
    for name in NOTEBOOKS:
        nb = nbformat.read(NOTEBOOK_DIR / name, as_version=4)
        nbformat.validate(nb)
        assert nb.metadata["kernelspec"]["name"] == "python3", name
        assert nb.cells[0].cell_type == "markdown", f"{name} starts without an explanation"
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert cell.outputs == [] and cell.execution_count is None, (
                    f"{name}: outputs not stripped"
                )
        assert "%load_ext kprivacy_nb" in "".join(c.source for c in nb.cells)


@pytest.mark.kernel
@pytest.mark.slow
def test_quickstart_via_demo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """`python -m kprivacy_nb.demo --small` runs 01_quickstart and leaves its artefacts."""
    monkeypatch.delenv("PYTEST_CURRENT_TEST", raising=False)
    out = tmp_path / "demo-output"
    assert demo.main(["--small", "--out", str(out)]) == 0
    printed = capsys.readouterr().out

    summary = json.loads((out / "summary.json").read_text())
    assert math.isfinite(summary["epsilon"]) and 0 < summary["epsilon"] <= 3.0
    assert summary["delta"] == 1e-5
    assert 0.5 < summary["dp_accuracy"] <= 1 and 0.5 < summary["non_dp_accuracy"] <= 1
    plot, model = Path(summary["epsilon_plot"]), Path(summary["encrypted_model"])
    assert plot == out / "quickstart_epsilon.png" and plot.read_bytes()[:4] == b"\x89PNG"
    assert model == out / "quickstart_model.age"
    check_age_file(model)
    for path in (plot, model, out / demo.EXECUTED_NAME):
        assert str(path) in printed
    assert f"ε = {summary['epsilon']:.4f}" in printed

    nb = nbformat.read(out / demo.EXECUTED_NAME, as_version=4)
    check_common(nb)
    assert json_line(all_text(nb), "encrypted_model") == summary
    fit = code_cell(nb, "%dp_fit model x_train")
    assert "image/png" in mimetypes(fit), "the live ε monitor did not render"
    assert "DP-SGD privacy card" in cell_text(fit)
    assert "identical predictions: True" in all_text(nb)
    assert "verified" in cell_text(code_cell(nb, "%secure_load quickstart_model.age"))
    # The keys went to the notebook's sandbox, not to the KPRIVACY_NB_HOME it was started with.
    keys = out / "kprivacy-home" / "keys"
    assert (keys / "analyst.key").is_file() and (keys / "analyst.sign.key").is_file()
    assert not (Path(os.environ["KPRIVACY_NB_HOME"]) / "keys").exists()

    # The model file is a standard age file: an independent implementation opens it.
    import pyrage

    secret = next(
        line for line in (keys / "analyst.key").read_text().splitlines() if line.startswith("AGE-")
    )
    plaintext = pyrage.decrypt(model.read_bytes(), [pyrage.x25519.Identity.from_str(secret)])
    assert len(plaintext) > 1000


@pytest.mark.kernel
@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in NOTEBOOKS if n != QUICKSTART])
def test_notebook_runs(name: str, tmp_path: Path) -> None:
    workdir, home = tmp_path / "work", tmp_path / "home"
    workdir.mkdir()
    home.mkdir(mode=0o700)
    nb = execute(name, workdir, home)
    check_common(nb)
    check = CHECKS.get(name)
    if check is not None:
        check(nb, workdir)
