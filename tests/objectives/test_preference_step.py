"""The pair objectives in the pmap train step: devices and gradient accumulation do not change the result (pairs
are never split: both sequences of a pair are in one row), ORPO's per-token NLL term included (its chosen-token
count is the step's `totals`, summed over micro-batches and devices before the sums), and the step's loss equals the
objective computed on the whole batch at once.

Tolerance: 1e-5 relative (float32; only the summation order differs between layouts).
"""

import jax
import numpy as np
import pytest

import sftjax
from sftjax.config import OptimSection
from sftjax.data.packing import build_rows, pack_bins
from sftjax.data.preference import pair_tokens
from sftjax.objectives import dpo, reward
from sftjax.objectives.base import Context
from sftjax.train.optim import make_optimizer, schedule
from sftjax.train.references import policy_reference
from sftjax.train.state import device_mesh, init_state, replicate, unreplicate
from sftjax.train.step import compile_steps

CFG = sftjax.ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=2,
                         num_kv_heads=1, head_dim=16)
ROWS, T = 8, 32
RTOL = 1e-5


def _rows(seed: int) -> dict:
    """ROWS rows of packed pairs of very different lengths (pairs per row differ, so per-micro-batch means would
    differ from the step's)."""
    rng = np.random.RandomState(seed)
    examples = []
    while True:
        p, c, r = rng.randint(1, 8), rng.randint(1, 6), rng.randint(1, 6)
        ids = lambda n: rng.randint(3, 64, n).astype(np.int32)  # noqa: E731
        examples.append(pair_tokens(ids(p), ids(c), ids(r), f"p{len(examples)}", float(rng.randn())))
        bins = pack_bins([len(e.tokens) for e in examples], T, "bfd")
        if len(bins) > ROWS:
            examples.pop()
            bins = pack_bins([len(e.tokens) for e in examples], T, "bfd")
            break
    bins = bins + [[] for _ in range(ROWS - len(bins))]
    return build_rows(examples, [0] * len(examples), bins, T, pad_id=0, pairs=True)


