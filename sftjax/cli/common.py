"""What the command-line entry points share: the run configuration (conf/ through Hydra), its shorthands, and
one-line reporting of user errors.

    model=<existing directory>   ->  model=hf model.path=<directory>
    data=<existing .jsonl/.json> ->  data.train=[{path:<file>}]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from sftjax.config import TrainConfig, register
from sftjax.errors import UserError
from sftjax.job.config import JobConfig

EXIT_USER_ERROR = 2
_MODEL_OPTIONS = ("tiny-llama", "bench-llama", "llama-3.2-1b", "hf")  # conf/model/*.yaml
_HYDRA_NOISE = ("reference_type", "object_type", "full_key", "Set the environment", "msg:", "Config search path",
                "provider=")


def _quote(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def expand_shorthands(args: list[str]) -> list[str]:
    """Rewrite `model=<dir>` and `data=<file>` into the overrides they stand for (see the module docstring)."""
    out = []
    for arg in args:
        key, sep, value = arg.partition("=")
        if sep and key == "model" and value not in _MODEL_OPTIONS and Path(value).is_dir():
            out += ["model=hf", f"model.path={_quote(value)}"]
        elif sep and key == "data" and Path(value).suffix in (".jsonl", ".json") and Path(value).is_file():
            out.append(f"data.train=[{{path:{_quote(value)}}}]")
        else:
            out.append(arg)
    return out


def one_line(error: BaseException) -> str:
    """Hydra / OmegaConf messages span several lines (key, types, hints): keep what names the problem."""
    parts: list[str] = []
    while error is not None:
        parts += [line.strip() for line in str(error).splitlines()
                  if line.strip() and not line.strip().startswith(_HYDRA_NOISE) and line.strip() not in parts]
        error = error.__cause__
    return " ".join(parts)


def compose_config(overrides: list[str]) -> TrainConfig:
    """The TrainConfig that `sftjax-train <overrides>` would run with (outside a Hydra run: no run directory)."""
    from hydra import compose, initialize_config_module

    register(JobConfig)
    with initialize_config_module("sftjax.conf", version_base="1.3"):
        cfg = compose("config", overrides=[*expand_shorthands(overrides), "trainer.run_dir=."])
    return OmegaConf.to_object(cfg)


def add_checkpoint_choice(parser: argparse.ArgumentParser) -> None:
    """--step N | --best: which checkpoint of a --run (default: the latest)."""
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--step", type=int, help="with --run: the checkpoint of this step (default: the latest)")
    which.add_argument("--best", action="store_true", help="with --run: the best checkpoint by trainer.best_metric")


def run_config(run_dir: str | Path, overrides: list[str]) -> TrainConfig:
    """The resolved config a training run saved (RUN_DIR/config.json), with key=value overrides applied."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise UserError(f"{run_dir}: not a training run directory (no config.json)")
    try:
        saved = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: invalid JSON ({e.msg}, line {e.lineno})") from None
    merged = OmegaConf.merge(OmegaConf.structured(JobConfig), saved)
    for override in overrides:
        try:
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist([override]))
        except OmegaConfBaseException as e:
            raise UserError(f"{override}: {one_line(e)}") from None
    return OmegaConf.to_object(merged)


def version_line(program: str) -> str:
    """What `--version` prints: the program and the sftjax version."""
    from sftjax import __version__

    return f"{program} (sftjax) {__version__}"


def fail(program: str, message: str) -> int:
    print(f"{program}: error: {message}", file=sys.stderr)
    return EXIT_USER_ERROR
