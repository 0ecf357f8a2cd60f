"""Self-test of the TRL reference (tests/objectives/trl_reference.py), on a tiny random Llama and four hand-made pairs
of different lengths: the numbers TRL returns are finite, have gradients, and equal the objectives' formulas
recomputed from the returned (and independently recomputed) log-probs / rewards.

Independent side: plain `transformers` forwards of each sequence alone (no padding, no TRL), log-softmax, gather.
Tolerances: formula on TRL's own returned log-probs 1e-6 (same float32 numbers); against the independent forwards
1e-5 (padding / batching / TRL's chunked log-softmax change the summation order).
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.data.conftest import VOCAB_SIZE, make_tokenizer_dir
from tests.model import hf_models
from tests.objectives import trl_reference as ref

PAIRS = [
    {"prompt_ids": [10, 11, 12], "chosen_ids": [20, 21], "rejected_ids": [30]},
    {"prompt_ids": [13, 14], "chosen_ids": [22], "rejected_ids": [31, 32, 33]},
    {"prompt_ids": [15, 16, 17, 18, 19], "chosen_ids": [23, 24, 25], "rejected_ids": [34, 35]},
    {"prompt_ids": [40], "chosen_ids": [41, 42, 43, 44], "rejected_ids": [45, 46, 47, 48, 49]},
]
LORA = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "lora_dropout": 0.0}


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("trl_reference")
    policy = make_tokenizer_dir(root, "qwen_chatml")
    hf_models.build(policy, "llama", "gqa", vocab_size=VOCAB_SIZE, tie_word_embeddings=False)
    reference = root / "reference"
    hf_models.build(reference, "llama", "gqa", seed=1, vocab_size=VOCAB_SIZE, tie_word_embeddings=False)
    return {"policy": policy, "reference": reference}


def _token_logps(model_dir, prompt, completion):
    """Per-token log-probs of `completion` after `prompt`, one unpadded sequence, plain transformers."""
    model = hf_models.load_hf(model_dir)
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logp = F.log_softmax(model(ids).logits[0, :-1].float(), dim=-1)
    targets = ids[0, 1:]
    return logp[torch.arange(len(targets)), targets].numpy()


def _completion_logps(model_dir, average=False):
    out = {}
    for side in ("chosen", "rejected"):
        vals = []
        for p in PAIRS:
            lp = _token_logps(model_dir, p["prompt_ids"], p[f"{side}_ids"])[len(p["prompt_ids"]) - 1:]
            vals.append(lp.mean() if average else lp.sum())
        out[side] = np.array(vals)
    return out


def _lengths(side):
    return np.array([len(p[f"{side}_ids"]) for p in PAIRS], np.float64)


def _logsig(x):
    return -np.logaddexp(0.0, -np.asarray(x, np.float64))


def _check_common(result, logp_keys):
    assert np.isfinite(result["loss"])
    assert all(np.isfinite(v).all() for v in result["grads"].values())
    assert sum(float(np.abs(g).sum()) for g in result["grads"].values()) > 0
    for key in logp_keys:
        assert result[key].shape == (len(PAIRS),) and np.isfinite(result[key]).all()


def _dpo_formula(r, loss_type, beta, ls=0.0):
    c = r["chosen_logps"].astype(np.float64) - r["ref_chosen_logps"]
    rj = r["rejected_logps"].astype(np.float64) - r["ref_rejected_logps"]
    d = c - rj
    if loss_type == "sigmoid":
        return -_logsig(beta * d).mean()
    if loss_type == "hinge":
        return np.maximum(0.0, 1 - beta * d).mean()
    if loss_type == "ipo":
        return ((c / _lengths("chosen") - rj / _lengths("rejected") - 1 / (2 * beta)) ** 2).mean()
    if loss_type == "robust":
        return ((-(1 - ls) * _logsig(beta * d) + ls * _logsig(-beta * d)) / (1 - 2 * ls)).mean()
    raise ValueError(loss_type)


@pytest.mark.parametrize("loss_type,beta,ls", [("sigmoid", 0.1, 0.0), ("ipo", 0.1, 0.0), ("hinge", 0.5, 0.0),
                                               ("robust", 0.1, 0.2)])
def test_dpo_is_the_formula(dirs, loss_type, beta, ls):
    r = ref.dpo(dirs["policy"], PAIRS, loss_type=loss_type, beta=beta, label_smoothing=ls,
                ref_model_dir=dirs["reference"])
    _check_common(r, ["chosen_logps", "rejected_logps", "ref_chosen_logps", "ref_rejected_logps"])
    np.testing.assert_allclose(r["loss"], _dpo_formula(r, loss_type, beta, ls), rtol=1e-6, atol=1e-6)
    # the log-probs TRL used are the completion-token sums of plain forwards, under each model
    policy, reference = _completion_logps(dirs["policy"]), _completion_logps(dirs["reference"])
    for side in ("chosen", "rejected"):
        np.testing.assert_allclose(r[f"{side}_logps"], policy[side], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(r[f"ref_{side}_logps"], reference[side], rtol=1e-5, atol=1e-5)
    rc = beta * (r["chosen_logps"] - r["ref_chosen_logps"])
    rr = beta * (r["rejected_logps"] - r["ref_rejected_logps"])
    m = r["metrics"]
    np.testing.assert_allclose([m["rewards/chosen"], m["rewards/rejected"], m["rewards/margins"],
                                m["rewards/accuracies"], m["logps/chosen"], m["logps/rejected"]],
                               [rc.mean(), rr.mean(), (rc - rr).mean(), (rc > rr).mean(),
                                r["chosen_logps"].mean(), r["rejected_logps"].mean()], rtol=1e-5, atol=1e-6)
    assert r["batch"]["completion_mask"].sum() == _lengths("chosen").sum() + _lengths("rejected").sum()


def test_dpo_lora_adapters_off_reference(dirs):
    base = ref.dpo(dirs["policy"], PAIRS)  # policy == reference: loss log 2
    np.testing.assert_allclose(base["loss"], np.log(2.0), rtol=1e-6)
    zero = ref.dpo(dirs["policy"], PAIRS, lora=LORA)
    lora_b = {n: v for n, v in zero["params"].items() if "lora_B" in n}
    assert lora_b and all((v == 0).all() for v in lora_b.values())  # PEFT's default init: B = 0
    assert all(not np.abs(g).any() for n, g in zero["grads"].items() if "lora_A" in n)
    rng = np.random.RandomState(0)
    state = {n: (0.2 * rng.randn(*v.shape)).astype(np.float32) for n, v in lora_b.items()}
    r = ref.dpo(dirs["policy"], PAIRS, lora=LORA, lora_state=state)
    _check_common(r, ["chosen_logps", "rejected_logps"])
    assert set(r["grads"]) == set(zero["grads"]) and all("lora_" in n for n in r["grads"])
    for n, g in r["grads"].items():
        assert np.abs(g).max() > 0, n
    for n, v in state.items():
        np.testing.assert_array_equal(r["params"][n], v)
    # reference = base model (adapters off); the policy moved away from it
    for side in ("chosen", "rejected"):
        np.testing.assert_allclose(r[f"ref_{side}_logps"], base[f"{side}_logps"], rtol=1e-6, atol=1e-6)
    assert np.abs(r["chosen_logps"] - r["ref_chosen_logps"]).max() > 1e-4
    np.testing.assert_allclose(r["loss"], _dpo_formula(r, "sigmoid", 0.1), rtol=1e-6, atol=1e-6)


def test_simpo_is_the_formula(dirs):
    beta, gamma, alpha, ls = 2.0, 0.5, 0.3, 0.1
    r = ref.simpo(dirs["policy"], PAIRS, beta=beta, simpo_gamma=gamma, cpo_alpha=alpha, label_smoothing=ls)
    _check_common(r, ["chosen_logps", "rejected_logps"])
    avg = _completion_logps(dirs["policy"], average=True)
    np.testing.assert_allclose(r["chosen_logps"], avg["chosen"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(r["rejected_logps"], avg["rejected"], rtol=1e-5, atol=1e-5)
    z = beta * (r["chosen_logps"].astype(np.float64) - r["rejected_logps"]) - gamma
    pref = (-(1 - ls) * _logsig(z) - ls * _logsig(-z)).mean()
    chosen_tokens = np.concatenate([_token_logps(dirs["policy"], p["prompt_ids"], p["chosen_ids"])
                                    [len(p["prompt_ids"]) - 1:] for p in PAIRS])
    nll = -chosen_tokens.mean()  # one token-level mean over the chosen completions
    np.testing.assert_allclose(r["metrics"]["nll_loss"], nll, rtol=1e-5)
    np.testing.assert_allclose(r["loss"], pref + alpha * r["metrics"]["nll_loss"], rtol=1e-6)
    np.testing.assert_allclose(r["metrics"]["rewards/chosen"], beta * r["chosen_logps"].mean(), rtol=1e-6)


def test_orpo_is_the_formula(dirs):
    beta = 0.25
    r = ref.orpo(dirs["policy"], PAIRS, beta=beta)
    _check_common(r, ["chosen_logps", "rejected_logps"])
    c, rj = r["chosen_logps"].astype(np.float64), r["rejected_logps"].astype(np.float64)
    log_odds = (c - rj) - (np.log(-np.expm1(c)) - np.log(-np.expm1(rj)))
    all_chosen = np.concatenate([_token_logps(dirs["policy"], p["prompt_ids"], p["chosen_ids"]) for p in PAIRS])
    nll = -all_chosen.mean()  # the whole chosen sequence, prompt included (all but the first token)
    np.testing.assert_allclose(r["metrics"]["nll_loss"], nll, rtol=1e-5)
    np.testing.assert_allclose(r["loss"], r["metrics"]["nll_loss"] - beta * _logsig(log_odds).mean(), rtol=1e-5)
    np.testing.assert_allclose(r["metrics"]["log_odds_chosen"], log_odds.mean(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(r["metrics"]["log_odds_ratio"], _logsig(log_odds).mean(), rtol=1e-5)


@pytest.mark.parametrize("margins,center", [(False, None), (True, 0.01)])
def test_reward_is_the_formula(dirs, margins, center):
    pairs = [{**p, "margin": 0.25 * i} for i, p in enumerate(PAIRS)] if margins else PAIRS
    r = ref.reward(dirs["policy"], pairs, center_rewards_coefficient=center)
    _check_common(r, ["rewards_chosen", "rewards_rejected"])
    assert "score.weight" in r["grads"] and np.abs(r["grads"]["score.weight"]).max() > 0
    rc, rr = r["rewards_chosen"].astype(np.float64), r["rewards_rejected"].astype(np.float64)
    margin = np.array([p.get("margin", 0.0) for p in pairs])
    expected = -_logsig(rc - rr - margin).mean() + (center * ((rc + rr) ** 2).mean() if center else 0.0)
    np.testing.assert_allclose(r["loss"], expected, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose([r["metrics"]["accuracy"], r["metrics"]["margin"]], [(rc > rr).mean(), (rc - rr).mean()],
                               rtol=1e-5, atol=1e-6)
    # independent: hidden state of the last token of each unpadded sequence, dotted with the score weight
    model = hf_models.load_hf(dirs["policy"])
    w = r["score_weight"][0].astype(np.float64)
    for i, p in enumerate(PAIRS):
        for side, got in (("chosen", rc[i]), ("rejected", rr[i])):
            ids = torch.tensor([p["prompt_ids"] + p[f"{side}_ids"]])
            with torch.no_grad():
                h = model.model(ids).last_hidden_state[0, -1].numpy()
            np.testing.assert_allclose(got, h @ w, rtol=1e-5, atol=1e-5)
