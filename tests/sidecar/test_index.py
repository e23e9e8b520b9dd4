"""The rolling index on its own: sealing, eviction by window and by memory budget, superseded rows."""

from __future__ import annotations

import numpy as np
import pytest

from circuitwatch.proto import circuitwatch_pb2 as pb
from circuitwatch.sidecar.index import FEATURE_BITS, RollingIndex, TimeWindow, group_by_term, term_code
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
    assert index.oldest_time is None
    add(index, 1, [[1, 2], [2], [3]])
    assert index.oldest_time == index.segments()[0].t_start == 10**18  # only the active segment holds codes
    clock.now += 2 * 10**9
    index.seal_due()
    for seq in range(2, 6):
        add(index, seq, [[1, 2], [2], [3]])
        clock.now += 2 * 10**9
        index.seal_due()
    add(index, 9, [[2]])
    assert len(index.sealed) == 5
    assert index.oldest_time == index.segments()[0].t_start == index.sealed[0].t_start
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
        index.seal_due()
    index.evict()
    assert {int(k >> np.uint64(32)) for s in index.segments() for k in s.row_keys[:1]} <= set(range(5, 11))
    assert index.evicted_segments >= 4

    budget = RollingIndex(window_s=1000, segment_s=1, memory_budget_bytes=3 * index.sealed[-1].nbytes, clock=clock)
    for seq in range(1, 11):
        add(budget, seq, [[seq % 4]] * 100)
        clock.now += 10**9
        budget.seal_due()
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
    index.seal_due()
    add(index, 1, [[8], [8]])
    index.supersede(old)
    assert index.term_keys([0], 7, 0.0, None, None).tolist() == []
    assert (index.term_keys([0], 8, 0.0, None, None) & np.uint64(0xFFFFFFFF)).tolist() == [0, 1]
    tokens, features, counts, _ = index.feature_stats([0], None, None)
    assert (tokens, features.tolist(), counts.tolist()) == (2, [8], [2])


PROMPT_END = 15


