"""Preference-pair data, from the record to the packed row, against independent references.

  * formats: TRL's three record shapes (text, conversational with an explicit prompt, conversational with an
    implicit prompt), the implicit text prompt compared with TRL's own `trl.data_utils.extract_prompt`, format
    detection and `as_chat`, and one-line `file:line` errors for every bad record.
  * tokenization (`tokenize_pairs`, the byte-level BPE fixtures of conftest.py): prompt tokens equal the encoding
    of the prompt alone (text: transformers' `PreTrainedTokenizerFast(tokenizer_file=...)` with special tokens;
    chat: transformers' `apply_chat_template(add_generation_prompt=True)`), completion tokens equal the encoding
    of the completion alone + EOS, even where the BPE merges across the prompt/completion boundary (a split found
    by search, the merge checked with transformers' offsets); chat sequences equal transformers'
    `apply_chat_template(prompt + answer, tokenize=True)` for the ChatML fixture (the llama3 fixture: the same text,
    whose header "\n\n" is one token as at the end of the prompt alone, where the joint encoding has two); masks
    cover exactly the reply and its end of turn; one BOS per sequence; no duplicated EOS; identical pairs dropped
    and counted.
  * truncation (`packing.fit_length` on pairs): hand-computed cases and a property test against the rule written
    out independently.
  * packing (`build_rows(pairs=True)`) and `sequence_index`: every row checked segment by segment against the pairs.
  * pipeline (`prepare`, `DataIterator`): mixing pairs with SFT data refused, PAIR_KEYS in every batch, each pair
    once and whole in one row, the fingerprint marks pair data.
"""

import dataclasses
import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from sftjax.data.errors import DataError
from sftjax.data.formats import Pair, common_text_prefix, detect_format, read_dataset
from sftjax.data.packing import PAIR_KEYS, ROW_KEYS, build_rows, empty_rows, fit_length, pack_bins
from sftjax.data.pipeline import DataConfig, DataIterator, DatasetSpec, fingerprint, prepare
from sftjax.data.preference import pair_tokens, parts, tokenize_pairs
from sftjax.data.tokenizer import load_tokenizer
from sftjax.objectives.pairs import pair_slots, sequence_index, with_sequences

from .conftest import CORPUS
from .test_formats import write_jsonl

DATE = "24 Nov 2026"
KW = {"date_string": DATE}  # the llama3 fixture template prints today's date unless given one
SYSTEM = {"role": "system", "content": "Answer briefly."}
USER = {"role": "user", "content": "Hello world, how are you today?"}
WORDS = ["hello", "world", "how", "are", "you", "today", "fine", "thanks", "quick", "brown", "fox", "lazy", "dog"]


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def one_pair(tmp_path, record, **kw):
    [pair] = read_dataset(write_jsonl(tmp_path / "p.jsonl", [record]), **kw)
    assert isinstance(pair, Pair)
    return pair


def reference_ids(ref, messages, **kw):
    """transformers' apply_chat_template(tokenize=True) ids (a BatchEncoding in transformers 5, a list before)."""
    out = ref.apply_chat_template(list(messages), tokenize=True, date_string=DATE, **kw)
    return list(out["input_ids"] if not isinstance(out, list) else out)


llama3_only = pytest.mark.parametrize("template_dir", ["llama3"], indirect=True)


# ----------------------------------------------------------------------------------------------------- formats


def test_text_pair_with_prompt(tmp_path):
    pair = one_pair(tmp_path, {"prompt": "The sky is", "chosen": " blue.", "rejected": " green.", "margin": 2,
                               "id": 7})
    assert (pair.prompt, pair.chosen, pair.rejected, pair.margin) == ("The sky is", " blue.", " green.", 2.0)
    assert not pair.is_chat and pair.where == f"{tmp_path}/p.jsonl:1"
    assert one_pair(tmp_path, {"prompt": "", "chosen": "a", "rejected": "b"}).margin is None


TRL_TEXT_CASES = [
    ("The sky is blue.", "The sky is green."),  # differs at a word start: the prompt stops before the space
    ("The quick brown fox", "The quick broken fox"),  # differs inside a word: the prompt ends mid-word
    ("The answer is 42", "The answer is 43"),
    ("Hello world, how are you?", "Hello there"),
    ("日本語のテキスト です", "日本語のテキスト でした"),
    ("Ünïcödé a", "Ünïcödé  b"),  # a run of spaces: only the last space before the difference moves
]


@pytest.mark.parametrize("chosen,rejected", TRL_TEXT_CASES)
def test_text_pair_without_prompt_is_trl_extract_prompt(tmp_path, chosen, rejected):
    from trl.data_utils import extract_prompt

    expected = extract_prompt({"chosen": chosen, "rejected": rejected})
    pair = one_pair(tmp_path, {"chosen": chosen, "rejected": rejected})
    assert (pair.prompt, pair.chosen, pair.rejected) == (expected["prompt"], expected["chosen"], expected["rejected"])
    assert common_text_prefix(chosen, rejected) == expected["prompt"]
    assert pair.prompt + pair.chosen == chosen and pair.prompt + pair.rejected == rejected


