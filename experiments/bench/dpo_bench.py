"""sftjax's DPO train step against TRL's DPOTrainer step: speed and memory on the same model, pairs and settings.

    python experiments/bench/dpo_bench.py                     # bench config, full + lora (6-10 min on 2 cores)
    python experiments/bench/dpo_bench.py --quick             # tiny config, one measured step each (the test)
    python experiments/bench/dpo_bench.py --modes lora --steps 6
    python experiments/bench/dpo_bench.py --rss               # + each stack alone in its own process: peak RSS

What is compared, per mode (full: the reference is a frozen copy of the starting weights; lora: r 16, alpha 32,
dropout 0 on q,k,v,o,gate,up,down, the reference is the base with the adapters off), in one fresh process per
mode, three steps:

    packed   sftjax, the trainer's own step: `objectives.base.build({"name": "dpo", ...})`, `compile_steps`,
             state from `init_state` / `replicate`, the reference tree from `references.policy_reference`; each
             step's pairs packed best-fit (`pack_bins(.., "bfd")` + `build_rows(.., pairs=True)` + the objective's
             `prepare`) into rows of T = 512, the row count padded to the most any step needs (R), so one
             compiled shape serves every step
    padded   the same step with packing none: one pair per row, rows of T = the longest pair of the whole run
    trl      a real `trl.DPOTrainer` (policy + `ref_model` loaded from the same directory; lora: `peft_config`,
             adapters-off reference), its own collator on {prompt_ids, chosen_ids, rejected_ids} (chosen rows then
             rejected rows, each padded to the batch's longest sequence), then `trainer.compute_loss(model, batch)`
             (policy forward, reference forward under no_grad, TRL's fused LM head), `loss.backward()`,
             `optimizer.step()`, `optimizer.zero_grad(set_to_none=True)`; the optimizer is
             `trainer.create_optimizer()`, the HF Trainer's default (AdamW fused on torch >= 2.8)

Same for all three: the bench model (Llama, vocab 8192, width 512, 8 layers, 8 q / 2 kv heads, FFN 1408, random,
written once as an HF directory that both load), the same pairs (random tokens from a seeded RNG: prompt 48-160
tokens with BOS first, chosen and rejected completions 16-96 tokens each with EOS last, so the two sequences of a
pair and the pairs differ in length), the same pairs per step (8), beta 0.1 sigmoid, AdamW lr 1e-6 constant, no
weight decay, no clipping, float32. The first step's mean log-probability of the chosen completions
(`logps/chosen`) is reported by both: equal weights and pairs give equal values, so both score the same tokens.

Method (as bench.py's speed section): the steps take turns of --turn consecutive steps each (packed, padded, trl,
packed, ...), every step the same pairs in all three; after the warm-up turns, the median of the steady steps,
the first step of each turn left out (it follows another program's turn: experiments/bench/README.md, "Turns
instead of step-by-step alternation"). The sftjax steps are compiled ahead of time (timed, not in the step).
Batches are built before timing: a step's time is the step alone, collation and packing not included (both are
host work a data loader overlaps or that takes milliseconds against seconds here).

    pairs/s          pairs per step / median step seconds
    real tokens/s    non-pad tokens of the step's chosen and rejected sequences (2 prompt + both completions per
                     pair) / median step seconds: the same count for all three, so its ratio is the speed ratio
    padding          share of the token slots a step computes that are padding (packed: R x 512; padded:
                     pairs x longest pair; trl: 2 pairs x the batch's longest sequence, summed over steps)

Memory, what each can say honestly in that process:
    sftjax   held trees: train state (trainable + AdamW moments), frozen tree (lora: the base), reference tree
             (full: a copy of the weights; lora: nothing, the base with adapters off is the reference); plus XLA's
             temp buffers of the compiled step (`memory_analysis().temp_size_in_bytes`: activations, gradients,
             scratch), per layout
    trl      tensors: policy parameters (trainable and frozen), reference model parameters, gradients (the size of
             the trainable ones, held from backward to the optimizer step), optimizer state; torch on CPU keeps no
             allocator statistics, so its activation peak is not in these
    process  ru_maxrss of the mode's process (all three steps together): not a per-step figure. With --rss
             each (step, mode) also runs alone in a fresh process (1 warm-up turn + 1 turn) that reports its peak
             RSS (ru_maxrss) and RSS after imports, as bench.py's memory section (sftjax with the huge-page malloc
             tunable of its entry points, TRL with glibc's defaults). Processes are started from a parent that
             holds no model: Linux carries ru_maxrss over fork and exec

Caveats: TRL pads each batch to its own longest sequence (a batch of short pairs costs less), while the sftjax
steps have fixed shapes: packed rows are R x 512 whatever the step's pairs fill, padded rows the longest pair of
the whole run. Pairs of these lengths hold 2 x 104 + 2 x 56 = 320 tokens on average, so at T = 512 few share a row
and packing cannot gain much over padding there (`--seq 1024` fits about three per row). sftjax computes the
vocabulary projection at the trained (completion) positions only, in one of a few sizes (`sft.LABEL_FRACTIONS`);
the bench pads every step's index to the largest size any of its steps needs, so that one program serves all (a
training run compiles each size it meets). TRL's fused LM head works over every position. Timings need a quiet
machine: with other jobs on the 2 cores TRL's steps varied far more than sftjax's (0.03-2 s on the tiny --quick
config at a load average of 3); the load averages before and after are printed. No MFU is reported: the work
differs per layout (padding, logit positions), so a FLOP count per real token would flatter or punish one side by
construction.

Results: the markdown table on stdout and in results/dpo_<date>-<HHMM>[-quick].md, every raw figure (each step's
time, losses, first-step metrics) in the .json beside it; a result never replaces another.
"""

