"""Parity of the preference objectives with TRL (tests/objectives/trl_reference.py runs TRL's own trainers): the
DPO family (sigmoid, robust, hinge, ipo; SimPO; ORPO) and the Bradley-Terry reward model, loss, metrics and
gradients, on a tiny random Llama and four hand-made pairs of different lengths, with the pairs packed into rows
(best-fit) and padded (one pair per row); and a LoRA DPO whose reference is the adapters-off base against TRL's PEFT
path.

Both sides get the same token ids (tokenization is tested in tests/data/test_preference_data.py). Tolerances
(float32; summation order and TRL's chunked log-softmax differ): loss and metrics 1e-5 absolute (they are O(0.1-10));
gradients 1e-5 absolute with every gradient entry O(1e-3 .. 1).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sftjax.data.packing import build_rows, pack_bins
from sftjax.data.preference import pair_tokens
from sftjax.model.hf import load_pretrained, params_to_hf
from sftjax.objectives import dpo, reward
from sftjax.objectives.base import Context
from sftjax.peft import lora as lora_lib
from sftjax.peft.peft_io import adapter_tensors
from sftjax.train.references import policy_reference
from sftjax.train.state import merge_params
from tests.data.conftest import VOCAB_SIZE, make_tokenizer_dir
from tests.model import hf_models
from tests.objectives import trl_reference as trl

ATOL = 1e-5
SEQ_LEN = 24  # packed: the four pairs (9, 8, 15 and 11 tokens) fill three rows
PAIRS = [
    {"prompt_ids": [10, 11, 12], "chosen_ids": [20, 21], "rejected_ids": [30], "margin": 0.5},
    {"prompt_ids": [13, 14], "chosen_ids": [22], "rejected_ids": [31, 32, 33], "margin": 0.0},
    {"prompt_ids": [15, 16, 17, 18, 19], "chosen_ids": [23, 24, 25], "rejected_ids": [34, 35], "margin": 1.0},
    {"prompt_ids": [40], "chosen_ids": [41, 42, 43, 44], "rejected_ids": [45, 46, 47, 48, 49], "margin": -0.5},
]
LAYOUTS = ("bfd", "none")


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("preference_trl")
    policy = make_tokenizer_dir(root, "qwen_chatml")
    hf_models.build(policy, "llama", "gqa", vocab_size=VOCAB_SIZE, tie_word_embeddings=False)
    reference = root / "reference"
    hf_models.build(reference, "llama", "gqa", seed=1, vocab_size=VOCAB_SIZE, tie_word_embeddings=False)
    return {"policy": policy, "reference": reference}


def batch_of(objective, packing: str, pairs=PAIRS) -> dict:
    """One micro-batch [R, T] of the pairs in the given layout, prepared as the train step gets it."""
    examples = [pair_tokens(np.array(p["prompt_ids"]), np.array(p["chosen_ids"]), np.array(p["rejected_ids"]),
                            f"pair{i}", p.get("margin")) for i, p in enumerate(pairs)]
    bins = pack_bins([len(e.tokens) for e in examples], SEQ_LEN, packing)
    rows = build_rows(examples, [0] * len(examples), bins, SEQ_LEN, pad_id=0, pairs=True)
    batch = {k: jnp.asarray(v[0]) for k, v in objective.prepare({k: v[None] for k, v in rows.items()}).items()}
    totals = objective.totals(batch)
    return {**batch, "totals": totals} if totals else batch


def run(objective, frozen, trainable, refs, packing):
    """(loss, metrics, grads of trainable) of one micro-batch, as the train step computes them on one device."""
    batch = batch_of(objective, packing)

    def loss_fn(trainable):
        sums = objective.sums(merge_params(frozen, trainable), refs, batch, None)
        return sums["loss"] / sums["weight"], sums

    (loss, sums), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
    return float(loss), {k: float(v) for k, v in objective.metrics(sums).items()}, grads


def assert_grads(cfg, grads, expected: dict):
    ours = params_to_hf(cfg, grads, "float32")
    assert set(ours) == set(expected)
    for name, value in expected.items():
        np.testing.assert_allclose(ours[name], value, atol=ATOL, rtol=0, err_msg=name)


def assert_metrics(ours: dict, theirs: dict, names):
    for name in names:
        assert ours[name] == pytest.approx(theirs[name], abs=ATOL), name


DPO_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
               "logps/rejected")


@pytest.mark.parametrize("packing", LAYOUTS)
@pytest.mark.parametrize("loss_type,smoothing", [("sigmoid", 0.0), ("robust", 0.2), ("hinge", 0.0), ("ipo", 0.0)])
def test_dpo_full_matches_trl(dirs, loss_type, smoothing, packing):
    """Full fine-tuning against another frozen reference model (TRL's ref_model): loss, metrics, every gradient."""
    expected = trl.dpo(dirs["policy"], PAIRS, loss_type=loss_type, beta=0.1, label_smoothing=smoothing,
                       ref_model_dir=dirs["reference"])
    cfg, params = load_pretrained(dirs["policy"])
    ref_cfg, ref_params = load_pretrained(dirs["reference"])
    settings = dpo.Settings(loss_type=loss_type, beta=0.1, label_smoothing=smoothing, reference=str(dirs["reference"]))
    objective = dpo.make(settings, Context(cfg, ("t",))).bind({"reference": ref_cfg})
    loss, metrics, grads = run(objective, {}, params, {"reference": ref_params}, packing)
    assert loss == pytest.approx(expected["loss"], abs=ATOL)
    assert_metrics(metrics, expected["metrics"], DPO_METRICS)
    assert_grads(cfg, grads, expected["grads"])


@pytest.mark.parametrize("packing", LAYOUTS)
def test_dpo_reference_is_the_starting_policy(dirs, packing):
    """The default reference under full fine-tuning is a frozen copy of the starting weights: loss log 2 at the
    start, gradients as TRL's with ref_model = the same checkpoint."""
    expected = trl.dpo(dirs["policy"], PAIRS)
    cfg, params = load_pretrained(dirs["policy"])
    objective = dpo.make(dpo.Settings(), Context(cfg, ("t",)))
    assert objective.policy_references() == ("reference",)
    loss, _, grads = run(objective, {}, params, {"reference": policy_reference(params)}, packing)
    assert loss == pytest.approx(np.log(2), abs=1e-6)
    assert loss == pytest.approx(expected["loss"], abs=ATOL)
    assert_grads(cfg, grads, expected["grads"])


@pytest.mark.parametrize("packing", LAYOUTS)
def test_simpo_matches_trl(dirs, packing):
    expected = trl.simpo(dirs["policy"], PAIRS, beta=2.0, simpo_gamma=0.5, cpo_alpha=0.3, label_smoothing=0.1)
    cfg, params = load_pretrained(dirs["policy"])
    settings = dpo.Settings(loss_type="simpo", beta=2.0, simpo_gamma=0.5, sft_weight=0.3, label_smoothing=0.1)
    objective = dpo.make(settings, Context(cfg, ("t",)))
    assert objective.policy_references() == () and objective.references() == {}
    loss, metrics, grads = run(objective, {}, params, {}, packing)
    assert loss == pytest.approx(expected["loss"], abs=ATOL)
    assert_metrics(metrics, expected["metrics"], ("rewards/chosen", "rewards/rejected", "rewards/accuracies"))
    assert_grads(cfg, grads, expected["grads"])


@pytest.mark.parametrize("packing", LAYOUTS)
def test_orpo_matches_trl(dirs, packing):
    expected = trl.orpo(dirs["policy"], PAIRS, beta=0.1)
    cfg, params = load_pretrained(dirs["policy"])
    objective = dpo.make(dpo.Settings(loss_type="orpo", beta=0.1), Context(cfg, ("t",)))
    loss, metrics, grads = run(objective, {}, params, {}, packing)
    assert loss == pytest.approx(expected["loss"], abs=ATOL)
    assert_metrics(metrics, expected["metrics"], ("rewards/chosen", "rewards/rejected", "log_odds_ratio",
                                                  "log_odds_chosen"))
    assert metrics["nll"] == pytest.approx(expected["metrics"]["nll_loss"], abs=ATOL)
    assert_grads(cfg, grads, expected["grads"])


LORA = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "lora_dropout": 0.0}


