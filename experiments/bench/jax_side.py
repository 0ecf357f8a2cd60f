"""The sftjax side: the model a run builds and the trainer's own train step on one device: the pmap step
(`train.step.compile_steps`, parallelism "data") or the sharded jit step (`train.sharded.compile_steps`, "fsdp")
on a one-device (data 1, fsdp 1, tensor 1) mesh.

Speed, memory and scaling build the model with `sftjax.train.setup.build_model` from the same HF directory the
peer loads, so both stacks train identical weights. The compile-time sweep varies the depth, so it starts from
random weights (`init_params`) and splits them per method with the same calls build_model makes.

Precision "float32" runs everything in float32. "bf16" is sftjax's mixed precision, set as the peer's
(torch_side.py): compute in bfloat16 (`model.dtype`); full fine-tuning keeps float32 weights for AdamW
(`model.param_dtype=float32`), LoRA and QLoRA hold the frozen base in bfloat16 (`model.param_dtype=bfloat16`)
and the adapters in float32 (as sftjax always does).

Batches are [devices=1, accum=1, b, T], laid out as `sftjax.train.loop._next_batch` hands them to the step (host
numpy arrays; one segment per row, every target trained). The sharded step takes them as global arrays of the
mesh's batch sharding (one group of rows), as `train.parallel.Sharded.batch` makes them; the copy to the device
is part of each timed step, as the pmap step's is.
"""

from __future__ import annotations

import time
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from sftjax.config import (
    MethodSection,
    ModelSection,
    OptimSection,
    TrainConfig,
)
from sftjax.model.config import ModelConfig
from sftjax.model.transformer import init_params
from sftjax.objectives.base import Objective
from sftjax.objectives.sft import SFT
from sftjax.peft import lora as lora_lib
from sftjax.peft.spec import LoraSpec
from sftjax.peft import quant
from sftjax.train import sharded, step
from sftjax.train.optim import make_optimizer, schedule
from sftjax.train.setup import Model
from sftjax.train.state import device_mesh, init_state, replicate

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TOTAL_STEPS = 1000  # only sizes the (constant) schedule: the benchmark never reaches it
PARALLELISMS = ("data", "fsdp")  # the pmap step, the sharded step (`trainer.parallelism`)


def train_config(model_path: str, mode: str, rank: int, alpha: float, lr: float, remat: str = "none",
                 scan_layers: bool = True, precision: str = "float32") -> TrainConfig:
    """The run configuration of the benchmark: `precision` (float32 | bf16, above), AdamW (no weight decay, no
    clipping), constant lr."""
    bf16 = precision == "bf16"
    return TrainConfig(
        model=ModelSection(path=model_path, dtype="bfloat16" if bf16 else "float32",
                           param_dtype="bfloat16" if bf16 and mode != "full" else "float32", remat=remat,
                           scan_layers=scan_layers),
        method=MethodSection(name=mode, lora=LoraSpec(rank=rank, alpha=alpha, dropout=0.0,
                                                      target_modules=list(TARGETS))),
        optim=OptimSection(name="adamw", lr=lr, weight_decay=0.0, schedule="constant", max_grad_norm=0.0),
    )


def build_from_weights(cfg: TrainConfig, model_cfg: ModelConfig, params: Any) -> Model:
    """As `build_model`, from weights in memory instead of a directory (the depth sweep)."""
    if cfg.method.name == "full":
        return Model(model_cfg, {}, params, "", None, {})
    spec = cfg.method.lora
    adapters = lora_lib.init_adapters(model_cfg, spec, jax.random.fold_in(jax.random.key(cfg.trainer.seed), 1))
    frozen, trainable = lora_lib.split(params, spec, adapters)
    if cfg.method.name == "qlora":
        frozen = quant.quantize_params(frozen, cfg.method.quant.kind, cfg.method.quant.double_quant)
    return Model(lora_lib.model_config(model_cfg, spec), frozen, trainable, "", spec, {})


def random_model(cfg: TrainConfig, model_cfg: ModelConfig, seed: int = 0) -> Model:
    """Random weights for `model_cfg` under the run's precision (cfg.model.dtype / param_dtype)."""
    model_cfg = model_cfg.replace(dtype=cfg.model.dtype, param_dtype=cfg.model.param_dtype)
    return build_from_weights(cfg, model_cfg, init_params(model_cfg, jax.random.key(seed)))


