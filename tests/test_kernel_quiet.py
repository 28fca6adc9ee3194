"""Quiet mode in a real Jupyter kernel (nbclient + ipykernel), where fd 1/2 reach the cell."""

from __future__ import annotations

import json
import os

import nbformat
import pytest
from nbclient import NotebookClient

pytestmark = [pytest.mark.kernel, pytest.mark.slow]

TRAIN = """\
import numpy as np, keras
m = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2, activation="softmax")])
m.compile("sgd", "sparse_categorical_crossentropy", metrics=["accuracy"])
h = m.fit(np.random.rand(64, 4), np.random.randint(0, 2, 64), epochs=2, batch_size=16)
"""
FD_WRITES = """\
import os, time
os.write(2, b"I0000 00:00:1795619555.1 77 port.cc:1] fd-level noise line\\n")
os.write(2, b"E0000 00:00:1795619555.2 77 op_kernel.cc:1] fd-level real failure\\n")
time.sleep(0.5)  # ipykernel forwards fd output from a watcher thread: let it arrive in this cell
"""
NOISE_MARKERS = ("oneDNN", "cuda", "absl::InitializeLog", "━", "cuInit", "fd-level noise")


def kernel_env() -> dict[str, str]:
    """The kernel's environment, as a user's would be: ipykernel stops forwarding fd 1/2 into
    cells when it sees PYTEST_CURRENT_TEST, which would hide exactly what is tested here."""
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_CURRENT_TEST"}
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)
    return env


def run(cells: list[str]) -> list[str]:
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
    client = NotebookClient(nb, timeout=300, kernel_name="python3", allow_errors=True)
    client.execute(env=kernel_env())
    texts = []
    for cell in nb.cells:
        parts = []
        for out in cell.outputs:
            if out.output_type == "stream":
                parts.append(out.text)
            elif out.output_type == "error":
                parts.append(f"{out.ename}: {out.evalue}")
            elif "text/plain" in out.get("data", {}):
                parts.append(out.data["text/plain"])
        texts.append("".join(parts))
    return texts


def test_quiet_on_holds_back_tensorflow_noise_but_not_errors():
    out = run(["%load_ext kprivacy_nb", TRAIN, FD_WRITES, "1/0", "%quiet --show 10"])
    load, train, fd, error, show = out
    assert load == ""
    for marker in NOISE_MARKERS:
        assert marker not in train + fd, f"noise {marker!r} reached the cell"
    assert "Epoch 1/2 · 4/4" in train and "Epoch 2/2 · 4/4" in train
    assert "fd-level real failure" in fd
    assert "ZeroDivisionError" in error
    assert "fd-level noise line" in show  # nothing lost
    assert "oneDNN" in show or "cuda" in show


def test_quiet_off_lets_the_noise_through():
    # Proves the filter is what removes it: same cells, quiet mode off before TF is imported.
    out = run(["%load_ext kprivacy_nb\n%quiet off", TRAIN, FD_WRITES])
    _, train, fd = out
    assert "━" in train
    assert "fd-level noise line" in fd
    assert any(m in train for m in ("oneDNN", "cuda", "absl::InitializeLog", "cuInit"))


RICH_SECRET = """\
from kprivacy_nb.secrets import register_secret
register_secret("correcthorse9")
from IPython.display import JSON, display
import pandas as pd
display(JSON({"k": "correcthorse9", "nested": ["x correcthorse9"]}))
display({"application/json": {"a": "correcthorse9"}, "image/svg+xml": "<svg>correcthorse9</svg>",
         "text/plain": "ok"}, raw=True)
pd.set_option("display.html.table_schema", True)
display(pd.DataFrame({"c": ["correcthorse9"]}))
"""


def test_multi_line_output_keeps_its_order_and_json_outputs_are_masked():
    # With ipykernel 7, a filtered line was filtered twice and the held partial line came first:
    # print("a\nb\nc") showed "ca\nb\n". And secrets were masked in text outputs only, not in
    # JSON (application/json, pandas' table schema) nor in display(..., raw=True).
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in [
        "%load_ext kprivacy_nb", 'print("a\\nb\\nc")\nprint("p1\\np2", end="")\nprint(" tail")',
        RICH_SECRET,
    ]])  # fmt: skip
    NotebookClient(nb, timeout=300, kernel_name="python3").execute(env=kernel_env())
    printed = "".join(out.text for out in nb.cells[1].outputs if out.output_type == "stream")
    assert printed == "a\nb\nc\np1\np2 tail\n"
    rich = json.dumps(nb.cells[2].outputs)
    assert len(nb.cells[2].outputs) == 3 and "correcthorse9" not in rich
    assert rich.count("***") >= 5


def test_widget_state_help_pages_and_inspection_are_masked_too():
    # Everything a kernel sends goes through its session: ipywidgets' state (comm messages),
    # `pw?` (a help payload in the execute reply) and Shift-Tab inspection showed the secret.
    from jupyter_client.manager import start_new_kernel

    manager, client = start_new_kernel(kernel_name="python3", env=kernel_env())
    seen = []

    def run(code):
        msg_id = client.execute(code)
        while True:
            msg = client.get_iopub_msg(timeout=120)
            seen.append(msg["content"])
            state = msg["content"].get("execution_state")
            if state == "idle" and msg["parent_header"].get("msg_id") == msg_id:
                break
        seen.append(client.get_shell_msg(timeout=120)["content"])

    try:
        run("%load_ext kprivacy_nb")
        run(
            "from kprivacy_nb.secrets import register_secret\nregister_secret('correct' + 'horse9')"
        )
        run("import ipywidgets as w\npw = 'correct' + 'horse9'\nlabel = w.Label(value=pw)\n"
            "display(label)\ntext = w.Text(value='a')\ndisplay(text)\ntext.value = pw")  # fmt: skip
        run("pw?")
        client.inspect("pw", detail_level=1)
        seen.append(client.get_shell_msg(timeout=120)["content"])
    finally:
        manager.shutdown_kernel(now=True)
    sent = json.dumps(seen)
    assert "comm_open" in sent or '"state"' in sent  # the widgets were sent
    assert "correcthorse9" not in sent