@pytest.mark.parametrize("packing", LAYOUTS)
def test_lora_dpo_reference_is_the_adapters_off_base(dirs, packing):
    """TRL's PEFT path (no ref_model: the adapters disabled) against the same frozen base with the adapters left
    out: no second copy. lora_B is set non-zero so that policy and reference differ."""
    cfg, params = load_pretrained(dirs["policy"])
    spec = lora_lib.LoraSpec(rank=4, alpha=8, dropout=0.0, target_modules=("q_proj", "v_proj"))
    adapters = lora_lib.init_adapters(cfg, spec, jax.random.key(0))
    adapters = jax.tree.map(lambda x: x, adapters)
    rng = np.random.default_rng(0)
    for module in lora_lib.adapter_modules(adapters):  # non-zero B, so that policy and reference differ
        node = lora_lib.subtree(adapters, module)
        node["lora_b"] = jnp.asarray(0.5 * rng.standard_normal(node["lora_b"].shape), jnp.float32)
    targets = lora_lib.adapter_modules(adapters)
    state = {k.replace(".weight", ".default.weight"): v
             for k, v in adapter_tensors(cfg, adapters, targets, [], "float32").items()}
    expected = trl.dpo(dirs["policy"], PAIRS, lora=LORA, lora_state=state)
    frozen, trainable = lora_lib.split(params, spec, adapters)
    objective = dpo.make(dpo.Settings(), Context(lora_lib.model_config(cfg, spec), ("t",)))
    refs = {"reference": policy_reference(trainable)}
    assert jax.tree.leaves(refs) == []  # nothing copied: the frozen base is the reference
    loss, metrics, grads = run(objective, frozen, trainable, refs, packing)
    assert loss == pytest.approx(expected["loss"], abs=ATOL)
    assert_metrics(metrics, expected["metrics"], DPO_METRICS)
    ours = {k.replace(".weight", ".default.weight"): v
            for k, v in adapter_tensors(cfg, grads, targets, [], "float32").items()}
    assert set(ours) == set(expected["grads"])
    for name, value in expected["grads"].items():
        np.testing.assert_allclose(ours[name], value, atol=ATOL, rtol=0, err_msg=name)


