"""One GRPO iteration of sftjax (Rollouts + its train step) against TRL's GRPOTrainer, on the same model and prompts.

    python experiments/bench/grpo_bench.py                    # bench config, full + lora (sized for < 8 min on 2 cores)
    python experiments/bench/grpo_bench.py --quick            # tiny config, one measured iteration each (the test)
    python experiments/bench/grpo_bench.py --modes lora --steps 4
    python experiments/bench/grpo_bench.py --rss              # + each stack alone in its own process: peak RSS

One GRPO iteration: take the next 8 prompts, sample G = 8 completions of each (64 rows) with the policy as it is,
reward them, score them with the reference (beta 0.04 > 0, so both stacks hold and run one), compute the
group-relative advantages, and take one optimizer step on the 64 rows (one step per rollout: epochs = minibatches
= 1 in sftjax, num_iterations = steps_per_generation = gradient_accumulation_steps = 1 in TRL, so neither needs
the sampling policy's log-probabilities: both use stop_gradient(logp) for the ratio's denominator). Compared, per
mode (full: the reference is a frozen copy of the starting weights; lora: r 16, alpha 32, dropout 0 on
q,k,v,o,gate,up,down, the reference is the base with the adapters off), in one fresh process per mode:

    sftjax   what `sftjax.train.loop` runs for objective=grpo: a `train.rollout.Rollouts` source (its pmapped
             KV-cache sampler `_p_sample`, the rewards of `train/rewards.py` with a `module:function` reward,
             the compiled `_p_score` for the reference log-probabilities, GRPO's host-side advantages, the
             [1, 1, 64, T] minibatch), then the trainer's pmapped train step (`compile_steps`), state from
             `init_state` / `replicate`, the reference from `references.policy_reference`. One iteration =
             `source.next(state, frozen, refs)` + `p_train(...)` + `block_until_ready`.
    trl      a real `trl.GRPOTrainer` (transformers `generate`, no vLLM; lora: `peft_config`, adapters-off
             reference; full: TRL loads its own `ref_model` from the same directory), one iteration =
             `trainer.training_step(model, generation_batch)` (generation, rewards, reference log-probs,
             advantages, the loss forward and backward) + `optimizer.step()` +
             `optimizer.zero_grad(set_to_none=True)`, as the HF Trainer's inner loop calls them, without that
             loop (no lr scheduler step: lr constant; no clipping; no logging or callbacks); the optimizer is
             `trainer.create_optimizer()`, the HF Trainer's default (AdamW, fused on torch >= 2.8). The
             generation batch is what TRL's RepeatSampler hands the trainer: each of the 8 prompts G times in a
             row.

Same for both: the bench model (Llama, vocab 8192, width 256, 4 layers, 4 q / 2 kv heads of 64, FFN 704, random,
written once as an HF directory with a word-level tokenizer, which both load), the same prompts in the same order
(prompts of 16-48 tokens: BOS + 15-47 random "number words", from a seeded RNG; the tokenizer's word for id i is
the string of i, so a prompt's text spells its token ids, and both tokenizers are checked to encode it so;
iteration k of both stacks gets the same 8 prompts, in the order of sftjax's prompt stream,
`data.mixture.epoch_order`), G 8, 64 new tokens, temperature 1 (no top-k / top-p), beta 0.04 (k3 KL in the
loss), epsilon 0.2, TRL's loss_type "dapo" (sftjax's only one), group-scaled advantages, the same reward (the
number of "7" characters in the completion's text: cheap, on the host, one Python call per completion in sftjax,
one per batch in TRL), AdamW lr 1e-6 constant, no weight decay, no clipping, float32, no gradient checkpointing
(TRL's GRPOConfig defaults to it; turned off, as sftjax's remat is "none"), bf16 off.

Fixed-length generation, so that both generate the same tokens per iteration (reported per stack: 64 x 64 =
4,096): sftjax's sampler stops a row at the tokenizer's and the model's EOS, so the sftjax side gets the
tokenizer with its eos_token unset and the model's eos_token_ids emptied (`Rollouts` then passes stop id -1: never
stops; id 2 may still be drawn as an ordinary token, probability about 1/8192 per token); TRL gets
`generation_kwargs={"min_new_tokens": 64}` (transformers masks EOS until 64 tokens are out, then stops at the
limit). Every completion is 64 tokens on both sides.

Method (as dpo_bench.py): the stacks take turns of --turn consecutive iterations each (sftjax, sftjax, trl, trl,
sftjax, ...), iteration k the same prompts for both; after the warm-up turns, the median of the steady
iterations, the first of each turn left out (it follows the other stack's turn: experiments/bench/README.md,
"Turns instead of step-by-step alternation"). Compilation is excluded from the steady figures: sftjax compiles its
sampler, scoring pass and train step in its first iteration (the first warm-up iteration, reported as "first
iteration s"; TRL's first iteration pays its own lazy set-up there). The phases of an iteration:

    generation       sftjax: Rollouts.metrics["rollout/generate_s"] (the pmapped sampler, its output on the host);
                     TRL: `_generate_single_turn` (prompt padding, `model.generate`, the EOS mask)
    score + reward   the rest of the rollout: completions decoded, rewarded (reward s, beside), the reference's
                     log-probabilities (sftjax `_p_score`: Rollouts.metrics["rollout/score_s"] with the
                     advantages; TRL: `_get_per_token_logps_and_entropies` under no_grad), advantages, the
                     batch laid out. sftjax: `source.next` - generation; TRL: `_generate_and_score_completions`
                     - `_generate_single_turn` (its prompt tokenization and decoding included)
    train step       sftjax: `p_train` + `block_until_ready`; TRL: the rest of `training_step` (loss forward with
                     entropy, backward) + `optimizer.step()` + `zero_grad`

    generated tok/s  generated tokens per iteration / median iteration seconds (same tokens: its ratio is the
                     speed ratio); "sampler tok/s" beside: generated tokens / median generation seconds
    vs TRL           TRL's median iteration seconds / sftjax's (> 1: sftjax faster)

Caveats: sftjax pads prompts to a multiple of 16 over the whole prompt set (P = 48) and rows to T =
round_up(P + 64) = 112, fixed for every iteration; TRL pads each batch to its own longest prompt (at most 48
tokens) + 64. sftjax's RL log-probabilities (`objectives.rl.token_logps`, in the scoring pass and the train step)
project to the vocabulary and log-softmax at every one of the T positions of a row, prompt and padding included;
TRL keeps only the completion's 64 positions (`logits_to_keep`). With a vocabulary this large against the width,
that projection is a large part of both passes: sftjax does about T / 64 = 1.75x TRL's head work there. The
sampled completions differ (different RNGs), so rewards and losses differ; only their shapes and counts agree.
Both stacks run in the same process (jax's and torch's thread pools both use the 2 cores, each idle while the
other runs). Timings need a quiet machine: the load averages before and after are printed; on the 2-core host
with another job running, a tiny --quick TRL iteration took anywhere from 0.02 to 3 s (torch's two threads wait
for cores the other job holds), sftjax's far less spread. With --rss each
(stack, mode) also runs alone in a fresh process (1 warm-up turn + 1 turn) that reports its peak RSS.

Results: the markdown table on stdout and in results/grpo_<date>-<HHMM>[-quick].md, every raw figure (each
iteration's phases, losses, rewards, token counts) in the .json beside it; a result never replaces another.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

MODES = ("full", "lora")
STACKS = ("sftjax", "trl")
LABELS = {"sftjax": "sftjax Rollouts + step", "trl": "TRL GRPOTrainer"}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA = {"rank": 16, "alpha": 32.0}
BETA = 0.04
EPSILON = 0.2
LR = 1e-6
SEED = 0
DIGIT = "7"  # the reward counts this character in a completion's text
SPECIALS = ("<pad>", "<s>", "</s>")  # ids 0, 1, 2: pad, BOS, EOS as in the presets
MiB = 2**20
ENV = {"TRANSFORMERS_VERBOSITY": "error", "HF_HUB_OFFLINE": "1", "TF_CPP_MIN_LOG_LEVEL": "2",
       "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRL_EXPERIMENTAL_SILENCE": "1", "PYTHONWARNINGS": "ignore"}
PHASES = ("generate_s", "score_reward_s", "step_s")

# prompt: prompt length in tokens, BOS included (inclusive range); steps: measured steady iterations per stack
# and mode; turn: consecutive iterations per stack per turn (the first is not measured).
SETTINGS = {
    "real": {"preset": "bench-llama", "overrides": {"hidden_size": 256, "intermediate_size": 704, "num_layers": 4,
                                                    "num_heads": 4, "num_kv_heads": 2, "head_dim": 64},
             "prompts": 8, "generations": 8, "new_tokens": 64, "prompt": (16, 48), "steps": 2, "turn": 2,
             "warmup": 1},
    "quick": {"preset": "tiny-llama", "overrides": {"num_layers": 2}, "prompts": 2, "generations": 2,
              "new_tokens": 8, "prompt": (4, 12), "steps": 1, "turn": 2, "warmup": 1},
}


# -------------------------------------------------------------------------------------------- reward and prompts
def sevens(prompt: Any, completion: str) -> float:
    """sftjax's reward (objective.rewards = ["grpo_bench:sevens"]): how many DIGIT characters the completion has."""
    return float(completion.count(DIGIT))


