"""PEFT adapter files both ways, against huggingface/peft itself.

- export: sftjax adapters (B made non-zero) -> save_adapter -> peft.PeftModel.from_pretrained gives sftjax's logits
- import: a PeftModel (non-zero B, modules_to_save changed) -> save_pretrained -> load_adapter gives PEFT's logits
- round trip: save -> load returns the same spec and bit-identical arrays
- adapters that do not fit: one-line errors naming the file and the key or tensor

float32, highest matmul precision (tests/conftest.py). Logits of these 2-layer width-64 models agree to ~1e-6
(summation order only); the tolerance is 1e-4 absolute, and every adapter moves the logits by more than 100x that,
so a mis-mapped or dropped tensor cannot pass.
"""

import dataclasses
import json
import warnings

import jax
import numpy as np
import peft
import pytest
import torch

from sftjax.errors import CheckpointError, ConfigError
from sftjax.model import safetensors_io
from sftjax.model.config import ModelConfig
from sftjax.model.hf import load_pretrained
from sftjax.model.transformer import forward, init_params
from sftjax.peft import lora, peft_io
from sftjax.train.state import merge_params
from tests.model import hf_models

ATOL = 1e-4  # |sftjax - PEFT| on float32 logits
EFFECT = 100 * ATOL  # the adapter must move the logits by at least this much, or the parity check proves nothing
TOKENS = np.random.default_rng(0).integers(0, hf_models.VOCAB, (2, 16))
P = peft_io.PREFIX


@pytest.fixture(scope="module")
def hf_model_dir(tmp_path_factory):
    """family -> (directory of a tiny random HF model, its sftjax cfg, params); each built once per module."""
    cache = {}

    def get(family):
        if family not in cache:
            directory = tmp_path_factory.mktemp(family)
            hf_models.build(directory, family, seed=len(cache))
            cache[family] = (directory, *load_pretrained(directory))
        return cache[family]
    return get


def _random_b(adapters, seed=1, std=0.1):
    """Adapters with a non-zero B (a fresh adapter is a no-op, which would let every equality pass)."""
    keys = iter(jax.random.split(jax.random.key(seed), 64))
    return jax.tree_util.tree_map_with_path(
        lambda p, x: x + std * jax.random.normal(next(keys), x.shape) if p[-1].key == "lora_b" else x, adapters)


def _perturb_full_modules(trainable, seed=2, std=0.1):
    """Change every fully trained module (embed_tokens, lm_head, norm) so that saving it must matter."""
    keys = iter(jax.random.split(jax.random.key(seed), 8))
    return {k: v if k == "layers" else jax.tree.map(lambda x: x + std * jax.random.normal(next(keys), x.shape), v)
            for k, v in trainable.items()}


def _sftjax_logits(cfg, spec, frozen, trainable):
    return np.asarray(forward(lora.model_config(cfg, spec), merge_params(frozen, trainable), TOKENS))


