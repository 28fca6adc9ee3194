"""``%secure_export``, ``%%secure_output``, ``%secure_show``: what leaves the notebook, encrypted.

Thin layer over :mod:`kprivacy_nb.crypto.bundle` and :mod:`kprivacy_nb.widgets.export`.
"""

from __future__ import annotations

import builtins
import html
import json
import secrets as pyrandom
import sys
import threading
from pathlib import Path
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, cell_magic, line_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring
from IPython.display import display, update_display
from IPython.utils.capture import capture_output
from traitlets import Float, List, Unicode

from ..errors import KPrivacyError
from ..notebook_file import find_notebook_path
from ..quiet.fdcapture import FdCapture
from ..quiet.safe_mime import safe_output
from ..quiet.streams import hold_streams, terminal_streams
from ._base import encryption_arguments, lookup, passphrase_from_args, user_errors

WIDGET_MIME = "application/vnd.jupyter.widget-view+json"


def _output_dicts(
    captured: Any, values: list[tuple[dict, dict]], fds: FdCapture
) -> tuple[list[dict], int]:
    """nbformat-style output dicts from a capture; returns them and how many widgets were dropped.

    Python-level and fd-level text of a stream go into one output (fd-level text last).
    """
    outputs: list[dict] = []
    for name, text in (
        ("stdout", captured.stdout + fds.stdout),
        ("stderr", captured.stderr + fds.stderr),
    ):
        if text:
            outputs.append({"output_type": "stream", "name": name, "text": text})
    dropped = 0
    for out in captured.outputs:
        data = dict(out.data)
        if WIDGET_MIME in data:
            dropped += 1
            continue
        outputs.append(
            {"output_type": "display_data", "data": data, "metadata": dict(out.metadata or {})}
        )
    for data, metadata in values:
        outputs.append({"output_type": "execute_result", "data": data, "metadata": metadata})
    return outputs, dropped


class _CapturedRun:
    """What :func:`_run_captured` caught: output dicts (errors included) and loose ends."""

    def __init__(self) -> None:
        self.outputs: list[dict] = []
        self.errors: list[dict] = []
        self.error_types: list[Any] = []
        self.dropped = 0
        self.result: Any = None
        self.still_running: list[threading.Thread] = []

    def discard(self) -> None:
        """Forget everything the cell wrote (after a failure to encrypt it)."""
        self.outputs.clear()
        self.errors.clear()
        self.result = None


def _error_output(etype: Any, evalue: Any, stb: Any) -> dict:
    """An nbformat ``error`` output from what ``shell._showtraceback`` receives."""
    return {
        "output_type": "error",
        "ename": getattr(etype, "__name__", str(etype)),
        "evalue": str(evalue),
        "traceback": [str(line) for line in (stb or [])],
    }


def _is_builtin_exception(etype: Any) -> bool:
    """Whether ``etype`` is one of Python's own exception classes (its name is then no secret;
    a class the cell made can carry any name, so it is never shown)."""
    name = getattr(etype, "__name__", None)
    return isinstance(name, str) and getattr(builtins, name, None) is etype


def _raised_note(error_types: list[Any]) -> str:
    if error_types and all(_is_builtin_exception(t) for t in error_types):
        return "the cell raised " + ", ".join(dict.fromkeys(t.__name__ for t in error_types))
    return "the cell raised an exception"


# Payloads go in the execute_reply, beside the outputs: the pager (obj?, %pinfo, page()) and
# set_next_input carry whatever the cell chose. ask_exit carries nothing of the cell's.
_PASSING_PAYLOADS = ("ask_exit",)


def _take_payloads(shell: Any, before: list[Any]) -> list[dict]:
    """Remove the payloads the cell added from the shell's payload manager; return them."""
    manager = getattr(shell, "payload_manager", None)
    if manager is None:
        return []
    current = list(manager.read_payload())
    added = [p for p in current if not any(p is b for b in before)]
    taken = [p for p in added if p.get("source") not in _PASSING_PAYLOADS]
    if taken:
        manager.clear_payload()
        for p in current:
            if not any(p is t for t in taken):
                manager.write_payload(p, single=False)
    return taken