def sevens_trl(prompts: list, completions: list[str], **kwargs) -> list[float]:
    """The same reward in TRL's calling convention (a batch at a time)."""
    return [sevens(p, c) for p, c in zip(prompts, completions, strict=True)]


def write_tokenizer(hf_dir: Path, vocab_size: int) -> None:
    """A word-level tokenizer over the whole vocabulary: ids 0-2 the special tokens, id i >= 3 the word str(i);
    whitespace pre-tokenizer, BOS prepended (TemplateProcessing), written as tokenizer.json + tokenizer_config.json
    (sftjax's `load_tokenizer` and transformers' AutoTokenizer both read them)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    from sftjax.data.tokenizer import Tokenizer as SftjaxTokenizer

    vocab = {name: i for i, name in enumerate(SPECIALS)}
    vocab.update((str(i), i) for i in range(len(SPECIALS), vocab_size))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens(list(SPECIALS))
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    SftjaxTokenizer(backend, {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>"}).save(hf_dir)


def prompt_texts(count: int, s: dict[str, Any], vocab: int, seed: int) -> list[str]:
    """`count` prompt texts of random number words (ids >= 3), lengths (BOS included) uniform in s["prompt"]."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        n = int(rng.integers(s["prompt"][0], s["prompt"][1] + 1)) - 1
        out.append(" ".join(str(i) for i in rng.integers(len(SPECIALS), vocab, n)))
    return out


