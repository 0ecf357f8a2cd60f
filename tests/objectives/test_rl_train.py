"""RL training end to end (`sftjax-train objective=grpo` and `objective=ppo`), as a user runs it, in subprocesses with
the tiny model of tests/train/conftest.py (random Llama, BPE tokenizer, ChatML template) and its arithmetic chats as
prompts; reward functions come from a module written into the runs' working directory (imported from there).

What is tested, and the tolerances:

1. A toy task learns: GRPO (full fine-tuning, lr 2e-2, temperature 1, G = 4, 8 new tokens, beta 0.04) on the reward
   "fraction of digit characters in the completion": the mean `reward` of the last 5 logged steps (of 20) is at
   least 0.4 above the mean of the first 5, and at least 0.8 (observed over seeds 1..8: 0.02..0.31 -> 0.98..1.0).
   With one reward of weight 1, `reward` equals `rewards/digits` exactly.
2. Exact resume after SIGKILL, sampling included: GRPO with LoRA (adapter dropout 0.1, so the step's randomness
   matters), objective.epochs=2 (old log-probabilities computed, a rollout feeds 2 steps), evaluation in between.
   Run B is SIGKILLed (by its own reward function, once a checkpoint of step >= 4 is committed) and resumed; its
   final train state equals run A's bitwise (every leaf, optimizer state and RNG included), its data state is
   equal, and its metric lines (train and eval) and sample lines are equal exactly except the timing keys (time,
   tokens_per_s, rollout/*_s, rollout/generated_tokens_per_s). With epochs=2 and save_every=3 the checkpoints
   are exactly the rollout boundaries where a save fell due: steps 4, 6, 10, 12, 16 of 16.
3. The KL to the reference at step 1 is exactly 0.0 (no tolerance): LoRA (reference = the base with the adapters
   off; B starts at 0) and full fine-tuning (a frozen copy); PPO's kl and kl_penalty of its first rollout too.
   It is > 0 later (the reference is really used).
4. PPO trains (value_loss, value_clip_fraction, kl_penalty, ... logged and finite), evaluates (eval lines with
   exact_match, reward, arith/exact_match, arith/reward; sample lines), checkpoints at rollout boundaries (4, 8);
   `sftjax-export` writes a model transformers loads (finite logits, no value-head file) and `sftjax-eval --run`
   repeats the run's final evaluation exactly (greedy completions of its held-out prompts: exact match, reward).
5. A transformers LlamaForSequenceClassification directory (num_labels 1) as a reward, with exact_match and a
   function: objective.rewards=[DIR,exact_match,digits], reward_weights=[1.0,0.5,0.25]; every logged train reward
   = the weighted sum of the logged rewards/<name> within 1e-5 absolute, and each eval sample's reward = transformers'
   score of the same tokens + the weighted other rewards within 1e-4 absolute (float32). A reward model with
   another vocabulary exits 2 with one line naming objective.rewards[0].
6. Bad input exits 2 with exactly one line on stderr (no traceback) naming the key or file:line: an unimportable
   reward, a reward that raises (names the function and the prompt's file:line), one that returns NaN,
   num_generations=1, an over-long prompt with over_long=error, a batch that is not a multiple of num_generations,
   exact_match on records without answers, max_steps not a multiple of the steps per rollout. over_long=drop
   trains and logs the dropped count; a reward function receives `answer` (as a string) and the record's keys.
   A failing run in an existing run directory leaves it as it was (a setup failure: every file byte for byte; a
   failure in the first rollout after resuming: metrics, samples and checkpoints).
7. Rollouts on 2 (forced host) devices train with a finite loss (the prompt-only run of 6).
8. Early stopping lets the rollout in progress finish (checkpoints only at rollout boundaries); sftjax-eval --run
   of a run trained on prompt-only records reads its held-out prompts.
"""

import json
import math
import shutil

import jax
import numpy as np
import pytest
import torch
import transformers

