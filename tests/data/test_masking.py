"""Loss masks from per-turn rendering, checked against masks built independently, piece by piece."""

import json

import numpy as np
import pytest
from transformers import AutoTokenizer

from sftjax.data.errors import DataError
from sftjax.data.formats import Example
from sftjax.data.masking import tokenize_examples
from sftjax.data.tokenizer import load_tokenizer, train_bpe_tokenizer

from .conftest import CORPUS, VOCAB_SIZE, make_tokenizer_dir

DATE = "24 Nov 2026"
MESSAGES = ({"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Hello world"},
            {"role": "assistant", "content": "I'm fine, thanks."}, {"role": "user", "content": "How are you?"},
            {"role": "assistant", "content": "The quick brown fox 日本語"})


def expected_pieces(template: str, messages, mode: str) -> list[tuple[str, bool]]:
    """The rendered chat as (text, trained) pieces, written out by hand from each template's structure."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    trained = lambda i: mode == "all" or (mode == "completion" or i == last)  # noqa: E731
    pieces = []
    if template == "qwen_chatml":
        for i, m in enumerate(messages):
            if m["role"] == "assistant":
                pieces += [("<|im_start|>assistant\n", mode == "all"), (m["content"] + "<|im_end|>\n", trained(i))]
            else:
                pieces.append((f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n", mode == "all"))
    else:  # llama3
        pieces.append(("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: "
                       f"December 2023\nToday Date: {DATE}\n\n{messages[0]['content']}<|eot_id|>", mode == "all"))
        for i, m in enumerate(messages[1:], start=1):
            header = f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n"
            if m["role"] == "assistant":
                pieces += [(header, mode == "all"), (m["content"].strip() + "<|eot_id|>", trained(i))]
            else:
                pieces.append((header + m["content"].strip() + "<|eot_id|>", mode == "all"))
    return pieces


@pytest.mark.parametrize("mode", ["completion", "last_turn", "all"])
def test_multi_turn_masks_are_exact(template_dir, mode):
    """Expected: the character ranges of the hand-written pieces, mapped to tokens by transformers' offsets."""
    pieces = expected_pieces(template_dir.name, MESSAGES, mode)
    text = "".join(piece for piece, _ in pieces)
    ref = AutoTokenizer.from_pretrained(template_dir)
    assert ref.apply_chat_template(list(MESSAGES), tokenize=False, date_string=DATE) == text
    enc = ref(text, add_special_tokens=False, return_offsets_mapping=True)
    ranges, start = [], 0
    for piece, trained in pieces:
        if trained:
            ranges.append((start, start + len(piece)))
        start += len(piece)
    expected = [any(s < b and e > a for a, b in ranges) for s, e in enc["offset_mapping"]]
    assert 0 < sum(expected) < len(expected) or mode == "all"

    tok = load_tokenizer(template_dir)
    [out] = tokenize_examples([Example("x:1", messages=MESSAGES)], tok, mode=mode,
                              template_kwargs={"date_string": DATE})
    assert out.tokens.tolist() == enc["input_ids"]  # the template ends turns with EOS: nothing is appended
    np.testing.assert_array_equal(out.mask, expected)
    assert out.num_trained == sum(expected[1:])
    trained_text = tok.decode(out.tokens[out.mask])
    last = MESSAGES[-1]["content"]
    assert trained_text.count(last) == 1 and (("I'm fine" in trained_text) == (mode != "last_turn"))


def test_generation_tags_match_transformers_assistant_masks(chatml_dir):
    source = ("{% for m in messages %}{{ '<|im_start|>' + m.role + '\n' }}{% if m.role == 'assistant' %}"
              "{% generation %}{{ m.content + '<|im_end|>' }}{% endgeneration %}{% else %}{{ m.content + "
              "'<|im_end|>' }}{% endif %}{{ '\n' }}{% endfor %}")
    tok = load_tokenizer(chatml_dir)
    ref = AutoTokenizer.from_pretrained(chatml_dir)
    expected = ref.apply_chat_template(list(MESSAGES), chat_template=source, return_dict=True,
                                       return_assistant_tokens_mask=True)
    [out] = tokenize_examples([Example("x:1", messages=MESSAGES)], tok.__class__(
        tok.backend, tok.special_tokens, source, tok.source))
    assert out.tokens.tolist() == list(expected["input_ids"])
    np.testing.assert_array_equal(out.mask, np.asarray(expected["assistant_masks"], bool))
    assert not out.mask[-1]  # the "\n" after <|im_end|> is outside the generation block


