"""experiments/bench/dpo_bench.py --quick runs end to end on a tiny config and writes its table and JSON, with figures
for sftjax's DPO step (packed and padded) and TRL's DPOTrainer step in both modes.

Speed is never asserted here: the benchmark measures it, a test only checks that the benchmark runs and that the
three steps start from the same model on the same pairs.
"""

import json
import math
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "experiments" / "bench" / "dpo_bench.py"
MODES = ("full", "lora")
STEPS = ("packed", "padded", "trl")


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_dpo_bench_quick_writes_table_and_json(tmp_path):
    # about 35 s on the project's 2-core machine; the timeout leaves room for a loaded one
    proc = subprocess.run([sys.executable, str(BENCH), "--quick", "--results-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (md,) = tmp_path.glob("dpo_*-quick.md")
    (js,) = tmp_path.glob("dpo_*-quick.json")
    text = md.read_text()
    assert text.strip() in proc.stdout  # the same table is printed
    assert "machine: " in text and "command: `python experiments/bench/dpo_bench.py --quick" in text
    for title in ("Train-step throughput", "sftjax packed against padded", "Memory"):
        assert f"## {title}" in text
    result = json.loads(js.read_text())
    assert set(result["speed"]) == set(MODES)
    for mode in MODES:
        speed = result["speed"][mode]
        for kind, label in (("packed", "sftjax packed"), ("padded", "sftjax padded"), ("trl", "TRL DPOTrainer")):
            assert f"| {mode} | {label} | " in text
            x = speed[kind]
            for key in ("step_s", "pairs_per_s", "tokens_per_s", "real_tokens", "slots", "trainable_bytes",
                        "opt_state_bytes"):
                assert _positive(x[key]), (mode, kind, key, x[key])
            assert 0 <= x["padding"] < 1 and x["real_tokens"] <= x["slots"]
            # turns of 2 steps: 1 warm-up turn, then 1 turn whose second step is the one measured
            assert len(x["all_steps_s"]) == 4 and len(x["steps_s"]) == 1
            assert all(math.isfinite(loss) for loss in x["losses"])
        for kind in ("packed", "padded"):
            assert _positive(speed[kind]["vs_trl"]) and _positive(speed[kind]["xla_temp_bytes"])
        assert _positive(speed["packed_vs_padded"]) and _positive(speed["process_peak_rss_mib"])
        assert speed["trl"]["grad_bytes"] == speed["trl"]["trainable_bytes"]
        # The same model on the same pairs: step 1's loss is ln 2 (policy == reference) and the chosen completions'
        # log-probabilities agree across the three steps.
        first = [speed[kind]["first_step"] for kind in STEPS]
        assert all(abs(f["loss"] - math.log(2)) < 1e-5 for f in first)
        logps = [f["logps_chosen"] for f in first]
        assert max(logps) - min(logps) < 1e-4 * abs(logps[0]), logps
    # The reference: a full copy under full fine-tuning, nothing extra under LoRA (the base with adapters off).
    full, lora = result["speed"]["full"], result["speed"]["lora"]
    assert full["packed"]["reference_bytes"] == full["packed"]["trainable_bytes"] == full["trl"]["reference_bytes"]
    assert lora["packed"]["reference_bytes"] == 0 == lora["trl"]["reference_bytes"]
