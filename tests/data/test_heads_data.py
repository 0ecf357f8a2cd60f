"""Classification-head datasets through the pipeline: labels, classes, prompt-only tokens, class_ids at the last
token of each packed segment, truncation that keeps the end, and LM datasets unchanged beside them."""

import dataclasses
import hashlib
import json
import re

import numpy as np
import pytest
from transformers import AutoTokenizer

from sftjax.cli.data import main as data_main
from sftjax.data.errors import DataError
from sftjax.data.formats import read_dataset
from sftjax.data.masking import Tokenized, tokenize_examples
from sftjax.data.packing import fit_length
from sftjax.data.pipeline import DataConfig, DataIterator, DatasetSpec, fingerprint, prepare
from sftjax.data.tokenizer import load_tokenizer

from .conftest import make_tokenizer_dir
from .test_formats import write_jsonl

CLASSES = ("negative", "neutral", "positive")
WORDS = ["hello", "world", "how", "are", "you", "today", "fine", "thanks", "quick", "brown", "fox", "lazy", "dog"]


@pytest.fixture(scope="session")
def llama3_dir(tmp_path_factory):
    """A tokenizer whose post-processor adds BOS (<|begin_of_text|>)."""
    return make_tokenizer_dir(tmp_path_factory.mktemp("tok"), "llama3")


def head_records(n, seed, classes=CLASSES):
    rng = np.random.default_rng(seed)
    return [{"prompt": f"{i} " + " ".join(rng.choice(WORDS, rng.integers(1, 10))) + "\nsentiment:",
             "completion": f" {classes[i % len(classes)]}\n"} for i in range(n)]


def lm_records(n):
    return [{"prompt": f"{i} {WORDS[i % 13]}", "completion": " fox dog"} for i in range(n)]


def config(specs, **kw):
    return DataConfig(datasets=specs, **{"seq_len": 64, "per_device_batch": 2, "pack_window": 16, **kw})


def test_labels_from_label_field_completions_and_chat_final_turns(tmp_path):
    path = write_jsonl(tmp_path / "pc.jsonl", [
        {"prompt": "a", "completion": " pos \n"},
        {"prompt": "b", "completion": "ignored", "label": "neg"},
        {"prompt": "c", "label": 1},  # a label field stands for the completion
        {"prompt": "d", "label": True},
    ])
    examples = read_dataset(path, head=True)
    assert [e.label for e in examples] == ["pos", "neg", "1", "true"]
    assert [(e.prompt, e.completion) for e in examples][:2] == [("a", ""), ("b", "")]  # the prompt only
    lm = write_jsonl(tmp_path / "lm.jsonl", [{"prompt": "a", "completion": "b", "label": 3.5}])
    [ex] = read_dataset(lm)  # no head: the label field is ignored
    assert (ex.label, ex.prompt, ex.completion) == (None, "a", "b")

    alpaca = write_jsonl(tmp_path / "alpaca.jsonl", [{"instruction": "Rate it", "input": "great", "output": "5"},
                                                     {"instruction": "Rate it", "label": False}])
    examples = read_dataset(alpaca, head=True)
    assert [e.label for e in examples] == ["5", "false"] and examples[0].prompt.endswith("### Response:\n")
    [as_chat, _] = read_dataset(alpaca, head=True, as_chat=True)
    assert as_chat.messages == ({"role": "user", "content": "Rate it\n\ngreat"},) and as_chat.label == "5"

    chat = write_jsonl(tmp_path / "chat.jsonl", [
        {"messages": [{"role": "system", "content": "Classify."}, {"role": "user", "content": "great!"},
                      {"role": "assistant", "content": " positive "}]},
        {"messages": [{"role": "user", "content": "meh"}], "label": "neutral"},  # a label field: messages whole
    ])
    first, second = read_dataset(chat, head=True)
    assert first.label == "positive" and [m["role"] for m in first.messages] == ["system", "user"]
    assert second.label == "neutral" and len(second.messages) == 1


