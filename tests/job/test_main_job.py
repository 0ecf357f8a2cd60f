"""The main job (`sftjax-train` with no dataset) end to end, shrunk to seconds: it builds the corpus, tasks,
tokenizer and base into a fresh cache, fine-tunes, and writes the report; a second run reuses the cached base.
The real settings (and their accuracy) are exercised by running the README's first command, not here."""

import json
import os
from pathlib import Path

from tests.train.conftest import run_train

SMALL = ("builtin.pretrain_steps=6", "builtin.pretrain_batch=4", "builtin.pretrain_seq_len=64",
         "builtin.train_examples=64", "builtin.eval_examples=4", "builtin.few_shot=2", "builtin.max_new_tokens=4",
         "trainer.max_steps=4", "optim.warmup_steps=1", "trainer.batch_size=4", "trainer.eval_every=2",
         "trainer.save_every=2", "trainer.devices=1", "trainer.progress=false")


def test_main_job_builds_trains_and_reports(tmp_path, monkeypatch):
    monkeypatch.setenv("SFTJAX_CACHE", str(tmp_path / "cache"))
    run = tmp_path / "run"
    done = run_train(*SMALL, f"hydra.run.dir={run}", cwd=tmp_path)
    out = done.stdout + done.stderr
    assert "pre-training the built-in base" in out and "built-in corpus:" in out
    assert "| task | test examples | base, zero-shot | base, 2-shot | fine-tuned |" in done.stdout
    assert "Held-out corpus loss (forgetting)" in done.stdout
    report = json.loads((run / "report.json").read_text())
    assert len(report["tasks"]) >= 3 and set(report["fine_tuned"]) == set(report["tasks"])
    assert all(0.0 <= v <= 1.0 for v in report["zero_shot"].values())
    assert "![loss_curves.png](loss_curves.png)" in (run / "report.md").read_text()
    for name in ("loss_curves.png", "accuracy.png"):
        assert (run / name).stat().st_size > 5000, name
    assert (run / "loss_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    config = json.loads((run / "config.json").read_text())
    assert config["method"]["name"] == "lora" and config["model"]["path"].endswith("/base")
    assert len(config["data"]["train"]) == len(report["tasks"])
    # Training watches the validation splits (eval loss, early stopping, sweeps); the report scores the test splits.
    assert [Path(d["path"]).name for d in config["data"]["eval"]] == [f"{t}_valid.jsonl" for t in report["tasks"]]
    assert report["split"] == "test"
    # conf/experiment/main.yaml's LoRA: rank-64 adapters on the 4 layers' 7 linears (155,648 a layer), and the
    # tied embedding [4096, 128] and the final norm [128] trained fully (`norm` names only the final one); the
    # linears' 786,432 weights and the layers' 8 norms stay frozen.
    numbers = report["numbers"]
    assert numbers["method"] == "lora" and numbers["trainable_params"] == 4 * 155_648 + 4096 * 128 + 128
    assert numbers["frozen_bytes"] == 4 * (786_432 + 8 * 128) and numbers["train_tokens_per_s"] > 0  # float32

    # Full fine-tuning on two of the tasks (in the order given), `add` drawn 3x as often per example, noise on
    # module prompts, scored on the validation splits.
    again = run_train(*SMALL, "method=full", "builtin.tasks=[add,module]", "builtin.upsample.add=3",
                      "builtin.prompt_noise.module=0.2", "builtin.report_split=valid",
                      f"hydra.run.dir={tmp_path / 'run2'}", cwd=tmp_path)
    assert "built-in base: reusing" in again.stdout + again.stderr
    config = json.loads((tmp_path / "run2" / "config.json").read_text())
    assert config["method"]["name"] == "full"
    train = config["data"]["train"]
    assert [d["name"] for d in train] == ["add", "module"]
    n_add, n_module = (len(Path(d["path"]).read_text().splitlines()) for d in train)
    assert (train[0]["weight"], train[1]["weight"]) == (3 * n_add, n_module)
    assert [d["prompt_noise"] for d in train] == [0.0, 0.2]
    assert json.loads((tmp_path / "run2" / "report.json").read_text())["tasks"] == ["add", "module"]
    assert "| task | valid examples |" in again.stdout
    assert json.loads((tmp_path / "run2" / "report.json").read_text())["split"] == "valid"

    # Objectives on the main job: `module` answered by a classification head (scored by the head's accuracy on the
    # same test examples), and distillation toward the cached base itself (objective.teacher=builtin).
    heads = run_train(*SMALL, "method=full", "objective=heads", "builtin.heads=[module]",
                      f"hydra.run.dir={tmp_path / 'heads'}", cwd=tmp_path)
    assert "| module | 4 |" in heads.stdout
    config = json.loads((tmp_path / "heads" / "config.json").read_text())
    module = next(d for d in config["data"]["train"] if d["name"] == "module")
    assert module["head"] and len(module["labels"]) >= 2 and module["labels"] == sorted(module["labels"])
    evals = [json.loads(x) for x in (tmp_path / "heads" / "metrics.jsonl").read_text().splitlines()]
    assert "module/accuracy" in evals[-1] and "module/ppl" not in evals[-1] and "add/ppl" in evals[-1]
    kd = run_train(*SMALL, "objective=distill", "objective.teacher=builtin", "objective.positions=all",
                   f"hydra.run.dir={tmp_path / 'kd'}", cwd=tmp_path)
    assert "Held-out corpus loss (forgetting)" in kd.stdout
    assert json.loads((tmp_path / "kd" / "config.json").read_text())["objective"]["teacher"].endswith("/base")
    assert "divergence" in json.loads((tmp_path / "kd" / "metrics.jsonl").read_text().splitlines()[-1])
    bad = run_train(*SMALL, "builtin.heads=[module]", f"hydra.run.dir={tmp_path / 'bad'}", cwd=tmp_path,
                    check=False)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[-1] == ("sftjax-train: error: builtin.heads=['module']: classification "
                                                   "heads need objective=heads")
    assert "pre-training the built-in base" not in again.stdout + again.stderr
    assert os.listdir(tmp_path / "cache")  # everything built lives under SFTJAX_CACHE
    # The corpus and tasks were parsed from the stdlib once and reused (their built.json names what they came
    # from); the compiled programs are kept for the next run (trainer.compile_cache, under SFTJAX_CACHE too).
    assert len(list((tmp_path / "cache").glob("corpus-*/built.json"))) == 1
    assert len(list((tmp_path / "cache").glob("builtin-*/tasks-*/built.json"))) == 1
    assert any((tmp_path / "cache" / "xla").iterdir())
    # The base's scores are kept per evaluation setting (3 test tasks; 2 validation tasks): a sweep scores it once.
    cached = sorted((tmp_path / "cache").glob("builtin-*/baselines/*.json"))
    assert len(cached) == 2 and {"zero_shot", "few_shot", "corpus_loss"} <= set(json.loads(cached[0].read_text()))
    numbers = json.loads((tmp_path / "run2" / "report.json").read_text())["numbers"]
    # Full fine-tuning trains all 1,311,872 parameters (embedding, linears, 9 norms) and freezes nothing.
    assert numbers["method"] == "full" and numbers["trainable_params"] == 4096 * 128 + 786_432 + 9 * 128
    assert numbers["frozen_bytes"] == 0


def test_a_bad_task_option_fails_in_one_line_before_building(tmp_path, monkeypatch):
    monkeypatch.setenv("SFTJAX_CACHE", str(tmp_path / "cache"))
    for bad, key in (("builtin.tasks=[add,nope]", "builtin.tasks='nope'"),
                     ("builtin.upsample.add=0", "builtin.upsample.add=0.0"),
                     ("builtin.prompt_noise.module=1.5", "builtin.prompt_noise.module=1.5"),
                     ("builtin.tasks=[add,add]", "builtin.tasks="),
                     ("builtin.report_split=train", "builtin.report_split='train'")):
        done = run_train(bad, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path, check=False)
        assert done.returncode == 2, done.stderr[-2000:]
        lines = done.stderr.strip().splitlines()
        assert key in lines[-1] and len(lines[-1].split("\n")) == 1, lines[-1]
        assert not (tmp_path / "cache").exists()  # nothing was built


def test_the_main_job_is_what_runs_without_a_dataset():
    from sftjax.cli.train import main_job_defaults

    assert main_job_defaults([]) == ["experiment=main"]
    assert main_job_defaults(["method=full"]) == ["method=full", "experiment=main"]
    assert main_job_defaults(["data.train=[{path:a.jsonl}]"]) == ["data.train=[{path:a.jsonl}]"]
    assert main_job_defaults(["experiment=optuna_lr"]) == ["experiment=optuna_lr"]


def test_the_base_cache_key_follows_the_settings_the_code_jax_and_the_machine(monkeypatch):
    """A cache built by other settings, by code with other pre-training numerics (BASE_RECIPE), by another jax or
    on another kind of machine (CPU vendor or vector width, backend) is never reused: each changes the directory
    name."""
    import dataclasses

    from sftjax.job.config import BuiltinSection
    from sftjax.job import base

    settings = BuiltinSection()

    def key(fingerprint="fingerprint", settings=settings):
        return base.base_key(base.base_key_parts(fingerprint, settings))

    first = key()
    assert first == key(settings=BuiltinSection()) and len(first) == 12
    assert key("other corpus") != first
    assert key(settings=dataclasses.replace(settings, pretrain_steps=7)) != first
    monkeypatch.setattr(base, "BASE_RECIPE", base.BASE_RECIPE + 1)
    assert key() != first
    monkeypatch.undo()
    monkeypatch.setattr(base.jax, "__version__", "0.0.1")
    assert key() != first
    monkeypatch.undo()
    host = base.numerics_host()
    backend, kind, machine, vendor, vector = host.split("/")
    assert backend == "cpu" and machine and vendor and vector  # the suite runs on CPU
    for other in (("OtherVendor", vector), (vendor, "other vector width")):
        monkeypatch.setattr(base, "_cpu_kind", lambda: other)
        assert base.numerics_host() != host and key() != first
        monkeypatch.undo()
    assert key() == first


def test_the_base_is_pre_trained_the_same_whatever_the_fine_tuning_sets(tmp_path):
    """The base's pre-training takes its recipe from BuiltinSection and its own defaults, never from the options
    of the fine-tuning that triggered it: a first `sftjax-train data.seed=1` on an empty cache used to pre-train
    another base (its data order) under the same cache key as `sftjax-train`."""
    from types import SimpleNamespace

    from sftjax.cli.common import compose_config
    from sftjax.job import base

    corpus = SimpleNamespace(train_path=tmp_path / "train.jsonl", heldout_path=tmp_path / "heldout.jsonl")

    def pretrain(overrides):
        cfg = compose_config(["experiment=main", *overrides])
        return base._pretrain_config(cfg.builtin, tmp_path, tmp_path / "init", corpus, cfg)

    default = pretrain([])
    assert default.data.seed == 0 and default.trainer.seed == 0 and default.objective == {"name": "sft"}
    assert not default.model.scan_layers and default.method.name == "full" and default.trainer.devices == 1
    changed = pretrain(["data.seed=1", "trainer.seed=3", "optim.b1=0.5", "optim.eps=1e-6", "model.scan_layers=true",
                        "model.remat=full", "model.dropout=0.1", "model.padding_free=true", "data.over_long=drop",
                        "data.pack_window=8", "method=qlora", "trainer.parallelism=fsdp", "trainer.grad_accum=2",
                        "trainer.batch_size=8", "optim.lr=1e-5", "data.seq_len=64", "objective=distill"])
    assert changed == default