import sftjax
from sftjax.cli.eval import main as eval_main
from sftjax.cli.export import main as export_main
from sftjax.data.tokenizer import train_bpe_tokenizer
from sftjax.train.checkpoint import Checkpointer
from tests.data.conftest import CORPUS, TEMPLATES, VOCAB_SIZE
from tests.model import hf_models
from tests.train.conftest import run_train

COMMON = ("data.seq_len=64", "trainer.devices=1", "trainer.batch_size=8", "trainer.progress=false",
          "trainer.log_every=1", "objective.max_new_tokens=8")
GRPO = ("objective=grpo", "objective.num_generations=4")
MODULE = "rl_test_rewards"  # written into the working directory of every run (the reward functions' import path)
REWARDS = '''
import os
import signal
import time
from pathlib import Path


def _die_after_checkpoint():
    """SIGKILL this process once a checkpoint of step >= RL_TEST_KILL_STEP is committed in RL_TEST_KILL_DIR."""
    directory = os.environ.get("RL_TEST_KILL_DIR")
    if not directory:
        return
    time.sleep(0.01)  # a little time for the asynchronous save to land
    d = Path(directory)
    if d.is_dir() and any(p.name.isdigit() and int(p.name) >= int(os.environ["RL_TEST_KILL_STEP"])
                          for p in d.iterdir()):
        os.kill(os.getpid(), signal.SIGKILL)


def digits(prompt, completion):
    _die_after_checkpoint()
    return sum(c.isdigit() for c in completion) / max(len(completion), 1)


def explode(prompt, completion, explode=False):
    if explode:
        raise ValueError("boom")
    return 0.0


def nan_reward(prompt, completion):
    return float("nan")


def level(prompt, completion, answer, level=0):
    """The record's `level` (a keyword from the record); the answer must come as a string."""
    if not isinstance(answer, str) or not isinstance(prompt, (str, tuple, list)):
        raise TypeError(f"answer {answer!r}, prompt {prompt!r}")
    return float(level)
'''
DIGITS = f"objective.rewards=[{MODULE}:digits]"
TIMING = ("time", "tokens_per_s", "rollout/generated_tokens_per_s")


def lines(run, split="train", name="metrics.jsonl"):
    out = [json.loads(x) for x in (run / name).read_text().splitlines()]
    return [x for x in out if x.get("split") == split] if split else out


def untimed(records):
    return [{k: v for k, v in r.items() if k not in TIMING and not (k.startswith("rollout/") and k.endswith("_s"))}
            for r in records]


def committed(run):
    directory = run / "checkpoints"
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit()) if directory.is_dir() else []


def restore_latest(run):
    """(step, state, extras) of the run's latest checkpoint, restored into the structure its layout item records."""
    with Checkpointer(run / "checkpoints", keep_last=1, read_only=True) as ckpt:
        step = ckpt.latest_step()
        layout = json.loads((run / "checkpoints" / str(step) / "layout" / "metadata").read_text())
        abstract: dict = {}
        for leaf in layout:
            node = abstract
            for part in leaf["path"][:-1]:
                node = node.setdefault(part, {})
            node[leaf["path"][-1]] = jax.ShapeDtypeStruct(tuple(leaf["shape"]), np.dtype(leaf["dtype"]))
        state, extras = ckpt.restore(abstract, step)
    return step, state, extras


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def rl(workspace, tmp_path_factory):
    """The working directory of the runs (with the reward module) and prompt-only datasets."""
    root = tmp_path_factory.mktemp("rl")
    (root / f"{MODULE}.py").write_text(REWARDS)
    prompts = write_jsonl(root / "prompts.jsonl", [
        {"prompt": "3+4=", "answer": "7"},
        {"prompt": [{"role": "user", "content": "5+5="}], "answer": "10"},
        {"prompt": "1+1=", "answer": "2", "explode": True},
        {"prompt": "2+2=", "answer": "4"}])
    long = write_jsonl(root / "long.jsonl", [
        {"prompt": "3+4=", "answer": "7", "level": 2}, {"prompt": "1+" * 100 + "1=", "answer": "101", "level": 2},
        {"prompt": "2+2=", "answer": "4", "level": 2}, {"prompt": "6+1=", "answer": 7, "level": 2}])
    unanswered = write_jsonl(root / "unanswered.jsonl", [{"prompt": "3+4="}, {"prompt": "1+2="}])
    return {"root": root, "model": workspace["model"], "train": workspace["train"], "eval": workspace["eval"],
            "prompts": prompts, "long": long, "unanswered": unanswered}


