"""Multi-task heads on the objective seam: the head loss against `classify` on each example alone (in-process),
then a LoRA run with a head task beside a text task through sftjax-train, sftjax-eval and sftjax-export (the
exported sequence-classification checkpoint gives transformers the same logits), and the bad inputs.

Tolerances: 1e-5 relative for sums of float32 cross-entropies; 1e-4 absolute on logits against transformers
(float32, highest matmul precision: tests/conftest.py).
"""

import json
import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import sftjax
from sftjax.cli.eval import main as eval_main
from sftjax.cli.export import main as export_main
from sftjax.data.tokenizer import load_tokenizer
from sftjax.objectives import base
from sftjax.objectives.heads import head_index
from tests.train.conftest import run_train

CFG = sftjax.ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=2,
                         num_kv_heads=1, head_dim=16)
RTOL = 1e-5


def test_head_index_pads_to_a_power_of_two():
    ids = -np.ones((2, 3, 4), np.int32)  # [accum, B, T]
    ids[0, 1, 3], ids[1, 0, 0], ids[1, 2, 2] = 2, 0, 1
    index = head_index(ids)
    assert index.shape == (2, 8)
    np.testing.assert_array_equal(index[0], [7, -1, -1, -1, -1, -1, -1, -1])
    np.testing.assert_array_equal(index[1, :2], [0, 10])


def test_head_loss_equals_each_example_alone():
    """Two head examples and one text example packed in one row: the head sums equal the cross-entropy of
    `classify` on each head example alone; the text example's loss is SFT's."""
    objective = base.build({"name": "heads"}, base.Context(CFG, ("lm", "topic", "mood"),
                                                           (None, ("a", "b", "c"), ("x", "y"))))
    params = {**sftjax.init_params(CFG, jax.random.key(0)), **objective.init(jax.random.key(1))}
    rng = np.random.RandomState(0)
    lengths, tasks, classes = [5, 4, 6], [1, 0, 2], [2, -1, 1]
    T = 16
    row = {k: np.zeros((1, T), np.int32) for k in ("tokens", "targets", "segment_ids", "positions")}
    row.update(loss_mask=np.zeros((1, T), np.float32), task_ids=-np.ones((1, T), np.int32),
               class_ids=-np.ones((1, T), np.int32))
    examples, offset = [], 0
    for segment, (n, task, cls) in enumerate(zip(lengths, tasks, classes), start=1):
        tokens = rng.randint(3, 64, n).astype(np.int32)
        sl = slice(offset, offset + n)
        row["tokens"][0, sl], row["segment_ids"][0, sl], row["positions"][0, sl] = tokens, segment, np.arange(n)
        row["task_ids"][0, sl] = task
        if cls >= 0:
            row["class_ids"][0, offset + n - 1] = cls
        else:
            row["targets"][0, offset:offset + n - 1] = tokens[1:]
            row["loss_mask"][0, offset + 1:offset + n - 1] = 1.0
        examples.append(tokens)
        offset += n
    sums = objective.sums(params, {}, {k: jnp.asarray(v) for k, v in objective.prepare(row).items()}, None)
    expected = {}
    for tokens, task, cls in zip(examples, tasks, classes):
        if cls < 0:
            continue
        kernel = params["heads"][objective.tasks[task]]["kernel"]
        logits = sftjax.classify(CFG, params, kernel, tokens[None], np.ones((1, len(tokens)), np.int32))[0]
        expected[task] = float(jax.nn.logsumexp(logits) - logits[cls])
    np.testing.assert_allclose(float(sums["head_loss"]), sum(expected.values()), rtol=RTOL)
    np.testing.assert_allclose(np.asarray(sums["task_head_loss"])[[1, 2]], [expected[1], expected[2]], rtol=RTOL)
    assert float(sums["examples"]) == 2 and float(sums["weight"]) == 2 + row["loss_mask"].sum()
    metrics = objective.metrics(jax.tree.map(np.asarray, sums))
    assert {"topic/accuracy", "mood/loss", "lm/loss", "head_accuracy"} <= set(metrics)
    assert "topic/ppl" not in metrics and "lm/examples" not in metrics


