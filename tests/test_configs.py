"""Every config file in conf/ composes onto the TrainConfig schema, and every documented key has its comment."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf, open_dict

from sftjax.config import TrainConfig, register, validate
from sftjax.errors import ConfigError

CONF = Path(__file__).parents[1] / "conf"
OPTIONS = sorted((p.parent.name, p.stem) for p in CONF.glob("*/*.yaml"))
# What an option needs from the user before it validates (its YAML leaves it empty on purpose).
REQUIRED = {("objective", "distill"): ["objective.teacher=path/to/teacher"]}


@pytest.mark.parametrize("group,option", OPTIONS)
def test_every_option_composes_and_validates(group, option):
    register()
    with initialize_config_module("sftjax.conf", version_base="1.3"):
        cfg = compose("config", overrides=[f"{group}={option}", "trainer.run_dir=.", "data.train=[{path:x.jsonl}]",
                                           "model.path=tiny-llama", "data.eval_fraction=0.1",
                                           *REQUIRED.get((group, option), [])],
                      return_hydra_config=group == "experiment")
    if group == "experiment":  # experiment files may set hydra keys (sweepers): check them, then drop them
        assert "hydra" in cfg
        with open_dict(cfg):
            del cfg["hydra"]
    typed = OmegaConf.to_object(cfg)
    assert isinstance(typed, TrainConfig)
    validate(typed, device_count=4)


def test_every_key_is_commented():
    """STYLE: every key in a config file carries a one-line comment (type, default, meaning)."""
    for path in CONF.rglob("*.yaml"):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            stripped = line.strip()
            if not stripped or stripped.startswith(("#", "-", "_target_")) or stripped.endswith(":"):
                continue
            assert "#" in line, f"{path.relative_to(CONF.parent)}:{n}: key without a comment: {stripped}"


def test_distill_without_a_teacher_fails_validation_in_one_line():
    register()
    with initialize_config_module("sftjax.conf", version_base="1.3"):
        cfg = compose("config", overrides=["objective=distill", "trainer.run_dir=.", "data.train=[{path:x.jsonl}]"])
    with pytest.raises(ConfigError, match=r"^objective.teacher: not set"):
        validate(OmegaConf.to_object(cfg), device_count=4)
