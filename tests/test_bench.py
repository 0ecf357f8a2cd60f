"""experiments/bench/bench.py --quick runs end to end on a tiny config and writes its table and JSON; its sharded
sftjax step (--parallelism fsdp) gives the pmap step's losses; ab.py runs its variants, which agree, and puts back
what it patched.

Speed is never asserted here: the benchmark measures it, a test only checks that the benchmark runs.
"""

import importlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

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
    assert "First step of a turn against the steady step" in text
    for title in ("Matmul peak", "Train-step throughput", "Memory", "Compile time", "Scaling", "Matmul floor"):
        assert f"## {title}" in text
    result = json.loads(js.read_text())
    assert set(result["speed"]) == set(MODES) and set(result["memory"]) == set(MODES)
    for mode in MODES:
        speed = result["speed"][mode]
        assert f"| {mode} | " in text
        for stack in ("sftjax", "peer"):
            assert speed[stack]["tokens_per_s"] > 0 and 0 < speed[stack]["mfu"]
            # turns of 2 steps: 1 warm-up turn, then 1 turn whose second step is the one measured
            assert len(speed[stack]["losses"]) == 4 and len(speed[stack]["steps_s"]) == 1
            assert speed[stack]["turn_first_step_s"] > 0
            assert result["memory"][mode][stack]["peak_rss_mib"] > 0
        floor = result["floor"][mode]
        assert floor["floor_s"] > 0 and floor["flops"] > 0 and floor["dots"]
        # Same weights, same batch, same loss: the two stacks train the same model.
        assert abs(speed["sftjax"]["losses"][0] - speed["peer"]["losses"][0]) < 1e-3
    assert not result["memory"]["full"]["sftjax"]["torch_imported"]
    assert {(r["scan_layers"]) for r in result["compile"]["rows"]} == {True, False}
    assert {r["remat"] for r in result["scaling"]["rows"]} == {"none", "full"}