from __future__ import annotations

import argparse
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
STEPS = ("packed", "padded", "trl")  # sftjax packed rows, sftjax one pair per row, TRL's DPOTrainer
LABELS = {"packed": "sftjax packed", "padded": "sftjax padded", "trl": "TRL DPOTrainer"}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA = {"rank": 16, "alpha": 32.0}
BETA = 0.1
LR = 1e-6
SEED = 0
MiB = 2**20
ENV = {"TRANSFORMERS_VERBOSITY": "error", "HF_HUB_OFFLINE": "1", "TF_CPP_MIN_LOG_LEVEL": "2",
       "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRL_EXPERIMENTAL_SILENCE": "1", "PYTHONWARNINGS": "ignore"}

# Pair lengths in tokens (inclusive ranges); seq: the packed row length, >= the longest possible pair
# (2 x prompt + 2 x completion). steps: measured steady steps per step kind and mode.
SETTINGS = {
    "real": {"preset": "bench-llama", "overrides": {}, "pairs": 8, "prompt": (48, 160), "completion": (16, 96),
             "seq": 512, "steps": 4, "turn": 3, "warmup": 1},
    "quick": {"preset": "tiny-llama", "overrides": {"num_layers": 2}, "pairs": 4, "prompt": (6, 16),
              "completion": (3, 10), "seq": 96, "steps": 1, "turn": 2, "warmup": 1},
}


# ---------------------------------------------------------------------------------------------------------- pairs
def random_pairs(count: int, s: dict[str, Any], vocab: int, bos: int, eos: int, seed: int) -> list[dict]:
    """`count` pairs {prompt_ids, chosen_ids, rejected_ids} (int64 arrays): random ordinary tokens (ids above the
    special ones), the prompt led by BOS, each completion ended by EOS, lengths uniform in s["prompt"] and
    s["completion"] (each completion its own)."""
    rng = np.random.default_rng(seed)
    first = max(bos, eos, 0) + 1  # ids 0 (pad), BOS and EOS are special in both presets

    def body(n: int) -> np.ndarray:
        return rng.integers(first, vocab, n, dtype=np.int64)

    out = []
    for _ in range(count):
        P = int(rng.integers(s["prompt"][0], s["prompt"][1] + 1))
        C, R = (int(n) for n in rng.integers(s["completion"][0], s["completion"][1] + 1, 2))
        out.append({"prompt_ids": np.r_[bos, body(P - 1)], "chosen_ids": np.r_[body(C - 1), eos],
                    "rejected_ids": np.r_[body(R - 1), eos]})
    return out


