"""Line filters for cell output: TensorFlow/Keras noise held back, secrets masked.

The filter sits in a text stream's ``write``. Text is cut into lines (per writing thread, so the
kernel's fd-watcher thread and Python ``print`` calls never mix halves of lines). Each complete
line is classified:

* ``noise`` — TensorFlow/absl C++ log lines at INFO/WARNING level, known-benign ERROR lines
  (``failed call to cuInit`` on a CPU-only machine…), Python ``WARNING:tensorflow:`` logger lines,
  library deprecation warnings, Keras progress-bar redraws. Held back in a bounded buffer.
* ``progress`` — the final state of a Keras progress bar: replaced by one compact line.
* ``keep`` — everything else, including real errors and anything not recognised.

No IPython imports here: :mod:`kprivacy_nb.quiet.install` wires this to the kernel's streams.
"""

from __future__ import annotations

import logging
import re
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from ..secrets import redact

ANSI_RE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")

# glog/absl C++ prefix: "W0000 00:00:1732550000.123456   1234 file.cc:12] message"
_ABSL_RE = re.compile(r"^([IWEF])\d{4} \d\d:\d\d:\d+\.\d+\s+\d+\s+\S+:\d+\]\s?(.*)$")
# Older TF C++ format: "2024-01-01 12:00:00.123456: W tensorflow/core/...] message"
_TFLOG_RE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+: ([IWEF]) \S+\]\s?(.*)$")
# Python logging default format from TF/absl/Keras loggers.
_PYLOG_RE = re.compile(
    r"^(DEBUG|INFO|WARNING|WARN):(tensorflow|absl|keras|h5py|jax|tf_keras|root:TF)\b"
)
# warnings.showwarning: "path/file.py:12: SomeWarning: message"
_WARNING_RE = re.compile(r"^(\S.*?):\d+: (\w*Warning): ")
_NOISY_WARNING_PATH = re.compile(
    r"(tensorflow|keras|absl|google[/\\]protobuf|ml_dtypes|h5py|tf_keras|optree|jupyter_client)"
)
_NOISY_WARNING_CATEGORIES = {"DeprecationWarning", "PendingDeprecationWarning", "FutureWarning"}

# Lines TensorFlow prints without a log prefix, or ERROR lines known to be harmless here.
_BENIGN = re.compile(
    "|".join(
        [
            r"All log messages before absl::InitializeLog\(\) is called are written to STDERR",
            r"oneDNN custom operations are on",
            r"TF_ENABLE_ONEDNN_OPTS",
            r"This TensorFlow binary is optimized to use available CPU instructions",
            r"To enable the following instructions: .* rebuild TensorFlow",
            r"Could not find cuda drivers on your machine",
            r"failed call to cuInit",
            r"Unable to register cu(DNN|FFT|BLAS) factory",
            r"Attempting to register factory for plugin",
            r"computation placer already registered",
            r"TF-TRT Warning",
            r"could not open file to read NUMA node",
            r"Your kernel may have been built without NUMA support",
            r"cuda_executor\.cc|cuda_diagnostics|cuda_dnn\.cc|cuda_fft\.cc|cuda_blas\.cc",
            r"Created device /job:localhost",
            r"XLA service .* initialized for platform",
            r"StreamExecutor device \(\d+\)",
            r"Compiled cluster using XLA",
            r"disabling MLIR crash reproducer",
            r"Local rendezvous is aborting with status: OUT_OF_RANGE: End of sequence",
            r"kernel driver does not appear to be running on this host",
            r"retrieving CUDA diagnostic information for host",
            r"hostname: \S+$",
            # dp-accounting's RDP accountant drops an order it can't evaluate (conservative).
            r"_compute_log_a_frac failed to converge .* Excluding this order",
        ]
    )
)
# Python log records known to be harmless, held back before any handler formats them:
# (logger name, message pattern).
_LOG_NOISE = (("absl", re.compile(r"_compute_log_a_frac failed to converge")),)
_PROGRESS_RE = re.compile(r"^\s*(\d+)/(\d+) ━+\s*(.*)$")
_EPOCH_RE = re.compile(r"^Epoch \d+/\d+$")


def strip_ansi(text: str) -> str:
    return ANSI_RE.sub("", text)


