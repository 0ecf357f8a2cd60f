"""Knowledge distillation on the objective seam: the loss against its formula (in-process), then sftjax-train /
sftjax-eval end to end with an HF teacher and a run teacher, a resume with another teacher refused, and the bad
settings the issue names (one line, exit 2).

Tolerance: 1e-5 relative (float32 sums over a few dozen tokens; the formula side uses the same logits).
"""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sftjax
from sftjax.cli.eval import main as eval_main
from sftjax.errors import ConfigError
from sftjax.objectives import base, distill, sft
from tests.data.conftest import make_tokenizer_dir
from tests.model import hf_models
from tests.train.conftest import run_train

CFG = sftjax.ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=2,
                         num_kv_heads=1, head_dim=16)
RTOL = 1e-5
B, T = 3, 10


def _batch(seed=0):
    rng = np.random.RandomState(seed)
    tokens = rng.randint(0, 64, (B, T)).astype(np.int32)
    mask = (rng.rand(B, T) < 0.3).astype(np.float32)
    mask[0, -3:] = 1.0
    return {"tokens": tokens, "targets": np.roll(tokens, -1, axis=1), "loss_mask": mask,
            "segment_ids": np.ones((B, T), np.int32), "positions": np.tile(np.arange(T, dtype=np.int32), (B, 1)),
            "task_ids": rng.randint(0, 2, (B, T)).astype(np.int32)}


def _objective(**settings):
    context = base.Context(CFG, ("a", "b"))
    section = {"name": "distill", "teacher": "unused", **settings}
    return base.build(section, context).bind({"teacher": CFG})


@pytest.mark.parametrize("kind,beta,positions", [("forward_kl", 0.5, "trained"), ("reverse_kl", 0.5, "trained"),
                                                 ("jsd", 0.3, "trained"), ("jsd", 0.3, "all")])
def test_loss_is_the_formula(kind, beta, positions):
    """loss = sum over trained tokens of alpha T^2 D + (1 - alpha) CE, with the logits of both models; with the
    label_index path (logits at trained positions only) the sums are the same. positions=all: D at every token."""
    student = sftjax.init_params(CFG, jax.random.key(0))
    teacher = sftjax.init_params(CFG, jax.random.key(1))
    objective = _objective(alpha=0.3, temperature=2.0, divergence=kind, beta=beta, positions=positions)
    batch = _batch()
    logits = sftjax.forward(CFG, student, batch["tokens"])
    teacher_logits = sftjax.forward(CFG, teacher, batch["tokens"])
    nll, _ = sft.token_nll(logits, jnp.asarray(batch["targets"]))
    div = distill.divergence(logits, teacher_logits, kind, beta, 2.0)
    w = batch["loss_mask"]
    kd_w = w if positions == "trained" else np.ones_like(w)
    expected = float(np.sum(0.3 * 4.0 * np.asarray(div) * kd_w + 0.7 * np.asarray(nll) * w))
    for prepared in (batch, objective.prepare(batch)):
        sums = objective.sums(student, {"teacher": teacher}, {k: jnp.asarray(v) for k, v in prepared.items()}, None)
        np.testing.assert_allclose(float(sums["loss"]), expected, rtol=RTOL)
        np.testing.assert_allclose(float(sums["divergence"]), float(np.sum(np.asarray(div) * kd_w)), rtol=RTOL)
        assert float(sums["weight"]) == w.sum()
    # ~30% trained: the sparse path is exercised, except where D is taken at every token
    assert ("label_index" in objective.prepare(batch)) == (positions == "trained")


def test_limits_alpha_zero_is_sft_and_a_teacher_equal_to_the_student_costs_nothing():
    params = sftjax.init_params(CFG, jax.random.key(0))
    batch = {k: jnp.asarray(v) for k, v in _batch().items()}
    sft_loss = sft.SFT(CFG, ("a", "b")).sums(params, {}, batch, None)["loss"]
    np.testing.assert_allclose(float(_objective(alpha=0.0).sums(params, {"teacher": params}, batch, None)["loss"]),
                               float(sft_loss), rtol=RTOL)
    same = _objective(alpha=1.0, divergence="jsd").sums(params, {"teacher": params}, batch, None)
    assert abs(float(same["loss"])) < 1e-5


def test_metrics_name_ce_and_divergence_per_task():
    params = sftjax.init_params(CFG, jax.random.key(0))
    objective = _objective()
    metrics = objective.metrics(objective.sums(params, {"teacher": params}, {k: jnp.asarray(v) for k, v in
                                                                              _batch().items()}, None))
    expected = {"loss", "ce", "ppl", "accuracy", "divergence", "tokens", "a/ce", "b/divergence", "b/accuracy"}
    assert expected <= set(metrics)


@pytest.mark.parametrize("settings,message", [
    ({"alpha": 1.5}, "objective.alpha=1.5: must be in [0, 1]"),
    ({"temperature": 0.0}, "objective.temperature=0.0: must be > 0"),
    ({"temperature": -1}, "objective.temperature=-1.0: must be > 0"),
    ({"divergence": "kl"}, "objective.divergence='kl': must be one of forward_kl, reverse_kl, jsd"),
    ({"teacher": ""}, "objective.teacher: not set"),
    ({"alpha": "high"}, "objective.alpha='high': expected float"),
    ({"temprature": 2.0}, "objective.temprature: not a setting of objective distill"),
])
def test_bad_settings_one_line(settings, message):
    with pytest.raises(ConfigError) as e:
        base.build({"name": "distill", "teacher": "t", **settings}, base.Context(CFG, ("a",)))
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_unknown_objective_and_other_vocabulary():
    with pytest.raises(ConfigError, match=r"objective.name='kto': unknown objective \(known: distill, dpo, grpo, "
                                          r"heads, ppo, reward, sft\)"):
        base.build({"name": "kto"}, base.Context(CFG, ("a",)))
    objective = base.build({"name": "distill", "teacher": "t"}, base.Context(CFG, ("a",)))
    with pytest.raises(ConfigError, match="the teacher's vocabulary has 80 tokens, the student's 64"):
        objective.bind({"teacher": dataclasses.replace(CFG, vocab_size=80)})


