"""Step 1 of the main job: a small base model pre-trained from scratch on the built-in corpus, built once and cached.

    cache_dir/builtin-py3.11-<key>/
        corpus/      corpus_train.jsonl, corpus_heldout.jsonl, corpus.json  (sftjax.data.builtin.corpus)
        tasks-<n>/   <task>_{train,valid,test}.jsonl (n train examples)  (sftjax.data.builtin.tasks)
        pretrain/    the pre-training run (sftjax's own loop: metrics.jsonl, checkpoints/; resumable)
        base/        the pre-trained base as an HF directory: config.json, model.safetensors, tokenizer files

<key> hashes the corpus fingerprint, every setting that changes the base (architecture, vocabulary, steps,
batch, learning rate), the jax version, BASE_RECIPE (the version of the code's pre-training numerics) and the kind
of machine that computes it (`numerics_host`), so a changed setting, a new jax, a change of the code's numerics or
a cache directory shared with another kind of machine builds a new base instead of reusing one that this machine
would not have built.
A directory counts as built only when its `done.json` is written, last; an interrupted build resumes (the
pre-training run resumes from its latest checkpoint).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import platform
import sys
from pathlib import Path

import jax

from sftjax.config import TrainConfig
from sftjax.data.builtin import corpus as corpus_lib
from sftjax.data.builtin import tasks as tasks_lib
from sftjax.data.pipeline import DatasetSpec
from sftjax.data.tokenizer import train_bpe_tokenizer
from sftjax.job.config import BuiltinSection, JobConfig
from sftjax.model.config import ATTENTION_BLOCK, ModelConfig, to_hf_dict
from sftjax.model.hf import save_pretrained
from sftjax.model.transformer import init_params

log = logging.getLogger("sftjax")

# The version of the base that given settings pre-train: bump it with any code change that alters that base, float
# rounding included, so that a cache built by older code is never reused as if today's code had built it (the
# main job's figures would then differ from a fresh machine's). 2: the attention backward pass of 338b58f, whose
# rounding gave a base 0.003 nats apart and a report ~3 points apart.
BASE_RECIPE = 2


def base_config(vocab_size: int, num_layers: int = 4) -> ModelConfig:
    """The base: a 4-layer Llama (D 128, 4 query / 2 key-value heads, FFN 384, tied embeddings): 1.3M parameters
    at a 4096 vocabulary, small enough to pre-train in minutes on a 2-core CPU. num_layers (builtin.base_layers):
    a shallower base of the same width, e.g. a distillation student (2 layers: 0.9M parameters)."""
    return ModelConfig(family="llama", vocab_size=vocab_size, hidden_size=128, intermediate_size=384,
                       num_layers=num_layers,
                       num_heads=4, num_kv_heads=2, head_dim=32, max_position_embeddings=2048,
                       tie_word_embeddings=True, rope_theta=10000.0, rms_norm_eps=1e-5,
                       bos_token_id=1, eos_token_ids=(2,), pad_token_id=0)


def numerics_host() -> str:
    """The kind of machine, as far as it decides the base's float rounding: jax's backend and device kind, the
    CPU's architecture and vendor and its widest vector instructions, e.g. "cpu/cpu/x86_64/AuthenticAMD/avx512".

    The same program pre-trains another base where XLA picks other kernels: on CPU, Intel and AMD hosts gave two
    bases, and an AMD host without AVX-512 a third (other bytes, other held-out losses:
    experiments/main_recipe/README.md), while hosts of one vendor and one vector width gave the same bytes. A home
    directory shared by two such machines, or by a GPU and a CPU node, then keeps one base per kind instead of
    handing one machine's base to the other.
    """
    device = jax.devices()[0]
    vendor, vector = _cpu_kind()
    return "/".join([jax.default_backend(), device.device_kind, platform.machine(), vendor, vector])


def _cpu_kind() -> tuple[str, str]:
    """(vendor, widest vector extension) as Linux names them in /proc/cpuinfo ("vendor_id", e.g. GenuineIntel;
    "flags": avx512f, else avx2, else "-"); elsewhere (platform.processor(), "-")."""
    try:
        first = Path("/proc/cpuinfo").read_text().split("\n\n")[0]  # the first processor's block
        fields = dict(line.split(":", 1) for line in first.splitlines() if ":" in line)
    except OSError:
        return platform.processor(), "-"
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    flags = set(fields.get("flags", "").split())
    vector = next((f for f in ("avx512f", "avx2") if f in flags), "-")
    return fields.get("vendor_id", platform.processor()), vector


@dataclasses.dataclass
class Builtin:
    """Where the built-in corpus, tasks and base are, once built."""

    root: Path
    corpus: corpus_lib.CorpusInfo
    tasks: dict[str, tasks_lib.TaskFiles]
    base_dir: Path
    pretrain_dir: Path


def _write_done(path: Path, info: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)


def _built_once(directory: Path, key: list, build, load):
    """build(directory) the first time for `key`; later, load(directory) what it wrote. The key is recorded in
    directory/built.json, written last (and removed before a build), so an interrupted build is built again."""
    marker = directory / "built.json"
    try:
        if json.loads(marker.read_text()) == {"key": key}:
            return load(directory)
    except (OSError, ValueError, KeyError, TypeError):  # no marker, or files missing or unreadable: build
        pass
    marker.unlink(missing_ok=True)
    out = build(directory)
    _write_done(marker, {"key": key})
    return out


def _pretrain_config(settings: BuiltinSection, root: Path, model_dir: Path, corpus: corpus_lib.CorpusInfo,
                     template: TrainConfig) -> TrainConfig:
    """A full-fine-tuning run from random init on the corpus text (every token trained). Its numerics are the
    base's recipe (BASE_RECIPE), whatever the fine-tuning sets: float32, no dropout, the default attention block,
    the layers unrolled, no remat, every slot computed (model.padding_free=false: its rows are ~81% real, and the
    padding-free layers round differently), the data and optimizer options at their defaults, data order and
    training seed 0: a setting that changes the data or the rounding would make a base other than the one the cache
    key names (`sftjax-train data.seed=1` on an empty cache built another base, under the same key, before).
    From the template only what does not touch the numbers: where and how the run reports and caches."""
    cfg = dataclasses.replace(template)
    cfg.model = dataclasses.replace(template.model, path=str(model_dir), tokenizer=None, dropout=0.0,
                                    dtype="float32", param_dtype="float32", attention_block=ATTENTION_BLOCK,
                                    padding_free=False, scan_layers=False, remat="none")
    cfg.method = dataclasses.replace(template.method, name="full")
    cfg.objective = {"name": "sft"}  # next-token loss on every token, whatever objective the fine-tuning uses
    corpus_spec = functools.partial(DatasetSpec, format="text", name="corpus")
    cfg.data = dataclasses.replace(type(template.data)(), train=[corpus_spec(path=str(corpus.train_path))],
                                   eval=[corpus_spec(path=str(corpus.heldout_path))], eval_fraction=0.0,
                                   seq_len=settings.pretrain_seq_len, mask="all", packing="bfd", chat_template=None)
    cfg.optim = dataclasses.replace(type(template.optim)(), name="adamw", lr=settings.pretrain_lr, weight_decay=0.1,
                                    b2=0.99, schedule="cosine", warmup_steps=min(50, settings.pretrain_steps // 10),
                                    min_lr_ratio=0.1, max_grad_norm=1.0)
    steps = settings.pretrain_steps
    cfg.trainer = dataclasses.replace(template.trainer, max_steps=steps, batch_size=settings.pretrain_batch,
                                      grad_accum=1, devices=1, seed=0, parallelism="data",
                                      log_every=max(steps // 20, 1), eval_every=max(steps // 4, 1), eval_batches=8,
                                      num_samples=0, save_every=100, keep_last=1, keep_best=0, best_metric="eval/loss",
                                      patience=0, resume="auto", run_dir=str(root / "pretrain"))
    return cfg


def base_key_parts(corpus_fingerprint: str, settings: BuiltinSection) -> list:
    """Everything that shapes the cached base (module docstring); written into its done.json."""
    arch = base_config(settings.vocab_size, settings.base_layers)
    return [corpus_fingerprint, json.dumps(to_hf_dict(arch), sort_keys=True, default=str),
            settings.vocab_size, settings.pretrain_steps, settings.pretrain_batch, settings.pretrain_seq_len,
            settings.pretrain_lr, BASE_RECIPE, jax.__version__, numerics_host()]


def base_key(parts: list) -> str:
    """12 hex digits naming the cached base: a hash of its base_key_parts."""
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:12]


def ensure_builtin(template: JobConfig) -> Builtin:
    """Build (or reuse) the corpus, the tasks, the tokenizer and the pre-trained base under builtin.cache_dir."""
    from sftjax.train.loop import run_training  # the loop imports the model stack: only when needed

    settings = template.builtin
    cache = Path(settings.cache_dir).expanduser()
    version = f"py{sys.version_info.major}.{sys.version_info.minor}"
    # Records of at most ~3/4 of a pre-training row (3.3 characters per token of a corpus-trained BPE): little
    # truncation, and best-fit decreasing packs shorter records into the space left, so more of the token slots
    # are trained than with records of a whole row packed greedily (experiments/main_recipe/README.md).
    record_chars = int(0.75 * 3.3 * settings.pretrain_seq_len)
    # Corpus and tasks are parsed from the stdlib once and reused while their sources are unchanged.
    sources = corpus_lib.sources_digest()
    corpus = _built_once(cache / f"corpus-{version}", [sources, record_chars],
                         lambda d: corpus_lib.build_corpus(d, record_chars=record_chars), corpus_lib.load_corpus)
    arch = base_config(settings.vocab_size, settings.base_layers)
    key_parts = base_key_parts(corpus.fingerprint, settings)
    root = cache / f"builtin-{version}-{base_key(key_parts)}"
    base_dir, done = root / "base", root / "done.json"
    tasks = _built_once(root / f"tasks-{settings.train_examples}", [sources, corpus.fingerprint],
                        lambda d: tasks_lib.build_tasks(d, seed=0, heldout_modules=corpus.heldout_modules,
                                                        n_train=settings.train_examples), tasks_lib.load_tasks)
    if done.is_file():
        log.info("built-in base: reusing %s (corpus %s, Python %s)", base_dir, corpus.fingerprint[:12],
                 corpus.python_version)
        return Builtin(root, corpus, tasks, base_dir, root / "pretrain")

    log.info("built-in corpus: %d modules, %d docstrings and comment blocks, %.2f M characters (Python %s, "
             "fingerprint %s)", corpus.n_modules["train"], corpus.n_docs["train"], corpus.n_chars["train"] / 1e6,
             corpus.python_version, corpus.fingerprint)
    model_dir = root / "init"
    if not (model_dir / "config.json").is_file():
        texts = (json.loads(line)["text"] for line in corpus.train_path.read_text().splitlines())
        tokenizer = train_bpe_tokenizer(texts, settings.vocab_size, chat_template=None)
        params = init_params(arch, jax.random.key(0))
        model_dir.mkdir(parents=True, exist_ok=True)
        tokenizer.save(model_dir)
        save_pretrained(model_dir, arch, params, overwrite=True)
    log.info("pre-training the built-in base (%.2fM parameters, %d steps of %d x %d tokens) in %s",
             arch.num_params() / 1e6, settings.pretrain_steps, settings.pretrain_batch, settings.pretrain_seq_len,
             root / "pretrain")
    cfg = _pretrain_config(settings, root, model_dir, corpus, template)
    run_training(cfg)
    export_final(cfg, base_dir)
    _write_done(done, {"corpus": corpus.fingerprint, "python": corpus.python_version, "key_parts": key_parts})
    return Builtin(root, corpus, tasks, base_dir, root / "pretrain")


def export_final(cfg: TrainConfig, out: Path) -> None:
    """The pre-training run's last checkpoint as an HF directory with the tokenizer files."""
    from sftjax.cli.export import tokenizer_files
    from sftjax.train.setup import build_model, restore_checkpoint

    model = build_model(cfg)
    trainable, _ = restore_checkpoint(cfg, Path(cfg.trainer.run_dir) / "checkpoints", model)
    save_pretrained(out, model.cfg, trainable, overwrite=True,
                    extra_files=tokenizer_files(cfg.model.path))
