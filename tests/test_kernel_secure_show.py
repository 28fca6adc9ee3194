"""Issue #20 items 6 and 7 in real kernels: decrypted output shown by %secure_show never reaches a
saved notebook; a refused secret line is replaced in the cell's own text; a missing file to
%secure_load with -i is one line."""

from __future__ import annotations

import os

import nbformat
import pytest
from jupyter_client.manager import start_new_kernel
from test_kernel_export import execute

pytestmark = [pytest.mark.kernel, pytest.mark.slow]

# The marker is computed, so it appears only in outputs, never in a cell's source.
MARKER = "ROW-" + str(4321 * 2)
SECRET_CELL = '%%secure_output --to alice\nprint("ROW-" + str(4321 * 2))'


def test_secure_show_leaves_no_plaintext_in_the_saved_notebook(tmp_path, kp_home):
    cells = [
        "%load_ext kprivacy_nb\n%secure_keygen alice",
        SECRET_CELL,
        "%secure_show -i alice --for 1",  # saved (headless) before the timer fires
        "%secure_show -i alice --for 0",  # shown until re-run
        "%secure_load missing.age -i alice",
    ]
    nb = execute(cells, tmp_path, kp_home)
    saved = tmp_path / "saved.ipynb"
    nbformat.write(nb, saved)
    text = saved.read_text()
    assert MARKER not in text  # neither in outputs nor in the widget state nbclient saves
    for cell in nb.cells[2:4]:
        views = [
            o
            for o in cell.outputs
            if "application/vnd.jupyter.widget-view+json" in o.get("data", {})
        ]
        assert len(views) == 1, cell.outputs  # the reveal panel, not the rows
        assert "Show 1 decrypted output(s)" in text
    shown = "".join(o.get("text", "") for o in nb.cells[4].outputs)
    assert shown == "UsageError: cannot read missing.age: No such file or directory\n", shown


def test_reveal_panel_shows_then_takes_the_plaintext_out(ip, kp_home):
    from kprivacy_nb.widgets.reveal import HIDDEN_TEXT, RevealPanel

    panel = RevealPanel([({"text/plain": MARKER}, {})], 0, "1 decrypted output(s)")
    assert MARKER not in repr(panel.get_state()) and not panel.shown
    panel.reveal()  # what a click in a live frontend does
    assert panel.shown and MARKER in repr(panel.output.get_state())
    panel.hide()
    assert not panel.shown and panel.button.description == HIDDEN_TEXT
    assert panel.output.comm is None  # closed: no widget state of it remains to be saved
    panel.reveal()
    assert not panel.shown  # the plaintext is gone from the kernel object too


def test_refused_secret_line_is_replaced_in_the_cell_text(kp_home):
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_CURRENT_TEST"}
    env["KPRIVACY_NB_HOME"] = str(kp_home)
    km, kc = start_new_kernel(kernel_name="python3", env=env)
    try:
        kc.execute_interactive("%load_ext kprivacy_nb", timeout=120)
        cell = "x = 1\n%secure_save x out.age --passphrase hunter2-horse-staple\nprint('after')"
        stderr = []

        def output(msg):
            if msg["msg_type"] == "stream" and msg["content"]["name"] == "stderr":
                stderr.append(msg["content"]["text"])

        reply = kc.execute_interactive(cell, timeout=120, output_hook=output)
        content = reply["content"]
        # JupyterLab applies set_next_input only from an "ok" reply: the refusal must not fail
        # the cell, or the secret would stay in the cell's text and the saved notebook.
        assert content["status"] == "ok"
        said = "".join(stderr)
        assert said.startswith("UsageError: refused") and "hunter2" not in said
        assert "the cell's text was replaced by a copy without that line" in said
        stdout = []
        kc.execute_interactive(
            "import os; print(os.path.exists('out.age'))", timeout=60,
            output_hook=lambda m: stdout.append(m["content"].get("text", "")),
        )  # fmt: skip
        assert "".join(stdout).strip() == "False"  # nothing of the refused line ran
        (payload,) = [p for p in content["payload"] if p["source"] == "set_next_input"]
        assert payload["replace"] is True
        assert payload["text"] == (
            "x = 1\n# %secure_save … — removed by kprivacy_nb: it held a secret\nprint('after')"
        )
        # a line that does not parse might hold a secret in the wrong place: replaced too
        reply = kc.execute_interactive("%secure_load data.age --pass hunter2", timeout=120)
        (payload,) = [p for p in reply["content"]["payload"] if p["source"] == "set_next_input"]
        assert "hunter2" not in payload["text"] and payload["replace"] is True
        # a clean line is left alone
        reply = kc.execute_interactive("%secure_recipients", timeout=120)
        assert reply["content"]["status"] == "ok" and not reply["content"]["payload"]
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
