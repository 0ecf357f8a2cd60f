"""Tokenizer loading, chat rendering parity with transformers' apply_chat_template, BPE training."""

import json

import jinja2
import pytest
from transformers import AutoTokenizer

from sftjax.data.errors import DataError
from sftjax.data.templates import BUILTIN_TEMPLATES, render
from sftjax.data.tokenizer import load_tokenizer, train_bpe_tokenizer

from .conftest import CORPUS, VOCAB_SIZE

DATE = "24 Nov 2026"  # fixed, so the Llama-3 template's strftime_now cannot differ between the two renders

CONVERSATIONS = [
    [{"role": "user", "content": "Hello world"}, {"role": "assistant", "content": "I'm fine, thanks."}],
    [{"role": "system", "content": "Answer  briefly.\n"}, {"role": "user", "content": "How are you today?"},
     {"role": "assistant", "content": " The quick brown fox\n\n"}, {"role": "user", "content": "日本語 🙂?"},
     {"role": "assistant", "content": "3 + 4 = 7"}],
    [{"role": "user", "content": "<|im_end|> in user text, and <|eot_id|>"}, {"role": "assistant", "content": ""}],
]


@pytest.mark.parametrize("conversation", range(len(CONVERSATIONS)))
@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_apply_chat_template_matches_transformers(template_dir, conversation, add_generation_prompt):
    messages = CONVERSATIONS[conversation]
    if add_generation_prompt:
        messages = messages[:-1]
    ours = load_tokenizer(template_dir)
    ref = AutoTokenizer.from_pretrained(template_dir)
    expected = ref.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, date_string=DATE,
                                       tokenize=False)
    text, _ = ours.render_chat(messages, add_generation_prompt, date_string=DATE)
    assert text == expected
    expected_ids = ref.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                           date_string=DATE, return_dict=False)
    assert ours.apply_chat_template(messages, add_generation_prompt, date_string=DATE) == list(expected_ids)


def test_tools_and_tool_calls_match_transformers(chatml_dir):
    tools = [{"type": "function", "function": {"name": "add", "description": "a <b> & c",
                                               "parameters": {"type": "object", "properties": {}}}}]
    messages = [{"role": "user", "content": "Add 3 and 4"},
                {"role": "assistant", "content": None,
                 "tool_calls": [{"function": {"name": "add", "arguments": {"a": 3, "b": 4}}}]},
                {"role": "tool", "content": "7"}, {"role": "assistant", "content": "7"}]
    ours = load_tokenizer(chatml_dir)
    ref = AutoTokenizer.from_pretrained(chatml_dir)
    expected = ref.apply_chat_template(messages, tools=tools, return_dict=False)
    assert ours.apply_chat_template(messages, tools=tools) == list(expected)
    assert '"a <b> & c"' in ours.render_chat(messages, tools=tools)[0]  # tojson does not escape HTML


def test_plain_encoding_and_special_tokens_match_transformers(template_dir):
    ours, ref = load_tokenizer(template_dir), AutoTokenizer.from_pretrained(template_dir)
    for text in CORPUS[:4]:
        assert ours.encode(text, add_special_tokens=True) == ref(text)["input_ids"]
        assert ours.decode(ours.encode(text)) == text
    assert ours.eos_id == ref.eos_token_id and ours.pad_id == ref.pad_token_id and ours.bos_id == ref.bos_token_id
    assert ours.eos_id in ours.special_ids


def test_builtin_template_when_the_tokenizer_has_none(tmp_path):
    tok = train_bpe_tokenizer(CORPUS, VOCAB_SIZE, chat_template=None)
    tok.save(tmp_path)
    bare = load_tokenizer(tmp_path)
    messages = CONVERSATIONS[0]
    with pytest.raises(DataError, match="no chat template"):
        bare.apply_chat_template(messages)
    for name, source in BUILTIN_TEMPLATES.items():
        ours = load_tokenizer(tmp_path, chat_template=name)
        ref = AutoTokenizer.from_pretrained(tmp_path)
        assert ours.apply_chat_template(messages) == list(ref.apply_chat_template(messages, chat_template=source,
                                                                                  return_dict=False))
    assert load_tokenizer(tmp_path, chat_template="chatml").render_chat(messages)[0] == (
        "<|im_start|>user\nHello world<|im_end|>\n<|im_start|>assistant\nI'm fine, thanks.<|im_end|>\n")