def test_common_prefix_edges():
    """Where TRL's loop has no difference to stop at (one string a prefix of the other, or a difference at the
    first character), sftjax keeps the whole common prefix / an empty prompt."""
    assert common_text_prefix("Yes", "No") == ""
    assert common_text_prefix(" a", " b") == ""  # no prompt left to back off into
    assert common_text_prefix("abc", "abcd") == "abc"
    assert common_text_prefix("same", "same") == "same"


def test_conversational_explicit_prompt(tmp_path):
    prompt = [SYSTEM, USER]
    lists = one_pair(tmp_path, {"prompt": prompt, "chosen": [assistant("Fine.")],
                                "rejected": [assistant("Bad.")]})
    strings = one_pair(tmp_path, {"prompt": prompt, "chosen": "Fine.", "rejected": "Bad."})
    assert lists == strings
    assert lists.is_chat and lists.prompt == tuple(prompt)
    assert lists.chosen == (assistant("Fine."),) and lists.rejected == (assistant("Bad."),)


def test_conversational_implicit_prompt(tmp_path):
    from trl.data_utils import extract_prompt

    history = [SYSTEM, USER, assistant("Fine."), user("And you?")]
    record = {"chosen": history + [assistant("Great.")], "rejected": history + [assistant("Awful.")], "margin": 0.5}
    pair = one_pair(tmp_path, record)
    expected = extract_prompt(record)
    assert pair.prompt == tuple(expected["prompt"]) == tuple(history)
    assert pair.chosen == tuple(expected["chosen"]) and pair.rejected == tuple(expected["rejected"])
    assert pair.margin == 0.5


def test_format_detection_and_override(tmp_path):
    assert detect_format({"prompt": "p", "chosen": "c", "rejected": "r"}, "x:1") == "preference"
    assert detect_format({"chosen": [], "rejected": []}, "x:1") == "preference"
    forced = one_pair(tmp_path, {"prompt": "p", "chosen": "c", "rejected": "r", "completion": "x"},
                      format="preference")
    assert forced.chosen == "c"
    path = write_jsonl(tmp_path / "m.jsonl", [{"prompt": "p", "chosen": "c", "rejected": "r"},
                                              {"prompt": "p", "completion": "c"}])
    with pytest.raises(DataError, match=rf"^{path}:2: missing field 'chosen'"):
        read_dataset(path)  # the first record decides the file's format
    with pytest.raises(DataError, match=rf"^{path}:1: a preference record cannot have a classification head"):
        read_dataset(path, head=True)


def test_as_chat_turns_a_text_pair_into_messages(tmp_path):
    pair = one_pair(tmp_path, {"prompt": "Hi?", "chosen": "Yes.", "rejected": "No.", "margin": 1.0}, as_chat=True)
    assert pair.is_chat
    assert (pair.prompt, pair.chosen, pair.rejected) == ((user("Hi?"),), (assistant("Yes."),), (assistant("No."),))
    assert pair.margin == 1.0
    chat = {"prompt": [USER], "chosen": "Yes.", "rejected": "No."}
    assert one_pair(tmp_path, chat, as_chat=True) == one_pair(tmp_path, chat)  # already chat: unchanged


BAD_RECORDS = [
    ({"prompt": "p", "rejected": "r"}, r"missing field 'chosen' \(a preference record needs 'chosen' and 'rejected'\)"),
    ({"prompt": "p", "chosen": "c"}, r"missing field 'rejected'"),
    ({"prompt": "p", "chosen": "c", "rejected": "r", "margin": "1.5"},
     r"field 'margin' must be a number, got string '1.5'"),
    ({"prompt": "p", "chosen": "c", "rejected": "r", "margin": True}, r"field 'margin' must be a number, got boolean"),
    ({"prompt": "p", "chosen": [assistant("c")], "rejected": [assistant("r")]},
     r"field 'prompt' is a string but 'chosen' / 'rejected' are not"),
    ({"chosen": [SYSTEM, user("a"), assistant("c")], "rejected": [SYSTEM, user("b"), assistant("r")]},
     r"the prompts of chosen and rejected differ \(messages\[1\]\)"),
    ({"chosen": [user("a"), assistant("c"), user("more")], "rejected": [user("a"), assistant("r")]},
     r"field 'chosen' must be a conversation ending with an assistant message"),
    ({"chosen": [assistant("c")], "rejected": [assistant("r")]},
     r"field 'chosen' must be a conversation ending with an assistant message after at least one other"),
    ({"prompt": [USER], "chosen": [assistant("c")], "rejected": [user("r")]},
     r"rejected\[0\] has role 'user'; the last message of a completion must be the assistant's"),
    ({"prompt": [USER], "chosen": [{"role": "bot", "content": "c"}], "rejected": "r"},
     r"chosen\[0\] has unknown role 'bot'"),
    ({"prompt": [], "chosen": "c", "rejected": "r"}, r"field 'prompt' is empty"),
]


