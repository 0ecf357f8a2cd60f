"""The run configuration: Hydra structured configs (dataclasses) and the checks Hydra cannot express.

Hydra composes conf/config.yaml and its groups (model/ method/ data/ optim/ trainer/ experiment/) onto the
`TrainConfig` schema (the console scripts register `sftjax.job.config.JobConfig`, which adds the main job's
`builtin.*`), so a wrong type or an unknown key fails at composition. `validate` then rejects impossible
values (lr <= 0, a batch that does not split over the devices, ...) with one line naming the key. Every field
has a one-line comment; the YAML files repeat them where users read them.

The LoRA and data settings are the library's own dataclasses (`LoraSpec`, `DatasetSpec`, `DataOptions`), which
check themselves; each list of allowed values is defined once, in the module that owns the concept. Importing this
module does not import JAX (Hydra composes the config before JAX starts).
"""

from __future__ import annotations

import dataclasses
from dataclasses import field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore

from sftjax.data.pipeline import DataOptions, DatasetSpec
from sftjax.errors import ConfigError
from sftjax.model.config import ATTENTION_BLOCK, DTYPES, REMAT_POLICIES
from sftjax.peft.spec import LoraSpec

METHODS = ("full", "lora", "qlora")  # method.name
OPTIMIZERS = ("adamw", "adafactor", "sgd")  # optim.name (train/optim.py builds them)
SCHEDULES = ("cosine", "linear", "constant")  # optim.schedule
PARALLELISMS = ("data", "fsdp")  # trainer.parallelism
BEST_MODES = ("min", "max")  # trainer.best_mode
RESUMES = ("auto", "never")  # trainer.resume


@dataclasses.dataclass
class ModelSection:
    path: str = "tiny-llama"  # local HF model directory or a built-in preset (tiny-llama, bench-llama, ...)
    tokenizer: Optional[str] = None  # directory with tokenizer.json; default: model.path
    dtype: str = "float32"  # compute dtype: float32 | bfloat16 | float16 (bf16 on GPU; f32 on CPU)
    param_dtype: str = "float32"  # storage dtype of the weights (trainable weights stay float32 for AdamW)
    scan_layers: bool = True  # lax.scan over layers: flat compile time as depth grows
    remat: str = "none"  # none | full | dots: recompute activations in the backward pass to save memory
    # training attention runs its queries in causal blocks of this many rows, each over the keys up to its end:
    # smaller blocks skip more of the masked half, larger ones make fewer, bigger matmuls (which pays depends on
    # the shapes: experiments/bench/README.md, "The main job's step")
    attention_block: int = ATTENTION_BLOCK
    # true: training and evaluation run the per-token layers on a batch's real tokens only, not its padding slots
    # (sftjax/model/compact.py, as TRL's padding_free); pays on padded batches in long runs: each new size (an
    # eighth of the slots) compiles the step once more
    padding_free: bool = False
    dropout: float = 0.0  # dropout on each residual branch during training
    seed: int = 0  # initialisation seed of preset models


@dataclasses.dataclass
class QuantSection:
    kind: str = "nf4"  # 4-bit code of the frozen base under qlora: nf4 (bitsandbytes-exact) | int4 (quant.KINDS)
    double_quant: bool = True  # quantize the per-block absmax constants to 8 bits (4.127 instead of 4.5 bits/param)


@dataclasses.dataclass
class MethodSection:
    name: str = "full"  # full (all weights trained) | lora (adapters on a frozen base) | qlora (on a 4-bit base)
    # adapter settings (lora and qlora; sftjax/peft/spec.py); a run's adapter dropout defaults to 0.05, as in
    # conf/method/lora.yaml, the library's LoraSpec to 0.0
    lora: LoraSpec = field(default_factory=lambda: LoraSpec(dropout=0.05))
    quant: QuantSection = field(default_factory=QuantSection)  # base quantization (qlora)


