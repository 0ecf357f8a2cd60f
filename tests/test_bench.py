"""experiments/bench/bench.py --quick runs end to end on a tiny config and writes its table and JSON; ab.py runs
its variants, which agree, and puts back what it patched.

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
    for title in ("Matmul peak", "Train-step throughput", "Memory", "Compile time", "Scaling", "Matmul floor"):
        assert f"## {title}" in text
    result = json.loads(js.read_text())
    assert set(result["speed"]) == set(MODES) and set(result["memory"]) == set(MODES)
    for mode in MODES:
        speed = result["speed"][mode]
        assert f"| {mode} | " in text
        for stack in ("sftjax", "peer"):
            assert speed[stack]["tokens_per_s"] > 0 and 0 < speed[stack]["mfu"]
            assert result["memory"][mode][stack]["peak_rss_mib"] > 0
        floor = result["floor"][mode]
        assert floor["floor_s"] > 0 and floor["flops"] > 0 and floor["dots"]
        # Same weights, same batch, same loss: the two stacks train the same model.
        assert abs(speed["sftjax"]["losses"][0] - speed["peer"]["losses"][0]) < 1e-3
    assert not result["memory"]["full"]["sftjax"]["torch_imported"]
    assert {(r["scan_layers"]) for r in result["compile"]["rows"]} == {True, False}
    assert {r["remat"] for r in result["scaling"]["rows"]} == {"none", "full"}


AB = BENCH.parent / "ab.py"


def test_ab_runs_every_variant_and_they_agree():
    """ab.py on a tiny config: one row per variant, and the variants train the same model (first losses equal to
    1e-5: each variant reverts one implementation choice, not the computation)."""
    proc = subprocess.run([sys.executable, str(AB), "--preset", "tiny-llama", "--batch", "2", "--seq", "32",
                           "--steps", "2", "--warmup", "1"], capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line.split(" | ") for line in proc.stdout.splitlines() if line.startswith("| ") and "---" not in line]
    variants = [row[0].strip("| ") for row in rows[1:]]
    assert variants == ["current", "autodiff_linear", "autodiff_glu", "autodiff_attention", "no_causal_blocks",
                        "select_mask"]
    first_losses = [float(row[4].split(" / ")[0]) for row in rows[1:]]
    assert max(first_losses) - min(first_losses) < 1e-5


def test_ab_restores_the_patched_functions():
    sys.path.insert(0, str(AB.parent))
    try:
        import ab
    finally:
        sys.path.remove(str(AB.parent))
    from sftjax.model import attention, layers, transformer

    def patchable():
        return (layers.linear, transformer.linear, transformer.gated_activation, attention.dot_product_attention,
                attention.causal_attention, layers.lora_update)

    before = patchable()
    for variant in ab.VARIANTS:
        with ab.patched(variant):
            assert (patchable() != before) == (variant != "current")
    assert patchable() == before
