"""Classification heads against transformers' `*ForSequenceClassification` on tiny random models of every family.

Tolerance (float32, highest matmul precision so XLA:CPU does not round matmul inputs): class logits max abs diff
<= 1e-4, the causal-LM parity tolerance (test_parity.py); the pooled hidden state and a [D, 3] matmul add only
summation-order differences. Checkpoint round trips are exact.
"""

import jax
import numpy as np
import pytest
import torch
import transformers

import sftjax
from sftjax.model.classifier import classify, load_classifier, save_classifier
from tests.model import hf_models
from tests.model.hf_models import FAMILIES, VOCAB

LOGITS_ATOL = 1e-4
LABELS = ["neg", "neu", "pos"]
PAD = 0  # the tiny models' pad_token_id
LENGTHS = (13, 7)  # two rows of different lengths, right-padded to 13


@pytest.fixture(scope="module", params=FAMILIES)
def exported(request, tmp_path_factory):
    """(cfg, params, kernel, root): a tiny causal LM of one family, exported with a random head."""
    family = request.param
    root = tmp_path_factory.mktemp(family)
    hf_models.build(root / "lm", family, "gqa", seed=FAMILIES.index(family))
    cfg, params = sftjax.load_pretrained(root / "lm", dtype="float32")
    kernel = np.random.RandomState(1).normal(0, 0.5, (cfg.hidden_size, len(LABELS))).astype(np.float32)
    save_classifier(root / "cls", cfg, params, kernel, LABELS)
    return cfg, params, kernel, root


def _batch():
    """Right-padded tokens [2, T], segment_ids [2, T] (0 = padding); real tokens never equal PAD."""
    rng = np.random.RandomState(0)
    T = max(LENGTHS)
    tokens = np.full((len(LENGTHS), T), PAD, np.int32)
    segment_ids = np.zeros_like(tokens)
    for b, n in enumerate(LENGTHS):
        tokens[b, :n], segment_ids[b, :n] = rng.randint(3, VOCAB, n), 1
    return tokens, segment_ids


def test_logits_match_transformers(exported):
    cfg, params, kernel, root = exported
    model = transformers.AutoModelForSequenceClassification.from_pretrained(
        root / "cls", attn_implementation="eager", dtype=torch.float32).eval()
    assert type(model).__name__.endswith("ForSequenceClassification")
    assert model.config.architectures == [type(model).__name__]
    assert model.config.id2label == dict(enumerate(LABELS)) and model.config.label2id == {lab: i for i, lab in
                                                                                             enumerate(LABELS)}
    tokens, segment_ids = _batch()
    with torch.no_grad():
        ref = model(input_ids=torch.as_tensor(tokens).long(),
                    attention_mask=torch.as_tensor(segment_ids).long()).logits.numpy()
    with jax.default_matmul_precision("highest"):
        ours = np.asarray(classify(cfg, params, kernel, tokens, segment_ids))
    assert ours.shape == ref.shape == (len(LENGTHS), len(LABELS))
    np.testing.assert_allclose(ours, ref, rtol=0, atol=LOGITS_ATOL)


def test_checkpoint_tensors_and_round_trip(exported):
    cfg, params, kernel, root = exported
    names = set(sftjax.model.hf.read_tensors(root / "cls"))
    assert "score.weight" in names and "lm_head.weight" not in names
    cfg2, params2, kernel2, labels2 = load_classifier(root / "cls")
    assert cfg2 == cfg and labels2 == LABELS
    np.testing.assert_array_equal(kernel2, kernel)
    base = {k: v for k, v in params.items() if k != "lm_head"}  # a classifier checkpoint has no lm_head
    assert jax.tree.structure(params2) == jax.tree.structure(base)
    for a, b in zip(jax.tree.leaves(params2), jax.tree.leaves(base)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_errors(exported, tmp_path):
    cfg, params, kernel, root = exported
    with pytest.raises(sftjax.CheckpointError, match=r"id2label|score\.weight") as info:
        load_classifier(root / "lm")  # a causal LM
    assert "\n" not in str(info.value)
    with pytest.raises(sftjax.CheckpointError, match="already holds a checkpoint"):
        save_classifier(root / "lm", cfg, params, kernel, LABELS)
    with pytest.raises(sftjax.ConfigError, match="3 classes but 2 labels"):
        save_classifier(tmp_path, cfg, params, kernel, LABELS[:2])


def test_pad_token_id_argument_and_missing(tmp_path):
    cfg = sftjax.PRESETS["tiny-llama"].replace(num_layers=1, vocab_size=32, hidden_size=32, intermediate_size=48,
                                               num_heads=2, num_kv_heads=1, head_dim=16, pad_token_id=None)
    params = sftjax.init_params(cfg, jax.random.key(0))
    kernel = np.zeros((32, 2), np.float32)
    with pytest.raises(sftjax.ConfigError, match="no pad_token_id"):
        save_classifier(tmp_path / "a", cfg, params, kernel, ["no", "yes"])
    save_classifier(tmp_path / "a", cfg, params, kernel, ["no", "yes"], pad_token_id=5)
    cfg2, params2, _, labels = load_classifier(tmp_path / "a")
    assert cfg2 == cfg.replace(pad_token_id=5) and labels == ["no", "yes"] and "lm_head" not in params2
    # A saved causal LM of sftjax (no id2label in its config.json) is refused as well, naming the file.
    sftjax.save_pretrained(tmp_path / "lm", cfg, params)
    with pytest.raises(sftjax.CheckpointError, match="config.json: no 'id2label'|no tensor 'score.weight'"):
        load_classifier(tmp_path / "lm")
