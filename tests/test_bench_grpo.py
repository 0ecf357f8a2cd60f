"""experiments/bench/grpo_bench.py --quick runs end to end on a tiny config and writes its table and JSON, with figures
for one GRPO iteration of sftjax (Rollouts + train step) and of TRL's GRPOTrainer in both modes.

Speed is never asserted here: the benchmark measures it, a test only checks that the benchmark runs, that both
stacks got the same prompts and generated the same (fixed) number of tokens in every iteration.
"""

import json
import math
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "experiments" / "bench" / "grpo_bench.py"
MODES = ("full", "lora")
STACKS = (("sftjax", "sftjax Rollouts + step"), ("trl", "TRL GRPOTrainer"))
ROWS, NEW_TOKENS = 2 * 2, 8  # --quick: 2 prompts x G 2, 8 new tokens


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_grpo_bench_quick_writes_table_and_json(tmp_path):
    # 25-60 s on the project's 2-core machine (60 with another job on its cores); the timeout leaves room
    proc = subprocess.run([sys.executable, str(BENCH), "--quick", "--results-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (md,) = tmp_path.glob("grpo_*-quick.md")
    (js,) = tmp_path.glob("grpo_*-quick.json")
    text = md.read_text()
    assert text.strip() in proc.stdout  # the same table is printed
    assert "machine: " in text and "command: `python experiments/bench/grpo_bench.py --quick" in text
    for title in ("One GRPO iteration", "Phases side by side", "Memory"):
        assert f"## {title}" in text
    assert "equal in every iteration" in text
    result = json.loads(js.read_text())
    assert set(result["speed"]) == set(MODES)
    for mode in MODES:
        speed = result["speed"][mode]
        assert speed["same_generated_tokens"] and speed["same_prompt_tokens"]
        assert _positive(speed["process_peak_rss_mib"])
        for stack, label in STACKS:
            assert f"| {mode} | {label} | " in text
            x = speed[stack]
            for key in ("iteration_s", "first_iteration_s", "tokens_per_s", "sampler_tokens_per_s", "setup_s",
                        "slots_per_iteration", "trainable_bytes"):
                assert _positive(x[key]), (mode, stack, key, x[key])
            for phase in ("generate_s", "score_reward_s", "step_s", "reference_s"):
                assert _positive(x["median"][phase]), (mode, stack, phase, x["median"][phase])
            assert abs(sum(x["share"].values()) - 1) < 1e-6
            # turns of 2 iterations: 1 warm-up turn, then 1 turn whose second iteration is the one measured
            assert len(x["iterations"]) == 4
            for it in x["iterations"]:
                assert it["generated_tokens"] == it["trained_tokens"] == ROWS * NEW_TOKENS  # fixed-length completions
                assert all(math.isfinite(it[k]) for k in ("loss", "kl", "reward"))
            assert x["generated_tokens_per_iteration"] == ROWS * NEW_TOKENS
        assert _positive(speed["sftjax"]["vs_trl"])
    # The reference: a full copy under full fine-tuning, nothing extra under LoRA (the base with adapters off).
    full, lora = result["speed"]["full"], result["speed"]["lora"]
    assert full["sftjax"]["reference_bytes"] == full["sftjax"]["trainable_bytes"] == full["trl"]["reference_bytes"]
    assert lora["sftjax"]["reference_bytes"] == 0 == lora["trl"]["reference_bytes"]
    assert lora["sftjax"]["trainable_bytes"] == lora["trl"]["trainable_bytes"]  # the same adapters
