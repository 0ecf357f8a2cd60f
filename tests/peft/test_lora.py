"""LoRA: target selection (PEFT's rules), initialisation, merged == unmerged, gradients and optimizer state for the
adapters only, dropout only in training, QLoRA == LoRA on the dequantized base, and the bad-input errors.

float32, highest matmul precision (tests/conftest.py). Tolerances are stated where used.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sftjax.errors import ConfigError
from sftjax.model import attention, layers, transformer
from sftjax.model.config import ModelConfig
from sftjax.model.transformer import forward, init_params
from sftjax.peft import adapted, lora, quant
from sftjax.train.state import merge_params

CFG = ModelConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_layers=3, num_heads=4, num_kv_heads=2,
                  head_dim=16, qkv_bias=True)
TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 96, (2, 12)), jnp.int32)
ALL = ["down_proj", "gate_proj", "up_proj", "k_proj", "o_proj", "q_proj", "v_proj"]


@pytest.fixture(scope="module")
def base():
    return init_params(CFG, jax.random.key(0))


def _random_b(adapters, seed=1, std=0.05):
    """Adapters with a non-zero B (a fresh adapter is a no-op, which would let every equality pass)."""
    keys = iter(jax.random.split(jax.random.key(seed), 64))
    return jax.tree_util.tree_map_with_path(
        lambda p, x: x + std * jax.random.normal(next(keys), x.shape) if p[-1].key == "lora_b" else x, adapters)


@pytest.mark.parametrize("targets,expected", [
    ("all-linear", ALL),
    (["q_proj", "v_proj"], ["q_proj", "v_proj"]),
    (["self_attn.o_proj", "mlp.up_proj"], ["up_proj", "o_proj"]),  # suffixes with dots, as PEFT
    (r"model\.layers\.\d+\.mlp\.(gate|up)_proj", ["gate_proj", "up_proj"]),  # one regex: full match
    (r".*_proj", ALL),
])
def test_targets_follow_peft_rules(targets, expected):
    assert [m[-1] for m in lora.select_targets(CFG, targets)] == expected


def test_adapter_shapes_and_init(base):
    spec = lora.LoraSpec(rank=8, alpha=16, target_modules="all-linear")
    adapters = lora.init_adapters(CFG, spec, jax.random.key(3))
    q = adapters["layers"]["self_attn"]["q_proj"]
    assert q["lora_a"].shape == (3, 64, 8) and q["lora_b"].shape == (3, 8, 64)
    assert adapters["layers"]["mlp"]["down_proj"]["lora_a"].shape == (3, 96, 8)
    assert adapters["layers"]["self_attn"]["k_proj"]["lora_b"].shape == (3, 8, 32)
    assert all(not np.any(x) for x in jax.tree.leaves(adapters) if x.shape[-2] == 8)  # every B is 0
    bound = 1 / np.sqrt(64)  # kaiming_uniform_(a=sqrt(5)) on [R, in]: U(-1/sqrt(in), 1/sqrt(in))
    a = np.asarray(q["lora_a"])
    assert np.abs(a).max() <= bound and np.abs(a).max() > 0.9 * bound and abs(a.mean()) < 0.1 * bound
    gauss = lora.init_adapters(CFG, lora.LoraSpec(rank=8, init="gaussian"), jax.random.key(3))
    assert np.std(np.asarray(gauss["layers"]["mlp"]["up_proj"]["lora_a"])) == pytest.approx(1 / 8, rel=0.1)
    # a fresh adapter leaves the model unchanged (exactly: B = 0)
    np.testing.assert_array_equal(forward(lora.model_config(CFG, spec), merge_params(base, adapters), TOKENS),
                                  forward(CFG, base, TOKENS))


def test_scale_and_rslora():
    assert lora.LoraSpec(rank=16, alpha=32).scale == 2.0
    assert lora.LoraSpec(rank=16, alpha=32, rslora=True).scale == 8.0


def _manual_forward(base, adapters, scale):
    """The LoRA model written out: every adapted kernel replaced by W + scale * A B (float32)."""
    params = jax.tree.map(lambda x: x, base)
    for module in lora.adapter_modules(adapters):
        node = params
        for key in module:
            node = node[key]
        ad = adapters
        for key in module:
            ad = ad[key]
        node["kernel"] = node["kernel"] + scale * jnp.einsum("Lir,Lro->Lio", ad["lora_a"], ad["lora_b"])
    return forward(CFG, params, TOKENS)


@pytest.mark.parametrize("rslora", [False, True])
def test_merged_equals_unmerged(base, rslora):
    spec = lora.LoraSpec(rank=4, alpha=8, rslora=rslora, target_modules=["q_proj", "v_proj", "down_proj"])
    adapters = _random_b(lora.init_adapters(CFG, spec, jax.random.key(1)))
    unmerged = forward(lora.model_config(CFG, spec), merge_params(base, adapters), TOKENS)
    merged_params, errors = lora.merge(merge_params(base, adapters), spec.scale)
    assert errors == {} and not lora.adapter_modules(merged_params)
    merged = forward(CFG, merged_params, TOKENS)
    assert np.abs(unmerged - forward(CFG, base, TOKENS)).max() > 1e-2  # the adapter changes the model
    np.testing.assert_allclose(merged, unmerged, atol=1e-5)  # f32: merge reorders the sums
    np.testing.assert_allclose(_manual_forward(base, adapters, spec.scale), unmerged, atol=1e-5)


def test_a_large_rank_trains_through_the_merged_weight_with_the_same_values_and_gradients(base, monkeypatch):
    # rank 16 on 64-wide layers over 4 x 64 tokens: x @ (W + s A @ B) costs fewer FLOPs than the factors
    assert adapted.lora_merge_pays(256, 64, 64, 16) and adapted.lora_merge_pays(256, 64, 32, 16)
    assert not adapted.lora_merge_pays(256, 512, 512, 16)  # the bench config's rank-16 adapters stay factored
    assert not adapted.lora_merge_pays(4, 64, 64, 16)  # so does decoding one token per row
    spec = lora.LoraSpec(rank=16, alpha=32)
    adapters = _random_b(lora.init_adapters(CFG, spec, jax.random.key(1)))
    cfg = lora.model_config(CFG, spec)
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 96, (4, 64)), jnp.int32)

    def loss_and_grads():
        jax.clear_caches()  # `forward` is jitted: trace it again with the current `lora_merge_pays`
        return jax.value_and_grad(lambda t: jnp.mean(forward(cfg, merge_params(base, t), tokens) ** 2))(adapters)

    decisions, pays = [], adapted.lora_merge_pays

    def spy(*args):
        decisions.append(pays(*args))
        return decisions[-1]

    monkeypatch.setattr(adapted, "lora_merge_pays", spy)
    merged = loss_and_grads()
    assert len(decisions) == 7 and all(decisions)  # every adapted linear (one scanned layer traced) ran merged
    monkeypatch.setattr(adapted, "lora_merge_pays", lambda *a: False)
    factored = loss_and_grads()
    assert abs(float(merged[0]) - float(factored[0])) < 1e-6 * abs(float(factored[0]))  # f32: other sum order
    for m, f in zip(jax.tree.leaves(merged[1]), jax.tree.leaves(factored[1])):
        assert np.abs(f).max() > 0
        np.testing.assert_allclose(m, f, rtol=1e-4, atol=1e-6 * np.abs(f).max())


@pytest.mark.parametrize("targets", [["q_proj", "v_proj", "gate_proj"], "all-linear"])
def test_adapters_sharing_an_input_share_their_first_product_with_the_same_values_and_gradients(
        base, targets, monkeypatch):
    """`AdaptedLinear.apply` runs one x @ [A_q A_v] for q and v (k has no adapter here), one x @ A_gate; the reference
    applies every layer alone (experiments/bench/ab.py's unfused_projections)."""
    spec = lora.LoraSpec(rank=4, alpha=8, target_modules=targets)
    adapters = _random_b(lora.init_adapters(CFG, spec, jax.random.key(1)))
    cfg = lora.model_config(CFG, spec)

    def loss_and_grads():
        jax.clear_caches()  # `forward` is jitted: trace it again with the current `dense`
        return jax.value_and_grad(lambda t: jnp.mean(forward(cfg, merge_params(base, t), TOKENS) ** 2))(adapters)

    first_products, linear = [], adapted.linear

    def spy(x, w):
        first_products.append(w.shape)
        return linear(x, w)

    monkeypatch.setattr(adapted, "linear", spy)
    shared = loss_and_grads()
    n_qkv, n_mlp = (2, 1) if targets != "all-linear" else (3, 2)
    assert (64, 4 * n_qkv) in first_products and (64, 4 * n_mlp) in first_products  # one [in, n R] per group
    monkeypatch.setattr(adapted, "linear", linear)
    alone = lambda x, ws, c: [y for w in ws for y in layers.dense(x, [w], c)]  # noqa: E731
    monkeypatch.setattr(attention, "dense", alone)
    monkeypatch.setattr(transformer, "dense", alone)
    separate = loss_and_grads()
    assert abs(float(shared[0]) - float(separate[0])) < 1e-6 * abs(float(separate[0]))  # f32: other sum order
    for a, b in zip(jax.tree.leaves(shared[1]), jax.tree.leaves(separate[1])):
        assert np.abs(b).max() > 0
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6 * np.abs(b).max())


