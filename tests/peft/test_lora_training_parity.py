"""LoRA training, not only the forward pass, matches PEFT: the same tiny random Llama, the same initial adapters
(A copied from sftjax into PEFT, B = 0 on both sides), the same batches, AdamW with gradient clipping: every
step's loss and gradient norm agree, and so do the trained B matrices.

Tolerances (float32, highest matmul precision): losses and gradient norms within 1e-4 relative, trained lora_b
within 1e-4 absolute (entries are ~lr * steps = 5e-2).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import peft
import torch

from sftjax.config import OptimSection
from sftjax.model.hf import load_pretrained
from sftjax.objectives.sft import sft_sums
from sftjax.peft import lora
from sftjax.train.optim import make_optimizer
from sftjax.train.state import merge_params
from tests.model import hf_models

STEPS, LR = 5, 1e-2
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _batches():
    """STEPS batches [2, 16] of random tokens, the first repeated (so the loss must fall), the last two new; the
    loss on the second half of each row (a completion)."""
    rng = np.random.default_rng(0)
    out = []
    for step in range(STEPS):
        if step and step < STEPS - 2:
            out.append(out[0])
            continue
        tokens = rng.integers(3, hf_models.VOCAB, (2, 17))
        mask = np.zeros((2, 16), np.float32)
        mask[:, 8:] = 1.0
        out.append({"tokens": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": mask,
                    "segment_ids": np.ones((2, 16), np.int32), "positions": np.tile(np.arange(16), (2, 1)),
                    "task_ids": np.zeros((2, 16), np.int32)})
    return out


def test_lora_training_steps_match_peft(tmp_path):
    hf_models.build(tmp_path, "llama", seed=3)
    cfg, params = load_pretrained(tmp_path)
    spec = lora.LoraSpec(rank=4, alpha=8.0, target_modules=tuple(TARGETS))
    lcfg = lora.model_config(cfg, spec)
    adapters = lora.init_adapters(cfg, spec, jax.random.key(0))
    optimizer = make_optimizer(OptimSection(lr=LR, schedule="constant", max_grad_norm=1.0), STEPS)
    batches = _batches()

    def loss_fn(trainable, batch):
        sums = sft_sums(lcfg, merge_params(params, trainable), batch)
        return sums["loss"] / sums["weight"]

    @jax.jit
    def step(trainable, opt_state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(trainable, batch)
        updates, opt_state = optimizer.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss, optax.tree.norm(grads)

    trainable, opt_state, ours = adapters, optimizer.init(adapters), []
    for batch in batches:
        trainable, opt_state, loss, norm = step(trainable, opt_state, {k: jnp.asarray(v) for k, v in batch.items()})
        ours.append((float(loss), float(norm)))

    model = hf_models.load_hf(tmp_path)
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0))
    names = {}
    for module in lora.check_spec(cfg, spec):
        for layer in range(cfg.num_layers):
            names[(module, layer)] = f"base_model.model.{lora.hf_module_name(module, layer)}.lora_%s.default.weight"
    state = {name % "A": torch.tensor(np.asarray(lora.subtree(adapters, module)["lora_a"][layer]).T.copy())
             for (module, layer), name in names.items()}
    assert not model.load_state_dict(state, strict=False).unexpected_keys
    trained = [p for p in model.parameters() if p.requires_grad]
    torch_opt = torch.optim.AdamW(trained, lr=LR, weight_decay=0.0, eps=1e-8)
    theirs = []
    for batch in batches:
        logits = model(input_ids=torch.tensor(batch["tokens"])).logits.float()
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                torch.tensor(batch["targets"]).reshape(-1), reduction="none")
        mask = torch.tensor(batch["loss_mask"]).reshape(-1)
        loss = (nll * mask).sum() / mask.sum()
        torch_opt.zero_grad()
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(trained, 1.0)
        torch_opt.step()
        theirs.append((loss.item(), norm.item()))

    np.testing.assert_allclose(np.array(ours), np.array(theirs), rtol=1e-4)
    assert ours[STEPS - 3][0] < ours[0][0] - 0.05  # the adapters learned, so the comparison is not of no-ops
    peft_state = model.state_dict()
    for (module, layer), name in names.items():
        np.testing.assert_allclose(np.asarray(lora.subtree(trainable, module)["lora_b"][layer]).T,
                                   peft_state[name % "B"].numpy(), atol=1e-4, err_msg=name % "B")
