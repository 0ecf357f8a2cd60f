"""The built-in corpus and tasks: size, determinism (also under another hash seed), leak-free splits, right answers,
and that sftjax's own data pipeline reads every file. One build per test module (~5 s), one more in a subprocess.
"""

import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import sftjax
from sftjax.data.builtin import MODULE_CLASSES, build_corpus, build_tasks, extract, few_shot_prompt
from sftjax.data.builtin import corpus as corpus_lib
from sftjax.data.builtin import tasks as tasks_lib
from sftjax.data.pipeline import DataConfig, DatasetSpec, prepare
from sftjax.data.tokenizer import train_bpe_tokenizer

MIN_TRAIN = {"module": 1000, "first_param": 2000, "add": 2000}  # CPython 3.10-3.13 hold at least this much
MIN_HELD = {"valid": {"module": 50, "first_param": 200, "add": 200},
            "test": {"module": 150, "first_param": 200, "add": 200}}
SPLITS = tasks_lib.SPLITS


def disjoint(sets):
    """No element in two of the sets of {split: set}."""
    names = list(sets)
    return all(not sets[a] & sets[b] for i, a in enumerate(names) for b in names[i + 1:])


def read(path):
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    directory = tmp_path_factory.mktemp("builtin")
    info = build_corpus(directory)
    return directory, info, build_tasks(directory, seed=0, heldout_modules=info.heldout_modules)


def test_corpus_is_real_text_of_many_modules(built):
    directory, info, _ = built
    assert info.n_chars["train"] > 1_000_000 and info.n_modules["train"] > 100
    assert info.n_chars["heldout"] > 10_000 and info.n_modules["heldout"] >= 5
    written = json.loads(info.info_path.read_text())
    assert written["fingerprint"] == info.fingerprint and written["n_chars"] == info.n_chars
    assert written["python_version"] == ".".join(map(str, sys.version_info[:3]))
    for path, split in ((info.train_path, "train"), (info.heldout_path, "heldout")):
        texts = [r["text"] for r in read(path)]
        assert len(texts) == info.n_records[split] and sum(map(len, texts)) == info.n_chars[split]
        assert all(0 < len(t) <= corpus_lib.RECORD_CHARS for t in texts)
    assert "site-packages" not in str(info.heldout_modules) and not any(
        m.split(".")[0] in ("test", "idlelib", "turtledemo") for m in info.heldout_modules)


def test_extract_reads_docstrings_and_comments():
    docs = [d for d in extract() if d.module == "email.message"]
    kinds = {d.kind for d in docs}
    assert kinds == {"module", "class", "function", "comment"}
    get_payload = next(d for d in docs if d.qualname == "Message.get_payload" and d.kind == "function")
    assert get_payload.text.startswith("Return a reference to the payload")
    assert all("#" not in d.text.split("\n")[0][:1] for d in docs if d.kind == "comment")
    assert not any(d.module.startswith(("test.", "idlelib", "turtledemo")) or ".tests" in d.module
                   for d in extract())


def test_corpus_heldout_split_is_by_module(built):
    _, info, _ = built
    modules = {d.module for d in extract()}
    expected = sorted(m for m in modules if corpus_lib.is_heldout(m, 0.05))
    assert list(info.heldout_modules) == expected
    train = "\0".join(r["text"] for r in read(info.train_path))
    heldout = "\0".join(r["text"] for r in read(info.heldout_path))
    docs = extract()
    copies = {}
    for d in docs:
        copies[d.text] = copies.get(d.text, 0) + 1
    for i, d in enumerate(docs):
        if not 200 <= len(d.text) <= corpus_lib.RECORD_CHARS or copies[d.text] > 1:
            continue  # short texts can be substrings by chance, long ones are cut, repeats are kept once
        if d.module in info.heldout_modules:
            assert d.text in heldout and d.text not in train, (d.module, d.qualname)
        elif d.text in heldout or i % 10 == 0:  # every 10th: searching the 2.5 MB train text is the slow part
            assert d.text not in heldout and d.text in train, (d.module, d.qualname)


