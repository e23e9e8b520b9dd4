"""The rolling index on its own: sealing, eviction by window and by memory budget, superseded rows."""

from __future__ import annotations

import numpy as np

from circuitwatch.proto import circuitwatch_pb2 as pb
from circuitwatch.sidecar.index import RollingIndex, TimeWindow
from circuitwatch.sidecar.keys import token_keys


class Clock:
    def __init__(self) -> None:
        self.now = 10**18

    def __call__(self) -> int:
        return self.now


def add(index: RollingIndex, seq: int, features: list[list[int]], phase: int = pb.PHASE_PROMPT) -> np.ndarray:
    offsets = np.concatenate([[0], np.cumsum([len(f) for f in features])]).astype(np.uint32)
    ids = np.array([f for row in features for f in row], dtype=np.uint32)
    keys = token_keys(seq, np.arange(len(features)))
    tokens = np.arange(len(features), dtype=np.uint32)
    return index.append(keys, 0, phase, tokens, offsets, ids, np.ones(len(ids), np.float16))


def test_segments_seal_by_age_and_lookups_span_them() -> None:
    clock = Clock()
    index = RollingIndex(window_s=100, segment_s=1, clock=clock)
    for seq in range(1, 6):
        add(index, seq, [[1, 2], [2], [3]])
        clock.now += 2 * 10**9
    add(index, 9, [[2]])
    assert len(index.sealed) == 5
    keys = index.term_keys([0], 2, 0.0, None, None)
    assert keys.tolist() == sorted(
        token_keys(np.array([1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 9]), np.array([0, 1] * 5 + [0])).tolist()
    )
    window = TimeWindow(index.sealed[2].t_start, index.sealed[3].t_end)
    assert set((index.term_keys([0], 3, 0.0, window, None) >> np.uint64(32)).tolist()) == {3, 4}


def test_eviction_by_window_and_by_memory_budget() -> None:
    clock = Clock()
    index = RollingIndex(window_s=5, segment_s=1, clock=clock)
    for seq in range(1, 11):
        add(index, seq, [[seq % 4]] * 100)
        clock.now += 10**9
    index.evict()
    assert {int(k >> np.uint64(32)) for s in index.segments() for k in s.row_keys[:1]} <= set(range(5, 11))
    assert index.evicted_segments >= 4

    budget = RollingIndex(window_s=1000, segment_s=1, memory_budget_bytes=3 * index.sealed[-1].nbytes, clock=clock)
    for seq in range(1, 11):
        add(budget, seq, [[seq % 4]] * 100)
        clock.now += 10**9
    budget.evict()
    assert len(budget.sealed) <= 3
    assert sum(s.nbytes for s in budget.sealed) <= budget.memory_budget_bytes
    remaining = {int(k >> np.uint64(32)) for s in budget.sealed for k in s.row_keys}
    assert remaining and min(remaining) > 5  # the oldest went first


def test_superseded_rows_are_invisible() -> None:
    clock = Clock()
    index = RollingIndex(window_s=100, segment_s=1, clock=clock)
    old = add(index, 1, [[7], [8]])
    clock.now += 2 * 10**9
    add(index, 1, [[8], [8]])
    index.supersede(old)
    assert index.term_keys([0], 7, 0.0, None, None).tolist() == []
    assert (index.term_keys([0], 8, 0.0, None, None) & np.uint64(0xFFFFFFFF)).tolist() == [0, 1]
    tokens, features, counts, _ = index.feature_stats([0], None, None)
    assert (tokens, features.tolist(), counts.tolist()) == (2, [8], [2])
