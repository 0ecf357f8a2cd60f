"""MetricsWriter (JSONL + TensorBoard read back by TensorBoard's own EventAccumulator), truncate_after, Progress."""

import io
import json
import math
import os
import subprocess
import sys

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from sftjax.train import metrics as metrics_lib
from sftjax.train.metrics import MetricsWriter, Progress, truncate_after


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _tensorboard(run_dir):
    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    return acc


def test_each_write_is_one_flushed_json_line(tmp_path):
    writer = MetricsWriter(tmp_path)
    writer.write(1, {"loss": 2.5, "lr": 1e-4})
    writer.write(2, {"loss": float("nan")}, split="eval")
    # Read before close: the lines must already be on disk (tail -f, crash safety).
    lines = _lines(tmp_path / "metrics.jsonl")
    writer.close()
    assert [(r["step"], r["split"]) for r in lines] == [(1, "train"), (2, "eval")]
    assert lines[0]["loss"] == 2.5 and lines[0]["lr"] == 1e-4 and isinstance(lines[0]["time"], float)
    assert lines[1]["loss"] is None  # strict JSON; NaN is not a JSON value


def test_tensorboard_reader_sees_scalars_and_text(tmp_path):
    with MetricsWriter(tmp_path) as writer:
        for step in (10, 20):
            writer.write(step, {"loss": step / 10, "tokens_per_s": 1000.0 * step})
        writer.write(20, {"loss": 0.75, "perplexity": math.exp(0.75)}, split="eval")
        writer.write_text(20, "eval/sample_0", "Q: 2+2?\nA: 4")
    acc = _tensorboard(tmp_path)
    assert set(acc.Tags()["scalars"]) == {"train/loss", "train/tokens_per_s", "eval/loss", "eval/perplexity"}
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [(10, 1.0), (20, 2.0)]
    assert [(e.step, e.value) for e in acc.Scalars("eval/loss")] == [(20, 0.75)]
    (text_event,) = acc.Tensors("eval/sample_0/text_summary")
    assert text_event.step == 20 and text_event.tensor_proto.string_val[0].decode() == "Q: 2+2?\nA: 4"
    (sample,) = _lines(tmp_path / "samples.jsonl")
    assert (sample["step"], sample["tag"], sample["text"]) == (20, "eval/sample_0", "Q: 2+2?\nA: 4")


def test_resume_appends_and_drops_the_killed_runs_later_steps(tmp_path):
    with MetricsWriter(tmp_path) as writer:
        for step in range(1, 6):
            writer.write(step, {"loss": float(step)})
        writer.write_text(5, "sample", "from the killed run")
    # Resumed from the checkpoint at step 3 (within the same second: event file names must not collide).
    with MetricsWriter(tmp_path, resume_step=3) as writer:
        for step in range(4, 7):
            writer.write(step, {"loss": 10.0 + step})
    lines = _lines(tmp_path / "metrics.jsonl")
    assert [(r["step"], r["loss"]) for r in lines] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 14.0), (5, 15.0), (6, 16.0)]
    assert (tmp_path / "samples.jsonl").read_text() == ""
    assert len(os.listdir(tmp_path / "tensorboard")) == 2
    acc = _tensorboard(tmp_path)
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [
        (1, 1.0), (2, 2.0), (3, 3.0), (4, 14.0), (5, 15.0), (6, 16.0)
    ]


def test_truncate_after_keeps_steps_up_to_and_drops_torn_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": s}) + "\n" for s in range(1, 6)) + '{"step": 6, "lo')
    truncate_after(path, 3)
    assert [r["step"] for r in _lines(path)] == [1, 2, 3]
    truncate_after(path, 0)
    assert path.read_text() == ""
    truncate_after(tmp_path / "missing.jsonl", 3)  # nothing to do
    assert not (tmp_path / "missing.jsonl").exists()
    assert sorted(os.listdir(tmp_path)) == ["metrics.jsonl"]  # no temporary files left behind


def test_truncate_after_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    original = "".join(json.dumps({"step": s}) + "\n" for s in range(1, 6))
    path.write_text(original)

    def crash(*args):
        raise OSError("disk full")

    monkeypatch.setattr(metrics_lib.os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        truncate_after(path, 2)
    assert path.read_text() == original
    assert sorted(os.listdir(tmp_path)) == ["metrics.jsonl"]


def test_a_torn_last_line_does_not_swallow_the_next_write(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "lo')
    with MetricsWriter(tmp_path) as writer:
        writer.write(3, {"loss": 3.0})
    last = (tmp_path / "metrics.jsonl").read_text().splitlines()[-1]
    assert json.loads(last)["step"] == 3


def test_reserved_metric_names_are_rejected(tmp_path):
    with MetricsWriter(tmp_path) as writer, pytest.raises(ValueError, match="reserved"):
        writer.write(1, {"step": 1.0})


def test_progress_shows_loss_throughput_and_eta_when_forced():
    out = io.StringIO()
    bar = Progress(10, initial_step=4, force=True, file=out)
    bar.update(6, loss=1.23456, tokens_per_s=12345.6)
    bar.close()
    text = out.getvalue()
    assert "6/10" in text and "loss=1.2346" in text and "tok/s=12,346" in text
    assert "<" in text  # tqdm's elapsed<remaining (ETA) field
    out = io.StringIO()
    bar = Progress(10, None, force=True, file=out)  # None: a fresh run (no checkpoint step)
    bar.update(3, loss=1.0, tokens_per_s=1.0)
    bar.close()
    assert "3/10" in out.getvalue()


def test_progress_is_silent_when_not_a_terminal():
    out = io.StringIO()  # isatty() is False, as for a redirected batch job
    bar = Progress(10, file=out)
    bar.update(3, loss=1.0, tokens_per_s=1.0)
    bar.close()
    assert out.getvalue() == ""


def test_the_writer_does_not_import_torch_and_torch_still_imports_after(tmp_path):
    """tensorboardX would import torch (about a second of every run's start) only to accept torch tensors: in a
    fresh process the writer logs without it, and a later `import torch` works."""
    code = """
import sys
from sftjax.train.metrics import MetricsWriter
w = MetricsWriter(sys.argv[1])
w.write(1, {"loss": 2.5})
w.close()
assert "torch" not in sys.modules, "the writer imported torch"
import torch
assert float(torch.ones(2).sum()) == 2.0
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
    assert [e.value for e in _tensorboard(tmp_path).Scalars("train/loss")] == [2.5]