@pytest.mark.parametrize("record, message", [
    ({"prompt": "a", "completion": "  "}, "no label (a head dataset needs a 'label' field or a non-empty completion)"),
    ({"prompt": "a", "label": ""}, "no label (a head dataset needs a 'label' field or a non-empty completion)"),
    ({"prompt": "a", "label": 1.5}, "field 'label' must be a string, integer or boolean, got number 1.5"),
    ({"prompt": "a", "label": ["x"]}, "field 'label' must be a string, integer or boolean, got array"),
    ({"messages": [{"role": "user", "content": "a"}]}, "no label (a head dataset needs a 'label' field"),
    ({"text": "a"}, "format text cannot have a classification head"),
])
def test_bad_head_records_name_file_and_line(tmp_path, record, message):
    good = {"messages": [{"role": "user", "content": "ok"}, {"role": "assistant", "content": "x"}]} \
        if "messages" in record else {"prompt": "ok", "completion": "x"}
    first = [] if "text" in record else [good]  # the first record decides the format
    path = write_jsonl(tmp_path / "d.jsonl", first + [record])
    line = len(first) + 1
    with pytest.raises(DataError, match=f"^{re.escape(f'{path}:{line}: {message}')}") as e:
        read_dataset(path, head=True)
    assert "\n" not in str(e.value)


def test_text_format_cannot_have_a_head(chatml_dir, tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "hello world"}])
    with pytest.raises(DataError, match=f"^{re.escape(str(path))}:1: format text cannot have a classification"):
        prepare(config([DatasetSpec(str(path), format="text", head=True)]), load_tokenizer(chatml_dir))
    empty = write_jsonl(tmp_path / "e.jsonl", [{"prompt": "", "completion": c} for c in ("a", "b")])
    with pytest.raises(DataError, match=f"^{re.escape(str(empty))}:1: the prompt is empty"):  # no BOS to read
        prepare(config([DatasetSpec(str(empty), head=True)]), load_tokenizer(chatml_dir))


def test_head_examples_are_the_prompt_only(template_dir, tmp_path):
    """Plain: the prompt with the post-processor's special tokens, no EOS. Chat: rendered with the generation
    prompt. Reference: transformers' tokenizer of the same directory. Nothing is trained as text."""
    ref = AutoTokenizer.from_pretrained(template_dir)
    tok = load_tokenizer(template_dir)
    messages = [{"role": "system", "content": "Classify the review."}, {"role": "user", "content": "Hello world"}]
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": messages + [{"role": "assistant", "content": "pos"}]}])
    plain = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "Hello world\nsentiment:", "completion": " pos"}])
    [chat_ex], [plain_ex] = read_dataset(path, head=True), read_dataset(plain, head=True)
    for mode in ("completion", "all"):
        chat_tok, plain_tok = tokenize_examples([chat_ex, plain_ex], tok, mode=mode, append_eos=True)
        text = ref.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert chat_tok.tokens.tolist() == ref(text, add_special_tokens=False)["input_ids"]
        assert plain_tok.tokens.tolist() == ref("Hello world\nsentiment:")["input_ids"]
        assert plain_tok.tokens[-1] != tok.eos_id
        for t in (chat_tok, plain_tok):
            assert not t.mask.any() and t.label == -1  # the pipeline sets the class index