def test_gradients_and_optimizer_state_cover_the_adapters_only(base):
    spec = lora.LoraSpec(rank=4, alpha=8, target_modules=["q_proj"], trainable_modules=("lm_head",))
    adapters = lora.init_adapters(CFG, spec, jax.random.key(1))
    frozen, trainable = lora.split(base, spec, adapters)
    assert "lm_head" not in frozen and set(trainable) == {"layers", "lm_head"}
    cfg = lora.model_config(CFG, spec)

    def loss(trainable):
        return jnp.mean(forward(cfg, merge_params(frozen, trainable), TOKENS) ** 2)

    grads = jax.grad(loss)(trainable)
    assert jax.tree.structure(grads) == jax.tree.structure(trainable)
    assert np.abs(grads["layers"]["self_attn"]["q_proj"]["lora_b"]).max() > 0  # B gets the first gradient
    opt_state = optax.adamw(1e-3).init(trainable)
    assert lora.count(opt_state) == 2 * lora.count(trainable) + 1  # mu, nu (+ count): nothing for the base
    assert lora.count(trainable) == 3 * (64 * 4 + 4 * 64) + 64 * 96


def test_lora_dropout_only_in_training(base):
    spec = lora.LoraSpec(rank=4, alpha=8, dropout=0.5, target_modules=["q_proj"])
    adapters = _random_b(lora.init_adapters(CFG, spec, jax.random.key(1)))
    cfg, params = lora.model_config(CFG, spec), merge_params(base, adapters)
    no_dropout = forward(lora.model_config(CFG, lora.LoraSpec(rank=4, alpha=8)), params, TOKENS)
    np.testing.assert_array_equal(forward(cfg, params, TOKENS), no_dropout)  # eval: no dropout
    train_a = forward(cfg, params, TOKENS, dropout_rng=jax.random.key(0))
    train_b = forward(cfg, params, TOKENS, dropout_rng=jax.random.key(1))
    assert np.abs(train_a - no_dropout).max() > 1e-4 and np.abs(train_a - train_b).max() > 1e-4
    # dropout touches only the adapter branch: with B = 0 training and eval agree exactly
    fresh = merge_params(base, lora.init_adapters(CFG, spec, jax.random.key(1)))
    np.testing.assert_array_equal(forward(cfg, fresh, TOKENS, dropout_rng=jax.random.key(0)),
                                  forward(CFG, base, TOKENS))