def classify(line: str) -> str:
    """Return ``"noise"``, ``"progress"`` (a finished Keras bar), ``"warning"`` or ``"keep"``."""
    plain = strip_ansi(line).strip()
    if not plain:
        return "keep"
    m = _PROGRESS_RE.match(plain)
    if m:
        return "progress" if m.group(1) == m.group(2) else "noise"
    m = _ABSL_RE.match(plain) or _TFLOG_RE.match(plain)
    if m:
        level, message = m.group(1), m.group(2)
        if level in "IW" or (level == "E" and _BENIGN.search(message)):
            return "noise"
        return "keep"
    if _BENIGN.search(plain):
        return "noise"
    if _PYLOG_RE.match(plain):
        return "noise"
    m = _WARNING_RE.match(plain)
    if m and (m.group(2) in _NOISY_WARNING_CATEGORIES or _NOISY_WARNING_PATH.search(m.group(1))):
        return "warning"
    return "keep"


def compact_progress(line: str, epoch: str | None) -> str:
    """``32/32 ━━━━ 1s 3ms/step - loss: 0.3`` → ``Epoch 1/3 · 32/32 · 1s 3ms/step - loss: 0.3``."""
    m = _PROGRESS_RE.match(strip_ansi(line).strip())
    assert m is not None
    text = f"{m.group(1)}/{m.group(2)} · {m.group(3).strip()}"
    return f"{epoch} · {text}" if epoch else text


@dataclass
class HeldBack:
    """Bounded record of what was held back, grouped by cell."""

    max_cells: int = 20
    max_lines_per_cell: int = 400
    cells: deque = field(default_factory=deque)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start_cell(self, label: str) -> None:
        with self._lock:
            self.cells.append([label, [], 0])
            while len(self.cells) > self.max_cells:
                self.cells.popleft()

    def add(self, stream: str, line: str) -> None:
        with self._lock:
            if not self.cells:
                self.cells.append(["(before first cell)", [], 0])
            entry = self.cells[-1]
            if len(entry[1]) < self.max_lines_per_cell:
                entry[1].append(f"[{stream}] {redact(strip_ansi(line))}")
            else:
                entry[2] += 1

    def count(self) -> int:
        with self._lock:
            return sum(len(c[1]) + c[2] for c in self.cells)

    def render(self, last: int | None = None) -> str:
        with self._lock:
            cells = [c for c in self.cells if c[1] or c[2]]
            if last is not None:
                cells = cells[-last:]
            if not cells:
                return "Nothing was held back."
            out = []
            for label, lines, dropped in cells:
                out.append(f"── {label}: {len(lines) + dropped} line(s) held back")
                out.extend("   " + line for line in lines)
                if dropped:
                    out.append(f"   … and {dropped} more (buffer limit)")
            return "\n".join(out)

    def clear(self) -> None:
        with self._lock:
            self.cells.clear()


class _ThreadState:
    __slots__ = ("buffer", "skip_source_line", "epoch", "open_line", "redraw")

    def __init__(self) -> None:
        self.buffer = ""
        self.skip_source_line = False
        self.epoch: str | None = None
        self.open_line = False  # part of the current line was already released by flush()
        self.redraw = False  # the current line was redrawn (\r) since then


