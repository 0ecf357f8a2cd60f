"""`sftjax-data`: inspect a dataset the way training will see it, before spending accelerator hours.

    sftjax-data model=path/to/model data=train.jsonl data.seq_len=2048 --show 2
    sftjax-data model.tokenizer=path/to/tok 'data.train=[{path:a.jsonl,weight:3},{path:b.jsonl,weight:1}]' --json

It reads the same Hydra configuration as `sftjax-train` (conf/, the same overrides and shorthands), so what it
reports is what training will get: per task, records, kept, dropped (empty loss mask / over seq_len), truncated,
tokens and trained tokens (mean and max lengths), how many chats each mask rule masked (data/chat_spans.py: tags,
per_turn or search); packing efficiency over one epoch; N rendered examples with the
trained tokens marked as [[...]] (a head task's examples with their label and class index, and its classes with
the examples of each in the split; a preference pair's chosen and rejected sequences, each with its trained
completion marked, and the pairs dropped because chosen = rejected or because they do not fit a row); the same for
the eval split when there is one. With an RL objective (objective=grpo | ppo) it shows the prompts the rollouts
sample from instead: per task, records, kept, truncated and dropped (over data.seq_len - objective.max_new_tokens),
prompt lengths, and N prompts as the model sees them with their answers. `--json` prints one JSON object.
Bad input prints one line and exits with 2.
"""

from __future__ import annotations

import dataclasses
import json
import sys

import numpy as np
from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from sftjax.cli.common import compose_config, fail, one_line, version_line
from sftjax.data.masking import Tokenized
from sftjax.data.pipeline import DataIterator, Prepared
from sftjax.data.tokenizer import Tokenizer
from sftjax.errors import UserError
from sftjax.train.setup import build_data, build_tokenizer, model_config

TRAINED_OPEN, TRAINED_CLOSE = "[[", "]]"  # marks around trained tokens in rendered examples
RULE_NOTES = {  # how chat masks were found (data/chat_spans.py)
    "tags": "the template's {% generation %} tags",
    "per_turn": "per-turn rendering: the template is prefix-stable",
    "search": "each assistant content found in the one render: the template rewrites earlier turns",
    "all": "every token (data.mask=all)",
}
_USAGE = "usage: sftjax-data [--help] [--version] [--show N] [--json] [Hydra overrides of the training config ...]"


def parse_args(argv: list[str]) -> tuple[int, bool, list[str]]:
    """(--show N, --json, the Hydra overrides): our two flags are taken out, everything else goes to Hydra."""
    show, as_json, overrides = 2, False, []
    args = iter(argv)
    for arg in args:
        if arg in ("-h", "--help"):
            print(f"{_USAGE}\n\n{__doc__.strip()}")
            raise SystemExit(0)
        if arg == "--version":
            print(version_line("sftjax-data"))
            raise SystemExit(0)
        if arg == "--json":
            as_json = True
        elif arg == "--show" or arg.startswith("--show="):
            value = arg.partition("=")[2] or next(args, "")
            if not value.isdigit():
                raise UserError(f"--show {value!r}: expected a number of examples ({_USAGE})")
            show = int(value)
        elif arg.startswith("-"):
            raise UserError(f"unknown option {arg!r} ({_USAGE})")
        else:
            overrides.append(arg)
    return show, as_json, overrides


def render_marked(tok: Tokenizer, ex: Tokenized) -> str:
    """The example's text with each run of trained tokens wrapped in [[...]]."""
    out, start = [], 0
    for end in range(1, len(ex.tokens) + 1):
        if end == len(ex.tokens) or ex.mask[end] != ex.mask[start]:
            text = tok.decode(ex.tokens[start:end].tolist())
            out.append(f"{TRAINED_OPEN}{text}{TRAINED_CLOSE}" if ex.mask[start] else text)
            start = end
    return "".join(out)


def _part(ex: Tokenized, side: int) -> Tokenized:
    """The chosen (0) or rejected (1) sequence of a preference pair."""
    cut = slice(0, ex.split) if side == 0 else slice(ex.split, None)
    return dataclasses.replace(ex, tokens=ex.tokens[cut], mask=ex.mask[cut], split=0)


def split_report(prepared: Prepared, tok: Tokenizer, show: int) -> dict:
    """Counts, lengths, rendered examples and packing over one epoch of a split."""
    one_epoch = dataclasses.replace(prepared.config, num_epochs=1)  # training streams without end
    it = DataIterator(dataclasses.replace(prepared, config=one_epoch))
    rows = sum(1 for _ in it)
    tasks = []
    labels = prepared.labels or (None,) * len(prepared.datasets)
    for task_id, (st, examples, classes) in enumerate(zip(prepared.stats, prepared.datasets, labels)):
        lengths = np.array([len(e.tokens) for e in examples])
        shown = [{"where": e.where, "text": render_marked(tok, e), **({"rule": e.rule} if e.rule else {})}
                 if not e.split else
                 {"where": e.where, "chosen": render_marked(tok, _part(e, 0)),
                  "rejected": render_marked(tok, _part(e, 1))} for e in examples[:show]]
        head = {}
        if classes is not None:
            counts = np.bincount(np.array([e.label for e in examples], np.int64), minlength=len(classes))
            head = {"classes": {c: int(n) for c, n in zip(classes, counts)}}  # examples per class in this split
            for item, e in zip(shown, examples):
                item.update(label=classes[e.label], class_id=e.label)
        tasks.append({"task_id": task_id, **dataclasses.asdict(st), "used": len(examples),
                      "mean_tokens": round(float(lengths.mean()), 1), "max_tokens": int(lengths.max()), **head,
                      "examples": shown})
    return {"tasks": tasks, "seq_len": prepared.config.seq_len, "rows_per_epoch": rows, "pairs": prepared.pairs,
            "packing_efficiency": round(it.efficiency, 4)}


