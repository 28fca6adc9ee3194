"""DP-SGD under tf.distribute (issue #17): MirroredStrategy on 2 logical CPU devices (one
process) and MultiWorkerMirroredStrategy with 2 worker processes on 127.0.0.1.

Both run tests/distribute_worker.py in subprocesses (logical devices must be configured before
TensorFlow initialises; workers are separate processes). Each asserts:
- the noise is added once globally: the update's std is σC/B (not √2 or 2× off);
- σ = 0: the update equals the naive per-example clipped mean of one device, and removing one
  example moves it by at most lr·C/B;
- ε, and the ledger charged once (by the chief), equal one machine's for the same steps.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from kprivacy_nb import compute_epsilon
from kprivacy_nb.dp.ledger import Ledger

WORKER = Path(__file__).with_name("distribute_worker.py")
TIMEOUT = 240
EPSILON = dict(n=256, batch_size=32, epochs=2, noise_multiplier=1.0, delta=1e-5)


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TF_CONFIG"}
    return {**env, "TF_CPP_MIN_LOG_LEVEL": "3", "KPRIVACY_NB_LEDGER_URL": "", **extra}


def _result(stdout: str, stderr: str) -> dict:
    lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, f"no result; stderr tail:\n{stderr[-3000:]}"
    return json.loads(lines[-1][len("RESULT ") :])


def _ledger(tmp_path: Path) -> Path:
    path = tmp_path / "ledger.db"
    ledger = Ledger(str(path))
    for name in ("team", "single"):
        ledger.create(name, 50.0, EPSILON["delta"])
    ledger.close()
    return path


def _free_ports(count: int) -> list[int]:
    socks = [socket.socket() for _ in range(count)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@pytest.fixture(scope="module")
def mirrored(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Ledger]:
    path = _ledger(tmp_path_factory.mktemp("mirrored"))
    run = subprocess.run(
        [sys.executable, str(WORKER), "mirrored", str(path)], env=_env(),
        capture_output=True, text=True, timeout=TIMEOUT,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    return _result(run.stdout, run.stderr), Ledger(str(path))


@pytest.fixture(scope="module")
def multiworker(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict], Ledger]:
    path = _ledger(tmp_path_factory.mktemp("multiworker"))
    hosts = [f"127.0.0.1:{port}" for port in _free_ports(2)]
    procs = []
    for index in range(2):
        config = {"cluster": {"worker": hosts}, "task": {"type": "worker", "index": index}}
        procs.append(subprocess.Popen(
            [sys.executable, str(WORKER), "multiworker", str(path)],
            env=_env(TF_CONFIG=json.dumps(config)), stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True,
        ))  # fmt: skip
    results = []
    try:
        for proc in procs:
            stdout, stderr = proc.communicate(timeout=TIMEOUT)
            assert proc.returncode == 0, stderr[-3000:]
            results.append(_result(stdout, stderr))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    return results, Ledger(str(path))


def _check_one(result: dict) -> None:
    assert result["replicas"] == 2
    # One N(0, σ²C²) draw per step, divided by B: 4096 coordinates give the std within ~2%.
    # Noise on every replica would be √2 off; noise summed twice, 2× off.
    assert abs(result["noise_ratio"] - 1.0) < 0.06, result["noise_ratio"]
    assert result["naive_max_diff"] < 1e-5 * max(1.0, result["naive_scale"] * 100)
    assert result["removal_change"] <= result["removal_bound"] * (1 + 1e-4)
    assert result["removal_change"] > 0.5 * result["removal_bound"]  # the example counted


def test_mirrored_noise_once_clipping_and_sensitivity(mirrored):
    _check_one(mirrored[0])


def test_mirrored_epsilon_and_ledger_equal_one_device(mirrored):
    result, ledger = mirrored
    single, dist = result["single"], result["distributed"]
    assert dist["steps"] == single["steps"] == 16
    assert dist["epsilon"] == pytest.approx(single["epsilon"], rel=1e-9)
    assert dist["history_epsilon"] == pytest.approx(single["history_epsilon"], rel=1e-9)
    assert dist["epsilon"] == pytest.approx(compute_epsilon(**EPSILON), rel=1e-6)
    assert len(ledger.runs("team")) == 1
    assert ledger.budget("team").committed_epsilon == pytest.approx(
        ledger.budget("single").committed_epsilon, rel=1e-9
    )


def test_multiworker_noise_once_clipping_and_sensitivity(multiworker):
    results, _ = multiworker
    for result in results:
        _check_one(result)
    # Both workers hold the same weights after training (one update, applied everywhere).
    sums = [r["distributed"]["weights_sum"] for r in results]
    assert sums[0] == pytest.approx(sums[1], abs=1e-6)


def test_multiworker_epsilon_equal_one_machine_and_ledger_charged_once(multiworker):
    results, ledger = multiworker
    expected = compute_epsilon(**EPSILON)
    for result in results:
        assert result["distributed"]["steps"] == 16
        assert result["distributed"]["epsilon"] == pytest.approx(expected, rel=1e-6)
    runs = ledger.runs("team")
    assert len(runs) == 1  # the chief's, settled; the other worker charged nothing
    assert ledger.budget("team").committed_epsilon == pytest.approx(expected, rel=1e-6)