@pytest.mark.parametrize("kind", ["nf4", "int4"])
def test_qlora_equals_lora_on_the_dequantized_base(base, kind):
    spec = lora.LoraSpec(rank=4, alpha=8)
    adapters = _random_b(lora.init_adapters(CFG, spec, jax.random.key(1)))
    cfg = lora.model_config(CFG, spec)
    quantized = quant.quantize_params(base, kind, double_quant=True)
    assert "qkernel" in quantized["layers"]["mlp"]["up_proj"] and "kernel" not in quantized["layers"]["mlp"]["up_proj"]
    dequantized = quant.dequantize_params(quantized)
    qlora = forward(cfg, merge_params(quantized, adapters), TOKENS)
    lora_on_dq = forward(cfg, merge_params(dequantized, adapters), TOKENS)
    np.testing.assert_allclose(qlora, lora_on_dq, atol=1e-5)  # same weights, dequantized inside vs outside
    grads_q = jax.grad(lambda a: jnp.sum(forward(cfg, merge_params(quantized, a), TOKENS) ** 2))(adapters)
    grads_f = jax.grad(lambda a: jnp.sum(forward(cfg, merge_params(dequantized, a), TOKENS) ** 2))(adapters)
    for gq, gf in zip(jax.tree.leaves(grads_q), jax.tree.leaves(grads_f)):
        np.testing.assert_allclose(gq, gf, rtol=1e-4, atol=1e-4)


