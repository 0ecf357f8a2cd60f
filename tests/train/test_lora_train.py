"""LoRA and QLoRA through sftjax-train and sftjax-export, end to end: what a run logs and checkpoints, an exact
resume, and exports that transformers and PEFT load with the logits sftjax computes.

float32, highest matmul precision; logits tolerance 1e-4 (as the PEFT parity tests).
"""

import json
import shutil
from pathlib import Path

import numpy as np
import peft
import pytest
import torch

from sftjax.cli.common import run_config
from sftjax.cli.export import main as export_main
from sftjax.model.transformer import forward
from sftjax.train.checkpoint import Checkpointer
from sftjax.train.setup import build_model, restore_checkpoint
from sftjax.train.state import merge_params
from tests.model import hf_models
from tests.train.conftest import run_train

ATOL = 1e-4
COMMON = ("data.seq_len=64", "trainer.devices=1", "trainer.batch_size=4", "trainer.progress=false",
          "trainer.num_samples=0", "optim.lr=3e-3", "trainer.log_every=1")


def _args(ws, *extra):
    return (f"model={ws['model']}", f"data={ws['train']}", *COMMON, *extra)


@pytest.fixture(scope="module")
def runs(workspace, tmp_path_factory):
    """A LoRA and a QLoRA run of 6 steps (checkpoints at 3 and 6, evaluation at the end), with dropout."""
    root = tmp_path_factory.mktemp("lora_runs")
    out = {}
    for method in ("lora", "qlora"):
        out[method] = root / method
        out[f"{method}_log"] = run_train(*_args(workspace, f"method={method}", "trainer.max_steps=6",
                                                "trainer.save_every=3", "trainer.eval_every=0",
                                                "data.eval_fraction=0.1", "method.lora.dropout=0.1",
                                                f"trainer.run_dir={out[method]}"), cwd=root)
    return out


def _trained_logits(run_dir, tokens):
    cfg = run_config(run_dir, [])
    model = build_model(cfg)
    trainable, _ = restore_checkpoint(cfg, Path(run_dir) / "checkpoints", model)
    return np.asarray(forward(model.cfg, merge_params(model.frozen, trainable), tokens)), model, trainable


TOKENS = np.random.default_rng(0).integers(3, 100, (2, 16)).astype(np.int32)


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_run_logs_memory_trains_and_checkpoints_adapters_only(runs, method):
    log = runs[f"{method}_log"].stdout + runs[f"{method}_log"].stderr
    assert f"method {method}: " in log and "trainable (" in log
    assert "bits per parameter" in log and "base weights: float32" in log
    if method == "qlora":
        assert "(nf4, double_quant=True)" in log
    lines = [json.loads(x) for x in (runs[method] / "metrics.jsonl").read_text().splitlines()]
    losses = [x["loss"] for x in lines if x["split"] == "train"]
    assert len(losses) == 6 and losses[-1] < losses[0] - 0.5  # the adapters learn (lr 3e-3)
    with Checkpointer(runs[method] / "checkpoints", keep_last=2, read_only=True) as ckpt:
        assert ckpt.latest_step() == 6
    # The checkpoint holds only the adapters (and their optimizer state), never the base.
    _, model, trainable = _trained_logits(runs[method], TOKENS)
    names = {k for path in _paths(trainable) for k in path}
    assert {"lora_a", "lora_b"} <= names and not names & {"kernel", "qkernel", "embedding", "scale"}
    saved = sum(f.stat().st_size for f in (runs[method] / "checkpoints" / "6").rglob("*") if f.is_file())
    adapter_bytes = 3 * 4 * sum(int(np.prod(x.shape)) for x in _leaves(trainable))  # weights, Adam mu and nu
    base_bytes = sum(int(np.prod(x.shape)) * 4 for x in _leaves(model.frozen) if x.ndim >= 2)
    assert saved < adapter_bytes + 64 * 1024 < adapter_bytes + base_bytes  # Orbax metadata: a few KiB


def _paths(tree, prefix=()):
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _paths(v, (*prefix, k))
    else:
        yield prefix


def _leaves(tree):
    return [v for v in tree.values() for v in _leaves(v)] if isinstance(tree, dict) else [tree]


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_sftjax_eval_on_an_adapter_run_matches_the_logged_eval(runs, method, capsys):
    """sftjax-eval --run rebuilds the (quantized) base, restores the adapters and gets the run's own eval loss."""
    from sftjax.cli.eval import main as eval_main

    assert eval_main(["--run", str(runs[method]), "--json", "--max-new-tokens", "0"]) == 0
    result = json.loads(capsys.readouterr().out)
    final = json.loads((runs[method] / "final_metrics.json").read_text())
    assert result["step"] == 6
    assert result["overall"]["loss"] == pytest.approx(final["eval/loss"], rel=1e-5)  # f32 sums, other batching


