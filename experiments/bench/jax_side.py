"""The sftjax side: the model a run builds and the trainer's own pmapped train step (`compile_steps`), one device.

Speed, memory and scaling build the model with `sftjax.train.setup.build_model` from the same HF directory the
peer loads, so both stacks train identical weights. The compile-time sweep varies the depth, so it starts from
random weights (`init_params`) and splits them per method with the same calls build_model makes.

Precision "float32" runs everything in float32. "bf16" is sftjax's mixed precision, set as the peer's
(torch_side.py): compute in bfloat16 (`model.dtype`); full fine-tuning keeps float32 weights for AdamW
(`model.param_dtype=float32`), LoRA and QLoRA hold the frozen base in bfloat16 (`model.param_dtype=bfloat16`)
and the adapters in float32 (as sftjax always does).

Batches are [devices=1, accum=1, b, T], laid out as `sftjax.train.loop._next_batch` hands them to the step (host
numpy arrays; one segment per row, every target trained).
"""

from __future__ import annotations

import time
from typing import Any

import jax
import numpy as np

from sftjax.config import (
    LoraSection,
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
from sftjax.peft import quant
from sftjax.train.optim import make_optimizer, schedule
from sftjax.train.setup import Model
from sftjax.train.state import device_mesh, init_state, replicate
from sftjax.train.step import compile_steps

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TOTAL_STEPS = 1000  # only sizes the (constant) schedule: the benchmark never reaches it


def train_config(model_path: str, mode: str, rank: int, alpha: float, lr: float, remat: str = "none",
                 scan_layers: bool = True, precision: str = "float32") -> TrainConfig:
    """The run configuration of the benchmark: `precision` (float32 | bf16, above), AdamW (no weight decay, no
    clipping), constant lr."""
    bf16 = precision == "bf16"
    return TrainConfig(
        model=ModelSection(path=model_path, dtype="bfloat16" if bf16 else "float32",
                           param_dtype="bfloat16" if bf16 and mode != "full" else "float32", remat=remat,
                           scan_layers=scan_layers),
        method=MethodSection(name=mode, lora=LoraSection(rank=rank, alpha=alpha, dropout=0.0,
                                                         target_modules=list(TARGETS))),
        optim=OptimSection(name="adamw", lr=lr, weight_decay=0.0, schedule="constant", max_grad_norm=0.0),
    )


def build_from_weights(cfg: TrainConfig, model_cfg: ModelConfig, params: Any) -> Model:
    """As `build_model`, from weights in memory instead of a directory (the depth sweep)."""
    from sftjax.train.setup import lora_spec

    if cfg.method.name == "full":
        return Model(model_cfg, {}, params, "", None, {})
    spec = lora_spec(cfg)
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
    """The trainer's p_train step with its replicated state and frozen tree; `step(batch)` runs one.

    Without `compile`, a step calls p_train itself, which compiles on its first call (as in a training run).
    `compile(batch)` compiles p_train ahead of time for that batch shape, timed, and later steps run that
    executable: the same program, measured without a second compilation, with XLA's buffer sizes.
    """

    def __init__(self, cfg: TrainConfig, model: Model, objective: Objective | None = None,
                 refs: dict[str, Any] | None = None):
        """objective: the trainer's SFT by default; refs: the frozen models it needs besides the base."""
        optimizer = make_optimizer(cfg.optim, TOTAL_STEPS)
        self.objective = objective or SFT(model.cfg, ("bench",))
        self.p_train, _ = compile_steps(self.objective, optimizer, schedule(cfg.optim, TOTAL_STEPS), 1)
        self._run = self.p_train
        mesh = device_mesh(1)
        self.state = replicate(init_state(model.trainable, optimizer, cfg.trainer.seed), mesh)
        self.frozen = replicate(model.frozen, mesh)
        self.refs = replicate(refs or {}, mesh)
        self.model = model
        self.temp_bytes: int | None = None  # XLA temp buffers of the compiled step (activations, gradients)

    def step(self, batch: dict[str, np.ndarray]) -> float:
        """One optimizer step (blocking until done). Returns the loss."""
        self.state, metrics = self._run(self.state, self.frozen, self.refs, batch)
        jax.block_until_ready((self.state, metrics))
        return float(metrics["loss"][0])

    def compile(self, batch: dict[str, np.ndarray]) -> tuple[float, float]:
        """(trace + lower, XLA compile) seconds of the step for this batch shape; nothing runs."""
        start = time.perf_counter()
        lowered = self.p_train.lower(self.state, self.frozen, self.refs, batch)
        traced = time.perf_counter()
        self._run = lowered.compile()
        compiled = time.perf_counter()
        analysis = self._run.memory_analysis()
        self.temp_bytes = None if analysis is None else int(analysis.temp_size_in_bytes)
        return traced - start, compiled - traced

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
