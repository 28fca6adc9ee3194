"""%%secure_output in a real kernel: the saved notebook carries no plaintext of the output."""

from __future__ import annotations

import base64
import json
import os

import nbformat
import pytest
from nbclient import NotebookClient

from kprivacy_nb.crypto.bundle import OUTPUTS_MIME, decrypt_outputs

pytestmark = [pytest.mark.kernel, pytest.mark.slow]

# The marker is computed, so it appears in the outputs only, never in the cell sources.
SECRET_CELL = """\
%%secure_output --to alice
marker = "PATIENT-" + str(6173 * 2)
print("stdout", marker)
import pandas as pd
import matplotlib.pyplot as plt
display(pd.DataFrame({"id": [marker]}))
fig, ax = plt.subplots(); ax.set_title(marker); ax.plot([1, 2]); display(fig); plt.close(fig)
{"result": marker}
"""
MARKER = "PATIENT-12346"


def execute(cells: list[str], tmp_path, kp_home):
    """Run ``cells`` in a real kernel as a user's would run (fd 1/2 forwarded into cells)."""
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_CURRENT_TEST"}
    env["KPRIVACY_NB_HOME"] = str(kp_home)
    env.pop("MPLBACKEND", None)  # the kernel picks the inline backend, as in Jupyter
    client = NotebookClient(
        nb,
        timeout=300,
        kernel_name="python3",
        allow_errors=True,
        resources={"metadata": {"path": str(tmp_path)}},
    )
    client.execute(env=env)
    return nb


def test_secure_output_keeps_plaintext_out_of_the_notebook(tmp_path, kp_home):
    cells = [
        "%load_ext kprivacy_nb\n%secure_keygen alice",
        SECRET_CELL,
        "print('in Out:', any('PATIENT-' in repr(v) for v in Out.values()), "
        "'| in _:', 'PATIENT-' in repr(_))",
        "%%secure_output --to alice\nraise ValueError('TBLEAK-' + str(6 * 7))",
    ]
    nb = execute(cells, tmp_path, kp_home)
    saved = tmp_path / "saved.ipynb"
    nbformat.write(nb, saved)
    text = saved.read_text()
    assert MARKER not in text
    placeholder = [o for o in nb.cells[1].outputs if OUTPUTS_MIME in o.get("data", {})]
    assert len(placeholder) == 1
    assert "encrypted output — " in placeholder[0]["data"]["text/plain"]
    assert "in Out: False | in _: False" in nb.cells[2].outputs[0]["text"]
    assert "TBLEAK-42" not in text  # the traceback is encrypted, not shown
    shown = "".join(o.get("text", "") for o in nb.cells[3].outputs)
    assert "UsageError: the cell raised ValueError; traceback encrypted" in shown

    armored = placeholder[0]["data"][OUTPUTS_MIME]
    outputs = decrypt_outputs(armored, identities=[kp_home / "keys" / "alice.key"])
    kinds = [o["output_type"] for o in outputs]
    assert kinds.count("display_data") == 2 and "execute_result" in kinds
    everything = json.dumps(outputs)
    assert f"stdout {MARKER}" in everything  # the print
    assert MARKER in outputs[-1]["data"]["text/plain"]  # the cell's value
    assert any("image/png" in o.get("data", {}) for o in outputs)  # the figure
    assert any(MARKER in o.get("data", {}).get("text/html", "") for o in outputs)  # the frame


# Every way of writing to fd 1/2 that bypasses sys.stdout; markers computed, never in the source.
FD_CELL = """\
%%secure_output --to alice
import ctypes, os, subprocess, sys, time
os.system("echo FDLEAK-system-$((40 + 1))")
subprocess.run(["sh", "-c", "echo FDLEAK-subprocess-$((40 + 2)) >&2"], check=True)
print("FDLEAK-dunder-" + str(40 + 3), file=sys.__stdout__)
libc = ctypes.CDLL(None)
libc.puts(b"FDLEAK-clib-" + str(40 + 4).encode())  # C stdio, buffered until flushed
os.write(2, b"FDLEAK-oswrite-" + str(40 + 5).encode() + b"\\n")
time.sleep(0.5)  # ipykernel's watcher thread would forward fd output within this time
"""
FD_MARKERS = ("FDLEAK-system-41", "FDLEAK-subprocess-42", "FDLEAK-dunder-43", "FDLEAK-clib-44")