def train(rl, *overrides, check=True):
    """sftjax-train in the reward module's directory; COMMON's keys unless `overrides` sets them."""
    given = {o.split("=")[0] for o in overrides}
    common = [o for o in COMMON if o.split("=")[0] not in given]
    return run_train(f"model={rl['model']}", *common, *overrides, cwd=rl["root"], check=check)


# ---------------------------------------------------------------------------------------------------------------
# 1, 3. A toy task learns; the KL at step 1 is 0


@pytest.fixture(scope="module")
def toy_run(rl):
    run = rl["root"] / "toy"
    train(rl, f"data={rl['train']}", *GRPO, DIGITS, "method=full", "optim.lr=2e-2", "objective.temperature=1.0",
          "objective.beta=0.04", "trainer.max_steps=20", "trainer.eval_every=0", f"trainer.run_dir={run}")
    return run


def test_grpo_learns_a_toy_reward(toy_run):
    steps = lines(toy_run)
    assert [x["step"] for x in steps] == list(range(1, 21))
    assert {"loss", "policy_loss", "reward", "reward_std", "rewards/digits", "frac_reward_zero_std", "kl", "entropy",
            "clip_fraction", "ratio", "tokens", "completions/mean_length", "completions/clipped_ratio",
            "rollout/generate_s", "rollout/reward_s", "rollout/score_s"} <= set(steps[0])
    assert all(x["reward"] == x["rewards/digits"] for x in steps)  # one reward, weight 1
    first, last = np.mean([x["reward"] for x in steps[:5]]), np.mean([x["reward"] for x in steps[-5:]])
    assert last >= first + 0.4 and last >= 0.8, (first, last)
    assert all(np.isfinite(x["loss"]) for x in steps)


def test_kl_is_zero_at_step_one_under_full_fine_tuning(toy_run):
    steps = lines(toy_run)
    assert steps[0]["kl"] == 0.0  # the frozen copy of the starting weights is the policy at step 1
    assert steps[-1]["kl"] > 0.0


# ---------------------------------------------------------------------------------------------------------------
# 2, 3. Exact resume after SIGKILL (LoRA); checkpoints at rollout boundaries


@pytest.fixture(scope="module")
def resume_runs(rl):
    args = (f"data={rl['train']}", f"data.eval=[{{path:'{rl['eval']}'}}]", *GRPO, DIGITS, "objective.epochs=2",
            "objective.beta=0.04", "method=lora", "method.lora.rank=8", "method.lora.dropout=0.1", "optim.lr=1e-2",
            "trainer.max_steps=16", "trainer.save_every=3", "trainer.keep_last=10", "trainer.eval_every=6",
            "trainer.num_samples=1")
    a, b = rl["root"] / "resume_a", rl["root"] / "resume_b"
    train(rl, *args, f"trainer.run_dir={a}")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RL_TEST_KILL_DIR", str(b / "checkpoints"))
        mp.setenv("RL_TEST_KILL_STEP", "4")
        killed = train(rl, *args, f"trainer.run_dir={b}", check=False)
    assert killed.returncode == -9, killed.stderr[-2000:]  # SIGKILLed by its reward function
    resumed = train(rl, *args, f"trainer.run_dir={b}")
    return a, b, resumed.stdout + resumed.stderr


