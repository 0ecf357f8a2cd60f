"""Every console script answers --help and --version as its ecosystem's tools do: the text on stdout, exit status 0."""

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sftjax import __version__

COMMANDS = ("data", "train", "eval", "export", "generate")


def _run(command: str, flag: str, capsys) -> tuple[int, str]:
    """(exit status, stdout). sftjax-train, a Hydra app that takes over logging, runs in a subprocess."""
    if command == "train":
        done = subprocess.run([sys.executable, "-m", "sftjax.cli.train", flag], capture_output=True, text=True,
                              timeout=120, env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])})
        return done.returncode, done.stdout
    try:
        status = importlib.import_module(f"sftjax.cli.{command}").main([flag])
    except SystemExit as e:
        status = e.code or 0
    return status, capsys.readouterr().out


@pytest.mark.parametrize("command", COMMANDS)
def test_version(command, capsys):
    status, out = _run(command, "--version", capsys)
    assert status == 0 and out.strip() == f"sftjax-{command} (sftjax) {__version__}"


@pytest.mark.parametrize("command", [c for c in COMMANDS if c != "train"])  # train's --help is Hydra's (below)
def test_help(command, capsys):
    status, out = _run(command, "--help", capsys)
    assert status == 0 and out.startswith(f"usage: sftjax-{command}") and "--version" in out


def test_train_help_is_hydras(capsys):
    status, out = _run("train", "--help", capsys)
    assert status == 0 and "Powered by Hydra" in out and "data:" in out
