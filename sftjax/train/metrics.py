"""Live training metrics: JSON lines, TensorBoard event files and a progress bar.

Every `MetricsWriter.write` appends one line to `<run_dir>/metrics.jsonl` and flushes it, so `tail -f` shows it at
once and a crash (even SIGKILL) loses nothing already written; the same scalars go to TensorBoard event files in
`<run_dir>/tensorboard/` (tensorboardX) as `<split>/<name>`. Generated eval samples go to `<run_dir>/samples.jsonl`
and to TensorBoard's text tab.

A resumed run repeats the steps after its checkpoint. `MetricsWriter(run_dir, resume_step=s)` therefore first drops
every JSONL line with step > s (`truncate_after`, an atomic rewrite) and opens TensorBoard with `purge_step=s + 1`,
which tells readers to hide the events of the killed run from step s + 1 on. The result reads as one run.

JSONL line: {"step": int, "split": "train" | "eval", "time": unix seconds, <name>: float | null, ...}; non-finite
values are written as null so that every line is strict JSON (jq, pandas); TensorBoard gets the real NaN / inf.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import IO

from tqdm import tqdm

METRICS_FILE = "metrics.jsonl"
SAMPLES_FILE = "samples.jsonl"
TENSORBOARD_DIR = "tensorboard"
_RESERVED = ("step", "split", "time")


def _finite_or_none(value: float) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def _line_step(line: str) -> int | None:
    """The step of one JSONL line, or None for a torn (partially written) or foreign line."""
    try:
        record = json.loads(line)
        return int(record["step"])
    except (ValueError, KeyError, TypeError):
        return None


def truncate_after(path: str | Path, step: int) -> None:
    """Rewrite the JSONL file `path` keeping the lines with step <= `step`, atomically.

    Torn lines (a crash mid-write) are dropped too. The new content goes to a temporary file in the same
    directory, is fsynced and renamed over `path`: a crash during truncation leaves the old file or the new one,
    never a mix. A missing file is left missing.
    """
    path = Path(path)
    if not path.exists():
        return
    with path.open(encoding="utf-8") as f:
        kept = [line if line.endswith("\n") else line + "\n" for line in f
                if (s := _line_step(line)) is not None and s <= step]
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.writelines(kept)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class NullWriter:
    """The metrics writer of every process but the first in a multi-process run: it writes nothing."""

    def write(self, step: int, metrics: dict[str, float], split: str = "train") -> None:
        pass

    def write_text(self, step: int, tag: str, text: str) -> None:
        pass

    def close(self) -> None:
        pass


def _summary_writer() -> type:
    """tensorboardX's SummaryWriter, imported without torch.

    tensorboardX imports torch whenever it is installed (about a second) only to accept torch tensors; sftjax logs
    Python floats. A None entry in sys.modules makes that `import torch` fail as it would without torch; the
    entry is removed right after, so a later `import torch` works as usual. With torch already imported (or
    tensorboardX), it is a plain import.
    """
    block = "torch" not in sys.modules and "tensorboardX" not in sys.modules
    if block:
        sys.modules["torch"] = None  # type: ignore[assignment]
    try:
        from tensorboardX import SummaryWriter
    finally:
        if block:
            del sys.modules["torch"]
    return SummaryWriter


class MetricsWriter:
    """Appends metrics of `run_dir` to metrics.jsonl and TensorBoard; `resume_step` continues a killed run.

    Lines are flushed to the OS on every call (no fsync: a process crash loses nothing, a power cut may lose
    the last seconds). TensorBoard events are flushed on every call too, so the dashboard is live.
    """

    def __init__(self, run_dir: str | Path, *, resume_step: int | None = None):
        SummaryWriter = _summary_writer()
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if resume_step is not None:
            for name in (METRICS_FILE, SAMPLES_FILE):
                truncate_after(self.run_dir / name, resume_step)
        self._metrics = self._open(METRICS_FILE)
        self._samples = self._open(SAMPLES_FILE)
        self._tb = SummaryWriter(
            str(self.run_dir / TENSORBOARD_DIR),
            purge_step=None if resume_step is None else resume_step + 1,
            # tensorboardX names files by the second and opens them "wb": a resume within the same second would
            # truncate the killed run's events. The nanosecond suffix keeps names unique and in time order.
            filename_suffix=f".{time.time_ns()}",
        )

    def _open(self, name: str) -> IO[str]:
        path = self.run_dir / name
        torn = False
        if path.exists() and path.stat().st_size:
            with path.open("rb") as f:
                f.seek(-1, os.SEEK_END)
                torn = f.read(1) != b"\n"
        f = path.open("a", encoding="utf-8")
        if torn:  # a crash left half a line: start on a fresh one so ours stay parseable
            f.write("\n")
        return f

    def write(self, step: int, metrics: dict[str, float], split: str = "train") -> None:
        """One JSONL line {"step", "split", "time", **metrics} and one TensorBoard scalar `<split>/<name>` each."""
        if clash := [k for k in metrics if k in _RESERVED]:
            raise ValueError(f"metric names {clash} are reserved in {METRICS_FILE}")
        record = {"step": int(step), "split": split, "time": round(time.time(), 3)}
        record.update({k: _finite_or_none(v) for k, v in metrics.items()})
        self._metrics.write(json.dumps(record, allow_nan=False) + "\n")
        self._metrics.flush()
        for name, value in metrics.items():
            self._tb.add_scalar(f"{split}/{name}", float(value), int(step))
        self._tb.flush()

    def write_text(self, step: int, tag: str, text: str) -> None:
        """A generated sample (or any text) under `tag`: one line in samples.jsonl and TensorBoard's text tab."""
        record = {"step": int(step), "tag": tag, "time": round(time.time(), 3), "text": text}
        self._samples.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._samples.flush()
        self._tb.add_text(tag, text, int(step))
        self._tb.flush()

    def close(self) -> None:
        self._metrics.close()
        self._samples.close()
        self._tb.close()

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Progress:
    """A tqdm bar over optimizer steps with loss and tokens/s; tqdm's own fields give the ETA.

    Shown only when `file` (default stderr) is a terminal, so logs of batch jobs and Hydra multiruns are not
    flooded with carriage returns; `force=True` / `False` overrides. Resumed runs pass `initial_step` (None means
    0), and the rate and ETA count only the steps of this process.
    """

    def __init__(
        self, total_steps: int, initial_step: int | None = 0, *, force: bool | None = None, file: IO[str] | None = None
    ):
        file = file if file is not None else sys.stderr
        enabled = force if force is not None else file.isatty()
        self._bar = tqdm(
            total=total_steps, initial=initial_step or 0, file=file, disable=not enabled,
            unit="step", dynamic_ncols=True, smoothing=0.1,
        )

    def update(self, step: int, loss: float, tokens_per_s: float) -> None:
        """Move the bar to `step` (absolute, not a delta) and show the latest loss and throughput."""
        self._bar.set_postfix_str(f"loss={loss:.4f}, tok/s={tokens_per_s:,.0f}", refresh=False)
        self._bar.update(step - self._bar.n)

    def close(self) -> None:
        self._bar.close()