def test_resume_after_sigkill_is_bitwise_exact(resume_runs):
    a, b, log = resume_runs
    assert "resuming" in log
    resumed_from = int(log.split("from step ")[1].split()[0])
    assert 4 <= resumed_from < 16
    step_a, state_a, extras_a = restore_latest(a)
    step_b, state_b, extras_b = restore_latest(b)
    assert step_a == step_b == 16
    leaves_a, leaves_b = jax.tree_util.tree_leaves_with_path(state_a), jax.tree_util.tree_leaves_with_path(state_b)
    assert [p for p, _ in leaves_a] == [p for p, _ in leaves_b]
    for (path, x), (_, y) in zip(leaves_a, leaves_b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))
    assert extras_a["data_state"] == extras_b["data_state"]
    assert untimed(lines(a, split=None)) == untimed(lines(b, split=None))
    assert [x["step"] for x in lines(a)] == list(range(1, 17))
    assert [x["step"] for x in lines(a, "eval")] == [6, 12, 16]
    assert untimed(lines(a, None, "samples.jsonl")) == untimed(lines(b, None, "samples.jsonl"))


def test_checkpoints_fall_on_rollout_boundaries(resume_runs):
    a, b, _ = resume_runs
    # epochs=2: a rollout trains steps (2k+1, 2k+2); save_every=3 falls due at 3, 9, 15 (saved at the next boundary)
    assert committed(a) == [4, 6, 10, 12, 16]
    assert all(step % 2 == 0 for step in committed(b))


def test_kl_is_zero_at_step_one_under_lora(resume_runs):
    a, _, _ = resume_runs
    steps = lines(a)
    assert steps[0]["kl"] == 0.0  # the reference is the base with the adapters off; B starts at 0
    assert steps[-1]["kl"] > 0.0
    assert {"rewards/digits", "reward", "clip_fraction"} <= set(steps[0])


def test_early_stopping_waits_for_the_rollout_boundary(rl, tmp_path):
    run = tmp_path / "run"
    done = train(rl, f"data={rl['train']}", f"data.eval=[{{path:'{rl['eval']}'}}]", *GRPO, DIGITS,
                 "objective.epochs=2", "method=lora", "trainer.max_steps=8", "trainer.eval_every=1",
                 "trainer.patience=2", "trainer.min_delta=100", "trainer.num_samples=0", f"trainer.run_dir={run}",
                 check=False)
    if done.returncode == 2:  # refused up front (eval_every / patience against the rollout length) is fine too
        assert "trainer.eval_every" in done.stderr.strip().splitlines()[-1]
        return
    assert done.returncode == 0, done.stderr[-2000:]
    assert "early stopping" in done.stdout + done.stderr
    assert committed(run) and all(step % 2 == 0 for step in committed(run)), committed(run)


# ---------------------------------------------------------------------------------------------------------------
# 4. PPO end to end, export, sftjax-eval


@pytest.fixture(scope="module")
def ppo_run(rl):
    run = rl["root"] / "ppo"
    train(rl, f"data={rl['train']}", f"data.eval=[{{path:'{rl['eval']}'}}]", "objective=ppo",
          f"objective.rewards=[{MODULE}:digits,exact_match]", "method=lora", "method.lora.rank=8", "optim.lr=1e-3",
          "trainer.max_steps=8", "trainer.eval_every=4", "trainer.save_every=4", "trainer.num_samples=1",
          f"trainer.run_dir={run}")
    return run


