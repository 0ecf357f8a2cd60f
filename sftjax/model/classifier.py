"""A classification head on the decoder, and its round trip to a transformers `*ForSequenceClassification`
checkpoint.

The head is a kernel W [D, C] (C classes, no bias) applied to the final normalised hidden state of the last
token of each example, the token transformers' `<Family>ForSequenceClassification` pools:

    logits [B, C] = hidden_states(tokens)[b, last(b)] @ W       last(b): the last non-padding position of row b

A checkpoint is the base model's tensors as `save_pretrained` writes them, without `lm_head.weight` (a
sequence-classification model has none, tied or not), plus `score.weight` = W.T [C, D]; config.json is the
causal LM's with architectures `<Family>ForSequenceClassification`, num_labels, id2label / label2id and
pad_token_id.

transformers finds the last token from `pad_token_id` (the rightmost position whose token differs from it), not
from the attention mask; `classify` takes it from segment_ids. They agree unless an example's last real token
equals pad_token_id (e.g. an EOS used as padding): pick a pad id that never ends an example.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from sftjax.errors import CheckpointError, ConfigError
from sftjax.model import hf
from sftjax.model.config import ModelConfig, load_hf_config, to_hf_dict
from sftjax.model.layers import linear
from sftjax.model.transformer import Params, hidden_states

SCORE = "score.weight"  # transformers' `score = nn.Linear(hidden_size, num_labels, bias=False)`


def _headless(cfg: ModelConfig) -> ModelConfig:
    """The config whose HF tensors are exactly the base model's: a tied config has no lm_head entry, and
    tie_word_embeddings changes nothing else about the tensor names or shapes."""
    return cfg.replace(tie_word_embeddings=True)


def _check_head(cfg: ModelConfig, kernel: np.ndarray, labels: Sequence[str]) -> None:
    if kernel.ndim != 2 or kernel.shape[0] != cfg.hidden_size:
        raise ConfigError(f"classifier kernel has shape {list(kernel.shape)}, expected [hidden_size="
                          f"{cfg.hidden_size}, num_labels]")
    if len(labels) != kernel.shape[1]:
        raise ConfigError(f"classifier has {kernel.shape[1]} classes but {len(labels)} labels were given")
    if not all(isinstance(label, str) for label in labels) or len(set(labels)) != len(labels):
        raise ConfigError(f"classifier labels must be distinct strings, got {list(labels)!r}")


def classifier_hf_dict(cfg: ModelConfig, labels: Sequence[str], pad_token_id: int | None = None) -> dict:
    """The config.json of a `<Family>ForSequenceClassification` model: the causal LM's, relabelled."""
    pad = cfg.pad_token_id if pad_token_id is None else pad_token_id
    if pad is None:
        raise ConfigError(f"classifier: the {cfg.family} config has no pad_token_id; pass pad_token_id= "
                          f"(transformers finds the pooled token from it and refuses batches > 1 without one)")
    out = to_hf_dict(cfg.replace(pad_token_id=pad))
    causal_lm = out["architectures"][0]
    out["architectures"] = [causal_lm.removesuffix("ForCausalLM") + "ForSequenceClassification"]
    out["num_labels"] = len(labels)
    out["id2label"] = {str(i): label for i, label in enumerate(labels)}
    out["label2id"] = {label: i for i, label in enumerate(labels)}
    return out


def save_classifier(path: str | Path, cfg: ModelConfig, params: Params, kernel: np.ndarray,
                    labels: Sequence[str], *, dtype: str | None = None, overwrite: bool = False,
                    extra_files: tuple[Path, ...] = (), pad_token_id: int | None = None,
                    max_shard_size: int | str = "5GB") -> None:
    """Write base params plus head kernel [D, C] as a directory that
    `transformers.AutoModelForSequenceClassification.from_pretrained(path)` loads; labels[i] names class i.

    pad_token_id (default: cfg.pad_token_id; one of the two is required) is written to config.json: transformers
    pools the last token that differs from it. params may lack `lm_head` (it is not written). dtype, overwrite,
    extra_files and max_shard_size as in `save_pretrained`; no generation_config.json (the model cannot generate).
    """
    directory = Path(path)
    hf.check_writable(directory, overwrite)
    kernel = np.asarray(jax.device_get(kernel))
    _check_head(cfg, kernel, labels)
    save_dtype = dtype or cfg.param_dtype
    tensors = hf.params_to_hf(_headless(cfg), params, save_dtype)
    tensors[SCORE] = np.ascontiguousarray(kernel.T.astype(hf.NP_DTYPES[save_dtype]))
    hf_config = classifier_hf_dict(cfg.replace(param_dtype=save_dtype), labels, pad_token_id)
    hf.write_checkpoint(directory, tensors, hf_config, max_shard_size=max_shard_size, extra_files=extra_files)


def _labels(config_file: Path, num_labels: int) -> list[str]:
    """Labels in id order from config.json's id2label (keys 0 .. num_labels - 1)."""
    id2label = json.loads(config_file.read_text(encoding="utf-8")).get("id2label")
    if not isinstance(id2label, dict) or not id2label:
        raise CheckpointError(f"{config_file}: no 'id2label' (not a sequence-classification checkpoint)")
    try:
        by_id = {int(key): str(label) for key, label in id2label.items()}
    except ValueError:
        raise CheckpointError(f"{config_file}: id2label keys must be integers, got {sorted(id2label)}") from None
    if sorted(by_id) != list(range(num_labels)):
        raise CheckpointError(f"{config_file}: id2label has ids {sorted(by_id)}, expected 0..{num_labels - 1} "
                              f"(one per row of {SCORE!r})")
    return [by_id[i] for i in range(num_labels)]