def test_every_lookup_equals_a_brute_force_recount() -> None:
    """Random rows over two SAEs, both phases, several segments (sealed and active), some rows superseded:
    term_keys (with thresholds, phases and time windows), universe, request_codes and feature_stats all equal a
    plain-Python recount of what was appended."""
    rng = np.random.default_rng(11)
    clock = Clock()
    index = RollingIndex(window_s=1000, segment_s=1, clock=clock)
    rows = []  # (key, gslot, phase, token, time, uid, {feature: activation})
    superseded: set[int] = set()
    for step in range(40):
        seq = int(rng.integers(1, 12))
        gslot = int(rng.integers(0, 2))
        first = int(rng.integers(0, 30))
        # a position's phase never changes (the prompt ends at position 15 in every request)
        phase = pb.PHASE_PROMPT if first < PROMPT_END else pb.PHASE_GENERATED
        length = int(rng.integers(1, 6 if first >= PROMPT_END else min(6, PROMPT_END - first + 1)))
        codes = [
            {int(f): float(np.float16(rng.uniform(0.1, 3))) for f in rng.choice(20, int(rng.integers(0, 4)), False)}
            for _ in range(length)
        ]
        positions = np.arange(first, first + len(codes))
        offsets = np.concatenate([[0], np.cumsum([len(c) for c in codes])]).astype(np.uint32)
        ids = np.array([f for c in codes for f in c], dtype=np.uint32)
        acts = np.array([a for c in codes for a in c.values()], dtype=np.float16)
        tokens = rng.integers(0, 100, len(codes)).astype(np.uint32)
        keys = token_keys(seq, positions)
        uids = index.append(keys, gslot, phase, tokens, offsets, ids, acts)
        for i, key in enumerate(keys.tolist()):
            earlier = [r for r in rows if r[0] == key and r[1] == gslot and r[5] not in superseded]
            superseded.update(r[5] for r in earlier)  # the same position encoded again: the old row goes
            index.supersede(np.array([r[5] for r in earlier], np.int64))
            rows.append((key, gslot, phase, int(tokens[i]), clock.now, int(uids[i]), codes[i]))
        if step % 7 == 6:
            clock.now += 2 * 10**9
            index.seal_due()  # what the maintenance thread does between steps
    assert len(index.sealed) >= 4 and index.segments()[-1] not in index.sealed  # sealed + active view
    live = [r for r in rows if r[5] not in superseded]
    times = sorted({r[4] for r in rows})
    windows = [None, TimeWindow(times[1], times[-2]), TimeWindow(times[0], times[0])]
    for window in windows:
        inside = [r for r in live if window is None or window.start <= r[4] <= window.end]
        for phase in (None, pb.PHASE_PROMPT, pb.PHASE_GENERATED):
            scoped = [r for r in inside if phase is None or r[2] == phase]
            assert index.universe(window, phase).tolist() == sorted({r[0] for r in scoped})
            for gslots in ([0], [1], [0, 1]):
                for feature in range(20):
                    for minimum in (0.0, 1.5):
                        expected = sorted({r[0] for r in scoped if r[1] in gslots and r[6].get(feature, -1) >= minimum})
                        got = index.term_keys(gslots, feature, minimum, window, phase)
                        assert got.tolist() == expected, (window, phase, gslots, feature, minimum)
                tokens, features, counts, sums = index.feature_stats(gslots, window, phase)
                mine = [r for r in scoped if r[1] in gslots]
                assert tokens == len(mine)
                expected_counts: dict[int, int] = {}
                expected_sums: dict[int, float] = {}
                for r in mine:
                    for f, a in r[6].items():
                        expected_counts[f] = expected_counts.get(f, 0) + 1
                        expected_sums[f] = expected_sums.get(f, 0.0) + a
                assert dict(zip(features.tolist(), counts.tolist(), strict=True)) == expected_counts
                assert np.allclose(sums, [expected_sums[f] for f in features.tolist()])
    for seq in range(1, 12):
        parts = index.request_codes(seq)
        got = {}
        for positions, gslots, phases, tokens, offsets, features, acts, _fidelity in parts:
            for i, position in enumerate(positions.tolist()):
                row = dict(
                    zip(
                        features[offsets[i] : offsets[i + 1]].tolist(),
                        acts[offsets[i] : offsets[i + 1]].astype(float).tolist(),
                        strict=True,
                    )
                )
                got[(int(gslots[i]), position)] = (int(phases[i]), int(tokens[i]), row)
        expected = {
            (r[1], int(r[0] & np.uint64(0xFFFFFFFF))): (r[2], r[3], r[6]) for r in live if r[0] >> np.uint64(32) == seq
        }
        assert got == expected, seq


def test_sorted_set_helpers_and_key_layout() -> None:
    from circuitwatch.sidecar.keys import (
        intersect_sorted,
        key_positions,
        key_requests,
        request_key_range,
        run_starts,
        sorted_unique,
        subtract_sorted,
    )

    rng = np.random.default_rng(5)
    for _ in range(50):
        a = sorted_unique(rng.integers(0, 60, int(rng.integers(0, 40))).astype(np.uint64))
        b = sorted_unique(rng.integers(0, 60, int(rng.integers(0, 40))).astype(np.uint64))
        assert a.tolist() == sorted(set(a.tolist()))
        assert intersect_sorted(a, b).tolist() == sorted(set(a.tolist()) & set(b.tolist()))
        assert subtract_sorted(a, b).tolist() == sorted(set(a.tolist()) - set(b.tolist()))
        values = np.sort(rng.integers(0, 5, int(rng.integers(0, 20))))
        assert run_starts(values).tolist() == [i for i in range(len(values)) if i == 0 or values[i] != values[i - 1]]
    keys = token_keys(np.array([3, 3, 70000]), np.array([0, 2**32 - 1, 5]))
    assert key_requests(keys).tolist() == [3, 3, 70000] and key_positions(keys).tolist() == [0, 2**32 - 1, 5]
    first, end = request_key_range(3)
    assert first <= keys[0] < keys[1] < end <= keys[2]


