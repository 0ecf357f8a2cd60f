"""Every config file in conf/ composes onto the TrainConfig schema, every documented key has its comment, the
YAML defaults repeat the schema's, and impossible values fail validation in one line naming the key."""

import dataclasses
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf, open_dict

from sftjax.config import DataSection, MethodSection, TrainConfig, register, validate
from sftjax.errors import ConfigError
from sftjax.job.config import JobConfig

CONF = Path(__file__).parents[1] / "conf"
OPTIONS = sorted((p.parent.name, p.stem) for p in CONF.glob("*/*.yaml"))
# What an option needs from the user before it validates (its YAML leaves it empty on purpose).
REQUIRED = {("objective", "distill"): ["objective.teacher=path/to/teacher"]}


@pytest.mark.parametrize("group,option", OPTIONS)
def test_every_option_composes_and_validates(group, option):
    register(JobConfig)
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
    register(JobConfig)
    with initialize_config_module("sftjax.conf", version_base="1.3"):
        cfg = compose("config", overrides=["objective=distill", "trainer.run_dir=.", "data.train=[{path:x.jsonl}]"])
    with pytest.raises(ConfigError, match=r"^objective.teacher: not set"):
        validate(OmegaConf.to_object(cfg), device_count=4)


def test_yaml_defaults_repeat_the_schema():
    """conf/data/default.yaml and conf/method/lora.yaml list the schema's keys in its order, with its defaults."""
    data = yaml.safe_load((CONF / "data" / "default.yaml").read_text())
    assert data == dataclasses.asdict(DataSection())
    assert list(data) == [f.name for f in dataclasses.fields(DataSection)]
    lora = yaml.safe_load((CONF / "method" / "lora.yaml").read_text())["lora"]
    schema = dataclasses.asdict(MethodSection().lora)
    assert list(lora) == list(schema)
    assert lora == {**schema, "trainable_modules": []}  # YAML lists, the library's tuples


@pytest.mark.parametrize("override,message", [
    ("method.lora.rank=0", r"^method.lora.rank=0: must be a positive integer$"),
    ("method.lora.init=xavier", r"^method.lora.init='xavier': must be one of kaiming, gaussian$"),
    ("method.quant.kind=fp4", r"^method.quant.kind='fp4': must be one of nf4, int4$"),
    ("model.remat=some", r"^model.remat='some': must be one of none, full, dots$"),
    ("model.attention_block=0", r"^model.attention_block=0: must be >= 1$"),
    ("trainer.cpu_devices=-1", r"^trainer.cpu_devices=-1: must be >= 0 \(0: jax's default\)$"),
    ("data.packing=bad", r"^data.packing='bad': must be one of bfd, greedy, none$"),
    ("data.seq_len=1", r"^data.seq_len=1: must be >= 2"),
    ("data.train=[{path:x.jsonl,prompt_noise:1.0}]", r"^data.train\[0\].prompt_noise=1.0: must be in \[0, 1\)$"),
    ("data.eval=[{path:y.jsonl,format:csv}]", r"^data.eval\[0\].format='csv': must be auto or one of chat, "),
    ("optim.schedule=step", r"^optim.schedule='step': must be one of cosine, linear, constant$"),
])
def test_impossible_values_fail_validation_in_one_line(override, message):
    register(JobConfig)
    with initialize_config_module("sftjax.conf", version_base="1.3"):
        cfg = compose("config", overrides=["trainer.run_dir=.", "data.train=[{path:x.jsonl}]", "method=qlora",
                                           override])
    with pytest.raises(ConfigError, match=message):
        validate(OmegaConf.to_object(cfg), device_count=4)


def test_the_library_schema_knows_nothing_of_the_main_job():
    """`builtin.*` belongs to the main job: sftjax-train's schema (JobConfig) adds it to the library's TrainConfig."""
    assert "builtin" not in {f.name for f in dataclasses.fields(TrainConfig)}
    assert issubclass(JobConfig, TrainConfig) and "builtin" in {f.name for f in dataclasses.fields(JobConfig)}
    register(TrainConfig)
    try:
        with initialize_config_module("sftjax.conf", version_base="1.3"):
            with pytest.raises(Exception, match="builtin"):
                compose("config", overrides=["trainer.run_dir=.", "experiment=main"])
    finally:
        register(JobConfig)
