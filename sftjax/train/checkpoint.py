"""Orbax checkpoints of the train state, with exact resume (DESIGN.md decisions 7 and 8).

A checkpoint is one Orbax step directory holding three items:

    <directory>/<step>/state/    every array of the train state (Orbax StandardSave, OCDBT), named by its pytree path
    <directory>/<step>/layout/   JSON: each leaf's path, shape and dtype, in flatten order
    <directory>/<step>/extras/   JSON: data iterator state, resolved config, base fingerprint, eval metrics
    <directory>/<step>/metrics/  JSON {best_metric: value}, written by Orbax to rank checkpoints (only with best_metric)

Why the state is saved by path rather than as-is: optax states are namedtuples, tuples and `EmptyState`/`MaskedNode`
placeholders. Saving the leaves under their key paths and rebuilding the tree from the treedef of `abstract_state`
gives back exactly the caller's structure, whatever Orbax does with container types, and the `layout` item lets a
mismatch (another method, another model, a changed dtype) fail with one line instead of a silent cast: Orbax's
StandardRestore casts to the requested dtype, which would break bitwise resume without a word.

Atomicity (verified in orbax-checkpoint 0.12.8, `_src/path/atomicity.py`, `step.py`): on a local filesystem a save
writes `<step>.orbax-checkpoint-tmp/` and renames it to `<step>/` once every item is written
(AtomicRenameTemporaryPath).
Step discovery only accepts names without that suffix, so a save killed mid-write is never listed; the next
manager (`cleanup_tmp_directories=True`) removes the leftover before its first save. Old checkpoints are deleted in
the finalize thread only after the new one is committed, so a crash never leaves fewer checkpoints than asked for.

Retention: a checkpoint survives while it is among the `keep_last` newest OR among the `keep_best` best by
`best_metric` (`AnyPreservationPolicy([LatestN, BestN])`). Checkpoints saved without that metric compete only
for the latest slots. Saving a step that already exists raises `CheckpointError`: nothing committed is overwritten.
"""

from __future__ import annotations

import json
import math
from concurrent import futures
from hashlib import sha256
from pathlib import Path
from typing import Any, Literal

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint._src.checkpoint_managers import preservation_policy as ocp_preservation

from sftjax.errors import CheckpointError, ConfigError

PyTree = Any

_STATE, _LAYOUT, _EXTRAS = "state", "layout", "extras"
_ITEMS = (_STATE, _LAYOUT, _EXTRAS)
# Leaves hashed concurrently by `fingerprint`; hashlib releases the GIL on large buffers.
_HASH_THREADS = 4


def path_segment(key: Any) -> str:
    """One pytree key (dict key, attribute, index) as a path segment."""
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _flatten(tree: PyTree) -> tuple[list[tuple[tuple[str, ...], Any]], Any]:
    """[(path segments, leaf)] in flatten order, and the treedef; rejects paths that collide as strings."""
    with_path, treedef = jax.tree_util.tree_flatten_with_path(tree)
    flat = [(tuple(path_segment(k) for k in path), leaf) for path, leaf in with_path]
    seen = set()
    for path, leaf in flat:
        if not path or path in seen:
            raise ValueError(f"train state leaf path {'/'.join(path)!r} is empty or not unique as a string path")
        if not hasattr(leaf, "dtype"):  # a Python number has no fixed dtype to restore bitwise
            raise TypeError(f"train state leaf {'/'.join(path)} is a {type(leaf).__name__}, not an array")
        seen.add(path)
    return flat, treedef


def _nest(flat: list[tuple[tuple[str, ...], Any]]) -> dict:
    """A nested dict of string keys from (path, leaf) pairs: the form Orbax saves with readable names."""
    root: dict = {}
    for path, leaf in flat:
        node = root
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = leaf
    return root


def _pick(nested: dict, path: tuple[str, ...]) -> Any:
    for part in path:
        nested = nested[part]
    return nested


