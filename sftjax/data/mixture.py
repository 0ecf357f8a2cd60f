"""Which example comes next: a deterministic, seekable order over a weighted mixture of datasets.

A mixture epoch has E = sum(n_i) draws (one pass over everything when weights are left out). Dataset i contributes
c_i = round(E * w_i / sum(w)) draws per epoch (c_i = n_i without weights), taken from its own endless stream:
successive permutations of its n_i examples, so an over-weighted dataset repeats whole passes and an
under-weighted one continues where the previous mixture epoch stopped. The epoch's draws are then shuffled
together. Every permutation is seeded by (seed, tag, dataset, pass) or (seed, tag, epoch), so the order is a pure
function of (sizes, weights, seed, epoch): the iterator state needs only (epoch, position) to resume exactly.

`epoch_order` returns an [E, 2] int64 array of (dataset index = task id, example index).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from sftjax.data.errors import DataError

_DATASET_TAG = 1  # seeds of per-dataset passes
_MIX_TAG = 2  # seeds of the per-epoch interleaving


def draws_per_epoch(sizes: Sequence[int], weights: Sequence[float] | None) -> list[int]:
    """c_i: draws of each dataset in one mixture epoch."""
    if weights is None:
        return [int(n) for n in sizes]
    if len(weights) != len(sizes) or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise DataError(f"dataset weights {list(weights)}: need one non-negative weight per dataset, not all zero")
    total = sum(sizes)
    return [int(round(total * w / sum(weights))) for w in weights]


def _stream(size: int, seed: int, dataset: int, start: int, count: int) -> np.ndarray:
    """Elements start .. start + count - 1 of a dataset's endless stream of permutations."""
    out = []
    first, last = start // size, (start + count - 1) // size if count else start // size - 1
    for p in range(first, last + 1):
        perm = np.random.default_rng([seed, _DATASET_TAG, dataset, p]).permutation(size)
        lo = max(start - p * size, 0)
        hi = min(start + count - p * size, size)
        out.append(perm[lo:hi])
    return np.concatenate(out) if out else np.zeros(0, np.int64)


def epoch_order(sizes: Sequence[int], weights: Sequence[float] | None, seed: int, epoch: int) -> np.ndarray:
    """[E, 2] (dataset, example) pairs of mixture epoch `epoch`, shuffled by seed."""
    counts = draws_per_epoch(sizes, weights)
    parts = [np.stack([np.full(c, i), _stream(n, seed, i, epoch * c, c)], axis=1)
             for i, (n, c) in enumerate(zip(sizes, counts)) if c > 0]
    order = np.concatenate(parts).astype(np.int64)
    return order[np.random.default_rng([seed, _MIX_TAG, epoch]).permutation(len(order))]