def pair_length(p: dict) -> int:
    """Real tokens of a pair: its chosen and its rejected sequence, each prompt + completion."""
    return 2 * len(p["prompt_ids"]) + len(p["chosen_ids"]) + len(p["rejected_ids"])


# --------------------------------------------------------------------------------------------------------- sftjax
def sftjax_batches(steps: list[list[dict]], seq: int | None, packing: str, objective) -> tuple[list[dict], dict]:
    """The prepared step batches ([1, 1, R, T] arrays, as the trainer hands them to its step) of one layout, and
    its shape facts. packing "bfd": rows of T = seq, R = the most rows any step needs; "none": one pair per row,
    T = the longest pair of all steps (seq None)."""
    from sftjax.data.packing import build_rows, pack_bins
    from sftjax.data.preference import pair_tokens

    if seq is None:
        seq = max(pair_length(p) for pairs in steps for p in pairs)
    examples = [[pair_tokens(p["prompt_ids"], p["chosen_ids"], p["rejected_ids"], f"pair {i}")
                 for i, p in enumerate(pairs)] for pairs in steps]
    bins = [pack_bins([len(e.tokens) for e in ex], seq, packing) for ex in examples]
    rows = max(len(b) for b in bins)
    batches = []
    for ex, b in zip(examples, bins, strict=True):
        laid = build_rows(ex, [0] * len(ex), b + [[] for _ in range(rows - len(b))], seq, 0, pairs=True)
        batches.append(objective.prepare({k: v[None, None] for k, v in laid.items()}))
    batches = same_label_index(batches)
    real = sum(int((b["segment_ids"] > 0).sum()) for b in batches)
    return batches, {"rows": rows, "seq": seq, "slots": rows * seq * len(batches), "real_tokens": real,
                     "rows_needed": [len(b) for b in bins]}


def same_label_index(batches: list[dict]) -> list[dict]:
    """The batches with one shape: `label_index` (K follows each batch's trained-token count in a few sizes) padded
    with -1 (weight 0) to the largest K; where one batch has none (every position computed), none for all."""
    if not all("label_index" in b for b in batches):
        return [{k: v for k, v in b.items() if k != "label_index"} for b in batches]
    K = max(b["label_index"].shape[-1] for b in batches)

    def pad(x: np.ndarray) -> np.ndarray:
        return np.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, K - x.shape[-1])], constant_values=-1)

    return [{**b, "label_index": pad(b["label_index"])} for b in batches]


class SftjaxDPO:
    """The trainer's pmapped DPO train step (`compile_steps`), compiled ahead of time for one batch shape, with its
    own replicated train state; the frozen and reference trees are shared (never donated)."""

    def __init__(self, cfg, model, objective, frozen, refs, batch: dict):
        import jax_side

        from sftjax.peft import quant
        from sftjax.train.optim import make_optimizer, schedule
        from sftjax.train.state import device_mesh, init_state, replicate
        from sftjax.train.step import compile_steps

        optimizer = make_optimizer(cfg.optim, jax_side.TOTAL_STEPS)
        p_train, _ = compile_steps(objective, optimizer, schedule(cfg.optim, jax_side.TOTAL_STEPS), 1)
        self.state = replicate(init_state(model.trainable, optimizer, cfg.trainer.seed), device_mesh(1))
        self.frozen, self.refs = frozen, refs
        start = time.perf_counter()
        self.run = p_train.lower(self.state, frozen, refs, batch).compile()
        self.compile_s = time.perf_counter() - start
        analysis = self.run.memory_analysis()
        self.memory = {"trainable_bytes": quant.tree_bytes(self.state["trainable"]),
                       "opt_state_bytes": quant.tree_bytes(self.state["opt_state"]),
                       "frozen_bytes": quant.tree_bytes(frozen), "reference_bytes": quant.tree_bytes(refs),
                       "xla_temp_bytes": None if analysis is None else int(analysis.temp_size_in_bytes)}

    def step(self, batch: dict) -> dict[str, float]:
        """One optimizer step, blocking until done: its loss and logps/chosen."""
        import jax

        self.state, metrics = self.run(self.state, self.frozen, self.refs, batch)
        jax.block_until_ready((self.state, metrics))
        return {"loss": float(metrics["loss"][0]), "logps_chosen": float(metrics["logps/chosen"][0])}