def test_fd_level_output_is_encrypted_too(tmp_path, kp_home):
    cells = [
        "%load_ext kprivacy_nb\n%secure_keygen alice",
        FD_CELL,
        "import time; time.sleep(0.5); print('after')",
    ]
    nb = execute(cells, tmp_path, kp_home)
    saved = tmp_path / "saved.ipynb"
    nbformat.write(nb, saved)
    text = saved.read_text()
    assert not [m for m in (*FD_MARKERS, "FDLEAK-oswrite-45") if m in text]
    outputs = nb.cells[1].outputs
    assert not any("nothing to encrypt" in o.get("text", "") for o in outputs)
    (placeholder,) = [o for o in outputs if OUTPUTS_MIME in o.get("data", {})]
    assert "encrypted output — 2 item(s)" in placeholder["data"]["text/plain"]
    assert nb.cells[2].outputs[0]["text"] == "after\n"  # fd 1 forwarding works again
    decrypted = decrypt_outputs(
        placeholder["data"][OUTPUTS_MIME], identities=[kp_home / "keys" / "alice.key"]
    )
    streams = {o["name"]: o["text"] for o in decrypted}
    for marker in FD_MARKERS:
        assert marker in streams["stdout"] + streams["stderr"], marker
    assert "FDLEAK-subprocess-42" in streams["stderr"] and "FDLEAK-oswrite-45" in streams["stderr"]


# Written before the cell: a saved stream object and a logging handler holding the old stderr.
BEFORE_CELL = """\
import logging, sys
saved_out = sys.stdout
leaky = logging.getLogger("leaky")
leaky.addHandler(logging.StreamHandler(sys.stderr))
leaky.setLevel(logging.INFO)
leaky.propagate = False
"""
# Every marker is computed, so it is in the outputs only, never in the cell sources.
SIDE_CHANNEL_CELL = """\
%%secure_output --to alice
import threading, time
leaky.info("SIDELEAK-log-" + str(50 + 1))
saved_out.write("SIDELEAK-saved-" + str(50 + 2) + "\\n")
saved_out.flush()
worker = threading.Thread(target=lambda: print("SIDELEAK-thread-" + str(50 + 3)))
worker.start(); worker.join()
late = threading.Thread(target=lambda: (time.sleep(2), print("after the cell")))
late.start()
time.sleep(0.5)  # ipykernel would publish the stream within this time
raise KeyError("SIDELEAK-traceback-" + str(50 + 4))
"""
SIDE_MARKERS = ("SIDELEAK-log-51", "SIDELEAK-saved-52", "SIDELEAK-thread-53")


def test_saved_streams_logging_threads_and_tracebacks_are_encrypted(tmp_path, kp_home):
    cells = [
        "%load_ext kprivacy_nb\n%secure_keygen alice",
        BEFORE_CELL,
        SIDE_CHANNEL_CELL,
        "import time; time.sleep(3); print('next cell')",
    ]
    nb = execute(cells, tmp_path, kp_home)
    saved = tmp_path / "saved.ipynb"
    nbformat.write(nb, saved)
    text = saved.read_text()
    leaked = [m for m in (*SIDE_MARKERS, "SIDELEAK-traceback-54") if m in text]
    assert not leaked, leaked
    outputs = nb.cells[2].outputs
    (placeholder,) = [o for o in outputs if OUTPUTS_MIME in o.get("data", {})]
    notes = "".join(o.get("text", "") for o in outputs if o["output_type"] == "stream")
    assert "1 thread(s) started in this cell are still running" in notes
    assert "the cell raised KeyError; traceback encrypted" in notes
    assert not [o for o in outputs if o["output_type"] == "error"]  # no traceback shown
    decrypted = decrypt_outputs(
        placeholder["data"][OUTPUTS_MIME], identities=[kp_home / "keys" / "alice.key"]
    )
    everything = json.dumps(decrypted)
    for marker in (*SIDE_MARKERS, "SIDELEAK-traceback-54"):
        assert marker in everything, marker
    (tb,) = [o for o in decrypted if o["output_type"] == "error"]
    assert tb["ename"] == "KeyError" and "SIDELEAK-traceback-54" in "".join(tb["traceback"])


def run_in_kernel(cells: list[str], tmp_path, kp_home) -> list[dict]:
    """Each cell's execute_reply and iopub messages, recorded as an attacker's harness would
    (nbclient drops reply payloads; a frontend shows and saves them)."""
    from jupyter_client.manager import start_new_kernel

    env = {k: v for k, v in os.environ.items() if k != "PYTEST_CURRENT_TEST"}
    env["KPRIVACY_NB_HOME"] = str(kp_home)
    env.pop("MPLBACKEND", None)
    km, kc = start_new_kernel(kernel_name="python3", env=env, cwd=str(tmp_path))
    log = []
    try:
        for code in cells:
            msg_id = kc.execute(code, allow_stdin=False)
            reply = kc.get_shell_msg(timeout=120)
            while reply["parent_header"].get("msg_id") != msg_id:
                reply = kc.get_shell_msg(timeout=120)
            iopub = []
            while True:
                msg = kc.get_iopub_msg(timeout=120)
                if msg["parent_header"].get("msg_id") != msg_id:
                    continue
                iopub.append({"type": msg["msg_type"], "content": msg["content"]})
                if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
                    break
            log.append({"reply": reply["content"], "iopub": iopub})
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
    return log


