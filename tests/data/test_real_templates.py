"""Real chat templates, as the model vendors ship them: sftjax renders them exactly as transformers does, and its loss
masks on them train exactly the assistant turns.

The templates live in tests/fixtures/chat_templates/real/, byte for byte as each model's Hugging Face repository ships
them (the `chat_template` of tokenizer_config.json, or chat_template.jinja); SOURCES.md there names, per file, the
model repository it comes from and where the copy was taken (TRL's bundled originals, llama.cpp's models/templates,
other public copies, a GGUF's `tokenizer.chat_template`).

Each template gets a tiny byte-level BPE trained here (tests/data/conftest.py's corpus) whose special tokens are the
family's real control tokens, with the family's bos / eos names, saved as a model directory that both sftjax
(`load_tokenizer`) and transformers (`AutoTokenizer`, the reference) load.

  * Render parity: for several conversations (with and without a system message, two and three turns, reasoning
    `<think>` blocks, a `tools` list, `enable_thinking=False`, content given as a list of text parts, a fixed
    `date_string`), with and without the generation prompt, `Tokenizer.render_chat` equals
    `apply_chat_template(tokenize=False)` and the ids equal `apply_chat_template(tokenize=True)`. Where the template
    raises (Gemma 2 and a system message, Llama 2 / Mistral and roles that do not alternate), sftjax raises a
    one-line DataError that names the example and quotes the template's own message.
  * Loss masks (`tokenize_examples`, mask=completion), checked by character coverage of the rendered text: every
    token of each assistant message's rendered content is trained, with the end-of-turn marker after it; nothing
    inside a user / system message, nothing before the first assistant content; reasoning that the template drops
    from earlier turns is absent; the rule used ("per_turn" for prefix-stable renders, else "search") matches an
    independent prefix-stability check made with transformers.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import re
from pathlib import Path

import jinja2
import numpy as np
import pytest
from transformers import AutoTokenizer

from sftjax.data.errors import DataError
from sftjax.data.formats import Example
from sftjax.data.masking import tokenize_examples
from sftjax.data.tokenizer import load_tokenizer, train_bpe_tokenizer

from .conftest import CORPUS, VOCAB_SIZE
from .test_masking import _trained_pieces

REAL = Path(__file__).parent.parent / "fixtures" / "chat_templates" / "real"
DATE = "26 Jul 2024"  # passed to every render, so Llama 3.1 / 3.2's strftime_now never differs between the two


@dataclasses.dataclass(frozen=True)
class Family:
    special: tuple[str, ...]  # the family's control tokens (special added tokens of the trained BPE)
    bos: str | None
    eos: str
    pad: str | None = None
    system: bool = True  # accepts a system message (False: the template raises on one)
    alternating: bool = False  # raises when roles do not alternate user / assistant
    reasoning: bool = False  # renders earlier turns without their <think> reasoning
    tools: bool = False  # reads the `tools` template variable
    thinking_flag: bool = False  # reads `enable_thinking`


MISTRAL_SPECIAL = ("<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]",
                   "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]", "[/TOOL_RESULTS]")
LLAMA3_SPECIAL = ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                  "<|eom_id|>", "<|python_tag|>")
QWEN_SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
GEMMA_SPECIAL = ("<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>")
PHI3_SPECIAL = ("<unk>", "<s>", "</s>", "<|endoftext|>", "<|assistant|>", "<|end|>", "<|system|>", "<|user|>")
DEEPSEEK_SPECIAL = ("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>")

FAMILIES: dict[str, Family] = {
    "llama2": Family(("<unk>", "<s>", "</s>"), "<s>", "</s>", alternating=True),
    "llama3": Family(LLAMA3_SPECIAL, "<|begin_of_text|>", "<|eot_id|>"),
    "llama3_1": Family(LLAMA3_SPECIAL, "<|begin_of_text|>", "<|eot_id|>", tools=True),
    "llama3_2": Family(LLAMA3_SPECIAL, "<|begin_of_text|>", "<|eot_id|>", tools=True),
    "qwen2_5": Family(QWEN_SPECIAL, None, "<|im_end|>", "<|endoftext|>", tools=True),
    "qwen3": Family(QWEN_SPECIAL, None, "<|im_end|>", "<|endoftext|>", reasoning=True, tools=True,
                    thinking_flag=True),
    "qwen3_instruct_2507": Family(QWEN_SPECIAL, None, "<|im_end|>", "<|endoftext|>", tools=True),
    "qwq": Family(QWEN_SPECIAL, None, "<|im_end|>", "<|endoftext|>", reasoning=True, tools=True),
    "gemma2": Family(GEMMA_SPECIAL, "<bos>", "<eos>", "<pad>", system=False, alternating=True),
    "gemma3": Family(GEMMA_SPECIAL, "<bos>", "<eos>", "<pad>", alternating=True),
    "mistral_v0_1": Family(MISTRAL_SPECIAL[:3], "<s>", "</s>", system=False, alternating=True),
    "mixtral": Family(MISTRAL_SPECIAL[:3], "<s>", "</s>", system=False, alternating=True),
    "mistral_v0_2": Family(MISTRAL_SPECIAL[:3], "<s>", "</s>", alternating=True),
    "mistral_v0_3": Family(MISTRAL_SPECIAL, "<s>", "</s>", alternating=True, tools=True),
    "mistral_nemo": Family(MISTRAL_SPECIAL, "<s>", "</s>", alternating=True, tools=True),
    "phi3": Family(PHI3_SPECIAL, "<s>", "<|endoftext|>", "<|endoftext|>"),
    "phi3_5": Family(PHI3_SPECIAL, "<s>", "<|endoftext|>", "<|endoftext|>"),
    "phi4_mini": Family(("<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<|tool|>",
                         "<|/tool|>"), "<|endoftext|>", "<|endoftext|>", "<|endoftext|>"),
    "deepseek_r1_distill": Family(DEEPSEEK_SPECIAL, "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>",
                                  "<｜end▁of▁sentence｜>", reasoning=True),
    "granite3_3": Family(("<|end_of_text|>", "<|start_of_role|>", "<|end_of_role|>", "<|tool_call|>"),
                         "<|end_of_text|>", "<|end_of_text|>", "<|end_of_text|>", tools=True),
    "smollm2": Family(QWEN_SPECIAL, "<|im_start|>", "<|im_end|>", "<|im_end|>"),
    "zephyr": Family(("<unk>", "<s>", "</s>"), "<s>", "</s>"),
    "olmo2": Family(("<|endoftext|>", "<|pad|>"), "<|endoftext|>", "<|endoftext|>", "<|pad|>"),
}

# sha256 (first 16 hex digits) of each fixture: the files must stay byte-exact (no editor-added final newline,
# no CRLF conversion), since a template's whitespace is part of what it renders.
SHA256 = {
    "deepseek_r1_distill": "56a1447ad31926fd",
    "gemma2": "ecd6ae513fe103f0",
    "gemma3": "7de1c58e208eda46",
    "granite3_3": "3c71df5f65998746",
    "llama2": "e8d5b5a546d3f19d",
    "llama3": "ba03a121d097859c",
    "llama3_1": "e10ca381b1ccc5cf",
    "llama3_2": "5816fce10444e03c",
    "mistral_nemo": "e4676cb56dffea77",
    "mistral_v0_1": "7e995b379ec01747",
    "mistral_v0_2": "796853172235ab3a",
    "mistral_v0_3": "e16746b40344d6c5",
    "mixtral": "26a59556925c9873",
    "olmo2": "fe689ffbd6a4e2d0",
    "phi3": "dcaee66df77bfbb7",
    "phi3_5": "78d976a442bcde2f",
    "phi4_mini": "febf589225c9728a",
    "qwen2_5": "cd8e9439f0570856",
    "qwen3": "a55ee1b1660128b7",
    "qwen3_instruct_2507": "64f85b198065d0fb",
    "qwq": "16488ad69d85833e",
    "smollm2": "872be49dbb638044",
    "zephyr": "66291cf0045c2425",
}

# Distinctive, non-overlapping contents, so each can be located in the rendered text.
SYSTEM = "Sys rule: reply with one short line."
U1, A1 = "First question about apples?", "Apples are red or green."
U2, A2 = "Second question about bananas?", "Bananas are long and yellow."
U3, A3 = "Third question about cherries?", "Cherries grow on trees."
R1, R2, R3 = "Reasoning one on apples.", "Reasoning two on bananas.", "Reasoning three on cherries."
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather of a city <now> & later",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "The city"}},
                   "required": ["city"]}}}]


def think(reasoning: str, answer: str) -> str:
    return f"<think>\n{reasoning}\n</think>\n\n{answer}"


def turns(*pairs) -> list[dict]:
    out = []
    for user, assistant in pairs:
        out += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    return out


# name -> (messages, template kwargs beyond date_string, which families it applies to)
CHATS = {
    "two_turn": (turns((U1, A1), (U2, A2)), {}, lambda f: True),
    "system": ([{"role": "system", "content": SYSTEM}] + turns((U1, A1), (U2, A2)), {}, lambda f: True),
    "three_turn": (turns((U1, A1), (U2, A2), (U3, A3)), {}, lambda f: True),
    "reasoning": (turns((U1, think(R1, A1)), (U2, think(R2, A2)), (U3, think(R3, A3))), {},
                  lambda f: f.reasoning),
    "tools": ([{"role": "system", "content": SYSTEM}] + turns((U1, A1), (U2, A2)), {"tools": TOOLS},
              lambda f: f.tools),
    "no_thinking": (turns((U1, A1), (U2, A2)), {"enable_thinking": False}, lambda f: f.thinking_flag),
}
# Render parity only (the loss-mask contract covers string contents).
PARITY_ONLY_CHATS = {
    "list_content": ([{"role": m["role"], "content": [{"type": "text", "text": m["content"]}]}
                      for m in [{"role": "system", "content": SYSTEM}] + turns((U1, A1), (U2, A2))], {},
                     lambda f: True),
}
ERROR_CHATS = {
    "not_alternating": [{"role": "user", "content": U1}, {"role": "user", "content": U2},
                        {"role": "assistant", "content": A2}],
}
# (family, chat) pairs where the real template must refuse the conversation (so the error tests are not vacuous).
EXPECTED_ERRORS = ({(name, chat) for name, f in FAMILIES.items() if not f.system for chat in ("system", "list_content")}
                   | {(name, "not_alternating") for name, f in FAMILIES.items() if f.alternating})


def _cases(chats):
    return [pytest.param(family, chat, id=f"{family}-{chat}")
            for family, f in FAMILIES.items() for chat, (_, _, applies) in chats.items() if applies(f)]


@dataclasses.dataclass
class Pair:
    ours: object  # sftjax Tokenizer
    ref: object  # transformers tokenizer
    family: Family


@pytest.fixture(scope="session")
def tokenizers(tmp_path_factory):
    """family name -> Pair, each trained and loaded once per session, on first use."""
    built: dict[str, Pair] = {}
    root = tmp_path_factory.mktemp("real_templates")

    def get(name: str) -> Pair:
        if name not in built:
            f = FAMILIES[name]
            tok = train_bpe_tokenizer(CORPUS, VOCAB_SIZE, special_tokens=f.special, bos_token=f.bos, eos_token=f.eos,
                                      pad_token=f.pad, chat_template=None)
            source = (REAL / f"{name}.jinja").read_text(encoding="utf-8")
            directory = dataclasses.replace(tok, chat_template=source).save(root / name)
            ours = load_tokenizer(directory)
            assert ours.chat_template == source
            built[name] = Pair(ours, AutoTokenizer.from_pretrained(directory), f)
        return built[name]

    return get


def _hf_render(ref, messages, add_generation_prompt: bool, kw: dict, tokenize: bool):
    out = ref.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=tokenize,
                                  return_dict=False, **kw)
    if tokenize and not isinstance(out, list):  # a BatchEncoding in some transformers versions
        out = out["input_ids"]
    return out


def _expect_same_error(pair: Pair, messages, kw: dict, hf_error: Exception):
    """sftjax refuses the conversation too: one DataError line naming the example and quoting the template."""
    with pytest.raises(DataError) as info:
        tokenize_examples([Example("chat.jsonl:7", messages=tuple(messages))], pair.ours, template_kwargs=kw)
    message = str(info.value)
    assert "\n" not in message and message.startswith("chat.jsonl:7:"), message
    assert str(hf_error).splitlines()[0] in message, (message, str(hf_error))


def test_every_fixture_is_covered_byte_exact_and_named_in_sources():
    files = {p.stem for p in REAL.glob("*.jinja")}
    assert files == set(FAMILIES) == set(SHA256)
    for name in files:
        assert hashlib.sha256((REAL / f"{name}.jinja").read_bytes()).hexdigest()[:16] == SHA256[name], name
    sources = (REAL / "SOURCES.md").read_text(encoding="utf-8")
    for name in files:
        assert f"`{name}.jinja`" in sources, name


@pytest.mark.parametrize(("family", "chat"), _cases({**CHATS, **PARITY_ONLY_CHATS}))
@pytest.mark.parametrize("add_generation_prompt", [False, True], ids=["full", "gen_prompt"])
def test_render_matches_transformers(tokenizers, family, chat, add_generation_prompt):
    pair = tokenizers(family)
    messages, kw, _ = {**CHATS, **PARITY_ONLY_CHATS}[chat]
    kw = {"date_string": DATE, **kw}
    if add_generation_prompt:
        messages = messages[:-1]
    try:
        expected = _hf_render(pair.ref, messages, add_generation_prompt, kw, tokenize=False)
    except jinja2.TemplateError as e:  # raise_exception(...) in the template
        assert (family, chat) in EXPECTED_ERRORS, f"transformers refused {family}/{chat}: {e}"
        with pytest.raises(jinja2.TemplateError, match=re.escape(str(e))):
            pair.ours.render_chat(messages, add_generation_prompt, **kw)
        if not add_generation_prompt:
            _expect_same_error(pair, messages, kw, e)
        return
    except TypeError as e:  # e.g. `'...' + message['content']` with list content
        assert chat == "list_content", f"transformers failed on {family}/{chat}: {e}"
        with pytest.raises(TypeError, match=re.escape(str(e))):
            pair.ours.render_chat(messages, add_generation_prompt, **kw)
        if not add_generation_prompt:
            _expect_same_error(pair, messages, kw, e)
        return
    assert (family, chat) not in EXPECTED_ERRORS
    text, _ = pair.ours.render_chat(messages, add_generation_prompt, **kw)
    assert text == expected
    assert pair.ours.apply_chat_template(messages, add_generation_prompt, **kw) == \
        _hf_render(pair.ref, messages, add_generation_prompt, kw, tokenize=True)


@pytest.mark.parametrize(("family", "chat"), _cases({k: (v, {}, lambda f: True) for k, v in ERROR_CHATS.items()}))
def test_template_errors_match_transformers(tokenizers, family, chat):
    pair = tokenizers(family)
    messages = ERROR_CHATS[chat]
    kw = {"date_string": DATE}
    try:
        expected = _hf_render(pair.ref, messages, False, kw, tokenize=False)
    except jinja2.TemplateError as e:
        assert (family, chat) in EXPECTED_ERRORS, f"transformers refused {family}/{chat}: {e}"
        _expect_same_error(pair, messages, kw, e)
        return
    assert (family, chat) not in EXPECTED_ERRORS, f"{family} accepted {chat}"
    assert pair.ours.render_chat(messages, **kw)[0] == expected


# ---------------------------------------------------------------------------------------------------------- masks


def _rendered_forms(content: str) -> list[str]:
    """How a template may render an assistant content: verbatim; without the reasoning up to the last </think> (and
    the newlines after it), as reasoning templates render earlier turns; stripped of surrounding whitespace."""
    forms = [content]
    if "</think>" in content:
        forms.append(content.split("</think>")[-1].lstrip("\n"))
    forms.append(content.strip())
    return [f for f in forms if f]


def _locate_assistant_contents(text: str, messages) -> list[tuple[int, int]]:
    """Character span of each assistant message's rendered content, found in order."""
    spans, cursor = [], 0
    for m in messages:
        if m["role"] != "assistant":
            continue
        for form in _rendered_forms(m["content"]):
            at = text.find(form, cursor)
            if at >= 0:
                spans.append((at, at + len(form)))
                cursor = at + len(form)
                break
        else:
            raise AssertionError(f"assistant content {m['content']!r} not found in the render {text!r}")
    return spans