def test_plain_examples_train_the_completion_and_eos(template_dir):
    tok = load_tokenizer(template_dir)
    prompt, completion = "Hello world, how are you?", " I'm fine."
    [out] = tokenize_examples([Example("x:1", prompt=prompt, completion=completion)], tok)
    prefix = tok.encode(prompt, add_special_tokens=True)
    body = tok.encode(completion)
    assert out.tokens.tolist() == prefix + body + [tok.eos_id]
    assert out.mask.tolist() == [False] * len(prefix) + [True] * (len(body) + 1)
    [text] = tokenize_examples([Example("x:1", completion="The quick brown fox")], tok)
    assert text.mask.tolist() == [tok.bos_id is None] + [True] * (len(text.tokens) - 1)
    [no_eos] = tokenize_examples([Example("x:1", prompt=prompt, completion=completion)], tok, append_eos=False)
    assert no_eos.tokens.tolist() == prefix + body


def test_eos_appended_when_the_template_has_no_end_of_turn():
    tok = train_bpe_tokenizer(CORPUS, VOCAB_SIZE, chat_template=None)
    tok = tok.__class__(tok.backend, tok.special_tokens, "{% for m in messages %}{{ m.role }}: {{ m.content }}\n"
                        "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")
    [out] = tokenize_examples([Example("x:1", messages=MESSAGES[1:3])], tok)
    assert out.tokens[-1] == tok.eos_id and out.mask[-1]
    # " I" straddles the prompt's trailing space and the reply: a token overlapping the reply is trained.
    assert tok.decode(out.tokens[out.mask]) == " I'm fine, thanks.\n</s>"


def test_no_assistant_turn_gives_an_empty_mask(chatml_dir):
    [out] = tokenize_examples([Example("x:1", messages=MESSAGES[:2])], load_tokenizer(chatml_dir))
    assert out.num_trained == 0


def test_render_failure_and_unstable_template_name_the_record(template_dir, chatml_dir):
    tok = load_tokenizer(template_dir)
    bad = MESSAGES[:2] + ({"role": "system", "content": "late"}, {"role": "assistant", "content": "x"})
    if template_dir.name == "llama3":  # this template refuses a system message after the first
        with pytest.raises(DataError, match=r"^d.jsonl:7: chat template failed to render: Conversation roles"):
            tokenize_examples([Example("d.jsonl:7", messages=bad)], tok)
    rewriting = tok.__class__(tok.backend, tok.special_tokens,
                              "{{ messages | length }}:{% for m in messages %}{{ m.content | upper }}{% endfor %}")
    with pytest.raises(DataError, match=r"^d.jsonl:3: messages\[2\] \(assistant\): its content does not appear in "
                                        r"the rendered chat \(the template rewrites it\)[^\n]*$"):
        tokenize_examples([Example("d.jsonl:3", messages=MESSAGES)], rewriting)
    unstable = tok.__class__(tok.backend, tok.special_tokens,
                             "{{ messages | length }}:{% for m in messages %}{{ m.content }}{% endfor %}")
    with pytest.raises(DataError, match=r"^d.jsonl:3: the chat template renders an earlier message differently"):
        tokenize_examples([Example("d.jsonl:3", messages=MESSAGES)], unstable, mask_rule="per_turn")
    with pytest.raises(DataError, match="mask_rule='guess'"):
        tokenize_examples([], tok, mask_rule="guess")
    with pytest.raises(DataError, match="mask='assistant'"):
        tokenize_examples([], tok, mode="assistant")