def sftjax_steps(hf_dir: str, mode: str, s: dict, steps: list[list[dict]], kinds: list[str]) -> tuple[dict, dict]:
    """({kind: step(i)} for the sftjax kinds among `kinds`, {kind: facts}): model loaded with `build_model` from
    the HF directory, the DPO objective as the trainer builds it, the reference as the trainer's
    `build_references` makes it for a reference equal to the starting policy."""
    import jax_side

    from sftjax.objectives.base import Context, build
    from sftjax.train.references import policy_reference
    from sftjax.train.setup import build_model
    from sftjax.train.state import device_mesh, replicate

    cfg = jax_side.train_config(hf_dir, mode, LORA["rank"], LORA["alpha"], LR)
    model = build_model(cfg)
    objective = build({"name": "dpo", "loss_type": "sigmoid", "beta": BETA}, Context(model.cfg, ("bench",)))
    objective = objective.bind({})
    refs = {name: policy_reference(model.trainable) for name in objective.policy_references()}
    mesh = device_mesh(1)
    frozen, refs = replicate(model.frozen, mesh), replicate(refs, mesh)
    runs, facts = {}, {}
    for kind in kinds:
        if kind == "trl":
            continue
        batches, shape = sftjax_batches(steps, s["seq"] if kind == "packed" else None,
                                        "bfd" if kind == "packed" else "none", objective)
        runner = SftjaxDPO(cfg, model, objective, frozen, refs, batches[0])
        runs[kind] = lambda i, runner=runner, batches=batches: runner.step(batches[i])
        facts[kind] = {**shape, "compile_s": runner.compile_s, **runner.memory}
        print(f"dpo_bench: {mode} {kind}: {shape['rows']} x {shape['seq']} rows, compiled in "
              f"{runner.compile_s:.1f} s", file=sys.stderr, flush=True)
    return runs, facts