def test_classes_given_or_collected(chatml_dir, tmp_path):
    tok = load_tokenizer(chatml_dir)
    path = str(write_jsonl(tmp_path / "sent.jsonl", head_records(12, 0)))
    collected = prepare(config([DatasetSpec(path, head=True)]), tok)
    assert collected.labels == (CLASSES,)  # sorted
    given = ("positive", "negative", "neutral", "unseen")
    ordered = prepare(config([DatasetSpec(path, head=True, labels=given)]), tok)
    assert ordered.labels == (given,)
    for a, b in zip(collected.datasets[0], ordered.datasets[0]):
        assert given[b.label] == CLASSES[a.label]
        np.testing.assert_array_equal(a.tokens, b.tokens)
    st = ordered.stats[0]
    assert (st.records, st.kept, st.head_examples, st.trained_tokens, st.dropped_empty_mask) == (12, 12, 12, 0, 0)
    assert [e.label for e in ordered.datasets[0][:3]] == [1, 2, 0]  # negative, neutral, positive

    with pytest.raises(DataError, match=f"^{re.escape(path)}:3: label 'positive' is not one of the classes of "
                                        "sent: negative, neutral$"):
        prepare(config([DatasetSpec(path, head=True, labels=("negative", "neutral"))]), tok)
    with pytest.raises(DataError, match="name a class twice"):
        prepare(config([DatasetSpec(path, head=True, labels=("a", "a"))]), tok)
    one = str(write_jsonl(tmp_path / "one.jsonl", head_records(4, 0, classes=("yes",))))
    with pytest.raises(DataError, match=f"^{re.escape(one)}: a head dataset needs at least 2 classes, got 1 \\(yes\\)"):
        prepare(config([DatasetSpec(one, head=True)]), tok)


def test_class_ids_at_the_last_token_of_each_packed_head_segment(llama3_dir, tmp_path):
    """bfd packing over a mixture of a head task and an LM task: each head segment carries its class index at its
    last token and nothing in loss_mask; the LM task is exactly what it is without the head task beside it."""
    tok = load_tokenizer(llama3_dir)
    heads = str(write_jsonl(tmp_path / "sent.jsonl", head_records(23, 1)))
    lm = str(write_jsonl(tmp_path / "lm.jsonl", lm_records(11)))
    prepared = prepare(config([DatasetSpec(heads, head=True), DatasetSpec(lm)]), tok)
    assert prepared.labels == (CLASSES, None)
    alone = prepare(config([DatasetSpec(lm)]), tok)
    assert alone.labels == (None,)
    for a, b in zip(alone.datasets[0], prepared.datasets[1]):  # the LM task is unchanged
        assert a.label == b.label == -1
        np.testing.assert_array_equal(a.tokens, b.tokens)
        np.testing.assert_array_equal(a.mask, b.mask)
    assert dataclasses.asdict(alone.stats[0]) == dataclasses.asdict(prepared.stats[1])

    expected = {(t, tuple(e.tokens.tolist())): e for t, d in enumerate(prepared.datasets) for e in d}
    seen = 0
    for batch in DataIterator(prepared, devices=2):
        assert batch["class_ids"].shape == (2, 2, 64) and batch["class_ids"].dtype == np.int32
        rows = {k: v.reshape(-1, 64) for k, v in batch.items()}
        assert (rows["class_ids"][rows["segment_ids"] == 0] == -1).all()  # padding
        for r in range(len(rows["tokens"])):
            for s in range(1, rows["segment_ids"][r].max() + 1):
                where = np.flatnonzero(rows["segment_ids"][r] == s)
                task = int(rows["task_ids"][r, where[0]])
                ex = expected[(task, tuple(rows["tokens"][r, where].tolist()))]
                class_ids = rows["class_ids"][r, where]
                assert (class_ids[:-1] == -1).all() and class_ids[-1] == ex.label
                if task == 0:
                    assert 0 <= ex.label < 3 and not rows["loss_mask"][r, where].any()
                else:
                    assert ex.label == -1
                    np.testing.assert_array_equal(rows["loss_mask"][r, where[:-1]], ex.mask[1:])
                seen += 1
    assert seen == 23 + 11


