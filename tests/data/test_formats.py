"""Readers: the four formats, auto-detection and its override, and one-line errors naming file:line."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sftjax.data.errors import DataError
from sftjax.data.formats import ALPACA_PROMPT, ALPACA_PROMPT_NO_INPUT, read_dataset


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


CHAT = {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                     {"role": "assistant", "content": "a"}]}


def test_each_format_is_detected_and_normalised(tmp_path):
    chat = read_dataset(write_jsonl(tmp_path / "c.jsonl", [CHAT]))
    assert chat[0].messages == tuple(CHAT["messages"]) and chat[0].where == f"{tmp_path}/c.jsonl:1"
    pc = read_dataset(write_jsonl(tmp_path / "p.jsonl", [{"prompt": "P", "completion": "C", "id": 3}]))
    assert (pc[0].prompt, pc[0].completion, pc[0].messages) == ("P", "C", None)
    alpaca = read_dataset(write_jsonl(tmp_path / "a.jsonl", [{"instruction": "I", "input": "X", "output": "O"},
                                                             {"instruction": "I", "output": "O"}]))
    assert alpaca[0].prompt == ALPACA_PROMPT.format(instruction="I", input="X") and alpaca[0].completion == "O"
    assert alpaca[1].prompt == ALPACA_PROMPT_NO_INPUT.format(instruction="I")
    text = read_dataset(write_jsonl(tmp_path / "t.jsonl", [{"text": "T"}]))
    assert (text[0].prompt, text[0].completion) == ("", "T")


def test_as_chat_and_format_override(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "I", "input": "X", "output": "O", "text": "T"}])
    [ex] = read_dataset(path, as_chat=True)
    assert ex.messages == ({"role": "user", "content": "I\n\nX"}, {"role": "assistant", "content": "O"})
    [ex] = read_dataset(path, format="text")
    assert ex.completion == "T"


def test_json_array_reports_the_line_of_each_record(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[\n  {"prompt": "a", "completion": "b"},\n\n  {"prompt": "a",\n   "completion": 3}\n]\n')
    with pytest.raises(DataError, match=rf"^{path}:4: field 'completion' must be a string, got number 3$"):
        read_dataset(path)
    path.write_text('\ufeff[{"text": "a"}, {"text": "b"}]')
    assert [e.completion for e in read_dataset(path)] == ["a", "b"]


BAD_LINES = [
    ('{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completion": "b"', r":2: invalid JSON: Expecting"),
    ('{"prompt": "a", "completion": "b"}\n{"prompt": "a"}', r":2: cannot detect the format|:2: missing field"),
    ('{"prompt": "a", "completion": "b"}\n\n{"prompt": "a", "compl": "b"}', r":3: missing field 'completion'"),
    ('{"text": ["a"]}', r":1: field 'text' must be a string, got array"),
    ('[1, 2]', r":1: expected a JSON object, got array"),
    ('[1, 2]', r":1: expected a JSON object, got number", ".json"),
    ('{"messages": [{"role": "robot", "content": "x"}]}', r":1: messages\[0\] has unknown role 'robot'"),
    ('{"messages": [{"content": "x"}]}', r":1: messages\[0\] has no 'role'"),
    ('{"messages": [{"role": "user"}]}', r":1: messages\[0\] \(user\) has no 'content'"),
    ('{"messages": [{"role": "user", "content": null}]}',
     r":1: messages\[0\].content must be a string or a list of text parts, got null"),
    ('{"messages": [{"role": "user", "content": [{"type": "image", "url": "x.png"}]}]}',
     r":1: messages\[0\].content\[0\] must be a text part .* \(only text is supported\)"),
    ("[" * 100000 + "]" * 100000, r":1: invalid JSON: nested too deeply$"),
    ('{"text": "x", "n": ' + "9" * 5000 + "}",
     r":1: invalid JSON: a number too large \(Exceeds the limit \(4300 digits\) for integer string conversion\)$"),
    ("[\n" + "[" * 100000 + "]" * 100000 + "\n]", r":2: invalid JSON: nested too deeply$", ".json"),
    ('{"prompt": "p", "chosen": "a", "rejected": "b", "margin": 1e999}',
     r":1: field 'margin' must be a finite number"),
    ('{"messages": [{"role": "user", "content": "hi"}], "tools": {"name": "f"}}',
     r":1: field 'tools' must be an array of tool schemas, got object"),
    ('{"messages": "hi"}', r":1: field 'messages' must be an array, got string"),
    ('{"messages": []}', r":1: field 'messages' is empty"),
    ('{"foo": 1}', r":1: cannot detect the format from keys \['foo'\]"),
    ('\n\n  \n', r": empty dataset \(no records\)"),
    ('[]', r": empty dataset \(no records\)", ".json"),
    ('[{"text": "a"} {"text": "b"}]', r":1: invalid JSON: expected ',' or ']'", ".json"),
    ('[{"text": "a"},\n {"text": "b"}', r":2: invalid JSON: unterminated array", ".json"),
]


@pytest.mark.parametrize("content,message,suffix", [case + (".jsonl",) * (len(case) == 2) for case in BAD_LINES])
def test_bad_input_is_one_line_naming_file_and_line(tmp_path, content, message, suffix):
    path = tmp_path / f"bad{suffix}"
    path.write_text(content)
    with pytest.raises(DataError, match=message) as info:
        read_dataset(path)
    assert str(info.value).startswith(str(path)) and "\n" not in str(info.value)


def test_missing_file_non_utf8_and_unknown_format(tmp_path):
    with pytest.raises(DataError, match=r"nope.jsonl: file not found"):
        read_dataset(tmp_path / "nope.jsonl")
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=rf"^{path}:2: not UTF-8 \(byte 0xe9\)$"):
        read_dataset(path)
    with pytest.raises(DataError, match="format='csv'"):
        read_dataset(write_jsonl(tmp_path / "t.jsonl", [{"text": "T"}]), format="csv")


# Text that JSON must escape: quotes, backslashes, newlines, control characters, non-BMP characters.
_TEXT = st.text(alphabet=st.characters(exclude_categories=("Cs",)), max_size=30)
_MESSAGE = st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant", "tool"]), "content": _TEXT})


@settings(max_examples=40, deadline=None)
@given(records=st.lists(st.fixed_dictionaries({"messages": st.lists(_MESSAGE, min_size=1, max_size=4)}),
                        min_size=1, max_size=8),
       as_array=st.booleans(), indent=st.sampled_from([None, 2]))
def test_reader_round_trips_any_valid_chat_file(tmp_path_factory, records, as_array, indent):
    path = tmp_path_factory.mktemp("h") / "d.json"
    if as_array:
        path.write_text(json.dumps(records, indent=indent, ensure_ascii=False), encoding="utf-8")
    else:
        write_jsonl(path, records)
    examples = read_dataset(path)
    assert [list(e.messages) for e in examples] == [r["messages"] for r in records]
    lines = path.read_text(encoding="utf-8").split("\n")
    for e in examples:  # every reported line is where that record starts
        line = int(e.where.rsplit(":", 1)[1])
        assert lines[line - 1].lstrip(" [,").startswith("{")


@settings(max_examples=40, deadline=None)
@given(records=st.lists(st.fixed_dictionaries({"prompt": _TEXT, "completion": _TEXT}), min_size=1, max_size=6),
       bad=st.integers(0, 5), junk=st.sampled_from(["{", '{"prompt": 1, "completion": "x"}', "[]", "nul"]))
def test_the_first_bad_line_is_the_one_reported(tmp_path_factory, records, bad, junk):
    bad = min(bad, len(records) - 1)
    lines = [json.dumps(r) for r in records]
    lines[bad] = junk
    path = tmp_path_factory.mktemp("h") / "d.jsonl"
    path.write_text("\n".join(lines))
    with pytest.raises(DataError, match=rf"^{path}:{bad + 1}: "):
        read_dataset(path)