def load_classifier(path: str | Path, dtype: str = "float32") -> tuple[ModelConfig, Params, np.ndarray, list[str]]:
    """(cfg, base params, head kernel [D, C], labels in id order) from a `*ForSequenceClassification` directory.

    params are those `load_pretrained` gives, without `lm_head` even when cfg is untied (the checkpoint has
    none): use them with `hidden_states` / `classify`, not `forward`. A stored lm_head.weight is ignored. kernel
    is a numpy array in `dtype`. A directory without score.weight or id2label is a CheckpointError.
    """
    directory = Path(path)
    if not directory.is_dir():
        raise CheckpointError(f"{path}: no such model directory")
    cfg = load_hf_config(directory).replace(dtype=dtype, param_dtype=hf._check_dtype(dtype))
    tensors = hf.read_tensors(directory)
    if SCORE not in tensors:
        raise CheckpointError(f"{directory}: no tensor {SCORE!r} (not a sequence-classification checkpoint)")
    score, file = tensors.pop(SCORE)
    if score.ndim != 2 or score.shape[1] != cfg.hidden_size:
        raise CheckpointError(f"{file}: tensor {SCORE!r} has shape {list(score.shape)}, expected [num_labels, "
                              f"{cfg.hidden_size}] from config.json")
    labels = _labels(directory / "config.json", score.shape[0])
    params = hf.params_from_hf(_headless(cfg), tensors, directory)
    return cfg, params, np.asarray(score.T).astype(hf.NP_DTYPES[dtype]), labels


def last_token_index(segment_ids: jax.Array) -> jax.Array:
    """Position of the last non-padding token (segment id != 0) of each row. [B, T] -> [B] (0 for all padding)."""
    T = segment_ids.shape[1]
    return jnp.max(jnp.where(segment_ids != 0, jnp.arange(T)[None, :], 0), axis=1)


@functools.partial(jax.jit, static_argnums=0)
def classify(cfg: ModelConfig, params: Params, kernel: jax.Array, tokens: jax.Array,
             segment_ids: jax.Array) -> jax.Array:
    """Class logits [B, C] (compute dtype) for int tokens [B, T], one right-padded example per row.

    segment_ids [B, T]: nonzero on the example's tokens, 0 on padding. The hidden state [B, T, D] of each row's
    last non-padding token is pooled and multiplied by kernel [D, C].
    """
    h = hidden_states(cfg, params, jnp.asarray(tokens), jnp.asarray(segment_ids))
    last = last_token_index(jnp.asarray(segment_ids))
    pooled = jnp.take_along_axis(h, last[:, None, None], axis=1)[:, 0]  # [B, D]
    return linear(pooled, kernel.astype(cfg.dtype))


__all__ = ["classifier_hf_dict", "classify", "last_token_index", "load_classifier", "save_classifier"]


# ----------------------------------------------------------------------------------------------------------------
# The task heads of a run, beside an exported model

HEADS_TENSORS, HEADS_CONFIG = "heads.safetensors", "heads.json"


def save_heads(directory: str | Path, heads: dict[str, np.ndarray], labels: dict[str, Sequence[str]]) -> None:
    """Write task heads {task: kernel [D, C]} and their classes beside an exported model (or adapter):
    heads.safetensors (`<task>.weight` [C, D], torch's Linear layout, as `score.weight`) and heads.json
    ({task: [class, ...]} in class-id order)."""
    from sftjax.model import safetensors_io

    directory = Path(directory)
    tensors = {f"{task}.weight": np.ascontiguousarray(np.asarray(kernel, np.float32).T)
               for task, kernel in heads.items()}
    safetensors_io.save_file(tensors, directory / HEADS_TENSORS)
    (directory / HEADS_CONFIG).write_text(json.dumps({t: list(labels[t]) for t in heads}, indent=2) + "\n")


def load_heads(directory: str | Path) -> dict[str, tuple[np.ndarray, list[str]]]:
    """{task: (kernel [D, C], classes)} written by `save_heads` (sftjax-export of a run with task heads)."""
    from sftjax.model import safetensors_io

    directory = Path(directory)
    config, weights = directory / HEADS_CONFIG, directory / HEADS_TENSORS
    if not config.is_file() or not weights.is_file():
        raise CheckpointError(f"{directory}: no task heads ({HEADS_CONFIG} and {HEADS_TENSORS})")
    try:
        classes = json.loads(config.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{config}: invalid JSON ({e.msg}, line {e.lineno})") from None
    tensors = safetensors_io.load_file(weights)
    out = {}
    for task, names in classes.items():
        weight = tensors.get(f"{task}.weight")
        if weight is None or weight.shape[0] != len(names):
            raise CheckpointError(f"{weights}: tensor {task}.weight is missing or does not have {len(names)} rows "
                                  f"(the classes of {task} in {HEADS_CONFIG})")
        out[task] = (np.asarray(weight, np.float32).T, list(names))
    return out
