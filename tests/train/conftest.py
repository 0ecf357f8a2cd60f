"""A tiny local model directory (random Llama + trained BPE tokenizer + ChatML template) and an arithmetic chat
dataset, shared by the training tests. Everything is built here; nothing is downloaded."""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from tests.data.conftest import VOCAB_SIZE, make_tokenizer_dir
from tests.model import hf_models


def write_arithmetic(path: Path, n: int, seed: int) -> Path:
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            a, b = rng.randint(0, 50), rng.randint(0, 50)
            messages = [{"role": "user", "content": f"{a}+{b}="}, {"role": "assistant", "content": str(a + b)}]
            f.write(json.dumps({"messages": messages}) + "\n")
    return path


@pytest.fixture(scope="session")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    model = make_tokenizer_dir(root, "qwen_chatml")
    hf_models.build(model, "llama", "gqa", vocab_size=VOCAB_SIZE, tie_word_embeddings=False)
    return {"root": root, "model": model, "train": write_arithmetic(root / "arith.jsonl", 200, seed=0),
            "eval": write_arithmetic(root / "arith_eval.jsonl", 20, seed=1)}


def train_command(*overrides: str) -> list[str]:
    return [sys.executable, "-m", "sftjax.cli.train", *overrides]


def run_train(*overrides: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])}
    done = subprocess.run(train_command(*overrides), cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    if check and done.returncode != 0:
        raise AssertionError(f"sftjax-train failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return done