def test_builds_are_identical_across_processes_and_hash_seeds(built, tmp_path):
    directory, info, tasks = built
    again = build_corpus(tmp_path)
    assert again.fingerprint == info.fingerprint
    assert again.train_path.read_bytes() == info.train_path.read_bytes()
    # The builders use the standard library only: an empty `sftjax` package object skips sftjax/__init__.py (which
    # imports JAX, ~2 s) in the subprocess.
    code = ("import sys, types; pkg = types.ModuleType('sftjax'); pkg.__path__ = [sys.argv[2]]; "
            "sys.modules['sftjax'] = pkg; from sftjax.data.builtin import build_corpus, build_tasks; "
            "i = build_corpus(sys.argv[1]); build_tasks(sys.argv[1], seed=0, heldout_modules=i.heldout_modules); "
            "assert 'jax' not in sys.modules")
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    package = str(Path(sftjax.__file__).parent)
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "sub"), package], check=True, env=env, timeout=120)
    names = ["corpus_train.jsonl", "corpus_heldout.jsonl"] + [f"{t}_{s}.jsonl" for t in tasks for s in SPLITS]
    for name in names:
        assert (tmp_path / "sub" / name).read_bytes() == (directory / name).read_bytes(), name


def test_seed_changes_train_but_not_valid_or_test(built, tmp_path):
    _, info, tasks = built
    other = build_tasks(tmp_path, seed=1, heldout_modules=info.heldout_modules, n_train=300, n_eval=50)
    for name, files in other.items():
        assert files.n_train <= 300 and files.n_valid <= 50 and files.n_test <= 50
        assert read(files.train_path) != read(tasks[name].train_path)[:files.n_train]
        for split in ("valid", "test"):
            held = {json.dumps(r) for r in read(files.path(split))}
            assert held <= {json.dumps(r) for r in read(tasks[name].path(split))}


def test_every_task_has_enough_examples_in_the_prompt_completion_format(built):
    _, _, tasks = built
    assert set(tasks) == {"module", "first_param", "add"}
    for name, files in tasks.items():
        records = {s: read(files.path(s)) for s in SPLITS}
        assert [len(records[s]) for s in SPLITS] == [files.n_train, files.n_valid, files.n_test]
        assert files.n_train >= MIN_TRAIN[name], name
        assert all(getattr(files, f"n_{s}") >= MIN_HELD[s][name] for s in ("valid", "test")), name
        for r in sum(records.values(), []):
            assert set(r) == {"prompt", "completion"}
            assert r["completion"].startswith(" ") and r["completion"].strip() and not r["prompt"].endswith(" ")
        assert disjoint({s: {r["prompt"] for r in rs} for s, rs in records.items()}), name


def _module_keys():
    """Window text -> the split keys (function / class / module names) and modules it comes from."""
    out = {}
    for d in extract():
        if d.module.split(".")[0] in MODULE_CLASSES:
            key = d.qualname.rsplit(".", 1)[-1] if d.qualname else d.module
            for w in tasks_lib._windows(d.text):
                out.setdefault(w, set()).add((key, d.module))
    return out


def test_module_task_labels_and_split_by_function(built):
    _, info, tasks = built
    origins = _module_keys()
    keys = {}
    for split in SPLITS:
        records = read(tasks["module"].path(split))
        for r in records:
            text = re.fullmatch(r"Text: (.*)\nPackage:", r["prompt"], re.DOTALL).group(1)
            label = r["completion"][1:]
            assert label in MODULE_CLASSES
            found = origins[text]
            assert all(module.split(".")[0] == label for _, module in found)
            assert any(module not in info.heldout_modules for _, module in found)
            keys.setdefault(split, set()).update(key for key, _ in found)
    assert disjoint(keys)
    for split, least in (("valid", 5), ("test", 25)):
        records = read(tasks["module"].path(split))
        per_class = {c: sum(r["completion"] == f" {c}" for r in records) for c in MODULE_CLASSES}
        assert min(per_class.values()) >= least and max(per_class.values()) <= 200 // len(MODULE_CLASSES)


def _first_param(prompt):
    line, question = prompt.split("\n")
    assert question == "First parameter:"
    node = ast.parse(line + "\n    pass").body[0]
    names = [a.arg for a in node.args.posonlyargs + node.args.args]
    return node.name, (names[1:] if names[0] in ("self", "cls") else names)[0]


