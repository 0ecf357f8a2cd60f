"""sftjax-eval in-process: a base model against an independent loss and exact-match computation, a training run's
checkpoints against the metrics the run logged, and one-line user errors."""

import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

import sftjax
from sftjax.cli.eval import main
from sftjax.data.pipeline import DataConfig, DatasetSpec, prepare
from sftjax.data.tokenizer import load_tokenizer
from sftjax.objectives.sft import token_nll
from tests.model import hf_models
from tests.train.conftest import run_train

SEQ_LEN = 64
RTOL = 1e-5  # float32 sums of a few hundred token losses, packed rows vs one example at a time


def _eval_json(capsys, *argv):
    assert main([*argv, "--json"]) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


@pytest.fixture(scope="module")
def run(workspace, tmp_path_factory):
    """4 steps with a 10% held-out split, evaluated and saved at steps 2 and 4 (both kept)."""
    root = tmp_path_factory.mktemp("eval_run")
    run_dir = root / "run"
    run_train(f"model={workspace['model']}", f"data={workspace['train']}", f"data.seq_len={SEQ_LEN}",
              "data.eval_fraction=0.1", "trainer.devices=1", "trainer.batch_size=4", "trainer.progress=false",
              "trainer.max_steps=4", "trainer.save_every=2", "trainer.eval_every=2", "trainer.eval_batches=0",
              "trainer.num_samples=0", "optim.lr=3e-3", f"trainer.run_dir={run_dir}", cwd=root)
    return run_dir


def _reference_loss(model_dir, path, max_examples):
    """Mean NLL and accuracy over the trained tokens, one unpacked example at a time through sftjax.forward."""
    cfg, params = sftjax.load_pretrained(model_dir)
    tok = load_tokenizer(model_dir)
    examples = prepare(DataConfig(datasets=[DatasetSpec(str(path))], seq_len=SEQ_LEN), tok).datasets[0][:max_examples]
    # Right-padded to one length (causal attention: padding after a token does not change its logits).
    tokens = np.zeros((len(examples), max(len(ex.tokens) for ex in examples)), np.int32)
    weight = np.zeros(tokens.shape, np.float64)
    for i, ex in enumerate(examples):
        tokens[i, :len(ex.tokens)] = ex.tokens
        weight[i, :len(ex.tokens)] = ex.mask  # mask[i]: token i is a trained target, predicted at i - 1
    nll, hit = token_nll(sftjax.forward(cfg, params, jnp.asarray(tokens[:, :-1])), jnp.asarray(tokens[:, 1:]))
    weight = weight[:, 1:]
    count = weight.sum()
    return float(np.sum(np.asarray(nll, np.float64) * weight) / count), float(np.sum(hit * weight) / count), count


def _greedy_answers(model_dir, questions, max_new_tokens):
    """The base model's greedy answer text to each question, cut at EOS and stripped: what exact match compares."""
    cfg, params = sftjax.load_pretrained(model_dir)
    tok = load_tokenizer(model_dir)
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True)
               for q in questions]
    answers = []
    for ids in sftjax.generate(cfg, params, prompts, max_new_tokens, eos_token_ids=(tok.eos_id,)):
        ids = ids[:ids.index(tok.eos_id)] if tok.eos_id in ids else ids
        answers.append(tok.decode(ids, skip_special_tokens=True).strip())
    return answers