def _grad_temp_bytes(cfg, frozen, adapters, tokens):
    """XLA's temp buffer bytes of the compiled gradient w.r.t. the adapters (activations and what the backward
    pass keeps)."""
    loss = lambda a: jnp.sum(forward(cfg, merge_params(frozen, a), tokens) ** 2)  # noqa: E731
    return jax.jit(jax.grad(loss)).lower(adapters).compile().memory_analysis().temp_size_in_bytes


def test_qlora_backward_keeps_no_dequantized_copy_of_the_base():
    """The QLoRA gradient needs about the temp memory of LoRA on a float base, not that plus every layer's
    dequantized weights (`adapted.qlinear` dequantizes again in the backward pass). A model whose weights dwarf
    its activations (8 tokens): all layers' dequantized weights are 18.9 MB, one layer's 2.4 MB."""
    cfg0 = ModelConfig(vocab_size=64, hidden_size=256, intermediate_size=512, num_layers=8, num_heads=4,
                       num_kv_heads=2, head_dim=64)
    params = init_params(cfg0, jax.random.key(0))
    spec = lora.LoraSpec(rank=4, alpha=8)
    adapters = lora.init_adapters(cfg0, spec, jax.random.key(1))
    cfg = lora.model_config(cfg0, spec)
    tokens = TOKENS[:1, :8] % 64
    quantized = quant.quantize_params(params, "nf4", double_quant=True)
    dequantized_bytes = quant.tree_bytes(quant.dequantize_params(quantized)["layers"])
    extra = _grad_temp_bytes(cfg, quantized, adapters, tokens) - _grad_temp_bytes(cfg, params, adapters, tokens)
    assert extra < 0.25 * dequantized_bytes, (extra, dequantized_bytes)  # measured: 8 KB after, 19.5 MB before


def test_merge_into_a_quantized_base_reports_the_requantization_error(base):
    spec = lora.LoraSpec(rank=4, alpha=8, target_modules=["q_proj"])
    adapters = _random_b(lora.init_adapters(CFG, spec, jax.random.key(1)))
    quantized = quant.quantize_params(base, "nf4", double_quant=True)
    unmerged = forward(lora.model_config(CFG, spec), merge_params(quantized, adapters), TOKENS)
    merged, errors = lora.merge(merge_params(quantized, adapters), spec.scale)
    assert set(errors) == {"layers/self_attn/q_proj"} and 0.01 < errors["layers/self_attn/q_proj"] < 0.2
    assert merged["layers"]["self_attn"]["q_proj"]["kernel"].dtype == jnp.float32  # merged in float
    qcfg = lora.model_config(CFG, spec)  # the other layers are still 4-bit: the plain model does not read them
    np.testing.assert_allclose(forward(qcfg, merged, TOKENS), unmerged, atol=1e-5)  # merge is exact before re-quant
    requant, _ = lora.merge(merge_params(quantized, adapters), spec.scale, requantize=True)
    assert "qkernel" in requant["layers"]["self_attn"]["q_proj"]
    drift = np.abs(forward(qcfg, requant, TOKENS) - unmerged).max()
    assert drift > 1e-4  # re-quantizing changes the function: the reported error is real


