"""experiments/bench/bench.py --quick runs end to end on a tiny config and writes its table and JSON.

Speed is never asserted here: the benchmark measures it, a test only checks that the benchmark runs.
"""

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "experiments" / "bench" / "bench.py"
MODES = ("full", "lora", "qlora")


def test_bench_quick_writes_table_and_json(tmp_path):
    proc = subprocess.run([sys.executable, str(BENCH), "--quick", "--results-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (md,) = tmp_path.glob("*-quick.md")
    (js,) = tmp_path.glob("*-quick.json")
    text = md.read_text()
    assert text in proc.stdout  # the same table is printed
    for title in ("Matmul peak", "Train-step throughput", "Memory", "Compile time", "Scaling"):
        assert f"## {title}" in text
    result = json.loads(js.read_text())
    assert set(result["speed"]) == set(MODES) and set(result["memory"]) == set(MODES)
    for mode in MODES:
        speed = result["speed"][mode]
        assert f"| {mode} | " in text
        for stack in ("sftjax", "peer"):
            assert speed[stack]["tokens_per_s"] > 0 and 0 < speed[stack]["mfu"]
            assert result["memory"][mode][stack]["peak_rss_mib"] > 0
        # Same weights, same batch, same loss: the two stacks train the same model.
        assert abs(speed["sftjax"]["losses"][0] - speed["peer"]["losses"][0]) < 1e-3
    assert not result["memory"]["full"]["sftjax"]["torch_imported"]
    assert {(r["scan_layers"]) for r in result["compile"]["rows"]} == {True, False}
    assert {r["remat"] for r in result["scaling"]["rows"]} == {"none", "full"}