@dataclasses.dataclass
class DataSplits:
    """The datasets of a run (each entry a DatasetSpec, sftjax/data/pipeline.py)."""

    train: list[DatasetSpec] = field(default_factory=list)  # training datasets (one task each)
    eval: list[DatasetSpec] = field(default_factory=list)  # held-out datasets (same task order as train)
    eval_fraction: float = 0.0  # when eval is empty: hold out this fraction of each training dataset


@dataclasses.dataclass
class DataSection(DataOptions, DataSplits):
    """data.*: the splits, then how they become rows (DataOptions). Fields follow the reversed bases, so the keys
    keep the order of conf/data/default.yaml."""


@dataclasses.dataclass
class OptimSection:
    name: str = "adamw"  # adamw | adafactor | sgd
    lr: float = 3e-4  # peak learning rate
    weight_decay: float = 0.0  # decoupled weight decay (never on norms or biases)
    b1: float = 0.9  # AdamW beta1
    b2: float = 0.999  # AdamW beta2
    eps: float = 1e-8  # AdamW epsilon
    momentum: float = 0.9  # SGD momentum (0: plain SGD)
    schedule: str = "cosine"  # cosine | linear | constant (after warmup)
    warmup_steps: int = 0  # linear warmup from 0 to lr
    min_lr_ratio: float = 0.0  # final lr of cosine / linear decay, as a fraction of lr
    max_grad_norm: float = 1.0  # clip the global gradient norm (0: no clipping)


@dataclasses.dataclass
class TrainerSection:
    max_steps: int = 100  # optimizer steps
    batch_size: int = 8  # global packed rows per micro-batch, split evenly over the devices (of all hosts)
    grad_accum: int = 1  # micro-batches per optimizer step (lax.scan)
    devices: int = 0  # devices for the pmap step (0: all local devices)
    # CPU devices jax exposes in this process, set by sftjax-train before JAX starts (0: jax's default, i.e.
    # XLA_FLAGS' --xla_force_host_platform_device_count or 1); CPU only (sftjax/train/cpu_devices.py)
    cpu_devices: int = 0
    seed: int = 0  # seed of dropout and everything else random in training
    log_every: int = 10  # steps between train metric lines
    eval_every: int = 50  # steps between evaluations (0: only at the end)
    eval_batches: int = 0  # cap on eval batches per evaluation (0: the whole eval split)
    num_samples: int = 2  # eval prompts whose generations are logged at each evaluation
    sample_tokens: int = 32  # max new tokens of each logged sample
    save_every: int = 50  # steps between checkpoints (0: only at the end)
    keep_last: int = 2  # newest checkpoints kept
    keep_best: int = 1  # best checkpoints by best_metric kept (besides the newest; needs an eval split)
    best_metric: str = "eval/loss"  # metric for best checkpoints and early stopping
    best_mode: str = "min"  # min | max
    patience: int = 0  # early stopping: evaluations without improvement before stopping (0: off)
    min_delta: float = 0.0  # early stopping: smallest change that counts as an improvement
    resume: str = "auto"  # auto (continue from run_dir's latest checkpoint) | never
    run_dir: str = "${hydra:runtime.output_dir}"  # checkpoints, metrics.jsonl, tensorboard/, resolved config
    progress: bool = True  # progress bar (only on a terminal)
    # jax's persistent compilation cache (sftjax-train): a later run of the same programs (a sweep's next job, the
    # main job again) loads them instead of compiling; "" turns it off (sftjax/train/compile_cache.py)
    compile_cache: str = "${oc.env:SFTJAX_CACHE,'~/.cache/sftjax'}/xla"
    parallelism: str = "data"  # data: pmap, the whole state on every device | fsdp: jit over a mesh, the state split
    fsdp: int = 0  # parallelism=fsdp: devices each array is split over (0: all / tensor); data = rest of the devices
    tensor: int = 1  # parallelism=fsdp: devices each attention / MLP projection is split over (must divide the heads)
    distributed: bool = False  # multi-process run: jax.distributed.initialize() from the settings below or the cluster
    coordinator: Optional[str] = None  # host:port of process 0 (default: JAX_COORDINATOR_ADDRESS or SLURM's first node)
    num_processes: int = 0  # processes of the run (0: JAX_NUM_PROCESSES or SLURM_NTASKS)
    process_id: int = -1  # this process (-1: JAX_PROCESS_ID or SLURM_PROCID)
    init_timeout: int = 300  # seconds to wait for the coordinator and the other processes


