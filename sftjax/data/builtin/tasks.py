"""Labeled tasks built from the standard library (see corpus.py), for supervised fine-tuning and its evaluation.

Three tasks, each three prompt/completion JSONL files (`{"prompt": str, "completion": str}`, the format
`sftjax.data.formats` reads): `<name>_train.jsonl`, `<name>_valid.jsonl` (validation: watch training, stop early
and choose hyperparameters on it) and `<name>_test.jsonl` (held out: the reported scores). Every completion starts
with a space and is short, so the metric is exact match of the greedy generation (stopped at EOS) with the
completion.

    module       classification over real text. Prompt: "Text: <docstring or comment, whitespace collapsed,
                 80-250 chars>\nPackage:", completion " email". Classes `MODULE_CLASSES` (5 packages with
                 distinctive vocabulary, present in every CPython 3.10-3.13 install; chance = 20%). Train uses
                 docstrings and comment blocks, up to `_TRAIN_WINDOWS` consecutive windows of a long one; valid
                 and test use docstrings only (first window), the cleaner signal (comments such as "self.sock can
                 be None here" rarely say where they are from). Capped per class at n // 5 to stay balanced.
    first_param  extraction from a real `def` line: "def get_payload(self, i=None, decode=False):\\nFirst
                 parameter:" -> " i". The answer is the first positional parameter after a leading `self` / `cls`
                 (functions with none are left out), so it is always copied from the prompt. At most
                 `_MAX_PER_NAME` signatures per function name (otherwise `__init__` alone would be ~10%).
    add          algorithmic: "4 7 + 0 5 =" -> " 0 5 2" (a, b in 0..99, zero-padded to 2 digits, the sum to 3,
                 digits separated by spaces). A byte-level BPE trained on prose merges frequent numbers ("10",
                 "100", "2019") into single tokens, so "47+5" would be a lookup table over arbitrary tokens. With
                 spaces every digit is its own pre-token " d" (one token in a 4k BPE trained on the corpus; at 2k
                 " 7" and " 9" stay space + digit), so the answer digits are computed digit by digit, which a
                 small model learns quickly and which generalizes to unseen operand pairs.

Splits without leakage, by a stable sha256 hash of a key, never by position: a key whose hash fraction is
below TEST_FRACTION[task] is test, below TEST_FRACTION + VALID_FRACTION validation, otherwise train.

    module       key = the function / class name (last part of the qualname; the module name for a module
                 docstring or a module-level comment): every doc of `close` in every class is in one split.
                 A text that occurs twice is kept once; one found in two packages, or under names in two
                 splits (a comment copied into two methods), is dropped.
    first_param  key = the function name: no function name (hence no signature of it) is in two splits.
    add          key = the unordered pair {a, b}: neither (a, b) nor (b, a) of a valid / test pair is trained on.

The splits do not depend on `seed` (valid and test sets are the same for every seed, so runs compare); the seed
picks and orders the train examples. Examples from the corpus' held-out modules (`heldout_modules`) are left out
of every split, so fine-tuning never trains on text the held-out corpus loss is measured on.

Sizes: at most n_train and n_eval (valid and test each; function defaults 2000 and 200; the main job asks for
8000 train examples) per task where the data allows it. On CPython 3.11 the train splits hold at most 1,050
`module` examples (the five packages hold fewer distinct texts; 74 valid, 195 test), 5,383 `first_param` and
8,462 `add` (the pairs outside the valid and test ones). Prompt tokens under a 4k BPE trained on the corpus:
module ~55 (max ~130), first_param ~18 (max ~60), add 6; completions 1-3 tokens (first_param up to ~8).
Everything is deterministic for a given (Python version, seed): two builds write the same bytes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import platform
import random
from collections.abc import Iterable
from pathlib import Path

from sftjax.data.builtin.corpus import (Def, Doc, default_stdlib_dir, extract, extract_defs, join_parts,
                                        stable_fraction)

# Packages of the `module` task: large (150-200 docstrings and 80-200 comment blocks of >= 80 chars each on 3.11),
# with distinctive vocabulary (naive Bayes on words gets ~95% of the test split right), and in every CPython build
# (tkinter is not: Debian ships it apart; unittest has half as many docstrings).
MODULE_CLASSES = ("asyncio", "email", "importlib", "logging", "xml")
_WINDOW_CHARS = 250  # prompt text per example: ~60 tokens of a 2k-4k BPE
_MIN_WINDOW_CHARS = 80  # shorter texts ("Return self.") rarely say which package they are from
_TRAIN_WINDOWS = 3  # consecutive windows of one long doc used for training (valid, test: the first window only)
_MAX_PER_NAME = 3  # first_param: signatures kept per function name
_MAX_SIGNATURE_CHARS = 120  # first_param: longer def lines are left out (they are mostly long default values)
_SKIPPED_FIRST = ("self", "cls")  # first_param: a leading parameter of these names is not the answer
_ADD_MAX = 99  # add: operands in 0.._ADD_MAX

TEST_FRACTION = {"module": 0.25, "first_param": 0.10, "add": 0.10}  # share of keys in the test split
VALID_FRACTION = {"module": 0.10, "first_param": 0.05, "add": 0.05}  # share of keys in the validation split
TASK_NAMES = tuple(TEST_FRACTION)  # the tasks, in the order build_tasks returns them
SPLITS = ("train", "valid", "test")
SHOT_SEPARATOR = "\n\n"  # between the solved examples of a few-shot prompt and before the query


@dataclasses.dataclass(frozen=True)
class TaskFiles:
    """One task's written files and sizes."""

    name: str
    train_path: Path
    valid_path: Path
    test_path: Path
    n_train: int
    n_valid: int
    n_test: int
    description: str

    def path(self, split: str) -> Path:
        return {"train": self.train_path, "valid": self.valid_path, "test": self.test_path}[split]