def _layout(flat: list[tuple[tuple[str, ...], Any]]) -> list[dict]:
    return [{"path": list(p), "shape": list(np.shape(x)), "dtype": np.dtype(x.dtype).name} for p, x in flat]


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"


class Checkpointer:
    """Saves and restores the train state plus JSON extras in `directory`, one Orbax step directory per save.

    Args:
      directory: where step directories live (created if missing); one writer at a time.
      keep_last: the newest checkpoints kept (>= 1, so a resume point always exists).
      keep_best: the best checkpoints by `best_metric` kept in addition (0: none).
      best_metric: key of the eval metrics ranking checkpoints (e.g. "eval/loss"); needed when keep_best > 0.
      best_mode: "min" or "max": which direction of `best_metric` is better.
      save_async: write in a background thread; `save` returns once arrays are copied off the device.
      read_only: only restore (evaluation, inspection): never create the directory, never clean up temporary
        directories (they may be a running training's save in progress), refuse `save`.
    """

    def __init__(
        self,
        directory: str | Path,
        *,
        keep_last: int,
        keep_best: int = 0,
        best_metric: str | None = None,
        best_mode: Literal["min", "max"] = "min",
        save_async: bool = True,
        read_only: bool = False,
    ):
        if keep_last < 1:
            raise ConfigError(f"checkpoint keep_last must be >= 1 (the resume point), got {keep_last}")
        if keep_best < 0:
            raise ConfigError(f"checkpoint keep_best must be >= 0, got {keep_best}")
        if keep_best > 0 and not best_metric:
            raise ConfigError(f"checkpoint keep_best={keep_best} needs best_metric (the eval metric to rank by)")
        if best_mode not in ("min", "max"):
            raise ConfigError(f"checkpoint best_mode must be 'min' or 'max', got {best_mode!r}")
        self.directory = Path(directory).absolute()
        if self.directory.exists() and not self.directory.is_dir():
            raise CheckpointError(f"{self.directory}: is a file, not a checkpoint directory")
        self.best_metric = best_metric
        policies: list = [ocp_preservation.LatestN(n=keep_last)]
        if keep_best > 0:
            policies.append(
                ocp_preservation.BestN(
                    get_metric_fn=self._score,
                    reverse=best_mode == "min",  # BestN keeps the tail of the sorted list
                    n=keep_best,
                    keep_checkpoints_without_metrics=False,  # they are protected by LatestN only
                )
            )
        options = ocp.CheckpointManagerOptions(
            best_fn=self._score if best_metric else None,  # also makes Orbax store the metric with each step
            best_mode=best_mode,
            preservation_policy=ocp_preservation.AnyPreservationPolicy(policies),
            enable_async_checkpointing=save_async,
            cleanup_tmp_directories=not read_only,
            create=not read_only,
            read_only=read_only,
        )
        try:
            self._manager = ocp.CheckpointManager(self.directory, item_names=_ITEMS, options=options)
        except Exception as e:  # noqa: BLE001 - Orbax raises many types on unreadable directories
            raise CheckpointError(f"{self.directory}: cannot open checkpoint directory ({_one_line(e)})") from e

    def _score(self, metrics: dict) -> float:
        return float(metrics[self.best_metric])

    def _step_dir(self, step: int) -> Path:
        return self.directory / str(step)

    def steps(self) -> list[int]:
        """Committed (or in-flight) steps, ascending."""
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        """The newest step, or None when the directory holds no checkpoint. An in-flight async save counts;
        `wait()` makes it durable."""
        return self._manager.latest_step()

    def best_step(self) -> int | None:
        """The step with the best `best_metric` among kept checkpoints, or None (no metric configured or seen)."""
        return self._manager.best_step() if self.best_metric else None

    def save(self, step: int, state: PyTree, extras: dict, metrics: dict | None = None) -> None:
        """Save `state` (a pytree of arrays) and `extras` (JSON) as `step`; asynchronous when `save_async`.

        A save first waits for the previous one, so at most one is in flight.

        `metrics` (defaults to `extras["metrics"]`) ranks the checkpoint by `best_metric`; a missing or
        non-finite value leaves it unranked, so a diverged eval is never "best". The caller may donate or
        delete `state`'s device buffers once this returns: Orbax has copied them to host by then.
        """
        step = int(step)
        if step in self._manager.all_steps():
            raise CheckpointError(
                f"{self._step_dir(step)}: checkpoint step {step} already exists; refusing to overwrite it"
            )
        try:
            json.dumps(extras)
        except (TypeError, ValueError) as e:
            raise TypeError(f"checkpoint extras must be JSON-serializable: {e}") from e
        flat, _ = _flatten(state)
        if metrics is None:
            metrics = extras.get("metrics")
        ranked = None
        if self.best_metric and metrics and self.best_metric in metrics:
            value = float(metrics[self.best_metric])
            ranked = {self.best_metric: value} if math.isfinite(value) else None
        args = ocp.args.Composite(
            **{
                _STATE: ocp.args.StandardSave(_nest(flat)),
                _LAYOUT: ocp.args.JsonSave(_layout(flat)),
                _EXTRAS: ocp.args.JsonSave(extras),
            }
        )
        try:
            self._manager.save(step, args=args, metrics=ranked, force=True)
        except ocp.checkpoint_manager.StepAlreadyExistsError as e:
            raise CheckpointError(
                f"{self._step_dir(step)}: checkpoint step {step} already exists; refusing to overwrite it"
            ) from e

    def restore(self, abstract_state: PyTree, step: int | None = None) -> tuple[PyTree, dict]:
        """Restore `step` (default: latest) into the structure of `abstract_state`.

        `abstract_state` is a `jax.eval_shape` tree of ShapeDtypeStruct or a concrete example of the state; the
        result has its treedef, shapes and dtypes, bit for bit what was saved. Leaves come back as jax Arrays on
        the sharding of the abstract leaf, or on the first local device when it has none. The returned extras
        gain `extras["checkpoint"] = {"directory", "step"}` (not saved; for messages such as `check_base`).
        """
        self.wait()
        if step is None:
            step = self.latest_step()
            if step is None:
                raise CheckpointError(f"{self.directory}: no checkpoint to restore")
        step = int(step)
        step_dir = self._step_dir(step)
        if step not in self._manager.all_steps():
            raise CheckpointError(f"{step_dir}: no checkpoint at step {step} (saved steps: {self.steps()})")
        for item in _ITEMS:
            if not (step_dir / item).is_dir():
                raise CheckpointError(f"{step_dir}: not an sftjax checkpoint (no '{item}' item)")
        try:
            saved = self._manager.restore(
                step, args=ocp.args.Composite(**{_LAYOUT: ocp.args.JsonRestore(), _EXTRAS: ocp.args.JsonRestore()})
            )
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"{step_dir}: cannot read checkpoint ({_one_line(e)})") from e
        flat, treedef = _flatten(abstract_state)
        _check_layout(step_dir, saved[_LAYOUT], _layout(flat))
        device = jax.local_devices()[0]
        targets = [
            (p, jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=getattr(x, "sharding", None)
                                     or jax.sharding.SingleDeviceSharding(device)))
            for p, x in flat
        ]
        try:
            restored = self._manager.restore(
                step, args=ocp.args.Composite(**{_STATE: ocp.args.StandardRestore(_nest(targets))})
            )[_STATE]
            leaves = [_pick(restored, p) for p, _ in flat]
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"{step_dir}: cannot read checkpoint arrays ({_one_line(e)})") from e
        extras = dict(saved[_EXTRAS])
        extras["checkpoint"] = {"directory": str(self.directory), "step": step}
        return jax.tree_util.tree_unflatten(treedef, leaves), extras

    def wait(self) -> None:
        """Block until every async save is committed (and old checkpoints are deleted)."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Wait for pending saves and release Orbax's threads."""
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _check_layout(step_dir: Path, saved: list[dict], expected: list[dict]) -> None:
    """One line naming the first difference between the saved leaves and the ones this run expects."""
    saved_by = {"/".join(e["path"]): e for e in saved}
    expected_by = {"/".join(e["path"]): e for e in expected}
    missing = [k for k in expected_by if k not in saved_by]
    extra = [k for k in saved_by if k not in expected_by]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"{len(missing)} leaves missing (first: {missing[0]})")
        if extra:
            parts.append(f"{len(extra)} unexpected leaves (first: {extra[0]})")
        raise CheckpointError(f"{step_dir}: train state does not match this run: {', '.join(parts)}")
    for key, want in expected_by.items():
        have = saved_by[key]
        if (have["shape"], have["dtype"]) != (want["shape"], want["dtype"]):
            raise CheckpointError(
                f"{step_dir}: {key} was saved as {tuple(have['shape'])} {have['dtype']}, "
                f"this run expects {tuple(want['shape'])} {want['dtype']}"
            )


