"""The RL math of sftjax/objectives/rl.py, grpo.py and ppo.py against independently written references.

What is checked against what (every reference below is written in this file or imported from TRL 1.16, never the
code under test):

1. `group_advantages` (scale group / batch / none) against TRL's GRPOTrainer lines (grpo_trainer.py, "sum_then_
   normalize": torch.nanmean over view(-1, G), `trl.trainer.utils.nanstd`, (r - mean) / (std + 1e-4)) run in torch
   float32 on random rewards, a group of equal rewards (advantage 0) and a 0/1 group. Tolerance 1e-6 (abs and rel).
2. `clipped_objective` against TRL's coef_1 / coef_2 / -min(...) lines in torch float32, eps_low != eps_high; the
   `clipped` indicator equals TRL's is_low_clipped | is_high_clipped exactly. Tolerance 1e-6.
3. `kl_k3` against TRL's per_token_kl expression (torch float32, tolerance 1e-6); >= 0; its exact expectation under
   pi equals KL(pi || pi_ref) of two categorical distributions (1e-6), and a Monte Carlo mean over 200k samples from
   pi (fixed seed) is within 3 standard errors of it.
4. `token_logps` (log-prob of the targets, entropy) against `trl.trainer.utils.selective_log_softmax` and
   `entropy_from_logits` applied (torch) to the logits of the same tiny random model from `sftjax.forward`, packed
   rows included. Tolerance 1e-5 (float32, highest matmul precision).
5. `gae` against the TRL PPOTrainer (trl <= 0.x) loop run on each row's completion slice only (rows with different
   offsets and lengths, gamma, lam != 1); garbage off the mask must not matter; off-mask outputs are 0.
   Tolerance 1e-5 (float32 output of float64 sums of O(1-10)).
6. `masked_whiten` against TRL's masked_mean / masked_var (Bessel mask_sum / (mask_sum - 1)) / rsqrt(var + 1e-8)
   written in torch float64; 0 off the mask. Tolerance 1e-6.
7. GRPO: `GRPO.advantages` puts each completion's group advantage (reference 1) on exactly its loss_mask tokens
   (exact); with one step per rollout (old = stop_gradient(logp)) the value and gradient (w.r.t. every parameter)
   of `GRPO.sums(...)["loss"]` equal those of sum(mask (-A logp + beta k3(logp, ref))) computed from the logits of
   `sftjax.forward`. Tolerance 1e-5 relative, 1e-6 absolute (gradients), 1e-5 relative (sums).
8. PPO: `PPO.advantages` against the recomputation (per-token reward -beta (old - ref) on the completion plus the
   sequence reward at the last completion token; GAE of reference 5; whitened by reference 6; returns = GAE + v)
   with tolerance 1e-5; `PPO.sums`' value loss, value clip count and total loss against TRL's old formulas
   (0.5 max((v - R)^2, (clamp(v, v_old - c, v_old + c) - R)^2), pg = max(-A r, -A clamp(r)); torch float32) with
   tolerance 1e-5 relative. The reward whitening (whiten_rewards=true) against TRL's shift_mean=False (scaled,
   mean kept).
9. Settings validation: each bad value raises ConfigError naming `objective.<key>`.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from trl.trainer.utils import entropy_from_logits, nanstd, selective_log_softmax

import sftjax
from sftjax.errors import ConfigError
from sftjax.model.transformer import hidden_states
from sftjax.objectives import base
from sftjax.objectives.rl import clipped_objective, gae, group_advantages, kl_k3, masked_whiten, token_logps

CFG = sftjax.ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=2,
                         num_kv_heads=1, head_dim=16)
B, T = 4, 12


# ----------------------------------------------------------------------------------------------------------------
# References


def trl_group_advantages(rewards: np.ndarray, G: int, scale: str) -> np.ndarray:
    """TRL 1.16 GRPOTrainer._generate_and_score_completions (sum_then_normalize), torch float32."""
    rewards = torch.tensor(rewards, dtype=torch.float32)
    mean_grouped_rewards = torch.nanmean(rewards.view(-1, G), dim=1)
    mean_grouped_rewards = mean_grouped_rewards.repeat_interleave(G, dim=0)
    if scale in ["group", "none"]:
        std_rewards = nanstd(rewards.view(-1, G), dim=1).repeat_interleave(G, dim=0)
    else:
        std_rewards = nanstd(rewards).expand_as(rewards)
    advantages = rewards - mean_grouped_rewards
    if scale != "none":
        advantages = advantages / (std_rewards + 1e-4)
    return torch.nan_to_num(advantages, nan=0.0).numpy()


def trl_gae(rewards, values, mask, gamma, lam):
    """The TRL PPOTrainer loop (trl <= 0.x) on each row's completion slice [s, e); 0 elsewhere."""
    N, T_ = mask.shape
    adv, ret = np.zeros((N, T_)), np.zeros((N, T_))
    for i in range(N):
        where = np.flatnonzero(mask[i])
        s, e = where[0], where[-1] + 1
        assert (mask[i, s:e] == 1).all()
        r, v = rewards[i, s:e].astype(np.float64), values[i, s:e].astype(np.float64)
        gen_len = e - s
        lastgaelam = 0.0
        out = []
        for t in reversed(range(gen_len)):
            nextvalues = v[t + 1] if t < gen_len - 1 else 0.0
            delta = r[t] + gamma * nextvalues - v[t]
            lastgaelam = delta + gamma * lam * lastgaelam
            out.append(lastgaelam)
        adv[i, s:e] = out[::-1]
        ret[i, s:e] = adv[i, s:e] + v
    return adv, ret


