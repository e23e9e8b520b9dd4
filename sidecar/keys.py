"""Token keys: one uint64 per (request, position), and the sorted-array set algebra every evaluation runs on.

A token key is `request_seq << 32 | position`. Sorting keys groups a request's tokens into one run in position
order, so one evaluator serves a single request's report and a query over the whole index: both only supply
sorted unique keys. This module is the only place that knows the layout.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

KEY_DTYPE = np.uint64
POSITION_BITS = 32
POSITION_MASK = np.uint64((1 << POSITION_BITS) - 1)


def token_keys(request_seq: int | np.ndarray, positions: np.ndarray) -> np.ndarray:
    """Keys of a request's (or each row's request's) positions."""
    seq = np.asarray(request_seq, dtype=KEY_DTYPE)
    return (seq << KEY_DTYPE(POSITION_BITS)) | np.asarray(positions).astype(KEY_DTYPE)


def key_requests(keys: np.ndarray) -> np.ndarray:
    return (keys >> KEY_DTYPE(POSITION_BITS)).astype(np.int64)


def key_positions(keys: np.ndarray) -> np.ndarray:
    return (keys & POSITION_MASK).astype(np.int64)


def request_key_range(request_seq: int) -> tuple[np.uint64, np.uint64]:
    """[first, end) keys of one request: its tokens are one contiguous run in any sorted key array."""
    return KEY_DTYPE(request_seq) << KEY_DTYPE(POSITION_BITS), KEY_DTYPE(request_seq + 1) << KEY_DTYPE(POSITION_BITS)


def sorted_unique(keys: np.ndarray) -> np.ndarray:
    """Sort (radix sort for integers: linear time) and drop repeats."""
    keys = np.sort(keys, kind="stable")
    if len(keys) > 1:
        keys = keys[np.concatenate(([True], keys[1:] != keys[:-1]))]
    return keys


def intersect_sorted(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Intersection of two sorted unique arrays by binary search (no re-sorting)."""
    if len(a) > len(b):
        a, b = b, a
    if not len(a) or not len(b):
        return a[:0]
    found = np.searchsorted(b, a)
    found[found == len(b)] = 0
    return a[b[found] == a]


def subtract_sorted(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a minus b, both sorted unique."""
    if not len(a) or not len(b):
        return a
    found = np.searchsorted(b, a)
    found[found == len(b)] = 0
    return a[b[found] != a]


def concat_ranges(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """The concatenation of arange(starts[i], starts[i] + counts[i]) over i, without a loop per range."""
    ends = np.cumsum(counts)
    return np.arange(int(ends[-1]) if len(ends) else 0, dtype=np.int64) + np.repeat(starts - (ends - counts), counts)


def run_starts(sorted_values: np.ndarray) -> np.ndarray:
    """Index of the first element of each run of equal values in a sorted array."""
    if not len(sorted_values):
        return np.empty(0, np.int64)
    return np.flatnonzero(np.concatenate(([True], sorted_values[1:] != sorted_values[:-1])))


@dataclass(frozen=True)
class KeyRuns:
    """A sorted unique key set as runs of consecutive keys. A request's tokens are one run per phase, so an
    index's whole universe is a few runs per request: counting the set's keys below any key searches the runs (a
    few thousand, in cache) instead of the keys (millions)."""

    starts: np.ndarray  # uint64: each run's first key
    offsets: np.ndarray  # int64: where each run starts in the set
    lengths: np.ndarray  # int64

    @classmethod
    def of(cls, keys: np.ndarray) -> KeyRuns:
        if not len(keys):
            return cls(keys[:0], _NO_ROWS, _NO_ROWS)
        offsets = np.flatnonzero(np.concatenate(([True], keys[1:] - keys[:-1] != KEY_DTYPE(1))))
        return cls(keys[offsets], offsets, np.diff(np.append(offsets, len(keys))))

    def count_below(self, keys: np.ndarray) -> np.ndarray:
        """How many keys of the set are < each of `keys`."""
        run = np.searchsorted(self.starts, keys, side="right") - 1
        after_a_run = run >= 0
        run = run[after_a_run]
        counts = np.zeros(len(keys), np.int64)
        inside = (keys[after_a_run] - self.starts[run]).astype(np.int64)  # >= 0: the run starts at or before
        counts[after_a_run] = self.offsets[run] + np.minimum(inside, self.lengths[run])
        return counts


_NO_ROWS = np.empty(0, np.int64)
