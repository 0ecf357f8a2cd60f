"""Shared by the experiment scripts (experiments/<name>/run.py): run the main job with overrides, read what the
runs wrote, and write a folder's results.

Every number an experiment reports is read from files its runs wrote (report.json, metrics.jsonl,
final_metrics.json, a sweep's optimization_results.yaml). A run lives in experiments/runs/<key>/, where <key>
hashes its overrides: the same configuration asked for by two experiments (the main job's defaults, say) runs
once, and a rerun of an experiment script reuses finished runs (delete experiments/runs/ to start over). The
files that the tables come from are copied into the experiment's results/ folder, which is committed.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RUNS = HERE / "runs"
KEPT = ("report.json", "final_metrics.json", "metrics.jsonl", "config.json")  # copied into results/


def run_key(overrides: tuple[str, ...]) -> str:
    return hashlib.sha256(json.dumps(sorted(overrides)).encode()).hexdigest()[:12]


def train(*overrides: str) -> Path:
    """Run `sftjax-train <overrides>` (the main job plus overrides) unless the same run finished before; returns
    its run directory."""
    run_dir = RUNS / run_key(overrides)
    if (run_dir / "report.json").is_file():
        print(f"[reuse] {run_dir.name}: {' '.join(overrides) or '(main job defaults)'}", flush=True)
        return run_dir
    if run_dir.exists():
        shutil.rmtree(run_dir)  # an unfinished run: start it again (its checkpoints may be from another version)
    cmd = ["sftjax-train", *overrides, f"hydra.run.dir={run_dir}", "trainer.progress=false"]
    print(f"[run] {run_dir.name}: {' '.join(cmd)}", flush=True)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    (run_dir / "overrides.json").write_text(json.dumps(list(overrides)) + "\n")
    return run_dir


def sweep(name: str, *args: str) -> Path:
    """Run a Hydra multirun `sftjax-train -m <args>` into experiments/runs/<name>/ (one numbered folder per job)
    unless it finished before (its `done` marker); returns the sweep directory."""
    sweep_dir = RUNS / name
    if (sweep_dir / "done").is_file():
        print(f"[reuse] sweep {name}", flush=True)
        return sweep_dir
    if sweep_dir.exists():
        shutil.rmtree(sweep_dir)
    cmd = ["sftjax-train", "-m", *args, f"hydra.sweep.dir={sweep_dir}", "trainer.progress=false"]
    print(f"[sweep] {name}: {' '.join(cmd)}", flush=True)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    (sweep_dir / "done").write_text("")
    return sweep_dir


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def report(run_dir: Path) -> dict[str, Any]:
    """report.json of a main-job run, with `mean` (mean held-out exact match) and `forgetting` added."""
    r = json.loads((run_dir / "report.json").read_text())
    r["mean"] = sum(r["fine_tuned"].values()) / len(r["tasks"])
    r["forgetting"] = r["corpus_loss_tuned"] - r["corpus_loss_base"]
    return r


def curve(run_dir: Path, split: str, key: str = "loss") -> tuple[list[int], list[float]]:
    """(steps, values) of metric `key` on `split` lines of the run's metrics.jsonl."""
    rows = [d for d in read_jsonl(run_dir / "metrics.jsonl") if d.get("split") == split and key in d]
    return [d["step"] for d in rows], [d[key] for d in rows]


def keep(run_dir: Path, results: Path, name: str) -> None:
    """Copy the files a table is computed from into results/<name>/."""
    out = results / name
    out.mkdir(parents=True, exist_ok=True)
    for f in KEPT:
        if (run_dir / f).is_file():
            shutil.copy2(run_dir / f, out / f)


def table(header: list[str], rows: list[list[Any]]) -> str:
    """A markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def write_results(folder: Path, text: str) -> None:
    """Write results.md and put `text` between the README's <!-- results --> markers."""
    (folder / "results.md").write_text(text.rstrip() + "\n")
    readme = folder / "README.md"
    if readme.is_file():
        body = readme.read_text()
        new = re.sub(r"<!-- results -->.*<!-- /results -->", lambda _: f"<!-- results -->\n{text.rstrip()}\n"
                     "<!-- /results -->", body, flags=re.S)
        readme.write_text(new)
    print(text)


def machine() -> str:
    """The machine line of a result: date, CPU, cores, Python."""
    import datetime
    import os
    import platform

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{datetime.date.today().isoformat()}, {cpu}, {os.cpu_count()} cores, Python "
            f"{sys.version.split()[0]}")


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