def prompt_ids(text: str) -> list[int]:
    """What both tokenizers must make of a prompt text: BOS, then each word's number."""
    return [1] + [int(w) for w in text.split()]


# --------------------------------------------------------------------------------------------------------- sftjax
class SftjaxGRPO:
    """What the training loop runs for objective=grpo on one device: Rollouts as the batch source, the compiled
    train step; `iteration(k)` is one rollout + one optimizer step."""

    def __init__(self, hf_dir: str, mode: str, s: dict[str, Any], texts: list[str]):
        import jax_side

        from sftjax.data.prompts import Prompt, encode_prompt
        from sftjax.data.tokenizer import load_tokenizer
        from sftjax.objectives.base import Context, build
        from sftjax.train.optim import make_optimizer, schedule
        from sftjax.train.references import policy_reference
        from sftjax.train.rewards import build_rewards
        from sftjax.train.rollout import Rollouts
        from sftjax.train.setup import build_model, run_trainable
        from sftjax.train.state import device_mesh, init_state, replicate
        from sftjax.train.step import compile_steps

        cfg = jax_side.train_config(hf_dir, mode, LORA["rank"], LORA["alpha"], LR)
        model = build_model(cfg)
        section = {"name": "grpo", "num_generations": s["generations"], "max_new_tokens": s["new_tokens"],
                   "temperature": 1.0, "top_k": 0, "top_p": 1.0, "beta": BETA, "epsilon": EPSILON,
                   "scale_rewards": "group", "epochs": 1, "minibatches": 1,
                   "rewards": [f"{Path(__file__).stem}:sevens"]}
        objective = build(section, Context(model.cfg, ("bench",))).bind({})
        refs = {name: policy_reference(model.trainable) for name in objective.policy_references()}
        tok = load_tokenizer(hf_dir)
        tok = dataclasses.replace(tok, special_tokens={k: v for k, v in tok.special_tokens.items()
                                                       if k != "eos_token"})  # never stop: fixed-length samples
        prompts = [Prompt(encode_prompt(tok, text, f"prompt {i}"), text, None, {}, 0, f"bench prompt {i}")
                   for i, text in enumerate(texts)]
        bad = next((i for i, p in enumerate(prompts) if p.ids.tolist() != prompt_ids(texts[i])), None)
        if bad is not None:
            raise SystemExit(f"grpo_bench: sftjax encodes prompt {bad} as {prompts[bad].ids.tolist()[:8]}...")
        rewards = build_rewards(objective.settings.rewards, objective.settings.weights, tok, prompts)
        self.rows = s["prompts"] * s["generations"]
        policy = model.cfg.replace(eos_token_ids=())  # nor the model's EOS: never stop
        self.source = Rollouts(objective, policy, tok, [prompts], None, rewards, devices=1,
                               batch_size=self.rows, grad_accum=1, data_seed=SEED, seed=cfg.trainer.seed)
        optimizer = make_optimizer(cfg.optim, jax_side.TOTAL_STEPS)
        self.p_train, _ = compile_steps(objective, optimizer, schedule(cfg.optim, jax_side.TOTAL_STEPS), 1)
        mesh = device_mesh(1)
        trainable = run_trainable(model, objective, cfg.trainer.seed)
        self.state = replicate(init_state(trainable, optimizer, cfg.trainer.seed), mesh)
        self.frozen, self.refs = replicate(model.frozen, mesh), replicate(refs, mesh)
        from sftjax.peft import quant

        self.facts = {"rows": self.rows, "seq": self.source.T, "prompt_slots": self.source.P,
                      "trainable_bytes": quant.tree_bytes(self.state["trainable"]),
                      "frozen_bytes": quant.tree_bytes(self.frozen), "reference_bytes": quant.tree_bytes(self.refs),
                      "reference": "frozen copy" if model.lora is None else "adapters off"}

    def iteration(self, k: int) -> dict[str, float]:
        import jax

        start = time.perf_counter()
        batch, tokens = self.source.next(self.state, self.frozen, self.refs, k)
        rolled = time.perf_counter()
        self.state, metrics = self.p_train(self.state, self.frozen, self.refs, batch)
        jax.block_until_ready((self.state, metrics))
        end = time.perf_counter()
        m = self.source.metrics
        return {"total_s": end - start, "generate_s": m["rollout/generate_s"],
                "score_reward_s": rolled - start - m["rollout/generate_s"], "step_s": end - rolled,
                "reward_s": m["rollout/reward_s"], "reference_s": m["rollout/score_s"],
                "generated_tokens": int(round(m["completions/mean_length"] * self.rows)),
                "trained_tokens": int(tokens), "slots": int(batch["tokens"].size),
                "prompt_tokens": int(batch["segment_ids"].sum()) - int(tokens),
                "reward": m["reward"], "loss": float(metrics["loss"][0]), "kl": float(metrics["kl"][0])}