def test_base_model_matches_an_independent_computation(workspace, tmp_path, capsys):
    model = workspace["model"]
    questions = ["1+1=", "7+30=", "2+2=", "9+9="]
    greedy = _greedy_answers(model, questions, max_new_tokens=4)
    # Two answers are the model's own greedy text (hits), two are not (misses): exact match 2 / 4.
    answers = greedy[:2] + [g + " nope" for g in greedy[2:]]
    echo = tmp_path / "echo.jsonl"
    echo.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q},
                                                     {"role": "assistant", "content": a}]}) + "\n"
                            for q, a in zip(questions, answers)))
    result = _eval_json(capsys, "--model", str(model), "--data", str(workspace["eval"]), "--data", str(echo),
                        "--max-examples", "12", "--max-new-tokens", "4", f"data.seq_len={SEQ_LEN}")
    assert result["run"] is None and result["step"] is None and list(result["tasks"]) == ["arith_eval", "echo"]
    arith, echo_task, overall = result["tasks"]["arith_eval"], result["tasks"]["echo"], result["overall"]
    assert (arith["examples"], echo_task["examples"], overall["examples"]) == (12, 4, 16)

    loss, accuracy, tokens = _reference_loss(model, workspace["eval"], 12)
    assert arith["tokens"] == tokens
    np.testing.assert_allclose([arith["loss"], arith["accuracy"]], [loss, accuracy], rtol=RTOL)
    assert arith["ppl"] == pytest.approx(np.exp(arith["loss"]), rel=RTOL)
    echo_loss, _, echo_tokens = _reference_loss(model, echo, 4)
    assert overall["tokens"] == tokens + echo_tokens
    np.testing.assert_allclose(overall["loss"], (loss * tokens + echo_loss * echo_tokens) / (tokens + echo_tokens),
                               rtol=RTOL)

    assert echo_task["exact_match"] == 0.5
    assert overall["exact_match"] == pytest.approx((arith["exact_match"] * 12 + 2) / 16)


def _logged_eval(run_dir, step):
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record["split"] == "eval" and record["step"] == step:
            return record
    raise AssertionError(f"no eval line at step {step}")


def test_run_checkpoints_match_the_runs_own_eval(run, tmp_path, capsys):
    final = json.loads((run / "final_metrics.json").read_text())
    latest = _eval_json(capsys, "--run", str(run), "--max-new-tokens", "2")
    assert latest["step"] == 4 and list(latest["tasks"]) == ["arith"] and latest["overall"]["examples"] == 20
    np.testing.assert_allclose([latest["overall"]["loss"], latest["tasks"]["arith"]["loss"]],
                               [final["eval/loss"], final["eval/arith/loss"]], rtol=RTOL)
    assert latest["overall"]["accuracy"] == pytest.approx(final["eval/accuracy"], rel=RTOL)

    step2 = _eval_json(capsys, "--run", str(run), "--step", "2", "--max-new-tokens", "0")
    assert step2["step"] == 2 and step2["overall"]["exact_match"] is None
    assert step2["overall"]["loss"] == pytest.approx(_logged_eval(run, 2)["loss"], rel=RTOL)
    assert abs(step2["overall"]["loss"] - latest["overall"]["loss"]) > 1e-3

    best = min((2, 4), key=lambda s: _logged_eval(run, s)["loss"])
    output = tmp_path / "best.json"
    assert main(["--run", str(run), "--best", "--max-new-tokens", "0", "--output", str(output)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert f"step {best})" in table[0] and table[1].split()[:3] == ["task", "examples", "tokens"]
    assert [line.split()[0] for line in table[2:]] == ["arith", "overall"]
    written = json.loads(output.read_text())
    assert written["step"] == best and f"{written['overall']['loss']:.4f}" in table[-1]


def test_user_errors_are_one_line(workspace, run, tmp_path, capsys):
    other_base = tmp_path / "other"
    shutil.copytree(workspace["model"], other_base)
    model = hf_models.load_hf(other_base)
    hf_models.randomize_(model, seed=99)  # same architecture, other weights
    model.save_pretrained(other_base)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(workspace["eval"].read_text().splitlines()[0] + "\n{not json\n")
    existing = tmp_path / "exists.json"
    existing.write_text("{}\n")
    capsys.readouterr()  # transformers' progress bars
    cases = [
        (["--run", str(tmp_path / "missing")], "not a training run directory (no config.json)"),
        (["--run", str(run), "--step", "3"], "no checkpoint at step 3 (saved steps: [2, 4])"),
        (["--run", str(run), f"model.path={other_base}"], "refusing to resume on a different base"),
        (["--run", str(run), "--data", str(tmp_path / "nope.jsonl")], "nope.jsonl: file not found"),
        (["--model", str(workspace["model"]), "--data", str(bad)], f"{bad}:2: invalid JSON"),
        (["--run", str(run), "--output", str(existing)], "exists.json: already exists; not overwriting it"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        captured = capsys.readouterr()
        assert captured.out == "" and captured.err.count("\n") == 1, captured.err
        assert captured.err.startswith("sftjax-eval: error: ") and message in captured.err, captured.err
    assert existing.read_text() == "{}\n"
