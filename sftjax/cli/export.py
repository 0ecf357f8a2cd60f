"""`sftjax-export`: a run's checkpoint (or a PEFT adapter) as files transformers and PEFT load.

    sftjax-export --run RUN_DIR --out merged/                     # merged HF checkpoint (+ tokenizer files)
    sftjax-export --run RUN_DIR --best --format peft --out adapter/  # PEFT adapter of a lora / qlora run
    sftjax-export --run RUN_DIR --requantize --out merged/        # qlora: merge, re-quantize, save the 4-bit values
    sftjax-export --adapter peft_adapter/ --model base/ --out merged/  # merge any PEFT LoRA adapter into its base
    sftjax-export --run RUN_DIR --head sentiment --out classifier/  # a task head as <Family>ForSequenceClassification
    sftjax-export --run REWARD_RUN --out reward_model/             # a reward model (objective=reward), the same

merged: the adapters are folded into the base weights (W + scale * A B, in float32) and the result is written as
an HF checkpoint in --dtype (default: the base's). A 4-bit (qlora) base is dequantized before merging; the
relative error that re-quantizing the merged weights would cause is printed, and --requantize saves the
re-quantized values (a float checkpoint whose linear weights are exactly representable in the base's 4-bit code).
peft: adapter_config.json + adapter_model.safetensors for `peft.PeftModel.from_pretrained(base, OUT)`.
A run with task heads (objective=heads) also writes them beside either: heads.safetensors and heads.json
(`sftjax.load_heads(OUT)`). --head TASK instead writes that task's head with the merged model as a transformers
`<Family>ForSequenceClassification` checkpoint (`sftjax.load_classifier(OUT)` reads it back).

A reward run (objective=reward) is written as a transformers `<Family>ForSequenceClassification` checkpoint with
num_labels 1 (`score`), which `sftjax.load_reward_model(OUT)` and transformers load (--reward asks for it and
refuses a run without a reward head). transformers pools the last token that differs from config.pad_token_id, so
where the tokenizer pads with EOS (or has no pad token), another special token becomes the pad token in config.json
and the copied tokenizer_config.json: the rewards read at EOS stay at EOS.

The run's settings come from RUN_DIR/config.json and its base from model.path (refused if the weights there are
not the ones the run trained on). The tokenizer files of model.tokenizer (default model.path) are copied along.
--out must not hold a checkpoint unless --overwrite. A user error prints one line and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np
from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from sftjax.cli.common import add_checkpoint_choice, fail, one_line, run_config, version_line
from sftjax.errors import UserError
from sftjax.model.classifier import HEADS_TENSORS, save_classifier, save_heads
from sftjax.model.config import DTYPES
from sftjax.data.tokenizer import Tokenizer
from sftjax.model.hf import load_pretrained, save_pretrained
from sftjax.model.transformer import Params
from sftjax.objectives.reward import HEAD as REWARD_HEAD
from sftjax.peft import lora, peft_io
from sftjax.train.setup import build_model, build_tokenizer, merged_params, restore_checkpoint, task_names
from sftjax.train.state import merge_params

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "tokenizer.model")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="sftjax-export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", help="training run directory (config.json, checkpoints/)")
    source.add_argument("--adapter", help="a PEFT LoRA adapter directory to merge into --model")
    p.add_argument("--version", action="version", version=version_line("sftjax-export"))
    p.add_argument("--model", help="with --adapter: the base model directory")
    add_checkpoint_choice(p)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--format", choices=("merged", "peft"), default="merged", help="merged HF checkpoint (default) "
                                                                                  "or PEFT adapter")
    p.add_argument("--dtype", choices=DTYPES, help="storage dtype of the written weights (default: the base's)")
    p.add_argument("--requantize", action="store_true", help="qlora, merged: save the re-quantized merged weights")
    p.add_argument("--head", metavar="TASK", help="write this task's head with the merged model as a transformers "
                                                  "sequence-classification checkpoint")
    p.add_argument("--reward", action="store_true", help="write the reward model of an objective=reward run (the "
                                                       "default for such a run) as a sequence-classification model")
    p.add_argument("--overwrite", action="store_true", help="replace a checkpoint already in --out")
    return p.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    if args.adapter and not args.model:
        raise UserError("--adapter needs --model (the base model directory the adapter was trained on)")
    if args.model and not args.adapter:
        raise UserError("--model goes with --adapter; a --run names its base in its config")
    if args.adapter and (args.step is not None or args.best or args.format == "peft" or args.requantize
                         or args.head):
        raise UserError("--adapter merges a PEFT adapter into --model; --step, --best, --format peft, "
                        "--requantize and --head apply to --run")
    if args.reward and (args.head or args.format == "peft"):
        raise UserError("--reward writes a merged sequence-classification checkpoint; it does not go with --head or "
                        "--format peft")
    if args.head and args.format == "peft":
        raise UserError("--head writes a merged sequence-classification checkpoint; it does not go with --format peft")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a directory")
    held = sorted(p.name for p in out.glob("*") if p.name == "config.json" or p.name.startswith(("model", "adapter")))
    if held and not args.overwrite:
        raise UserError(f"--out {out}: already holds a checkpoint ({', '.join(held)}); pass --overwrite to replace it")


def tokenizer_files(directory: str) -> tuple[Path, ...]:
    return tuple(p for p in (Path(directory) / name for name in TOKENIZER_FILES) if p.is_file())


def _report(errors: dict[str, float]) -> str:
    if not errors:
        return ""
    worst = max(errors, key=errors.get)
    return (f"; re-quantization error of the merged weights (||Q(W') - W'|| / ||W'||): mean "
            f"{np.mean(list(errors.values())):.4f}, max {errors[worst]:.4f} ({worst})")


def _heads_note(heads: dict) -> str:
    return f"; task heads {', '.join(heads)} in {HEADS_TENSORS}" if heads else ""


def reward_pad(tokenizer: Tokenizer) -> tuple[int, str]:
    """(id, token) to write as a reward model's pad token: the tokenizer's pad token unless it is EOS (or unset),
    else the first special token that is neither EOS nor BOS (so that transformers' pooling, the last token that
    differs from the pad id, reads the sequence's final EOS)."""
    pad, eos, bos = tokenizer.pad_id, tokenizer.eos_id, tokenizer.bos_id
    if pad is not None and pad != eos:
        return pad, tokenizer.backend.id_to_token(pad)
    for i in sorted(tokenizer.special_ids):
        if i not in (eos, bos):
            return i, tokenizer.backend.id_to_token(i)
    raise UserError(f"{tokenizer.source}: the tokenizer pads with EOS (or has no pad token) and has no other special "
                    "token to pad a reward model with: add a pad_token to its tokenizer_config.json")


def _set_pad_token(directory: Path, token: str) -> None:
    """Point the exported tokenizer's pad token at `token` (tokenizer_config.json, special_tokens_map.json)."""
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        path = directory / name
        if path.is_file():
            config = json.loads(path.read_text(encoding="utf-8"))
            config["pad_token"] = token
            path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def export_reward(args: argparse.Namespace, cfg, model, params: Params, kernel: np.ndarray, step: int,
                  extra: tuple[Path, ...], errors: dict) -> str:
    tokenizer = build_tokenizer(cfg, model.cfg)
    pad, token = reward_pad(tokenizer)
    save_classifier(args.out, model.cfg, params, kernel, ["LABEL_0"], dtype=args.dtype or cfg.model.param_dtype,
                    overwrite=args.overwrite, extra_files=extra, pad_token_id=pad)
    _set_pad_token(Path(args.out), token)
    return (f"wrote the reward model of {args.run} step {step} as a sequence-classification checkpoint (num_labels "
            f"1, pad token {token!r} = {pad}) to {args.out}{_report(errors)}")


def export_run(args: argparse.Namespace) -> str:
    cfg = run_config(args.run, [])
    model = build_model(cfg)
    trainable, step = restore_checkpoint(cfg, Path(args.run) / "checkpoints", model, args.step, args.best)
    heads = {task: np.asarray(h["kernel"]) for task, h in trainable.pop("heads", {}).items()}
    classes = {task: s.labels for task, s in zip(task_names(cfg), cfg.data.train) if s.head}
    is_reward = cfg.objective.get("name") == "reward" and REWARD_HEAD in heads
    if args.reward and not is_reward:
        raise UserError(f"--reward: run {args.run} has no reward head (objective={cfg.objective.get('name')}); "
                        "train one with objective=reward")
    if is_reward:
        classes[REWARD_HEAD] = ["LABEL_0"]
    heads = {k: v for k, v in heads.items() if k in classes}  # PPO's value head serves training only
    if args.head and args.head not in heads:
        raise UserError(f"--head {args.head}: run {args.run} has no head of that name (its heads: "
                        f"{', '.join(heads) or 'none'})")
    extra = tokenizer_files(cfg.model.tokenizer or cfg.model.path)
    if args.format == "peft":
        if model.lora is None:
            raise UserError(f"--format peft: run {args.run} fine-tuned every weight (method.name=full); it has no "
                            "adapter: export --format merged")
        peft_io.save_adapter(args.out, model.cfg, model.lora, trainable, base_model_name_or_path=cfg.model.path,
                             dtype=args.dtype or "float32", overwrite=args.overwrite, extra_files=extra)
        if heads:
            save_heads(args.out, heads, classes)
        return f"wrote the PEFT adapter of {args.run} step {step} to {args.out}{_heads_note(heads)}"
    if args.requantize and cfg.method.name != "qlora":
        raise UserError(f"--requantize: run {args.run} has a float base (method.name={cfg.method.name}); only a "
                        "qlora run has a 4-bit format to re-quantize into")
    params, errors = merged_params(model, trainable, requantize=args.requantize)
    dtype = args.dtype or cfg.model.param_dtype
    if is_reward and not args.head:
        return export_reward(args, cfg, model, params, heads[REWARD_HEAD], step, extra, errors)
    if args.head:
        tokenizer = build_tokenizer(cfg, model.cfg)
        pad = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id
        save_classifier(args.out, model.cfg, params, heads[args.head], classes[args.head], dtype=dtype,
                        overwrite=args.overwrite, extra_files=extra, pad_token_id=pad)
        return (f"wrote the {args.head} head of {args.run} step {step} with the merged model as a "
                f"sequence-classification checkpoint to {args.out}{_report(errors)}")
    save_pretrained(args.out, model.cfg, params, dtype=dtype, overwrite=args.overwrite, extra_files=extra)
    if heads:
        save_heads(args.out, heads, classes)
    return f"wrote the merged checkpoint of {args.run} step {step} to {args.out}{_report(errors)}{_heads_note(heads)}"


def export_adapter(args: argparse.Namespace) -> str:
    base_cfg, base = load_pretrained(args.model)
    spec, adapters = peft_io.load_adapter(args.adapter, base_cfg)
    params, _ = lora.merge(merge_params(base, adapters), spec.scale)
    save_pretrained(args.out, base_cfg, params, dtype=args.dtype, overwrite=args.overwrite,
                    extra_files=tokenizer_files(args.model))
    return f"merged the PEFT adapter {args.adapter} into {args.model}: wrote {args.out}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.getLogger("absl").setLevel(logging.ERROR)  # Orbax logs every file it opens
    try:
        check_args(args)
        print(export_run(args) if args.run else export_adapter(args))
    except UserError as e:
        return fail("sftjax-export", str(e))
    except (HydraException, OmegaConfBaseException) as e:
        return fail("sftjax-export", one_line(e))
    return 0


if __name__ == "__main__":
    sys.exit(main())
