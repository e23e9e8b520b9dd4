"""One open request's state on its own: codes arriving in order, out of order and encoded again."""

from __future__ import annotations

import numpy as np
import pytest

from circuitwatch.proto import circuitwatch_pb2 as pb
from circuitwatch.sidecar.request_state import MERGE_FANOUT, Chunk, RequestState


def chunk(first: int, rows: int, uid: int, rng: np.random.Generator) -> Chunk:
    counts = rng.integers(0, 4, rows).astype(np.int64)
    return Chunk.of(
        np.arange(first, first + rows, dtype=np.int64),
        np.arange(uid, uid + rows, dtype=np.int64),
        np.zeros(rows, np.uint32),
        counts,
        rng.integers(0, 1000, int(counts.sum())).astype(np.uint32),
        rng.random(int(counts.sum())).astype(np.float16),
    )


@pytest.mark.parametrize("seed", range(6))
def test_latest_codes_and_replaced_rows_equal_a_recount_in_any_arrival_order(seed: int) -> None:
    """Long in-order runs (merged many times over), then positions encoded again, slices ahead of the prefix and
    the gap behind them filled: every slice's replaced rows and the final latest codes per position equal a
    plain-Python recount of what arrived."""
    rng = np.random.default_rng(seed)
    state = RequestState("r", 1, 0)
    latest: dict[tuple[int, int], tuple[int, list[int]]] = {}  # (gslot, position) -> (uid, features)
    next_uid, prefix = 0, {0: 0, 1: 0}
    for step in range(3 * MERGE_FANOUT**2):
        gslot = int(rng.integers(0, 2))
        kind = rng.random() if step > MERGE_FANOUT**2 else 0.0  # in order only, until merges reached level 2
        if kind < 0.8 or prefix[gslot] == 0:
            first, rows = prefix[gslot], int(rng.integers(1, 3))
        elif kind < 0.9:  # encoded again (recomputed after preemption)
            first = int(rng.integers(0, prefix[gslot]))
            rows = int(rng.integers(1, prefix[gslot] - first + 1))
        else:  # ahead of the prefix, leaving a hole that in-order slices fill later
            first, rows = prefix[gslot] + int(rng.integers(1, 4)), 1
        part = chunk(first, rows, next_uid, rng)
        next_uid += rows
        expected = set()
        ends = np.cumsum(part.counts).tolist()
        for row, position in enumerate(part.positions.tolist()):
            if (gslot, position) in latest:
                expected.add(latest[(gslot, position)][0])
            features = part.features[ends[row] - int(part.counts[row]) : ends[row]].tolist()
            latest[(gslot, position)] = (int(part.uids[row]), features)
        replaced = state.add_chunk(gslot, part, pb.PHASE_PROMPT, step, None)
        assert set(replaced.tolist() if replaced is not None else []) == expected, step
        while any(g == gslot and p == prefix[gslot] for g, p in latest):
            prefix[gslot] += 1
    codes = state.latest_codes()
    for gslot in (0, 1):
        got = codes[gslot]
        rows = {
            int(p): got.features[got.row_offsets[i] : got.row_offsets[i + 1]].tolist()
            for i, p in enumerate(got.positions)
        }
        assert len(rows) == len(got.positions)  # each position once: its latest row
        assert rows == {p: features for (g, p), (_, features) in latest.items() if g == gslot}
