"""Data pipeline throughput: read + tokenize + mask + pack N short synthetic chat examples (one epoch).

    python experiments/data_speed/bench.py [--examples 100000] [--seq-len 2048] [--chat-template chatml|FILE.jinja]

Prints one JSON line with the seconds spent in each stage and examples/s overall. Not a test: numbers depend on
the machine (see README.md beside this file).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from sftjax.data.pipeline import DataConfig, DataIterator, DatasetSpec, prepare
from sftjax.data.tokenizer import train_bpe_tokenizer

WORDS = ("the a of to and in is it you that he was for on are with as his they be at one have this from or had "
         "by hot word but what some we can out other were all there when up use your how said an each she which "
         "do their time if will way about many then them write would like so these her long make thing see him "
         "two has look more day could go come did number sound no most people my over know water than call").split()
VOCAB_SIZE = 8192  # the bench-llama preset's vocabulary


def synthetic_chats(n: int, seed: int) -> list[dict]:
    """Short chats: optional system prompt, 1-2 user/assistant exchanges of 5-40 words each."""
    rng = np.random.default_rng(seed)
    say = lambda: " ".join(rng.choice(WORDS, rng.integers(5, 41))).capitalize() + "."  # noqa: E731
    records = []
    for _ in range(n):
        messages = [{"role": "system", "content": say()}] if rng.random() < 0.3 else []
        for _ in range(rng.integers(1, 3)):
            messages += [{"role": "user", "content": say()}, {"role": "assistant", "content": say()}]
        records.append({"messages": messages})
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=100_000)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--chat-template", default="chatml",
                        help="a built-in name or a .jinja file using ChatML's tokens, e.g. Qwen3's (masked by search)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "chat.jsonl"
        records = synthetic_chats(args.examples, seed=0)
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
        texts = [m["content"] for r in records[:2000] for m in r["messages"]]
        tok = train_bpe_tokenizer(texts, VOCAB_SIZE, chat_template=args.chat_template)
        cfg = DataConfig(datasets=[DatasetSpec(str(path))], seq_len=args.seq_len, per_device_batch=8)
        t0 = time.perf_counter()
        prepared = prepare(cfg, tok)  # read + validate + render + tokenize (batched) + mask + fit
        t1 = time.perf_counter()
        it = DataIterator(prepared)
        batches = sum(1 for _ in it)  # mix + pack (BFD) + lay out rows + batch
        t2 = time.perf_counter()
    st = prepared.stats[0]
    print(json.dumps({"examples": args.examples, "seq_len": args.seq_len, "tokens": st.tokens,
                      "trained_tokens": st.trained_tokens, "prepare_s": round(t1 - t0, 2),
                      "pack_s": round(t2 - t1, 2), "batches": batches, "packing_efficiency": round(it.efficiency, 4),
                      "examples_per_s": round(args.examples / (t2 - t0)),
                      "tokens_per_s": round(st.tokens / (t2 - t0)), "mask_rules": st.mask_rules}))


if __name__ == "__main__":
    main()
