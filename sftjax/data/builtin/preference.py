"""Preference pairs made from the built-in SFT tasks (tasks.py), for DPO or reward-model training on the built-in
base model.

Every pair is one SFT example with a wrong answer beside the right one, written in TRL's standard preference
format, one JSON object a line: `{"prompt": str, "chosen": str, "rejected": str}`, chosen = the SFT completion,
rejected = `rejected_answer(...)`. Files: `<task>_pairs_{train,valid,test}.jsonl`, and `preference.json` (seed,
pairs and skipped examples per task and split).

The rejected answers are hard negatives: same prompt, same surface form as the completion (a leading space, one
class name, one identifier, three spaced digits, then EOS), so chosen and rejected differ only in the answer's
few tokens and DPO's margin (or the reward model's) is about the answer, never about format or where the
generation stops.

    module       another class of `MODULE_CLASSES`, at random: " email" -> " logging".
    first_param  another parameter name of the same def line, at random: a later positional one, *args / **kwargs
                 or a keyword-only one; the leading self / cls (which the task skips, the typical wrong answer of
                 an untrained model) only when there is no other: "def get_payload(self, i=None, decode=False):"
                 " i" -> " decode"; "def post_setup(self, context):" " context" -> " self". A def whose answer is
                 its only parameter has no wrong answer and is left out (about a fifth of the examples on CPython
                 3.11; self / cls is the rejected answer of about two fifths of the pairs).
    add          the sum with a typical slip, in 0..198: off by one (+-1), a tens digit off (+-10) or every carry
                 dropped (digit-wise sum mod 10: 4 7 + 5 8 -> " 0 9 5" instead of " 1 0 5"):
                 "4 7 + 0 5 =" " 0 5 2" -> " 0 5 1", " 0 5 3", " 0 4 2" (also the carry-free sum) or " 0 6 2".

No leakage: the pairs of a split are made from that split's SFT file only, so they inherit the splits of tasks.py
(no function name of first_param, no unordered operand pair of add, no split key of module in two splits).

Deterministic: each example's wrong answer is drawn by a `random.Random` seeded by a stable string of (task,
prompt), and of the seed for train pairs only, so two builds write the same bytes, valid and test pairs are the
same for every seed (runs compare, as the SFT valid / test sets do), and a prompt's pair does not depend on which
other examples the file holds (the pairs of a small build are those of a large one).
"""

from __future__ import annotations

import ast
import json
import random
import re
from collections.abc import Iterable
from pathlib import Path

from sftjax.data.builtin.tasks import MODULE_CLASSES, SPLITS, TASK_NAMES, spaced_digits

_ADD_PROMPT = re.compile(r"(\d) (\d) \+ (\d) (\d) =")  # tasks.add_prompt: "4 7 + 0 5 ="
_ADD_SLIPS = (-1, 1, -10, 10)  # off by one in the ones digit, or in the tens digit
_ADD_RANGE = range(2 * 99 + 1)  # every sum of two operands in 0..99, so a rejected sum is a possible one
_FIRST_PARAM_QUESTION = "\nFirst parameter:"  # tasks.first_param_prompt's suffix
_SKIPPED_FIRST = ("self", "cls")  # tasks.py: a leading parameter of these names is never the answer
_SALT = "sftjax-preference"


# ---------------------------------------------------------------------------------------------- wrong answers

def _module_wrong(completion: str, rng: random.Random) -> str:
    """Another class of the module task: " email" -> " xml"."""
    label = completion.strip()
    if label not in MODULE_CLASSES:
        raise ValueError(f"module completion {completion!r}: expected a space and one of {MODULE_CLASSES}")
    return " " + rng.choice([c for c in MODULE_CLASSES if c != label])


def parameter_names(signature: str) -> list[str]:
    """Every parameter name of a def line, in source order: "def f(self, a, /, b=1, *args, c, **kw):" ->
    ["self", "a", "b", "args", "c", "kw"] (stars dropped: the answers are bare names)."""
    if not signature.startswith(("def ", "async def ")):
        raise ValueError(f"{signature!r}: expected a def line")
    args = ast.parse(signature + "\n    pass").body[0].args
    return [a.arg for a in (*args.posonlyargs, *args.args, args.vararg, *args.kwonlyargs, args.kwarg) if a]


def _first_param_wrong(prompt: str, completion: str, rng: random.Random) -> str | None:
    """Another parameter of the prompt's def line, or None when the answer is its only parameter."""
    if not prompt.endswith(_FIRST_PARAM_QUESTION):
        raise ValueError(f"first_param prompt {prompt[-40:]!r}: expected it to end with {_FIRST_PARAM_QUESTION!r}")
    answer = completion.strip()
    others = [n for n in parameter_names(prompt[:-len(_FIRST_PARAM_QUESTION)]) if n != answer]
    preferred = [n for n in others if n not in _SKIPPED_FIRST] or others  # self / cls only when nothing else
    return " " + rng.choice(preferred) if preferred else None