@pytest.mark.parametrize("packing", LAYOUTS)
@pytest.mark.parametrize("center", [None, 0.01])
def test_reward_model_matches_trl(dirs, center, packing):
    """Bradley-Terry with margins (and centering) on a scalar head at each sequence's last token."""
    cfg, params = load_pretrained(dirs["policy"])
    kernel = 0.05 * np.random.default_rng(1).standard_normal((cfg.hidden_size, 1)).astype(np.float32)
    expected = trl.reward(dirs["policy"], PAIRS, center_rewards_coefficient=center, score_weight=kernel.T)
    objective = reward.make(reward.Settings(center_rewards_coefficient=center), Context(cfg, ("t",)))
    trainable = {**{k: v for k, v in params.items() if k != "lm_head"},
                 "heads": {"reward": {"kernel": jnp.asarray(kernel)}}}
    loss, metrics, grads = run(objective, {"lm_head": params["lm_head"]}, trainable, {}, packing)
    assert loss == pytest.approx(expected["loss"], abs=ATOL)
    assert metrics["accuracy"] == pytest.approx(expected["metrics"]["accuracy"], abs=ATOL)
    assert metrics["margin"] == pytest.approx(expected["metrics"]["margin"], abs=ATOL)
    score = expected["grads"].pop("score.weight")
    np.testing.assert_allclose(np.asarray(grads.pop("heads")["reward"]["kernel"]).T, score, atol=ATOL, rtol=0)
    ours = params_to_hf(dataclasses.replace(cfg, tie_word_embeddings=True), grads, "float32")
    assert set(ours) == set(expected["grads"])
    for name, value in expected["grads"].items():
        np.testing.assert_allclose(ours[name], value, atol=ATOL, rtol=0, err_msg=name)