@dataclasses.dataclass(frozen=True)
class _Example:
    prompt: str
    completion: str
    key: str  # the split key (see the module docstring)


def _split(task: str, key: str) -> str:
    """train, valid or test: the split of every example with this key (the test keys are those of the earlier
    two-way split, so test sets did not change when the validation split was added)."""
    fraction = stable_fraction(key, f"sftjax-task-{task}:")
    if fraction < TEST_FRACTION[task]:
        return "test"
    return "valid" if fraction < TEST_FRACTION[task] + VALID_FRACTION[task] else "train"


def _windows(text: str, width: int = _WINDOW_CHARS) -> list[str]:
    """Whitespace-collapsed text cut into consecutive windows of at most `width` chars at word boundaries."""
    return join_parts((word[:width] for word in text.split()), " ", width)


# ---------------------------------------------------------------------------------------------------- module

def module_prompt(text: str) -> str:
    return f"Text: {text}\nPackage:"


def _module_examples(docs: Iterable[Doc]) -> dict[str, list[_Example]]:
    """{split: candidates} of the module task, in (module, line) order."""
    items = []  # (label, split key, usable for valid / test, window text)
    for doc in docs:
        label = doc.module.split(".")[0]
        if label not in MODULE_CLASSES:
            continue
        key = doc.qualname.rsplit(".", 1)[-1] if doc.qualname else doc.module
        windows = [w for w in _windows(doc.text)[:_TRAIN_WINDOWS] if len(w) >= _MIN_WINDOW_CHARS]
        evaluable = doc.kind != "comment"
        items.extend((label, key, evaluable and i == 0, w) for i, w in enumerate(windows))
    origins: dict[str, set[tuple[str, str]]] = {}  # text -> {(label, split)}
    for label, key, _, text in items:
        origins.setdefault(text, set()).add((label, _split("module", key)))
    out: dict[str, list[_Example]] = {split: [] for split in SPLITS}
    seen = set()
    for label, key, evaluable, text in items:
        if len(origins[text]) > 1 or text in seen:  # in two packages, or under names in two splits; a repeat
            continue
        seen.add(text)
        split = _split("module", key)
        if split == "train" or evaluable:
            out[split].append(_Example(module_prompt(text), f" {label}", key))
    return out


