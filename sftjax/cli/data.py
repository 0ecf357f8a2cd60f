"""`sftjax-data`: inspect a dataset the way training will see it, before spending accelerator hours.

    sftjax-data --tokenizer MODEL_DIR data/chat.jsonl data/alpaca.jsonl --weights 3 1 --seq-len 2048 --show 2

Reports, per task: records, kept, dropped (empty loss mask / over seq_len), truncated, tokens and trained tokens
(mean and max lengths), then packing efficiency over one epoch and N rendered examples with the trained tokens
marked as [[...]]. `--json` prints the same as one JSON object. Bad input prints one line and exits with 2.
(argparse for now; the Hydra data config of training replaces it with the training issue.)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

import numpy as np

from sftjax.data.masking import MASK_MODES, Tokenized
from sftjax.data.packing import OVER_LONG, PACKING
from sftjax.data.pipeline import DataConfig, DataIterator, DatasetSpec, prepare
from sftjax.data.tokenizer import Tokenizer, load_tokenizer
from sftjax.errors import UserError

TRAINED_OPEN, TRAINED_CLOSE = "[[", "]]"  # marks around trained tokens in rendered examples
_EXIT_USER_ERROR = 2


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="sftjax-data", description=__doc__.splitlines()[0])
    p.add_argument("datasets", nargs="+", help="local .jsonl / .json files (one task each)")
    p.add_argument("--tokenizer", required=True, help="directory with tokenizer.json (+ tokenizer_config.json)")
    p.add_argument("--chat-template", default=None, help="built-in name (chatml, llama3) or a .jinja file")
    p.add_argument("--weights", type=float, nargs="+", default=None, help="mixture weight per dataset")
    p.add_argument("--format", default="auto", help="auto | chat | prompt_completion | alpaca | text")
    p.add_argument("--as-chat", action="store_true", help="render prompt/completion and Alpaca as chats")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--mask", choices=MASK_MODES, default="completion")
    p.add_argument("--no-eos", action="store_true", help="do not append EOS")
    p.add_argument("--over-long", choices=OVER_LONG, default="truncate")
    p.add_argument("--packing", choices=PACKING, default="bfd")
    p.add_argument("--pack-window", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--show", type=int, default=2, help="rendered examples to print per task")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    return p.parse_args(argv)


def render_marked(tok: Tokenizer, ex: Tokenized) -> str:
    """The example's text with each run of trained tokens wrapped in [[...]]."""
    out, start = [], 0
    for end in range(1, len(ex.tokens) + 1):
        if end == len(ex.tokens) or ex.mask[end] != ex.mask[start]:
            text = tok.decode(ex.tokens[start:end].tolist())
            out.append(f"{TRAINED_OPEN}{text}{TRAINED_CLOSE}" if ex.mask[start] else text)
            start = end
    return "".join(out)


def report(args: argparse.Namespace) -> dict:
    tok = load_tokenizer(args.tokenizer, args.chat_template)
    weights = args.weights or [None] * len(args.datasets)
    if len(weights) != len(args.datasets):
        raise UserError(f"--weights: {len(weights)} given for {len(args.datasets)} datasets")
    cfg = DataConfig(datasets=[DatasetSpec(p, w, args.format, as_chat=args.as_chat)
                               for p, w in zip(args.datasets, weights)],
                     seq_len=args.seq_len, mask=args.mask, append_eos=not args.no_eos, over_long=args.over_long,
                     packing=args.packing, pack_window=args.pack_window, per_device_batch=1, seed=args.seed)
    prepared = prepare(cfg, tok)
    it = DataIterator(prepared)
    rows = sum(1 for _ in it)
    tasks = []
    for task_id, (st, examples) in enumerate(zip(prepared.stats, prepared.datasets)):
        lengths = np.array([len(e.tokens) for e in examples])
        tasks.append({"task_id": task_id, **dataclasses.asdict(st), "mean_tokens": round(float(lengths.mean()), 1),
                      "max_tokens": int(lengths.max()),
                      "examples": [{"where": e.where, "text": render_marked(tok, e)} for e in examples[:args.show]]})
    return {"tasks": tasks, "seq_len": args.seq_len, "rows_per_epoch": rows,
            "packing_efficiency": round(it.efficiency, 4)}


def print_text(result: dict) -> None:
    for t in result["tasks"]:
        print(f"task {t['task_id']} {t['name']} ({t['path']}): {t['records']} records, {t['kept']} kept, "
              f"dropped {t['dropped_empty_mask']} empty-mask + {t['dropped_too_long']} too long, "
              f"{t['truncated']} truncated")
        print(f"  tokens {t['tokens']} (trained {t['trained_tokens']}), per example mean {t['mean_tokens']} "
              f"max {t['max_tokens']}")
        for ex in t["examples"]:
            print(f"  --- {ex['where']} (trained tokens in {TRAINED_OPEN} {TRAINED_CLOSE})\n{ex['text']}")
    print(f"packing: {result['rows_per_epoch']} rows of {result['seq_len']} per epoch, "
          f"efficiency {result['packing_efficiency']:.1%}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        result = report(args)
    except UserError as e:
        print(f"sftjax-data: error: {e}", file=sys.stderr)
        return _EXIT_USER_ERROR
    if args.json:
        print(json.dumps(result, ensure_ascii=False))
    else:
        print_text(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
