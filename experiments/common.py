"""Shared by the experiment scripts (experiments/<name>/run.py): run the main job with overrides, keep what the
runs wrote, and write a folder's results.

Every number an experiment reports is read from files its runs wrote (report.json, metrics.jsonl,
final_metrics.json, config.json). A run lives in experiments/runs/<key>/, where <key> hashes its overrides: the
same configuration asked for by two experiments (the main job's defaults, say) runs once, and a rerun of an
experiment script reuses finished runs (delete experiments/runs/ to start over). Those files are copied into the
experiment's results/<name>/ (committed), and the tables are computed from the copies, so

    python experiments/<name>/run.py --from-results     rebuilds the table and plot from results/ (runs nothing)
    python experiments/<name>/run.py --check            ... and only checks that README.md holds that table
                                                        (tests/test_experiments.py)
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
KEPT = ("report.json", "final_metrics.json", "metrics.jsonl", "config.json")  # copied into results/<name>/
CHECK = "--check" in sys.argv  # compare README.md's table with the one results/ gives; write nothing
OFFLINE = CHECK or "--from-results" in sys.argv  # tables from results/ only: run nothing


def run_key(overrides: tuple[str, ...]) -> str:
    return hashlib.sha256(json.dumps(sorted(overrides)).encode()).hexdigest()[:12]


# The main-job recipe the experiments' committed results were measured with: full fine-tuning, 300 steps at lr 3e-3,
# `add` drawn once per example, one CPU device, every token slot computed (the main job has since moved to LoRA, 800
# steps at lr 2e-3, `add` twice, two CPU devices; the padding-free layers round differently on padded batches).
# Pinned, so that their commands keep running the recipe their READMEs describe; an experiment's own overrides come
# after these and win (`method=lora` replaces `method=full`: Hydra applies command-line overrides in order).
RECIPE = ("method=full", "optim.lr=3e-3", "trainer.max_steps=300", "builtin.upsample.add=1.0", "trainer.cpu_devices=1",
          "model.padding_free=false")


def run_dir_of(*overrides: str) -> Path:
    """The absolute folder experiments/runs/<key>/ that `train(results, name, *overrides)` runs in: checkpoints
    included (e.g. a teacher for `objective.teacher=`), unlike the results/ copy."""
    return RUNS / run_key(RECIPE + overrides)


def train(results: Path, name: str, *overrides: str, done: str = "report.json") -> Path:
    """Run `sftjax-train <RECIPE> <overrides>` (the main job plus overrides) unless the same run finished before
    (its `done` file: the report, or final_metrics.json for a run that writes no report, e.g. a reward model),
    copy its files into results/<name>/ and return that folder (offline: just return it)."""
    if OFFLINE:
        return _existing(results / name, done)
    run_dir = run_dir_of(*overrides)
    overrides = RECIPE + overrides
    if (run_dir / done).is_file():
        print(f"[reuse] {run_dir.name}: {' '.join(overrides) or '(main job defaults)'}", flush=True)
    else:
        if run_dir.exists():
            shutil.rmtree(run_dir)  # an unfinished run: start it again
        cmd = ["sftjax-train", *overrides, f"hydra.run.dir={run_dir}", "trainer.progress=false"]
        print(f"[run] {run_dir.name}: {' '.join(cmd)}", flush=True)
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        (run_dir / "overrides.json").write_text(json.dumps(list(overrides)) + "\n")
    return keep(run_dir, results / name)


def sweep(results: Path, name: str, *args: str) -> list[Path]:
    """Run a Hydra multirun `sftjax-train -m <args>` into experiments/runs/<name>/ unless it finished before (its
    `done` marker); copy job i's files into results/<name>_<i>/ and return those folders in the order the jobs
    ran (offline: just return them)."""
    if not OFFLINE:
        sweep_dir = RUNS / name
        if (sweep_dir / "done").is_file():
            print(f"[reuse] sweep {name}", flush=True)
        else:
            if sweep_dir.exists():
                shutil.rmtree(sweep_dir)
            cmd = ["sftjax-train", "-m", *args, f"hydra.sweep.dir={sweep_dir}", "trainer.progress=false"]
            print(f"[sweep] {name}: {' '.join(cmd)}", flush=True)
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
            (sweep_dir / "done").write_text("")
        for job in (d for d in sweep_dir.iterdir() if d.name.isdigit()):
            keep(job, results / f"{name}_{job.name}")
    jobs = sorted(results.glob(f"{name}_*"), key=lambda d: int(d.name.rsplit("_", 1)[1]))
    return [_existing(j) for j in jobs] if jobs else [_existing(results / f"{name}_0")]


def _existing(folder: Path, done: str = "report.json") -> Path:
    if not (folder / done).is_file():
        raise SystemExit(f"{folder}: no {done} (run the experiment without --from-results / --check first)")
    return folder


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


def keep(run_dir: Path, out: Path) -> Path:
    """Copy the files the tables are computed from into `out`, plus train_sizes.json (examples per training
    dataset, counted now: the dataset files live in the cache, not in results/). Returns `out`."""
    out.mkdir(parents=True, exist_ok=True)
    for f in KEPT:
        if (run_dir / f).is_file():
            shutil.copy2(run_dir / f, out / f)
    datasets = json.loads((run_dir / "config.json").read_text())["data"]["train"]
    sizes = {d["name"]: len(Path(d["path"]).read_text().splitlines()) for d in datasets}
    (out / "train_sizes.json").write_text(json.dumps(sizes, indent=1) + "\n")
    (out / "machine.json").write_text(json.dumps(_this_machine()) + "\n")
    return out


def table(header: list[str], rows: list[list[Any]]) -> str:
    """A markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def write_results(folder: Path, text: str) -> bool:
    """Put `text` between README.md's <!-- results --> markers and into results.md. With --check, write nothing
    and exit non-zero when README.md holds a different table. Returns whether plots should be drawn."""
    readme = folder / "README.md"
    body = readme.read_text()
    block = f"<!-- results -->\n{text.rstrip()}\n<!-- /results -->"
    if CHECK:
        found = re.search(r"<!-- results -->.*<!-- /results -->", body, flags=re.S)
        if found is None or found.group(0) != block:
            raise SystemExit(f"{readme}: the results block differs from what results/ gives; rerun "
                             f"`python {folder.relative_to(HERE.parent)}/run.py --from-results`")
        print(f"{readme}: results block matches results/")
        return False
    readme.write_text(re.sub(r"<!-- results -->.*<!-- /results -->", lambda _: block, body, flags=re.S))
    (folder / "results.md").write_text(text.rstrip() + "\n")
    print(text)
    return True


def _this_machine() -> dict[str, Any]:
    import os

    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": sys.version.split()[0]}


def machine(run: Path) -> str:
    """Where and when `run` (a results/ folder) ran: the date of its last metrics line and the machine.json that
    keep() wrote beside it."""
    import datetime

    m = json.loads((run / "machine.json").read_text())
    metrics = read_jsonl(run / "metrics.jsonl")
    day = datetime.datetime.fromtimestamp(metrics[-1]["time"], datetime.timezone.utc).date().isoformat()
    return f"{day}, {m['cpu']}, {m['cores']} cores, Python {m['python']}"


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
