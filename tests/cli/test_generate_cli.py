"""sftjax-generate: presets with token ids, a local HF directory with text (plain and chat), one-line errors."""

from sftjax.cli.generate import main
from tests.data.conftest import VOCAB_SIZE, make_tokenizer_dir
from tests.model import hf_models


def test_preset_with_token_ids(capsys):
    assert main(["--model", "tiny-llama", "--prompt-ids", "1", "17", "42", "--prompt-ids", "1", "5",
                 "--max-new-tokens", "4"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("model: tiny-llama (llama, 0.92M parameters, float32)")
    assert lines[1].startswith("[1, 17, 42] -> [") and lines[2].startswith("[1, 5] -> [")


def test_local_directory_with_text_prompts(tmp_path, capsys):
    directory = make_tokenizer_dir(tmp_path, "qwen_chatml")
    hf_models.build(directory, "qwen2", "gqa", vocab_size=VOCAB_SIZE)
    assert main(["--model", str(directory), "--prompt", "Hello world", "--max-new-tokens", "5"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1].startswith("'Hello world' -> '")
    assert main(["--model", str(directory), "--prompt", "Hi", "--chat", "--max-new-tokens", "3"]) == 0
    assert "<|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\n" in capsys.readouterr().out


def test_errors_are_one_line(tmp_path, capsys):
    assert main(["--model", "tiny-llama", "--prompt", "text"]) == 2
    assert capsys.readouterr().err.strip() == ("sftjax-generate: error: tiny-llama: no tokenizer.json, so text "
                                                "prompts cannot be encoded; use --prompt-ids")
    assert main(["--model", "tiny-llama"]) == 2
    assert "at least one --prompt" in capsys.readouterr().err
    assert main(["--model", "tiny-llama", "--prompt-ids", "9999"]) == 2
    assert "token id 9999 outside the vocabulary" in capsys.readouterr().err