def _payload_output(payload: dict) -> dict:
    """A captured payload as an output dict (encrypted with the others)."""
    source = payload.get("source")
    if source == "page" and isinstance(payload.get("data"), dict):
        data = dict(payload["data"])
    elif source == "set_next_input":
        data = {"text/plain": f"(the cell set the next input to)\n{payload.get('text', '')}"}
    else:
        data = {"text/plain": f"(payload {source!s})\n{payload!r}"}
    return {"output_type": "display_data", "data": data, "metadata": {}}


def _run_captured(shell: Any, cell: str) -> _CapturedRun:
    """Run ``cell`` with every way it can write captured: ``sys.stdout``/``sys.stderr``, stream
    objects and logging handlers that existed before the cell, fd 1/2 (subprocesses, C code),
    threads writing while the cell runs, displays, pager and set_next_input payloads, the value
    (formatted inside the capture: a repr may print or fail too) and the traceback."""
    run = _CapturedRun()
    values: list[Any] = []
    saved_hook = sys.displayhook
    own_tb = shell.__dict__.get("_showtraceback")
    before = set(threading.enumerate())
    streams = terminal_streams()
    manager = getattr(shell, "payload_manager", None)
    payloads_before = list(manager.read_payload()) if manager is not None else []

    def hook(value: Any) -> None:
        if value is not None:
            values.append(value)

    def keep_traceback(*exc: Any) -> None:
        run.errors.append(_error_output(*exc[:3]))
        run.error_types.append(exc[0])

    formatted: list[tuple[dict, dict]] = []
    with (
        capture_output(stdout=True, stderr=True, display=True) as captured,
        FdCapture() as fds,
        hold_streams({"stdout": sys.stdout, "stderr": sys.stderr}, streams),
    ):
        sys.displayhook = hook
        shell._showtraceback = keep_traceback
        try:
            run.result = shell.run_cell(cell, store_history=False)
            formatted = [shell.display_formatter.format(value) for value in values]
        finally:
            sys.displayhook = saved_hook
            if own_tb is None:
                del shell._showtraceback
            else:
                shell._showtraceback = own_tb
            payloads = _take_payloads(shell, payloads_before)
    run.outputs, run.dropped = _output_dicts(captured, formatted, fds)
    run.outputs += [_payload_output(p) for p in payloads]
    run.outputs += run.errors
    run.still_running = [t for t in threading.enumerate() if t not in before and t.is_alive()]
    return run


def _traceback_text(out: dict) -> str:
    lines = out.get("traceback")
    if isinstance(lines, list) and all(isinstance(x, str) for x in lines) and lines:
        return "\n".join(lines)
    return f"{out.get('ename', 'Error')}: {out.get('evalue', '')}"


def _warn_running_threads(threads: list[threading.Thread]) -> None:
    if threads:
        print(
            f"⚠ {len(threads)} thread(s) started in this cell are still running; what they "
            "write from now on is NOT captured or encrypted (join them inside the cell)"
        )


