"""sftjax-data: the report, its JSON form, and one-line user errors with a non-zero exit."""

import json

from sftjax.cli.data import main
from tests.data.conftest import make_tokenizer_dir
from tests.data.test_formats import write_jsonl


def test_report_json_and_marks(tmp_path, capsys):
    tok = make_tokenizer_dir(tmp_path, "qwen_chatml")
    chat = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "Hello world"},
                                                               {"role": "assistant", "content": "fine"}]}] * 3)
    pc = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "Hello", "completion": " world"}, {"prompt": "x",
                                                                                          "completion": ""}])
    assert main([str(chat), str(pc), "--tokenizer", str(tok), "--seq-len", "64", "--json", "--show", "1",
                 "--no-eos"]) == 0
    result = json.loads(capsys.readouterr().out)
    chat_task, pc_task = result["tasks"]
    assert (chat_task["records"], chat_task["kept"], pc_task["kept"], pc_task["dropped_empty_mask"]) == (3, 3, 1, 1)
    assert chat_task["examples"][0]["text"].endswith("assistant\n[[fine<|im_end|>\n]]")
    assert pc_task["examples"][0]["text"] == "Hello[[ world]]"
    assert 0 < result["packing_efficiency"] <= 1
    assert main([str(chat), "--tokenizer", str(tok), "--seq-len", "64"]) == 0
    assert "efficiency" in capsys.readouterr().out


def test_user_error_is_one_line(tmp_path, capsys):
    tok = make_tokenizer_dir(tmp_path, "qwen_chatml")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "robot", "content": "x"}]}\n')
    assert main([str(bad), "--tokenizer", str(tok)]) == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and f"{bad}:1: messages[0] has unknown role 'robot'" in err
