"""The `recsys` command line: help, version, and errors that name the flag without a traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest

import recsys
from recsys.cli import main


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "recsys.cli", *args], capture_output=True, text=True)


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["version"]) == 0
    assert capsys.readouterr().out == f"recsys {recsys.__version__}\n"


def test_help_lists_the_commands() -> None:
    result = run_cli("--help")
    assert result.returncode == 0
    assert "version" in result.stdout


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ((), "the following arguments are required: COMMAND"),
        (("frobnicate",), "invalid choice: 'frobnicate'"),
        (("version", "--bogus"), "unrecognized arguments: --bogus"),
    ],
)
def test_usage_errors_exit_non_zero_without_a_traceback(args: tuple[str, ...], expected: str) -> None:
    result = run_cli(*args)
    assert result.returncode == 2
    assert expected in result.stderr
    assert "Traceback" not in result.stderr
