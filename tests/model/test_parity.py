"""sftjax against transformers on tiny random models of every family: logits, gradients, greedy generation,
checkpoint I/O.

Tolerances (float32, highest matmul precision): logits max abs diff <= 1e-4 (logits are O(1); the observed
difference is ~1e-6, summation order only). Gradients: max abs diff per tensor <= 1e-5 + 1e-4 x that tensor's
largest gradient entry (observed <= 2e-6 relative). Greedy tokens must be identical. Checkpoint round trips are
exact.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import sftjax
from tests.model import hf_models
from tests.model.hf_models import FAMILIES, VOCAB

LOGITS_ATOL = 1e-4


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """{(family, attention): (directory, torch model)}, built once per module."""
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for i, family in enumerate(FAMILIES):
        for attention in ("mha", "gqa"):
            directory = root / f"{family}-{attention}"
            out[family, attention] = directory, hf_models.build(directory, family, attention, seed=i)
    return out


def _tokens(batch=2, length=40, seed=0):
    return np.random.RandomState(seed).randint(0, VOCAB, (batch, length)).astype(np.int32)


@pytest.mark.parametrize("attention", ["mha", "gqa"])
@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_transformers(models, family, attention):
    directory, hf = models[family, attention]
    cfg, params = sftjax.load_pretrained(directory, dtype="float32")
    assert cfg.family == family and cfg.num_kv_heads == hf_models.KV_HEADS[attention]
    tokens = _tokens()
    ours = np.asarray(sftjax.forward(cfg, params, tokens))
    ref = hf_models.hf_logits(hf, tokens)
    assert ours.shape == ref.shape == (2, 40, VOCAB)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=LOGITS_ATOL)


@pytest.mark.parametrize("family", FAMILIES)
def test_gradients_match_transformers(models, family):
    """The backward pass: d(mean next-token cross-entropy) / d(every weight) equals torch autograd's.

    sftjax writes the backward pass of its linear layers and of the GLU by hand (`sftjax.model.layers.linear`,
    `gated_activation`); tied embeddings collect the gradient of both the embedding and the output layer.
    """
    directory, hf = models[family, "gqa"]
    cfg, params = sftjax.load_pretrained(directory, dtype="float32")
    # Token 0 is the configs' pad_token_id: torch's Embedding(padding_idx=0) gives its input row no gradient
    # (sftjax does: a pad token never reaches the loss in its batches, which mask padding by segment and weight).
    tokens = np.maximum(_tokens(2, 25, seed=3), 1)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]

    def loss(params):
        logp = jax.nn.log_softmax(sftjax.forward(cfg, params, inputs).astype(jnp.float32))
        return -jnp.mean(jnp.take_along_axis(logp, targets[..., None], axis=-1))

    ours = sftjax.model.hf.params_to_hf(cfg, jax.grad(loss)(params))
    hf.zero_grad()
    logits = hf(torch.as_tensor(inputs, dtype=torch.long)).logits.float()
    torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), torch.as_tensor(targets.reshape(-1)).long()
                                      ).backward()
    ref = {name: p.grad.numpy() for name, p in hf.named_parameters()}
    assert sorted(ours) == sorted(ref)
    for name, grad in ref.items():
        assert np.abs(grad).max() > 0, name
        np.testing.assert_allclose(ours[name], grad, rtol=0, atol=1e-5 + 1e-4 * np.abs(grad).max(), err_msg=name)


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generation_matches_transformers(tmp_path, family):
    # Larger weights make the next-token distribution peaked, so argmax is not decided by rounding noise.
    hf = hf_models.build(tmp_path, family, "gqa", seed=7, initializer_range=0.2)
    hf_models.randomize_(hf, seed=7, std=0.3)
    hf.save_pretrained(tmp_path)
    cfg, params = sftjax.load_pretrained(tmp_path)
    rng = np.random.RandomState(1)
    prompts = [rng.randint(3, VOCAB, n).tolist() for n in (5, 11, 2)]
    new = 20
    ours = sftjax.generate(cfg, params, prompts, max_new_tokens=new, eos_token_ids=())

    # transformers: one left-padded batch, as its docs recommend for decoder-only models.
    P = max(map(len, prompts))
    ids = torch.zeros(len(prompts), P, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, p in enumerate(prompts):
        ids[b, P - len(p):], mask[b, P - len(p):] = torch.tensor(p), 1
    hf.generation_config.eos_token_id = None  # never stop early (min_new_tokens would mask EOS logits instead)
    with torch.no_grad():
        ref = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False, pad_token_id=0)
    assert ours == ref[:, P:].tolist()
    assert all(len(o) == new for o in ours)


@pytest.mark.parametrize("family", FAMILIES)
def test_saved_checkpoint_loads_in_transformers(tmp_path, family):
    """sftjax load -> save -> transformers load: identical weights, so identical logits."""
    source = tmp_path / "source"
    hf = hf_models.build(source, family, "gqa", seed=3)
    cfg, params = sftjax.load_pretrained(source)
    sftjax.save_pretrained(tmp_path / "saved", cfg, params)
    reloaded = hf_models.load_hf(tmp_path / "saved")
    assert type(reloaded) is type(hf)
    for (name, a), (_, b) in zip(sorted(hf.state_dict().items()), sorted(reloaded.state_dict().items())):
        assert torch.equal(a, b), name
    tokens = _tokens(seed=2)
    np.testing.assert_array_equal(hf_models.hf_logits(reloaded, tokens), hf_models.hf_logits(hf, tokens))


@pytest.mark.parametrize("family", FAMILIES)
def test_model_initialised_by_sftjax_loads_in_transformers(tmp_path, family):
    """A config written by sftjax (not copied from HF) describes the same architecture to transformers."""
    hf_cfg = hf_models.hf_config(family, "gqa")
    cfg = sftjax.from_hf_dict(hf_cfg.to_dict())
    params = sftjax.init_params(cfg, jax.random.key(0))
    sftjax.save_pretrained(tmp_path, cfg, params)
    hf = hf_models.load_hf(tmp_path)
    tokens = _tokens(seed=4)
    np.testing.assert_allclose(np.asarray(sftjax.forward(cfg, params, tokens)), hf_models.hf_logits(hf, tokens),
                               rtol=0, atol=LOGITS_ATOL)


def test_sharded_checkpoints_both_ways(tmp_path):
    hf = hf_models.build(tmp_path / "one", "llama", "gqa", seed=5)
    hf.save_pretrained(tmp_path / "hf-sharded", max_shard_size="60KB")
    assert (tmp_path / "hf-sharded" / "model.safetensors.index.json").is_file()
    cfg, params = sftjax.load_pretrained(tmp_path / "hf-sharded")
    _, whole = sftjax.load_pretrained(tmp_path / "one")
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(whole)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    sftjax.save_pretrained(tmp_path / "ours-sharded", cfg, params, max_shard_size="60KB")
    shards = sorted(p.name for p in (tmp_path / "ours-sharded").glob("model-*.safetensors"))
    assert len(shards) > 1
    tokens = _tokens(seed=6)
    reloaded = hf_models.load_hf(tmp_path / "ours-sharded")
    np.testing.assert_array_equal(hf_models.hf_logits(reloaded, tokens), hf_models.hf_logits(hf, tokens))


def test_bfloat16_checkpoint_loads_and_saves(tmp_path):
    hf = hf_models.build(tmp_path / "f32", "qwen2", "gqa", seed=8).to(torch.bfloat16)
    hf.save_pretrained(tmp_path / "bf16")
    cfg, params = sftjax.load_pretrained(tmp_path / "bf16", dtype="bfloat16")
    assert cfg.param_dtype == "bfloat16"
    assert all(str(x.dtype) == "bfloat16" for x in jax.tree.leaves(params))
    sftjax.save_pretrained(tmp_path / "again", cfg, params)
    reloaded = hf_models.load_hf(tmp_path / "again")
    for (name, a), (_, b) in zip(sorted(hf.state_dict().items()), sorted(reloaded.state_dict().items())):
        assert torch.equal(a, b.to(a.dtype)), name
    # Upcasting a bf16 checkpoint to float32 is exact.
    _, params32 = sftjax.load_pretrained(tmp_path / "bf16", dtype="float32")
    emb = hf.model.embed_tokens.weight.detach().float().numpy()
    np.testing.assert_array_equal(np.asarray(params32["embed_tokens"]["embedding"]), emb)