def _prefix_stable(ref, messages, kw: dict) -> bool:
    """The per-turn condition, checked with transformers: for every assistant turn i, render(messages[:i], generation
    prompt) is a prefix of render(messages[:i+1]), itself a prefix of the full render."""
    full = _hf_render(ref, messages, False, kw, tokenize=False)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        try:
            before = _hf_render(ref, messages[:i], True, kw, tokenize=False)
            through = _hf_render(ref, messages[:i + 1], False, kw, tokenize=False)
        except jinja2.TemplateError:
            return False
        if not (through.startswith(before) and full.startswith(through)):
            return False
    return True


def _covering(offsets: np.ndarray, start: int, end: int) -> np.ndarray:
    """[L] bool: tokens whose character range overlaps [start, end)."""
    return (offsets[:, 0] < end) & (offsets[:, 1] > start)


def _inside(offsets: np.ndarray, start: int, end: int) -> np.ndarray:
    """[L] bool: tokens lying entirely inside [start, end) (and not empty)."""
    return (offsets[:, 0] >= start) & (offsets[:, 1] <= end) & (offsets[:, 1] > offsets[:, 0])


def _special_at(text: str, position: int, specials) -> str | None:
    return next((s for s in specials if text.startswith(s, position)), None)


def _generation_prompt(ref, messages, kw: dict) -> str:
    """What transformers' add_generation_prompt appends after messages ('' if it rewrites them instead)."""
    plain = _hf_render(ref, messages, False, kw, tokenize=False)
    prompted = _hf_render(ref, messages, True, kw, tokenize=False)
    return prompted[len(plain):] if prompted.startswith(plain) else ""


