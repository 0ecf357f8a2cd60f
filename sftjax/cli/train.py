"""`sftjax-train`: the Hydra app around `sftjax.train.loop.run_training`.

    sftjax-train model=path/to/hf_dir data=train.jsonl trainer.max_steps=500 optim.lr=1e-4
    sftjax-train -m optim.lr=1e-4,3e-4 trainer.max_steps=200 ...            # a grid sweep (Hydra multirun)

The configuration is conf/ (shipped in the wheel as `sftjax.conf`; add your own directories with --config-dir or
hydra.searchpath). Two shorthands are expanded before Hydra parses the command line:

    model=<existing directory>   ->  model=hf model.path=<directory>
    data=<existing .jsonl/.json> ->  data.train=[{path:<file>}]

The task function returns the final value of trainer.best_metric, which Hydra sweepers (grid, Optuna) optimise.
A user error (bad config value, bad data line, missing tensor) prints one line and exits with status 2.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import hydra
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from sftjax.config import register
from sftjax.errors import UserError

_EXIT_USER_ERROR = 2
_PRESETS_WITH_FILES = ("tiny-llama", "bench-llama", "llama-3.2-1b", "hf")


def _quote(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def expand_shorthands(args: list[str]) -> list[str]:
    """Rewrite `model=<dir>` and `data=<file>` into the overrides they stand for (see the module docstring)."""
    out = []
    for arg in args:
        key, sep, value = arg.partition("=")
        if sep and key == "model" and value not in _PRESETS_WITH_FILES and Path(value).is_dir():
            out += ["model=hf", f"model.path={_quote(value)}"]
        elif sep and key == "data" and Path(value).suffix in (".jsonl", ".json") and Path(value).is_file():
            out.append(f"data.train=[{{path:{_quote(value)}}}]")
        else:
            out.append(arg)
    return out


def _user_error(e: UserError) -> None:
    print(f"sftjax-train: error: {e}", file=sys.stderr)
    sys.exit(_EXIT_USER_ERROR)


@hydra.main(version_base="1.3", config_path="pkg://sftjax.conf", config_name="config")
def _app(cfg: DictConfig) -> float | None:
    from sftjax.train.loop import run_training  # deferred: JAX starts after Hydra has parsed the command line

    try:
        typed = OmegaConf.to_object(cfg)
        result = run_training(typed, OmegaConf.to_container(cfg, resolve=True))
    except UserError as e:
        _user_error(e)
    shown = ("step", "train/loss", "eval/loss", "eval/ppl", "eval/accuracy", "metric")
    print("sftjax-train: done: " + ", ".join(f"{k}={result[k]:.4g}" for k in shown if k in result))
    return result.get("metric")


def _one_line(error: BaseException) -> str:
    """Hydra / OmegaConf messages span several lines (key, types, hints): keep what names the problem."""
    noise = ("reference_type", "object_type", "full_key", "Set the environment", "msg:", "Config search path",
             "provider=")
    parts: list[str] = []
    while error is not None:
        parts += [line.strip() for line in str(error).splitlines()
                  if line.strip() and not line.strip().startswith(noise) and line.strip() not in parts]
        error = error.__cause__
    return " ".join(parts)


def main() -> None:
    register()
    sys.argv = [sys.argv[0], *expand_shorthands(sys.argv[1:])]
    # Let configuration errors reach us instead of Hydra's multi-line report; bugs keep their traceback.
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        _app()
    except (HydraException, OmegaConfBaseException) as e:
        print(f"sftjax-train: error: {_one_line(e)}", file=sys.stderr)
        sys.exit(_EXIT_USER_ERROR)


if __name__ == "__main__":
    main()
