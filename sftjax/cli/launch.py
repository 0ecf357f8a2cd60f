"""The console scripts of train, eval and generate (pyproject.toml): each first re-runs its process with the malloc
tunable (sftjax/cli/malloc.py), before importing its command's module, whose JAX import the re-run would repeat
(0.6 s for eval and generate). `python -m sftjax.cli.<command>` does the same in its `__main__` block.
"""

import importlib
import sys

from sftjax.cli.malloc import use_huge_pages


def _main(command: str):
    use_huge_pages()
    return importlib.import_module(f"sftjax.cli.{command}").main()


def train() -> None:
    _main("train")


def evaluate() -> None:
    sys.exit(_main("eval"))


def generate() -> None:
    sys.exit(_main("generate"))