def _after_prompt(text: str, start: int, prompt: str) -> int:
    """The content's start, or the end of the generation prompt when the prompt runs into the content: QwQ prefills
    "<think>\n", so a last turn written "<think>\n..." starts, for the model, after it (the prompt is not trained)."""
    for k in range(1, len(prompt)):
        if text.startswith(prompt, start - k) and start - k + len(prompt) > start:
            return start - k + len(prompt)
    return start


@pytest.mark.parametrize(("family", "chat"), _cases(CHATS))
def test_loss_masks_are_exact(tokenizers, family, chat):
    pair = tokenizers(family)
    messages, kw, _ = CHATS[chat]
    kw = {"date_string": DATE, **kw}
    try:
        expected_ids = _hf_render(pair.ref, messages, False, kw, tokenize=True)
    except jinja2.TemplateError:
        assert (family, chat) in EXPECTED_ERRORS
        return  # refused: test_render_matches_transformers checks sftjax refuses it too
    tok = pair.ours
    [t] = tokenize_examples([Example("chat.jsonl:1", messages=tuple(messages))], tok, mode="completion",
                            append_eos=True, template_kwargs=kw)
    text, _ = tok.render_chat(messages, **kw)
    enc = tok.encode_batch([text])[0]
    ids = list(enc.ids)
    assert ids == list(expected_ids)
    tokens, mask = t.tokens.tolist(), np.asarray(t.mask, bool)
    assert len(tokens) == len(mask)
    if len(tokens) == len(ids) + 1:  # EOS appended (the last trained turn ends in no special token), and trained
        assert tokens[-1] == tok.eos_id and mask[-1]
        mask = mask[:-1]
    assert tokens[:len(ids)] == ids and len(mask) == len(ids)
    assert t.rule == ("per_turn" if _prefix_stable(pair.ref, messages, kw) else "search")

    offsets = np.asarray(enc.offsets, np.int64).reshape(-1, 2)
    specials = sorted(pair.family.special, key=len, reverse=True)
    spans = _locate_assistant_contents(text, messages)
    assistant = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    for (start, end), i in zip(spans, assistant):
        m = messages[i]
        start = _after_prompt(text, start, _generation_prompt(pair.ref, messages[:i], kw))
        covering = _covering(offsets, start, end)
        untrained = [text[a:b] for (a, b), trained in zip(offsets[covering], mask[covering]) if not trained]
        assert not untrained, f"untrained {untrained} in assistant content {text[start:end]!r}"
        after = end + len(text[end:]) - len(text[end:].lstrip())  # skip whitespace after the content
        marker = _special_at(text, after, specials)
        if marker is not None:  # the end-of-turn marker right after the content is trained
            assert mask[_covering(offsets, after, after + len(marker))].all(), f"{marker} after {m['content']!r}"
        if "</think>" in m["content"] and text.find(m["content"]) < 0:  # the template dropped this turn's reasoning
            reasoning = m["content"].split("</think>")[0].removeprefix("<think>").strip()
            assert reasoning not in text
    # The last assistant turn's span runs over the whitespace / special tokens that close the text.
    tail_start = spans[-1][1]
    if re.fullmatch(r"(\s|" + "|".join(map(re.escape, specials)) + r")*", text[tail_start:]):
        assert mask[offsets[:, 1] > tail_start].all(), f"untrained closing tokens {text[tail_start:]!r}"
    # Nothing before the first assistant content (but the whitespace right before it, which the model writes
    # after the generation prompt: Llama 2's "[/INST] " + content); nothing inside a user / system message.
    first = spans[0][0]
    lead = first - (len(text[:first]) - len(text[:first].rstrip()))
    assert not mask[offsets[:, 1] <= lead].any(), f"trained tokens before {text[lead:][:20]!r}"
    for m in messages:
        if m["role"] == "assistant":
            continue
        content = m["content"].strip()
        at = text.find(content)
        if at >= 0:  # (Mistral v0.3 / Nemo drop a system message unless the chat ends with a user turn)
            assert not mask[_inside(offsets, at, at + len(content))].any(), f"trained tokens in {m['role']} text"
    assert mask.sum() < len(mask)