def test_ppo_trains_evaluates_and_checkpoints(ppo_run):
    steps, evals = lines(ppo_run), lines(ppo_run, "eval")
    assert [x["step"] for x in steps] == list(range(1, 9))
    for x in steps:
        for key in ("loss", "policy_loss", "value_loss", "value_clip_fraction", "kl", "kl_penalty", "entropy",
                    "reward", "rewards/digits", "rewards/exact_match"):
            assert x[key] is not None and np.isfinite(x[key]), (x["step"], key)
    assert steps[0]["kl"] == 0.0
    assert all(x["kl_penalty"] == 0.0 for x in steps[:4])  # the first rollout is sampled by the starting policy
    assert [x["step"] for x in evals] == [4, 8]
    assert {"exact_match", "reward", "arith/exact_match", "arith/reward"} <= set(evals[-1])
    samples = lines(ppo_run, None, "samples.jsonl")
    assert [(s["step"], s["tag"]) for s in samples] == [(4, "sample/0"), (8, "sample/0")]
    assert {"where", "prompt", "generated", "answer", "reward"} <= set(json.loads(samples[0]["text"]))
    assert committed(ppo_run) == [4, 8]
    final = json.loads((ppo_run / "final_metrics.json").read_text())
    assert final["step"] == 8 and final["metric"] == final["eval/reward"]


