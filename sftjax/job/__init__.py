"""The main job (`sftjax-train` with no arguments): pre-train a small base on a built-in corpus, fine-tune it on
built-in labeled tasks, and report the base against the fine-tuned model (its settings: config.py; base.py,
run.py, report.py)."""
