"""Preference pairs of the built-in tasks: each pair is its SFT example with a wrong answer in the same surface form,
pairs stay in their SFT split, builds are deterministic (also under another hash seed). One small task build per
test module (~2 s).
"""

import ast
import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

import sftjax
from sftjax.data.builtin import MODULE_CLASSES, build_tasks
from sftjax.data.builtin import preference as pref
from sftjax.data.builtin import tasks as tasks_lib

SPLITS = tasks_lib.SPLITS
TASKS = tasks_lib.TASK_NAMES


def read(path):
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]


def def_names(prompt):
    """(function name, every parameter name) of a first_param prompt, parsed independently of preference.py."""
    line, question = prompt.split("\n")
    assert question == "First parameter:"
    node = ast.parse(line + "\n    pass").body[0]
    args = node.args
    return node.name, {a.arg for a in args.posonlyargs + args.args + args.kwonlyargs + [args.vararg, args.kwarg] if a}


def add_operands(prompt):
    m = re.fullmatch(r"(\d) (\d) \+ (\d) (\d) =", prompt)
    return int(m[1] + m[2]), int(m[3] + m[4])


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("preference")
    build_tasks(root / "tasks", seed=0, n_train=300, n_eval=50)
    return root / "tasks", root / "pairs", pref.build_preference_tasks(root / "tasks", root / "pairs", seed=0)


def test_pairs_are_the_sft_examples_in_order_with_a_different_rejected_answer(built):
    task_dir, out_dir, paths = built
    summary = json.loads((out_dir / "preference.json").read_text())["tasks"]
    assert set(paths) == set(TASKS)
    for task in TASKS:
        for split in SPLITS:
            assert paths[task][split] == out_dir / f"{task}_pairs_{split}.jsonl"
            sft, pairs = read(task_dir / f"{task}_{split}.jsonl"), read(paths[task][split])
            assert all(list(p) == ["prompt", "chosen", "rejected"] for p in pairs)
            assert all(p["rejected"] != p["chosen"] and p["rejected"].strip() != p["chosen"].strip() for p in pairs)
            by_prompt, kept = {r["prompt"]: r["completion"] for r in sft}, {p["prompt"] for p in pairs}
            assert [p["prompt"] for p in pairs] == [r["prompt"] for r in sft if r["prompt"] in kept]  # SFT order
            assert all(p["chosen"] == by_prompt[p["prompt"]] for p in pairs)
            counts = summary[task][split]
            assert counts == {"n_pairs": len(pairs), "n_skipped": len(sft) - len(pairs)}, (task, split)
            if task != "first_param":
                assert counts["n_skipped"] == 0, (task, split)
            else:
                assert len(pairs) >= len(sft) // 2, split  # most defs have a second parameter (or self / cls)


def test_rejected_answers_have_the_surface_form_of_the_task(built):
    _, _, paths = built
    for split in SPLITS:
        for p in read(paths["module"][split]):
            assert p["rejected"][0] == " " and p["rejected"][1:] in MODULE_CLASSES
        for p in read(paths["add"][split]):
            assert re.fullmatch(r" \d \d \d", p["rejected"])
            a, b = add_operands(p["prompt"])
            wrong = int(p["rejected"].replace(" ", ""))
            assert 0 <= wrong <= 198
            assert abs(wrong - (a + b)) in (1, 10) or wrong == pref.no_carry_sum(a, b), p
        for p in read(paths["first_param"][split]):
            _, names = def_names(p["prompt"])
            assert p["rejected"][0] == " " and p["rejected"][1:] in names, p
            if p["rejected"][1:] in ("self", "cls"):  # only when the def has no other wrong name
                assert names == {p["rejected"][1:], p["chosen"][1:]}, p


def test_pairs_stay_in_their_split(built):
    task_dir, _, paths = built
    for task in TASKS:
        prompts = {s: {p["prompt"] for p in read(paths[task][s])} for s in SPLITS}
        for split in SPLITS:
            assert prompts[split] <= {r["prompt"] for r in read(task_dir / f"{task}_{split}.jsonl")}
        assert not prompts["train"] & (prompts["valid"] | prompts["test"]) and not prompts["valid"] & prompts["test"]
    keys = {"add": lambda prompt: frozenset(add_operands(prompt)), "first_param": lambda prompt: def_names(prompt)[0]}
    for task, key in keys.items():  # the SFT split keys: unordered operand pairs, function names
        found = {s: {key(p["prompt"]) for p in read(paths[task][s])} for s in SPLITS}
        assert not found["train"] & (found["valid"] | found["test"]) and not found["valid"] & found["test"], task


