"""`sftjax-train`: the Hydra app around `sftjax.train.loop.run_training`.

    sftjax-train                                                  # the main job (sftjax.job): built-in tasks
    sftjax-train model=path/to/hf_dir data=train.jsonl trainer.max_steps=500 optim.lr=1e-4
    sftjax-train -m optim.lr=1e-4,3e-4 trainer.max_steps=200 ...            # a grid sweep (Hydra multirun)

The configuration is conf/ (shipped in the wheel as `sftjax.conf`; add your own directories with --config-dir or
hydra.searchpath). `model=<directory>` and `data=<file>` are shorthands (see sftjax/cli/common.py).

The task function returns the final value of trainer.best_metric, which Hydra sweepers (grid, Optuna) optimise.
A user error (bad config value, bad data line, missing tensor) prints one line and exits with status 2.
"""

from __future__ import annotations

import os
import sys

import hydra
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from sftjax.cli.common import expand_shorthands, fail, one_line, version_line
from sftjax.cli.malloc import use_huge_pages
from sftjax.config import register
from sftjax.errors import UserError
from sftjax.job.config import JobConfig


@hydra.main(version_base="1.3", config_path="pkg://sftjax.conf", config_name="config")
def _app(cfg: DictConfig) -> float | None:
    from sftjax.job.run import run_job, uses_builtin  # deferred: JAX starts after Hydra parsed the command line
    from sftjax.train.compile_cache import use_compile_cache
    from sftjax.train.cpu_devices import use_cpu_devices
    from sftjax.train.loop import run_training

    try:
        typed = OmegaConf.to_object(cfg)
        use_compile_cache(typed.trainer.compile_cache)
        use_cpu_devices(typed.trainer.cpu_devices)
        run = run_job if uses_builtin(typed) else run_training
        result = run(typed, OmegaConf.to_container(cfg, resolve=True))
    except UserError as e:
        sys.exit(fail("sftjax-train", str(e)))
    shown = ("step", "train/loss", "eval/loss", "eval/ppl", "eval/accuracy", "metric")
    print("sftjax-train: done: " + ", ".join(f"{k}={result[k]:.4g}" for k in shown if k in result))
    return result.get("metric")


def main_job_defaults(args: list[str]) -> list[str]:
    """No dataset and no experiment on the command line: run the main job (conf/experiment/main.yaml)."""
    given = any(a.split("=")[0].lstrip("+~") in ("data.train", "experiment") for a in args)
    return args if given else [*args, "experiment=main"]


def main() -> None:
    if sys.argv[1:] == ["--version"]:
        print(version_line("sftjax-train"))
        return
    register(JobConfig)
    sys.argv = [sys.argv[0], *main_job_defaults(expand_shorthands(sys.argv[1:]))]
    # Let configuration errors reach us instead of Hydra's multi-line report; bugs keep their traceback.
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        _app()
    except (HydraException, OmegaConfBaseException) as e:
        sys.exit(fail("sftjax-train", one_line(e)))


if __name__ == "__main__":
    use_huge_pages()  # as the console script does (sftjax/cli/launch.py)
    main()