# ChatML with a turn count in front: every render differs once a message is added, so only the search rule applies.
COUNTED_CHATML = ("{{ messages | length }}{% for m in messages %}{{ '<|im_start|>' + m.role + '\n' + m.content + "
                  "'<|im_end|>\n' }}{% endfor %}"
                  "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def _trained_pieces(tok, out) -> list[str]:
    """The decoded runs of trained tokens, in order."""
    runs, start = [], None
    for t, m in enumerate(list(out.mask) + [False]):
        if m and start is None:
            start = t
        elif not m and start is not None:
            runs.append(tok.decode(out.tokens[start:t].tolist()))
            start = None
    return runs


def test_search_rule_finds_each_answer_after_its_question(chatml_dir):
    """An answer that also occurs in the question before it ("I" in "Say I") and in a role name ("assistant") is
    matched where the assistant wrote it; each turn trains its content and end-of-turn marker, the last one also the
    chat's closing newline."""
    tok = load_tokenizer(chatml_dir).with_chat_template(None)
    tok = tok.__class__(tok.backend, tok.special_tokens, COUNTED_CHATML, tok.source)
    messages = ({"role": "user", "content": "Say I"}, {"role": "assistant", "content": "I"},
                {"role": "user", "content": "Say assistant"}, {"role": "assistant", "content": "assistant"})
    [out] = tokenize_examples([Example("x:1", messages=messages)], tok)
    assert out.rule == "search"
    assert _trained_pieces(tok, out) == ["I<|im_end|>", "assistant<|im_end|>\n"]
    text = tok.render_chat(list(messages))[0]
    assert tok.decode(out.tokens.tolist()) == text  # nothing appended: the template ends its turns


def test_search_rule_agrees_with_per_turn_on_a_stable_template(chatml_dir):
    """Forced on a prefix-stable template, search trains what per-turn rendering trains except the newline after a
    non-final turn's <|im_end|> (never generated: decoding stops at the marker)."""
    tok = load_tokenizer(chatml_dir)
    messages = MESSAGES[1:]
    [per_turn] = tokenize_examples([Example("x:1", messages=messages)], tok, mask_rule="per_turn")
    [search] = tokenize_examples([Example("x:1", messages=messages)], tok, mask_rule="search")
    assert (per_turn.rule, search.rule) == ("per_turn", "search")
    np.testing.assert_array_equal(per_turn.tokens, search.tokens)
    differ = np.flatnonzero(per_turn.mask != search.mask)
    assert [tok.decode([int(per_turn.tokens[i])]) for i in differ] == ["\n"]
    assert per_turn.mask[differ].all()


def test_template_errors_of_any_kind_are_one_line(chatml_dir):
    tok = load_tokenizer(chatml_dir)
    parts = ({"role": "user", "content": [{"type": "text", "text": "Hello"}]}, {"role": "assistant", "content": "x"})
    with pytest.raises(DataError, match=r"^d.jsonl:2: chat template failed to render: TypeError: [^\n]*$"):
        tokenize_examples([Example("d.jsonl:2", messages=parts)], tok)  # ChatML concatenates a list to a string


def test_record_tools_and_template_kwargs_reach_the_template(tmp_path, chatml_dir):
    from sftjax.data.formats import read_dataset

    source = ("{% if tools %}TOOLS {{ tools | tojson }}\n{% endif %}{% if flag %}FLAG\n{% endif %}"
              "{% for m in messages %}{{ '<|im_start|>' + m.role + '\n' + m.content + '<|im_end|>\n' }}{% endfor %}"
              "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    tok = load_tokenizer(chatml_dir)
    tok = tok.__class__(tok.backend, tok.special_tokens, source, tok.source)
    path = tmp_path / "tools.jsonl"
    chat = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "fine"}]
    path.write_text(f'{{"messages": {json.dumps(chat)}, "tools": [{{"name": "f"}}], '
                    f'"chat_template_kwargs": {{"flag": true}}}}\n{{"messages": {json.dumps(chat)}}}\n')
    examples = read_dataset(path)
    with_tools, plain = tokenize_examples(examples, tok, template_kwargs={"flag": False})
    assert tok.decode(with_tools.tokens.tolist()).startswith('TOOLS [{"name": "f"}]\nFLAG\n<|im_start|>user')
    assert tok.decode(plain.tokens.tolist()).startswith("<|im_start|>user")
    assert _trained_pieces(tok, with_tools) == _trained_pieces(tok, plain) == ["fine<|im_end|>\n"]


def test_text_that_starts_with_bos_gets_one_bos(tmp_path):
    tok = load_tokenizer(make_tokenizer_dir(tmp_path, "llama3"))  # its post-processor prepends <|begin_of_text|>
    text = tok.special_tokens["bos_token"] + "Hello world"
    [out] = tokenize_examples([Example("x:1", completion=text)], tok)
    assert out.tokens.tolist() == tok.encode(text) + [tok.eos_id]
    assert out.tokens.tolist().count(tok.bos_id) == 1
