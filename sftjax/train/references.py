"""Frozen models an objective needs besides the policy (a distillation teacher; DPO's or RL's reference).

A reference is named by a path, either

    a local HF model directory      config.json (with model_type) + model.safetensors: loaded as it is
    an sftjax run directory         config.json (the run's) + checkpoints/: its latest checkpoint, adapters merged
                                    into the base (a 4-bit base dequantized), task heads left out

and runs under the policy's execution settings (compute dtype, layer scan), never with dropout. The trainer
replicates it once, never donates or checkpoints it, and records its fingerprint in every checkpoint: a resume
with another reference is refused like one on another base (`checkpoint.check_references`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from sftjax.config import ModelSection
from sftjax.data.tokenizer import Tokenizer
from sftjax.errors import ConfigError, UserError
from sftjax.model.config import ModelConfig, load_hf_config
from sftjax.model.transformer import Params


@dataclasses.dataclass
class Reference:
    cfg: ModelConfig
    params: Params
    fingerprint: str  # of the weights as loaded (checkpoint.fingerprint)


def _is_run(directory: Path) -> bool:
    return (directory / "checkpoints").is_dir() and (directory / "config.json").is_file()


def _runtime(cfg: ModelConfig, policy: ModelSection) -> ModelConfig:
    return cfg.replace(dtype=policy.dtype, scan_layers=policy.scan_layers, remat="none", dropout_rate=0.0)


def _config(key: str, path: str, policy: ModelSection) -> ModelConfig:
    """The architecture of the reference at `path` (config.json only). key: the config key that named it."""
    directory = Path(path)
    try:
        if _is_run(directory):
            from sftjax.cli.common import run_config
            from sftjax.train.setup import model_config

            return _runtime(model_config(run_config(directory, [])), policy)
        if not directory.is_dir():
            raise ConfigError("no such directory (a local HF model directory or an sftjax run directory)")
        return _runtime(load_hf_config(directory), policy)
    except UserError as e:
        raise ConfigError(f"{key}={path!r}: {e}") from None


def load_reference(key: str, path: str, policy: ModelSection) -> Reference:
    """Load the reference at `path` (see the module docstring) in policy.param_dtype."""
    from sftjax.model.hf import load_pretrained
    from sftjax.train.checkpoint import fingerprint

    directory = Path(path)
    cfg = _config(key, path, policy)
    try:
        if _is_run(directory):
            params = _run_params(directory)
        else:
            params = load_pretrained(directory, dtype=policy.param_dtype)[1]
    except UserError as e:
        raise ConfigError(f"{key}={path!r}: {e}") from None
    return Reference(cfg, params, fingerprint(params))


def _run_params(directory: Path) -> Params:
    """The weights of a run's latest checkpoint as one plain tree: adapters merged, 4-bit base dequantized."""
    from sftjax.cli.common import run_config
    from sftjax.train.setup import build_model, merged_params, restore_checkpoint

    cfg = run_config(directory, [])
    model = build_model(cfg)
    return merged_params(model, restore_checkpoint(cfg, directory / "checkpoints", model)[0])[0]


def _tokenizer_file(directory: Path) -> Path | None:
    """The tokenizer.json a reference was trained with: an HF directory's own, or a run's model.tokenizer /
    model.path; None where there is none (then only the vocabulary size is compared)."""
    if _is_run(directory):
        from sftjax.cli.common import run_config

        model = run_config(directory, []).model
        directory = Path(model.tokenizer or model.path)
    path = directory / "tokenizer.json"
    return path if path.is_file() else None


def check_tokenizer(key: str, path: str, tokenizer: Tokenizer) -> None:
    """Refuse a reference whose tokenizer maps tokens to other ids than the policy's (same size or not): its
    logits would be over another vocabulary."""
    import tokenizers

    file = _tokenizer_file(Path(path))
    if file is None:
        return
    theirs = tokenizers.Tokenizer.from_file(str(file)).get_vocab(with_added_tokens=True)
    if theirs != tokenizer.backend.get_vocab(with_added_tokens=True):
        raise ConfigError(f"{key}={path!r}: its tokenizer ({file}, {len(theirs)} tokens) is not the student's "
                          f"({tokenizer.source}, {tokenizer.vocab_size} tokens): the same tokenizer is needed")


def load_references(paths: dict[str, str], policy: ModelSection, tokenizer: Tokenizer | None = None
                    ) -> dict[str, Reference]:
    """{name: Reference} for an objective's `references()` (config key objective.<name>), each checked to use the
    policy's tokenizer when one is given."""
    for name, path in paths.items():
        if tokenizer is not None:
            check_tokenizer(f"objective.{name}", path, tokenizer)
    return {name: load_reference(f"objective.{name}", path, policy) for name, path in paths.items()}


# ----------------------------------------------------------------------------------------------------------------
# The policy as it starts (DPO's reference) and reference log-probabilities computed before training


def policy_reference(trainable: Params) -> Params:
    """What a reference equal to the starting policy needs besides the frozen base: the initial trainable tree
    without adapters and objective heads. Full fine-tuning: the whole model (a frozen copy); LoRA / QLoRA: only the
    modules trained beside the adapters (often nothing), since the frozen base with the adapters off is the rest."""
    from sftjax.peft.lora import without_adapters

    return without_adapters({k: v for k, v in trainable.items() if k != "heads"})


def starting_policy(params: Params, reference: Params) -> Params:
    """The policy as training started, inside a step that holds the current `params` and the `policy_reference`
    tree: the frozen base with the adapters off, overlaid with `reference` (the originals of the modules trained
    fully; the whole model under full fine-tuning). No copy of the base."""
    from sftjax.peft.lora import without_adapters
    from sftjax.train.state import merge_params

    return merge_params(without_adapters({k: v for k, v in params.items() if k != "heads"}), reference)


def precompute_logps(objective, params: Params, refs: dict[str, Params], prepared, rows: int = 8):
    """`prepared` with every pair's reference log-probabilities (chosen, rejected) set (`Tokenized.ref`), computed
    on the first local device in one pass: pairs packed best-fit into micro-batches of `rows` rows.

    objective: a DPO objective (`reference_params`, `reference_logps`); params: the policy's tree as it starts
    (frozen + trainable); refs: its references. Deterministic: the same data and weights give the same values, so
    a resumed run recomputes exactly what the first start used.
    """
    import jax
    import numpy as np

    from sftjax.data.packing import build_rows, pack_bins

    fn = jax.jit(lambda params, refs, batch: objective.reference_logps(objective.reference_params(params, refs),
                                                                       batch))
    seq_len = prepared.config.seq_len
    datasets = []
    for examples in prepared.datasets:
        values = np.zeros((len(examples), 2), np.float32)
        bins = pack_bins([len(e.tokens) for e in examples], seq_len, "bfd")
        for start in range(0, len(bins), rows):
            chunk = bins[start:start + rows]
            chunk = chunk + [[] for _ in range(rows - len(chunk))]
            batch = build_rows(examples, [0] * len(examples), chunk, seq_len, prepared.pad_id, pairs=True)
            batch = objective.prepare({k: v[None] for k, v in batch.items()})
            logps = np.asarray(fn(params, refs, {k: v[0] for k, v in batch.items()}))  # [2P]
            order = [i for members in chunk for i in members]  # slot p <-> the p-th pair in row-major order
            values[order] = logps[:2 * len(order)].reshape(-1, 2)
        datasets.append([dataclasses.replace(e, ref=(float(c), float(r))) for e, (c, r) in zip(examples, values)])
    return dataclasses.replace(prepared, datasets=datasets)
