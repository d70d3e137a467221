"""The `meteora-jax` command: its error path (the demo itself: tests/test_demo.py)."""

import pytest

from meteora_jax.cli import main


def test_unknown_command_is_refused():
    with pytest.raises(SystemExit):
        main(["frobnicate"])


def test_a_user_error_is_one_line_and_exit_code_2(tmp_path, capsys):
    assert main(["demo", "--fast", "--no-progress", "--out", "."]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("meteora-jax demo: error: --out .") and "\n" not in err