# ------------------------------------------------------------------------------------------------------------ TRL
class TrlGRPO:
    """A trl.GRPOTrainer set up as its users set it up (module docstring), driven one training_step at a time;
    its phases timed by wrapping the trainer's own methods on the instance."""

    def __init__(self, hf_dir: str, mode: str, s: dict[str, Any], texts: list[str], out_dir: str):
        import warnings

        import datasets
        import torch
        import transformers
        from trl import GRPOConfig, GRPOTrainer

        datasets.disable_progress_bars()
        warnings.filterwarnings("ignore", category=FutureWarning)
        tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
        bad = next((i for i, t in enumerate(texts) if tokenizer(t)["input_ids"] != prompt_ids(t)), None)
        if bad is not None:
            raise SystemExit(f"grpo_bench: transformers encodes prompt {bad} differently")
        model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
        peft_config = None
        if mode == "lora":
            from peft import LoraConfig

            peft_config = LoraConfig(r=LORA["rank"], lora_alpha=LORA["alpha"], lora_dropout=0.0, bias="none",
                                     target_modules=TARGETS, task_type="CAUSAL_LM")
        self.rows, self.G = s["prompts"] * s["generations"], s["generations"]
        args = GRPOConfig(
            output_dir=out_dir, per_device_train_batch_size=self.rows, gradient_accumulation_steps=1,
            steps_per_generation=1, num_iterations=1, num_generations=self.G, max_completion_length=s["new_tokens"],
            generation_kwargs={"min_new_tokens": s["new_tokens"]}, temperature=1.0, top_p=1.0, top_k=0,
            beta=BETA, epsilon=EPSILON, loss_type="dapo", scale_rewards="group", mask_truncated_completions=False,
            learning_rate=LR, lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=0.0,
            gradient_checkpointing=False, bf16=False, fp16=False, use_cpu=True, report_to="none",
            logging_strategy="no", save_strategy="no", disable_tqdm=True, dataloader_num_workers=0, seed=SEED,
            shuffle_dataset=False, log_completions=False)
        self.trainer = GRPOTrainer(model=model, reward_funcs=[sevens_trl], args=args,
                                   train_dataset=datasets.Dataset.from_dict({"prompt": texts}),
                                   processing_class=tokenizer, peft_config=peft_config)
        trainer = self.trainer
        self.optimizer = trainer.create_optimizer()
        trainer.current_gradient_accumulation_steps = 1  # set by Trainer's train loop, read by training_step
        self.policy = trainer.model
        self.texts = texts
        self.times: dict[str, float] = {}
        self._wrap("_generate_and_score_completions", "rollout_s")
        self._wrap("_generate_single_turn", "generate_s")
        self._wrap("_calculate_rewards", "reward_s")
        self._wrap("_get_per_token_logps_and_entropies", "reference_s", only=lambda: not torch.is_grad_enabled())
        self._seen: dict[str, Any] = {}
        self._wrap("_compute_loss", None, peek=True)
        trainable = [p for p in self.policy.parameters() if p.requires_grad]
        frozen = [p for p in self.policy.parameters() if not p.requires_grad]
        nbytes = lambda ps: sum(p.numel() * p.element_size() for p in ps)  # noqa: E731
        self.facts = {"rows": self.rows, "trainable_bytes": nbytes(trainable), "frozen_bytes": nbytes(frozen),
                      "reference_bytes": nbytes(trainer.ref_model.parameters()) if trainer.ref_model else 0,
                      "reference": "ref_model" if trainer.ref_model is not None else "adapters off",
                      "optimizer": f"{type(self.optimizer).__module__}.{type(self.optimizer).__name__}"
                                   f"(fused={self.optimizer.defaults.get('fused')})",
                      "attn_implementation": self.policy.config._attn_implementation,
                      "threads": torch.get_num_threads()}

    def _wrap(self, name: str, key: str | None, only: Callable[[], bool] = lambda: True, peek: bool = False):
        inner = getattr(self.trainer, name)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            out = inner(*args, **kwargs)
            if key is not None and only():
                self.times[key] = self.times.get(key, 0.0) + time.perf_counter() - start
            if peek:  # the loss's batch: its shape
                self._seen = {"slots": int(args[1]["prompt_ids"].numel() + args[1]["completion_ids"].numel()),
                              "prompt_tokens": int(args[1]["prompt_mask"].sum()),
                              "trained_tokens": int(args[1]["completion_mask"].sum()),
                              "seq": int(args[1]["prompt_ids"].shape[1] + args[1]["completion_ids"].shape[1])}
            return out

        setattr(self.trainer, name, timed)

    def iteration(self, k: int) -> dict[str, float]:
        chosen = self.order[k * (self.rows // self.G):(k + 1) * (self.rows // self.G)]
        batch = [{"prompt": self.texts[i]} for i in chosen for _ in range(self.G)]  # as RepeatSampler yields
        self.times = {}
        start = time.perf_counter()
        loss = self.trainer.training_step(self.policy, batch, None)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        end = time.perf_counter()
        self.trainer.state.global_step += 1
        t, metrics = self.times, self.trainer._metrics["train"]
        return {"total_s": end - start, "generate_s": t["generate_s"],
                "score_reward_s": t["rollout_s"] - t["generate_s"], "step_s": end - start - t["rollout_s"],
                "reward_s": t["reward_s"], "reference_s": t.get("reference_s", 0.0),
                "generated_tokens": int(round(metrics["completions/mean_length"][-1] * self.rows)),
                **self._seen, "reward": float(metrics["reward"][-1]), "loss": float(loss.detach()),
                "kl": float(metrics["kl"][-1])}


# ---------------------------------------------------------------------------------------------------- measurement
def measure_mode(hf_dir: str, mode: str, s: dict, model: dict, stacks: list[str], turns: int | None = None
                 ) -> dict[str, Any]:
    """Set up the `stacks` for one mode, run them in turns on the same prompts, return times and facts.
    turns: run only the first turns (the prompts stay those of the whole run)."""
    from sftjax.data.mixture import epoch_order

    turn = s["turn"]
    all_turns = s["warmup"] + -(-s["steps"] // (turn - 1))
    turns = min(turns or all_turns, all_turns)
    iterations = all_turns * turn
    texts = prompt_texts(iterations * s["prompts"], s, model["vocab_size"], SEED)
    order = epoch_order([len(texts)], None, SEED, 0)[:, 1]  # the order sftjax's prompt stream takes them in
    runs: dict[str, Any] = {}
    out_dir = tempfile.mkdtemp(prefix="grpo-bench-trl-")
    try:
        for stack in stacks:
            start = time.perf_counter()
            if stack == "sftjax":
                runs[stack] = SftjaxGRPO(hf_dir, mode, s, texts)
            else:
                runs[stack] = TrlGRPO(hf_dir, mode, s, texts, out_dir)
                runs[stack].order = order
            runs[stack].facts["setup_s"] = time.perf_counter() - start
        records: dict[str, list[dict]] = {k: [] for k in stacks}
        for i in range(turns):  # sftjax turn, trl turn, sftjax turn, ...: iteration k the same prompts in both
            for stack in stacks:
                for k in range(i * turn, (i + 1) * turn):
                    records[stack].append(runs[stack].iteration(k))
            print(f"grpo_bench: {mode} turn {i + 1}/{turns} done", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    if "sftjax" in stacks:
        src = runs["sftjax"].source
        if src.epoch * len(texts) + src.position != turns * turn * s["prompts"]:
            raise SystemExit("grpo_bench: sftjax's prompt stream is not where the iterations put it")
    out: dict[str, Any] = {"mode": mode, "turns": turns, "turn": turn}
    for stack in stacks:
        recs = records[stack]
        steady = [r for j, r in enumerate(recs[s["warmup"] * turn:]) if j % turn]
        out["steady_iterations"] = len(steady)
        total = statistics.median(r["total_s"] for r in steady)
        tokens = statistics.mean(r["generated_tokens"] for r in steady)
        summed = sum(r["total_s"] for r in steady)
        res = {**runs[stack].facts, "iteration_s": total, "first_iteration_s": recs[0]["total_s"],
               "generated_tokens_per_iteration": tokens, "tokens_per_s": tokens / total,
               "sampler_tokens_per_s": tokens / statistics.median(r["generate_s"] for r in steady),
               "share": {p: sum(r[p] for r in steady) / summed for p in PHASES},
               "median": {p: statistics.median(r[p] for r in steady)
                          for p in (*PHASES, "reward_s", "reference_s")},
               "slots_per_iteration": statistics.mean(r["slots"] for r in steady),
               "iterations": recs}
        out[stack] = res
    if "sftjax" in stacks and "trl" in stacks:
        out["sftjax"]["vs_trl"] = out["trl"]["iteration_s"] / out["sftjax"]["iteration_s"]
        pairs = list(zip(records["sftjax"], records["trl"], strict=True))
        # every iteration: the same generated tokens (fixed length) and the same prompts (their token counts)
        out["same_generated_tokens"] = all(a["generated_tokens"] == b["generated_tokens"] for a, b in pairs)
        out["same_prompt_tokens"] = all(a["prompt_tokens"] == b["prompt_tokens"] for a, b in pairs)
        out["phase_vs_trl"] = {p: out["trl"]["median"][p] / out["sftjax"]["median"][p] for p in PHASES}
    return out


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far (ru_maxrss: KiB on Linux), MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(args: argparse.Namespace, s: dict) -> dict[str, Any]:
    """--worker ROLE, in a fresh process: "speed" (both stacks, in turns) or one STACK alone (--rss: 1 warm-up
    turn + 1 turn), with this process's peak RSS and, alone, its RSS after the stack's imports."""
    import workers

    mode, model = args.modes[0], json.loads(args.model_json)
    if args.worker == "speed":
        return {**measure_mode(str(args.hf_dir), mode, s, model, list(STACKS)), "process_peak_rss_mib": peak_rss_mib()}
    if args.worker == "trl":
        import peft  # noqa: F401  (the stack's imports before the RSS baseline)
        import torch  # noqa: F401
        from trl import GRPOTrainer  # noqa: F401
    else:
        from sftjax.train.rollout import Rollouts  # noqa: F401
        from sftjax.train.setup import build_model  # noqa: F401
    after_imports = workers.rss_mib()
    r = measure_mode(str(args.hf_dir), mode, s, model, [args.worker], turns=s["warmup"] + 1)
    return {"rss_after_imports_mib": after_imports, "peak_rss_mib": peak_rss_mib(),
            "iteration_s": r[args.worker]["iteration_s"], "torch_imported": "torch" in sys.modules,
            "jax_imported": "jax" in sys.modules}


def spawn(args: argparse.Namespace, role: str, mode: str, hf_dir: Path, model: dict) -> dict[str, Any]:
    """This script with --worker ROLE for one mode in a fresh process; its RESULT line."""
    env = {**os.environ, **ENV}
    if role == "trl":
        env["SFTJAX_MALLOC"] = "system"  # TRL alone as its users run it: glibc's malloc defaults
    cmd = [sys.executable, __file__, "--worker", role, "--modes", mode, "--hf-dir", str(hf_dir),
           "--model-json", json.dumps(model)] + (["--quick"] if args.quick else [])
    for option in ("steps", "turn"):  # the same settings as asked for
        cmd += [f"--{option}", str(getattr(args, option))] if getattr(args, option) else []
    start = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=env, check=False)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        sys.stdout.write(proc.stdout)
        raise SystemExit(f"grpo_bench: worker {role} {mode} failed (exit {proc.returncode})")
    print(f"grpo_bench: {role} {mode} done in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    return json.loads(lines[-1][len("RESULT "):])


# --------------------------------------------------------------------------------------------------------- report
def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)] + \
        ["| " + " | ".join(row) + " |" for row in rows]


def _phase(x: dict, p: str) -> str:
    return f"{x['median'][p]:.3f} s ({x['share'][p]:.0%})"


def markdown(r: dict[str, Any]) -> str:
    s, m, host, v = r["settings"], r["model"], r["machine"], r["versions"]
    G, B, C = s["generations"], s["prompts"], s["new_tokens"]
    first = next(iter(r["speed"].values()))
    lines = [
        "# sftjax GRPO vs TRL GRPOTrainer: one GRPO iteration on CPU" + (" (--quick: tiny config, not a measurement)"
                                                                        if r["quick"] else ""),
        "",
        f"- date {r['date']}; machine: {host['cpu']} ({host['cpu_id']}), {host['cores']} cores; "
        f"Python {host['python']}",
        "- " + ", ".join(f"{k} {v[k]}" for k in v),
        f"- command: `{r['command']}`",
        f"- load average (1/5/15 min) before {'/'.join(f'{x:.2f}' for x in r['load_before'])}, after "
        f"{'/'.join(f'{x:.2f}' for x in r['load_after'])}; wall time {r['wall_s']:.0f} s",
        f"- model: {s['preset']}{' ' + str(s['overrides']) if s['overrides'] else ''} (vocab {m['vocab_size']}, "
        f"width {m['hidden_size']}, {m['num_layers']} layers, {m['num_heads']} q / {m['num_kv_heads']} kv heads, FFN "
        f"{m['intermediate_size']}), {r['num_params'] / 1e6:.2f}M parameters, float32; LoRA r={LORA['rank']} "
        f"alpha={LORA['alpha']:g} dropout 0 on q,k,v,o,gate,up,down",
        f"- GRPO iteration: {B} prompts x G {G} = {B * G} completions of exactly {C} new tokens (sftjax: no EOS "
        f"token; TRL: min_new_tokens {C}), temperature 1, beta {BETA} (reference log-probs computed), epsilon "
        f"{EPSILON}, loss dapo, one optimizer step per rollout; reward: count of \"{DIGIT}\" in the completion; "
        f"AdamW lr {LR:g} constant, no weight decay, no clipping; prompts {s['prompt'][0]}-{s['prompt'][1]} tokens "
        f"(BOS + random number words, seed {SEED})",
        f"- timing: turns of {s['turn']} iterations (sftjax, TRL, ...), {s['warmup']} warm-up turn(s) (sftjax "
        f"compiles there), medians of {first['steady_iterations']} steady iterations per stack (the first of every "
        "turn left out)",
        "",
        "## One GRPO iteration",
        "",
    ]
    rows = []
    for mode, res in r["speed"].items():
        for stack in STACKS:
            x = res[stack]
            rows.append([mode, LABELS[stack], f"{x['iteration_s']:.3f}", f"{x['first_iteration_s']:.1f}",
                         f"{x['generated_tokens_per_iteration']:,.0f}", f"{x['tokens_per_s']:,.0f}",
                         f"{x['sampler_tokens_per_s']:,.0f}", _phase(x, "generate_s"), _phase(x, "score_reward_s"),
                         _phase(x, "step_s"), f"**{x['vs_trl']:.2f}x**" if "vs_trl" in x else "1.00x"])
    lines += _table(["mode", "stack", "iteration s", "first iteration s", "generated tokens", "generated tok/s",
                     "sampler tok/s", "generation", "score + reward", "train step", "vs TRL"], rows)
    setup = "; ".join(f"{mode} sftjax {res['sftjax']['setup_s']:.1f} s, TRL {res['trl']['setup_s']:.1f} s"
                      for mode, res in r["speed"].items())
    same = all(res["same_generated_tokens"] for res in r["speed"].values())
    lines += ["", "Phases: median seconds (share of the steady iterations' summed time). vs TRL: TRL's median "
              "iteration seconds / sftjax's. First iteration: sftjax compiles its sampler, scoring pass and step "
              f"there (not in the steady figures). Set-up before it (model load, trainer construction): {setup}. "
              f"Generated tokens per iteration {'equal in every iteration' if same else 'NOT equal'} for the two "
              f"stacks ({B * G} completions x {C})"
              + ("" if all(res["same_prompt_tokens"] for res in r["speed"].values())
                 else "; the prompt token counts per iteration differ: the stacks did not get the same prompts")
              + ".", ""]
    lines += ["## Phases side by side", ""]
    rows = []
    for mode, res in r["speed"].items():
        for p, name in (("generate_s", "generation"), ("score_reward_s", "score + reward"),
                        ("reference_s", "of which reference log-probs"), ("reward_s", "of which reward"),
                        ("step_s", "train step")):
            a, b = res["sftjax"]["median"][p], res["trl"]["median"][p]
            rows.append([mode, name, f"{a:.3f}", f"{b:.3f}", f"{b / a:.2f}x" if a > 0 else "-"])
    lines += _table(["mode", "phase", "sftjax s", "TRL s", "TRL / sftjax"], rows)
    sl = [f"{mode}: sftjax {res['sftjax']['rows']} x {res['sftjax']['seq']} = "
          f"{res['sftjax']['slots_per_iteration']:,.0f}, TRL {res['trl']['slots_per_iteration']:,.0f}"
          for mode, res in r["speed"].items()]
    lines += ["", "Reference log-probs: sftjax `_p_score` + advantages (Rollouts' rollout/score_s); TRL "
              "`_get_per_token_logps_and_entropies` under no_grad. Token slots per scoring pass and train step (rows "
              "x padded length; sftjax's vocabulary projection runs at the completion tokens only when they fill "
              "at most half of the slots (`objectives/rl.py`: label_index), at all of them otherwise; TRL's at the "
              "completion's only): " + "; ".join(sl) + ".", ""]
    lines += ["## Memory", ""]
    rows = [[mode, LABELS[stack], f"{res[stack]['trainable_bytes'] / MiB:,.1f}",
             f"{res[stack]['frozen_bytes'] / MiB:,.1f}", f"{res[stack]['reference_bytes'] / MiB:,.1f}",
             res[stack]["reference"]] for mode, res in r["speed"].items() for stack in STACKS]
    lines += _table(["mode", "stack", "trainable MiB", "frozen MiB", "reference MiB", "reference"], rows)
    lines += ["", "Peak RSS of the process that ran a mode's two stacks (together, not a per-stack figure): "
              + ", ".join(f"{mode} {res['process_peak_rss_mib']:,.0f} MiB" for mode, res in r["speed"].items())
              + ".", ""]
    if r.get("rss"):
        lines += ["## Each stack alone in its own process (--rss)", ""]
        rows = [[mode, LABELS[stack], f"{x['peak_rss_mib']:,.0f}", f"{x['rss_after_imports_mib']:,.0f}",
                 f"{x['iteration_s']:.3f}"] for mode, per in r["rss"].items() for stack, x in per.items()]
        lines += _table(["mode", "stack", "peak RSS MiB", "RSS after imports MiB", "iteration s alone"], rows)
        lines += ["", "1 warm-up turn and 1 turn of iterations; sftjax with the huge-page malloc tunable of its "
                  "entry points, TRL with glibc's defaults.", ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny config, one measured iteration each (for tests)")
    ap.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of full,lora")
    ap.add_argument("--steps", type=int, help="measured steady iterations per stack and mode (default 2; quick 1)")
    ap.add_argument("--turn", type=int, help="consecutive iterations per stack per turn (>= 2; the first is not "
                    "measured)")
    ap.add_argument("--rss", action="store_true", help="also run each stack alone in a fresh process: peak RSS")
    ap.add_argument("--results-dir", type=Path, default=HERE / "results", help="where the .md and .json go")
    ap.add_argument("--worker", choices=("speed", *STACKS), help=argparse.SUPPRESS)  # a measuring process
    ap.add_argument("--hf-dir", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--model-json", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.modes = [m for m in args.modes.split(",") if m]
    if not args.modes or any(m not in MODES for m in args.modes):
        ap.error(f"--modes: choose from {','.join(MODES)}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    for key, value in ENV.items():
        os.environ.setdefault(key, value)
    s = dict(SETTINGS["quick" if args.quick else "real"])
    s["steps"] = args.steps or s["steps"]
    s["turn"] = args.turn or s["turn"]
    if s["turn"] < 2:
        raise SystemExit("grpo_bench: --turn must be at least 2 (a turn's first iteration is not measured)")
    if args.worker:
        print("RESULT " + json.dumps(worker(args, s)), flush=True)
        return
    from importlib.metadata import version

    import bench

    started = time.perf_counter()
    results: dict[str, Any] = {
        "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"), "machine": bench.machine(),
        "versions": {**bench.versions(), "trl": version("trl")}, "quick": args.quick,
        "command": " ".join(["python experiments/bench/grpo_bench.py", *(sys.argv[1:] if argv is None else argv)]),
        "load_before": os.getloadavg(),
        "settings": {**s, "modes": args.modes, "lora": LORA, "beta": BETA, "epsilon": EPSILON, "lr": LR,
                     "reward": f"count of {DIGIT!r}"},
    }
    hf_dir = Path(tempfile.mkdtemp(prefix="sftjax-grpo-bench-"))
    try:
        prep = bench.run_worker("prepare", {"model": {"preset": s["preset"], "overrides": s["overrides"]},
                                            "hf_dir": str(hf_dir / "model"), "seed": SEED})
        results["model"], results["num_params"] = prep["model"], prep["num_params"]
        write_tokenizer(hf_dir / "model", prep["model"]["vocab_size"])
        results["speed"] = {m: spawn(args, "speed", m, hf_dir / "model", prep["model"]) for m in args.modes}
        if args.rss:
            results["rss"] = {m: {stack: spawn(args, stack, m, hf_dir / "model", prep["model"]) for stack in STACKS}
                              for m in args.modes}
    finally:
        shutil.rmtree(hf_dir, ignore_errors=True)
    results["load_after"] = os.getloadavg()
    results["wall_s"] = time.perf_counter() - started
    text = markdown(results)
    print(text)
    args.results_dir.mkdir(parents=True, exist_ok=True)
    stem = bench._free_stem(args.results_dir, f"grpo_{results['date'][:10]}-{results['date'][11:].replace(':', '')}"
                            + ("-quick" if args.quick else ""))
    (args.results_dir / f"{stem}.md").write_text(text + "\n")
    (args.results_dir / f"{stem}.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"grpo_bench: wrote {args.results_dir / stem}.md and .json ({results['wall_s']:.0f} s)", file=sys.stderr)


if __name__ == "__main__":
    from sftjax.cli.malloc import use_huge_pages

    use_huge_pages()  # may re-run this process, as sftjax-train does (not under SFTJAX_MALLOC=system)
    main()
