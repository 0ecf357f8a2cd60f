"""ModelConfig <-> HF config.json: both transformers layouts, family defaults, real-checkpoint shapes, bad input."""

import json

import pytest
import transformers

import sftjax
from sftjax.model.config import PRESETS, load_hf_config
from tests.model.hf_models import FAMILIES, hf_config

# config.json as transformers 4.x wrote it for Llama 3.1 8B (top-level rope_theta, rope_scaling, eos list).
LLAMA_31_8B_V4 = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 128000,
    "eos_token_id": [128001, 128008, 128009], "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02,
    "intermediate_size": 14336, "max_position_embeddings": 131072, "mlp_bias": False, "model_type": "llama",
    "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8, "pretraining_tp": 1,
    "rms_norm_eps": 1e-05, "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                            "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "transformers_version": "4.43.0.dev0", "use_cache": True, "vocab_size": 128256,
}
# Gemma 7B as released: "gelu" means the tanh approximation; hidden_activation may be null.
GEMMA_7B = {
    "architectures": ["GemmaForCausalLM"], "bos_token_id": 2, "eos_token_id": 1, "head_dim": 256,
    "hidden_act": "gelu", "hidden_activation": None, "hidden_size": 3072, "intermediate_size": 24576,
    "max_position_embeddings": 8192, "model_type": "gemma", "num_attention_heads": 16, "num_hidden_layers": 28,
    "num_key_value_heads": 16, "pad_token_id": 0, "rms_norm_eps": 1e-06, "rope_scaling": None,
    "rope_theta": 10000.0, "torch_dtype": "bfloat16", "vocab_size": 256000,
}
# Mistral 7B v0.1 (sliding window 4096); Qwen2.5-0.5B (tied, q/k/v bias).
MISTRAL_7B = {"model_type": "mistral", "hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32,
              "num_hidden_layers": 32, "num_key_value_heads": 8, "vocab_size": 32000, "sliding_window": 4096,
              "rope_theta": 10000.0, "rms_norm_eps": 1e-05, "torch_dtype": "bfloat16"}
QWEN25_05B = {"model_type": "qwen2", "hidden_size": 896, "intermediate_size": 4864, "num_attention_heads": 14,
              "num_hidden_layers": 24, "num_key_value_heads": 2, "vocab_size": 151936, "tie_word_embeddings": True,
              "use_sliding_window": False, "sliding_window": 32768, "max_window_layers": 21,
              "rope_theta": 1000000.0, "rms_norm_eps": 1e-06, "bos_token_id": 151643, "eos_token_id": 151643}


def test_real_checkpoint_configs():
    llama = sftjax.from_hf_dict(LLAMA_31_8B_V4)
    assert (llama.rope_type, llama.rope_factor, llama.rope_theta) == ("llama3", 8.0, 500000.0)
    assert llama.eos_token_ids == (128001, 128008, 128009) and llama.param_dtype == "bfloat16"
    assert llama.num_params() == 8_030_261_248  # Llama 3.1 8B
    gemma = sftjax.from_hf_dict(GEMMA_7B)
    assert gemma.hidden_act == "gelu_pytorch_tanh" and gemma.tie_word_embeddings and gemma.head_dim == 256
    assert gemma.norm_plus_one and gemma.scale_embeddings and gemma.num_params() == 8_537_680_896  # Gemma 7B
    mistral = sftjax.from_hf_dict(MISTRAL_7B)
    assert mistral.sliding_window == 4096 and mistral.layer_windows() == [4096] * 32
    assert mistral.num_params() == 7_241_732_096  # Mistral 7B
    qwen = sftjax.from_hf_dict(QWEN25_05B)
    assert qwen.qkv_bias and not qwen.o_bias and qwen.sliding_window is None and qwen.tie_word_embeddings
    assert qwen.num_params() == 494_032_768  # Qwen2.5-0.5B


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("layout", ["v5", "v4"])
def test_round_trip_through_transformers(family, layout, tmp_path):
    """HF config -> sftjax -> config.json -> transformers: the same architecture, read back unchanged."""
    hf = hf_config(family)
    d = hf.to_dict()
    if layout == "v4":  # rewrite the RoPE settings as transformers 4.x wrote them
        rope = d.pop("rope_parameters")
        d["rope_theta"] = rope.pop("rope_theta")
        if rope["rope_type"] != "default":
            d["rope_scaling"] = {**rope, "type": rope.pop("rope_type")}
    cfg = sftjax.from_hf_dict(d)
    assert sftjax.from_hf_dict(sftjax.to_hf_dict(cfg)) == cfg
    (tmp_path / "config.json").write_text(json.dumps(sftjax.to_hf_dict(cfg)))
    back = transformers.AutoConfig.from_pretrained(tmp_path)
    assert type(back) is type(hf)
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "hidden_act", "rms_norm_eps", "tie_word_embeddings",
                "sliding_window", "layer_types", "attention_bias", "mlp_bias", "rope_parameters"):
        assert getattr(back, key, None) == getattr(hf, key, None), key
    assert load_hf_config(tmp_path) == cfg


def test_presets_are_valid_and_round_trip():
    for name, cfg in PRESETS.items():
        assert sftjax.from_hf_dict(sftjax.to_hf_dict(cfg)) == cfg, name
    assert 1.2e9 < PRESETS["llama-3.2-1b"].num_params() < 1.3e9


@pytest.mark.parametrize("hf,message", [
    ({**MISTRAL_7B, "model_type": "gemma2"}, "model_type 'gemma2' is not supported"),
    ({k: v for k, v in MISTRAL_7B.items() if k != "hidden_size"}, "missing key 'hidden_size'"),
    ({k: v for k, v in MISTRAL_7B.items() if k != "model_type"}, "missing key 'model_type'"),
    ({**MISTRAL_7B, "rope_scaling": {"type": "yarn", "factor": 4.0}}, "rope_type 'yarn' is not supported"),
    ({**MISTRAL_7B, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "needs key 'low_freq_factor'"),
    ({**MISTRAL_7B, "num_key_value_heads": 5}, "num_kv_heads=5 must divide num_heads=32"),
    ({**MISTRAL_7B, "hidden_act": "swish2"}, "hidden_act='swish2' is not supported"),
])
def test_bad_config_json(hf, message):
    with pytest.raises(sftjax.ConfigError, match=message) as info:
        sftjax.from_hf_dict(hf, source="some/dir/config.json")
    assert str(info.value).startswith("some/dir/config.json: ") and "\n" not in str(info.value)


def test_config_json_file_errors(tmp_path):
    with pytest.raises(sftjax.ConfigError, match=r"config.json: not found"):
        load_hf_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(sftjax.ConfigError, match=r"config.json: not valid JSON"):
        load_hf_config(tmp_path)


def test_impossible_model_config_values():
    cfg = PRESETS["tiny-llama"]
    for changes, message in [({"num_layers": 0}, "num_layers=0 must be a positive integer"),
                             ({"head_dim": 33}, "head_dim=33 must be even"),
                             ({"dtype": "float64"}, "dtype='float64' is not a supported dtype"),
                             ({"remat": "some"}, "remat='some' is not one of"),
                             ({"attention_block": 0}, "attention_block=0 must be a positive integer"),
                             ({"family": "gpt2"}, "family='gpt2' is not supported")]:
        with pytest.raises(sftjax.ConfigError, match=message):
            cfg.replace(**changes)
    with pytest.raises(sftjax.ConfigError, match="qk_norm=True cannot be expressed for family 'llama'"):
        sftjax.to_hf_dict(cfg.replace(qk_norm=True))