def _leaf_digest(path: tuple[str, ...], leaf: Any) -> bytes:
    arr = np.ascontiguousarray(jax.device_get(leaf))
    if arr.dtype.byteorder == ">":
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    h = sha256(json.dumps([list(path), list(arr.shape), arr.dtype.name]).encode())
    h.update(arr.reshape(-1).view(np.uint8))
    return h.digest()


def fingerprint(params: PyTree) -> str:
    """A stable "sha256:<hex>" of a params pytree: its key paths, shapes, dtypes and raw bytes.

    Each leaf is hashed on its own (a header with path, shape and dtype, then its little-endian bytes), in a
    few threads, and the digests are hashed in sorted path order, so container order and thread timing do not
    matter. Cost: one host copy of each leaf (a device-to-host transfer on GPU) and SHA-256 over every byte, in the
    order of a second per GB on a small CPU.
    """
    flat, _ = _flatten(params)
    flat.sort(key=lambda item: item[0])
    with futures.ThreadPoolExecutor(_HASH_THREADS) as pool:
        digests = list(pool.map(lambda item: _leaf_digest(*item), flat))
    total = sha256()
    for digest in digests:
        total.update(digest)
    return "sha256:" + total.hexdigest()


def check_base(extras: dict, fingerprint: str) -> None:
    """Refuse to resume a checkpoint (its restored `extras`) trained on another base than `fingerprint`."""
    where = extras.get("checkpoint", {})
    directory, step = where.get("directory", "checkpoint"), where.get("step", "?")
    saved = extras.get("base_fingerprint")
    if saved is None:
        raise CheckpointError(f"{directory}: checkpoint step {step} records no base fingerprint; cannot check its base")
    if saved != fingerprint:
        raise CheckpointError(
            f"{directory}: checkpoint step {step} was trained on base {saved}, this run loads {fingerprint}; "
            "refusing to resume on a different base"
        )


def check_references(extras: dict, fingerprints: dict[str, str]) -> None:
    """Refuse to resume a checkpoint trained against other frozen references (a teacher, a reference policy)
    than this run loads; fingerprints: {name: fingerprint} of the objective's references."""
    where = extras.get("checkpoint", {})
    directory, step = where.get("directory", "checkpoint"), where.get("step", "?")
    saved = extras.get("reference_fingerprints", {})
    for name in sorted(set(saved) | set(fingerprints)):
        if saved.get(name) != fingerprints.get(name):
            raise CheckpointError(
                f"{directory}: checkpoint step {step} was trained with {name} {saved.get(name, 'none')}, this run "
                f"loads {fingerprints.get(name, 'none')}; refusing to resume with another {name}"
            )