def test_qlora_resume_is_bitwise_exact(runs, workspace, tmp_path):
    """Drop the final checkpoint and rerun: it resumes from step 3 (base re-quantized, fingerprint checked) and
    ends bitwise equal to the uninterrupted run, LoRA dropout included."""
    copy = tmp_path / "qlora"
    shutil.copytree(runs["qlora"], copy)
    shutil.rmtree(copy / "checkpoints" / "6")
    done = run_train(*_args(workspace, "method=qlora", "trainer.max_steps=6", "trainer.save_every=3",
                            "trainer.eval_every=0", "data.eval_fraction=0.1", "method.lora.dropout=0.1",
                            f"trainer.run_dir={copy}"), cwd=tmp_path)
    assert "resuming" in done.stdout + done.stderr
    original, _, a = _trained_logits(runs["qlora"], TOKENS)
    resumed, _, b = _trained_logits(copy, TOKENS)
    for x, y in zip(_leaves(a), _leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _export(capsys, *argv):
    code = export_main(list(argv))
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return captured.out


def test_lora_exports_load_in_transformers_and_peft(runs, workspace, tmp_path, capsys):
    ours, _, _ = _trained_logits(runs["lora"], TOKENS)
    base = hf_models.hf_logits(hf_models.load_hf(workspace["model"]), TOKENS)
    assert np.abs(ours - base).max() > 100 * ATOL  # training moved the model: the comparisons can fail

    _export(capsys, "--run", str(runs["lora"]), "--format", "peft", "--out", str(tmp_path / "adapter"))
    assert (tmp_path / "adapter" / "tokenizer.json").is_file()
    peft_model = peft.PeftModel.from_pretrained(hf_models.load_hf(workspace["model"]), tmp_path / "adapter").eval()
    np.testing.assert_allclose(hf_models.hf_logits(peft_model, TOKENS), ours, atol=ATOL)

    _export(capsys, "--run", str(runs["lora"]), "--out", str(tmp_path / "merged"))
    np.testing.assert_allclose(hf_models.hf_logits(hf_models.load_hf(tmp_path / "merged"), TOKENS), ours, atol=ATOL)
    assert (tmp_path / "merged" / "tokenizer.json").is_file()

    # A PEFT adapter merged by sftjax-export --adapter equals PEFT's own merge_and_unload.
    _export(capsys, "--adapter", str(tmp_path / "adapter"), "--model", str(workspace["model"]),
            "--out", str(tmp_path / "merged2"))
    merged_by_peft = peft_model.merge_and_unload()
    with torch.no_grad():
        for name, tensor in hf_models.load_hf(tmp_path / "merged2").state_dict().items():
            np.testing.assert_allclose(tensor.numpy(), merged_by_peft.state_dict()[name].numpy(), atol=1e-6)


def test_qlora_merged_export_reports_the_requantization_error(runs, workspace, tmp_path, capsys):
    ours, _, _ = _trained_logits(runs["qlora"], TOKENS)
    out = _export(capsys, "--run", str(runs["qlora"]), "--out", str(tmp_path / "merged"))
    assert "re-quantization error of the merged weights" in out
    # Merged into the dequantized base: transformers computes what the QLoRA model computed.
    np.testing.assert_allclose(hf_models.hf_logits(hf_models.load_hf(tmp_path / "merged"), TOKENS), ours, atol=ATOL)
    _export(capsys, "--run", str(runs["qlora"]), "--requantize", "--out", str(tmp_path / "requant"))
    requant = hf_models.hf_logits(hf_models.load_hf(tmp_path / "requant"), TOKENS)
    assert np.abs(requant - ours).max() > ATOL  # re-quantizing costs accuracy, as reported

    _export(capsys, "--run", str(runs["qlora"]), "--format", "peft", "--out", str(tmp_path / "adapter"))
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 16 and config["lora_alpha"] == 32


@pytest.mark.parametrize("argv,message", [
    (["--run", "{lora}", "--out", "{tmp}/x", "--requantize"], "--requantize: run"),
    (["--run", "{lora}", "--out", "{existing}"], "already holds a checkpoint (config.json); pass --overwrite"),
    (["--adapter", "{tmp}/none", "--out", "{tmp}/y"], "--adapter needs --model"),
])
def test_export_errors_are_one_line(runs, tmp_path, capsys, argv, message):
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "config.json").write_text("{}")
    argv = [a.format(lora=runs["lora"], tmp=tmp_path, existing=existing) for a in argv]
    assert export_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("override,message", [
    ("method.lora.target_modules=[c_attn]", "matches no module; available: down_proj, gate_proj, up_proj"),
    ("method.lora.rank=0", "method.lora.rank=0: must be a positive integer"),
    ("method.lora.rank=40", "method.lora.rank=40: larger than layers/self_attn/k_proj allows"),
    ("method.quant.kind=fp4", "method.quant.kind='fp4': must be one of nf4, int4"),
    ("method.name=dora", "method.name='dora': must be one of full, lora, qlora"),
])
def test_bad_lora_config_fails_at_start_with_one_line(workspace, tmp_path, override, message):
    done = run_train(*_args(workspace, "method=qlora", override, f"trainer.run_dir={tmp_path / 'run'}"),
                     cwd=tmp_path, check=False)
    assert done.returncode == 2, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert message in last, last