def trl_masked_whiten(values, mask, shift_mean=True):
    """trl.core masked_mean / masked_var(unbiased) / masked_whiten (trl <= 0.x), torch float64."""
    values, mask = torch.tensor(values, dtype=torch.float64), torch.tensor(mask, dtype=torch.float64)

    def masked_mean(x, m):
        return (x * m).sum() / m.sum()

    mean = masked_mean(values, mask)
    var = masked_mean((values - mean) ** 2, mask)
    mask_sum = mask.sum()
    var = var * (mask_sum / (mask_sum - 1))
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened += mean
    return whitened.numpy()


def completion_mask(spans, T_=T):
    """[N, T] float32 mask with ones on [s, e) of each row."""
    m = np.zeros((len(spans), T_), np.float32)
    for i, (s, e) in enumerate(spans):
        m[i, s:e] = 1.0
    return m


SPANS = [(3, 9), (5, 12), (0, 1), (7, 11)]  # different offsets and lengths; one to the end, one of length 1


def model_batch(seed=0):
    """A hand-built rollout micro-batch [B, T]: row 1 packs two segments, row 3 ends with padding."""
    rng = np.random.RandomState(seed)
    tokens = rng.randint(1, CFG.vocab_size, (B, T)).astype(np.int32)
    segment_ids = np.ones((B, T), np.int32)
    segment_ids[1, 6:] = 2
    segment_ids[3, 11:] = 0
    positions = np.zeros((B, T), np.int32)
    for i in range(B):
        for seg in np.unique(segment_ids[i]):
            where = segment_ids[i] == seg
            positions[i, where] = np.arange(where.sum())
    mask = completion_mask([(2, 6), (8, 12), (1, 2), (4, 10)])
    return {"tokens": tokens, "targets": np.roll(tokens, -1, axis=1).astype(np.int32), "loss_mask": mask,
            "segment_ids": segment_ids, "positions": positions, "task_ids": np.zeros((B, T), np.int32)}


def reference_logps(params, batch):
    """log pi(targets) [B, T] from sftjax.forward's logits (not token_logps)."""
    logits = sftjax.forward(CFG, params, jnp.asarray(batch["tokens"]), jnp.asarray(batch["segment_ids"]),
                            jnp.asarray(batch["positions"])).astype(jnp.float32)
    logp_all = logits - jax.scipy.special.logsumexp(logits, axis=-1, keepdims=True)
    return jnp.take_along_axis(logp_all, jnp.asarray(batch["targets"])[..., None], axis=-1)[..., 0]