# ----------------------------------------------------------------------------------------------------------------
# End to end

WORDS = {"red": "warm", "orange": "warm", "blue": "cold", "green": "cold", "grey": "dull", "brown": "dull"}


def _write_topics(path, n, seed, extra_label=None):
    """Prompts naming a colour; the class (warm / cold / dull) follows from the colour: learnable in a few steps."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            colour = rng.choice(sorted(WORDS))
            label = extra_label if extra_label and i == n - 1 else WORDS[colour]
            f.write(json.dumps({"prompt": f"the colour {colour} is", "label": label}) + "\n")
    return path


@pytest.fixture(scope="module")
def heads_run(workspace, tmp_path_factory):
    root = tmp_path_factory.mktemp("heads")
    topics = _write_topics(root / "topics.jsonl", 120, seed=0)
    topics_eval = _write_topics(root / "topics_eval.jsonl", 24, seed=1)
    run = root / "run"
    data = (f"data.train=[{{path:'{topics}',head:true}},{{path:'{workspace['train']}'}}]",
            f"data.eval=[{{path:'{topics_eval}'}},{{path:'{workspace['eval']}'}}]")
    run_train(f"model={workspace['model']}", *data, "objective=heads", "method=lora", "method.lora.rank=8",
              "data.seq_len=64", "trainer.devices=1", "trainer.batch_size=8", "trainer.progress=false",
              "trainer.max_steps=30", "trainer.eval_every=15", "trainer.save_every=15", "trainer.log_every=5",
              "trainer.num_samples=1", "optim.lr=1e-2", f"trainer.run_dir={run}", cwd=root)
    return {"root": root, "run": run, "topics_eval": topics_eval, "data": data}


def test_heads_run_logs_per_task_metrics_and_learns(heads_run):
    run = heads_run["run"]
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    train = [x for x in lines if x["split"] == "train"]
    evals = [x for x in lines if x["split"] == "eval"]
    assert {"topics/loss", "topics/accuracy", "topics/examples", "arith/loss", "arith/ppl"} <= set(train[-1])
    assert "topics/ppl" not in train[-1] and "arith/examples" not in train[-1]
    # chance is 1/3; the head learns the colour -> class rule (0.46 -> 0.79 on the held-out prompts in 30 steps)
    assert evals[-1]["topics/accuracy"] >= 0.75 and evals[-1]["topics/loss"] < 0.8 * evals[0]["topics/loss"]
    assert json.loads((run / "config.json").read_text())["data"]["train"][0]["labels"] == ["cold", "dull", "warm"]


def test_sftjax_eval_reports_the_head(heads_run, capsys):
    """sftjax-eval on the run's final checkpoint gives the head metrics the run logged at its final evaluation."""
    assert eval_main(["--run", str(heads_run["run"]), "--json", "--max-new-tokens", "4"]) == 0
    result = json.loads(capsys.readouterr().out)
    topics = result["tasks"]["topics"]
    logged = [json.loads(x) for x in (heads_run["run"] / "metrics.jsonl").read_text().splitlines()][-1]
    assert logged["split"] == "eval" and logged["step"] == result["step"] == 30
    assert topics["accuracy"] == logged["topics/accuracy"] and topics["examples"] == 24 and "ppl" not in topics
    np.testing.assert_allclose(topics["loss"], logged["topics/loss"], rtol=RTOL)
    assert topics["exact_match"] is None and result["tasks"]["arith"]["exact_match"] is not None
    assert type(topics["examples"]) is int and result["overall"]["examples"] == 24 + 20  # every example counted
    assert eval_main(["--run", str(heads_run["run"]), "--max-new-tokens", "0"]) == 0
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()[2:]}
    assert rows["topics"][1:4] == ["24", "-", f"{topics['loss']:.4f}"] and rows["overall"][1] == "44"


