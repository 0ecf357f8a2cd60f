"""PyTorch / TRL reference values for the preference objectives (DPO family, SimPO, ORPO, reward model), for parity
tests of the JAX objectives.

Every function takes already-tokenized pairs, so tokenization is out of the comparison:

    pair = {"prompt_ids": [int, ...], "chosen_ids": [int, ...], "rejected_ids": [int, ...]}  (+ "margin": float)

and computes ONE batch holding all the pairs (chosen rows first, then rejected rows, right-padded), in float32 on the
CPU, with dropout off, then runs backward once. What is computed, and by which TRL (1.16) code path:

- `dpo`    : a real `trl.DPOTrainer` (policy + frozen reference), the pairs collated by the trainer's own
             `DataCollatorForPreference`, then `trainer.compute_loss(model, batch)` (-> `_compute_loss`, TRL's fused
             LM head). Per-pair log-probs are read from the model outputs TRL computes in that call (a forward hook
             sums `outputs.log_probs[:, -seq_len:]` exactly as `_compute_loss` does); metrics are what the trainer
             stored in `trainer._metrics["train"]` for this batch.
- `simpo`  : a real `trl.experimental.cpo.CPOTrainer` with `loss_type="simpo"`; the pairs are laid out as its
             `tokenize_row` would (prompt labels -100), collated by its `DPODataCollatorWithPadding`, then
             `trainer.compute_loss(model, batch, return_outputs=True)` (-> `get_batch_loss_metrics` ->
             `concatenated_forward` -> `get_batch_logps(average_log_prob=True)` -> `cpo_loss`).
- `orpo`   : a real `trl.experimental.orpo.ORPOTrainer`, same layout and path (`odds_ratio_loss`).
- `reward` : a real `trl.RewardTrainer` on `AutoModelForSequenceClassification(num_labels=1)`, the sequences collated
             by its `DataCollatorForPreference` (reward version), then `trainer.compute_loss(model, batch,
             return_outputs=True)`.

The trainers are constructed on a one-row text dataset (their constructors insist on preparing a dataset, which needs
a tokenizer: the one in `model_dir`, or a small in-memory word-level one with the model config's pad/eos/bos ids when
there is none); that dataset is never used. The given pairs bypass tokenization entirely: NO BOS or EOS is added to
them (TRL's own preprocessing would: DPO / reward append EOS to non-conversational text, CPO / ORPO's `tokenize_row`
prepends BOS and appends EOS to the token ids), so pass ids that already end the way the JAX side's do.

TRL quirks the JAX side must reproduce (read from TRL 1.16.0's code):

- DPO: log-probs are SUMS over completion tokens (the collator's `completion_mask`, shifted by one: the first
  completion token is predicted from the last prompt token; prompt and pad tokens do not count).
  `label_smoothing` is used only by `robust` (and exo_pair / aot): `sigmoid` ignores it in TRL 1.16.
  robust = (-(1-ls) logsig(b d) + ls logsig(-b d)) / (1 - 2 ls);  hinge = relu(1 - b d);
  ipo is length-normalised: each log-ratio is divided by ITS OWN completion length (count of completion tokens,
  clamp min 1) before the difference, loss = ((c-rc)/Lc - (r-rr)/Lr - 1/(2b))^2.  The loss is the mean over pairs.
  Reward metrics use the unnormalised log ratios: rewards/chosen = mean(b (c - rc)), margins = mean of the difference,
  accuracies = mean(chosen_reward > rejected_reward) (strict), logps/* = mean of the summed log-probs.
  Reference: full fine-tuning -> a separate frozen model (`ref_model_dir`, default `model_dir`); LoRA -> the same
  model with adapters disabled (only when TRL itself wraps the model from `peft_config`, which is what `dpo` does;
  a model passed in already wrapped as a PeftModel gets a frozen COPY of its adapter as reference instead).
- SimPO (CPOTrainer): log-probs are per-token AVERAGES over completion tokens (labels != -100); loss =
  (1-ls) * -logsig(b (c - r) - gamma) + ls * -logsig(-(b (c - r) - gamma)), mean over pairs, + cpo_alpha * NLL where
  NLL = torch CrossEntropyLoss over the chosen rows' completion tokens, one token-level mean over the whole batch
  (not a mean of per-sequence means). NOTE TRL's CPOConfig default is cpo_alpha=1.0; here the default is 0.0 (pure
  SimPO). rewards/* = b * average log-probs (no reference, no gamma). The nll metric is logged even when cpo_alpha=0
  (then 0.0).
- ORPO: log-probs are per-token averages over completion tokens; log_odds = (c - r) - (log1mexp(c) - log1mexp(r));
  loss = NLL - b * mean(logsig(log_odds)), where the NLL runs over the WHOLE chosen sequence, prompt included (labels
  = input ids where attention_mask == 1; every token but the first), one token-level mean over the chosen rows.
  Metric names are swapped-looking but as TRL logs them: "log_odds_ratio" = mean(logsig(log_odds)),
  "log_odds_chosen" = mean(log_odds); rewards/* = b * average log-probs.
- Reward: the score is read at the RIGHTMOST token whose id != config.pad_token_id (transformers' sequence
  classification pooling ignores attention_mask), so a sequence ending in the pad id is scored at an earlier token;
  `pad_token_id` is returned. loss = -logsig(rc - rr - margin).mean() (+ coef * mean((rc + rr)^2) when
  center_rewards_coefficient is set). accuracy = mean(rc > rr) (strict), margin = mean(rc - rr) (without the margin
  input).

Tolerances: everything is float32; the same numbers recomputed by formula from the returned log-probs agree to ~1e-6
(test_trl_reference.py); against a JAX implementation expect ~1e-5 relative (summation order, the fused LM head's
chunked log-softmax).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import warnings
from typing import Any

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import numpy as np
import torch
import transformers
from datasets import Dataset

Pair = dict  # {"prompt_ids": list[int], "chosen_ids": list[int], "rejected_ids": list[int]} (+ "margin": float)

_COMMON_ARGS = {"report_to": [], "save_strategy": "no", "logging_strategy": "no", "use_cpu": True,
                "disable_tqdm": True, "bf16": False, "fp16": False, "dataloader_num_workers": 0, "seed": 42}


# ----------------------------------------------------------------------------------------------------------- helpers
def _check_pairs(pairs: list[Pair]) -> list[Pair]:
    if not pairs:
        raise ValueError("pairs must not be empty")
    for p in pairs:
        for key in ("prompt_ids", "chosen_ids", "rejected_ids"):
            if key not in p:
                raise ValueError(f"pair is missing {key!r}: {p}")
        if not p["chosen_ids"] or not p["rejected_ids"]:
            raise ValueError("chosen_ids and rejected_ids must be non-empty")
    return [{**p, **{k: [int(t) for t in p[k]] for k in ("prompt_ids", "chosen_ids", "rejected_ids")}} for p in pairs]


def _tokenizer(model_dir, config) -> transformers.PreTrainedTokenizerBase:
    """The tokenizer saved in `model_dir`; without one, a tiny word-level tokenizer whose pad / eos / bos ids are the
    model config's (the trainers only use it for their one-row construction dataset and for the pad / eos ids)."""
    try:
        return transformers.AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError, TypeError):
        pass
    from tokenizers import Tokenizer, models, pre_tokenizers

    pad = config.pad_token_id if config.pad_token_id is not None else 0
    eos = config.eos_token_id if config.eos_token_id is not None else pad
    eos = eos[0] if isinstance(eos, list) else eos
    specials = {"<pad>": pad, "<eos>": eos}
    if getattr(config, "bos_token_id", None) is not None:
        specials["<bos>"] = config.bos_token_id
    vocab = dict(specials)
    free = (i for i in range(config.vocab_size) if i not in set(specials.values()))
    for word in ("<unk>", "a", "b", "c"):
        vocab[word] = next(free)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>",
        bos_token="<bos>" if "<bos>" in specials else None)


