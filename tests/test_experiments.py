"""Each main-job experiment's README holds exactly the table its committed results/ files give (the numbers come
from files the runs wrote, and nobody edited them by hand): `run.py --check` rebuilds the table from results/
without running anything and compares."""

import subprocess
import sys
from pathlib import Path

import pytest

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
NAMES = ("methods", "data_efficiency", "overfitting", "search", "multitask", "task_heads", "distillation", "preference",
         "reward_model", "rl")


@pytest.mark.parametrize("name", NAMES)
def test_readme_table_is_what_the_results_give(name):
    folder = EXPERIMENTS / name
    runs = [*(folder / "results").glob("*/report.json"), *(folder / "results").glob("*/final_metrics.json")]
    assert runs, f"{folder}: no committed results"  # final_metrics.json: runs that write no report (reward models)
    done = subprocess.run([sys.executable, str(folder / "run.py"), "--check"], capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "results block matches" in done.stdout
