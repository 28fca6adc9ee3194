"""The widgets in a real browser: JupyterLab on localhost, driven in headless Chromium.

Checks that the budget planner renders and reacts to a slider, that the training monitor
renders, that clicking the export panel's button writes the encrypted file, and that output
decrypted on screen by ``%secure_show`` is not in the notebook the user saves meanwhile. Screenshots go
to ``test-artifacts/``. Needs Debian's ``chromium`` (``.ci/run`` installs it); without it the
test is skipped with a notice — except under CI, where a missing browser is a failure.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from browser_support import chromium_path, jupyter_lab, open_and_run_all
from ci_support import in_ci

pytestmark = [pytest.mark.browser, pytest.mark.slow]

CHROMIUM = chromium_path()
if CHROMIUM is None:
    if in_ci():
        raise RuntimeError("CI is set but chromium is missing: .ci/run must apt-get install it")
    pytest.skip(
        "\n*** BROWSER TEST SKIPPED: chromium is not installed (apt-get install chromium) ***",
        allow_module_level=True,
    )

from playwright.sync_api import expect, sync_playwright  # noqa: E402

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"

CELLS = [
    "%load_ext kprivacy_nb\n%secure_keygen alice",
    "%dp_budget --n 60000 --batch-size 256 --epochs 10 --noise-multiplier 1.1 --accountant rdp",
    "import numpy as np, keras\n"
    "x = np.random.default_rng(0).normal(size=(512, 8)).astype('float32')\n"
    "y = (x[:, 0] > 0).astype('int32')\n"
    "model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(2)])\n"
    "model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),"
    " metrics=['accuracy'])\n"
    "%dp_fit model x y --epochs 3 --batch-size 64 --noise-multiplier 1.0 --accountant rdp -o run",
    "X_share = np.arange(10)\n%secure_export -o exported.age",
    # The marker is computed, so it is in outputs only, never in a cell's source.
    '%%secure_output -r alice\nprint("ROW-" + str(4321 * 2))',
    "%secure_show -i alice --for 0",
    # A secret typed on a magic line: refused, and the cell's text replaced in the editor.
    "%secure_save X_share s.age --passphrase hunter2-horse-staple-42",
]
MARKER = "ROW-" + str(4321 * 2)

# Draw 🔒 with the page's fallback fonts: a colour emoji has coloured pixels, a missing glyph's
# box is drawn in the (black) text colour.
EMOJI_IS_COLOURED = """() => {
  const canvas = document.createElement("canvas");
  canvas.width = canvas.height = 48;
  const g = canvas.getContext("2d");
  g.font = "32px sans-serif";
  g.textBaseline = "top";
  g.fillStyle = "#000";
  g.fillText("\\u{1F512}", 4, 4);
  const d = g.getImageData(0, 0, 48, 48).data;
  for (let i = 0; i < d.length; i += 4) {
    if (d[i + 3] > 128 && Math.max(d[i], d[i + 1], d[i + 2]) - Math.min(d[i], d[i + 1], d[i + 2]) > 60) {
      return true;
    }
  }
  return false;
}"""


def write_notebook(path: Path) -> None:
    import nbformat

    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in CELLS])
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    nbformat.write(nb, path)


def test_widgets_render_and_work_in_jupyterlab(tmp_path, monkeypatch):
    ARTIFACTS.mkdir(exist_ok=True)
    root = tmp_path / "lab"
    root.mkdir()
    write_notebook(root / "ui.ipynb")
    monkeypatch.setenv("KPRIVACY_NB_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MPLBACKEND", raising=False)
    with jupyter_lab(root, tmp_path / "lab.log") as (base, token), sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu",
            "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])  # fmt: skip
        page = browser.new_page(viewport={"width": 1300, "height": 1000})
        try:
            open_and_run_all(page, base, token, "ui.ipynb", timeout_ms=300_000)
            cells = page.locator(".jp-Notebook .jp-CodeCell")
            expect(cells).to_have_count(len(CELLS))

            # The planner rendered, and moving the epochs slider changes the ε shown.
            planner = cells.nth(1).locator(".jp-OutputArea-output")
            summary = planner.locator(".widget-html").filter(has_text="ε =").first
            expect(summary).to_contain_text("10 epochs", timeout=60_000)
            before = summary.inner_text()
            handle = planner.locator(".widget-slider .noUi-handle").first  # the epochs slider
            handle.focus()
            for _ in range(5):
                handle.press("ArrowRight")
            expect(summary).to_contain_text("15 epochs", timeout=30_000)
            after = summary.inner_text()
            eps = [float(t.split("ε = ")[1].split()[0]) for t in (before, after)]
            assert eps[1] > eps[0], (before, after)
            planner.screenshot(path=str(ARTIFACTS / "planner.png"))

            # The training monitor rendered its live figure.
            monitor_img = cells.nth(2).locator(".jp-OutputArea-output img").first
            expect(monitor_img).to_be_visible(timeout=60_000)
            assert monitor_img.evaluate("img => img.naturalWidth") > 100
            cells.nth(2).locator(".jp-OutputArea").screenshot(path=str(ARTIFACTS / "monitor.png"))

            # The export panel: tick an item, pick a recipient, click, and the file appears.
            panel = cells.nth(3).locator(".jp-OutputArea-output")
            panel.locator(".widget-checkbox", has_text="X_share").locator("input").check()
            panel.locator(".widget-select-multiple select").select_option("alice")
            panel.locator("button", has_text="Encrypt & export").click()
            expect(panel.get_by_text("Encrypted export written")).to_be_visible(timeout=60_000)
            panel.screenshot(path=str(ARTIFACTS / "export.png"))
            out = root / "exported.age"
            deadline = time.monotonic() + 10
            while not out.exists() and time.monotonic() < deadline:
                time.sleep(0.2)
            assert out.exists() and out.stat().st_mode & 0o777 == 0o600
            assert out.read_bytes().startswith(b"age-encryption.org/v1\n")

            # %secure_show: a click shows the decrypted output; saving the notebook (Ctrl-S, as
            # a user would, while it is on screen) keeps it out of the file.
            reveal = cells.nth(5).locator(".jp-Cell-outputArea")
            expect(reveal.get_by_text(MARKER)).to_have_count(0)
            reveal.locator("button", has_text="Show 1 decrypted output").click()
            expect(reveal.get_by_text(MARKER)).to_be_visible(timeout=30_000)
            reveal.screenshot(path=str(ARTIFACTS / "reveal.png"))
            saved = root / "ui.ipynb"
            before_save = saved.stat().st_mtime_ns
            cells.nth(5).click()
            page.keyboard.press("Escape")  # command mode, where Ctrl-S saves the notebook
            page.keyboard.press("Control+s")
            deadline = time.monotonic() + 30
            while saved.stat().st_mtime_ns == before_save and time.monotonic() < deadline:
                time.sleep(0.2)
            assert saved.stat().st_mtime_ns != before_save, "the notebook was not saved"
            text_saved = saved.read_text()
            assert "Show 1 decrypted output" in text_saved  # the panel is there, the rows are not
            assert MARKER not in text_saved
            # The refused secret line: gone from the editor and from the saved file.
            expect(cells.nth(6)).to_contain_text("removed by kprivacy_nb: it held a secret")
            assert "hunter2-horse-staple-42" not in text_saved
            assert "removed by kprivacy_nb: it held a secret" in text_saved
            expect(reveal.get_by_text(MARKER)).to_be_visible()  # still on screen after the save

            # The panel's 🔒 is drawn as a colour emoji, not an empty box (needs an emoji font).
            assert page.evaluate(EMOJI_IS_COLOURED), "🔒 rendered as a box: no emoji font"

            text = page.locator(".jp-Notebook").inner_text()
            assert "Error displaying widget" not in text
            assert "Traceback" not in text
        finally:
            page.screenshot(path=str(ARTIFACTS / "notebook.png"), full_page=True)
            browser.close()
