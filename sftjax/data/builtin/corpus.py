"""The built-in corpus: docstrings and comments of the Python standard library that ships with the interpreter.

Every machine that runs sftjax has this real English text (about 3 MB) with no download. It is read from
`sysconfig.get_paths()["stdlib"]`, so it is fixed for a given Python version (and distribution build).

What is read: every `*.py` file under the stdlib directory, in sorted path order, except the directories
`_SKIP_DIRS` (site-packages / dist-packages, __pycache__, test suites and their data, IDLE, turtle demos) and the
top-level `config-*` build directory; a file that `ast` cannot parse, or that is not UTF-8, is skipped.

What is extracted from each module, as `Doc(module, kind, qualname, text, lineno)` in source order:

    kind "module" | "class" | "function"   the docstring (`ast.get_docstring`, cleaned: common indent removed)
    kind "comment"                         a block of consecutive full-line `#` comments, '#' markers removed;
                                           qualname = the innermost enclosing class / def ("" at module level)

The same pass also records every function's def line (`Def`, `extract_defs`) for the extraction task (tasks.py).

Comment lines are found from the source lines and the AST (a line whose first non-blank character is '#' and
that lies inside no multi-line string literal): this is what `tokenize` reports as a full-line comment, at a
fraction of its cost on Python 3.11. Trailing comments after code (about 4% of comment text, mostly `# noqa`
style notes) are left out, as are shebang, encoding, editor and linter lines.

`build_corpus` writes plain-text JSONL for pre-training (records `{"text": str}`):

    corpus_train.jsonl     modules whose stable hash falls outside the held-out fraction
    corpus_heldout.jsonl   the other modules (about `heldout_fraction` of them): never trained on, they measure
                           held-out loss, e.g. how much fine-tuning makes the model forget
    corpus.json            python_version, stdlib_dir, the counts and the sha256 fingerprint of both files

Leakage: the split is by module (sha256 of the dotted module name), so no module contributes to both files, and a
text that occurs more than once (licence headers, generated codec modules) is kept only at its first occurrence in
sorted module order, so no held-out text repeats a trained one. A record holds consecutive docs of one module
joined by blank lines, at most `record_chars` characters (a longer doc is cut at paragraph, then line, then word
boundaries), so that a record fits a short training sequence without truncation.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import hashlib
import json
import os
import platform
import re
import sysconfig
from collections.abc import Iterable, Iterator
from pathlib import Path

# Directories never entered: installed third-party packages, bytecode caches, the test suites (with their data,
# e.g. lib2to3/tests/data, which holds files that do not parse on purpose), IDLE's GUI and the turtle demos.
_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test", "idlelib",
                        "turtledemo"})
_SKIP_TOP_PREFIX = "config-"  # lib/pythonX.Y/config-X.Y-<platform>: build files of the interpreter itself

# Comment lines that carry no prose: shebang, editor modelines, linter / formatter pragmas; on lines 1-2 also the
# PEP 263 encoding cookie.
_NOISE_COMMENT = re.compile(r"^(!|.*-\*-|\s*(noqa|type:|pragma:|fmt:|pylint:|vim?:|isort:))", re.IGNORECASE)
_CODING_COOKIE = re.compile(r"^.*?coding[:=]")  # PEP 263
_WORD = re.compile(r"[A-Za-z]{2,}")
_MIN_COMMENT_WORDS = 2  # a comment block needs at least two words of two letters or more ("# XXX" is dropped)

_HELDOUT_SALT = "sftjax-corpus-heldout:"  # hashed with the module name; changing it moves the held-out split
RECORD_CHARS = 1200  # default record size: ~300-400 tokens of a 2k-4k BPE trained on this corpus


@dataclasses.dataclass(frozen=True)
class Doc:
    """One piece of prose from the stdlib: a docstring or a block of comments."""

    module: str  # dotted module name, e.g. "email.message" (a package's __init__ is the package: "email")
    kind: str  # module | class | function | comment
    qualname: str  # "Message.get_payload"; "" for the module docstring and module-level comments
    text: str
    lineno: int  # first source line (of the def / class / module, or of the comment block)


@dataclasses.dataclass(frozen=True)
class Def:
    """One function or method: its def line as source, for the tasks built on real code (tasks.py)."""

    module: str
    qualname: str  # "Message.get_payload"
    line: str  # "def get_payload(self, i=None, decode=False):" (ast.unparse of the parameters; no return annotation)
    positional: tuple[str, ...]  # positional parameter names in order, e.g. ("self", "i", "decode")


@dataclasses.dataclass(frozen=True)
class CorpusInfo:
    """What `build_corpus` wrote (the same fields as corpus.json, plus the paths)."""

    python_version: str
    stdlib_dir: str
    n_modules: dict[str, int]  # {"train": ..., "heldout": ...}: modules with at least one doc
    n_docs: dict[str, int]
    n_records: dict[str, int]
    n_chars: dict[str, int]
    fingerprint: str  # sha256 hex of corpus_train.jsonl then corpus_heldout.jsonl (bytes)
    heldout_modules: tuple[str, ...]  # sorted dotted names
    train_path: Path
    heldout_path: Path
    info_path: Path


def default_stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(stdlib_dir: str | Path | None = None) -> list[tuple[str, Path]]:
    """(dotted module name, path) of every stdlib source file the corpus reads, sorted by module name."""
    root = Path(stdlib_dir) if stdlib_dir is not None else default_stdlib_dir()
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel = Path(dirpath).relative_to(root)
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS
                       and not (rel == Path(".") and d.startswith(_SKIP_TOP_PREFIX))]
        for name in filenames:
            if name.endswith(".py"):
                parts = rel.parts + (name[:-3],)
                if parts[-1] == "__init__":
                    parts = parts[:-1]
                if parts:
                    out.append((".".join(parts), Path(dirpath) / name))
    return sorted(out)


def parse_file(path: Path) -> tuple[str, ast.Module] | None:
    """(source text, AST) of a file, or None if it is not UTF-8 or does not parse."""
    try:
        source = path.read_bytes().decode("utf-8")
        return source, ast.parse(source, filename=str(path))
    except (UnicodeDecodeError, SyntaxError, ValueError):  # ValueError: null bytes in the source
        return None


def iter_modules(stdlib_dir: str | Path | None = None) -> Iterator[tuple[str, str, ast.Module]]:
    """(module name, source, AST) of every parseable stdlib module, in sorted order, one at a time."""
    for module, path in stdlib_files(stdlib_dir):
        parsed = parse_file(path)
        if parsed is not None:
            yield module, *parsed


_SCOPES = (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def _walk_scopes(body: list[ast.stmt], prefix: str) -> Iterator[tuple[str, ast.AST]]:
    """(qualname, node) of every class / def reachable through statement bodies, outer before inner."""
    for stmt in body:
        if isinstance(stmt, _SCOPES):
            qualname = f"{prefix}{stmt.name}"
            yield qualname, stmt
            yield from _walk_scopes(stmt.body, qualname + ".")
        else:  # defs inside if / try / with / for blocks
            for field in ("body", "orelse", "finalbody", "handlers", "cases"):
                inner = getattr(stmt, field, None)
                if isinstance(inner, list):
                    yield from _walk_scopes([s for s in inner if isinstance(s, ast.AST)], prefix)


def _string_lines(tree: ast.Module) -> set[int]:
    """Lines 2.. of every multi-line string literal (where a leading '#' is text, not a comment)."""
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Constant, ast.JoinedStr)) and node.end_lineno and node.end_lineno > node.lineno:
            lines.update(range(node.lineno + 1, node.end_lineno + 1))
    return lines


def _comment_text(line: str, lineno: int) -> str | None:
    """The prose of one full-line comment ('#' markers and one space removed), or None for a noise line."""
    body = line.lstrip().lstrip("#")
    if body.startswith(":"):  # Sphinx attribute doc-comments "#: text"
        body = body[1:]
    body = body[1:] if body.startswith(" ") else body
    if _NOISE_COMMENT.match(body) or (lineno <= 2 and _CODING_COOKIE.match(body)) or not any(
            c.isalnum() for c in body):
        return None
    return body.rstrip()


def module_docs(module: str, source: str, tree: ast.Module) -> list[Doc]:
    """The docstrings and comment blocks of one parsed module, in source order (see the module docstring)."""
    docs = []
    text = ast.get_docstring(tree)
    if text and text.strip():
        docs.append(Doc(module, "module", "", text.strip(), tree.body[0].lineno))
    lines = source.replace("\r\n", "\n").replace("\r", "\n").split("\n")  # as the parser counts lines (not \f)
    scope_of_line = [""] * (len(lines) + 2)  # innermost enclosing class / def of each line
    for qualname, node in _walk_scopes(tree.body, ""):
        for i in range(node.lineno, (node.end_lineno or node.lineno) + 1):
            scope_of_line[i] = qualname
        text = ast.get_docstring(node)
        if text and text.strip():
            kind = "class" if isinstance(node, ast.ClassDef) else "function"
            docs.append(Doc(module, kind, qualname, text.strip(), node.lineno))
    in_string = _string_lines(tree)
    block: list[str] = []
    start = previous = -1

    def flush():
        if block and len(_WORD.findall(" ".join(block))) >= _MIN_COMMENT_WORDS:
            docs.append(Doc(module, "comment", scope_of_line[start], "\n".join(block), start))

    for i, line in enumerate(lines, 1):
        if not line.lstrip().startswith("#") or i in in_string:
            continue
        if i != previous + 1:  # a gap (code or blank line) ends the block
            flush()
            block, start = [], i
        previous = i
        text = _comment_text(line, i)
        if text is not None:
            block.append(text)
    flush()
    return sorted(docs, key=lambda d: d.lineno)


def module_defs(module: str, tree: ast.Module) -> list[Def]:
    """Every def of one parsed module with its signature line, in source order."""
    return [Def(module, qualname, f"def {node.name}({ast.unparse(node.args)}):",
                tuple(a.arg for a in node.args.posonlyargs + node.args.args))
            for qualname, node in _walk_scopes(tree.body, "") if not isinstance(node, ast.ClassDef)]


@functools.lru_cache(maxsize=2)
def _scan(root: str) -> tuple[tuple[Doc, ...], tuple[Def, ...]]:
    """One pass over the stdlib (parsing is most of the cost): its docs and its defs."""
    docs, defs = [], []
    for module, source, tree in iter_modules(root):
        docs.extend(module_docs(module, source, tree))
        defs.extend(module_defs(module, tree))
    return tuple(docs), tuple(defs)


def _root(stdlib_dir: str | Path | None) -> str:
    return str((Path(stdlib_dir) if stdlib_dir is not None else default_stdlib_dir()).resolve())


def extract(stdlib_dir: str | Path | None = None) -> list[Doc]:
    """Every docstring and comment block of the stdlib (see the module docstring), in (module, line) order.

    Cached per directory within a process (the stdlib does not change while it runs): ~3 s the first time.
    """
    return list(_scan(_root(stdlib_dir))[0])


def extract_defs(stdlib_dir: str | Path | None = None) -> list[Def]:
    """Every function / method of the stdlib with its def line, in (module, line) order (same scan as extract)."""
    return list(_scan(_root(stdlib_dir))[1])


def stable_fraction(key: str, salt: str) -> float:
    """A number in [0, 1) fixed by (salt, key) on every machine and Python version (no hash randomization)."""
    digest = hashlib.sha256((salt + key).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def is_heldout(module: str, heldout_fraction: float) -> bool:
    """Whether a module belongs to the held-out corpus."""
    return stable_fraction(module, _HELDOUT_SALT) < heldout_fraction


def join_parts(parts: Iterable[str], sep: str, limit: int) -> list[str]:
    """Consecutive parts joined by sep into chunks of at most `limit` characters; a part longer than the limit is
    a chunk of its own (callers cut it further)."""
    out, current = [], ""
    for part in parts:
        joined = f"{current}{sep}{part}" if current else part
        if len(joined) <= limit:
            current = joined
        else:
            if current:
                out.append(current)
            current = part
    if current:
        out.append(current)
    return out


def _pieces(text: str, limit: int) -> list[str]:
    """Split text into pieces of at most `limit` characters at paragraph, then line, then word boundaries."""
    if len(text) <= limit:
        return [text]
    for sep in ("\n\n", "\n", " "):
        parts = text.split(sep)
        if len(parts) > 1:
            return [p for piece in join_parts(parts, sep, limit) for p in _pieces(piece, limit) if p.strip()]
    return [text[i:i + limit] for i in range(0, len(text), limit)]


def module_records(docs: list[Doc], record_chars: int = RECORD_CHARS) -> list[str]:
    """Consecutive docs of one module joined by blank lines into records of at most record_chars characters."""
    return join_parts((piece for doc in docs for piece in _pieces(doc.text, record_chars)), "\n\n", record_chars)


def _jsonl(records: list[str]) -> bytes:
    return "".join(json.dumps({"text": r}, ensure_ascii=False) + "\n" for r in records).encode("utf-8")


def build_corpus(directory: str | Path, heldout_fraction: float = 0.05, *, stdlib_dir: str | Path | None = None,
                 record_chars: int = RECORD_CHARS) -> CorpusInfo:
    """Write corpus_train.jsonl, corpus_heldout.jsonl and corpus.json into `directory` (see the module docstring).

    Deterministic for a given stdlib: the same bytes and fingerprint on every run. Prints nothing.
    """
    if not 0.0 <= heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction={heldout_fraction}: expected a number in [0, 1)")
    if record_chars < 1:
        raise ValueError(f"record_chars={record_chars}: expected a positive number of characters")
    root = Path(stdlib_dir) if stdlib_dir is not None else default_stdlib_dir()
    seen: set[str] = set()
    by_module: dict[str, list[Doc]] = {}
    for doc in extract(root):
        if doc.text not in seen:  # first occurrence in sorted module order wins
            seen.add(doc.text)
            by_module.setdefault(doc.module, []).append(doc)
    records: dict[str, list[str]] = {"train": [], "heldout": []}
    n_modules, n_docs = {"train": 0, "heldout": 0}, {"train": 0, "heldout": 0}
    heldout = []
    for module, docs in by_module.items():
        split = "heldout" if is_heldout(module, heldout_fraction) else "train"
        if split == "heldout":
            heldout.append(module)
        n_modules[split] += 1
        n_docs[split] += len(docs)
        records[split].extend(module_records(docs, record_chars))
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    train_path, heldout_path = directory / "corpus_train.jsonl", directory / "corpus_heldout.jsonl"
    train_bytes, heldout_bytes = _jsonl(records["train"]), _jsonl(records["heldout"])
    train_path.write_bytes(train_bytes)
    heldout_path.write_bytes(heldout_bytes)
    fields = dict(python_version=platform.python_version(), stdlib_dir=str(root), n_modules=n_modules,
                  n_docs=n_docs, n_records={k: len(v) for k, v in records.items()},
                  n_chars={k: sum(map(len, v)) for k, v in records.items()},
                  fingerprint=hashlib.sha256(train_bytes + heldout_bytes).hexdigest(),
                  heldout_modules=tuple(sorted(heldout)))
    info_path = directory / "corpus.json"
    info_path.write_text(json.dumps({**fields, "heldout_fraction": heldout_fraction, "record_chars": record_chars},
                                    indent=2) + "\n", encoding="utf-8")
    return CorpusInfo(**fields, train_path=train_path, heldout_path=heldout_path, info_path=info_path)


def load_corpus(directory: str | Path) -> CorpusInfo:
    """The CorpusInfo of a corpus `build_corpus` wrote into `directory` (read from its corpus.json)."""
    directory = Path(directory)
    info = json.loads((directory / "corpus.json").read_text(encoding="utf-8"))
    fields = {f.name: info[f.name] for f in dataclasses.fields(CorpusInfo) if f.name in info}
    fields["heldout_modules"] = tuple(fields["heldout_modules"])
    out = CorpusInfo(**fields, train_path=directory / "corpus_train.jsonl",
                     heldout_path=directory / "corpus_heldout.jsonl", info_path=directory / "corpus.json")
    for path in (out.train_path, out.heldout_path):
        if not path.is_file():
            raise FileNotFoundError(path)
    return out


def sources_digest(stdlib_dir: str | Path | None = None) -> str:
    """sha256 of what `build_corpus` and `build_tasks` read: the list of stdlib files with their sizes and
    modification times (a stat of each, no parsing), and the source of this module and of tasks.py. Equal digests
    give the same corpus and tasks for the same settings, so a cache keyed on it never serves stale files."""
    from sftjax.data.builtin import tasks  # imports this module: deferred

    digest = hashlib.sha256()
    for module, path in stdlib_files(stdlib_dir):
        stat = path.stat()
        digest.update(f"{module}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    for source in (__file__, tasks.__file__):
        digest.update(Path(source).read_bytes())
    return digest.hexdigest()