def _peft_logits(directory, adapter):
    """Logits of PEFT's own loading of `adapter`; fails on any missing / unexpected-key warning."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = peft.PeftModel.from_pretrained(hf_models.load_hf(directory), adapter).eval()
    key_warnings = [str(w.message) for w in caught if "keys" in str(w.message).lower()]
    assert not key_warnings, key_warnings
    return hf_models.hf_logits(model, TOKENS), model


def _assert_parity(ours, theirs, base):
    assert np.abs(ours - theirs).max() < ATOL
    assert np.abs(theirs - base).max() > EFFECT


# ----------------------------------------------------------------------------------------------------------------
# sftjax -> PEFT


@pytest.mark.parametrize("family,targets,rslora,trainable_modules", [
    ("llama", "all-linear", False, ()),  # q/k/v/o and MLP biases, tied embeddings
    ("qwen2", ["q_proj", "v_proj"], False, ()),  # q/k/v bias
    ("gemma", ["q_proj", "v_proj"], True, ()),  # head_dim != D / N, (1 + w) norms
    ("qwen3", "all-linear", True, ()),  # q/k norms
    ("qwen3", ["q_proj", "v_proj"], False, ("embed_tokens", "lm_head", "norm")),  # untied: modules_to_save
    ("llama", ["v_proj"], False, ("embed_tokens",)),  # tied: PEFT must use the trained embedding as lm_head too
    ("gemma", ["o_proj"], True, ("embed_tokens", "norm")),  # tied, and the final norm only (not the layer norms)
])
def test_export_loads_in_peft(hf_model_dir, tmp_path, family, targets, rslora, trainable_modules):
    directory, cfg, params = hf_model_dir(family)
    spec = lora.LoraSpec(rank=4, alpha=8, target_modules=targets, rslora=rslora, trainable_modules=trainable_modules)
    frozen, trainable = lora.split(params, spec, _random_b(lora.init_adapters(cfg, spec, jax.random.key(0))))
    trainable = _perturb_full_modules(trainable)
    peft_io.save_adapter(tmp_path / "adapter", cfg, spec, trainable, base_model_name_or_path=str(directory))

    base = hf_models.hf_logits(hf_models.load_hf(directory), TOKENS)
    theirs, model = _peft_logits(directory, tmp_path / "adapter")
    _assert_parity(_sftjax_logits(cfg, spec, frozen, trainable), theirs, base)
    config = model.peft_config["default"]
    assert (config.r, config.lora_alpha, config.use_rslora) == (4, 8, rslora)
    expected = {m[-1] for m in lora.select_targets(cfg, targets)}
    assert set(config.target_modules) == expected
    assert sum("lora_A" in name for name, _ in model.named_parameters()) == len(expected) * cfg.num_layers
    # only the final norm is copied, never input_layernorm / q_norm (PEFT's suffix rule would catch "norm")
    copies = {name for name, _ in model.named_modules() if name.endswith("modules_to_save")}
    assert len(copies) == len(trainable_modules) + (cfg.tie_word_embeddings and "embed_tokens" in trainable_modules)


def test_export_bfloat16_is_what_peft_loads(hf_model_dir, tmp_path):
    directory, cfg, params = hf_model_dir("qwen2")
    spec = lora.LoraSpec(rank=4, alpha=8, target_modules="all-linear")
    frozen, trainable = lora.split(params, spec, _random_b(lora.init_adapters(cfg, spec, jax.random.key(0))))
    peft_io.save_adapter(tmp_path / "adapter", cfg, spec, trainable, dtype="bfloat16")
    stored = safetensors_io.load_file(tmp_path / "adapter" / peft_io.WEIGHTS_FILE)
    assert {str(x.dtype) for x in stored.values()} == {"bfloat16"}
    rounded = jax.tree.map(lambda x: x.astype("bfloat16").astype("float32"), trainable)
    theirs, _ = _peft_logits(directory, tmp_path / "adapter")
    assert np.abs(_sftjax_logits(cfg, spec, frozen, rounded) - theirs).max() < ATOL


# ----------------------------------------------------------------------------------------------------------------
# PEFT -> sftjax


@pytest.mark.parametrize("family,kwargs", [
    ("llama", {"target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}),
    ("qwen2", {"target_modules": r".*\.(q|v)_proj", "use_rslora": True, "lora_dropout": 0.1}),  # one full-match regex
    ("gemma", {"target_modules": "all-linear", "use_rslora": True}),
    ("qwen3", {"target_modules": ["self_attn.o_proj", "mlp.up_proj"],
               "modules_to_save": ["embed_tokens", "lm_head", "model.norm"]}),
    ("llama", {"target_modules": ["v_proj"], "modules_to_save": ["embed_tokens"], "ensure_weight_tying": True}),
])
def test_import_from_peft(hf_model_dir, tmp_path, family, kwargs):
    directory, cfg, params = hf_model_dir(family)
    model = hf_models.load_hf(directory)
    base = hf_models.hf_logits(model, TOKENS)
    # init_lora_weights=False keeps torch's default (non-zero) init of B, so the adapter changes the output
    config = peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, task_type="CAUSAL_LM", **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's tied-embedding advice
        model = peft.get_peft_model(model, config).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, peft.utils.other.ModulesToSaveWrapper):
                weight = module.modules_to_save["default"].weight
                weight.add_(0.1 * torch.randn(weight.shape, generator=gen))
    theirs = hf_models.hf_logits(model, TOKENS)
    model.save_pretrained(tmp_path / "adapter")

    spec, adapters = peft_io.load_adapter(tmp_path / "adapter", cfg)
    _assert_parity(_sftjax_logits(cfg, spec, params, adapters), theirs, base)
    assert (spec.rank, spec.alpha, spec.rslora) == (4, 8.0, kwargs.get("use_rslora", False))
    assert spec.dropout == kwargs.get("lora_dropout", 0.0)
    # PEFT writes a list in set order ("all-linear" expanded); a regex stays a string
    assert lora.select_targets(cfg, spec.target_modules) == lora.select_targets(cfg, kwargs["target_modules"])
    assert isinstance(spec.target_modules, str) == str(kwargs["target_modules"]).startswith(".*")
    assert set(spec.trainable_modules) == {n.removeprefix("model.") for n in kwargs.get("modules_to_save", [])}


# ----------------------------------------------------------------------------------------------------------------
# Round trip

CFG = ModelConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=2,
                  head_dim=16, qkv_bias=True)
# target_modules in tree order: save writes the adapted modules in that order, so this spec round-trips exactly
SPEC = lora.LoraSpec(rank=4, alpha=8.0, dropout=0.05, target_modules=("down_proj", "q_proj", "v_proj"),
                     rslora=True, init="gaussian", trainable_modules=("embed_tokens", "lm_head", "norm"))


def _saved(directory, cfg=CFG, spec=SPEC, **kwargs):
    """Save random adapters (non-zero B, changed full modules) for cfg / spec; return the trainable tree."""
    _, trainable = lora.split(init_params(cfg, jax.random.key(0)), spec,
                              _random_b(lora.init_adapters(cfg, spec, jax.random.key(1))))
    trainable = _perturb_full_modules(trainable)
    peft_io.save_adapter(directory, cfg, spec, trainable, **kwargs)
    return trainable


def test_round_trip_is_exact(tmp_path):
    trainable = _saved(tmp_path / "a", base_model_name_or_path="some/base")
    spec, loaded = peft_io.load_adapter(tmp_path / "a", CFG)
    assert spec == SPEC
    assert jax.tree.structure(loaded) == jax.tree.structure(trainable)
    jax.tree.map(np.testing.assert_array_equal, loaded, trainable)
    config = json.loads((tmp_path / "a" / peft_io.CONFIG_FILE).read_text())
    assert config["target_modules"] == ["down_proj", "q_proj", "v_proj"]  # the modules that have adapters
    assert config["modules_to_save"] == ["embed_tokens", "lm_head", "model.norm"]
    assert config["base_model_name_or_path"] == "some/base" and config["init_lora_weights"] == "gaussian"
    assert config["ensure_weight_tying"] is False


def test_round_trip_all_linear_and_bfloat16(tmp_path):
    spec = lora.LoraSpec(rank=2, alpha=4, target_modules="all-linear")
    trainable = _saved(tmp_path / "a", spec=spec, dtype="bfloat16")
    loaded_spec, loaded = peft_io.load_adapter(tmp_path / "a", CFG)
    assert lora.select_targets(CFG, loaded_spec.target_modules) == lora.select_targets(CFG, "all-linear")
    assert dataclasses.replace(loaded_spec, target_modules="all-linear") == spec
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b.astype("bfloat16").astype("float32")),
                 loaded, trainable)


def test_save_refuses_a_non_empty_directory(tmp_path):
    _saved(tmp_path / "a")
    with pytest.raises(CheckpointError, match="not empty.*overwrite=True") as e:
        _saved(tmp_path / "a")
    assert "\n" not in str(e.value)
    (tmp_path / "a" / peft_io.PICKLE_FILE).write_bytes(b"stale")
    trainable = _saved(tmp_path / "a", spec=lora.LoraSpec(rank=2, target_modules=("k_proj",)), overwrite=True)
    spec, loaded = peft_io.load_adapter(tmp_path / "a", CFG)
    assert spec.rank == 2 and not (tmp_path / "a" / peft_io.PICKLE_FILE).exists()
    jax.tree.map(np.testing.assert_array_equal, loaded, trainable)


def test_save_checks_the_tree_against_the_spec(tmp_path):
    _, trainable = lora.split(init_params(CFG, jax.random.key(0)), SPEC,
                              lora.init_adapters(CFG, SPEC, jax.random.key(1)))
    with pytest.raises(ConfigError, match="target_modules"):
        peft_io.save_adapter(tmp_path / "a", CFG, lora.LoraSpec(rank=4, target_modules=("q_proj",)), trainable)
    assert not (tmp_path / "a").exists()


# ----------------------------------------------------------------------------------------------------------------
# Adapters that do not fit: one line naming the file and the key or tensor

Q0 = f"{P}model.layers.0.self_attn.q_proj.lora_A.weight"


def _edit_config(directory, **changes):
    path = directory / peft_io.CONFIG_FILE
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def _edit_tensors(directory, edit):
    path = directory / peft_io.WEIGHTS_FILE
    tensors = {k: np.array(v) for k, v in safetensors_io.load_file(path).items()}
    edit(tensors)
    safetensors_io.save_file(tensors, path)


def _add(name, shape):
    """An edit that adds (or replaces) a zero tensor."""
    def edit(tensors):
        tensors[name] = np.zeros(shape, np.float32)
    return edit


def _drop(*names):
    def edit(tensors):
        for name in names:
            del tensors[name]
    return edit


BAD = [  # (id, edit of a good adapter directory, error, file, words the message must hold)
    ("no config", lambda d: (d / peft_io.CONFIG_FILE).unlink(), CheckpointError, "", peft_io.CONFIG_FILE),
    ("pickle", lambda d: ((d / peft_io.WEIGHTS_FILE).rename(d / peft_io.PICKLE_FILE)), CheckpointError, "",
     "adapter_model.bin (pickle, refused"),
    ("not json", lambda d: (d / peft_io.CONFIG_FILE).write_text("{r: 4"), CheckpointError, peft_io.CONFIG_FILE,
     "not JSON"),
    ("peft_type", lambda d: _edit_config(d, peft_type="IA3"), ConfigError, peft_io.CONFIG_FILE, "peft_type='IA3'"),
    ("task_type", lambda d: _edit_config(d, task_type="SEQ_CLS"), ConfigError, peft_io.CONFIG_FILE, "task_type"),
    ("bias", lambda d: _edit_config(d, bias="lora_only"), ConfigError, peft_io.CONFIG_FILE, "bias='lora_only'"),
    ("rank_pattern", lambda d: _edit_config(d, rank_pattern={"q_proj": 8}), ConfigError, peft_io.CONFIG_FILE,
     "rank_pattern={'q_proj': 8}: per-module ranks are not supported"),
    ("alpha_pattern", lambda d: _edit_config(d, alpha_pattern={"v_proj": 2}), ConfigError, peft_io.CONFIG_FILE,
     "alpha_pattern"),
    ("dora", lambda d: _edit_config(d, use_dora=True), ConfigError, peft_io.CONFIG_FILE, "use_dora=True: DoRA"),
    ("fan_in_fan_out", lambda d: _edit_config(d, fan_in_fan_out=True), ConfigError, peft_io.CONFIG_FILE,
     "fan_in_fan_out=True"),
    ("pissa", lambda d: _edit_config(d, init_lora_weights="pissa_niter_4"), ConfigError, peft_io.CONFIG_FILE,
     "init_lora_weights='pissa_niter_4': PEFT rewrites the base weights"),
    ("rank", lambda d: _edit_config(d, r=0), ConfigError, peft_io.CONFIG_FILE, "r=0"),
    ("config rank vs tensors", lambda d: _edit_config(d, r=8, rank_pattern={}), CheckpointError,
     peft_io.WEIGHTS_FILE, "layers.0.mlp.down_proj.lora_A.weight' has shape [4, 96], expected [8, 96]"),
    ("layer out of range", lambda d: _edit_tensors(d, _add(Q0.replace("layers.0", "layers.5"), (4, 64))),
     CheckpointError, peft_io.WEIGHTS_FILE, "layers.5.self_attn.q_proj.lora_A.weight': layer 5, but the model has 2"),
    ("in-features", lambda d: _edit_tensors(d, _add(Q0, (4, 32))), CheckpointError, peft_io.WEIGHTS_FILE,
     f"{Q0!r} has shape [4, 32], expected [4, 64]"),
    ("unknown module", lambda d: _edit_tensors(d, _add(f"{P}model.layers.0.mlp.fc1.lora_A.weight", (4, 64))),
     CheckpointError, peft_io.WEIGHTS_FILE, "mlp.fc1.lora_A.weight': this llama model has no linear module 'mlp.fc1'"),
    ("lora on lm_head", lambda d: _edit_tensors(d, _add(f"{P}lm_head.lora_A.weight", (4, 64))), CheckpointError,
     peft_io.WEIGHTS_FILE, "lm_head.lora_A.weight': sftjax adapts only the linear layers"),
    ("missing lora_B", lambda d: _edit_tensors(d, _drop(Q0.replace("layers.0", "layers.1").replace("_A", "_B"))),
     CheckpointError, peft_io.WEIGHTS_FILE, "missing tensor 'base_model.model.model.layers.1.self_attn.q_proj.lora_B"),
    ("some layers", lambda d: _edit_tensors(d, _drop(*(Q0.replace("layers.0", "layers.1").replace("_A", h)
                                                       for h in ("_A", "_B")))),
     CheckpointError, peft_io.WEIGHTS_FILE, "q_proj.lora_A.weight': q_proj has adapters in layers [0] of 2"),
    ("target_modules vs tensors", lambda d: _edit_config(d, target_modules=["q_proj", "k_proj", "v_proj",
                                                                            "down_proj"]),
     CheckpointError, peft_io.WEIGHTS_FILE, "missing tensor 'base_model.model.model.layers.0.self_attn.k_proj.lora_A"),
    ("bad target_modules", lambda d: _edit_config(d, target_modules="model.layers.0.*"), ConfigError,
     peft_io.CONFIG_FILE, "target_modules"),
    ("layer norm copy", lambda d: _edit_tensors(d, _add(f"{P}model.layers.0.input_layernorm.weight", (64,))),
     CheckpointError, peft_io.WEIGHTS_FILE, "input_layernorm.weight': a fully trained copy (modules_to_save)"),
    ("not in modules_to_save", lambda d: _edit_config(d, modules_to_save=["lm_head", "model.norm"]), CheckpointError,
     peft_io.WEIGHTS_FILE, "embed_tokens.weight' is not a module listed in modules_to_save"),
    ("resized vocabulary", lambda d: _edit_tensors(d, _add(f"{P}model.embed_tokens.weight", (98, 64))),
     CheckpointError, peft_io.WEIGHTS_FILE, "embed_tokens.weight' has shape [98, 64], expected [96, 64]"),
    ("unknown tensor", lambda d: _edit_tensors(d, _add("model.layers.0.self_attn.q_proj.weight", (64, 64))),
     CheckpointError, peft_io.WEIGHTS_FILE, "does not start with 'base_model.model.'"),
]


@pytest.mark.parametrize("edit,error,file,words", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_adapter_one_line_error(tmp_path, edit, error, file, words):
    _saved(tmp_path / "a")
    edit(tmp_path / "a")
    with pytest.raises(error) as e:
        peft_io.load_adapter(tmp_path / "a", CFG)
    message = str(e.value)
    assert "\n" not in message
    assert str(tmp_path / "a" / file) in message and words in message, message


def test_another_architecture_is_refused(tmp_path):
    _saved(tmp_path / "a")
    with pytest.raises(CheckpointError, match=r"down_proj.lora_B.weight' has shape \[64, 4\], expected \[96, 4\]"):
        peft_io.load_adapter(tmp_path / "a", CFG.replace(hidden_size=96))


def test_tied_embedding_needs_the_trained_output_layer(tmp_path):
    """On a tied model PEFT's output layer is the trained embedding only with ensure_weight_tying or a stored
    lm_head."""
    tied = CFG.replace(tie_word_embeddings=True)
    spec = lora.LoraSpec(rank=4, target_modules=("q_proj",), trainable_modules=("embed_tokens",))
    _saved(tmp_path / "a", cfg=tied, spec=spec)
    assert peft_io.load_adapter(tmp_path / "a", tied)[0] == spec
    _edit_config(tmp_path / "a", ensure_weight_tying=False)  # PEFT then loads lm_head.weight over the base: fine
    assert peft_io.load_adapter(tmp_path / "a", tied)[0] == spec
    _edit_tensors(tmp_path / "a", _drop(f"{P}lm_head.weight"))  # what PEFT saves by default: lm_head stays base
    with pytest.raises(ConfigError, match="adapter_config.json: ensure_weight_tying=false and no .* tied") as e:
        peft_io.load_adapter(tmp_path / "a", tied)
    assert "\n" not in str(e.value)
    _edit_tensors(tmp_path / "a", _add(f"{P}lm_head.weight", (96, 64)))  # zeros: not the trained embedding
    with pytest.raises(CheckpointError, match="lm_head.weight' differs from the trained embed_tokens"):
        peft_io.load_adapter(tmp_path / "a", tied)
