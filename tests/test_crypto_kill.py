"""A decrypt killed mid-way (SIGKILL: no cleanup code runs) leaves no plaintext behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from kprivacy_nb.crypto import age, keys

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="O_TMPFILE is Linux-only")


def test_sigkilled_decrypt_leaves_no_plaintext_file(tmp_path, kp_home):
    alice = keys.generate_identity("alice")
    work = tmp_path / "work"
    work.mkdir()
    plain = os.urandom(1 << 20) * 16  # 16 MiB
    cipher = age.encrypt(plain, [age.X25519Recipient.parse(alice.public)])
    proc = subprocess.Popen(
        [sys.executable, "-m", "kprivacy_nb", "decrypt", "-i", str(alice.path)]
        + ["-o", str(work / "out.bin")],
        stdin=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    proc.stdin.write(cipher[: len(cipher) // 2])  # half the file: decrypt is busy writing
    proc.stdin.flush()
    deadline = time.monotonic() + 60
    written = 0
    while time.monotonic() < deadline:  # wait until plaintext is being written somewhere
        fds = f"/proc/{proc.pid}/fd"
        sizes = [os.stat(os.path.join(fds, fd)).st_size for fd in os.listdir(fds)]
        written = max([s for s in sizes if s < len(plain)] + [0])
        if written >= 4 << 20:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stdin.close()
    proc.stderr.close()
    assert written >= 4 << 20, "the decrypt never got going"
    assert os.listdir(work) == []  # no output, no hidden temp file, no partial plaintext