def test_bench_bf16_path_runs_on_cpu(tmp_path):
    """--precision bf16 (the GPU setting) on CPU: both stacks train in bf16 mixed precision, the peak is bfloat16,
    the result is named -bf16, and the two stacks' first losses agree to bf16 rounding (0.05 on a loss of ~7)."""
    proc = subprocess.run([sys.executable, str(BENCH), "--quick", "--precision", "bf16", "--sections",
                           "peak,speed,memory", "--modes", "full,lora", "--results-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (js,) = tmp_path.glob("*-bf16-quick.json")
    result = json.loads(js.read_text())
    assert result["peak"]["dtype"] == "bfloat16" and result["settings"]["precision"] == "bf16"
    assert "## Matmul peak (bfloat16)" in proc.stdout and "bf16 mixed precision" in proc.stdout
    for mode in ("full", "lora"):
        speed = result["speed"][mode]
        assert speed["peer_setup"]["precision"] == "bf16"
        assert abs(speed["sftjax"]["losses"][0] - speed["peer"]["losses"][0]) < 0.05
        assert result["memory"][mode]["sftjax"]["device_peak_bytes"] is None  # CPU: no device memory figure
    mem = result["memory"]
    assert mem["full"]["sftjax"]["trainable_bytes"] == mem["full"]["peer"]["trainable_bytes"]  # float32 masters
    assert mem["lora"]["sftjax"]["frozen_bytes"] < mem["full"]["sftjax"]["trainable_bytes"] / 1.5  # bf16 base


def test_bench_gpu_platform_without_a_gpu_stops_with_one_line(tmp_path):
    proc = subprocess.run([sys.executable, str(BENCH), "--quick", "--platform", "gpu", "--sections", "peak",
                           "--results-dir", str(tmp_path)], capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode != 0
    assert "--platform gpu, but jax runs on cpu" in proc.stderr
    assert not list(tmp_path.iterdir())  # nothing written


def _import_bench():
    sys.path.insert(0, str(BENCH.parent))
    try:
        import bench
    finally:
        sys.path.remove(str(BENCH.parent))
    return bench


def _import_bench_module(name: str):
    sys.path.insert(0, str(BENCH.parent))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(BENCH.parent))


@pytest.mark.parametrize("mode", MODES)
def test_bench_sharded_step_matches_the_pmap_step(mode):
    """`bench.py --parallelism fsdp`'s sftjax step (jax_side.Runner: the sharded step on a one-device mesh, compiled
    ahead of time as the memory section does) against the pmap step on the tiny config: the same losses over two
    AdamW steps to 1e-5 relative. On one device the two programs differ in summation order only (the vmap over
    one group of rows), so the losses agree to float32 rounding (highest matmul precision, tests/conftest.py)."""
    jax_side, workers = _import_bench_module("jax_side"), _import_bench_module("workers")
    from sftjax.model.config import PRESETS

    model_cfg = PRESETS["tiny-llama"].replace(num_layers=2)
    cfg = jax_side.train_config("-", mode, 16, 32.0, 1e-4)
    data = [jax_side.sftjax_batch(*pair) for pair in workers.batches(2, 2, 32, model_cfg.vocab_size, 0)]
    model = jax_side.random_model(cfg, model_cfg)
    runners = {p: jax_side.Runner(cfg, model, parallelism=p) for p in ("data", "fsdp")}
    sharded = runners["fsdp"]
    lower_s, compile_s = sharded.compile(data[0])
    assert lower_s > 0 and compile_s > 0 and sharded.temp_bytes > 0
    losses = {p: [runner.step(batch) for batch in data] for p, runner in runners.items()}
    assert all(isinstance(x, float) and np.isfinite(x) for x in losses["fsdp"])
    np.testing.assert_allclose(losses["fsdp"], losses["data"], rtol=1e-5, atol=0)
    assert sharded.memory() == runners["data"].memory()  # the same bytes, a device axis of 1 or none
    with pytest.raises(ValueError, match="parallelism 'tensor'"):
        jax_side.Runner(cfg, model, parallelism="tensor")


def test_model_dir_is_reused_for_the_same_model_and_never_replaced(tmp_path, monkeypatch):
    bench = _import_bench()
    calls = []
    monkeypatch.setattr(bench, "run_worker", lambda name, payload: calls.append(name) or {"model": {"v": 1}})
    preset = {"preset": "tiny-llama", "overrides": {}}
    base = {"seed": 0}
    keep = tmp_path / "kept"
    assert bench._prepare(base, preset, keep.parent / "missing") == {"model": {"v": 1}}  # a new directory
    keep.mkdir()
    first = bench._prepare(base, preset, keep)
    assert bench._prepare(base, preset, keep) == first and calls == ["prepare", "prepare"]  # reused
    with pytest.raises(SystemExit, match="holds .* not"):
        bench._prepare(base, {"preset": "bench-llama", "overrides": {}}, keep)
    other = tmp_path / "other"
    other.mkdir()
    (other / "file").write_text("mine")
    with pytest.raises(SystemExit, match="not empty"):
        bench._prepare(base, preset, other)
    assert (other / "file").read_text() == "mine"


def test_results_never_replace_an_earlier_one(tmp_path):
    bench = _import_bench()
    assert bench._free_stem(tmp_path, "x") == "x"
    (tmp_path / "x.md").write_text("")
    (tmp_path / "x-2.json").write_text("")
    assert bench._free_stem(tmp_path, "x") == "x-3"



def test_the_machine_record_tells_cpu_generations_apart():
    """"AMD EPYC" named hosts whose jax matmul peaks were 200 and 480 GFLOP/s; family, model and ISA tell them apart."""
    bench = _import_bench()
    lscpu = ("Model name:                              AMD EPYC\nCPU family:                              26\n"
             "Model:                                   2\nFlags:                                   fpu avx2 avx512f\n")
    assert bench.cpu_id(lscpu) == "family 26 model 2, AVX-512"
    assert bench.cpu_id(lscpu.replace(" avx512f", "")) == "family 26 model 2, AVX2"
    assert bench.cpu_id("") == "family ? model ?, ?"



def test_profile_sums_op_time_by_kind():
    out = subprocess.run([sys.executable, str(BENCH.parent / "op_profile.py"), "--quick", "--steps", "1",
                          "--by-source"], capture_output=True, text=True, check=True).stdout
    assert "| kind | ms per step | share of op time |" in out and "| ynn |" in out and "step wall" in out
    # --by-source: op time per function and line of sftjax/, the attention and the linear layers among them
    functions = [line.split(" | ")[0].strip("| ") for line in out.split("| function |")[1].splitlines()[2:]
                 if line.startswith("| ")]
    assert "sftjax/model/attention.py:causal_attention" in functions, functions
    assert any(f.startswith("sftjax/peft/adapted.py:") or f.startswith("sftjax/model/layers.py:") for f in functions)
    assert "dot_general (backward)" in out.split("| source line |")[1]
    sys.path.insert(0, str(BENCH.parent))
    import op_profile as bench_profile

    assert [bench_profile.kind(n) for n in ("ynn_fusion.2", "dot_general.4", "copy_bitcast_fusion.8",
                                            "transpose.3", "wrapped_broadcast.7", "iota_reduce_fusion",
                                            "add_divide_fusion.1")] == \
        ["ynn", "dot", "copy", "copy", "broadcast", "reduce", "other"]
    trace = {"traceEvents": [{"ph": "X", "name": "ynn_fusion", "dur": 3000},
                             {"ph": "X", "name": "ThunkExecutor::Execute", "dur": 9000},
                             {"ph": "X", "name": "while.101", "dur": 9000},
                             {"ph": "M", "name": "thread_name"}]}
    assert bench_profile.op_times(trace, steps=3) == {"ynn_fusion": 1.0}


def test_profile_names_the_source_line_of_each_op():
    """hlo_sources maps a compiled program's ops (fusions by their root) to this file's lines and functions."""
    import jax
    import jax.numpy as jnp

    sys.path.insert(0, str(BENCH.parent))
    import op_profile as bench_profile

    def loss(w, x):
        h = jnp.exp(x @ w)  # the line of the exp and of the forward and backward matmuls
        return jnp.sum(h)

    here = Path(__file__).name
    line = loss.__code__.co_firstlineno + 1
    hlo = jax.jit(jax.grad(loss)).lower(jnp.ones((8, 8)), jnp.ones((4, 8))).compile().as_text()
    sources = bench_profile.hlo_sources(hlo)
    assert sources and {where for where, _, _ in sources.values()} <= {f"{here}:{line}", "?"}, sources
    function = f"{here}:test_profile_names_the_source_line_of_each_op.<locals>.loss"  # the code object's qualname
    assert {function for _, function, _ in sources.values()} - {"?"} == {function}
    times = {name: 1.0 for name in sources}
    per_line, per_function = bench_profile.by_source(times, sources)
    assert per_line[0][1] == f"{here}:{line}" and per_function[0][1] == function
    assert sum(row[0] for row in per_line) == len(sources)
    assert all(0.0 <= row[2] <= 1.0 for row in per_line) and all(0.0 <= row[2] <= 1.0 for row in per_function)


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


def test_ab_compares_variants_of_the_main_jobs_step():
    """--main-job (the main job's base, rank-64 LoRA with the embedding and norms trained, packed rows with the
    labeled positions) over 4 x 64 tokens: the adapters merged (`current`) or factored, attention in blocks of 32
    queries, and the layers under a scan instead of unrolled (as the main job runs them) give the same losses
    (first and last of 3 steps) to 1e-5."""
    variants = ["current", "factored_lora", "block_32", "scan_layers"]
    proc = subprocess.run([sys.executable, str(AB), "--main-job", "--batch", "4", "--seq", "64", "--steps", "3",
                           "--warmup", "1", "--variants", ",".join(variants)], capture_output=True,
                          text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("main job: lora (rank 64), builtin, batch 4 x 64")
    rows = [line.split(" | ") for line in proc.stdout.splitlines() if line.startswith("| ") and "---" not in line]
    assert [row[0].strip("| ") for row in rows[1:]] == variants
    losses = [[float(x) for x in row[4].split(" / ")] for row in rows[1:]]
    for first, last in losses[1:]:
        assert abs(first - losses[0][0]) < 1e-5 and abs(last - losses[0][1]) < 1e-5


def test_main_job_batches_are_packed_like_the_tasks():
    """ab.main_job_batches: rows packed with 8-26-token examples (positions restart, segment ids count up), about a
    fifth of the tokens trained, and the SFT objective's label_index over them."""
    sys.path.insert(0, str(AB.parent))
    try:
        import ab
    finally:
        sys.path.remove(str(AB.parent))
    [batch] = ab.main_job_batches(1, 32, 128, 4096, 0)
    seg, pos, mask = batch["segment_ids"][0, 0], batch["positions"][0, 0], batch["loss_mask"][0, 0]
    assert seg.shape == (32, 128) and (seg > 0).all() and (np.diff(seg, axis=1) >= 0).all()
    assert ((pos == 0) == np.concatenate([np.ones((32, 1), bool), np.diff(seg, axis=1) > 0], axis=1)).all()
    assert 0.15 < mask.mean() < 0.35
    index = batch["label_index"][0, 0]
    assert sorted(index[index >= 0].tolist()) == np.flatnonzero(mask.reshape(-1)).tolist()


def test_ab_restores_the_patched_functions():
    sys.path.insert(0, str(AB.parent))
    try:
        import ab
    finally:
        sys.path.remove(str(AB.parent))
    from sftjax.model import attention, layers, transformer
    from sftjax.objectives import sft
    from sftjax.peft import adapted, quant
    from sftjax.train import step

    def patchable():
        return (layers.linear, transformer.linear, transformer.gated_activation, attention.dot_product_attention,
                attention.causal_attention, adapted.lora_update, adapted.qlinear, quant._code_values, sft.token_nll,
                adapted.lora_merge_pays, attention.dense, transformer.dense, step.train_step, step.apply_sums)

    before = patchable()
    for variant in ab.VARIANTS:
        with ab.patched(variant):
            assert (patchable() != before) == (variant != "current")
    assert patchable() == before


def test_distill_cost_compares_the_two_steps():
    """distill_cost.py on a tiny config: one row per trained share, both steps run (a ratio is printed)."""
    script = AB.parent / "distill_cost.py"
    proc = subprocess.run([sys.executable, str(script), "--preset", "tiny-llama", "--batch", "2", "--seq", "32",
                           "--turns", "1", "--turn", "2", "--trained", "1.0,0.25"], capture_output=True, text=True,
                          timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line.split(" | ") for line in proc.stdout.splitlines() if line.startswith("| ") and "---" not in line]
    assert [row[0].strip("| ") for row in rows[1:]] == ["100%", "25%"]
    assert all(float(row[3].strip(" |x")) > 0 for row in rows[1:])