# ----------------------------------------------------------------------------------------------------------------
# End to end

BASE = ("data.seq_len=64", "trainer.devices=1", "trainer.batch_size=4", "trainer.progress=false", "trainer=smoke",
        "trainer.num_samples=0", "data.eval_fraction=0.1")


@pytest.fixture(scope="module")
def teachers(workspace, tmp_path_factory):
    """Two teachers with the student's vocabulary (random, other seeds) and one with a larger vocabulary."""
    root = tmp_path_factory.mktemp("teachers")
    model_cfg = json.loads((workspace["model"] / "config.json").read_text())
    out = {}
    for name, seed, vocab in (("t1", 11, model_cfg["vocab_size"]), ("t2", 12, model_cfg["vocab_size"]),
                              ("wide", 13, model_cfg["vocab_size"] + 16)):
        hf_models.build(root / name, "llama", "gqa", seed=seed, vocab_size=vocab, tie_word_embeddings=False)
        out[name] = root / name
    # the student's vocabulary size, but another tokenizer (other special tokens: other ids)
    out["retok"] = make_tokenizer_dir(root, "llama3")
    hf_models.build(out["retok"], "llama", "gqa", seed=14, vocab_size=model_cfg["vocab_size"],
                    tie_word_embeddings=False)
    return out


@pytest.fixture(scope="module")
def distilled(workspace, teachers, tmp_path_factory):
    root = tmp_path_factory.mktemp("distill_run")
    run = root / "run"
    done = run_train(f"model={workspace['model']}", f"data={workspace['train']}", *BASE, "objective=distill",
                     f"objective.teacher={teachers['t1']}", "objective.divergence=jsd", f"trainer.run_dir={run}",
                     cwd=root)
    return run, done


def test_distill_run_logs_the_objective_metrics_and_resumes_only_with_its_teacher(distilled, workspace, teachers,
                                                                                  tmp_path):
    run, done = distilled
    assert "sftjax-train: done: step=4" in done.stdout
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    train = [x for x in lines if x["split"] == "train"]
    evals = [x for x in lines if x["split"] == "eval"]
    assert all(np.isfinite(x["loss"]) and x["divergence"] > 0 and np.isfinite(x["ce"]) for x in train)
    assert evals and {"loss", "ce", "divergence", "arith/divergence"} <= set(evals[-1])
    extras = json.loads((run / "checkpoints" / "4" / "extras" / "metadata").read_text())
    assert extras["reference_fingerprints"]["teacher"].startswith("sha256:")
    other = run_train(f"model={workspace['model']}", f"data={workspace['train']}", *BASE, "objective=distill",
                      f"objective.teacher={teachers['t2']}", "objective.divergence=jsd", "trainer.max_steps=6",
                      f"trainer.run_dir={run}", cwd=tmp_path, check=False)
    assert other.returncode == 2
    assert "refusing to resume with another teacher" in other.stderr.strip().splitlines()[-1]


def test_a_run_directory_as_teacher_and_sftjax_eval(distilled, workspace, tmp_path, capsys):
    run, _ = distilled
    student = tmp_path / "student"
    run_train(f"model={workspace['model']}", f"data={workspace['train']}", *BASE, "objective=distill",
              f"objective.teacher={run}", "trainer.max_steps=2", f"trainer.run_dir={student}", cwd=tmp_path)
    assert eval_main(["--run", str(run), "--json", "--max-new-tokens", "0"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert {"loss", "ce", "ppl", "divergence", "accuracy", "tokens"} <= set(result["overall"])
    assert result["tasks"]["arith"]["divergence"] > 0


@pytest.mark.parametrize("override,message", [
    ("objective.teacher={missing}", "objective.teacher='{missing}': no such directory"),
    ("objective.teacher={wide}", "the teacher's vocabulary has"),
    ("objective.teacher={retok}", "objective.teacher='{retok}': its tokenizer ({retok}/tokenizer.json"),
    ("objective.teacher={broken}", "objective.teacher='{broken}': {broken}"),
    ("objective.alpha=2", "objective.alpha=2.0: must be in [0, 1]"),
    ("objective.temperature=0", "objective.temperature=0.0: must be > 0"),
    ("objective=nope", "Could not find 'objective/nope'"),
])
def test_bad_input_one_line_exit_2(override, message, workspace, teachers, tmp_path):
    broken = tmp_path / "broken_teacher"  # a config.json and no weights: does not load
    broken.mkdir()
    (broken / "config.json").write_text((teachers["t1"] / "config.json").read_text())
    paths = {"missing": str(tmp_path / "no_teacher"), "wide": str(teachers["wide"]), "retok": str(teachers["retok"]),
             "broken": str(broken)}
    args = [f"model={workspace['model']}", f"data={workspace['train']}", *BASE, f"trainer.run_dir={tmp_path / 'r'}"]
    if not override.startswith("objective="):
        args += ["objective=distill", f"objective.teacher={teachers['t1']}"]
    done = run_train(*args, override.format(**paths), cwd=tmp_path, check=False)
    assert done.returncode == 2, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert message.format(**paths) in last and "Traceback" not in done.stderr
    assert not (tmp_path / "r" / "checkpoints").exists()