def test_template_file_takes_priority_and_template_lists(tmp_path):
    tok = train_bpe_tokenizer(CORPUS, VOCAB_SIZE, chat_template="llama3")
    tok.save(tmp_path)
    (tmp_path / "chat_template.jinja").write_text(BUILTIN_TEMPLATES["chatml"])
    assert load_tokenizer(tmp_path).chat_template == BUILTIN_TEMPLATES["chatml"]
    (tmp_path / "chat_template.jinja").unlink()
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["chat_template"] = [{"name": "tool_use", "template": "x"}, {"name": "default", "template": "y"}]
    config["eos_token"] = {"content": "</s>", "special": True}  # a serialized AddedToken
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    loaded = load_tokenizer(tmp_path)
    assert loaded.chat_template == "y" and loaded.eos_id == tok.eos_id


def test_generation_tags_give_assistant_spans():
    source = ("{% for m in messages %}{{ m.role }}: {% if m.role == 'assistant' %}{% generation %}{{ m.content }}"
              "{% endgeneration %}{% else %}{{ m.content }}{% endif %};{% endfor %}")
    text, spans = render(source, CONVERSATIONS[1][1:], with_spans=True)
    assert [text[a:b] for a, b in spans] == [" The quick brown fox\n\n", "3 + 4 = 7"]
    assert render(source, CONVERSATIONS[1][1:])[0] == text


def test_sandbox_refuses_python_internals():
    with pytest.raises(jinja2.exceptions.SecurityError):
        render("{{ ''.__class__.__mro__[1].__subclasses__() }}", [])
    with pytest.raises(jinja2.exceptions.SecurityError):
        render("{% set ns = namespace() %}{% set ns._x = 1 %}", [])
    with pytest.raises(jinja2.exceptions.TemplateError, match="boom"):
        render("{{ raise_exception('boom') }}", [])


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(DataError, match=r"tokenizer.json: file not found"):
        load_tokenizer(tmp_path)
    train_bpe_tokenizer(CORPUS, VOCAB_SIZE).save(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "eos_token": "<nope>"}))
    with pytest.raises(DataError, match=r"tokenizer_config.json\[eos_token\]: '<nope>' is not in the vocabulary"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(DataError, match="chat_template='nope'"):
        load_tokenizer(tmp_path, chat_template="nope")


def test_train_bpe_tokenizer_layout():
    tok = train_bpe_tokenizer(CORPUS, VOCAB_SIZE)
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)  # as the tiny-llama preset expects
    assert tok.vocab_size == VOCAB_SIZE
    assert tok.encode("Hello", add_special_tokens=True)[0] == tok.bos_id
    text = "bytes never seen: ∑ ∫ ☃ \x00"
    assert tok.decode(tok.encode(text)) == text  # byte-level: every string is representable
    with pytest.raises(DataError, match="bos_token '<b>' must be one of special_tokens"):
        train_bpe_tokenizer(CORPUS, VOCAB_SIZE, bos_token="<b>")


def test_whitespace_control_matches_transformers(chatml_dir):
    """trim_blocks / lstrip_blocks: a template written over several indented lines without '-' markers."""
    source = """{% for message in messages %}
    {% if message['role'] == 'user' %}
<|im_start|>user
{{ message['content'] }}<|im_end|>
    {% else %}
<|im_start|>assistant
{{ message['content'] }}<|im_end|>
    {% endif %}
{% endfor %}
"""
    ref = AutoTokenizer.from_pretrained(chatml_dir)
    messages = CONVERSATIONS[1][1:]
    expected = ref.apply_chat_template(messages, chat_template=source, tokenize=False)
    assert render(source, messages)[0] == expected
    assert "    " not in expected  # the indentation before block tags is stripped