# ------------------------------------------------------------------------------------------------------------ TRL
def _tokenizer(config):
    """A word-level tokenizer whose pad / eos / bos ids are the model config's: DPOTrainer's constructor insists on
    tokenizing a dataset; the bench's pairs bypass it (they are token ids already)."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    eos = config.eos_token_id[0] if isinstance(config.eos_token_id, list) else config.eos_token_id
    specials = {"<pad>": config.pad_token_id or 0, "<eos>": eos, "<bos>": config.bos_token_id}
    vocab = dict(specials)
    free = (i for i in range(config.vocab_size) if i not in set(specials.values()))
    vocab.update((word, next(free)) for word in ("<unk>", "a", "b", "c"))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>",
                                                eos_token="<eos>", bos_token="<bos>")


def _tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def trl_step(hf_dir: str, mode: str, s: dict, steps: list[list[dict]], out_dir: str
             ) -> tuple[Callable, dict, Callable]:
    """(step(i), facts, late facts()): TRL's DPOTrainer as its users set it up (module docstring), batches collated
    by its own collator before timing; the late facts (optimizer state bytes) exist once a step has run."""
    import warnings

    import datasets
    import torch
    import transformers
    from trl import DPOConfig, DPOTrainer

    datasets.disable_progress_bars()
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' renames, said at every construction

    def load():
        return transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)

    model = load()
    ref_model, peft_config = None, None
    if mode == "lora":
        from peft import LoraConfig

        peft_config = LoraConfig(r=LORA["rank"], lora_alpha=LORA["alpha"], lora_dropout=0.0, bias="none",
                                 target_modules=TARGETS, task_type="CAUSAL_LM")
    else:
        ref_model = load()
    args = DPOConfig(output_dir=out_dir, beta=BETA, loss_type="sigmoid", learning_rate=LR,
                     lr_scheduler_type="constant", weight_decay=0.0, per_device_train_batch_size=s["pairs"],
                     max_length=None, report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True,
                     disable_tqdm=True, bf16=False, fp16=False, dataloader_num_workers=0, seed=SEED)
    dataset = datasets.Dataset.from_dict({"prompt": ["a"], "chosen": [" b"], "rejected": [" c"]})  # never used
    trainer = DPOTrainer(model=model, ref_model=ref_model, args=args, train_dataset=dataset,
                         processing_class=_tokenizer(model.config), peft_config=peft_config)
    policy = trainer.model
    optimizer = trainer.create_optimizer()
    policy.train()
    batches = [trainer._prepare_inputs(trainer.data_collator([{k: v.tolist() for k, v in p.items()}
                                                              for p in pairs])) for pairs in steps]
    real = sum(int(b["attention_mask"].sum()) for b in batches)
    expected = sum(pair_length(p) for pairs in steps for p in pairs)
    if real != expected:
        raise SystemExit(f"dpo_bench: TRL's batches hold {real} real tokens, the pairs {expected}")

    def step(i: int) -> dict[str, float]:
        loss = trainer.compute_loss(policy, batches[i])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return {"loss": float(loss.detach()), "logps_chosen": float(trainer._metrics["train"]["logps/chosen"][-1])}

    trainable = [p for p in policy.parameters() if p.requires_grad]
    frozen = [p for p in policy.parameters() if not p.requires_grad]
    linear = next(m for n, m in policy.named_modules() if n.endswith("layers.0.self_attn.q_proj"))
    facts = {
        "rows": 2 * s["pairs"], "seq": [int(b["input_ids"].shape[1]) for b in batches],
        "slots": sum(int(b["input_ids"].numel()) for b in batches), "real_tokens": real,
        "trainable_bytes": _tensor_bytes(trainable), "frozen_bytes": _tensor_bytes(frozen),
        "reference_bytes": _tensor_bytes(trainer.ref_model.parameters()) if trainer.ref_model is not None else 0,
        "grad_bytes": _tensor_bytes(trainable),
        "optimizer": f"{type(optimizer).__module__}.{type(optimizer).__name__}"
                     f"(fused={optimizer.defaults.get('fused')})",
        "attn_implementation": policy.config._attn_implementation, "threads": torch.get_num_threads(),
        "reference": "ref_model" if trainer.ref_model is not None else "adapters off",
        "q_proj_class": type(linear).__name__,
    }

    def late() -> dict[str, int]:
        state = (t for st in optimizer.state.values() for t in st.values() if isinstance(t, torch.Tensor))
        return {"opt_state_bytes": _tensor_bytes(state)}

    return step, facts, late


# ---------------------------------------------------------------------------------------------------- measurement
def measure_mode(hf_dir: str, mode: str, s: dict, model: dict, kinds: list[str], turns: int | None = None
                 ) -> dict[str, Any]:
    """Build the `kinds` of step for one mode, run them in turns on the same pairs, return times and facts.
    turns: run only the first turns (the pairs and shapes stay those of the whole run)."""
    turn = s["turn"]
    all_turns = s["warmup"] + -(-s["steps"] // (turn - 1))
    turns = min(turns or all_turns, all_turns)
    pairs = random_pairs(all_turns * turn * s["pairs"], s, model["vocab_size"], model["bos_token_id"],
                         model["eos_token_ids"][0], SEED)
    steps = [pairs[i * s["pairs"]:(i + 1) * s["pairs"]] for i in range(all_turns * turn)]
    if max(pair_length(p) for p in pairs) > s["seq"]:
        raise SystemExit(f"dpo_bench: a pair is longer than seq={s['seq']}")
    runs: dict[str, Callable] = {}
    facts: dict[str, dict] = {}
    late: Callable[[], dict] = dict  # TRL's facts known only after a step (none without TRL)
    if any(k != "trl" for k in kinds):
        runs, facts = sftjax_steps(hf_dir, mode, s, steps, kinds)
    out_dir = tempfile.mkdtemp(prefix="dpo-bench-trl-")
    try:
        if "trl" in kinds:
            runs["trl"], facts["trl"], late = trl_step(hf_dir, mode, s, steps, out_dir)
        times: dict[str, list[float]] = {k: [] for k in kinds}
        results: dict[str, list[dict]] = {k: [] for k in kinds}
        for i in range(turns):  # packed turn, padded turn, trl turn, packed turn, ...: each the same pairs
            for kind in kinds:
                for j in range(i * turn, (i + 1) * turn):
                    start = time.perf_counter()
                    results[kind].append(runs[kind](j))
                    times[kind].append(time.perf_counter() - start)
            print(f"dpo_bench: {mode} turn {i + 1}/{turns} done", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    if "trl" in facts:
        facts["trl"].update(late())
    measured_steps = [j for j in range(s["warmup"] * turn, turns * turn) if j % turn]  # steady steps' indices
    real_per_step = statistics.mean(sum(pair_length(p) for p in steps[j]) for j in measured_steps)
    out: dict[str, Any] = {"mode": mode, "turns": turns, "turn": turn, "steady_steps": len(measured_steps),
                           "real_tokens_per_step": real_per_step}
    for kind in kinds:
        measured = times[kind][s["warmup"] * turn:]
        steady = [t for j, t in enumerate(measured) if j % turn]
        step_s = statistics.median(steady)
        f = facts[kind]
        out[kind] = {**f, "step_s": step_s, "pairs_per_s": s["pairs"] / step_s,
                     "tokens_per_s": real_per_step / step_s, "padding": 1 - f["real_tokens"] / f["slots"],
                     "steps_s": steady, "all_steps_s": times[kind], "first_step": results[kind][0],
                     "losses": [r["loss"] for r in results[kind]]}
    for kind in kinds:
        if kind != "trl" and "trl" in kinds:
            out[kind]["vs_trl"] = out[kind]["tokens_per_s"] / out["trl"]["tokens_per_s"]
    if "packed" in kinds and "padded" in kinds:
        out["packed_vs_padded"] = out["packed"]["tokens_per_s"] / out["padded"]["tokens_per_s"]
    return out


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far (ru_maxrss: KiB on Linux), MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(args: argparse.Namespace, s: dict) -> dict[str, Any]:
    """--worker ROLE, in a fresh process: "speed" (every kind of step, in turns) or one KIND alone (--rss, 1
    warm-up turn + 1 turn); with this process's peak RSS and, alone, its RSS after the stack's imports."""
    import workers

    mode, model = args.modes[0], json.loads(args.model_json)
    if args.worker == "speed":
        result = measure_mode(str(args.hf_dir), mode, s, model, list(STEPS))
        return {**result, "process_peak_rss_mib": peak_rss_mib()}
    if args.worker == "trl":
        import peft  # noqa: F401  (the stack's imports before the RSS baseline; trl imports lazily)
        import torch  # noqa: F401
        from trl import DPOTrainer  # noqa: F401
    else:
        from sftjax.train.setup import build_model  # noqa: F401
    after_imports = workers.rss_mib()
    r = measure_mode(str(args.hf_dir), mode, s, model, [args.worker], turns=s["warmup"] + 1)
    return {"rss_after_imports_mib": after_imports, "peak_rss_mib": peak_rss_mib(),
            "step_s": r[args.worker]["step_s"], "torch_imported": "torch" in sys.modules,
            "jax_imported": "jax" in sys.modules}


def spawn(args: argparse.Namespace, role: str, mode: str, hf_dir: Path, model: dict) -> dict[str, Any]:
    """This script with --worker ROLE for one mode in a fresh process (so that its peak RSS is its own, not this
    process's: Linux carries ru_maxrss over fork and exec); its RESULT line."""
    env = {**os.environ, **ENV}
    if role == "trl":
        env["SFTJAX_MALLOC"] = "system"  # TRL alone as its users run it: glibc's malloc defaults
    cmd = [sys.executable, __file__, "--worker", role, "--modes", mode, "--hf-dir", str(hf_dir),
           "--model-json", json.dumps(model)] + (["--quick"] if args.quick else [])
    for option in ("steps", "seq", "turn"):  # the same settings as asked for
        cmd += [f"--{option}", str(getattr(args, option))] if getattr(args, option) else []
    start = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=env, check=False)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        sys.stdout.write(proc.stdout)
        raise SystemExit(f"dpo_bench: worker {role} {mode} failed (exit {proc.returncode})")
    print(f"dpo_bench: {role} {mode} done in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    return json.loads(lines[-1][len("RESULT "):])


# --------------------------------------------------------------------------------------------------------- report
def _mib(x: float | None) -> str:
    return "-" if x is None else f"{x / MiB:,.1f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)] + \
        ["| " + " | ".join(row) + " |" for row in rows]


def markdown(r: dict[str, Any]) -> str:
    s, m, host, v = r["settings"], r["model"], r["machine"], r["versions"]
    lines = [
        "# sftjax DPO vs TRL DPOTrainer: train step on CPU" + (" (--quick: tiny config, not a measurement)"
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
        f"- DPO sigmoid, beta {BETA}; AdamW lr {LR:g} constant, no weight decay, no clipping; {s['pairs']} pairs "
        f"per step: prompt {s['prompt'][0]}-{s['prompt'][1]} tokens, completions {s['completion'][0]}-"
        f"{s['completion'][1]} each (random tokens, seed {SEED})",
        f"- speed: turns of {s['turn']} steps (packed, padded, TRL, ...), {s['warmup']} warm-up turn(s), medians of "
        f"{next(iter(r['speed'].values()))['steady_steps']} steady steps per step kind (the first step of every turn "
        "left out)",
        "",
        "## Train-step throughput",
        "",
    ]
    rows = []
    for mode, res in r["speed"].items():
        for kind in STEPS:
            x = res.get(kind)
            if x is None:
                continue
            need = x.get("rows_needed", [x["rows"]])
            shape = (f"{x['rows']} x {x['seq']}" if kind != "trl" else
                     f"{x['rows']} x {min(x['seq'])}-{max(x['seq'])}")
            if min(need) < x["rows"]:
                shape += f" ({min(need)}-{max(need)} rows filled)"
            rows.append([mode, LABELS[kind], shape, f"{x['padding']:.0%}", f"{x['step_s']:.3f}",
                         f"{x['pairs_per_s']:.2f}", f"{x['tokens_per_s']:,.0f}",
                         f"**{x['vs_trl']:.2f}x**" if "vs_trl" in x else "1.00x",
                         f"{x['first_step']['loss']:.4f} / {x['first_step']['logps_chosen']:.3f}"])
    lines += _table(["mode", "step", "rows x T", "padding", "step s", "pairs/s", "real tokens/s", "vs TRL",
                     "step 1 loss / logps/chosen"], rows)
    lines += ["", "rows x T: the token slots a step computes (TRL: 2 x pairs rows, T = the batch's longest sequence, "
              "range over the steps). Real tokens per step: "
              + ", ".join(f"{mode} {res['real_tokens_per_step']:,.0f}" for mode, res in r["speed"].items())
              + ". Step 1 of every kind starts from the same weights on the same pairs: its loss is ln 2 and its "
              "logps/chosen must agree across the three.", ""]
    pv = [[mode, f"{res['packed']['tokens_per_s']:,.0f}", f"{res['padded']['tokens_per_s']:,.0f}",
           f"**{res['packed_vs_padded']:.2f}x**", f"{res['packed']['padding']:.0%} / {res['padded']['padding']:.0%}"]
          for mode, res in r["speed"].items() if "packed_vs_padded" in res]
    if pv:
        lines += ["## sftjax packed against padded (same pairs)", ""]
        lines += _table(["mode", "packed tokens/s", "padded tokens/s", "packed / padded", "padding packed / padded"],
                        pv)
        lines.append("")
    lines += ["## Memory", ""]
    rows = []
    for mode, res in r["speed"].items():
        for kind in STEPS:
            x = res.get(kind)
            if x is None:
                continue
            held = (x["trainable_bytes"] + x["frozen_bytes"] + x["reference_bytes"] + x["opt_state_bytes"]
                    + x.get("grad_bytes", 0))
            temp = x.get("xla_temp_bytes")
            rows.append([mode, LABELS[kind], _mib(x["trainable_bytes"]), _mib(x["frozen_bytes"]),
                         _mib(x["reference_bytes"]), _mib(x["opt_state_bytes"]),
                         _mib(x["grad_bytes"]) if "grad_bytes" in x else "in temp", _mib(held), _mib(temp),
                         _mib(held + temp) if temp is not None else "-"])
    lines += _table(["mode", "step", "trainable MiB", "frozen MiB", "reference MiB", "optimizer MiB", "grads MiB",
                     "held MiB", "XLA temp MiB", "held + temp MiB"], rows)
    lines += ["", "held: the trees a step keeps between steps (TRL: + its gradients, alive from backward to the "
              "optimizer step). XLA temp: the compiled sftjax step's activations, gradients and scratch; torch on "
              "CPU has no allocator statistics, so TRL's activation peak is not counted. The two sftjax layouts "
              "share the frozen and reference trees and hold one state each. Peak RSS of the process that ran a "
              "mode's three steps (all together, not a per-step figure): "
              + ", ".join(f"{mode} {res['process_peak_rss_mib']:,.0f} MiB" for mode, res in r["speed"].items())
              + ".", ""]
    if r.get("rss"):
        lines += ["## Each step alone in its own process (--rss)", ""]
        rows = [[mode, LABELS[kind], f"{x['peak_rss_mib']:,.0f}", f"{x['rss_after_imports_mib']:,.0f}",
                 f"{x['step_s']:.3f}"] for mode, per in r["rss"].items() for kind, x in per.items()]
        lines += _table(["mode", "step", "peak RSS MiB", "RSS after imports MiB", "step s alone"], rows)
        lines += ["", "1 warm-up turn and 1 turn of steps; sftjax with the huge-page malloc tunable of its entry "
                  "points, TRL with glibc's defaults.", ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny config, one measured step each (for tests)")
    ap.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of full,lora")
    ap.add_argument("--steps", type=int, help="measured steady steps per step kind and mode")
    ap.add_argument("--seq", type=int, help="packed row length T (default 512; quick 96)")
    ap.add_argument("--turn", type=int, help="consecutive steps per kind per turn (>= 2; the first is not measured)")
    ap.add_argument("--rss", action="store_true", help="also run each step kind alone in a fresh process: peak RSS")
    ap.add_argument("--results-dir", type=Path, default=HERE / "results", help="where the .md and .json go")
    ap.add_argument("--worker", choices=("speed", *STEPS), help=argparse.SUPPRESS)  # a measuring process
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
    s["seq"] = args.seq or s["seq"]
    if s["turn"] < 2:
        raise SystemExit("dpo_bench: --turn must be at least 2 (a turn's first step is not measured)")
    if args.worker:
        print("RESULT " + json.dumps(worker(args, s)), flush=True)
        return
    from importlib.metadata import version

    import bench

    started = time.perf_counter()
    host = bench.machine()
    results: dict[str, Any] = {
        "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"), "machine": host,
        "versions": {**bench.versions(), "trl": version("trl")}, "quick": args.quick,
        "command": " ".join(["python experiments/bench/dpo_bench.py", *(sys.argv[1:] if argv is None else argv)]),
        "load_before": os.getloadavg(), "settings": {**s, "modes": args.modes, "lora": LORA, "beta": BETA, "lr": LR},
    }
    hf_dir = Path(tempfile.mkdtemp(prefix="sftjax-dpo-bench-"))
    try:
        prep = bench.run_worker("prepare", {"model": {"preset": s["preset"], "overrides": s["overrides"]},
                                            "hf_dir": str(hf_dir / "model"), "seed": SEED})
        results["model"], results["num_params"] = prep["model"], prep["num_params"]
        results["speed"] = {m: spawn(args, "speed", m, hf_dir / "model", prep["model"]) for m in args.modes}
        if args.rss:
            results["rss"] = {m: {kind: spawn(args, kind, m, hf_dir / "model", prep["model"]) for kind in STEPS}
                              for m in args.modes}
    finally:
        shutil.rmtree(hf_dir, ignore_errors=True)
    results["load_after"] = os.getloadavg()
    results["wall_s"] = time.perf_counter() - started
    text = markdown(results)
    print(text)
    args.results_dir.mkdir(parents=True, exist_ok=True)
    stem = bench._free_stem(args.results_dir, f"dpo_{results['date'][:10]}-{results['date'][11:].replace(':', '')}"
                            + ("-quick" if args.quick else ""))
    (args.results_dir / f"{stem}.md").write_text(text + "\n")
    (args.results_dir / f"{stem}.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"dpo_bench: wrote {args.results_dir / stem}.md and .json ({results['wall_s']:.0f} s)", file=sys.stderr)


if __name__ == "__main__":
    from sftjax.cli.malloc import use_huge_pages

    use_huge_pages()  # may re-run this process, as sftjax-train does (not under SFTJAX_MALLOC=system)
    main()