def test_first_param_answers_are_right_and_names_disjoint(built):
    _, _, tasks = built
    names = {}
    for split in SPLITS:
        for r in read(tasks["first_param"].path(split)):
            name, answer = _first_param(r["prompt"])
            assert r["completion"] == f" {answer}" and answer in r["prompt"]
            names.setdefault(split, set()).add(name)
    assert disjoint(names)


def test_add_answers_are_right_and_pairs_disjoint(built):
    _, _, tasks = built
    pairs = {}
    for split in SPLITS:
        for r in read(tasks["add"].path(split)):
            m = re.fullmatch(r"(\d) (\d) \+ (\d) (\d) =", r["prompt"])
            a, b = int(m[1] + m[2]), int(m[3] + m[4])
            assert r["completion"] == " " + " ".join(f"{a + b:03d}")
            pairs.setdefault(split, set()).add(frozenset((a, b)))
    assert disjoint(pairs)


def test_few_shot_prompt_puts_solved_examples_before_the_query():
    shots = [{"prompt": "1 2 + 0 3 =", "completion": " 0 1 5"}, {"prompt": "0 0 + 9 9 =", "completion": " 0 9 9"}]
    query = {"prompt": "5 0 + 5 0 =", "completion": " 1 0 0"}
    assert few_shot_prompt(shots, query) == "1 2 + 0 3 = 0 1 5\n\n0 0 + 9 9 = 0 9 9\n\n5 0 + 5 0 ="
    assert few_shot_prompt([], query) == query["prompt"]


def test_sftjax_pipeline_reads_every_file(built):
    directory, info, tasks = built
    tok = train_bpe_tokenizer([r["text"] for r in read(info.train_path)[:300]], 600)
    paths = [info.train_path, info.heldout_path] + [t.path(s) for t in tasks.values() for s in SPLITS]
    config = DataConfig(datasets=[DatasetSpec(str(p)) for p in paths], seq_len=1024)
    prepared = prepare(config, tok)
    for path, stats in zip(paths, prepared.stats):
        assert stats.kept == stats.records == len(read(path)), path
        if path.name.startswith("corpus"):
            assert stats.trained_tokens == stats.tokens - stats.records  # text: every token but BOS is trained
        else:
            assert 0 < stats.trained_tokens < stats.tokens  # prompt/completion: only the completion (+ EOS)


def test_load_reads_back_what_build_wrote(built, tmp_path):
    """load_corpus / load_tasks give what build_corpus / build_tasks returned (the main job reuses the files through
    them instead of parsing the stdlib again), and refuse a directory that lost a file."""
    directory, info, tasks = built
    assert corpus_lib.load_corpus(directory) == info
    assert tasks_lib.load_tasks(directory) == tasks
    copy = tmp_path / "copy"
    copy.mkdir()
    for path in directory.iterdir():
        (copy / path.name).write_bytes(path.read_bytes())
    (copy / "add_test.jsonl").unlink()
    with pytest.raises(FileNotFoundError):
        tasks_lib.load_tasks(copy)
    (copy / "corpus_heldout.jsonl").unlink()
    with pytest.raises(FileNotFoundError):
        corpus_lib.load_corpus(copy)


def test_sources_digest_follows_the_stdlib_files(tmp_path):
    """The digest that keys the reuse changes when a stdlib file is added or rewritten, not when it is only read."""
    (tmp_path / "a.py").write_text('"""A."""\n')
    first = corpus_lib.sources_digest(tmp_path)
    assert corpus_lib.sources_digest(tmp_path) == first
    (tmp_path / "b.py").write_text('"""B."""\n')
    second = corpus_lib.sources_digest(tmp_path)
    assert second != first
    os.utime(tmp_path / "a.py", ns=(1, 1))
    assert corpus_lib.sources_digest(tmp_path) != second
    (tmp_path / "notes.txt").write_text("not read by the corpus")
    assert corpus_lib.sources_digest(tmp_path) == corpus_lib.sources_digest(tmp_path)