def _causal_lm(model_dir, attn_implementation: str):
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                              attn_implementation=attn_implementation)
    return model.eval()


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float32 if t.is_floating_point() else t.dtype).cpu().numpy()


def _grads_and_params(model: torch.nn.Module) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    grads, params = {}, {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            params[name] = _np(p)
            grads[name] = _np(p.grad) if p.grad is not None else np.zeros(tuple(p.shape), np.float32)
    return grads, params


@contextlib.contextmanager
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _text_dataset() -> Dataset:
    """One-row text dataset for the constructors (never used for the returned numbers)."""
    return Dataset.from_dict({"prompt": ["a"], "chosen": [" b"], "rejected": [" c"]})


# --------------------------------------------------------------------------------------------------------------- DPO
def dpo(model_dir, pairs: list[Pair], *, loss_type: str = "sigmoid", beta: float = 0.1, label_smoothing: float = 0.0,
        lora: dict | None = None, lora_state: dict[str, np.ndarray] | None = None, ref_model_dir=None,
        attn_implementation: str = "eager") -> dict[str, Any]:
    """TRL DPOTrainer's loss and gradients for one batch holding all `pairs`.

    Path: `DPOTrainer(model, ref_model, DPOConfig(beta, loss_type, label_smoothing, max_length=None, ...))`, pairs
    collated by `trainer.data_collator` (TRL's `DataCollatorForPreference`: rows [chosen..., rejected...], right-padded
    with the tokenizer's pad id, `completion_mask` = 1 on chosen / rejected tokens), `trainer._prepare_inputs`, model in
    train mode (TRL disables dropout), `trainer.compute_loss(trainer.model, batch)`, `loss.backward()`.

    Full fine-tuning (lora=None): reference = a second model loaded from `ref_model_dir` (default `model_dir`), passed
    as `ref_model`. LoRA: `lora` = LoraConfig kwargs (task_type defaults to CAUSAL_LM; lm_head may not be a target: TRL
    refuses it), given to TRL as `peft_config`, so TRL wraps the model and its reference is the base model with adapters
    disabled; `lora_state` (PEFT parameter name as `trainer.model.named_parameters()` gives it -> value) is loaded into
    the adapter after construction (set lora_B non-zero, otherwise policy == reference). The adapter's initial values
    come from PEFT's init under TRL's `set_seed(42)`; they are returned in "params".

    Returns {"loss": float, "grads": {name: array} (parameters with requires_grad, names from
    `trainer.model.named_parameters()`), "params": {name: array} (their values), "metrics": {name: float} (everything
    TRL logged for this batch: rewards/chosen, rewards/rejected, rewards/accuracies, rewards/margins, logps/chosen,
    logps/rejected, logits/*, entropy, mean_token_accuracy, num_tokens), "chosen_logps", "rejected_logps",
    "ref_chosen_logps", "ref_rejected_logps": arrays [N] (sums over completion tokens), "batch": the collated
    input_ids / attention_mask / completion_mask as arrays [2N, T], "pad_token_id": int}.
    """
    from trl import DPOConfig, DPOTrainer

    pairs = _check_pairs(pairs)
    if ref_model_dir is not None and lora is not None:
        raise ValueError("ref_model_dir applies to full fine-tuning only (with LoRA the reference is adapters-off)")
    if lora_state and lora is None:
        raise ValueError("lora_state needs lora")
    model = _causal_lm(model_dir, attn_implementation)
    tokenizer = _tokenizer(model_dir, model.config)
    peft_config = None
    ref_model = None
    if lora is not None:
        from peft import LoraConfig

        peft_config = LoraConfig(**{"task_type": "CAUSAL_LM", **lora})
    else:
        ref_model = _causal_lm(ref_model_dir if ref_model_dir is not None else model_dir, attn_implementation)

    with tempfile.TemporaryDirectory() as out, _quiet():
        args = DPOConfig(output_dir=out, beta=beta, loss_type=loss_type, label_smoothing=label_smoothing,
                         per_device_train_batch_size=len(pairs), max_length=None, **_COMMON_ARGS)
        trainer = DPOTrainer(model=model, ref_model=ref_model, args=args, train_dataset=_text_dataset(),
                             processing_class=tokenizer, peft_config=peft_config)
        policy = trainer.model
        if lora_state:
            named = dict(policy.named_parameters())
            with torch.no_grad():
                for name, value in lora_state.items():
                    if name not in named:
                        lora_names = [n for n in named if "lora_" in n]
                        raise KeyError(f"{name!r} is not a parameter of the PEFT model; LoRA parameters: {lora_names}")
                    named[name].copy_(torch.as_tensor(np.asarray(value), dtype=named[name].dtype))

        # Capture the per-token log-probs of the policy (grad enabled) and reference (no grad) forwards of this call.
        captured: dict[str, torch.Tensor] = {}

        def hook(_module, _args, output):
            key = "policy" if torch.is_grad_enabled() else "ref"
            captured.setdefault(key, output.log_probs.detach())

        handles = [policy.register_forward_hook(hook)]
        if trainer.ref_model is not None:
            handles.append(trainer.ref_model.register_forward_hook(hook))
        batch = trainer._prepare_inputs(trainer.data_collator(pairs))
        policy.train()
        policy.zero_grad(set_to_none=True)
        try:
            loss = trainer.compute_loss(policy, batch)
            loss.backward()
        finally:
            for h in handles:
                h.remove()

        seq_len = batch["completion_mask"].shape[1] - 1
        chosen, rejected = captured["policy"][:, -seq_len:].sum(dim=1).chunk(2, dim=0)
        ref_chosen, ref_rejected = captured["ref"][:, -seq_len:].sum(dim=1).chunk(2, dim=0)
        metrics = {k: float(v[-1]) for k, v in trainer._metrics["train"].items() if v}
        grads, params = _grads_and_params(policy)
        return {"loss": float(loss.detach()), "grads": grads, "params": params, "metrics": metrics,
                "chosen_logps": _np(chosen), "rejected_logps": _np(rejected),
                "ref_chosen_logps": _np(ref_chosen), "ref_rejected_logps": _np(ref_rejected),
                "batch": {k: _np(batch[k]) for k in ("input_ids", "attention_mask", "completion_mask")},
                "pad_token_id": int(tokenizer.pad_token_id)}


# ----------------------------------------------------------------------------------------------- SimPO / ORPO (paired)
def _paired_features(pairs: list[Pair]) -> list[dict[str, list[int]]]:
    """The rows CPO / ORPO's `tokenize_row` produce, from token ids (no BOS / EOS added): prompt ids, prompt+answer ids
    with all-ones attention masks, labels = prompt+answer ids with the prompt positions set to -100."""
    rows = []
    for p in pairs:
        row = {"prompt_input_ids": p["prompt_ids"], "prompt_attention_mask": [1] * len(p["prompt_ids"])}
        for side in ("chosen", "rejected"):
            ids = p["prompt_ids"] + p[f"{side}_ids"]
            row[f"{side}_input_ids"] = ids
            row[f"{side}_attention_mask"] = [1] * len(ids)
            row[f"{side}_labels"] = [-100] * len(p["prompt_ids"]) + p[f"{side}_ids"]
        rows.append(row)
    return rows


def _run_paired(trainer, pairs: list[Pair]) -> dict[str, Any]:
    """Collate with the trainer's DPODataCollatorWithPadding and run its compute_loss (-> get_batch_loss_metrics)."""
    captured = {}
    original = trainer.concatenated_forward

    def concatenated_forward(model, batch):
        out = original(model, batch)
        captured["chosen"], captured["rejected"] = out[0].detach(), out[1].detach()
        return out

    trainer.concatenated_forward = concatenated_forward
    batch = trainer.data_collator(_paired_features(pairs))
    policy = trainer.model
    policy.train()
    policy.zero_grad(set_to_none=True)
    loss, metrics = trainer.compute_loss(policy, batch, return_outputs=True)
    loss.backward()
    grads, params = _grads_and_params(policy)
    return {"loss": float(loss.detach()), "grads": grads, "params": params,
            "metrics": {k: float(v) for k, v in metrics.items()},
            "chosen_logps": _np(captured["chosen"]), "rejected_logps": _np(captured["rejected"]),
            "batch": {k: _np(v) for k, v in batch.items() if isinstance(v, torch.Tensor)},
            "pad_token_id": int(trainer.processing_class.pad_token_id)}


def simpo(model_dir, pairs: list[Pair], *, beta: float = 0.1, simpo_gamma: float = 0.5, cpo_alpha: float = 0.0,
          label_smoothing: float = 0.0, attn_implementation: str = "eager") -> dict[str, Any]:
    """SimPO as `trl.experimental.cpo.CPOTrainer(loss_type="simpo")` computes it, for one batch holding all `pairs`.

    Path: a real CPOTrainer (CPOConfig(loss_type="simpo", beta, simpo_gamma, cpo_alpha, label_smoothing)); the pairs
    are laid out as `tokenize_row` would lay out token ids (chosen/rejected input_ids = prompt + answer, labels with
    the prompt at -100; no BOS/EOS added), collated by `trainer.data_collator` (DPODataCollatorWithPadding: ids padded
    with the pad id, labels with -100, masks with 0), then `trainer.compute_loss(model, batch, return_outputs=True)` ->
    `get_batch_loss_metrics` -> `concatenated_forward` (one forward over [chosen; rejected], padded to the longer
    side) -> `get_batch_logps(average_log_prob=True)` -> `cpo_loss`. Backward on that loss.

    Returns {"loss", "grads", "params", "metrics" (rewards/chosen, rewards/rejected, rewards/accuracies,
    rewards/margins, logps/chosen, logps/rejected, logits/chosen, logits/rejected, nll_loss, as returned by
    get_batch_loss_metrics), "chosen_logps", "rejected_logps" (per-token AVERAGE log-probs [N]), "batch",
    "pad_token_id"}.
    """
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    pairs = _check_pairs(pairs)
    model = _causal_lm(model_dir, attn_implementation)
    tokenizer = _tokenizer(model_dir, model.config)
    with tempfile.TemporaryDirectory() as out, _quiet():
        args = CPOConfig(output_dir=out, loss_type="simpo", beta=beta, simpo_gamma=simpo_gamma, cpo_alpha=cpo_alpha,
                         label_smoothing=label_smoothing, per_device_train_batch_size=len(pairs), max_length=1024,
                         remove_unused_columns=False, **_COMMON_ARGS)
        trainer = CPOTrainer(model=model, args=args, train_dataset=_text_dataset(), processing_class=tokenizer)
        return _run_paired(trainer, pairs)


def orpo(model_dir, pairs: list[Pair], *, beta: float = 0.1, attn_implementation: str = "eager") -> dict[str, Any]:
    """ORPO as `trl.experimental.orpo.ORPOTrainer` computes it, for one batch holding all `pairs`.

    Path: a real ORPOTrainer (ORPOConfig(beta)); same batch layout and call chain as `simpo` (`compute_loss` ->
    `get_batch_loss_metrics` -> `concatenated_forward` -> `get_batch_logps(average_log_prob=True)` ->
    `odds_ratio_loss`); loss = chosen NLL (whole chosen sequence, prompt included) - beta * mean(logsigmoid(log_odds)).

    Returns {"loss", "grads", "params", "metrics" (rewards/*, logps/*, logits/*, nll_loss, log_odds_ratio,
    log_odds_chosen, as returned by get_batch_loss_metrics), "chosen_logps", "rejected_logps" (per-token AVERAGE
    log-probs over completion tokens [N]), "batch", "pad_token_id"}.
    """
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    pairs = _check_pairs(pairs)
    model = _causal_lm(model_dir, attn_implementation)
    tokenizer = _tokenizer(model_dir, model.config)
    with tempfile.TemporaryDirectory() as out, _quiet():
        args = ORPOConfig(output_dir=out, beta=beta, per_device_train_batch_size=len(pairs), max_length=1024,
                          remove_unused_columns=False, **_COMMON_ARGS)
        trainer = ORPOTrainer(model=model, args=args, train_dataset=_text_dataset(), processing_class=tokenizer)
        return _run_paired(trainer, pairs)


# ------------------------------------------------------------------------------------------------------------ reward
def reward(model_dir, pairs: list[Pair], *, center_rewards_coefficient: float | None = None,
           score_weight: np.ndarray | None = None, score_seed: int = 0,
           attn_implementation: str = "eager") -> dict[str, Any]:
    """TRL RewardTrainer's loss and gradients for one batch holding all `pairs`.

    Path: `AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1)` (float32; its `score` weight
    [1, D] set to `score_weight`, else N(0, 1/D) from a torch generator seeded with `score_seed`), a real
    `RewardTrainer(RewardConfig(center_rewards_coefficient))` (which sets config.pad_token_id = tokenizer pad id), the
    sequences prompt+chosen / prompt+rejected (+ "margin", all pairs or none) collated by `trainer.data_collator`
    (rows [chosen..., rejected...], right-padded with the pad id), then `trainer.compute_loss(model, batch,
    return_outputs=True)` and backward.

    Returns {"loss", "grads" (names from model.named_parameters(), score.weight included), "params", "metrics"
    (accuracy, margin, min_reward, mean_reward, max_reward, num_tokens), "rewards_chosen", "rewards_rejected" [N],
    "score_weight" [1, D], "batch", "pad_token_id"}.
    """
    from trl import RewardConfig, RewardTrainer
    from trl.trainer.reward_trainer import suppress_seqcls_warning

    pairs = _check_pairs(pairs)
    has_margin = ["margin" in p for p in pairs]
    if any(has_margin) and not all(has_margin):
        raise ValueError("give a margin for every pair or for none (TRL's collator reads the first pair)")
    with suppress_seqcls_warning(), _quiet():
        model = transformers.AutoModelForSequenceClassification.from_pretrained(
            model_dir, num_labels=1, dtype=torch.float32, attn_implementation=attn_implementation).eval()
    hidden = model.score.weight.shape[1]
    if score_weight is None:
        gen = torch.Generator().manual_seed(score_seed)
        weight = torch.randn((1, hidden), generator=gen) / hidden**0.5
    else:
        weight = torch.as_tensor(np.asarray(score_weight, np.float32)).reshape(1, hidden)
    with torch.no_grad():
        model.score.weight.copy_(weight)
    tokenizer = _tokenizer(model_dir, model.config)

    features = []
    for p in pairs:
        row = {"chosen_ids": p["prompt_ids"] + p["chosen_ids"], "rejected_ids": p["prompt_ids"] + p["rejected_ids"]}
        if "margin" in p:
            row["margin"] = float(p["margin"])
        features.append(row)
    with tempfile.TemporaryDirectory() as out, _quiet():
        args = RewardConfig(output_dir=out, center_rewards_coefficient=center_rewards_coefficient,
                            per_device_train_batch_size=len(pairs), max_length=None, **_COMMON_ARGS)
        dataset = Dataset.from_dict({"chosen_ids": [features[0]["chosen_ids"]],
                                     "rejected_ids": [features[0]["rejected_ids"]]})
        trainer = RewardTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
        batch = trainer._prepare_inputs(trainer.data_collator(features))
        batch_np = {k: _np(v) for k, v in batch.items() if isinstance(v, torch.Tensor)}
        policy = trainer.model
        policy.train()
        policy.zero_grad(set_to_none=True)
        loss, outputs = trainer.compute_loss(policy, batch, return_outputs=True)
        loss.backward()
        rewards_chosen, rewards_rejected = outputs.logits.detach().squeeze(-1).chunk(2)
        metrics = {k: float(v[-1]) for k, v in trainer._metrics["train"].items() if v}
        grads, params = _grads_and_params(policy)
        return {"loss": float(loss.detach()), "grads": grads, "params": params, "metrics": metrics,
                "rewards_chosen": _np(rewards_chosen), "rewards_rejected": _np(rewards_rejected),
                "score_weight": _np(weight), "batch": batch_np,
                "pad_token_id": int(policy.config.get_text_config().pad_token_id)}


__all__ = ["Pair", "dpo", "orpo", "reward", "simpo"]