def no_carry_sum(a: int, b: int) -> int:
    """The digit-wise sum with every carry dropped: 47, 58 -> 95 (7+8 -> 5, 4+5 -> 9)."""
    return sum((a // 10**i % 10 + b // 10**i % 10) % 10 * 10**i for i in range(2))


def _add_wrong(prompt: str, completion: str, rng: random.Random) -> str:
    """The prompt's sum with a slip (+-1, +-10, carries dropped), as three spaced digits: " 0 5 2" -> " 0 4 2"."""
    match = _ADD_PROMPT.fullmatch(prompt)
    if match is None:
        raise ValueError(f"add prompt {prompt!r}: expected the 'd d + d d =' format")
    a, b = int(match[1] + match[2]), int(match[3] + match[4])
    total = a + b
    candidates = sorted({total + d for d in _ADD_SLIPS} | {no_carry_sum(a, b)})
    wrong = [" " + spaced_digits(s, 3) for s in candidates if s in _ADD_RANGE and s != total]
    return rng.choice([w for w in wrong if w != completion])


def rejected_answer(task: str, prompt: str, completion: str, rng: random.Random) -> str | None:
    """A plausible wrong answer to an SFT example, in the completion's surface form (leading space), never equal to
    it; None when the example has none (first_param with a single parameter). Draws from rng."""
    if task == "module":
        return _module_wrong(completion, rng)
    if task == "first_param":
        return _first_param_wrong(prompt, completion, rng)
    if task == "add":
        return _add_wrong(prompt, completion, rng)
    raise ValueError(f"task {task!r}: expected one of {TASK_NAMES}")


# -------------------------------------------------------------------------------------------------- building

def example_rng(task: str, split: str, prompt: str, seed: int) -> random.Random:
    """The generator of one example's wrong answer: fixed by (task, prompt), and by the seed for train only (str
    seeds are hashed with sha512, the same in every process)."""
    seed_part = f"{seed}:" if split == "train" else ""
    return random.Random(f"{_SALT}-{task}:{seed_part}{prompt}")


def make_pairs(task: str, split: str, records: Iterable[dict[str, str]],
               seed: int = 0) -> tuple[list[dict[str, str]], int]:
    """Preference pairs of one SFT split ({"prompt", "completion"} records, in their order) and how many records
    were left out for having no wrong answer."""
    pairs, skipped = [], 0
    for r in records:
        prompt, completion = r["prompt"], r["completion"]
        rejected = rejected_answer(task, prompt, completion, example_rng(task, split, prompt, seed))
        if rejected is None:
            skipped += 1
            continue
        pairs.append({"prompt": prompt, "chosen": completion, "rejected": rejected})
    return pairs, skipped


def _read(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no SFT task file (write it with build_tasks first)")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def _write(path: Path, pairs: list[dict[str, str]]) -> None:
    path.write_bytes("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs).encode("utf-8"))


def build_preference_tasks(task_dir: str | Path, out_dir: str | Path, seed: int = 0, *,
                           tasks: Iterable[str] = TASK_NAMES) -> dict[str, dict[str, Path]]:
    """Write <task>_pairs_{train,valid,test}.jsonl for every task from the SFT files `build_tasks` wrote in task_dir
    (<task>_{train,valid,test}.jsonl), and preference.json ({task: {split: {n_pairs, n_skipped}}}, seed).

    Every SFT example becomes one pair, in the SFT file's order, except first_param examples whose def has a
    single parameter (no wrong name to offer); module and add never skip. Returns {task: {split: path}}.
    """
    task_dir, out_dir = Path(task_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    out: dict[str, dict[str, Path]] = {}
    summary: dict[str, dict[str, dict[str, int]]] = {}
    for task in tasks:
        if task not in TASK_NAMES:
            raise ValueError(f"task {task!r}: expected one of {TASK_NAMES}")
        out[task], summary[task] = {}, {}
        for split in SPLITS:
            pairs, skipped = make_pairs(task, split, _read(task_dir / f"{task}_{split}.jsonl"), seed)
            path = out_dir / f"{task}_pairs_{split}.jsonl"
            _write(path, pairs)
            out[task][split] = path
            summary[task][split] = {"n_pairs": len(pairs), "n_skipped": skipped}
    info = {"seed": seed, "tasks": summary}
    (out_dir / "preference.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return out