@magics_class
class ExportMagics(Magics):
    """Encrypted export panel and encrypted cell outputs."""

    default_recipients = List(
        Unicode(), help="Recipients used when a line names none (names or age1… keys)"
    ).tag(config=True)
    show_seconds = Float(
        60.0, help="How long %secure_show leaves decrypted outputs visible (0: until re-run)"
    ).tag(config=True)

    def __init__(self, shell: Any = None, **kwargs: Any) -> None:
        super().__init__(shell=shell, **kwargs)
        self.blobs: dict[str, str] = {}  # id -> armored ciphertext (public)
        self._timers: list[threading.Timer] = []
        self._panels: list[Any] = []  # RevealPanels of %secure_show (hidden on unload)

    def on_unload(self) -> None:
        for timer in self._timers:
            timer.cancel()
        self._timers.clear()
        for panel in self._panels:
            panel.hide()
        self._panels.clear()

    # -- %secure_export ---------------------------------------------------------------------
    @magic_arguments()
    @argument("items", nargs="*", help="variables to export (none: open the export panel)")
    @argument("-o", "--output", metavar="FILE", help="output .age file")
    @encryption_arguments
    @argument("--sign-with", metavar="KEY", help="signing key name or file")
    @argument(
        "--notebook",
        nargs="?",
        const="",
        default=None,
        metavar="PATH",
        help="include this notebook (path found from the frontend if omitted)",
    )
    @argument("--strip-outputs", action="store_true", help="notebook without its outputs")
    @argument("--clear-widget-state", action="store_true", help="notebook without widget state")
    @argument("--force", action="store_true", help="overwrite an existing file")
    @argument("-a", "--armor", action="store_true", help="ASCII-armored output")
    @line_magic
    @user_errors
    def secure_export(self, line: str = "") -> Any:
        """Export several objects (and the notebook) as ONE signed, encrypted age file.

        With no items, shows the one-click export panel. Examples::

            %secure_export
            %secure_export model run X_test -o share.age -r alice --sign-with me
            %secure_export model --notebook --strip-outputs -o share.age -r alice

        Open it with ``secure_load("share.age")`` (a dict-like bundle) or list it with
        ``python -m kprivacy_nb inspect share.age -i KEY``; ``age -d`` opens it too.
        """
        args = parse_argstring(self.secure_export, line)
        from ..crypto.bundle import export_bundle

        ns = self.shell.user_ns
        if not args.items and args.notebook is None:
            from ..widgets.export import ExportPanel

            return ExportPanel(
                ns, notebook_path=find_notebook_path(ns), output=args.output or "export.age"
            )
        if not args.output:
            raise UsageError("say where to write: -o FILE.age")
        items = {name: lookup(self.shell, name) for name in args.items}
        notebook = None
        if args.notebook is not None:
            notebook = args.notebook or find_notebook_path(ns)
            if not notebook:
                raise UsageError(
                    "can't tell which notebook this is; give its path: --notebook PATH.ipynb"
                )
        passphrase = passphrase_from_args(args)
        recipients = args.to or (None if passphrase is not None else self.default_recipients)
        return export_bundle(
            items,
            args.output,
            recipients=recipients or None,
            passphrase=passphrase,
            sign_with=args.sign_with,
            notebook=notebook,
            strip_outputs=args.strip_outputs,
            clear_widget_state=args.clear_widget_state,
            force=args.force,
            armor=args.armor,
        )

    # -- %%secure_output --------------------------------------------------------------------
    @magic_arguments("%secure_output")  # a cell magic: the usage line says %%secure_output
    @encryption_arguments
    @argument("--sign-with", metavar="KEY", help="signing key name or file")
    @cell_magic
    @user_errors
    def secure_output(self, line: str, cell: str) -> None:
        """Run the cell; store and show its outputs ONLY encrypted.

        Everything the cell writes while it runs is captured: stdout/stderr (also through
        stream objects or logging handlers made before the cell, from threads, and what
        subprocesses and C libraries write to file descriptors 1 and 2), rich displays, the
        cell's value and its traceback. It is encrypted as one age blob to the recipients and
        replaced by a placeholder; the saved notebook, ``Out`` and ``_`` never hold the
        plaintext. A cell that raised fails with a one-line "the cell raised an exception;
        traceback encrypted" note (naming the type only for Python's own exception classes).
        Pager output (``obj?``, ``%pinfo``) and ``set_next_input`` are encrypted with the rest. What a thread writes *after* the cell ended is not captured (a note
        says so when threads are still running: join them inside the cell). Example::

            %%secure_output -r alice
            df[df.patient_id == 1234]

        A key holder shows them again (transiently) with ``%secure_show``.
        """
        args = parse_argstring(self.secure_output, line)
        from ..crypto.age import DEFAULT_SCRYPT_WORK_FACTOR
        from ..crypto.bundle import OUTPUTS_MIME, encrypt_outputs
        from ..crypto.envelope import recipients_for
        from ..crypto.signing import load_signing_key

        passphrase = passphrase_from_args(args)
        recipients = args.to or (None if passphrase is not None else self.default_recipients)
        if not recipients and passphrase is None:
            raise UsageError("say who can read the output: -r NAME|age1… or --passphrase")
        # Resolve keys before running the cell, so a typo doesn't run (and lose) the cell.
        recipients_for(recipients or None, passphrase, DEFAULT_SCRYPT_WORK_FACTOR)
        signer = load_signing_key(args.sign_with) if args.sign_with else None
        run = _run_captured(self.shell, cell)
        if not run.outputs:
            if not (run.result.error_before_exec or run.result.error_in_exec):
                print("(the cell produced no output; nothing to encrypt)")
            _warn_running_threads(run.still_running)
            return None
        try:
            armored, shown = encrypt_outputs(
                run.outputs, recipients=recipients or None, passphrase=passphrase, sign_with=signer
            )
        except KPrivacyError:
            run.discard()  # never shown, and gone from this frame before the error is
            raise
        count, dropped, raised = len(run.outputs), run.dropped, bool(run.errors)
        run.discard()  # the plaintext is not needed any more
        blob_id = pyrandom.token_hex(4)
        self.blobs[blob_id] = armored
        who = ", ".join(args.to) if args.to else ("passphrase" if passphrase else ", ".join(shown))
        text = (
            f"🔒 encrypted output — {count} item(s) for {who} "
            f"(id {blob_id}; a key holder runs %secure_show {blob_id})"
        )
        if dropped:
            text += (
                f"\n⚠ {dropped} widget(s) were not included: widget state lives outside the "
                "output and can't be encrypted"
            )
        display(
            {
                "text/plain": text,
                "text/html": f"<div><code>{html.escape(text)}</code></div>",
                OUTPUTS_MIME: armored,
            },
            raw=True,
            metadata={"kprivacy_nb": {"id": blob_id, "recipients": list(shown)}},
        )
        _warn_running_threads(run.still_running)
        if raised:
            raise UsageError(
                f"{_raised_note(run.error_types)}; traceback encrypted (a key holder runs "
                f"%secure_show {blob_id})"
            )
        return None

    # -- %secure_show -----------------------------------------------------------------------
    @magic_arguments()
    @argument("id", nargs="?", help="the id on the placeholder (default: the latest)")
    @argument("-i", "--identity", action="append", default=[], help="identity file or key name")
    @argument(
        "--identity-passphrase-env",
        metavar="VAR",
        help="read the passphrase of an encrypted SSH identity (-i) from $VAR",
    )
    @argument("--passphrase", action="store_true", help="decrypt with a passphrase (prompt)")
    @argument("--passphrase-env", metavar="VAR", help="read the passphrase from $VAR")
    @argument("--verify-with", metavar="PUB", help="require a signature by this key")
    @argument("--notebook", metavar="PATH", help="look for the blob in this saved notebook")
    @argument(
        "--for",
        dest="seconds",
        type=float,
        default=None,
        help="seconds before the plaintext is hidden again (default: %%config setting)",
    )
    @line_magic
    @user_errors
    def secure_show(self, line: str = "") -> None:
        """Decrypt an encrypted cell output and show it for a while, never in the saved notebook.

        In Jupyter the cell shows a "Show" button: a click puts the plaintext in a widget (not
        a cell output, so saving the notebook never stores it; a headless run such as
        ``jupyter nbconvert --execute`` never reveals it) and takes it out again after ``--for``
        seconds (default 60). Keep JupyterLab's "Save Widget State Automatically" off (the
        default): with it on, a save while the output is shown would store it. Unless the
        blob is signed by a trusted signer (``%secure_trust``) or ``--verify-with``, only
        passive content is shown (text, PNG/JPEG, SVG as an image, Markdown without HTML);
        HTML and JavaScript are held back. Example::

            %secure_show 3f2a9c1d -i alice
            %secure_show -i ~/.ssh/id_ed25519 --identity-passphrase-env SSH_PASS
        """
        args = parse_argstring(self.secure_show, line)
        from ..crypto import keys, prompt
        from ..crypto.bundle import open_outputs

        armored = self._find_blob(args.id, args.notebook)
        if args.identity_passphrase_env and not args.identity:
            raise UsageError("--identity-passphrase-env is for an encrypted key given with -i FILE")
        identities = None
        if args.identity:
            source = prompt.source(args.identity_passphrase_env, prompt.IDENTITY_OPTION)
            identities = keys.load_identities(args.identity, passphrase=source)
        passphrase = passphrase_from_args(args)
        outputs, status = open_outputs(
            armored,
            identities=identities,
            passphrase=passphrase,
            verify_with=args.verify_with,
        )
        seconds = self.show_seconds if args.seconds is None else args.seconds
        items: list[tuple[dict, dict]] = []
        held_back: list[str] = []
        for out in outputs:
            if out.get("output_type") == "stream":
                data, metadata = {"text/plain": out.get("text", "")}, {}
            elif out.get("output_type") == "error":
                data, metadata = {"text/plain": _traceback_text(out)}, {}
            else:
                data, metadata = out.get("data", {}), out.get("metadata", {})
            if not status.verified:  # anyone with our public key could have written it
                data, metadata, dropped = safe_output(data, metadata)
                held_back += dropped
            if data:
                items.append((data, metadata))
        if not status.verified:
            note = f"⚠️ {status}"
            if held_back:
                note += (
                    f"; not shown (active content from an unverified blob): "
                    f"{', '.join(sorted(set(held_back)))}"
                )
            print(note)
        if getattr(self.shell, "kernel", None) is not None:
            self._show_unsaved(items, seconds)
        else:
            self._show_for(items, seconds)
        return None

    def _show_unsaved(self, items: list[tuple[dict, dict]], seconds: float) -> None:
        """In Jupyter: a button that reveals the plaintext in a widget, never as a cell output,
        and only on a click in a live frontend (see :mod:`kprivacy_nb.widgets.reveal`)."""
        from ..widgets.reveal import RevealPanel

        panel = RevealPanel(items, seconds, f"{len(items)} decrypted output(s)")
        self._panels.append(panel)
        display(panel)

    def _show_for(self, items: list[tuple[dict, dict]], seconds: float) -> None:
        """Outside Jupyter (no notebook file to save): display, and replace after ``seconds``."""
        ids = []
        for data, metadata in items:
            display_id = pyrandom.token_hex(6)
            ids.append(display_id)
            display(data, raw=True, metadata=metadata, display_id=display_id)
        if seconds and seconds > 0:

            def hide() -> None:
                for display_id in ids:
                    update_display(
                        {"text/plain": "🔒 (decrypted output hidden again)"},
                        raw=True,
                        display_id=display_id,
                    )

            timer = threading.Timer(seconds, hide)
            timer.daemon = True
            timer.start()
            self._timers.append(timer)

    def _find_blob(self, blob_id: str | None, notebook: str | None) -> str:
        from ..crypto.bundle import OUTPUTS_MIME

        if blob_id and blob_id in self.blobs:
            return self.blobs[blob_id]
        if not blob_id and not notebook and self.blobs:
            return list(self.blobs.values())[-1]
        path = notebook or find_notebook_path(self.shell.user_ns)
        if not path:
            raise KPrivacyError(
                "no encrypted output with that id in this session; give the saved notebook: "
                "--notebook PATH.ipynb"
            )
        try:
            nb = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise KPrivacyError(f"cannot read notebook {path}: {exc}") from None
        found = []
        for cell in nb.get("cells", []):
            for out in cell.get("outputs", []):
                data = out.get("data", {})
                meta = out.get("metadata", {}).get("kprivacy_nb", {})
                if OUTPUTS_MIME in data and (not blob_id or meta.get("id") == blob_id):
                    text = data[OUTPUTS_MIME]
                    found.append("".join(text) if isinstance(text, list) else text)
        if not found:
            raise KPrivacyError(f"no encrypted output {blob_id or ''} found in {path}".strip())
        return found[-1]