@dataclasses.dataclass
class TrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    method: MethodSection = field(default_factory=MethodSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    trainer: TrainerSection = field(default_factory=TrainerSection)
    # objective/: the training objective and its settings (sftjax/objectives/<name>.py, conf/objective/<name>.yaml);
    # each objective checks its own keys (objectives.base.settings)
    objective: dict[str, Any] = field(default_factory=lambda: {"name": "sft"})


def register(schema: type = TrainConfig) -> None:
    """Register the schema with Hydra's ConfigStore (conf/config.yaml lists `train_schema` first). The console
    scripts register the main job's `sftjax.job.config.JobConfig`, this schema plus its `builtin` section."""
    ConfigStore.instance().store(name="train_schema", node=schema)


def check(ok: bool, key: str, value: Any, why: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r}: {why}")


def check_choice(key: str, value: Any, allowed: tuple[str, ...]) -> None:
    check(value in allowed, key, value, f"must be one of {', '.join(allowed)}")


def mesh_shape(t: TrainerSection, devices: int) -> tuple[int, int, int]:
    """(data, fsdp, tensor) of parallelism=fsdp over `devices` devices in all; one line when they do not fit."""
    check(t.tensor >= 1, "trainer.tensor", t.tensor, "must be >= 1")
    check(t.fsdp >= 0, "trainer.fsdp", t.fsdp, "must be >= 0 (0: all devices / tensor)")
    check(devices % t.tensor == 0, "trainer.tensor", t.tensor, f"must divide the {devices} devices")
    fsdp = t.fsdp or devices // t.tensor
    check(devices % (fsdp * t.tensor) == 0, "trainer.fsdp", t.fsdp,
          f"fsdp x tensor = {fsdp} x {t.tensor} must divide the {devices} devices")
    return devices // (fsdp * t.tensor), fsdp, t.tensor


def validate(cfg: TrainConfig, device_count: int, process_count: int = 1) -> None:
    """Reject impossible values with one line naming the key. device_count: local devices of this process."""
    from sftjax.peft.quant import KINDS  # deferred, as `settings` below: quant imports JAX

    m, d, o, t = cfg.model, cfg.data, cfg.optim, cfg.trainer
    check_choice("model.dtype", m.dtype, DTYPES)
    check_choice("model.param_dtype", m.param_dtype, DTYPES)
    check_choice("model.remat", m.remat, REMAT_POLICIES)
    check(m.attention_block >= 1, "model.attention_block", m.attention_block, "must be >= 1")
    check(0.0 <= m.dropout < 1.0, "model.dropout", m.dropout, "must be in [0, 1)")
    check_choice("method.name", cfg.method.name, METHODS)
    cfg.method.lora.check("method.lora")
    check_choice("method.quant.kind", cfg.method.quant.kind, KINDS)
    check(bool(d.train), "data.train", [], "no training dataset (e.g. data=path/to/train.jsonl; without one, "
          "sftjax-train runs the built-in tasks)")
    for split in ("train", "eval"):
        for i, ds in enumerate(getattr(d, split)):
            ds.check(f"data.{split}[{i}]")
    check(0.0 <= d.eval_fraction < 1.0, "data.eval_fraction", d.eval_fraction, "must be in [0, 1)")
    d.check("data")
    check_choice("optim.name", o.name, OPTIMIZERS)
    check(o.lr > 0, "optim.lr", o.lr, "must be > 0")
    check(o.weight_decay >= 0, "optim.weight_decay", o.weight_decay, "must be >= 0")
    check_choice("optim.schedule", o.schedule, SCHEDULES)
    check(o.warmup_steps >= 0, "optim.warmup_steps", o.warmup_steps, "must be >= 0")
    check(o.warmup_steps < t.max_steps or o.warmup_steps == 0, "optim.warmup_steps", o.warmup_steps,
          f"must be < trainer.max_steps={t.max_steps}")
    check(0.0 <= o.min_lr_ratio <= 1.0, "optim.min_lr_ratio", o.min_lr_ratio, "must be in [0, 1]")
    check(o.max_grad_norm >= 0, "optim.max_grad_norm", o.max_grad_norm, "must be >= 0 (0: no clipping)")
    check(t.max_steps >= 1, "trainer.max_steps", t.max_steps, "must be >= 1")
    check(t.batch_size >= 1, "trainer.batch_size", t.batch_size, "must be >= 1")
    check(t.cpu_devices >= 0, "trainer.cpu_devices", t.cpu_devices, "must be >= 0 (0: jax's default)")
    check(0 <= t.devices <= device_count, "trainer.devices", t.devices,
          f"must be between 0 (all) and the {device_count} local devices")
    check(t.devices in (0, device_count) or process_count == 1, "trainer.devices", t.devices,
          f"must be 0 (all local devices) in a run of {process_count} processes")
    check_choice("trainer.parallelism", t.parallelism, PARALLELISMS)
    if t.parallelism == "fsdp":
        groups = mesh_shape(t, device_count * process_count)[:2]
        check(t.devices == 0, "trainer.devices", t.devices, "parallelism=fsdp runs on every device: leave it 0")
        check(device_count % t.tensor == 0, "trainer.tensor", t.tensor,
              f"must divide the {device_count} devices of each process")
        check(t.batch_size % (groups[0] * groups[1]) == 0, "trainer.batch_size", t.batch_size,
              f"must be divisible by data x fsdp = {groups[0]} x {groups[1]} (the mesh's groups of rows)")
    else:
        devices = (t.devices or device_count) * process_count
        check(t.fsdp == 0 and t.tensor == 1, "trainer.fsdp" if t.fsdp else "trainer.tensor", t.fsdp or t.tensor,
              "splits the state only with trainer.parallelism=fsdp")
        check(t.batch_size % devices == 0, "trainer.batch_size", t.batch_size,
              f"must be divisible by the {devices} devices of the pmap step")
    check(t.grad_accum >= 1, "trainer.grad_accum", t.grad_accum, "must be >= 1")
    for key in ("log_every", "eval_every", "save_every", "eval_batches", "num_samples", "patience"):
        check(getattr(t, key) >= 0, f"trainer.{key}", getattr(t, key), "must be >= 0")
    check(t.log_every >= 1, "trainer.log_every", t.log_every, "must be >= 1")
    check(t.keep_last >= 1, "trainer.keep_last", t.keep_last, "must be >= 1 (the newest checkpoint resumes)")
    check(t.keep_best >= 0, "trainer.keep_best", t.keep_best, "must be >= 0")
    check_choice("trainer.best_mode", t.best_mode, BEST_MODES)
    check_choice("trainer.resume", t.resume, RESUMES)
    has_eval = bool(d.eval) or d.eval_fraction > 0
    check(has_eval or t.patience == 0 or not t.best_metric.startswith("eval/"), "trainer.patience", t.patience,
          f"early stopping on {t.best_metric} needs an eval split (data.eval or data.eval_fraction > 0)")
    check(t.best_metric.split("/")[0] in ("eval", "train"), "trainer.best_metric", t.best_metric,
          "must be eval/<metric> or train/<metric>")
    from sftjax.objectives.base import settings  # deferred: objectives import JAX

    settings(cfg.objective)
