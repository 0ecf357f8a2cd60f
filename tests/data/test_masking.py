"""Loss masks from per-turn rendering, checked against masks built independently, piece by piece."""

import numpy as np
import pytest
from transformers import AutoTokenizer

from sftjax.data.errors import DataError
from sftjax.data.formats import Example
from sftjax.data.masking import tokenize_examples
from sftjax.data.tokenizer import load_tokenizer, train_bpe_tokenizer

from .conftest import CORPUS, VOCAB_SIZE

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
    unstable = tok.__class__(tok.backend, tok.special_tokens,
                             "{{ messages | length }}:{% for m in messages %}{{ m.content }}{% endfor %}")
    with pytest.raises(DataError, match=r"^d.jsonl:3: the chat template renders messages\[2\] differently"):
        tokenize_examples([Example("d.jsonl:3", messages=MESSAGES)], unstable)
    with pytest.raises(DataError, match="mask='assistant'"):
        tokenize_examples([], tok, mode="assistant")
