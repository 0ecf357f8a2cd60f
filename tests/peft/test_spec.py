"""LoraSpec is one dataclass for the run config (method.lora) and the library, and checks itself in one line."""

import pytest
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from sftjax.config import TrainConfig, register
from sftjax.errors import ConfigError
from sftjax.job.config import JobConfig
from sftjax.peft import lora
from sftjax.peft.spec import LoraSpec


def _method(*overrides: str):
    register(JobConfig)
    with initialize_config_module("sftjax.conf", version_base="1.3"):
        cfg = compose("config", overrides=["trainer.run_dir=.", *overrides])
    return OmegaConf.to_object(cfg).method


def test_hydra_builds_the_library_spec():
    spec = _method("method=lora", "method.lora.target_modules=[q_proj,v_proj]",
                   "method.lora.trainable_modules=[lm_head]").lora
    assert lora.LoraSpec is LoraSpec and type(spec) is LoraSpec
    assert spec == LoraSpec(rank=16, alpha=32.0, dropout=0.05, target_modules=("q_proj", "v_proj"),
                            trainable_modules=("lm_head",))  # lists from Hydra become the library's tuples
    assert _method("method=lora", "method.lora.target_modules=.*proj").lora.target_modules == ".*proj"
    assert spec.scale == 2.0


def test_a_run_defaults_to_dropout_0_05_the_library_to_0():
    assert _method().lora == _method("method=lora").lora == TrainConfig().method.lora == LoraSpec(dropout=0.05)
    assert LoraSpec().dropout == 0.0


@pytest.mark.parametrize("spec,message", [
    (LoraSpec(rank=0), r"^method.lora.rank=0: must be a positive integer$"),
    (LoraSpec(rank=True), r"^method.lora.rank=True: must be a positive integer$"),
    (LoraSpec(alpha=0.0), r"^method.lora.alpha=0.0: must be > 0$"),
    (LoraSpec(dropout=1.0), r"^method.lora.dropout=1.0: must be in \[0, 1\)$"),
    (LoraSpec(init="xavier"), r"^method.lora.init='xavier': must be one of kaiming, gaussian$"),
    (LoraSpec(target_modules=[]), r"^method.lora.target_modules=\(\): must be all-linear, a list of module names"),
    (LoraSpec(target_modules=("q_proj", "")), r"^method.lora.target_modules=\('q_proj', ''\): must be all-linear"),
    (LoraSpec(trainable_modules=["mlp"]), r"^method.lora.trainable_modules=\['mlp'\]: 'mlp' is not one of "
                                          r"embed_tokens, lm_head, norm$"),
])
def test_check_names_the_key_in_one_line(spec, message):
    with pytest.raises(ConfigError, match=message):
        spec.check()


def test_check_accepts_what_the_library_and_the_config_give():
    for spec in (LoraSpec(), LoraSpec(rank=4, alpha=8, target_modules=("q_proj", "v_proj")),
                 LoraSpec(target_modules=r"model\.layers\.\d+\.mlp\..*", trainable_modules=("embed_tokens", "norm"))):
        spec.check()
    with pytest.raises(ConfigError, match=r"^adapter.rank=-1: "):
        LoraSpec(rank=-1).check("adapter")