def test_reasoning_of_earlier_turns_is_dropped_and_answers_trained(tokenizers):
    """Qwen3 drops the <think> block of turns before the last user message and keeps the last turn's."""
    pair = tokenizers("qwen3")
    messages, kw, _ = CHATS["reasoning"]
    [t] = tokenize_examples([Example("chat.jsonl:1", messages=tuple(messages))], pair.ours, template_kwargs=kw)
    trained = pair.ours.decode(t.tokens[t.mask])
    assert R1 not in trained and R2 not in trained and R3 in trained
    assert A1 in trained and A2 in trained and A3 in trained
    assert U3 not in trained


def test_a_rewritten_assistant_content_is_refused(tokenizers):
    """A template that rewrites the assistant text beyond the search rules (upper-cased, plus a count of the messages
    after it, so per-turn rendering fails too) cannot be masked: one DataError line naming the turn."""
    pair = tokenizers("qwen2_5")
    source = ("{% for m in messages %}{{ '<|im_start|>' + m.role + '\n' }}{% if m.role == 'assistant' %}"
              "{{ m.content | upper }} ({{ messages | length - loop.index }} later){% else %}{{ m.content }}"
              "{% endif %}{{ '<|im_end|>\n' }}{% endfor %}")
    tok = dataclasses.replace(pair.ours, chat_template=source)
    messages = ({"role": "user", "content": U1}, {"role": "assistant", "content": "a lowercase answer"},
                {"role": "user", "content": U2}, {"role": "assistant", "content": "another lowercase answer"})
    with pytest.raises(DataError) as info:
        tokenize_examples([Example("chat.jsonl:1", messages=messages)], tok)
    message = str(info.value)
    assert "\n" not in message and message.startswith("chat.jsonl:1:") and "messages[1]" in message, message