def test_windowed_evaluation_equals_brute_force_on_random_expressions() -> None:
    """The interval evaluation of token windows (expressions.evaluate_windowed) against the definition, key by
    key: a term holds at p when it fired in [p - W + 1, p] among existing tokens of p's request and scope."""
    from circuitwatch.sidecar.expressions import All, AnyOf, AtLeast, Not, Term, evaluate
    from circuitwatch.sidecar.keys import KeyRuns, token_keys

    rng = np.random.default_rng(7)

    class Source:
        def __init__(self, holes: bool) -> None:
            lengths = rng.integers(1, 60, size=12)
            self.all = np.concatenate([token_keys(seq, np.arange(n)) for seq, n in enumerate(lengths)])
            if holes:  # tokens missing inside requests (superseded rows, a time window cutting one)
                self.all = self.all[rng.random(len(self.all)) < 0.8]
            self.fired = {
                f: np.sort(rng.choice(self.all, size=int(rng.integers(0, min(40, len(self.all)))), replace=False))
                for f in range(6)
            }

        def term_keys(self, term: Term) -> np.ndarray:
            return self.fired[term.feature]

        def universe(self) -> np.ndarray:
            return self.all

        def universe_runs(self) -> KeyRuns:
            return KeyRuns.of(self.all)

    def expression(depth: int):
        if depth == 0 or rng.random() < 0.3:
            return Term(feature=int(rng.integers(0, 6)), layer=1)
        kind = rng.choice(["all", "any", "not", "at_least"])
        if kind == "not":
            return Not(expression(depth - 1))
        items = tuple(expression(depth - 1) for _ in range(int(rng.integers(1, 4))))
        if kind == "at_least":
            return AtLeast(int(rng.integers(1, len(items) + 1)), items)
        return All(items) if kind == "all" else AnyOf(items)

    def holds(node, key: int, source: Source, window: int) -> bool:
        if isinstance(node, Term):
            fired = set(source.fired[node.feature].tolist())
            return any(key - d in fired for d in range(window) if (key - d) >> 32 == key >> 32)
        if isinstance(node, Not):
            return not holds(node.item, key, source, window)
        hits = sum(holds(item, key, source, window) for item in node.items)
        needed = len(node.items) if isinstance(node, All) else node.n if isinstance(node, AtLeast) else 1
        return hits >= needed

    for case in range(300):
        source, expr, window = Source(holes=case % 2 == 1), expression(3), int(rng.integers(2, 12))
        expected = [int(k) for k in source.all.tolist() if holds(expr, int(k), source, window)]
        assert evaluate(expr, source, window).tolist() == expected, (case, expr, window)


@pytest.mark.parametrize(
    ("gslots", "max_feature"),
    [(2, 16383), (3, (1 << 20) - 1), (8, (1 << 20) - 1), (20, (1 << FEATURE_BITS) - 1)],
    ids=["one radix pass", "two passes, counted by id", "two passes, long span", "span past 2^32"],
)
def test_sealing_groups_postings_by_term_as_a_stable_sort_does(gslots: int, max_feature: int) -> None:
    """Sealing orders a segment's postings by term with radix passes over renumbered codes: the order, the terms
    and their extents equal a stable sort of the 64-bit codes, whatever SAEs and feature ids are present."""
    rng = np.random.default_rng(gslots)
    features = np.minimum(rng.zipf(1.2, 200_000), max_feature)
    features[:3] = (0, max_feature, max_feature // 2)
    posting_gslots = rng.integers(0, gslots, len(features)).astype(np.uint16)
    if gslots > 2:
        posting_gslots[posting_gslots == 1] = 0  # an SAE with no postings between those with some
    codes = term_code(posting_gslots, features)
    order, terms, offsets = group_by_term(posting_gslots, features.astype(np.uint32))
    expected = np.argsort(codes, kind="stable")
    assert np.array_equal(order, expected)
    present, counts = np.unique(codes, return_counts=True)
    assert np.array_equal(terms, present) and terms.dtype == np.uint64
    assert np.array_equal(offsets, np.concatenate(([0], np.cumsum(counts))))


def test_a_segment_whose_rows_have_no_codes_seals() -> None:
    clock = Clock()
    index = RollingIndex(window_s=100, segment_s=1, clock=clock)
    add(index, 1, [[], []])
    clock.now += 2 * 10**9
    index.seal_due()
    assert index.universe(None, None).tolist() == token_keys(1, np.arange(2)).tolist()
    assert index.term_keys([0], 7, 0.0, None, None).tolist() == []