# ----------------------------------------------------------------------------------------------- first_param

def first_parameter(positional: tuple[str, ...]) -> str | None:
    """The first positional parameter after a leading self / cls, or None if there is none."""
    names = positional[1:] if positional and positional[0] in _SKIPPED_FIRST else positional
    return names[0] if names else None


def first_param_prompt(signature: str) -> str:
    return f"{signature}\nFirst parameter:"


def _first_param_examples(defs: Iterable[Def]) -> dict[str, list[_Example]]:
    """{split: candidates} of the first_param task."""
    by_name: dict[str, list[tuple[str, str]]] = {}
    seen = set()
    for d in defs:
        answer = first_parameter(d.positional)
        if answer is None or len(d.line) > _MAX_SIGNATURE_CHARS or d.line in seen:
            continue
        seen.add(d.line)
        by_name.setdefault(d.qualname.rsplit(".", 1)[-1], []).append((d.line, answer))
    out: dict[str, list[_Example]] = {split: [] for split in SPLITS}
    for name, sigs in sorted(by_name.items()):
        sigs = sorted(sigs, key=lambda s: stable_fraction(s[0], "sftjax-task-first_param-pick:"))[:_MAX_PER_NAME]
        for line, answer in sigs:
            out[_split("first_param", name)].append(_Example(first_param_prompt(line), f" {answer}", name))
    return out


# ------------------------------------------------------------------------------------------------------- add

def spaced_digits(value: int, width: int) -> str:
    """47, 3 -> "0 4 7": zero-padded to `width` digits, separated by spaces (one BPE token per digit)."""
    return " ".join(f"{value:0{width}d}")


def add_prompt(a: int, b: int) -> str:
    return f"{spaced_digits(a, 2)} + {spaced_digits(b, 2)} ="


def _add_examples() -> dict[str, list[_Example]]:
    out: dict[str, list[_Example]] = {split: [] for split in SPLITS}
    for a in range(_ADD_MAX + 1):
        for b in range(_ADD_MAX + 1):
            key = f"{min(a, b)}+{max(a, b)}"
            out[_split("add", key)].append(_Example(add_prompt(a, b), " " + spaced_digits(a + b, 3), key))
    return out


# ------------------------------------------------------------------------------------------------- building

DESCRIPTIONS = {
    "module": f"which stdlib package a docstring or comment comes from ({', '.join(MODULE_CLASSES)})",
    "first_param": "the first parameter (after self / cls) of a real stdlib def line",
    "add": "two-digit addition, digits spaced ('4 7 + 0 5 =' -> ' 0 5 2')",
}


def _pick_eval(examples: list[_Example], n: int, task: str) -> list[_Example]:
    """n examples in a fixed order that does not depend on the seed (the same valid / test set for every run)."""
    return sorted(examples, key=lambda e: stable_fraction(e.prompt, f"sftjax-task-{task}-eval:"))[:n]


def _pick_train(examples: list[_Example], n: int, rng: random.Random) -> list[_Example]:
    examples = list(examples)
    rng.shuffle(examples)
    return examples[:n]


def _by_label(examples: list[_Example]) -> dict[str, list[_Example]]:
    out: dict[str, list[_Example]] = {label: [] for label in MODULE_CLASSES}
    for e in examples:
        out[e.completion.strip()].append(e)
    return out


def _write(path: Path, examples: list[_Example]) -> bytes:
    data = "".join(json.dumps({"prompt": e.prompt, "completion": e.completion}, ensure_ascii=False) + "\n"
                   for e in examples).encode("utf-8")
    path.write_bytes(data)
    return data