def leaks(entry: dict, marker: str) -> list[str]:
    """Where ``marker`` reached the frontend: any iopub message but the echoed source, or the
    execute_reply (its payloads: pager, set_next_input)."""
    found = [
        m["type"]
        for m in entry["iopub"]
        if m["type"] != "execute_input" and marker in json.dumps(m["content"])
    ]
    return found + (["execute_reply"] if marker in json.dumps(entry["reply"]) else [])


def placeholder_outputs(entry: dict, kp_home) -> list[dict]:
    (armored,) = [
        m["content"]["data"][OUTPUTS_MIME]
        for m in entry["iopub"]
        if m["type"] == "display_data" and OUTPUTS_MIME in m["content"]["data"]
    ]
    return decrypt_outputs(armored, identities=[kp_home / "keys" / "alice.key"])


def notes(entry: dict) -> str:
    return "".join(m["content"].get("text", "") for m in entry["iopub"] if m["type"] == "stream")


# Every marker is computed, so it appears in what the cell writes, never in its source.
SO = "%%secure_output --to alice\n"
UNSERIALISABLE_CELL = (
    SO
    + """\
secret = "VERBOSE-" + str(40 + 1)
print(secret)
from IPython.display import publish_display_data
publish_display_data({"text/plain": "x", "image/png": b"\\x89PNG" + secret.encode()})
class Rows:
    def _repr_mimebundle_(self, **kw):
        return {"application/json": {"rows": {secret}}, "text/plain": "rows"}
Rows()
"""
)
REPR_CELL = (
    SO
    + """\
class Frame:
    def _repr_html_(self):
        detail = "REPR-" + str(40 + 2)
        print(detail)
        raise ValueError(detail)
Frame()
"""
)
PAGER_CELLS = [
    SO + 'patient = "PAGER-" + str(40 + 3)\npatient?',
    SO + 'patient2 = "PAGER-" + str(40 + 4)\n%pinfo patient2',
    SO + 'from IPython.core.page import page\npage("PAGER-" + str(40 + 5))',
    SO + 'get_ipython().set_next_input("PAGER-" + str(40 + 6))',
]
CRAFTED_TYPE_CELL = SO + 'raise type("TYPELEAK" + str(40 + 7), (Exception,), {})()'


def test_verbose_tracebacks_pager_payloads_and_type_names_leak_nothing(tmp_path, kp_home):
    cells = [
        "%load_ext kprivacy_nb\n%secure_keygen alice",
        "%xmode Verbose",  # tracebacks print every frame's locals
        UNSERIALISABLE_CELL,
        REPR_CELL,
        *PAGER_CELLS,
        CRAFTED_TYPE_CELL,
        SO + "raise KeyError('x')",
    ]
    log = run_in_kernel(cells, tmp_path, kp_home)
    markers = ["VERBOSE-41", "REPR-42", *(f"PAGER-{n}" for n in range(43, 47)), "TYPELEAK47"]
    leaked = {m: leaks(entry, m) for m in markers for entry in log[2:] if leaks(entry, m)}
    assert not leaked, str(leaked)

    # 1. bytes and sets don't stop the encryption: they are in the blob, as Jupyter would send.
    outputs = placeholder_outputs(log[2], kp_home)
    (image,) = [o for o in outputs if "image/png" in o.get("data", {})]
    assert base64.b64decode(image["data"]["image/png"]) == b"\x89PNGVERBOSE-41"
    rows = [o.get("data", {}).get("application/json", {}).get("rows") for o in outputs]
    assert ["VERBOSE-41"] in rows
    assert log[2]["reply"]["status"] == "ok"
    # a repr that prints and fails while the value is formatted is captured too
    assert "REPR-42" in json.dumps(placeholder_outputs(log[3], kp_home))

    # 2. pager and set_next_input payloads are encrypted with the outputs, not "nothing".
    for n, entry in zip(range(43, 47), log[4:8], strict=True):
        assert not entry["reply"].get("payload"), entry["reply"]["payload"]
        assert "nothing to encrypt" not in notes(entry)
        assert f"PAGER-{n}" in json.dumps(placeholder_outputs(entry, kp_home))

    # 7. a class the cell made is not named; Python's own exceptions are.
    crafted_reply = log[8]["reply"]
    assert crafted_reply["status"] == "error"
    assert "the cell raised an exception; traceback encrypted" in crafted_reply["evalue"]
    assert "TYPELEAK47" in json.dumps(placeholder_outputs(log[8], kp_home))
    assert "the cell raised KeyError; traceback encrypted" in log[9]["reply"]["evalue"]