def prompt_report(cfg, tok: Tokenizer, show: int) -> dict:
    """The prompts of an RL run, per task (and the held-out ones), as the rollouts will see them."""
    from sftjax.objectives.base import settings
    from sftjax.train.setup import build_prompts

    train, held, stats = build_prompts(cfg, tok, settings(cfg.objective)[1].max_new_tokens)
    out = {"tasks": []}
    for st, prompts in zip(stats, train):
        lengths = np.array([len(p.ids) for p in prompts])
        out["tasks"].append({**dataclasses.asdict(st), "mean_tokens": round(float(lengths.mean()), 1),
                             "max_tokens": int(lengths.max()),
                             "examples": [{"where": p.where, "prompt": tok.decode(p.ids.tolist()), "answer": p.answer}
                                          for p in prompts[:show]]})
    out["held_out"] = len(held) if held is not None else 0
    return out


def report(overrides: list[str], show: int) -> dict:
    from sftjax.objectives.base import module

    cfg = compose_config(overrides)
    tok = build_tokenizer(cfg, model_config(cfg))
    if getattr(module(cfg.objective.get("name", "sft")), "ROLLOUTS", False):
        return {"prompts": prompt_report(cfg, tok, show)}
    cfg.trainer.batch_size = 1  # one row per batch: counts rows exactly
    train, held_out = build_data(cfg, tok, devices=1)
    result = {"train": split_report(train, tok, show)}
    if held_out is not None:
        result["eval"] = split_report(held_out, tok, show)
    return result


def print_text(result: dict) -> None:
    if "prompts" in result:
        for t in result["prompts"]["tasks"]:
            print(f"task {t['name']} ({t['path']}): {t['read']} prompts, {t['kept']} kept for training, "
                  f"{t['truncated']} truncated, {t['dropped']} dropped; tokens per prompt mean {t['mean_tokens']} "
                  f"max {t['max_tokens']}")
            for ex in t["examples"]:
                print(f"  --- {ex['where']} (answer: {ex['answer']!r})\n{ex['prompt']}")
        print(f"held-out prompts: {result['prompts']['held_out']}")
        return
    for split, r in result.items():
        print(f"== {split}")
        for t in r["tasks"]:
            if r.get("pairs"):
                print(f"task {t['task_id']} {t['name']} ({t['path']}): {t['records']} preference pairs, {t['kept']} "
                      f"kept, dropped {t['dropped_identical']} with chosen = rejected + {t['dropped_too_long']} not "
                      f"fitting a row of {r['seq_len']} (prompt + chosen and prompt + rejected), {t['truncated']} "
                      f"truncated; {t['used']} in this split")
            else:
                print(f"task {t['task_id']} {t['name']} ({t['path']}): {t['records']} records, {t['kept']} kept, "
                      f"dropped {t['dropped_empty_mask']} empty-mask + {t['dropped_too_long']} too long, "
                      f"{t['truncated']} truncated; {t['used']} in this split")
            print(f"  tokens {t['tokens']} (trained {t['trained_tokens']}), per example mean {t['mean_tokens']} "
                  f"max {t['max_tokens']}")
            for rule, n in t.get("mask_rules", {}).items():
                print(f"  chat masks: {n} by {rule} ({RULE_NOTES.get(rule, rule)})")
            if "classes" in t:
                classes = ", ".join(f"{i} {c!r} ({n})" for i, (c, n) in enumerate(t["classes"].items()))
                print(f"  head: {len(t['classes'])} classes, examples in this split: {classes}")
            for ex in t["examples"]:
                if "chosen" in ex:
                    print(f"  --- {ex['where']} (a pair; trained tokens in {TRAINED_OPEN} {TRAINED_CLOSE})\n"
                          f"  chosen:\n{ex['chosen']}\n  rejected:\n{ex['rejected']}")
                elif "label" in ex:
                    print(f"  --- {ex['where']} (head example: label {ex['label']!r}, class {ex['class_id']}, "
                          f"read at the last token)\n{ex['text']}")
                else:
                    rule = f", mask rule {ex['rule']}" if "rule" in ex else ""
                    print(f"  --- {ex['where']} (trained tokens in {TRAINED_OPEN} {TRAINED_CLOSE}{rule})\n{ex['text']}")
        print(f"packing: {r['rows_per_epoch']} rows of {r['seq_len']} per epoch, "
              f"efficiency {r['packing_efficiency']:.1%}")


def main(argv: list[str] | None = None) -> int:
    try:
        show, as_json, overrides = parse_args(sys.argv[1:] if argv is None else argv)
        result = report(overrides, show)
    except UserError as e:
        return fail("sftjax-data", str(e))
    except (HydraException, OmegaConfBaseException) as e:
        return fail("sftjax-data", one_line(e))
    if as_json:
        print(json.dumps(result, ensure_ascii=False))
    else:
        print_text(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