def test_builds_are_deterministic_and_the_seed_changes_train_pairs_only(built, tmp_path):
    task_dir, out_dir, paths = built
    again = pref.build_preference_tasks(task_dir, tmp_path / "again", seed=0)
    other = pref.build_preference_tasks(task_dir, tmp_path / "other", seed=1)
    assert (tmp_path / "again" / "preference.json").read_bytes() == (out_dir / "preference.json").read_bytes()
    for task in TASKS:
        for split in SPLITS:
            assert again[task][split].read_bytes() == paths[task][split].read_bytes(), (task, split)
            if split != "train":  # valid / test pairs are the same for every seed, so runs compare
                assert other[task][split].read_bytes() == paths[task][split].read_bytes(), (task, split)
        seeded = [p["rejected"] for p in read(other[task]["train"])]
        assert seeded != [p["rejected"] for p in read(paths[task]["train"])], task
        assert [p["prompt"] for p in read(other[task]["train"])] == [p["prompt"] for p in read(paths[task]["train"])]


def test_a_pair_does_not_depend_on_the_other_examples(built, tmp_path):
    task_dir, _, paths = built
    for split in SPLITS:  # half the add examples, reversed: the same pairs for the prompts kept
        lines = (task_dir / f"add_{split}.jsonl").read_text().splitlines(keepends=True)
        (tmp_path / f"add_{split}.jsonl").write_text("".join(lines[::-2]))
    small = pref.build_preference_tasks(tmp_path, tmp_path / "pairs", seed=0, tasks=("add",))
    for split in SPLITS:
        full = {json.dumps(p) for p in read(paths["add"][split])}
        assert {json.dumps(p) for p in read(small["add"][split])} <= full


def test_builds_are_identical_under_another_hash_seed(built, tmp_path):
    task_dir, out_dir, _ = built
    # The builders use the standard library only: an empty `sftjax` package object skips sftjax/__init__.py (JAX).
    code = ("import sys, types; pkg = types.ModuleType('sftjax'); pkg.__path__ = [sys.argv[3]]; "
            "sys.modules['sftjax'] = pkg; from sftjax.data.builtin.preference import build_preference_tasks; "
            "build_preference_tasks(sys.argv[1], sys.argv[2], seed=0); assert 'jax' not in sys.modules")
    package = str(Path(sftjax.__file__).parent)
    subprocess.run([sys.executable, "-c", code, str(task_dir), str(tmp_path), package], check=True,
                   env={**os.environ, "PYTHONHASHSEED": "12345"}, timeout=60)
    for task in TASKS:
        for split in SPLITS:
            name = f"{task}_pairs_{split}.jsonl"
            assert (tmp_path / name).read_bytes() == (out_dir / name).read_bytes(), name


def test_add_rejected_answers_for_every_operand_pair():
    rng = random.Random(0)
    for a in range(100):
        for b in range(100):
            right = " " + tasks_lib.spaced_digits(a + b, 3)
            wrong = pref.rejected_answer("add", tasks_lib.add_prompt(a, b), right, rng)
            assert wrong != right and re.fullmatch(r" \d \d \d", wrong) and 0 <= int(wrong.replace(" ", "")) <= 198
    seen = {pref.rejected_answer("add", "4 7 + 5 8 =", " 1 0 5", rng) for _ in range(200)}
    assert seen == {" 1 0 4", " 1 0 6", " 0 9 5", " 1 1 5"}  # +-1, +-10, every carry dropped (= 95)
    assert pref.no_carry_sum(47, 58) == 95 and pref.no_carry_sum(12, 34) == 46


def test_first_param_rejected_answers():
    rng = random.Random(0)
    ask = tasks_lib.first_param_prompt
    assert pref.rejected_answer("first_param", ask("def getargs(co):"), " co", rng) is None
    assert pref.rejected_answer("first_param", ask("def post_setup(self, context):"), " context", rng) == " self"
    assert pref.rejected_answer("first_param", ask("def new(cls, x):"), " x", rng) == " cls"
    prompt = ask("def f(self, a, /, b=1, *args, c, **kw):")
    seen = {pref.rejected_answer("first_param", prompt, " a", rng) for _ in range(200)}
    assert seen == {" b", " args", " c", " kw"}  # self only when there is no other name
    assert pref.parameter_names("def f(self, a, /, b=1, *args, c, **kw):") == ["self", "a", "b", "args", "c", "kw"]


def test_module_rejected_answers_cover_the_other_classes():
    rng = random.Random(0)
    seen = {pref.rejected_answer("module", "Text: x\nPackage:", " email", rng) for _ in range(200)}
    assert seen == {f" {c}" for c in MODULE_CLASSES} - {" email"}


def test_errors_say_what_is_wrong(tmp_path):
    rng = random.Random(0)
    with pytest.raises(ValueError, match="task 'sum'"):
        pref.rejected_answer("sum", "1 + 1 =", " 2", rng)
    with pytest.raises(ValueError, match="module completion"):
        pref.rejected_answer("module", "Text: x\nPackage:", " json", rng)
    with pytest.raises(ValueError, match="add prompt"):
        pref.rejected_answer("add", "47 + 5 =", " 5 2", rng)
    with pytest.raises(ValueError, match="expected a def line"):
        pref.rejected_answer("first_param", "class A(B):\nFirst parameter:", " B", rng)
    with pytest.raises(FileNotFoundError, match="build_tasks"):
        pref.build_preference_tasks(tmp_path, tmp_path / "pairs")
