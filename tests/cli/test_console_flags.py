"""Every console script answers --help and --version as its ecosystem's tools do: the text on stdout, exit status 0."""

import importlib
import sys

import pytest

from sftjax import __version__

COMMANDS = ("data", "train", "eval", "export", "generate")


def _run(command: str, flag: str, monkeypatch) -> int:
    main = importlib.import_module(f"sftjax.cli.{command}").main
    if command == "train":  # a Hydra app: it reads sys.argv
        monkeypatch.setattr(sys, "argv", [f"sftjax-{command}", flag])
        try:
            main()
        except SystemExit as e:
            return e.code or 0
        return 0
    try:
        return main([flag])
    except SystemExit as e:
        return e.code or 0


@pytest.mark.parametrize("command", COMMANDS)
def test_version(command, monkeypatch, capsys):
    assert _run(command, "--version", monkeypatch) == 0
    assert capsys.readouterr().out.strip() == f"sftjax-{command} (sftjax) {__version__}"


@pytest.mark.parametrize("command", [c for c in COMMANDS if c != "train"])  # train's --help is Hydra's (below)
def test_help(command, monkeypatch, capsys):
    assert _run(command, "--help", monkeypatch) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: sftjax-{command}") and "--version" in out


def test_train_help_is_hydras(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert _run("train", "--help", monkeypatch) == 0
    out = capsys.readouterr().out
    assert "Powered by Hydra" in out and "data:" in out