# ----------------------------------------------------------------------------------------------------------------
# 1-3: advantages, clipped objective, k3


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_advantages_match_trl(scale):
    G = 4
    rng = np.random.RandomState(0)
    rewards = rng.randn(5 * G).astype(np.float32)
    rewards[G:2 * G] = 0.5  # all equal: advantage 0
    rewards[2 * G:3 * G] = [1.0, 0.0, 0.0, 1.0]  # 0/1 rewards (exact_match)
    ours = group_advantages(rewards, G, scale)
    assert ours.shape == (5 * G,) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, trl_group_advantages(rewards, G, scale), atol=1e-6, rtol=1e-6)
    assert np.all(ours[G:2 * G] == 0.0)
    # the group scale really is per group: a group's advantages do not depend on the other groups
    if scale != "batch":
        np.testing.assert_allclose(group_advantages(rewards[:G], G, scale), ours[:G], atol=1e-6)


def test_clipped_objective_matches_trl():
    eps_low, eps_high = 0.2, 0.28
    rng = np.random.RandomState(1)
    logp = rng.uniform(-5, 0, (6, 50)).astype(np.float32)
    old = (logp + rng.uniform(-0.6, 0.6, logp.shape)).astype(np.float32)
    adv = rng.randn(6, 50).astype(np.float32)
    adv[0, :5] = 0.0
    loss, clipped = clipped_objective(jnp.asarray(logp), jnp.asarray(old), jnp.asarray(adv), eps_low, eps_high)

    per_token_logps, old_per_token_logps, advantages = map(torch.tensor, (logp, old, adv))
    coef_1 = torch.exp(per_token_logps - old_per_token_logps)
    coef_2 = torch.clamp(coef_1, 1 - eps_low, 1 + eps_high)
    per_token_loss = -torch.min(coef_1 * advantages, coef_2 * advantages)
    is_low_clipped = (coef_1 < 1 - eps_low) & (advantages < 0)
    is_high_clipped = (coef_1 > 1 + eps_high) & (advantages > 0)

    np.testing.assert_allclose(np.asarray(loss), per_token_loss.numpy(), atol=1e-6, rtol=1e-6)
    expected = (is_low_clipped | is_high_clipped).numpy()
    np.testing.assert_array_equal(np.asarray(clipped), expected)
    assert is_low_clipped.any() and is_high_clipped.any() and not expected.all()  # the data exercises all cases
    # the asymmetric range is used: some ratios lie in (1 + eps_low, 1 + eps_high], clipped only with eps_low
    r = coef_1.numpy()
    assert ((r > 1 + eps_low) & (r <= 1 + eps_high) & (adv > 0) & ~expected).any()


def test_kl_k3_matches_trl_and_estimates_the_kl():
    rng = np.random.RandomState(2)
    logp = rng.uniform(-6, 0, (4, 40)).astype(np.float32)
    ref = (logp + rng.uniform(-2, 2, logp.shape)).astype(np.float32)
    ours = np.asarray(kl_k3(jnp.asarray(logp), jnp.asarray(ref)))
    per_token_logps, ref_per_token_logps = torch.tensor(logp), torch.tensor(ref)
    per_token_kl = torch.exp(ref_per_token_logps - per_token_logps) - (ref_per_token_logps - per_token_logps) - 1
    np.testing.assert_allclose(ours, per_token_kl.numpy(), atol=1e-6, rtol=1e-6)
    assert (ours >= 0).all()
    assert float(kl_k3(jnp.float32(-1.3), jnp.float32(-1.3))) == 0.0

    pi = np.array([0.5, 0.2, 0.15, 0.1, 0.05])
    pi_ref = np.array([0.1, 0.3, 0.3, 0.2, 0.1])
    kl = float(np.sum(pi * np.log(pi / pi_ref)))
    per_value = np.asarray(kl_k3(jnp.log(jnp.asarray(pi, jnp.float32)), jnp.log(jnp.asarray(pi_ref, jnp.float32))),
                           np.float64)
    np.testing.assert_allclose(np.sum(pi * per_value), kl, atol=1e-6)  # unbiased: exact expectation
    samples = np.random.default_rng(0).choice(len(pi), size=200_000, p=pi)
    k3 = np.asarray(kl_k3(jnp.log(jnp.asarray(pi[samples], jnp.float32)),
                          jnp.log(jnp.asarray(pi_ref[samples], jnp.float32))), np.float64)
    stderr = k3.std(ddof=1) / np.sqrt(len(k3))
    assert abs(k3.mean() - kl) < 3 * stderr, (k3.mean(), kl, stderr)


# ----------------------------------------------------------------------------------------------------------------
# 4: token log-probs and entropy