def build_tasks(directory: str | Path, seed: int = 0, heldout_modules: Iterable[str] | None = None, *,
                n_train: int = 2000, n_eval: int = 200,
                stdlib_dir: str | Path | None = None) -> dict[str, TaskFiles]:
    """Write <task>_{train,valid,test}.jsonl for every task, and tasks.json (sizes, sha256 of each task's files).

    heldout_modules: dotted module names whose text must not be trained on (the corpus' held-out modules).
    n_train / n_eval: the most train / valid / test examples per task (fewer where the stdlib has fewer; n_eval for
    valid and test each). Returns {name: TaskFiles}.
    """
    if n_train < 1 or n_eval < 1:
        raise ValueError(f"n_train={n_train}, n_eval={n_eval}: expected positive counts")
    root = Path(stdlib_dir) if stdlib_dir is not None else default_stdlib_dir()
    heldout = set(heldout_modules or ())
    per_class_train, per_class_eval = n_train // len(MODULE_CLASSES), n_eval // len(MODULE_CLASSES)

    docs = extract(root)
    heldout_texts = {d.text for d in docs if d.module in heldout}  # also where a train module repeats them
    candidates = {"module": _module_examples(d for d in docs if d.text not in heldout_texts),
                  "first_param": _first_param_examples(d for d in extract_defs(root) if d.module not in heldout),
                  "add": _add_examples()}
    splits: dict[str, dict[str, list[_Example]]] = {}
    for name, found in candidates.items():
        rng = random.Random(f"{name}:{seed}")  # str seeds hash with sha512: the same on every run
        if name == "module":  # balanced classes (at most n / 5 each), then mixed
            train = [e for es in _by_label(found["train"]).values() for e in _pick_train(es, per_class_train, rng)]
            held = {s: [e for es in _by_label(found[s]).values() for e in _pick_eval(es, per_class_eval, name)]
                    for s in ("valid", "test")}
        else:
            train, held = found["train"], {s: found[s] for s in ("valid", "test")}
        splits[name] = {"train": _pick_train(train, n_train, rng),
                        **{s: _pick_eval(held[s], n_eval, name) for s in ("valid", "test")}}

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    out, summary = {}, {}
    for name, by_split in splits.items():
        paths = {s: directory / f"{name}_{s}.jsonl" for s in SPLITS}
        digest = hashlib.sha256(b"".join(_write(paths[s], by_split[s]) for s in SPLITS)).hexdigest()
        sizes = {s: len(by_split[s]) for s in SPLITS}
        out[name] = TaskFiles(name, paths["train"], paths["valid"], paths["test"], sizes["train"], sizes["valid"],
                              sizes["test"], DESCRIPTIONS[name])
        summary[name] = dict(**{f"n_{s}": n for s, n in sizes.items()}, description=DESCRIPTIONS[name],
                             sha256=digest)
    info = dict(python_version=platform.python_version(), seed=seed, n_train=n_train, n_eval=n_eval,
                heldout_modules=sorted(heldout), module_classes=list(MODULE_CLASSES), tasks=summary)
    (directory / "tasks.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return out


def load_tasks(directory: str | Path) -> dict[str, TaskFiles]:
    """The TaskFiles of the tasks `build_tasks` wrote into `directory` (read from its tasks.json)."""
    directory = Path(directory)
    info = json.loads((directory / "tasks.json").read_text(encoding="utf-8"))
    out = {name: TaskFiles(name, *(directory / f"{name}_{s}.jsonl" for s in SPLITS),
                           *(t[f"n_{s}"] for s in SPLITS), t["description"]) for name, t in info["tasks"].items()}
    for task in out.values():
        for split in SPLITS:
            if not task.path(split).is_file():
                raise FileNotFoundError(task.path(split))
    return out


def few_shot_prompt(shots: list[dict[str, str]], query: dict[str, str]) -> str:
    """k solved examples, then the query's prompt: "<p1><c1>\\n\\n<p2><c2>\\n\\n<query prompt>".

    With no shots this is the query's prompt itself, so zero-shot and few-shot evaluation differ only by the
    examples in front. Shots should come from the train split.
    """
    return "".join(s["prompt"] + s["completion"] + SHOT_SEPARATOR for s in shots) + query["prompt"]