def _run(objective, devices, accum, steps=2):
    # SGD: the weights differ by lr x the gradients' summation-order noise (AdamW divides that noise by the
    # gradient's own magnitude where it is near 0, so its updates of such weights differ by up to ~lr)
    opt_cfg = OptimSection(name="sgd", lr=0.1, momentum=0.0, max_grad_norm=0.0)
    optimizer = make_optimizer(opt_cfg, 10)
    params = sftjax.init_params(CFG, jax.random.key(0))
    trainable = {**params, **objective.init(jax.random.key(1))}
    refs = {n: policy_reference(params) for n in objective.policy_references()}
    p_train, _ = compile_steps(objective, optimizer, schedule(opt_cfg, 10), devices)
    mesh = device_mesh(devices)
    state = replicate(init_state(trainable, optimizer, seed=0), mesh)
    frozen, refs = replicate({}, mesh), replicate(refs, mesh)
    history = []
    for s in range(steps):
        rows = _rows(seed=s)
        batch = {k: v.reshape(devices, accum, ROWS // (devices * accum), T) for k, v in rows.items()}
        state, metrics = p_train(state, frozen, refs, objective.prepare(batch))
        history.append(jax.tree.map(lambda x: float(x[0]), metrics))
    return unreplicate(state), history


OBJECTIVES = {
    "sigmoid": dpo.make(dpo.Settings(beta=0.5), Context(CFG, ("t",))),
    "orpo": dpo.make(dpo.Settings(loss_type="orpo"), Context(CFG, ("t",))),
    "simpo+nll": dpo.make(dpo.Settings(loss_type="simpo", sft_weight=0.5), Context(CFG, ("t",))),
    "reward": reward.make(reward.Settings(center_rewards_coefficient=0.01), Context(CFG, ("t",))),
}


@pytest.mark.parametrize("name", list(OBJECTIVES))
def test_devices_and_accumulation_agree(name):
    objective = OBJECTIVES[name]
    runs = {layout: _run(objective, *layout) for layout in [(1, 1), (2, 2)]}  # 2 devices x 2 micro-batches
    ref_state, ref_hist = runs[1, 1]
    assert ref_hist[0]["pairs"] > ROWS  # several pairs per row
    for layout, (state, hist) in runs.items():
        for m, r in zip(hist, ref_hist):
            for key in ("loss", "grad_norm", "pairs", "rewards/chosen"):
                np.testing.assert_allclose(m[key], r[key], rtol=RTOL, atol=1e-6, err_msg=f"{layout} {key}")
        for a, b in zip(jax.tree.leaves(state["trainable"]), jax.tree.leaves(ref_state["trainable"])):
            np.testing.assert_allclose(a, b, rtol=RTOL, atol=1e-6, err_msg=str(layout))


def test_orpo_nll_is_a_mean_over_chosen_tokens():
    """ORPO's step loss = mean over pairs of the odds-ratio term + the NLL summed over every chosen target of the
    batch divided by their count (not a mean of per-micro-batch means), from the model's log-probabilities."""
    objective = OBJECTIVES["orpo"]
    _, hist = _run(objective, 2, 2, steps=1)
    rows = _rows(seed=0)
    params = sftjax.init_params(CFG, jax.random.key(0))
    logits = np.asarray(sftjax.forward(CFG, params, rows["tokens"], rows["segment_ids"], rows["positions"]),
                        np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    token_logp = np.take_along_axis(logp, rows["targets"][..., None], -1)[..., 0]
    seg = rows["segment_ids"]
    has_target = np.zeros_like(seg, bool)
    has_target[:, :-1] = (seg[:, :-1] == seg[:, 1:]) & (seg[:, :-1] > 0)
    chosen = has_target & (rows["pair_ids"] > 0)
    nll = -(token_logp * chosen).sum() / chosen.sum()
    odds = []
    for r in range(ROWS):
        for k in range(1, rows["pair_ids"][r].max() + 1):
            means = [(token_logp[r] * rows["loss_mask"][r] * (rows["pair_ids"][r] == sign * k)).sum()
                     / (rows["loss_mask"][r] * (rows["pair_ids"][r] == sign * k)).sum() for sign in (1, -1)]
            log_odds = (means[0] - means[1]) - (np.log1p(-np.exp(means[0])) - np.log1p(-np.exp(means[1])))
            odds.append(-0.1 * np.log(1 / (1 + np.exp(-log_odds))))
    np.testing.assert_allclose(hist[0]["loss"], nll + np.mean(odds), rtol=RTOL)
    np.testing.assert_allclose(hist[0]["nll"], nll, rtol=RTOL)


def test_lora_reference_keeps_the_originals_of_modules_trained_beside_the_adapters():
    """Under LoRA with embed_tokens and norm trained fully, the reference is the starting model: the frozen base with
    the adapters off and the ORIGINAL embed_tokens / norm (kept in refs), however far training has moved them."""
    from sftjax.peft import lora as lora_lib
    from sftjax.train.state import merge_params

    params = sftjax.init_params(CFG, jax.random.key(0))
    spec = lora_lib.LoraSpec(rank=4, alpha=8, trainable_modules=("embed_tokens", "norm"))
    frozen, trainable = lora_lib.split(params, spec, lora_lib.init_adapters(CFG, spec, jax.random.key(1)))
    refs = {"reference": policy_reference(trainable)}
    assert sorted(refs["reference"]) == ["embed_tokens", "norm"]  # only those: the base is the frozen tree
    objective = dpo.make(dpo.Settings(), Context(lora_lib.model_config(CFG, spec), ("t",)))
    batch = {k: v for k, v in objective.prepare({k: v[None] for k, v in _rows(0).items()}).items()}
    batch = jax.tree.map(lambda x: x[0], batch)
    moved = jax.tree.map(lambda x: x + 0.1, trainable)  # training moved the adapters and the full modules
    got = objective.reference_logps(objective.reference_params(merge_params(frozen, moved), refs), batch)
    want = objective.sequence_logps(CFG, params, batch)[0]
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    policy = objective.sequence_logps(lora_lib.model_config(CFG, spec), merge_params(frozen, moved), batch)[0]
    assert np.abs(np.asarray(policy) - np.asarray(want)).max() > 1e-2  # the policy did move