class LineFilter:
    """Filter text written to one stream; ``emit`` receives what may reach the cell.

    ``enabled()`` is consulted per line, so turning quiet mode off takes effect at once. Secrets
    are redacted whether or not quiet mode is on.
    """

    def __init__(
        self,
        name: str,
        emit: Callable[[str], object],
        held: HeldBack,
        enabled: Callable[[], bool],
    ) -> None:
        self.name = name
        self._emit = emit
        self._held = held
        self._enabled = enabled
        self._lock = threading.RLock()
        self._states: dict[int, _ThreadState] = {}

    def _state(self) -> _ThreadState:
        key = threading.get_ident()
        st = self._states.get(key)
        if st is None:
            st = self._states[key] = _ThreadState()
        return st

    def write(self, text: str) -> int:
        with self._lock:
            st = self._state()
            st.buffer += text
            out: list[str] = []
            while True:
                nl = st.buffer.find("\n")
                if nl < 0:
                    break
                line, st.buffer = st.buffer[:nl], st.buffer[nl + 1 :]
                redrawn = st.redraw or "\r" in line.rstrip("\r")
                if st.open_line and redrawn:
                    out.append("\r")  # what flush() released is on screen: overwrite it
                st.open_line = st.redraw = False
                self._line(st, _visible(line), out, newline=True)
            # A progress bar redraws with \r: only the text after the last \r still matters.
            cr = st.buffer.rfind("\r")
            if 0 <= cr < len(st.buffer) - 1:
                st.buffer = st.buffer[cr + 1 :]
                st.redraw = st.redraw or st.open_line
            if out:
                self._emit("".join(out))
        return len(text)

    def flush(self) -> None:
        """Release a pending partial line unless it is (so far) noise."""
        with self._lock:
            st = self._state()
            out: list[str] = []
            if st.buffer:
                partial = _visible(st.buffer)
                if not self._enabled() or classify(partial) == "keep":
                    raw, st.buffer = st.buffer, ""
                    out.append(self._pending_epoch(st))
                    redrawn = st.redraw or "\r" in raw.rstrip("\r")
                    out.append(("\r" if redrawn else "") + redact(partial))
                    st.open_line, st.redraw = True, raw.endswith("\r")
            if any(out):
                self._emit("".join(out))

    def finish(self) -> None:
        """End of a cell: release every thread's pending epoch header and partial line."""
        with self._lock:
            out: list[str] = []
            for st in self._states.values():
                out.append(self._pending_epoch(st))
                if st.buffer:
                    partial = _visible(st.buffer)
                    st.buffer = ""
                    if self._enabled() and classify(partial) != "keep":
                        self._held.add(self.name, partial)
                    else:
                        out.append(redact(partial) + "\n")
                st.skip_source_line = False
            self._states.clear()
            text = "".join(out)
            if text:
                self._emit(text)

    @staticmethod
    def _pending_epoch(st: _ThreadState) -> str:
        epoch, st.epoch = st.epoch, None
        return epoch + "\n" if epoch else ""

    def _line(self, st: _ThreadState, line: str, out: list[str], newline: bool) -> None:
        if not self._enabled():
            out.append(self._pending_epoch(st))
            out.append(redact(line) + ("\n" if newline else ""))
            return
        if st.skip_source_line:
            st.skip_source_line = False
            if line.startswith((" ", "\t")):
                self._held.add(self.name, line)
                return
        kind = classify(line)
        plain = strip_ansi(line).strip()
        if kind == "keep" and _EPOCH_RE.match(plain):
            out.append(self._pending_epoch(st))
            st.epoch = plain
            return
        if kind == "progress":
            epoch, st.epoch = st.epoch, None
            out.append(redact(compact_progress(line, epoch)) + "\n")
            return
        if kind in ("noise", "warning"):
            self._held.add(self.name, line)
            st.skip_source_line = kind == "warning"
            return
        out.append(self._pending_epoch(st))
        out.append(redact(line) + "\n")


def _visible(line: str) -> str:
    """What a terminal would show for a line with ``\\r``/``\\b`` redraws: the last segment."""
    line = line.rstrip("\r")
    if "\r" in line:
        line = line[line.rfind("\r") + 1 :]
    return line.replace("\b", "")


class LogNoiseFilter(logging.Filter):
    """A ``logging.Filter`` for the loggers of :data:`_LOG_NOISE`: known-harmless records go to
    the held-back buffer instead of a handler (whatever format or stream that handler uses)."""

    def __init__(self, held: HeldBack, enabled: Callable[[], bool]) -> None:
        super().__init__()
        self._held = held
        self._enabled = enabled

    def filter(self, record: logging.LogRecord) -> bool:
        if not self._enabled():
            return True
        message = record.getMessage()
        for name, pattern in _LOG_NOISE:
            if record.name == name and pattern.search(message):
                self._held.add("logging", f"{record.levelname}:{record.name}:{message}")
                return False
        return True

    def attach(self) -> None:
        for name in {name for name, _ in _LOG_NOISE}:
            logging.getLogger(name).addFilter(self)

    def detach(self) -> None:
        for name in {name for name, _ in _LOG_NOISE}:
            logging.getLogger(name).removeFilter(self)