@pytest.mark.parametrize("record,message", BAD_RECORDS)
def test_bad_records_name_file_and_line(tmp_path, record, message):
    good = {"prompt": "p", "chosen": "c", "rejected": "r"}  # sets the file's format: every record is a pair
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(good) + "\n\n" + json.dumps(record) + "\n")  # the bad record is on line 3
    with pytest.raises(DataError, match=rf"^{path}:3: {message}") as info:
        read_dataset(path)
    assert "\n" not in str(info.value)


def test_bad_record_in_a_json_array_names_its_line(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[\n  {"prompt": "p", "chosen": "c", "rejected": "r"},\n  {"prompt": "p",\n   "chosen": "c"}\n]')
    with pytest.raises(DataError, match=rf"^{path}:3: missing field 'rejected'"):
        read_dataset(path)


# ------------------------------------------------------------------------------------------------ tokenization


def test_text_pair_tokens_are_the_separate_encodings(template_dir):
    tok = load_tokenizer(template_dir)
    ref = PreTrainedTokenizerFast(tokenizer_file=str(template_dir / "tokenizer.json"))
    pair = Pair("x:1", "Hello world, how are you?", " I'm fine, thanks.", " The lazy dog.", margin=1.5)
    [ex] = tokenize_pairs([pair], tok)
    prompt = ref(pair.prompt, add_special_tokens=True)["input_ids"]
    chosen = ref(pair.chosen, add_special_tokens=False)["input_ids"] + [tok.eos_id]
    rejected = ref(pair.rejected, add_special_tokens=False)["input_ids"] + [tok.eos_id]
    assert (prompt[0] == tok.bos_id) == (tok.bos_id is not None)
    assert ex.tokens.tolist() == prompt + chosen + prompt + rejected
    assert ex.mask.tolist() == ([False] * len(prompt) + [True] * len(chosen)) + (
        [False] * len(prompt) + [True] * len(rejected))
    assert ex.split == len(prompt) + len(chosen) and ex.margin == 1.5 and ex.where == "x:1"
    assert [p.tolist() for p in parts(ex)] == [prompt, chosen, rejected]
    assert ex.tokens.dtype == np.int32
    [no_eos] = tokenize_pairs([pair], tok, append_eos=False)
    assert [p.tolist() for p in parts(no_eos)] == [prompt, chosen[:-1], rejected[:-1]]


def boundary_split(ref):
    """(prompt, completion): a split inside a word of the corpus where the joint encoding has a token across it."""
    for sentence in CORPUS[:4]:
        for i in range(1, len(sentence)):
            if not (sentence[i - 1].isalpha() and sentence[i].isalpha()):
                continue
            enc = ref(sentence, add_special_tokens=False, return_offsets_mapping=True)
            if any(start < i < end for start, end in enc["offset_mapping"]):
                return sentence[:i], sentence[i:]
    raise AssertionError("no split with a merge across it")


def test_prompt_tokens_exact_when_bpe_merges_across_the_boundary(template_dir):
    tok = load_tokenizer(template_dir)
    ref = PreTrainedTokenizerFast(tokenizer_file=str(template_dir / "tokenizer.json"))
    prompt, completion = boundary_split(ref)
    joint = ref(prompt + completion, add_special_tokens=True)["input_ids"]
    alone = ref(prompt, add_special_tokens=True)["input_ids"]
    rest = ref(completion, add_special_tokens=False)["input_ids"]
    assert joint != alone + rest  # the merge really happens: one encoding is not the two laid end to end
    assert joint[:len(alone)] != alone

    [ex] = tokenize_pairs([Pair("x:1", prompt, completion, completion + " no")], tok)
    P = len(alone)
    assert ex.tokens[:P].tolist() == alone  # exactly the prompt the model gets at inference
    assert ex.tokens[P:ex.split].tolist() == rest + [tok.eos_id]
    assert np.flatnonzero(ex.mask[:ex.split]).tolist() == list(range(P, ex.split))
    assert tok.decode(ex.tokens[:ex.split], skip_special_tokens=True) == prompt + completion


def test_implicit_text_prompt_ending_mid_word(chatml_dir, tmp_path):
    """TRL's rule cuts "The quick bro|wn fox" / "The quick bro|ken fox" inside a word: the prompt is still
    encoded alone and the completions alone."""
    tok = load_tokenizer(chatml_dir)
    [pair] = read_dataset(write_jsonl(tmp_path / "p.jsonl", [{"chosen": "The quick brown fox",
                                                              "rejected": "The quick broken fox"}]))
    assert (pair.prompt, pair.chosen, pair.rejected) == ("The quick bro", "wn fox", "ken fox")
    [ex] = tokenize_pairs([pair], tok)
    prompt, chosen, rejected = parts(ex)
    assert prompt.tolist() == tok.encode("The quick bro", add_special_tokens=True)
    assert chosen.tolist() == tok.encode("wn fox") + [tok.eos_id]
    assert rejected.tolist() == tok.encode("ken fox") + [tok.eos_id]


CHAT_PROMPTS = [
    (SYSTEM, USER),
    (USER,),
    (SYSTEM, USER, assistant("I'm fine, thanks."), user("The quick brown fox?")),
]


@pytest.mark.parametrize("prompt", CHAT_PROMPTS, ids=["system", "user", "multi_turn"])
def test_chat_pair_is_the_chat_template_render(template_dir, prompt):
    tok = load_tokenizer(template_dir)
    ref = AutoTokenizer.from_pretrained(template_dir)
    chosen, rejected = (assistant("Fine, thanks 日本語."),), (assistant(" The lazy dog 42 "),)
    [ex] = tokenize_pairs([Pair("x:1", prompt, chosen, rejected)], tok, template_kwargs=KW)
    head = reference_ids(ref, prompt, add_generation_prompt=True)
    P = len(head)
    if template_dir.name == "qwen_chatml":  # the split is at the generation prompt
        assert tok.decode(head).endswith("<|im_start|>assistant\n")
        replies = [m[0]["content"] + "<|im_end|>\n" for m in (chosen, rejected)]
    else:  # llama3: a header, the content trimmed, <|eot_id|>
        assert tok.decode(head).endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
        replies = [m[0]["content"].strip() + "<|eot_id|>" for m in (chosen, rejected)]
    for (start, stop), answer, reply in zip([(0, ex.split), (ex.split, len(ex.tokens))], (chosen, rejected),
                                            replies):
        seq, mask = ex.tokens[start:stop], ex.mask[start:stop]
        full = ref.apply_chat_template(list(prompt + answer), tokenize=False, date_string=DATE)
        head_text = ref.apply_chat_template(list(prompt), tokenize=False, add_generation_prompt=True,
                                            date_string=DATE)
        assert full.startswith(head_text) and tok.decode(seq) == full
        # prompt alone + completion alone; nothing appended: the template ends the turn itself
        assert seq.tolist() == head + ref(full[len(head_text):], add_special_tokens=False)["input_ids"]
        joint = reference_ids(ref, prompt + answer)
        if template_dir.name == "qwen_chatml":  # the render splits cleanly at "\n": one encoding of the whole
            assert seq.tolist() == joint
        else:  # the header's "\n\n" is one token at the end of the prompt alone (what inference gives the model),
            # two ahead of text (GPT-2's pre-tokenizer regex): the joint encoding differs there only
            assert head[-1] == tok.encode("\n\n")[0] and len(tok.encode("\n\n")) == 1
            assert joint == head[:-1] + tok.encode("\n") * 2 + seq[P:].tolist()
        assert seq[:P].tolist() == head
        assert np.flatnonzero(mask).tolist() == list(range(P, len(seq)))  # the reply and its end of turn only
        assert tok.decode(seq[mask]) == reply
        for message in prompt:  # never the system / user / earlier assistant content
            assert message["content"].strip() not in tok.decode(seq[mask])
        if tok.bos_id is not None:
            assert seq[0] == tok.bos_id and (seq == tok.bos_id).sum() == 1


def test_implicit_and_explicit_chat_prompts_tokenize_alike(chatml_dir, tmp_path):
    tok = load_tokenizer(chatml_dir)
    history = [SYSTEM, USER]
    path = write_jsonl(tmp_path / "p.jsonl", [
        {"chosen": history + [assistant("Yes.")], "rejected": history + [assistant("No.")]},
        {"prompt": history, "chosen": "Yes.", "rejected": "No."},
        {"prompt": history, "chosen": [assistant("Yes.")], "rejected": [assistant("No.")]}])
    a, b, c = tokenize_pairs(read_dataset(path), tok)
    assert a.tokens.tolist() == b.tokens.tolist() == c.tokens.tolist()
    assert a.mask.tolist() == b.mask.tolist() == c.mask.tolist()


@llama3_only
def test_one_bos_per_sequence(template_dir):
    tok = load_tokenizer(template_dir)
    assert tok.bos_id is not None
    pairs = [Pair("x:1", "Hello world", " fine", " bad"), Pair("x:2", "", "Yes", "No"),
             Pair("x:3", (SYSTEM, USER), (assistant("Fine."),), (assistant("Bad."),))]
    for ex in tokenize_pairs(pairs, tok, template_kwargs=KW):
        for seq in (ex.tokens[:ex.split], ex.tokens[ex.split:]):
            assert np.flatnonzero(seq == tok.bos_id).tolist() == [0]


def test_eos_not_duplicated(template_dir):
    tok = load_tokenizer(template_dir)
    eos = tok.special_tokens["eos_token"]
    [ex] = tokenize_pairs([Pair("x:1", "Hello world", " fine" + eos, " bad")], tok)
    _, chosen, rejected = parts(ex)
    assert chosen.tolist() == tok.encode(" fine") + [tok.eos_id]  # already there: not appended again
    assert rejected.tolist() == tok.encode(" bad") + [tok.eos_id]
    [chat] = tokenize_pairs([Pair("x:1", (USER,), (assistant("Fine."),), (assistant("Bad."),))], tok,
                            template_kwargs=KW)
    for completion in parts(chat)[1:]:  # the template's own end of turn (EOS in both fixtures), once
        assert (completion == tok.eos_id).sum() == 1


def test_identical_pairs_are_dropped(chatml_dir, tmp_path):
    tok = load_tokenizer(chatml_dir)
    pairs = [Pair("x:1", "p", " same", " same"), Pair("x:2", "p", " a", " b"),
             Pair("x:3", (USER,), (assistant("Same."),), (assistant("Same."),)),
             Pair("x:4", (USER,), (assistant("Same."),), ({**assistant("Same."), "extra": 1},))]  # renders alike
    out = tokenize_pairs(pairs, tok)
    assert [o is None for o in out] == [True, False, True, True]

    records = [{"prompt": "p", "chosen": " x", "rejected": " x"}, {"prompt": "p", "chosen": " a", "rejected": " b"},
               {"chosen": "same text", "rejected": "same text"}]
    path = str(write_jsonl(tmp_path / "d.jsonl", records))
    st_ = prepare(DataConfig(datasets=[DatasetSpec(path)], seq_len=64), tok).stats[0]
    assert (st_.records, st_.kept, st_.dropped_identical, st_.dropped_too_long) == (3, 1, 2, 0)
    only = str(write_jsonl(tmp_path / "i.jsonl", [records[0], records[2]]))
    with pytest.raises(DataError, match=rf"^{only}: no pair kept \(2 records: 2 with chosen = rejected, 0 over"):
        prepare(DataConfig(datasets=[DatasetSpec(only)], seq_len=64), tok)


# ------------------------------------------------------------------------------------------------- truncation

BOS = 1


def synthetic(P, C, R, bos=True, margin=0.0):
    prompt = np.r_[[BOS] if bos else [], np.arange(10, 10 + P - bos)].astype(np.int32)
    return pair_tokens(prompt, np.arange(100, 100 + C, dtype=np.int32), np.arange(200, 200 + R, dtype=np.int32),
                       "d.jsonl:4", margin)


def test_fit_pair_cuts_the_prompt_from_the_left_then_the_longer_completion():
    ex = synthetic(6, 3, 2, margin=0.5)  # [1 10 11 12 13 14] + [100 101 102] / + [200 201]: 17 tokens
    assert fit_length(ex, 17, "truncate", BOS) is ex
    fitted = fit_length(ex, 13, "truncate", BOS)  # 4 over: two prompt tokens from each copy, BOS kept
    assert [p.tolist() for p in parts(fitted)] == [[1, 12, 13, 14], [100, 101, 102], [200, 201]]
    assert fitted.margin == 0.5 and fitted.where == "d.jsonl:4" and fitted.split == 7
    fitted = fit_length(ex, 12, "truncate", BOS)  # 5 over: both copies lose 3 (a pair shrinks by two)
    assert [p.tolist() for p in parts(fitted)] == [[1, 13, 14], [100, 101, 102], [200, 201]]
    fitted = fit_length(ex, 9, "truncate", BOS)  # 8 over: the prompt at its minimum [BOS, 14]
    assert [p.tolist() for p in parts(fitted)] == [[1, 14], [100, 101, 102], [200, 201]]
    fitted = fit_length(ex, 8, "truncate", BOS)  # then the end of the longer completion
    assert [p.tolist() for p in parts(fitted)] == [[1, 14], [100, 101], [200, 201]]
    fitted = fit_length(ex, 7, "truncate", BOS)  # then one at a time, chosen first
    assert [p.tolist() for p in parts(fitted)] == [[1, 14], [100], [200, 201]]
    fitted = fit_length(ex, 6, "truncate", BOS)
    assert [p.tolist() for p in parts(fitted)] == [[1, 14], [100], [200]]
    assert fit_length(ex, 5, "truncate", BOS) is None  # it would lose a whole completion
    no_bos = synthetic(4, 2, 2, bos=False)  # [10 11 12 13] ...: the prompt keeps its last token
    assert parts(fit_length(no_bos, 6, "truncate", BOS))[0].tolist() == [13]
    assert parts(fit_length(no_bos, 6, "truncate", None))[0].tolist() == [13]
    assert parts(fit_length(ex, 9, "truncate", None))[0].tolist() == [13, 14]  # BOS unknown: a plain token
    assert fit_length(ex, 16, "drop", BOS) is None and fit_length(ex, 17, "drop", BOS) is ex
    with pytest.raises(DataError, match=r"^d.jsonl:4: the pair has 17 tokens .* more than seq_len=16") as info:
        fit_length(ex, 16, "error", BOS)
    assert "\n" not in str(info.value)


def reference_fit(P, C, R, T, keep):
    """The truncate rule written out one token at a time: (prompt, chosen, rejected) lengths, or None."""
    p, c, r = P, C, R
    while 2 * p + c + r > T and p > keep:  # a prompt token from the left of both copies
        p -= 1
    while 2 * p + c + r > T:  # then the longer completion's last token (chosen on a tie)
        if c >= r:
            c -= 1
        else:
            r -= 1
    return None if min(c, r) < 1 else (p, c, r)


@settings(max_examples=300, deadline=None)
@given(P=st.integers(0, 12), C=st.integers(1, 12), R=st.integers(1, 12), T=st.integers(2, 70), bos=st.booleans())
def test_fit_pair_properties(P, C, R, T, bos):
    bos = bos and P > 0
    ex = synthetic(P, C, R, bos)
    prompt, chosen, rejected = parts(ex)
    fitted = fit_length(ex, T, "truncate", BOS)
    expected = reference_fit(P, C, R, T, keep=min(P, 1 + bos))  # BOS and one prompt token stay
    if expected is None:
        assert fitted is None
        return
    p, c, r = parts(fitted)
    assert (len(p), len(c), len(r)) == expected
    assert len(fitted.tokens) <= T and fitted.split == len(p) + len(c) and fitted.margin == ex.margin
    assert fitted.tokens[:len(p)].tolist() == fitted.tokens[fitted.split:fitted.split + len(p)].tolist()
    assert p[:bos].tolist() == prompt[:bos].tolist()  # BOS kept
    assert p[bos:].tolist() == prompt[len(prompt) - len(p) + bos:].tolist()  # the prompt's end kept
    assert c.tolist() == chosen[:len(c)].tolist() and r.tolist() == rejected[:len(r)].tolist()  # their starts kept
    assert fitted.mask.tolist() == [False] * len(p) + [True] * len(c) + [False] * len(p) + [True] * len(r)
    assert (fitted is ex) == (len(ex.tokens) <= T)


def test_pipeline_over_long_policies(template_dir, tmp_path):
    tok = load_tokenizer(template_dir)
    long = "hello world " * 30
    records = [{"prompt": long, "chosen": " fox", "rejected": " dog"},  # 1: truncated (prompt)
               {"prompt": "hi", "chosen": long, "rejected": " dog"},  # 2: truncated (chosen's end)
               {"prompt": "hi", "chosen": long, "rejected": long + " x"},  # 3: both ends cut to the same: dropped
               {"prompt": "hi", "chosen": " fox", "rejected": " dog"}]  # 4: fits
    path = str(write_jsonl(tmp_path / "d.jsonl", records))
    config = lambda **kw: DataConfig(datasets=[DatasetSpec(path)], seq_len=48, template_kwargs=KW, **kw)  # noqa: E731
    prepared = prepare(config(), tok)
    st_ = prepared.stats[0]
    assert (st_.records, st_.kept, st_.truncated, st_.dropped_too_long) == (4, 3, 2, 1)
    assert all(len(e.tokens) <= 48 for e in prepared.datasets[0])
    first = prepared.datasets[0][0]
    if tok.bos_id is not None:
        assert first.tokens[0] == tok.bos_id == first.tokens[first.split]
    assert parts(first)[1].tolist() == tok.encode(" fox") + [tok.eos_id]
    assert st_.tokens == sum(len(e.tokens) for e in prepared.datasets[0])
    st_ = prepare(config(over_long="drop"), tok).stats[0]
    assert (st_.kept, st_.dropped_too_long, st_.truncated) == (1, 3, 0)
    with pytest.raises(DataError, match=rf"^{path}:1: the pair has \d+ tokens \(prompt \+ chosen and prompt \+ "
                                        r"rejected\), more than seq_len=48") as info:
        prepare(config(over_long="error"), tok)
    assert "\n" not in str(info.value)
    # no room for BOS, one prompt token and a token of each completion: every pair would lose a completion
    tiny = 2 * (1 + (tok.bos_id is not None)) + 1
    with pytest.raises(DataError, match=rf"^{path}: no pair kept \(4 records: 0 with chosen = rejected, 4 over "
                                        rf"seq_len={tiny}: prompt \+ chosen and prompt \+ rejected must fit one row"):
        prepare(DataConfig(datasets=[DatasetSpec(path)], seq_len=tiny), tok)
    kept = prepare(DataConfig(datasets=[DatasetSpec(path)], seq_len=tiny + 1), tok).stats[0].kept
    assert kept == 3  # 3: cut to the same


def test_unknown_over_long_policy_is_refused():
    with pytest.raises(DataError, match="over_long='trunc'"):
        fit_length(synthetic(6, 3, 2), 12, "trunc", BOS)


def test_truncation_into_an_identical_pair_drops_it(chatml_dir):
    tok = load_tokenizer(chatml_dir)
    [ex] = tokenize_pairs([Pair("x:1", "The answer", " is the quick brown fox 42", " is the quick brown fox 43")], tok)
    _, chosen, rejected = parts(ex)
    common = int(np.argmax(chosen[:len(rejected)] != rejected[:len(chosen)]))  # ' ', 'is', ... ' fox': 6 tokens
    assert common >= 1
    fitted = fit_length(ex, 2 * 1 + 2 * common, "truncate", tok.bos_id)  # one prompt token + the shared start twice
    assert fitted is None or parts(fitted)[1].tolist() != parts(fitted)[2].tolist()


def test_trained_tokens_match_the_rows_with_an_empty_prompt(chatml_dir):
    tok = load_tokenizer(chatml_dir)  # no BOS: an empty text prompt has no token
    [ex] = tokenize_pairs([Pair("x:1", "", "Yes", "No")], tok)
    rows = build_rows([ex], [0], [[0]], 16, pairs=True)
    assert ex.num_trained == rows["loss_mask"].sum()


# ----------------------------------------------------------------------------------------------------- packing


@pytest.fixture(scope="module")
def chat_pairs(chatml_dir):
    """Tokenized chat and text pairs of varied lengths (ChatML fixture tokenizer), with margins and refs."""
    tok = load_tokenizer(chatml_dir)
    rng = np.random.default_rng(0)

    def say(k):
        return " ".join(rng.choice(WORDS, k))

    pairs = []
    for i in range(23):
        if i % 3:
            pairs.append(Pair(f"x:{i}", (user(f"{i} {say(rng.integers(1, 6))}"),),
                              (assistant(say(rng.integers(1, 9))),), (assistant(say(rng.integers(1, 9))),),
                              margin=float(i)))
        else:
            pairs.append(Pair(f"x:{i}", f"{i} {say(3)}", " " + say(rng.integers(1, 6)),
                              " " + say(rng.integers(1, 6)), margin=-float(i)))
    out = [t for t in tokenize_pairs(pairs, tok) if t is not None]
    return [dataclasses.replace(t, ref=(-1.0 - k, -2.0 - k)) if k % 2 else t for k, t in enumerate(out)]


def check_rows(rows, examples, bins, tasks, T):
    for r, members in enumerate(bins):
        seg, pid = rows["segment_ids"][r], rows["pair_ids"][r]
        offset = 0
        for k, i in enumerate(members, start=1):
            ex = examples[i]
            for role, (tokens, mask) in enumerate([(ex.tokens[:ex.split], ex.mask[:ex.split]),
                                                   (ex.tokens[ex.split:], ex.mask[ex.split:])]):
                n = len(tokens)
                span = slice(offset, offset + n)
                assert np.flatnonzero(seg == 2 * k - 1 + role).tolist() == list(range(offset, offset + n))
                assert rows["tokens"][r, span].tolist() == tokens.tolist()
                assert rows["positions"][r, span].tolist() == list(range(n))  # restart in each sequence
                assert (pid[span] == (k if role == 0 else -k)).all()
                assert (rows["task_ids"][r, span] == tasks[i]).all()
                # targets stay inside the sequence: the last token predicts nothing
                assert rows["targets"][r, offset:offset + n - 1].tolist() == tokens[1:].tolist()
                assert rows["loss_mask"][r, span].tolist() == mask[1:].tolist() + [0.0]
                margins, refs = rows["margins"][r, span], rows["ref_logps"][r, span]
                assert margins[0] == (ex.margin if role == 0 else 0.0) and not margins[1:].any()
                assert refs[0] == (0.0 if ex.ref is None else ex.ref[role]) and not refs[1:].any()
                offset += n
        pad = seg == 0
        assert pad[offset:].all() and not pad[:offset].any()
        assert not pid[pad].any() and not rows["loss_mask"][r, pad].any()
        assert not rows["margins"][r, pad].any() and not rows["ref_logps"][r, pad].any()
        assert (rows["class_ids"][r] == -1).all()


@pytest.mark.parametrize("method", ["bfd", "greedy", "none"])
def test_rows_of_pairs(chat_pairs, method):
    T = 128
    lengths = [len(e.tokens) for e in chat_pairs]
    assert max(lengths) <= T
    bins = pack_bins(lengths, T, method)
    tasks = [k % 2 for k in range(len(chat_pairs))]
    rows = build_rows(chat_pairs, tasks, bins, T, pad_id=0, pairs=True)
    assert set(rows) == set(ROW_KEYS + PAIR_KEYS)
    assert all(rows[k].shape == (len(bins), T) for k in rows)
    assert rows["margins"].dtype == rows["ref_logps"].dtype == np.float32 and rows["pair_ids"].dtype == np.int32
    check_rows(rows, chat_pairs, bins, tasks, T)
    if method == "none":
        assert len(bins) == len(chat_pairs) and (np.abs(rows["pair_ids"]).max(axis=1) == 1).all()
    else:
        assert len(bins) < len(chat_pairs)
    assert rows["loss_mask"].sum() == sum(e.num_trained for e in chat_pairs)
    empty = empty_rows(2, T, pad_id=0, pairs=True)
    assert set(empty) == set(rows) and not any(empty[k].any() for k in ("pair_ids", "margins", "ref_logps"))


def test_sequence_index_maps_pairs_to_slots(chat_pairs):
    T = 128
    bins = pack_bins([len(e.tokens) for e in chat_pairs], T, "bfd")
    rows = build_rows(chat_pairs, [0] * len(chat_pairs), bins, T, pairs=True)
    batch = with_sequences({k: rows[k] for k in ("pair_ids", "tokens")})
    index, last = batch["seq_index"], batch["sequence_last"]
    assert last.shape == (2 * pair_slots(len(chat_pairs)),) and pair_slots(len(chat_pairs)) == 32
    p = 0
    for r, members in enumerate(bins):  # pairs in row-major order: slot 2p chosen, 2p + 1 rejected
        for k in range(1, len(members) + 1):
            for slot, sign in ((2 * p, 1), (2 * p + 1, -1)):
                where = np.flatnonzero(rows["pair_ids"][r] == sign * k)
                assert (index[r, where] == slot).all()
                assert last[slot] == r * T + where[-1]
                ex = chat_pairs[members[k - 1]]
                expected_last = ex.tokens[ex.split - 1] if sign > 0 else ex.tokens[-1]
                assert rows["tokens"].reshape(-1)[last[slot]] == expected_last
            p += 1
    assert p == len(chat_pairs)
    assert (last[2 * p:] == -1).all()
    assert ((index == -1) == (rows["segment_ids"] == 0)).all()
    # micro-batches [M, B, T] are indexed each on its own, with one slot count for all
    stacked = np.stack([rows["pair_ids"][:2], rows["pair_ids"][2:4]])
    m_index, m_last = sequence_index(stacked)
    for m in range(2):
        one_index, one_last = sequence_index(stacked[m])
        assert (m_index[m] == one_index).all()
        n = len(one_last)
        assert (m_last[m, :n] == one_last).all() and (m_last[m, n:] == -1).all()
    assert sequence_index(np.zeros((2, 8), np.int32))[1].tolist() == [-1] * 8  # no pair: 4 empty slots


# ---------------------------------------------------------------------------------------------------- pipeline


def test_pairs_and_sft_data_do_not_mix(chatml_dir, tmp_path):
    tok = load_tokenizer(chatml_dir)
    pairs = str(write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "p", "chosen": " a", "rejected": " b"}]))
    sft = str(write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "p", "completion": " a"}]))
    for first, second, kind in ((pairs, sft, "not preference pairs"), (sft, pairs, "preference pairs")):
        with pytest.raises(DataError, match=rf"^{second}: {kind}, unlike {first}: the datasets of a run are all "
                                            "preference pairs") as info:
            prepare(DataConfig(datasets=[DatasetSpec(first), DatasetSpec(second)], seq_len=32), tok)
        assert "\n" not in str(info.value)


