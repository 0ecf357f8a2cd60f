"""DPO and reward models end to end, as a user runs them: `sftjax-train objective=dpo ... method=lora` and
`objective=reward` on a JSONL of preference pairs (conversational, TRL's format) with the tiny model of
tests/train/conftest.py; evaluation, exact resume, the precomputed reference against the one in the step, sftjax-eval,
the exports (a reward model that transformers loads with the same rewards) and the bad input the issue names (one
line, exit 2, nothing overwritten).

Tolerances: a resumed run's train lines equal the uninterrupted run's exactly (same batches, same keys, same
compiled step); precomputed reference log-probabilities against the in-step ones: losses 1e-5 absolute (the same
float32 forward on differently packed rows); transformers' rewards against sftjax's: 1e-4 absolute (float32).
"""

import json
import random

import numpy as np
import pytest
import torch
import transformers

import sftjax
from sftjax.cli.eval import main as eval_main
from sftjax.cli.export import main as export_main
from tests.train.conftest import run_train

COMMON = ("data.seq_len=64", "trainer.devices=1", "trainer.batch_size=4", "trainer.progress=false",
          "trainer.num_samples=1", "trainer.log_every=1")


def write_pairs(path, n, seed):
    """Conversational pairs (explicit prompt): chosen = the sum, rejected = the sum followed by ' !?' (a surface
    feature a tiny model learns to disprefer within a few steps)."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            a, b = rng.randint(0, 50), rng.randint(0, 50)
            f.write(json.dumps({"prompt": [{"role": "user", "content": f"{a}+{b}="}],
                                "chosen": [{"role": "assistant", "content": str(a + b)}],
                                "rejected": [{"role": "assistant", "content": f"{a + b} !?"}]}) + "\n")
    return path


def lines(run, split="train"):
    return [x for x in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if x["split"] == split]


@pytest.fixture(scope="module")
def pairs(workspace, tmp_path_factory):
    root = tmp_path_factory.mktemp("preference")
    return {"root": root, "train": write_pairs(root / "pairs.jsonl", 96, 0),
            "eval": write_pairs(root / "pairs_eval.jsonl", 16, 1)}


@pytest.fixture(scope="module")
def dpo_run(workspace, pairs):
    run = pairs["root"] / "dpo"
    run_train(f"model={workspace['model']}", f"data={pairs['train']}", f"data.eval=[{{path:'{pairs['eval']}'}}]",
              "objective=dpo", "objective.beta=0.5", "method=lora", "method.lora.rank=8", *COMMON,
              "trainer.max_steps=16", "trainer.eval_every=8", "trainer.save_every=8", "optim.lr=1e-2",
              f"trainer.run_dir={run}", cwd=pairs["root"])
    return run


def test_lora_dpo_trains_and_logs_trl_metrics(dpo_run):
    train, evals = lines(dpo_run), lines(dpo_run, "eval")
    assert {"loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
            "logps/rejected", "nll", "pairs"} <= set(train[-1])
    assert train[0]["loss"] == pytest.approx(np.log(2), abs=1e-6)  # step 1: the policy is its reference
    # the held-out pairs: from chance to preferring the plain answer (16 steps, lr 1e-2)
    assert evals[-1]["rewards/accuracies"] >= 0.9 and evals[-1]["loss"] < evals[0]["loss"] < np.log(2)
    assert evals[-1]["pairs"] == 16 and evals[-1]["rewards/margins"] > 0


@pytest.fixture(scope="module")
def constant_runs(workspace, pairs):
    """(uninterrupted 8 steps, 4 steps then resumed to 8), full fine-tuning. The lr is constant, since a run of 4
    steps has another schedule than one of 8."""
    def args(run):
        return (f"model={workspace['model']}", f"data={pairs['train']}", "objective=dpo", *COMMON,
                "trainer.save_every=4", "trainer.eval_every=0", "optim.schedule=constant", "optim.lr=1e-3",
                f"trainer.run_dir={run}")
    whole, part = pairs["root"] / "whole", pairs["root"] / "part"
    run_train(*args(whole), "trainer.max_steps=8", cwd=pairs["root"])
    run_train(*args(part), "trainer.max_steps=4", cwd=pairs["root"])
    run_train(*args(part), "trainer.max_steps=8", cwd=pairs["root"])
    return whole, part


def test_resume_gives_the_same_steps(constant_runs):
    whole, part = constant_runs
    strip = lambda xs: [{k: v for k, v in x.items() if k not in ("time", "tokens_per_s")} for x in xs]  # noqa: E731
    assert strip(lines(whole)) == strip(lines(part)) and len(lines(whole)) == 8


def test_precomputed_reference_gives_the_same_losses(constant_runs, workspace, pairs):
    """objective.precompute_reference=true: the reference's log-probabilities computed once before training give
    the losses of the reference forward in every step; resuming recomputes the same values."""
    whole, _ = constant_runs
    run = pairs["root"] / "precomputed"
    args = (f"model={workspace['model']}", f"data={pairs['train']}", "objective=dpo",
            "objective.precompute_reference=true", *COMMON, "trainer.save_every=4", "trainer.eval_every=0",
            "optim.schedule=constant", "optim.lr=1e-3", f"trainer.run_dir={run}")
    run_train(*args, "trainer.max_steps=4", cwd=pairs["root"])
    run_train(*args, "trainer.max_steps=8", cwd=pairs["root"])
    ours, theirs = lines(run), lines(whole)
    assert len(ours) == len(theirs) == 8
    for a, b in zip(ours, theirs):
        for key in ("loss", "rewards/chosen", "rewards/margins", "logps/chosen"):
            assert a[key] == pytest.approx(b[key], abs=1e-5), (a["step"], key)


def test_sftjax_eval_reports_the_pair_metrics(dpo_run, capsys):
    assert eval_main(["--run", str(dpo_run), "--json", "--max-new-tokens", "0"]) == 0
    result = json.loads(capsys.readouterr().out)
    logged = lines(dpo_run, "eval")[-1]
    overall = result["overall"]
    assert overall["rewards/accuracies"] == pytest.approx(logged["rewards/accuracies"])
    assert overall["loss"] == pytest.approx(logged["loss"], rel=1e-5)
    assert result["tasks"]["pairs"]["accuracies"] == pytest.approx(logged["pairs/accuracies"])
    assert eval_main(["--run", str(dpo_run), "--max-new-tokens", "0"]) == 0
    table = capsys.readouterr().out.splitlines()
    row = table[table.index(next(x for x in table if "ranked right" in x)) + 2].split()  # task, overall
    assert row[:2] == ["overall", "16"] and row[2] == f"{logged['rewards/accuracies']:.2%}"


def test_dpo_run_exports_merged_and_peft(dpo_run, tmp_path):
    assert export_main(["--run", str(dpo_run), "--format", "peft", "--out", str(tmp_path / "adapter")]) == 0
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert export_main(["--run", str(dpo_run), "--out", str(tmp_path / "merged")]) == 0
    assert (tmp_path / "merged" / "model.safetensors").is_file()


@pytest.fixture(scope="module")
def reward_run(workspace, pairs):
    run = pairs["root"] / "reward"
    run_train(f"model={workspace['model']}", f"data={pairs['train']}", f"data.eval=[{{path:'{pairs['eval']}'}}]",
              "objective=reward", "objective.center_rewards_coefficient=0.01", "method=lora", "method.lora.rank=8",
              *COMMON, "trainer.num_samples=0", "trainer.max_steps=16", "trainer.eval_every=8",
              "trainer.save_every=8", "optim.lr=1e-2", f"trainer.run_dir={run}", cwd=pairs["root"])
    return run


def test_reward_model_learns_and_exports_for_transformers(reward_run, workspace, tmp_path):
    evals = lines(reward_run, "eval")
    assert {"loss", "accuracy", "margin", "rewards/chosen", "rewards/rejected", "pairs"} <= set(evals[-1])
    assert evals[-1]["accuracy"] >= 0.9 and evals[-1]["loss"] < evals[0]["loss"]
    out = tmp_path / "rm"
    assert export_main(["--run", str(reward_run), "--out", str(out)]) == 0
    model = sftjax.load_reward_model(out)
    from_run = sftjax.load_reward_model(reward_run)
    prompts = [[{"role": "user", "content": "3+4="}]] * 2 + [[{"role": "user", "content": "10+22="}]] * 2
    answers = ["7", "7 !?", "32", "32 !?"]
    ours = model.score(prompts, answers)
    np.testing.assert_allclose(from_run.score(prompts, answers), ours, atol=1e-5)
    assert ours[0] > ours[1] and ours[2] > ours[3]
    config = json.loads((out / "config.json").read_text())
    assert config["num_labels"] == 1 and config["architectures"] == ["LlamaForSequenceClassification"]
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(out, attn_implementation="eager").eval()
    tok = transformers.AutoTokenizer.from_pretrained(out)
    seqs = [model.tokens(p, a).tolist() for p, a in zip(prompts, answers)]
    width = max(map(len, seqs))
    assert tok.pad_token_id == hf.config.pad_token_id != tok.eos_token_id  # pooled at EOS, not before it
    ids = torch.tensor([s + [hf.config.pad_token_id] * (width - len(s)) for s in seqs])
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
    with torch.no_grad():
        theirs = hf(input_ids=ids, attention_mask=mask).logits[:, 0].numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-4)


def _fails(workspace, pairs, tmp_path, *overrides):
    done = run_train(f"model={workspace['model']}", *COMMON, f"trainer.run_dir={tmp_path / 'r'}", *overrides,
                     cwd=tmp_path, check=False)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    return done.stderr.strip().splitlines()[-1]


def test_bad_settings_and_data_one_line_exit_2(workspace, pairs, tmp_path):
    train = pairs["train"]
    assert "objective.beta=0.0: must be > 0" in _fails(workspace, pairs, tmp_path, f"data={train}",
                                                       "objective=dpo", "objective.beta=0")
    assert "preference pairs ('chosen' / 'rejected') given to objective=sft" in _fails(
        workspace, pairs, tmp_path, f"data={train}")
    assert "objective=dpo trains on preference pairs" in _fails(
        workspace, pairs, tmp_path, f"data={workspace['train']}", "objective=dpo")
    missing = tmp_path / "missing.jsonl"
    missing.write_text(json.dumps({"prompt": "a", "chosen": " b"}) + "\n")
    assert f"{missing}:1: missing field 'rejected'" in _fails(workspace, pairs, tmp_path, f"data={missing}",
                                                              "objective=dpo")
    same = tmp_path / "same.jsonl"
    same.write_text(json.dumps({"prompt": "a", "chosen": " b", "rejected": " b"}) + "\n")
    assert "no pair kept (1 records: 1 with chosen = rejected" in _fails(workspace, pairs, tmp_path, f"data={same}",
                                                                         "objective=reward")
    differ = tmp_path / "differ.jsonl"
    differ.write_text(json.dumps({"chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
                                  "rejected": [{"role": "user", "content": "x"},
                                               {"role": "assistant", "content": "c"}]}) + "\n")
    assert f"{differ}:1: the prompts of chosen and rejected differ (messages[0])" in _fails(
        workspace, pairs, tmp_path, f"data={differ}", "objective=dpo")


def test_reward_export_of_a_run_without_reward_head(dpo_run, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert export_main(["--run", str(dpo_run), "--reward", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--reward: run" in err[0] and "has no reward head (objective=dpo)" in err[0]
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