def test_truncation_keeps_bos_and_the_last_token(llama3_dir, tmp_path):
    ex = Tokenized(np.array([1, 10, 11, 12, 13, 14], np.int32), np.zeros(6, bool), "x:1", label=2)
    fitted = fit_length(ex, 4, "truncate", bos_id=1)
    assert fitted.tokens.tolist() == [1, 12, 13, 14] and fitted.label == 2 and not fitted.mask.any()

    tok = load_tokenizer(llama3_dir)
    long = [{"prompt": "hello world " * 40 + "\nsentiment:", "completion": c} for c in ("pos", "neg")]
    path = str(write_jsonl(tmp_path / "long.jsonl", long))
    whole = prepare(config([DatasetSpec(path, head=True)], seq_len=512), tok).datasets[0][0]
    prepared = prepare(config([DatasetSpec(path, head=True)], seq_len=16), tok)
    fitted = prepared.datasets[0][0]
    assert prepared.stats[0].truncated == 2 and prepared.stats[0].kept == 2
    assert fitted.tokens.tolist() == [tok.bos_id] + whole.tokens[-15:].tolist() and fitted.label == whole.label
    with pytest.raises(DataError, match=r"long.jsonl:1: example has \d+ tokens, more than seq_len=16"):
        prepare(config([DatasetSpec(path, head=True)], seq_len=16, over_long="error"), tok)
    with pytest.raises(DataError, match=r"long.jsonl: no example kept \(2 records, 2 over seq_len=16\)"):
        prepare(config([DatasetSpec(path, head=True)], seq_len=16, over_long="drop"), tok)


def test_fingerprint_changes_with_head_and_classes_only(chatml_dir, tmp_path):
    tok = load_tokenizer(chatml_dir)
    path = str(write_jsonl(tmp_path / "sent.jsonl", head_records(9, 2)))
    lm = prepare(config([DatasetSpec(path)]), tok)
    head = prepare(config([DatasetSpec(path, head=True)]), tok)
    other_order = prepare(config([DatasetSpec(path, head=True, labels=tuple(reversed(CLASSES)))]), tok)
    assert len({fingerprint(lm), fingerprint(head), fingerprint(other_order)}) == 3
    with pytest.raises(DataError, match="fingerprint differ"):
        DataIterator(head, state=DataIterator(lm).state())
    # Without heads the fingerprint is the one of before heads existed (saved iterator states still resume).
    cfg = lm.config
    keys = {"sizes": [len(d) for d in lm.datasets], "tokens": [s.tokens for s in lm.stats],
            "weights": [d.weight for d in cfg.datasets], "seq_len": cfg.seq_len, "packing": cfg.packing,
            "pack_window": cfg.pack_window, "mask": cfg.mask, "append_eos": cfg.append_eos,
            "over_long": cfg.over_long}
    assert fingerprint(lm) == hashlib.sha256(json.dumps(keys, sort_keys=True).encode()).hexdigest()[:16]


def test_eval_splits_use_the_training_classes(chatml_dir, tmp_path, capsys):
    """Through sftjax-data (build_data): data.eval takes data.train's classes; eval_fraction keeps them whole."""
    train = write_jsonl(tmp_path / "train.jsonl", head_records(9, 3))
    good = write_jsonl(tmp_path / "good.jsonl", head_records(2, 4))  # negative, neutral only
    bad = write_jsonl(tmp_path / "bad.jsonl", head_records(2, 5) + [{"prompt": "x", "completion": "angry"}])
    common = [f"model.tokenizer={chatml_dir}", "data.seq_len=64", f"data.train=[{{path:'{train}',head:true}}]"]

    assert data_main(common + [f"data.eval=[{{path:'{good}'}}]", "--json", "--show", "1"]) == 0
    result = json.loads(capsys.readouterr().out)
    [train_task], [eval_task] = result["train"]["tasks"], result["eval"]["tasks"]
    assert train_task["classes"] == {"negative": 3, "neutral": 3, "positive": 3}
    assert eval_task["classes"] == {"negative": 1, "neutral": 1, "positive": 0}
    assert train_task["examples"][0]["label"] == "negative" and train_task["examples"][0]["class_id"] == 0
    assert train_task["head_examples"] == 9 and train_task["trained_tokens"] == 0

    assert data_main(common + [f"data.eval=[{{path:'{bad}'}}]"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"{bad}:3: label 'angry' is not one of the classes of bad: negative, neutral, " \
                                "positive" in err

    assert data_main(common + ["data.eval_fraction=0.34", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    held = result["eval"]["tasks"][0]["classes"]
    assert list(held) == list(CLASSES) and sum(held.values()) == 4

    assert data_main(common + ["data.eval_fraction=0.34"]) == 0
    out = capsys.readouterr().out
    assert "head: 3 classes" in out and "head example: label 'negative', class 0" in out