def test_the_plain_model_refuses_adapters_and_4bit_kernels_in_one_line(base):
    """The model reads kernels and biases only: a tree with adapters or 4-bit kernels needs the LoRA model config,
    and the plain config says so instead of ignoring the adapters (Flax would) or failing on a missing kernel."""
    spec = lora.LoraSpec(rank=4, alpha=8, target_modules=["q_proj"])
    adapters = lora.init_adapters(CFG, spec, jax.random.key(1))
    quantized = quant.quantize_params(base, "nf4", double_quant=True)
    for tree, held in ((merge_params(base, adapters), "'bias', 'kernel', 'lora_a', 'lora_b'"),
                       (quantized, "'bias', 'qkernel'")):  # CFG: q, k, v have biases
        with pytest.raises(ValueError, match=rf"self_attn/q_proj: holds \[{held}\], not a kernel.*lora.model_config"):
            forward(CFG, tree, TOKENS)
    forward(lora.model_config(CFG, spec), merge_params(quantized, adapters), TOKENS)  # what it says works
    with pytest.raises(ValueError, match=r"q_proj: holds adapters, but no LoRA spec gave their scale"):
        forward(lora.model_config(CFG), merge_params(quantized, adapters), TOKENS)  # the spec-less 4-bit config
    with pytest.raises(ConfigError, match=r"^method.lora.dropout=1.0: must be in \[0, 1\)$"):
        lora.model_config(CFG, lora.LoraSpec(dropout=1.0))


@pytest.mark.parametrize("spec,message", [
    (lora.LoraSpec(target_modules=["c_attn"]), "matches no module; available: down_proj, gate_proj, up_proj, k_proj"),
    (lora.LoraSpec(target_modules=r"model\.layers\.0\..*"), "selects down_proj in layers [0] of 3"),
    (lora.LoraSpec(target_modules="[unclosed"), "not a regular expression"),
    (lora.LoraSpec(rank=0), "method.lora.rank=0: must be a positive integer"),
    (lora.LoraSpec(rank=33), "method.lora.rank=33: larger than layers/self_attn/k_proj allows (kernel 64 x 32"),
    (lora.LoraSpec(init="xavier"), "method.lora.init='xavier'"),
    (lora.LoraSpec(trainable_modules=("mlp",)), "'mlp' is not one of embed_tokens, lm_head, norm"),
])
def test_bad_specs_fail_with_one_line(spec, message):
    with pytest.raises(ConfigError, match=None) as error:
        lora.init_adapters(CFG, spec, jax.random.key(0))
    assert message in str(error.value) and "\n" not in str(error.value)


def test_tied_lm_head_cannot_be_trained_alone():
    tied = CFG.replace(tie_word_embeddings=True)
    with pytest.raises(ConfigError, match="lm_head is tied to embed_tokens"):
        lora.check_spec(tied, lora.LoraSpec(trainable_modules=("lm_head",)))


def test_public_api_snippet(base, tmp_path):
    """The README's "LoRA / QLoRA by hand" lines, as written there."""
    import sftjax

    cfg, params, tokens = CFG, base, TOKENS
    spec = sftjax.LoraSpec(rank=16, alpha=32, target_modules="all-linear")
    adapters = sftjax.init_adapters(cfg, spec, jax.random.key(0))
    base4 = sftjax.quantize_params(params, "nf4", double_quant=True)
    logits = sftjax.forward(sftjax.lora_model_config(cfg, spec), sftjax.merge_params(base4, adapters), tokens)
    sftjax.save_adapter(tmp_path / "adapter", cfg, spec, adapters)
    merged, requant_error = sftjax.merge_lora(sftjax.merge_params(base4, adapters), spec.scale)
    loaded_spec, loaded = sftjax.load_adapter(tmp_path / "adapter", cfg)
    assert loaded_spec.rank == 16 and set(requant_error) == {"/".join(m) for m in lora.adapter_modules(adapters)}
    np.testing.assert_allclose(sftjax.forward(cfg, merged, tokens), logits, atol=1e-5)  # B = 0: merged == base4
    np.testing.assert_allclose(logits, sftjax.forward(cfg, sftjax.dequantize_params(base4), tokens), atol=1e-5)