def test_token_logps_match_trl_on_the_models_logits():
    params = sftjax.init_params(CFG, jax.random.key(0))
    batch = model_batch()
    with jax.default_matmul_precision("highest"):
        logp, entropy, h, _ = token_logps(CFG, params, {k: jnp.asarray(v) for k, v in batch.items()})
        logits = sftjax.forward(CFG, params, jnp.asarray(batch["tokens"]), jnp.asarray(batch["segment_ids"]),
                                jnp.asarray(batch["positions"]))
    assert logp.shape == entropy.shape == (B, T) and h.shape == (B, T, CFG.hidden_size)
    assert logp.dtype == entropy.dtype == jnp.float32
    logits = torch.tensor(np.asarray(logits, np.float32))
    targets = torch.tensor(batch["targets"], dtype=torch.long)
    np.testing.assert_allclose(np.asarray(logp), selective_log_softmax(logits, targets).numpy(), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(entropy), entropy_from_logits(logits).numpy(), atol=1e-5, rtol=1e-5)
    assert float(jnp.min(entropy)) > 0 and float(jnp.max(logp)) < 0


# ----------------------------------------------------------------------------------------------------------------
# 5-6: GAE, whitening


@pytest.mark.parametrize("gamma,lam", [(0.9, 0.8), (1.0, 0.95), (0.99, 1.0)])
def test_gae_matches_the_trl_loop_on_each_completion(gamma, lam):
    rng = np.random.RandomState(3)
    mask = completion_mask(SPANS)
    rewards = rng.randn(len(SPANS), T).astype(np.float32)
    values = rng.randn(len(SPANS), T).astype(np.float32)
    adv, ret = gae(rewards, values, mask, gamma, lam)
    ref_adv, ref_ret = trl_gae(rewards, values, mask, gamma, lam)
    np.testing.assert_allclose(adv, ref_adv, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(ret, ref_ret, atol=1e-5, rtol=1e-5)
    assert adv.dtype == ret.dtype == np.float32
    assert np.all(adv[mask == 0] == 0) and np.all(ret[mask == 0] == 0)
    # what lies off the mask does not matter
    noise = rng.randn(*mask.shape).astype(np.float32) * 100 * (1 - mask)
    adv2, ret2 = gae(rewards + noise, values - noise, mask, gamma, lam)
    np.testing.assert_array_equal(adv2, adv)
    np.testing.assert_array_equal(ret2, ret)


def test_masked_whiten_matches_trl():
    rng = np.random.RandomState(4)
    x = (3 + 2 * rng.randn(len(SPANS), T)).astype(np.float32)
    mask = completion_mask(SPANS)
    ours = masked_whiten(x, mask)
    expected = trl_masked_whiten(x, mask)
    np.testing.assert_allclose(ours[mask == 1], expected[mask == 1], atol=1e-6, rtol=1e-6)
    assert np.all(ours[mask == 0] == 0)
    on = ours[mask == 1].astype(np.float64)
    assert abs(on.mean()) < 1e-6 and abs(on.std(ddof=1) - 1) < 1e-6


# ----------------------------------------------------------------------------------------------------------------
# 7: GRPO end of pipe


def _grpo(**settings):
    return base.build({"name": "grpo", "num_generations": 2, **settings}, base.Context(CFG, ("t",)))


def test_grpo_advantages_sit_on_the_completion_tokens():
    objective = _grpo(scale_rewards="group")
    mask = completion_mask(SPANS)
    rewards = np.array([1.0, 0.0, 0.3, 0.3], np.float32)  # second group equal: advantage 0
    out = objective.advantages({"loss_mask": mask}, rewards)
    a = trl_group_advantages(rewards, 2, "group")
    assert set(out) == {"advantages"} and out["advantages"].shape == (len(SPANS), T)
    assert out["advantages"].dtype == np.float32
    for i, (s, e) in enumerate(SPANS):
        np.testing.assert_allclose(out["advantages"][i, s:e], a[i], atol=1e-6)
        assert np.all(out["advantages"][i, :s] == 0) and np.all(out["advantages"][i, e:] == 0)
    assert abs(a[0]) > 0.7 and np.all(out["advantages"][2:] == 0)


def test_grpo_loss_and_gradient_with_one_step_per_rollout():
    """old = stop_gradient(logp): the ratio is 1 (no clipping) but carries the gradient of -A logp."""
    beta = 0.1
    objective = _grpo(beta=beta)
    assert not objective.needs_old_logps
    params = sftjax.init_params(CFG, jax.random.key(0))
    reference = sftjax.init_params(CFG, jax.random.key(1))
    raw = model_batch(5)
    mask = raw["loss_mask"]
    with jax.default_matmul_precision("highest"):
        ref_logps = np.asarray(reference_logps(reference, raw))
        adv = np.array([1.2, -0.7, 0.4, -1.5], np.float32)[:, None] * mask
        batch = {**{k: jnp.asarray(v) for k, v in raw.items()}, "advantages": jnp.asarray(adv),
                 "ref_logps": jnp.asarray(ref_logps)}

        def ours(p):
            sums = objective.sums(p, {}, batch, None)
            return sums["loss"], sums

        def reference_loss(p):
            logp = reference_logps(p, raw)
            d = ref_logps - logp
            return jnp.sum(mask * (-adv * logp + beta * (jnp.exp(d) - d - 1)))

        (loss, sums), grads = jax.value_and_grad(ours, has_aux=True)(params)
        expected_loss, expected_grads = jax.value_and_grad(reference_loss)(params)
        logp = np.asarray(reference_logps(params, raw), np.float64)

    d = ref_logps - logp
    kl = np.exp(d) - d - 1
    np.testing.assert_allclose(float(loss), np.sum(mask * (-adv + beta * kl)), rtol=1e-5)
    np.testing.assert_allclose(float(sums["weight"]), mask.sum())
    np.testing.assert_allclose(float(sums["ratio"]), mask.sum(), rtol=1e-6)
    np.testing.assert_allclose(float(sums["kl"]), np.sum(mask * kl), rtol=1e-5)
    assert float(sums["clipped"]) == 0
    assert float(expected_loss) != pytest.approx(float(loss), rel=1e-3)  # different values, same gradient
    flat, flat_expected = jax.tree.leaves(grads), jax.tree.leaves(expected_grads)
    assert len(flat) == len(flat_expected) and jax.tree.structure(grads) == jax.tree.structure(expected_grads)
    for g, e in zip(flat, flat_expected):
        np.testing.assert_allclose(np.asarray(g), np.asarray(e), rtol=1e-5, atol=1e-6)
    assert max(float(jnp.max(jnp.abs(g))) for g in flat) > 1e-3  # a gradient worth comparing


# ----------------------------------------------------------------------------------------------------------------
# 8: PPO


def _ppo(**settings):
    return base.build({"name": "ppo", **settings}, base.Context(CFG, ("t",)))


def _ppo_rows(seed=6):
    rng = np.random.RandomState(seed)
    mask = completion_mask(SPANS)
    old = rng.uniform(-4, -0.1, mask.shape).astype(np.float32)
    rows = {"loss_mask": mask, "old_logps": old, "ref_logps": (old + rng.uniform(-1, 1, mask.shape)).astype(np.float32),
            "values": rng.randn(*mask.shape).astype(np.float32)}
    return rows, rng.randn(len(SPANS)).astype(np.float32)


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.7)])
def test_ppo_advantages_are_whitened_gae_of_the_kl_penalised_rewards(gamma, lam):
    beta = 0.05
    objective = _ppo(beta=beta, gamma=gamma, lam=lam)
    rows, rewards = _ppo_rows()
    mask = rows["loss_mask"]
    out = objective.advantages({k: v.copy() for k, v in rows.items()}, rewards.copy())

    per_token = np.zeros(mask.shape)
    for i, (s, e) in enumerate(SPANS):
        per_token[i, s:e] = -beta * (rows["old_logps"][i, s:e].astype(np.float64) - rows["ref_logps"][i, s:e])
        per_token[i, e - 1] += rewards[i]
    raw_adv, returns = trl_gae(per_token, rows["values"], mask, gamma, lam)
    advantages = trl_masked_whiten(raw_adv, mask) * mask

    np.testing.assert_allclose(out["advantages"], advantages, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(out["returns"], returns, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(out["kl_penalty"], (rows["old_logps"] - rows["ref_logps"]) * mask, atol=1e-6)
    for key in ("advantages", "returns"):
        assert np.all(out[key][mask == 0] == 0)


def test_ppo_whiten_rewards_keeps_the_mean_as_trl():
    beta, gamma, lam = 0.05, 1.0, 0.95
    objective = _ppo(beta=beta, gamma=gamma, lam=lam, whiten_rewards=True)
    rows, rewards = _ppo_rows()
    mask = rows["loss_mask"]
    out = objective.advantages({k: v.copy() for k, v in rows.items()}, rewards.copy())
    per_token = np.zeros(mask.shape)
    for i, (s, e) in enumerate(SPANS):
        per_token[i, s:e] = -beta * (rows["old_logps"][i, s:e].astype(np.float64) - rows["ref_logps"][i, s:e])
        per_token[i, e - 1] += rewards[i]
    per_token = trl_masked_whiten(per_token, mask, shift_mean=False) * mask
    _, returns = trl_gae(per_token, rows["values"], mask, gamma, lam)
    np.testing.assert_allclose(out["returns"], returns, atol=1e-5, rtol=1e-5)


def test_ppo_value_loss_and_loss_match_trl():
    eps, c, vf_coef = 0.2, 0.2, 0.1
    objective = _ppo(epsilon=eps, cliprange_value=c, vf_coef=vf_coef, beta=0.05)
    params = {**sftjax.init_params(CFG, jax.random.key(0)), **objective.init(jax.random.key(1))}
    raw = model_batch(7)
    mask = raw["loss_mask"]
    rng = np.random.RandomState(7)
    with jax.default_matmul_precision("highest"):
        logp = np.asarray(reference_logps(params, raw))
        h = hidden_states(CFG, params, jnp.asarray(raw["tokens"]), jnp.asarray(raw["segment_ids"]),
                          jnp.asarray(raw["positions"]))
        v = np.asarray(jnp.einsum("btd,d->bt", h, params["heads"]["value"]["kernel"][:, 0]))
    extra = {"old_logps": (logp + rng.uniform(-0.4, 0.4, logp.shape)).astype(np.float32),
             "ref_logps": (logp + rng.uniform(-0.5, 0.5, logp.shape)).astype(np.float32),
             "advantages": (rng.randn(B, T) * mask).astype(np.float32),
             "values": (v + rng.uniform(-0.5, 0.5, v.shape)).astype(np.float32),
             "returns": (v + rng.randn(B, T)).astype(np.float32),
             "kl_penalty": (rng.randn(B, T) * mask).astype(np.float32)}
    batch = {k: jnp.asarray(x) for k, x in {**raw, **extra}.items()}
    with jax.default_matmul_precision("highest"):
        sums = objective.sums(params, {}, batch, None)

    # TRL PPOTrainer (trl <= 0.x) train loop, torch float32
    vpred, mb_values, mb_return = torch.tensor(v), torch.tensor(extra["values"]), torch.tensor(extra["returns"])
    m = torch.tensor(mask)
    vpredclipped = torch.clamp(vpred, mb_values - c, mb_values + c)
    vf_losses1 = torch.square(vpred - mb_return)
    vf_losses2 = torch.square(vpredclipped - mb_return)
    vf_loss_max = torch.max(vf_losses1, vf_losses2)
    ratio = torch.exp(torch.tensor(logp) - torch.tensor(extra["old_logps"]))
    mb_advantage = torch.tensor(extra["advantages"])
    pg_losses = -mb_advantage * ratio
    pg_losses2 = -mb_advantage * torch.clamp(ratio, 1.0 - eps, 1.0 + eps)
    pg_loss_max = torch.max(pg_losses, pg_losses2)
    value_loss = float((0.5 * vf_loss_max * m).sum())
    value_clipped = float(((vf_losses2 > vf_losses1).float() * m).sum())

    np.testing.assert_allclose(float(sums["value_loss"]), value_loss, rtol=1e-5)
    assert float(sums["value_clipped"]) == value_clipped
    assert 0 < value_clipped < mask.sum()  # both branches of the max are exercised
    np.testing.assert_allclose(float(sums["policy_loss"]), float((pg_loss_max * m).sum()), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(sums["loss"]), float(((pg_loss_max + vf_coef * 0.5 * vf_loss_max) * m).sum()),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(sums["kl_penalty"]), float(np.sum(extra["kl_penalty"] * mask)), rtol=1e-6)
    assert float(sums["weight"]) == mask.sum()


# ----------------------------------------------------------------------------------------------------------------
# 9: settings


@pytest.mark.parametrize("section,key", [
    ({"name": "grpo", "num_generations": 1}, "num_generations"),
    ({"name": "grpo", "temperature": 0}, "temperature"),
    ({"name": "grpo", "epsilon": 0.0}, "epsilon"),
    ({"name": "grpo", "epsilon": -0.1}, "epsilon"),
    ({"name": "grpo", "epsilon_high": 0.0}, "epsilon_high"),
    ({"name": "grpo", "rewards": ["exact_match"], "reward_weights": [1.0, 2.0]}, "reward_weights"),
    ({"name": "grpo", "scale_rewards": "x"}, "scale_rewards"),
    ({"name": "grpo", "beta": -0.1}, "beta"),
    ({"name": "ppo", "gamma": 2}, "gamma"),
    ({"name": "ppo", "lam": -0.5}, "lam"),
    ({"name": "ppo", "temperature": 0.0}, "temperature"),
])
def test_bad_settings_name_the_key(section, key):
    with pytest.raises(ConfigError, match=rf"objective\.{key}\b"):
        base.settings(section)


def test_good_settings_pass():
    _, s = base.settings({"name": "grpo", "num_generations": 2, "epsilon_high": 0.28, "reward_weights": [2]})
    assert s.num_generations == 2 and s.weights == (2.0,) and s.steps_per_rollout == 1
    _, s = base.settings({"name": "ppo", "gamma": 1, "lam": 0})
    assert s.gamma == 1.0 and s.steps_per_rollout == 4


@pytest.mark.parametrize("name", ["grpo", "ppo"])
def test_logits_at_completion_tokens_only_change_nothing(name):
    """`prepare` adds label_index (the completion positions, padded): the step's sums and gradients and the
    rollout's `score` rows equal those computed at every position (float32, highest precision: 1e-5 relative,
    1e-6 absolute). PPO with epochs=2 (old log-probabilities in the rows), GRPO with beta > 0 (reference rows)."""
    settings = {"num_generations": 2, "beta": 0.1, "epochs": 2} if name == "grpo" else {"beta": 0.05}
    objective = base.build({"name": name, **settings}, base.Context(CFG, ("t",)))
    params = {**sftjax.init_params(CFG, jax.random.key(0)), **objective.init(jax.random.key(3))}
    refs = {"reference": sftjax.init_params(CFG, jax.random.key(1))} if "reference" in \
        objective.policy_references() else {}
    raw = model_batch(7)
    rng = np.random.RandomState(2)
    with jax.default_matmul_precision("highest"):
        full = {k: jnp.asarray(v) for k, v in raw.items()}
        indexed = {k: jnp.asarray(v) for k, v in objective.prepare(raw).items()}
        assert "label_index" in indexed and "label_index" not in full
        score_full, score_indexed = objective.score(params, refs, full), objective.score(params, refs, indexed)
        assert set(score_full) == set(score_indexed) and "old_logps" in score_full
        for key in score_full:
            np.testing.assert_allclose(np.asarray(score_indexed[key]), np.asarray(score_full[key]) * raw["loss_mask"],
                                       rtol=1e-5, atol=1e-6)
        rows = {**raw, **{k: np.asarray(v) for k, v in score_full.items()}}
        rows["old_logps"] = rows["old_logps"] + rng.uniform(-0.3, 0.3, raw["loss_mask"].shape).astype(np.float32)
        rows.update(objective.advantages(rows, rng.randn(B).astype(np.float32)))
        grad = lambda batch: jax.value_and_grad(lambda p: objective.sums(p, refs, batch, None)["loss"])(params)  # noqa
        loss_full, grads_full = grad({k: jnp.asarray(v) for k, v in rows.items()})
        loss_indexed, grads_indexed = grad({k: jnp.asarray(v) for k, v in objective.prepare(rows).items()})
    np.testing.assert_allclose(float(loss_indexed), float(loss_full), rtol=1e-5)
    for g, e in zip(jax.tree.leaves(grads_indexed), jax.tree.leaves(grads_full)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(e), rtol=1e-5, atol=1e-6)