def test_tool_calls_and_tool_results_on_qwen3(tokenizers):
    """An assistant turn that is only a tool call trains the call and its <|im_end|>; the tool's result does not
    train; the final answer after it trains (the empty <think> block Qwen3 adds before it does not)."""
    pair = tokenizers("qwen3")
    call = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
    messages = ({"role": "user", "content": U1}, {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "content": "Sunny and warm."}, {"role": "assistant", "content": A1})
    kw = {"tools": TOOLS}
    expected = _hf_render(pair.ref, list(messages), False, kw, tokenize=True)
    [t] = tokenize_examples([Example("chat.jsonl:1", messages=messages)], pair.ours, template_kwargs=kw)
    assert t.rule == "search" and t.tokens.tolist() == list(expected)
    assert _trained_pieces(pair.ours, t) == [
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>',
        f"{A1}<|im_end|>\n"]


def test_text_parts_are_masked_like_strings(tokenizers):
    """Gemma 3 renders content given as text parts; the mask is the one of the same chat with string contents."""
    pair = tokenizers("gemma3")
    messages, _, _ = CHATS["system"]
    parts = tuple({"role": m["role"], "content": [{"type": "text", "text": m["content"]}]} for m in messages)
    [plain, listed] = tokenize_examples([Example("chat.jsonl:1", messages=tuple(messages)),
                                         Example("chat.jsonl:2", messages=parts)], pair.ours)
    assert listed.tokens.tolist() == list(_hf_render(pair.ref, list(parts), False, {}, tokenize=True))
    np.testing.assert_array_equal(plain.tokens, listed.tokens)
    np.testing.assert_array_equal(plain.mask, listed.mask)
    assert _trained_pieces(pair.ours, listed) == [f"{A1}<end_of_turn>\n", f"{A2}<end_of_turn>\n"]


def test_strftime_now_gives_todays_date_as_transformers(tokenizers):
    """Llama 3.2 writes today's date with strftime_now when no date_string is given."""
    pair = tokenizers("llama3_2")
    messages, _, _ = CHATS["two_turn"]
    ours = pair.ours.render_chat(messages)[0]
    assert ours == _hf_render(pair.ref, messages, False, {}, tokenize=False)
    assert datetime.date.today().strftime("%d %b %Y") in ours
