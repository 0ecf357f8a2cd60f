"""Built-in data that every machine has without a download: a pre-training corpus and labeled tasks, both made
from the Python standard library of the running interpreter (deterministic for a given Python version).

    from sftjax.data.builtin import build_corpus, build_tasks
    info = build_corpus(out_dir)                                   # corpus_{train,heldout}.jsonl + corpus.json
    tasks = build_tasks(out_dir, seed=0, heldout_modules=info.heldout_modules)  # {name: TaskFiles}

See corpus.py (what text, the held-out split by module) and tasks.py (module / first_param / add, their splits).
"""

from sftjax.data.builtin.corpus import CorpusInfo, Doc, build_corpus, extract
from sftjax.data.builtin.tasks import MODULE_CLASSES, TaskFiles, build_tasks, few_shot_prompt

__all__ = ["CorpusInfo", "Doc", "MODULE_CLASSES", "TaskFiles", "build_corpus", "build_tasks", "extract",
           "few_shot_prompt"]
