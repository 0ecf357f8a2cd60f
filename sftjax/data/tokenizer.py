"""Tokenizer: HF `tokenizers` plus the pieces of `tokenizer_config.json` that SFT needs.

A model directory holds `tokenizer.json` (the Rust tokenizer: normalizer, pre-tokenizer, model, added tokens,
post-processor) and `tokenizer_config.json` (bos / eos / pad / unk token strings, `chat_template`; transformers
5.x writes the template to `chat_template.jinja` instead, which then takes priority, as in transformers).
`Tokenizer` keeps both and offers what the pipeline uses: batched encoding with character offsets (for loss masks),
chat rendering (`templates.py`) and the special-token ids.

`apply_chat_template(messages)` equals transformers' `tokenizer.apply_chat_template(messages)`: render with the
special tokens as template variables, then encode the text without adding special tokens.

`train_bpe_tokenizer` trains a byte-level BPE (GPT-2 / Llama 3 style: any byte sequence is representable, offsets
are exact) and writes both files, so the built-in base model has a tokenizer that transformers can load too.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from sftjax.data import templates
from sftjax.data.errors import DataError

# The named special tokens transformers exposes to chat templates (`special_tokens_map`).
_SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")

# Defaults of `train_bpe_tokenizer`: ids 0, 1, 2 are pad, bos, eos as in the `tiny-llama` model preset, then the
# ChatML markers of the built-in chat template.
DEFAULT_SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>")


@dataclasses.dataclass(frozen=True, eq=False)
class Tokenizer:
    """A `tokenizers.Tokenizer` with its named special tokens and chat template (None: no template)."""

    backend: tokenizers.Tokenizer
    special_tokens: dict[str, str]  # e.g. {"bos_token": "<s>", "eos_token": "</s>"}; only those that are set
    chat_template: str | None = None
    source: str = "<memory>"  # where it was loaded from, for error messages

    def token_id(self, key: str) -> int | None:
        """Id of a named special token ("bos_token", ...), or None if unset. Raises DataError if not in the vocab."""
        token = self.special_tokens.get(key)
        if token is None:
            return None
        token_id = self.backend.token_to_id(token)
        if token_id is None:
            raise DataError(f"{self.source}: {key} {token!r} is not in the vocabulary")
        return token_id

    @property
    def bos_id(self) -> int | None:
        return self.token_id("bos_token")

    @property
    def eos_id(self) -> int | None:
        return self.token_id("eos_token")

    @property
    def pad_id(self) -> int | None:
        return self.token_id("pad_token")

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def special_ids(self) -> frozenset[int]:
        """Ids of added tokens flagged special (control tokens such as <|im_end|>, <|eot_id|>)."""
        return frozenset(i for i, t in self.backend.get_added_tokens_decoder().items() if t.special)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = False) -> list[tokenizers.Encoding]:
        """Encodings (ids, character offsets) of many texts at once, in parallel in Rust."""
        return self.backend.encode_batch(list(texts), add_special_tokens=add_special_tokens)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def render_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = False,
                    with_spans: bool = False, **kwargs) -> tuple[str, list[tuple[int, int]]]:
        """Chat template applied to messages -> (text, {% generation %} spans). See `templates.render`."""
        if self.chat_template is None:
            raise DataError(f"{self.source}: the tokenizer has no chat template; name one with chat_template="
                            f"({', '.join(templates.BUILTIN_TEMPLATES)} or a .jinja file)")
        return templates.render(self.chat_template, messages, add_generation_prompt, with_spans,
                                **{**self.special_tokens, **kwargs})

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = False,
                            **kwargs) -> list[int]:
        """Token ids of the rendered chat, equal to transformers' `apply_chat_template(messages, ...)`."""
        return self.encode(self.render_chat(messages, add_generation_prompt, **kwargs)[0])

    def with_chat_template(self, template: str | None) -> "Tokenizer":
        """A copy whose chat template is `template`: a built-in name, a path to a .jinja file, or None (keep)."""
        if template is None:
            return self
        return dataclasses.replace(self, chat_template=resolve_template(template))

    def save(self, directory: str | Path) -> Path:
        """Write tokenizer.json and tokenizer_config.json (loadable by transformers' AutoTokenizer too)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(directory / "tokenizer.json"))
        config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", **self.special_tokens}
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        return directory


def resolve_template(template: str) -> str:
    """A built-in template name, or a path to a .jinja file -> template source. Raises DataError otherwise."""
    if template in templates.BUILTIN_TEMPLATES:
        return templates.BUILTIN_TEMPLATES[template]
    path = Path(template)
    if path.suffix == ".jinja":
        if not path.is_file():
            raise DataError(f"{path}: chat template file not found")
        return path.read_text(encoding="utf-8")
    raise DataError(f"chat_template={template!r}: not a built-in template ({', '.join(templates.BUILTIN_TEMPLATES)})"
                    " nor a .jinja file")


def _token_string(value: Any, where: str) -> str | None:
    """A special token in tokenizer_config.json: a string, or a serialized AddedToken {"content": ...}."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise DataError(f"{where}: expected a token string or {{\"content\": ...}}, got {value!r}")


def _config_template(config: dict[str, Any], where: str) -> str | None:
    """`chat_template` of tokenizer_config.json: a string, or a list of {"name", "template"} (pick "default")."""
    value = config.get("chat_template")
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        if isinstance(named.get("default"), str):
            return named["default"]
    raise DataError(f"{where}[chat_template]: expected a string or a list with a 'default' template")


def load_tokenizer(directory: str | Path, chat_template: str | None = None) -> Tokenizer:
    """Load tokenizer.json (+ tokenizer_config.json, chat_template.jinja when present) from a local directory.

    chat_template: override (built-in name or .jinja path); when the directory has none and no override is
    given, the tokenizer has no template and chat data raises a DataError naming the option.
    """
    directory = Path(directory)
    tokenizer_file = directory / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise DataError(f"{tokenizer_file}: file not found (sftjax reads the fast-tokenizer format)")
    try:
        backend = tokenizers.Tokenizer.from_file(str(tokenizer_file))
    except Exception as e:  # the Rust loader raises a plain Exception with its reason
        raise DataError(f"{tokenizer_file}: cannot be loaded: {str(e).splitlines()[0]}") from None
    config_file = directory / "tokenizer_config.json"
    config: dict[str, Any] = {}
    if config_file.is_file():
        try:
            config = json.loads(config_file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"{config_file}: invalid JSON: {e}") from None
    special = {}
    for key in _SPECIAL_TOKEN_KEYS:
        token = _token_string(config.get(key), f"{config_file}[{key}]")
        if token is not None:
            special[key] = token
    jinja_file = directory / "chat_template.jinja"
    template = (jinja_file.read_text(encoding="utf-8") if jinja_file.is_file()
                else _config_template(config, str(config_file)))
    tok = Tokenizer(backend, special, template, str(directory))
    for key, token in special.items():  # fail now, not mid-run, on a special token missing from the vocabulary
        if backend.token_to_id(token) is None:
            raise DataError(f"{config_file}[{key}]: {token!r} is not in the vocabulary of {tokenizer_file.name}")
    return tok.with_chat_template(chat_template)


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int,
                        special_tokens: Sequence[str] = DEFAULT_SPECIAL_TOKENS, bos_token: str | None = "<s>",
                        eos_token: str | None = "</s>", pad_token: str | None = "<pad>",
                        chat_template: str | None = "chatml") -> Tokenizer:
    """Train a byte-level BPE on texts. Special tokens get ids 0.. in order; encoding with special tokens prepends
    bos_token (as Llama does). chat_template: a built-in name, a .jinja path, or None.
    """
    named = {"bos_token": bos_token, "eos_token": eos_token, "pad_token": pad_token}
    for key, token in named.items():
        if token is not None and token not in special_tokens:
            raise DataError(f"{key} {token!r} must be one of special_tokens {list(special_tokens)}")
    backend = tokenizers.Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(special_tokens),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(texts, trainer=trainer)
    # trim_offsets=False: offsets cover the whitespace a token carries, so loss masks from offsets are exact.
    byte_level = processors.ByteLevel(trim_offsets=False)
    if bos_token is not None:
        bos = processors.TemplateProcessing(single=f"{bos_token} $A", pair=f"{bos_token} $A $B",
                                            special_tokens=[(bos_token, backend.token_to_id(bos_token))])
        backend.post_processor = processors.Sequence([byte_level, bos])
    else:
        backend.post_processor = byte_level
    special = {k: v for k, v in named.items() if v is not None}
    template = None if chat_template is None else resolve_template(chat_template)
    return Tokenizer(backend, special, template, "<trained>")