def test_iterator_yields_every_pair_whole(chatml_dir, tmp_path):
    tok = load_tokenizer(chatml_dir)
    text = [{"prompt": f"{i} {WORDS[i % 13]}", "chosen": " fox" * (1 + i % 3), "rejected": " dog", "margin": i}
            for i in range(19)]
    chat = [{"prompt": [user(f"{i}")], "chosen": WORDS[i % 13], "rejected": WORDS[(i + 1) % 13]} for i in range(7)]
    paths = [str(write_jsonl(tmp_path / "t.jsonl", text)), str(write_jsonl(tmp_path / "c.jsonl", chat))]
    config = DataConfig(datasets=[DatasetSpec(p) for p in paths], seq_len=64, per_device_batch=2, pack_window=8)
    prepared = prepare(config, tok)
    assert prepared.pairs and [s.kept for s in prepared.stats] == [19, 7]
    batches = list(DataIterator(prepared, devices=2))
    seen = []
    for batch in batches:
        assert set(batch) == set(ROW_KEYS + PAIR_KEYS)
        assert all(v.shape == (2, 2, 64) for v in batch.values())
        seq = with_sequences({"pair_ids": batch["pair_ids"]})  # per device: [2, B, T]
        assert seq["seq_index"].shape == (2, 2, 64) and seq["sequence_last"].shape[0] == 2
        for r in range(4):
            row = {k: v.reshape(4, 64)[r] for k, v in batch.items()}
            for k in range(1, row["pair_ids"].max() + 1):
                chosen, rejected = row["pair_ids"] == k, row["pair_ids"] == -k
                first = np.flatnonzero(chosen)[0]
                assert np.flatnonzero(rejected)[0] == np.flatnonzero(chosen)[-1] + 1  # consecutive segments
                seen.append((int(row["task_ids"][first]), tuple(row["tokens"][chosen]),
                             tuple(row["tokens"][rejected]), float(row["margins"][first])))
    expected = [(t, tuple(e.tokens[:e.split]), tuple(e.tokens[e.split:]), e.margin)
                for t, d in enumerate(prepared.datasets) for e in d]
    assert sorted(seen) == sorted(expected)
    assert {m for t, _, _, m in seen if t == 0} == {float(i) for i in range(19)}


def test_fingerprint_marks_pair_data(chatml_dir, tmp_path):
    tok = load_tokenizer(chatml_dir)
    path = str(write_jsonl(tmp_path / "p.jsonl", [{"prompt": "p", "chosen": " a", "rejected": " b"}]))
    prepared = prepare(DataConfig(datasets=[DatasetSpec(path)], seq_len=32), tok)
    assert fingerprint(prepared) != fingerprint(dataclasses.replace(prepared, pairs=False))
    with pytest.raises(DataError, match="fingerprint differ"):
        DataIterator(dataclasses.replace(prepared, pairs=False), state=DataIterator(prepared).state())
