"""`sftjax-generate`: load a local HF model directory (or a built-in preset) and continue prompts.

    sftjax-generate --model path/to/model --prompt "def fibonacci(n):" --max-new-tokens 40
    sftjax-generate --model tiny-llama --prompt-ids 1 17 42 --prompt-ids 1 5     # presets have no tokenizer

Text prompts are tokenized with the directory's tokenizer.json (with `--chat`, wrapped as a user turn in the
model's chat template); the continuation is printed decoded, or as token ids without a tokenizer. Greedy unless
--temperature > 0. A user error prints one line and exits with status 2.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from sftjax.cli.common import fail, version_line
from sftjax.cli.malloc import use_huge_pages
from sftjax.data.tokenizer import load_tokenizer
from sftjax.errors import UserError
from sftjax.model.generate import generate
from sftjax.model.hf import load_pretrained

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="sftjax-generate", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=version_line("sftjax-generate"))
    p.add_argument("--model", required=True, help="local HF model directory, or a preset name (e.g. tiny-llama)")
    p.add_argument("--prompt", action="append", default=[], help="text prompt (repeat for a batch)")
    p.add_argument("--prompt-ids", action="append", nargs="+", type=int, default=[],
                   help="prompt as token ids (repeat for a batch)")
    p.add_argument("--chat", action="store_true", help="wrap text prompts as a user turn of the chat template")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> list[str]:
    """The lines to print: one per prompt."""
    if not args.prompt and not args.prompt_ids:
        raise UserError("give at least one --prompt or --prompt-ids")
    cfg, params = load_pretrained(args.model, dtype=args.dtype, seed=args.seed)
    tokenizer = None
    if args.prompt:
        if not (Path(args.model) / "tokenizer.json").is_file():
            raise UserError(f"{args.model}: no tokenizer.json, so text prompts cannot be encoded; use --prompt-ids")
        tokenizer = load_tokenizer(args.model)
    prompts = [list(ids) for ids in args.prompt_ids]
    for text in args.prompt:
        if args.chat:
            prompts.append(tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                                         add_generation_prompt=True))
        else:
            prompts.append(tokenizer.encode(text, add_special_tokens=True))
    start = time.perf_counter()
    outputs = generate(cfg, params, prompts, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                       top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                       eos_token_ids=(tokenizer.eos_id,) if tokenizer and tokenizer.eos_id is not None else None)
    seconds = time.perf_counter() - start
    lines = [f"model: {args.model} ({cfg.family}, {cfg.num_params() / 1e6:.2f}M parameters, {cfg.dtype}); "
             f"{sum(map(len, outputs))} tokens generated in {seconds:.1f} s (compilation included)"]
    for i, (prompt, out) in enumerate(zip(prompts, outputs)):
        if i < len(args.prompt_ids):
            lines.append(f"{prompt} -> {out}")
        else:
            lines.append(f"{tokenizer.decode(prompt)!r} -> {tokenizer.decode(out)!r}")
    return lines


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        lines = run(args)
    except UserError as e:
        return fail("sftjax-generate", str(e))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    use_huge_pages()  # as the console script does (sftjax/cli/launch.py)
    sys.exit(main())