def test_export_writes_the_heads_and_a_sequence_classifier_transformers_agrees_with(heads_run, workspace, tmp_path):
    run = heads_run["run"]
    assert export_main(["--run", str(run), "--out", str(tmp_path / "merged")]) == 0
    heads = sftjax.load_heads(tmp_path / "merged")
    assert list(heads) == ["topics"] and heads["topics"][1] == ["cold", "dull", "warm"]
    assert heads["topics"][0].shape == (64, 3)
    assert export_main(["--run", str(run), "--format", "peft", "--out", str(tmp_path / "adapter")]) == 0
    beside_adapter = sftjax.load_heads(tmp_path / "adapter")  # the heads go beside a PEFT adapter too
    np.testing.assert_array_equal(beside_adapter["topics"][0], heads["topics"][0])
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    assert export_main(["--run", str(run), "--head", "topics", "--out", str(tmp_path / "clf")]) == 0
    cfg, params, kernel, classes = sftjax.load_classifier(tmp_path / "clf")
    np.testing.assert_array_equal(kernel, heads["topics"][0])
    tok = load_tokenizer(workspace["model"])
    ids = [tok.encode(f"the colour {c} is", add_special_tokens=True) for c in ("red", "blue", "grey")]
    width = max(map(len, ids))
    pad = tok.pad_id if tok.pad_id is not None else tok.eos_id
    tokens = np.array([x + [pad] * (width - len(x)) for x in ids], np.int32)
    segments = np.array([[1] * len(x) + [0] * (width - len(x)) for x in ids], np.int32)
    ours = np.asarray(sftjax.classify(cfg, params, kernel, tokens, segments))
    model = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "clf",
                                                                            attn_implementation="eager").eval()
    with torch.no_grad():
        theirs = model(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(segments)).logits.numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-4)
    assert model.config.id2label == {0: "cold", 1: "dull", 2: "warm"}


def test_objective_heads_alone_gives_every_dataset_a_head(heads_run, workspace, tmp_path):
    """objective=heads with one dataset and no declaration: a head on it; on a 4-bit (QLoRA) trunk."""
    run = tmp_path / "run"
    run_train(f"model={workspace['model']}", f"data={heads_run['root'] / 'topics.jsonl'}", "objective=heads",
              "method=qlora", "method.lora.rank=8",
              "data.seq_len=64", "trainer.devices=1", "trainer.batch_size=4", "trainer.progress=false",
              "trainer.max_steps=2", "trainer.num_samples=0", f"trainer.run_dir={run}", cwd=tmp_path)
    section = json.loads((run / "config.json").read_text())["data"]["train"][0]
    assert section["head"] and section["labels"] == ["cold", "dull", "warm"]
    line = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert "topics/accuracy" in line and "topics/ppl" not in line


@pytest.mark.parametrize("case", ["unknown_eval_label", "no_label"])
def test_bad_head_data_one_line_exit_2(case, heads_run, workspace, tmp_path):
    root = heads_run["root"]
    topics = root / "topics.jsonl"
    if case == "unknown_eval_label":
        bad = _write_topics(tmp_path / "topics_eval.jsonl", 5, seed=2, extra_label="hot")
        data = (f"data.train=[{{path:'{topics}',head:true}}]", f"data.eval=[{{path:'{bad}'}}]")
        message = f"{bad}:5: label 'hot' is not one of the classes"
    else:
        bad = tmp_path / "nolabel.jsonl"
        bad.write_text(json.dumps({"prompt": "the colour red is", "completion": "  "}) + "\n")
        data = (f"data.train=[{{path:'{bad}',head:true}}]",)
        message = f"{bad}:1: no label"
    done = run_train(f"model={workspace['model']}", *data, "objective=heads", "data.seq_len=64", "trainer.devices=1",
                     "trainer.batch_size=4", "trainer.progress=false", f"trainer.run_dir={tmp_path / 'r'}",
                     cwd=tmp_path, check=False)
    assert done.returncode == 2, done.stderr[-2000:]
    assert message in done.stderr.strip().splitlines()[-1] and "Traceback" not in done.stderr
