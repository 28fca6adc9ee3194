"""Passphrases typed in the wrong place on a magic line: never echoed, never left in history.

Each test types the line as a user would, through ``run_cell`` with history on, then looks in
every place IPython keeps inputs (In, _ih, _i/_ii/_iii, the history database) and the error.
"""

from __future__ import annotations

import pytest
from IPython.core.error import UsageError

SECRET = "correcthorsebatterystaple"


def history_texts(ip) -> list[str]:
    hm = ip.history_manager
    hm.writeout_cache()
    rows = hm.db.execute("SELECT source_raw FROM history WHERE session = ?", (hm.session_number,))
    ns = ip.user_ns
    return [
        *ns["In"],
        *hm.input_hist_raw,
        *(ns.get(k, "") for k in ("_i", "_ii", "_iii")),
        *(v for k, v in ns.items() if k.startswith("_i") and isinstance(v, str)),
        *(r[0] for r in rows),
    ]


def run_error(ip, line: str) -> str:
    result = ip.run_cell(line, store_history=True)
    assert isinstance(result.error_in_exec, UsageError), result
    return str(result.error_in_exec)


def test_abbreviated_passphrase_env_option_is_not_accepted_and_is_scrubbed(ip):
    message = run_error(ip, "%secure_load x.age --passphrase-e Tr0ub4dorXyz9")
    assert "Tr0ub4dor" not in message
    assert not [t for t in history_texts(ip) if "Tr0ub4dor" in (t or "")]
    # A valid-looking name after an abbreviation is not read as --passphrase-env either.
    message = run_error(ip, "%secure_load x.age --passphrase-e NB_PASS")
    assert "unrecognized arguments" in message and "NB_PASS" not in message


def test_scrubbed_line_does_not_come_back_through_i_ii_iii(ip):
    run_error(ip, "%secure_save x out.age --passphrase-env 'Tr0ub4dor&3xyz'")
    for cell in ("a = 1", "b = 2", "c = 3"):  # IPython rotates _i -> _ii -> _iii on each cell
        ip.run_cell(cell, store_history=True)
        leaks = [t for t in history_texts(ip) if "Tr0ub4dor" in (t or "")]
        assert not leaks, f"secret back after {cell!r}"


def test_word_like_passphrase_as_env_name_is_not_echoed_and_is_scrubbed(ip, monkeypatch):
    monkeypatch.delenv(SECRET, raising=False)
    message = run_error(ip, f"%secure_load x.age --passphrase-env {SECRET}")
    assert SECRET not in message and "not set" in message
    assert not [t for t in history_texts(ip) if SECRET in (t or "")]


@pytest.mark.parametrize(
    "line",
    [
        f"%secure_load x.age --passphrase-env NB_PASS {SECRET}",
        f"%secure_save x out.age --passphrase-env NB_PASS -- {SECRET} and more",
        f"%secure_show --passphrase-env NB_PASS --for {SECRET}",
        f"%%secure_output --passphrase-env NB_PASS {SECRET}\nprint(1)",
    ],
)
def test_argument_errors_never_repeat_what_was_typed(ip, line):
    message = run_error(ip, line)
    assert SECRET not in message
    assert "not repeated" in message
    assert not [t for t in history_texts(ip) if SECRET in (t or "")]


@pytest.mark.parametrize(
    ("line", "secret"),
    [
        ("%secure_save x f.age --pass correct-horse-battery", "correct-horse"),
        ("%secure_save x f.age -p hunter2hunter2", "hunter2"),
        ("%secure_save x f.age --to alice --bogus swordfish-pw-789", "swordfish"),
        ("%secure_load f.age --pw swordfish-pw-790", "swordfish"),
        ("%secure_export x -o f.age --secret swordfish-pw-791", "swordfish"),
        ("%%secure_output --to alice --key swordfish-pw-792\nprint(1)", "swordfish"),
    ],
)
def test_a_secure_magic_line_that_does_not_parse_is_scrubbed(ip, line, secret):
    """A secret after a wrong or abbreviated option looks like nothing to the secret detector;
    any secure magic line that fails to parse is treated as possibly secret."""
    message = run_error(ip, line)
    assert secret not in message and "removed from the input history" in message
    assert "\n" not in message
    assert not [t for t in history_texts(ip) if secret in (t or "")]


def test_scrubbing_a_short_line_leaves_other_inputs_alone(ip):
    ip.run_cell("note = 'x'", store_history=True)
    assert "removed from the input history" in run_error(ip, "%secure_save x")  # no path
    assert "note = 'x'" in history_texts(ip)
