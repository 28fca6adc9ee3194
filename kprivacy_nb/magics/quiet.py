"""``%quiet`` / ``%%quiet``: keep TensorFlow's log noise out of cell output; mask secrets."""

from __future__ import annotations

import functools
from typing import Any

from IPython.core.magic import Magics, line_cell_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring
from traitlets import Bool, Int, Unicode
from traitlets.config import Configurable

from .. import secrets
from ..quiet import QuietController
from ._base import PlainText, user_errors


def _redact_format_data(data: Any) -> Any:
    """Every string in a display's data or metadata masked, however deep: JSON mimetypes
    (``application/json``, pandas' table schema, widget state…) carry nested structures."""
    if isinstance(data, str):
        return secrets.redact(data)
    if isinstance(data, dict):
        return {_redact_format_data(k): _redact_format_data(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return type(data)(_redact_format_data(v) for v in data)
    return data


@magics_class
class QuietMagics(Magics, Configurable):
    """Quiet mode (on by default) and output redaction of secrets the extension has handled."""

    enabled = Bool(True, config=True, help="Hold back TensorFlow/Keras log noise from cell output.")
    max_cells = Int(20, config=True, help="How many cells of held-back lines %quiet --show keeps.")
    tf_log_level = Unicode(
        "1",
        config=True,
        help="TF_CPP_MIN_LOG_LEVEL to set when quiet mode starts before TensorFlow is imported.",
    )

    def __init__(self, shell: Any = None, **kwargs: Any) -> None:
        super().__init__(shell=shell, **kwargs)
        self.controller = QuietController(enabled=self.enabled, max_cells=self.max_cells)
        self._wrapped: list[tuple[Any, str, Any]] = []
        self.observe(self._on_enabled, names="enabled")

    # -- lifecycle -------------------------------------------------------------------------
    def on_load(self) -> None:
        self.controller.install()
        self.shell.events.register("pre_run_cell", self._pre_run_cell)
        self.shell.events.register("post_run_cell", self._post_run_cell)
        self._wrap_output_paths()
        if self.enabled:
            note = self.controller.apply_tf_log_level(self.tf_log_level)
            if note:
                print(f"kprivacy_nb: {note}")

    def on_unload(self) -> None:
        for name, callback in (
            ("pre_run_cell", self._pre_run_cell),
            ("post_run_cell", self._post_run_cell),
        ):
            try:
                self.shell.events.unregister(name, callback)
            except ValueError:
                pass
        for owner, attr, original in reversed(self._wrapped):
            if getattr(owner, attr, None) is not original:
                try:
                    delattr(owner, attr)
                except AttributeError:
                    setattr(owner, attr, original)
        self._wrapped.clear()
        self.controller.uninstall()

    def _wrap_output_paths(self) -> None:
        """Mask registered secrets in rich outputs (display/Out) and tracebacks."""
        formatter = self.shell.display_formatter
        original_format = formatter.format

        @functools.wraps(original_format)
        def format(obj: Any, *args: Any, **kwargs: Any) -> Any:
            result = original_format(obj, *args, **kwargs)
            if isinstance(result, tuple) and len(result) == 2:
                return _redact_format_data(result[0]), _redact_format_data(result[1])
            return result

        formatter.format = format
        self._wrapped.append((formatter, "format", original_format))

        # display(..., raw=True) and publish_display_data() skip the formatter.
        publisher = self.shell.display_pub
        original_publish = publisher.publish

        @functools.wraps(original_publish)
        def publish(data: Any, metadata: Any = None, *args: Any, **kwargs: Any) -> Any:
            return original_publish(
                _redact_format_data(data), _redact_format_data(metadata), *args, **kwargs
            )

        publisher.publish = publish
        self._wrapped.append((publisher, "publish", original_publish))

        # In a kernel, everything it sends goes through its session: widget state (comm
        # messages), help pages (payloads), inspection replies, display ids… are masked there.
        session = getattr(getattr(self.shell, "kernel", None), "session", None)
        if session is not None and callable(getattr(session, "send", None)):
            original_send = session.send

            @functools.wraps(original_send)
            def send(stream: Any, msg_or_type: Any, content: Any = None, *args: Any,
                     **kwargs: Any) -> Any:  # fmt: skip
                if isinstance(msg_or_type, dict):
                    msg_or_type = dict(msg_or_type)
                    for key in ("content", "metadata"):
                        if key in msg_or_type:
                            msg_or_type[key] = _redact_format_data(msg_or_type[key])
                content = _redact_format_data(content)
                if kwargs.get("metadata") is not None:
                    kwargs["metadata"] = _redact_format_data(kwargs["metadata"])
                return original_send(stream, msg_or_type, content, *args, **kwargs)

            session.send = send
            self._wrapped.append((session, "send", original_send))

        original_showtb = self.shell._showtraceback

        @functools.wraps(original_showtb)
        def _showtraceback(etype: Any, evalue: Any, stb: Any) -> Any:
            stb = [secrets.redact(line) for line in stb]
            return original_showtb(etype, secrets.redact(str(evalue)), stb)

        self.shell._showtraceback = _showtraceback
        self._wrapped.append((self.shell, "_showtraceback", original_showtb))

    def _pre_run_cell(self, info: Any = None) -> None:
        count = getattr(self.shell, "execution_count", "?")
        self.controller.start_cell(f"In [{count}]")

    def _post_run_cell(self, result: Any = None) -> None:
        self.controller.end_cell()

    def _on_enabled(self, change: dict) -> None:
        self.controller.enabled = bool(change["new"])

    # -- the magic -------------------------------------------------------------------------
    @magic_arguments()
    @argument(
        "state",
        nargs="?",
        choices=["on", "off", "status"],
        default="status",
        help="turn quiet mode on or off (default: show the status)",
    )
    @argument(
        "--show",
        nargs="?",
        type=int,
        const=5,
        default=None,
        metavar="N",
        help="list what was held back in the last N cells (default 5)",
    )
    @argument("--clear", action="store_true", help="forget what was held back")
    @line_cell_magic
    @user_errors
    def quiet(self, line: str = "", cell: str | None = None) -> Any:
        """Keep TensorFlow/Keras log noise out of cell output (on by default).

        Held back: TensorFlow C++ INFO/WARNING lines (and known-harmless ERROR lines such as
        ``failed call to cuInit`` on a machine without a GPU), ``WARNING:tensorflow`` logger lines,
        library deprecation warnings and Keras progress-bar redraws (each finished bar becomes
        one compact line). Real errors and anything unrecognised still show. Nothing is lost:
        ``%quiet --show`` lists what was held back.

        Examples::

            %quiet                 # status
            %quiet off             # show everything again
            %quiet --show 3        # what was held back in the last 3 cells
            %%quiet                # quiet for one cell, whatever the global setting
            import tensorflow as tf

        Configure the default with ``%config QuietMagics.enabled = False``.
        """
        if cell is not None:
            return self._quiet_cell(cell)
        args = parse_argstring(self.quiet, line)
        if args.clear:
            self.controller.held.clear()
        if args.show is not None:
            # Returned, not printed: printing would send the lines through the filter again.
            return PlainText(self.controller.held.render(args.show))
        if args.state == "on":
            self.enabled = True
            note = self.controller.apply_tf_log_level(self.tf_log_level)
            if note:
                print(f"kprivacy_nb: {note}")
        elif args.state == "off":
            self.enabled = False
            self.controller.restore_tf_log_level()
        if args.state == "status" and not args.clear:
            state = "on" if self.enabled else "off"
            held = self.controller.held.count()
            print(
                f"quiet mode is {state}; {held} line(s) held back in recent cells "
                "(%quiet --show to list them)"
            )
        return None

    def _quiet_cell(self, cell: str) -> Any:
        previous = self.enabled
        self.enabled = True
        try:
            result = self.shell.run_cell(cell, store_history=False)
        finally:
            self.controller.end_cell()
            self.enabled = previous
        if result.error_before_exec or result.error_in_exec:
            return None
        return None
