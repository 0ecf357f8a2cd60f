"""Shared fixtures: small byte-level BPE tokenizers trained locally, one per test chat template.

Each is saved as a model directory (tokenizer.json, tokenizer_config.json with the fixture template), so the same
directory loads both in sftjax and in transformers' AutoTokenizer (the reference).
"""

from pathlib import Path

import pytest

from sftjax.data.tokenizer import train_bpe_tokenizer

FIXTURES = Path(__file__).parent.parent / "fixtures" / "chat_templates"

# A little English with whitespace runs, digits, punctuation and non-ASCII text, so merges are non-trivial.
CORPUS = [
    "Hello world, how are you today? I'm fine, thanks.",
    "The quick brown fox jumps over the lazy dog 42 times.\n\n  Indented line\tand a tab.",
    "Ünïcödé, 日本語のテキスト, emojis 🙂 and math: 3 + 4 = 7.",
    "You are a helpful assistant. Answer the question briefly.",
] * 20
VOCAB_SIZE = 400  # 256 bytes + specials + ~130 merges

# template fixture -> (special tokens, bos, eos, pad)
TEMPLATES = {
    "qwen_chatml": (("<|endoftext|>", "<|im_start|>", "<|im_end|>"), None, "<|im_end|>", "<|endoftext|>"),
    "llama3": (("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                "<|pad|>"), "<|begin_of_text|>", "<|eot_id|>", "<|pad|>"),
}


def make_tokenizer_dir(directory: Path, name: str) -> Path:
    special, bos, eos, pad = TEMPLATES[name]
    tok = train_bpe_tokenizer(CORPUS, VOCAB_SIZE, special_tokens=special, bos_token=bos, eos_token=eos,
                              pad_token=pad, chat_template=str(FIXTURES / f"{name}.jinja"))
    return tok.save(directory / name)


@pytest.fixture(scope="session", params=sorted(TEMPLATES))
def template_dir(request, tmp_path_factory) -> Path:
    """A tokenizer directory per fixture template (tests using it run once per template)."""
    return make_tokenizer_dir(tmp_path_factory.mktemp("tok"), request.param)


@pytest.fixture(scope="session")
def chatml_dir(tmp_path_factory) -> Path:
    return make_tokenizer_dir(tmp_path_factory.mktemp("tok"), "qwen_chatml")
