"""The LoRA settings: one dataclass, `method.lora` in the run config (Hydra) and `sftjax.LoraSpec` in the library.

Hydra composes conf/method/lora.yaml onto this dataclass and `OmegaConf.to_object` builds it; library code builds
it directly (`LoraSpec(rank=4, alpha=8, target_modules=("q_proj", "v_proj"))`). It is a plain (not frozen)
dataclass because OmegaConf makes a frozen dataclass's node read-only, which would refuse every override.

The module imports no JAX, so the Hydra schema (sftjax.config) stays fast to import; sftjax.peft.lora re-exports
everything here. `check` rejects values no model accepts; what depends on the model (targets that match, a rank
within every adapted kernel, a tied lm_head) is checked by `lora.check_spec`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from sftjax.errors import ConfigError

TRAINABLE_MODULES = ("embed_tokens", "lm_head", "norm")  # modules that can be trained fully beside the adapters
INITS = ("kaiming", "gaussian")  # A: PEFT's kaiming-uniform U(+-1/sqrt(in)) | N(0, 1/r); B always starts at 0
ALL_LINEAR = "all-linear"  # target_modules: every linear layer of the decoder (not lm_head), as PEFT


@dataclasses.dataclass
class LoraSpec:
    """Low-rank adapters W x + scale * B A dropout(x) with scale = alpha / r (rsLoRA: alpha / sqrt(r))."""

    rank: int = 16  # r: adapter rank (<= the smaller side of every adapted kernel)
    alpha: float = 32.0  # scale = alpha / r (rslora: alpha / sqrt(r))
    dropout: float = 0.0  # dropout on the adapter input during training (runs default to 0.05: method/lora.yaml)
    target_modules: Any = ALL_LINEAR  # all-linear | module names (q_proj, ...; suffixes) | one regex (PEFT rules)
    rslora: bool = False  # rank-stabilised scale alpha / sqrt(r)
    init: str = "kaiming"  # A initialisation: kaiming (uniform, as PEFT) | gaussian (std 1/r); B starts at 0
    trainable_modules: tuple[str, ...] = ()  # also train fully: embed_tokens | lm_head | norm

    def __post_init__(self) -> None:
        # Hydra hands lists; tuples keep the library's form (a spec prints and compares as the library writes it)
        if isinstance(self.target_modules, (list, tuple)):
            self.target_modules = tuple(self.target_modules)
        if isinstance(self.trainable_modules, (list, tuple)):
            self.trainable_modules = tuple(self.trainable_modules)

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    def check(self, key: str = "method.lora") -> None:
        """ConfigError, one line naming `key`.<field>, on a value no model accepts."""
        def fail(name: str, value: Any, why: str) -> None:
            raise ConfigError(f"{key}.{name}={value!r}: {why}")

        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            fail("rank", self.rank, "must be a positive integer")
        if not self.alpha > 0:
            fail("alpha", self.alpha, "must be > 0")
        if not 0.0 <= self.dropout < 1.0:
            fail("dropout", self.dropout, "must be in [0, 1)")
        if self.init not in INITS:
            fail("init", self.init, f"must be one of {', '.join(INITS)}")
        targets = self.target_modules
        names = isinstance(targets, tuple) and targets and all(isinstance(t, str) and t for t in targets)
        if not (isinstance(targets, str) and targets or names):
            fail("target_modules", targets, f"must be {ALL_LINEAR}, a list of module names or one regex")
        for name in self.trainable_modules:
            if name not in TRAINABLE_MODULES:
                fail("trainable_modules", list(self.trainable_modules),
                     f"{name!r} is not one of {', '.join(TRAINABLE_MODULES)}")
