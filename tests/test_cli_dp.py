"""``kprivacy-nb epsilon | calibrate | curve``: numbers, --json, exit codes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from kprivacy_nb.__main__ import main
from kprivacy_nb.dp import accounting as acc

BASE = ["--n", "60000", "--batch-size", "256", "--epochs", "15", "--delta", "1e-5"]


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.parametrize(("accountant", "expected"), [("rdp", 1.281), ("pld", 1.134)])
def test_epsilon_json_matches_tf_privacy(capsys, accountant, expected):
    code, out, _ = run(capsys, "epsilon", *BASE, "--noise-multiplier", "1.1", "--accountant",
                       accountant, "--json")  # fmt: skip
    assert code == 0
    doc = last_json(out)
    assert doc["epsilon"] == pytest.approx(expected, rel=0.01)
    assert doc["steps"] == 15 * 234 and doc["delta"] == 1e-5 and doc["accountant"] == accountant


def test_epsilon_text_and_shuffle(capsys):
    code, out, _ = run(capsys, "epsilon", *BASE, "--noise-multiplier", "1.1", "--sampling",
                       "shuffle", "--accountant", "rdp")  # fmt: skip
    assert code == 0 and "ε = 21.90" in out and "no amplification" in out


def test_epsilon_default_delta_and_steps(capsys):
    argv = ["--n", "60000", "--batch-size", "256", "--steps", "3516", "--noise-multiplier", "1.1"]
    code, out, _ = run(capsys, "epsilon", *argv, "--accountant", "rdp", "--json")
    doc = last_json(out)
    assert code == 0 and doc["delta"] == 1e-6
    assert doc["epsilon"] == pytest.approx(
        acc.compute_epsilon(60000, 256, None, 1.1, 1e-6, steps=3516, accountant="rdp")
    )


def test_calibrate_json(capsys):
    code, out, _ = run(capsys, "calibrate", "--target-epsilon", "2", *BASE, "--accountant", "rdp",
                       "--json")  # fmt: skip
    doc = last_json(out)
    assert code == 0 and doc["epsilon"] <= 2.0
    assert doc["epsilon"] == pytest.approx(
        acc.compute_epsilon(60000, 256, 15, doc["noise_multiplier"], 1e-5, accountant="rdp")
    )


def test_curve_json(capsys):
    code, out, _ = run(capsys, "curve", "--n", "60000", "--batch-size", "256", "--epochs", "5",
                       "--noise-multiplier", "1.1", "--accountant", "rdp", "--json")  # fmt: skip
    doc = last_json(out)
    assert code == 0 and doc["epochs"] == [1, 2, 3, 4, 5] and len(doc["epsilon"]) == 5
    assert doc["epsilon"][-1] == pytest.approx(
        acc.compute_epsilon(60000, 256, 5, 1.1, 1e-6, accountant="rdp")
    )
    code, out, _ = run(capsys, "curve", "--n", "600", "--batch-size", "60", "--epochs", "3",
                       "--noise-multiplier", "1.1", "--accountant", "rdp")  # fmt: skip
    assert code == 0 and "epoch  steps  epsilon" in out and len(out.strip().splitlines()) == 5


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["epsilon", "--n", "10", "--batch-size", "256", "--epochs", "1",
          "--noise-multiplier", "1"], "larger than the dataset"),
        (["epsilon", *BASE[:-2], "--delta", "1e-4", "--noise-multiplier", "1"], "not below 1/n"),
        (["epsilon", *BASE, "--noise-multiplier", "-1"], "must be ≥ 0"),
        (["epsilon", *BASE, "--noise-multiplier", "0"], "no privacy"),
        (["epsilon", "--n", "0", "--batch-size", "1", "--epochs", "1", "--noise-multiplier", "1"],
         "at least 1"),
        (["calibrate", "--target-epsilon", "-1", *BASE], "must be > 0"),
        (["curve", *BASE, "--noise-multiplier", "1", "--sampling", "bogus"], "invalid choice"),
        (["epsilon", "--n", "100"], "required"),
    ],
)  # fmt: skip
def test_usage_errors_exit_2_with_one_line(capsys, argv, message):
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse errors
        code = exc.code
    out, err = capsys.readouterr()
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1
    assert "Traceback" not in err


def test_unreachable_target(capsys):
    code, _, err = run(
        capsys, "calibrate", "--target-epsilon", "1e-6", *BASE, "--accountant", "rdp"
    )
    assert code == 2 and "Reachable targets" in err


def test_sigma_zero_when_allowed_is_loud(capsys):
    code, out, err = run(capsys, "epsilon", *BASE, "--noise-multiplier", "0", "--allow-no-noise",
                         "--json")  # fmt: skip
    doc = last_json(out)
    assert code == 0 and doc["epsilon"] is None and doc["no_privacy"] is True
    assert "no privacy" in err


def test_real_process_json_is_the_last_line():
    out = subprocess.run(
        [sys.executable, "-m", "kprivacy_nb", "epsilon", *BASE, "--noise-multiplier", "1.1",
         "--accountant", "rdp", "--json"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert last_json(out.stdout)["epsilon"] == pytest.approx(1.281, rel=0.01)