def test_ppo_export_loads_in_transformers(ppo_run, tmp_path):
    out = tmp_path / "policy"
    assert export_main(["--run", str(ppo_run), "--out", str(out)]) == 0
    files = sorted(p.name for p in out.iterdir())
    assert "model.safetensors" in files and not [f for f in files if "head" in f], files
    model = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    tok = transformers.AutoTokenizer.from_pretrained(out)
    ids = tok("<|im_start|>user\n3+4=<|im_end|>\n<|im_start|>assistant\n", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape[-1] == VOCAB_SIZE and torch.isfinite(logits).all()


def test_sftjax_eval_of_an_rl_run_repeats_its_last_evaluation(ppo_run, capsys, monkeypatch):
    """sftjax-eval --run evaluates an RL run as training does (greedy completions of the held-out prompts): the same
    exact match and reward as the run's final evaluation (exactly: the same greedy decoding of the same weights).
    Run where the run was trained: its reward function's module is imported from the working directory."""
    monkeypatch.chdir(ppo_run.parent)
    assert eval_main(["--run", str(ppo_run), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    overall, final = result["overall"], lines(ppo_run, "eval")[-1]
    assert result["step"] == 8 and overall["examples"] == 20 and "arith" in result["tasks"]
    assert (overall["exact_match"], overall["reward"]) == (final["exact_match"], final["reward"])
    assert result["tasks"]["arith"]["reward"] == final["arith/reward"]
    assert eval_main(["--run", str(ppo_run)]) == 0
    out = capsys.readouterr().out
    assert "overall" in out and "reward" in out


# ---------------------------------------------------------------------------------------------------------------
# 5. A reward model as a reward


def build_reward_model(directory, tokenizer_dir, vocab_size, seed=0):
    torch.manual_seed(seed)
    config = hf_models.hf_config("llama", "gqa", vocab_size=vocab_size, tie_word_embeddings=False, num_labels=1,
                                 pad_token_id=0)
    model = transformers.LlamaForSequenceClassification(config)
    hf_models.randomize_(model, seed, std=0.3)
    model.save_pretrained(directory)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / name, directory / name)
    return directory


def test_reward_model_and_exact_match_weighted(rl):
    """rewards [the reward model, exact_match, digits] weighted [1.0, 0.5, 0.25] (digits: so that a second weight
    meets non-zero rewards; the random policy never matches an answer)."""
    rm = build_reward_model(rl["root"] / "tiny_rm", rl["model"], VOCAB_SIZE)
    run = rl["root"] / "with_rm"
    train(rl, f"data={rl['train']}", f"data.eval=[{{path:'{rl['eval']}'}}]", *GRPO,
          f"objective.rewards=[{rm},exact_match,{MODULE}:digits]", "objective.reward_weights=[1.0,0.5,0.25]",
          "method=lora", "optim.lr=1e-2", "trainer.max_steps=4", "trainer.eval_every=0", "trainer.num_samples=3",
          f"trainer.run_dir={run}")
    steps = lines(run)
    assert len(steps) == 4
    for x in steps:
        assert np.isfinite(x["loss"])
        weighted = 1.0 * x["rewards/tiny_rm"] + 0.5 * x["rewards/exact_match"] + 0.25 * x["rewards/digits"]
        assert x["reward"] == pytest.approx(weighted, abs=1e-5)
    assert any(x["reward_std"] > 0 for x in steps)  # the reward model tells completions apart
    assert len({x["rewards/tiny_rm"] for x in steps}) > 1 and any(x["rewards/digits"] > 0 for x in steps)
    # the eval samples' rewards: transformers' score of the same tokens + the other rewards
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(rm, attn_implementation="eager").eval()
    ours = sftjax.load_reward_model(rm)
    records = [json.loads(x) for x in rl["eval"].read_text().splitlines()]
    samples = [json.loads(x["text"]) for x in lines(run, None, "samples.jsonl")]
    assert len(samples) == 3
    for sample in samples:
        messages = records[int(sample["where"].rsplit(":", 1)[1]) - 1]["messages"]
        generated = sample["generated"]
        with torch.no_grad():
            score = hf(input_ids=torch.tensor([ours.tokens(messages[:-1], generated).tolist()])).logits[0, 0].item()
        digits = sum(c.isdigit() for c in generated) / max(len(generated), 1)
        expected = score + 0.5 * float(generated.strip() == messages[-1]["content"]) + 0.25 * digits
        assert sample["reward"] == pytest.approx(expected, abs=1e-4)


def test_reward_model_with_another_tokenizer_is_refused(rl, tmp_path):
    special, bos, eos, pad = TEMPLATES["qwen_chatml"]
    other_tok = train_bpe_tokenizer(CORPUS, VOCAB_SIZE - 60, special_tokens=special, bos_token=bos, eos_token=eos,
                                    pad_token=pad, chat_template="chatml").save(tmp_path / "other_tok")
    rm = build_reward_model(tmp_path / "other_rm", other_tok, VOCAB_SIZE - 60)
    line = _fails(rl, tmp_path, f"data={rl['train']}", *GRPO, f"objective.rewards=[{rm}]")
    assert f"objective.rewards[0]={str(rm)!r}: the reward model's tokenizer" in line


# ---------------------------------------------------------------------------------------------------------------
# 6. Bad input: one line, exit 2; a failing run leaves an existing run directory as it was


def _fails(rl, tmp_path, *overrides, run_dir=None):
    done = train(rl, f"trainer.run_dir={run_dir or tmp_path / 'r'}", *overrides, check=False)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    err = done.stderr.strip().splitlines()
    assert len(err) == 1, done.stderr[-3000:]
    assert err[0].startswith("sftjax-train: error: ")
    return err[0]


@pytest.mark.parametrize("case", ["no_module", "raises", "nan", "one_generation", "over_long", "batch",
                                  "no_answer", "max_steps"])
def test_bad_input_one_line_exit_2(rl, tmp_path, case):
    p, long = rl["prompts"], rl["long"]
    overrides, expected = {
        "no_module": ((f"data={p}", *GRPO, "objective.rewards=[nosuchmodule:f]"),
                      ["objective.rewards[0]='nosuchmodule:f': cannot import module 'nosuchmodule'"]),
        "raises": ((f"data={p}", *GRPO, f"objective.rewards=[{MODULE}:explode]"),
                   [f"objective.rewards[0]='{MODULE}:explode' raised ValueError: boom", f"{p}:3"]),
        "nan": ((f"data={p}", *GRPO, f"objective.rewards=[{MODULE}:nan_reward]"),
                [f"objective.rewards[0]='{MODULE}:nan_reward' returned nan for a completion of {p}:",
                 "a reward must be a finite number"]),
        "one_generation": ((f"data={p}", "objective=grpo", "objective.num_generations=1"),
                           ["objective.num_generations=1: GRPO needs >= 2"]),
        "over_long": ((f"data={long}", *GRPO, "data.over_long=error"),
                      [f"{long}:2: the prompt has", "data.seq_len"]),
        "batch": ((f"data={p}", *GRPO, "trainer.batch_size=6"),
                  ["objective.num_generations=4", "= 6 completions must hold whole groups"]),
        "no_answer": ((f"data={rl['unanswered']}", *GRPO),
                      [f"objective.rewards[0]=exact_match: {rl['unanswered']}:1 has no answer"]),
        "max_steps": ((f"data={p}", *GRPO, "objective.epochs=2", "trainer.max_steps=5"),
                      ["trainer.max_steps=5: must be a multiple of the 2 optimizer steps each rollout feeds"]),
    }[case]
    line = _fails(rl, tmp_path, *overrides)
    for text in expected:
        assert text in line, line


@pytest.fixture(scope="module")
def prompt_only_run(rl):
    """Prompt-only records (text prompts, answers, a `level` key), one of them over-long and dropped, rollouts on 2
    (forced host) devices; evaluated on prompts.jsonl at the end."""
    run = rl["root"] / "prompt_only"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
        done = train(rl, f"data={rl['long']}", f"data.eval=[{{path:'{rl['prompts']}'}}]", *GRPO,
                     f"objective.rewards=[exact_match,{MODULE}:level]", "data.over_long=drop", "trainer.devices=2",
                     "method=lora", "optim.lr=1e-2", "trainer.max_steps=2", "trainer.eval_every=0",
                     "trainer.num_samples=0", f"trainer.run_dir={run}")
    return run, done.stdout + done.stderr


def test_over_long_drop_trains_and_counts(prompt_only_run):
    run, log = prompt_only_run
    assert "long 3 prompts (0 truncated, 1 dropped)" in log
    steps = lines(run)
    assert len(steps) == 2 and all(np.isfinite(x["loss"]) for x in steps)
    assert all(x["rewards/level"] == 2.0 for x in steps)  # the record's key reached the reward function
    [final] = lines(run, "eval")
    assert final["step"] == 2 and final["reward"] == final["exact_match"]  # prompts.jsonl has no level: 0


def test_sftjax_eval_of_a_run_on_prompt_only_records(prompt_only_run, capsys, monkeypatch):
    run, _ = prompt_only_run
    monkeypatch.chdir(run.parent)
    code = eval_main(["--run", str(run), "--max-new-tokens", "8", "--json"])
    assert code == 0, capsys.readouterr().err
    assert json.loads(capsys.readouterr().out)["overall"]["examples"] == 4


def test_failing_runs_leave_an_existing_run_dir_alone(rl, toy_run, tmp_path):
    run = tmp_path / "existing"
    shutil.copytree(toy_run, run)
    before = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    common = (f"data={rl['train']}", *GRPO, "method=full")
    # at setup (the reward cannot be imported) ...
    assert "cannot import" in _fails(rl, tmp_path, *common, "objective.rewards=[nosuchmodule:f]", run_dir=run)
    after = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert after == before
    # ... and in the first rollout after resuming (the reward returns NaN): metrics, samples, checkpoints as they were
    line = _fails(rl, tmp_path, *common, f"objective.rewards=[{MODULE}:nan_reward]", "trainer.max_steps=40",
                  run_dir=run)
    assert "returned nan" in line
    after = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    kept = [k for k in before if k.parts[0] in ("checkpoints", "metrics.jsonl", "samples.jsonl")]
    assert kept and all(after.get(k) == before[k] for k in kept)
    assert committed(run) == committed(toy_run)


# ---------------------------------------------------------------------------------------------------------------
# 7. Rollouts on 2 devices (the prompt-only run above)


def test_rollouts_on_two_devices(prompt_only_run):
    run, _ = prompt_only_run
    assert json.loads((run / "config.json").read_text())["trainer"]["devices"] == 2
    steps = lines(run)
    assert len(steps) == 2 and all(math.isfinite(x["loss"]) and x["tokens"] > 0 for x in steps)
    assert steps[0]["kl"] == 0.0 and 0 <= steps[0]["rewards/exact_match"] <= 1