class Runner:
    """The trainer's train step with its placed state and frozen tree; `step(batch)` runs one.

    parallelism "data": the pmap step, the state replicated with a leading device axis of 1. "fsdp": the sharded
    jit step over a (data 1, fsdp 1, tensor 1) mesh of the first device (`make_mesh` would take every device),
    state, frozen base and references placed with `state_shardings` / `tree_shardings`: on one device nothing is
    split, so it measures the sharded program itself (the vmap over groups, the jit instead of pmap).

    Without `compile`, a step calls the train function itself, which compiles on its first call (as in a training
    run). `compile(batch)` compiles it ahead of time for that batch shape, timed, and later steps run that
    executable: the same program, measured without a second compilation, with XLA's buffer sizes.
    """

    def __init__(self, cfg: TrainConfig, model: Model, objective: Objective | None = None,
                 refs: dict[str, Any] | None = None, parallelism: str = "data"):
        """objective: the trainer's SFT by default; refs: the frozen models it needs besides the base;
        parallelism: "data" (pmap) or "fsdp" (the sharded step)."""
        if parallelism not in PARALLELISMS:
            raise ValueError(f"parallelism {parallelism!r}: choose from {', '.join(PARALLELISMS)}")
        optimizer = make_optimizer(cfg.optim, TOTAL_STEPS)
        lr_schedule = schedule(cfg.optim, TOTAL_STEPS)
        self.objective = objective or SFT(model.cfg, ("bench",))
        self.parallelism = parallelism
        state = init_state(model.trainable, optimizer, cfg.trainer.seed)
        if parallelism == "data":
            self.train, _ = step.compile_steps(self.objective, optimizer, lr_schedule, 1)
            mesh = device_mesh(1)
            self.state = replicate(state, mesh)
            self.frozen = replicate(model.frozen, mesh)
            self.refs = replicate(refs or {}, mesh)
            self._rows = None
        else:
            mesh = Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1, 1), sharded.AXES)
            state_sharding = sharded.state_shardings(state, mesh)
            frozen_sharding = sharded.tree_shardings(model.frozen, mesh)
            refs_sharding = sharded.tree_shardings(refs or {}, mesh)
            self.train, _ = sharded.compile_steps(self.objective, optimizer, lr_schedule, mesh, state_sharding,
                                                  frozen_sharding, refs_sharding)
            # Copies (may_alias=False): the state is donated, and the model's arrays may already sit on the
            # device with this sharding; another Runner may start from them (the scaling section).
            self.state = jax.device_put(state, state_sharding, may_alias=False)
            self.frozen = jax.device_put(model.frozen, frozen_sharding, may_alias=False)
            self.refs = jax.device_put(refs or {}, refs_sharding, may_alias=False)
            self._rows = sharded.batch_sharding(mesh)
        self._run = self.train
        self.model = model
        self.temp_bytes: int | None = None  # XLA temp buffers of the compiled step (activations, gradients)

    def _batch(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        """The step's batch: host arrays for pmap, global arrays of the batch sharding for the sharded step."""
        return batch if self._rows is None else jax.device_put(batch, self._rows)

    def step(self, batch: dict[str, np.ndarray]) -> float:
        """One optimizer step (blocking until done). Returns the loss."""
        self.state, metrics = self._run(self.state, self.frozen, self.refs, self._batch(batch))
        jax.block_until_ready((self.state, metrics))
        loss = metrics["loss"]  # pmap: [devices]; sharded: a replicated scalar
        return float(loss[0] if self._rows is None else loss)

    def compile(self, batch: dict[str, np.ndarray]) -> tuple[float, float]:
        """(trace + lower, XLA compile) seconds of the step for this batch shape; nothing runs."""
        start = time.perf_counter()
        lowered = self.train.lower(self.state, self.frozen, self.refs, self._batch(batch))
        traced = time.perf_counter()
        self._run = lowered.compile()
        compiled = time.perf_counter()
        analysis = self._run.memory_analysis()
        self.temp_bytes = None if analysis is None else int(analysis.temp_size_in_bytes)
        return traced - start, compiled - traced

    def hlo(self) -> str:
        """The compiled step's optimized HLO module as text (after `compile`): ops with their source lines."""
        return self._run.as_text()

    def memory(self) -> dict[str, int | None]:
        """Bytes of trainable parameters, the frozen tree (4-bit codes + constants under QLoRA), optimizer state,
        and on a GPU the peak of device memory in use (the allocator's peak_bytes_in_use; None on CPU)."""
        stats = jax.local_devices()[0].memory_stats()  # None on CPU
        return {"trainable_bytes": quant.tree_bytes(self.model.trainable),
                "frozen_bytes": quant.tree_bytes(self.model.frozen),
                "opt_state_bytes": quant.tree_bytes(self.state["opt_state"]),
                "device_peak_bytes": stats.get("peak_bytes_in_use") if stats else None}


def sftjax_batch(tokens: np.ndarray, targets: np.ndarray) -> dict[str, np.ndarray]:
    """tokens / targets [b, T] -> the step's batch dict, arrays [1, 1, b, T]."""
    b, T = tokens.shape
    batch = {
        "tokens": tokens.astype(np.int32),
        "targets": targets.astype(np.int32),
        "loss_mask": np.ones((b, T), np.float32),
        "segment_ids": np.ones((b, T), np.int32),
        "positions": np.broadcast_to(np.arange(T, dtype=np.int32), (b, T)).copy(),
        "task_ids": np.zeros((b, T), np.int32),
    }
    return {k: v[None, None] for k, v in batch.items()}


def matmul_peak(n: int, reps: int, dtype: str = "float32") -> float:
    """Median GFLOP/s of a jitted [n, n] @ [n, n] in `dtype` (float32 | bfloat16; default matmul precision, as the
    train step)."""
    from floor import NN, Dot, time_dot

    return 2 * n**3 / time_dot(Dot("peak", (n, n), (n, n), NN, 1), reps, dtype) / 1e9
