"""What a distillation step costs against an SFT step, on the bench config, in one process.

    python experiments/bench/distill_cost.py                          # full fine-tuning, 100% and 16% trained
    python experiments/bench/distill_cost.py --mode lora --steps 12

The student is the bench model (experiments/bench/README.md: Llama, width 512, 8 layers, vocabulary 8192); the
teacher has the same architecture (other random weights): its extra cost is one forward pass of its layers, with
no backward pass and no optimizer state, plus its vocabulary projection at the trained positions only. Both steps
are the trainer's own (`compile_steps` of `objectives.sft.SFT` and `objectives.distill.Distill`, alpha 0.5,
T 2, forward KL), compiled side by side and run in turns of `--turn` consecutive steps each on the same batches,
so their ratio is measured under the same machine state; the first step of each turn is left out (a step that
follows the other program's runs slower on this machine: experiments/bench/README.md, "Turns instead of
step-by-step alternation"). `--trained` sets the share of each row's targets that are trained (the
rest is prompt): 1.0 is the bench's own batch; 0.16 is completion-only SFT as in the main job, where both
objectives compute logits at the trained positions only.

Prints per share: median step seconds of each and the ratio (not a timed test: the figures go to the README).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax  # noqa: E402
import numpy as np  # noqa: E402

import jax_side  # noqa: E402
import workers  # noqa: E402
from sftjax.model.config import PRESETS  # noqa: E402
from sftjax.model.transformer import init_params  # noqa: E402
from sftjax.objectives import base  # noqa: E402


def batches(count: int, rows: int, seq: int, vocab: int, trained: float) -> list[dict[str, np.ndarray]]:
    """The bench's random token batches with the first (1 - trained) of each row's targets left untrained."""
    out = []
    for tokens, targets in workers.batches(count, rows, seq, vocab, 0):
        batch = jax_side.sftjax_batch(tokens, targets)
        batch["loss_mask"][..., : int(round(seq * (1 - trained)))] = 0.0
        out.append(batch)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", default="full", choices=["full", "lora", "qlora"])
    ap.add_argument("--preset", default="bench-llama")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--trained", default="1.0,0.16", help="shares of trained targets per row, comma-separated")
    ap.add_argument("--turns", type=int, default=4, help="turns per objective")
    ap.add_argument("--turn", type=int, default=3, help="consecutive steps of one objective per turn")
    args = ap.parse_args(argv)
    model_cfg = dataclasses.replace(PRESETS[args.preset], dtype="float32", param_dtype="float32")
    cfg = jax_side.train_config("unused", args.mode, 16, 32.0, 1e-4)
    student = jax_side.random_model(cfg, model_cfg)
    teacher = init_params(model_cfg, jax.random.key(1))
    context = base.Context(student.cfg, ("bench",))
    distill = base.build({"name": "distill", "teacher": "in memory", "alpha": 0.5, "temperature": 2.0},
                         context).bind({"teacher": model_cfg})
    runners = {"sft": jax_side.Runner(cfg, student),
               "distill": jax_side.Runner(cfg, student, distill, {"teacher": teacher})}
    print(f"{args.mode}, {args.preset}, batch {args.batch} x {args.seq}; medians of the steady steps of "
          f"{args.turns} turns of {args.turn} steps each (first step of each turn left out)")
    print("| trained share | SFT step s | distill step s | distill / SFT |")
    print("| --- | --- | --- | --- |")
    for share in (float(x) for x in args.trained.split(",")):
        data = batches(3, args.batch, args.seq, model_cfg.vocab_size, share)
        times = {name: [] for name in runners}
        for _ in range(args.turns):
            for name, runner in runners.items():
                for i in range(args.turn):
                    batch = runner.objective.prepare(data[i % len(data)])
                    start = time.perf_counter()
                    runner.step(batch)
                    if i:  # the first step of a turn follows the other program: left out
                        times[name].append(time.perf_counter() - start)
        sft, kd = (float(np.median(times[n])) for n in ("sft", "distill"))
        print(f"| {share:.0%} | {sft:.3f} | {kd:.3f} | {kd / sft:.2f}x |")


if __name__ == "__main__":
    from sftjax.cli.malloc import use_huge_pages

    use_huge_pages()  # may re-run this process, as sftjax-train does
    main()
