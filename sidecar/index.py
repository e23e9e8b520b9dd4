"""The rolling inverted index of codes over recent traffic.

Rows (one per token per SAE slot) and postings (one per code) are appended to an active segment and sealed
into immutable segments sorted by (gslot, feature, row), so a feature's postings are one contiguous slice
found by binary search. Segments older than the window, or beyond the memory budget, are evicted whole.
All work is numpy over whole arrays; nothing loops over postings in Python.

A position encoded twice (vLLM recomputes after preemption) supersedes its earlier row: the row's uid goes
into a roaring bitmap that lookups filter against, so queries see only the latest codes.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from pyroaring import BitMap64

from circuitwatch.proto import circuitwatch_pb2 as pb

from .keys import KEY_DTYPE, KeyRuns, concat_ranges, key_positions, request_key_range, run_starts, sorted_unique

FEATURE_BITS = 28
ROW_BITS = 24
MAX_SEGMENT_ROWS = 1 << ROW_BITS
DENSE_TERM_COUNTS = 1 << 22  # sealing counts postings per term in an array this long at most (32 MiB)
PHASE_PROMPT = pb.PHASE_PROMPT
PHASE_GENERATED = pb.PHASE_GENERATED


def term_code(gslot: int | np.ndarray, feature: int | np.ndarray) -> np.ndarray:
    return (np.asarray(gslot, dtype=np.uint64) << np.uint64(FEATURE_BITS)) | np.asarray(feature, dtype=np.uint64)


@dataclass
class TokenSegment:
    """Sealed, immutable; rows sorted by token key. Row uids are row_uid[row]."""

    base_uid: int
    t_start: int
    t_end: int
    row_keys: np.ndarray  # uint64 token keys
    row_gslot: np.ndarray  # uint16
    row_phase: np.ndarray  # uint8
    row_token: np.ndarray  # uint32 token id
    row_time: np.ndarray  # int64 ns
    row_uid: np.ndarray  # int64: rows were reordered by key, so uids are stored
    row_fidelity: np.ndarray  # float32 [rows, 2]: reconstruction error and input norm (NaN: not measured)
    term_codes: np.ndarray  # uint64 unique (gslot << 28 | feature), sorted
    term_offsets: np.ndarray  # int64 [terms + 1] into post_rows / post_acts
    post_rows: np.ndarray  # uint32 row index
    post_acts: np.ndarray  # float16
    _posting_terms: np.ndarray | None = field(default=None, repr=False)
    _unique_keys: dict[int | None, np.ndarray] = field(default_factory=dict, repr=False)

    @property
    def num_rows(self) -> int:
        return len(self.row_keys)

    @property
    def num_postings(self) -> int:
        return len(self.post_rows)

    @property
    def nbytes(self) -> int:
        arrays = (
            self.row_keys,
            self.row_gslot,
            self.row_phase,
            self.row_token,
            self.row_time,
            self.row_uid,
            self.row_fidelity,
            self.term_codes,
        )
        return sum(a.nbytes for a in arrays) + self.term_offsets.nbytes + self.post_rows.nbytes + self.post_acts.nbytes

    def unique_keys(self, phase: int | None) -> np.ndarray:
        """Sorted unique token keys (rows are in key order, so this is one pass), cached per phase."""
        if phase not in self._unique_keys:
            keys = self.row_keys if phase is None else self.row_keys[self.row_phase == phase]
            self._unique_keys[phase] = keys[run_starts(keys)]
        return self._unique_keys[phase]

    def posting_terms(self) -> np.ndarray:
        """Term index of every posting (lazily; only statistics need it)."""
        if self._posting_terms is None:
            self._posting_terms = np.repeat(np.arange(len(self.term_codes)), np.diff(self.term_offsets))
        return self._posting_terms


class ActiveSegment:
    """The segment codes are appended to: each batch's arrays kept as they came (a piece per batch), joined only
    when it is sealed or read."""

    def __init__(self, base_uid: int, now: int) -> None:
        self.base_uid = base_uid
        self.t_start = now
        self.t_end = now
        self.rows: list[tuple[np.ndarray, ...]] = []
        self.postings: list[tuple[np.ndarray, ...]] = []
        self.num_rows = 0
        self.num_postings = 0

    def snapshot(self) -> ActiveSegment:
        """What it holds now, as a copy that later appends do not change (taken under the index lock)."""
        copy = ActiveSegment(self.base_uid, self.t_start)
        copy.t_end, copy.num_rows, copy.num_postings = self.t_end, self.num_rows, self.num_postings
        copy.rows, copy.postings = list(self.rows), list(self.postings)
        return copy

    def pieces(self) -> list[list[np.ndarray]]:
        """Per array of SegmentParts (in its field order), the pieces the batches appended, in arrival order."""
        return [list(parts) for parts in zip(*self.rows, strict=True)] + [
            list(parts) for parts in zip(*self.postings, strict=True)
        ]

    def concatenated(self) -> SegmentParts:
        """Its rows and postings as contiguous arrays: what sealing reads."""
        if not self.rows:
            return SegmentParts.empty(self.base_uid, self.t_start, self.t_end)
        return SegmentParts(self.base_uid, self.t_start, self.t_end, *(np.concatenate(p) for p in self.pieces()))

    def seal(self) -> TokenSegment:
        return self.concatenated().seal()


@dataclass(frozen=True)
class SegmentParts:
    """An active segment's contents in arrival order, contiguous: sealing them is a pure function of these
    arrays, so it can run in another process (maintenance_worker.py) and give the same segment."""

    base_uid: int
    t_start: int
    t_end: int
    keys: np.ndarray  # uint64 [rows]
    gslot: np.ndarray  # uint16 [rows]
    phase: np.ndarray  # uint8 [rows]
    tokens: np.ndarray  # uint32 [rows]
    times: np.ndarray  # int64 [rows]
    fidelity: np.ndarray  # float32 [rows, 2]
    counts: np.ndarray  # int64 [rows]: codes per row, in row order in features / acts
    features: np.ndarray  # uint32 [postings]
    acts: np.ndarray  # float16 [postings]

    @classmethod
    def empty(cls, base_uid: int, t_start: int, t_end: int) -> SegmentParts:
        dtypes = (KEY_DTYPE, np.uint16, np.uint8, np.uint32, np.int64)
        keys, gslot, phase, tokens, times = (np.empty(0, d) for d in dtypes)
        fidelity = np.empty((0, 2), np.float32)
        counts, features, acts = np.empty(0, np.int64), np.empty(0, np.uint32), np.empty(0, np.float16)
        return cls(base_uid, t_start, t_end, keys, gslot, phase, tokens, times, fidelity, counts, features, acts)

    def seal(self) -> TokenSegment:
        """Rows in key order, postings grouped by term (zero rows give an empty segment)."""
        counts = self.counts
        # Rows in key order, so each term's rows (sorted below) give its keys already sorted.
        by_key = np.argsort(self.keys, kind="stable")
        gslot = self.gslot[by_key]
        # Postings arrived in row order: gather them in the new row order, then a stable sort by term leaves each
        # term's rows ascending.
        per_row = counts[by_key]
        in_row_order = concat_ranges((np.cumsum(counts) - counts)[by_key], per_row)
        by_term, term_codes, offsets = group_by_term(np.repeat(gslot, per_row), self.features[in_row_order])
        return TokenSegment(
            base_uid=self.base_uid,
            t_start=self.t_start,
            t_end=self.t_end,
            row_keys=self.keys[by_key],
            row_gslot=gslot,
            row_phase=self.phase[by_key],
            row_token=self.tokens[by_key],
            row_time=self.times[by_key],
            row_uid=self.base_uid + by_key.astype(np.int64),
            row_fidelity=self.fidelity[by_key],
            term_codes=term_codes,
            term_offsets=offsets,
            post_rows=np.repeat(np.arange(len(by_key), dtype=np.uint32), per_row)[by_term],
            post_acts=self.acts[in_row_order][by_term],
        )


def group_by_term(gslots: np.ndarray, features: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(the stable order that groups postings by term, the term codes present in ascending order, where each
    term's postings start in that order, plus the end), for postings given as their SAE (uint16) and feature
    (uint32). The terms present span a few SAEs' features, so they are renumbered densely (SAE rank, feature) in
    32 bits, ordered by radix sort, 16 bits a pass, and counted by id: a segment of millions of postings seals
    3x faster than by sorting 64-bit codes, and sealing shares the sidecar's one interpreter with ingest. Nothing
    here shifts 64-bit integers (numpy shifts them one element at a time: splitting 2M codes took 22-27 ms of a
    ~200 ms seal)."""
    if not len(features):  # rows without codes (an SAE that read nothing)
        return np.empty(0, np.int64), np.empty(0, np.uint64), np.zeros(1, np.int64)
    present_gslots = np.flatnonzero(np.bincount(gslots))
    rank = np.zeros(int(present_gslots[-1]) + 1, np.uint32)
    rank[present_gslots] = np.arange(len(present_gslots), dtype=np.uint32)
    width = int(features.max()) + 1
    span = len(present_gslots) * width
    if span > 1 << 32:  # not seen in practice: as many SAEs as 2^32 features
        codes = term_code(gslots, features)
        order = np.argsort(codes, kind="stable")
        ordered = codes[order]
        starts = run_starts(ordered)
        return order, ordered[starts], np.append(starts, len(codes))
    dense = rank[gslots] * np.uint32(width) + features.astype(np.uint32, copy=False)
    halves = dense.view(np.uint16)  # each id's two 16-bit halves, without a shift
    low, high = (halves[0::2], halves[1::2]) if sys.byteorder == "little" else (halves[1::2], halves[0::2])
    order = np.argsort(low if span > 1 << 16 else dense.astype(np.uint16), kind="stable")
    if span > 1 << 16:
        order = order[np.argsort(high[order], kind="stable")]
    if span > DENSE_TERM_COUNTS:
        ordered = dense[order]
        starts = run_starts(ordered)
        present = ordered[starts].astype(np.int64)
        offsets = np.append(starts, len(dense))
    else:
        counts = np.bincount(dense, minlength=span)
        present = np.flatnonzero(counts)
        offsets = np.concatenate(([0], np.cumsum(counts[present])))
    return order, term_code(present_gslots[present // width], present % width), offsets


@dataclass(frozen=True)
class TimeWindow:
    start: int  # ns, inclusive
    end: int  # ns, inclusive

    def covers(self, segment: TokenSegment) -> bool:
        return self.start <= segment.t_start and segment.t_end <= self.end

    def overlaps(self, segment: TokenSegment) -> bool:
        return segment.t_start <= self.end and self.start <= segment.t_end


class RollingIndex:
    """Every code of the recent window, searchable by (SAE, feature) and by request.

    Writes go to the active segment; readers get sealed segments plus a sealed view of the active one, so a
    query never sees half a write. Superseded rows (a position encoded again) are filtered on every read.
    """

    def __init__(
        self,
        window_s: float = 600.0,
        segment_s: float = 10.0,
        segment_max_postings: int = 2_000_000,
        memory_budget_bytes: float = 4 << 30,
        clock=time.time_ns,
    ) -> None:
        self.window_ns = int(window_s * 1e9)
        self.segment_ns = int(segment_s * 1e9)
        self.segment_max_postings = segment_max_postings
        self.memory_budget_bytes = memory_budget_bytes
        self.clock = clock
        self._lock = threading.RLock()
        self._next_uid = 0
        self.sealed: list[TokenSegment] = []
        self._active = ActiveSegment(0, clock())
        self._active_view: TokenSegment | None = None
        self._sealing: tuple[ActiveSegment, TokenSegment | None] | None = None  # swapped out, being sorted
        self.superseded = BitMap64()
        self._superseded_array = np.empty(0, np.int64)
        self.evicted_segments = 0
        self._universe_cache: tuple[tuple, np.ndarray] | None = None
        self._runs_cache: tuple[np.ndarray, KeyRuns] | None = None  # the cached universe and its runs

    # --- writing --------------------------------------------------------------------------------------

    def append(
        self,
        keys: np.ndarray,
        gslots: int | np.ndarray,
        phases: int | np.ndarray,
        token_ids: np.ndarray,
        row_offsets: np.ndarray,
        feature_ids: np.ndarray,
        activations: np.ndarray,
        fidelity: np.ndarray | None = None,
    ) -> np.ndarray:
        """Add rows (one per key) and their codes; returns the rows' uids. `gslots` and `phases` are per row
        (or one value for all); row i's codes are feature_ids[row_offsets[i] - row_offsets[0] :
        row_offsets[i + 1] - row_offsets[0]]. `fidelity` (float32 [rows, 2]: reconstruction error and input
        norm, NaN where not measured; None: nothing measured) is kept beside the rows for GetCodes; the caller's
        table is kept as it is (the core's chunks view the same one)."""
        with self._lock:
            now = self.clock()
            n = len(keys)
            self._maybe_seal(now, n)
            active = self._active
            first_row = active.num_rows
            row_gslots = np.broadcast_to(np.asarray(gslots, np.uint16), (n,))
            active.rows.append(
                (
                    np.asarray(keys, dtype=KEY_DTYPE),
                    np.array(row_gslots),
                    np.array(np.broadcast_to(np.asarray(phases, np.uint8), (n,))),
                    np.asarray(token_ids, np.uint32),
                    np.full(n, now, np.int64),
                    fidelity if fidelity is not None else np.full((n, 2), np.nan, np.float32),
                    _counts(np.asarray(row_offsets, np.int64)),  # codes per row: postings are in row order
                )
            )
            active.postings.append((np.asarray(feature_ids, np.uint32), np.asarray(activations, np.float16)))
            active.num_rows += n
            active.num_postings += len(feature_ids)
            active.t_end = now
            self._active_view = None
            uids = np.arange(active.base_uid + first_row, active.base_uid + first_row + n, dtype=np.int64)
            self._next_uid = active.base_uid + active.num_rows
            return uids

    def supersede(self, uids: np.ndarray) -> None:
        """Rows replaced by a later encoding of the same position."""
        if len(uids):
            with self._lock:
                self.superseded.update(uids.astype(np.uint64).tolist())
                self._superseded_array = np.asarray(self.superseded.to_array(), dtype=np.int64)

    def _maybe_seal(self, now: int, incoming_rows: int) -> None:
        """On the ingest path only when the active segment cannot take more rows (row ids are 24 bits) or has
        grown far past its size because maintenance is behind: sealing sorts, so it belongs to seal_due()."""
        active = self._active
        hard = (
            active.num_rows + incoming_rows >= MAX_SEGMENT_ROWS or active.num_postings >= 4 * self.segment_max_postings
        )
        if hard and active.num_rows:
            self.sealed.append(active.seal())
            self._active = ActiveSegment(active.base_uid + active.num_rows, now)
            self._active_view = None
            self.evict(now)

    def seal_due(
        self, now: int | None = None, seal: Callable[[ActiveSegment], TokenSegment] = ActiveSegment.seal
    ) -> bool:
        """Seal the active segment once it is old (segment_s) or large (segment_max_postings); the maintenance
        thread calls this. The segment is swapped out under the lock and sorted outside it, so ingest never
        waits for the sort; queries meanwhile read it as they read the active segment. `seal` does the sorting
        (here by default; the maintenance worker passes its own)."""
        with self._lock:
            now = self.clock() if now is None else now
            active = self._active
            due = active.num_postings >= self.segment_max_postings or now - active.t_start >= self.segment_ns
            if not active.num_rows or not due or self._sealing is not None:
                return False
            self._active = ActiveSegment(active.base_uid + active.num_rows, now)
            self._active_view = None
            self._sealing = (active, None)
        segment = seal(active)
        with self._lock:
            self.sealed.append(segment)
            self._sealing = None
        self.evict(now)  # a new segment may take the index over its budget
        return True

    def seal(self) -> None:
        """Seal whatever the active segment holds, now (tests and benches)."""
        with self._lock:
            self._maybe_seal(self.clock(), MAX_SEGMENT_ROWS)

    def evict(self, now: int | None = None) -> None:
        """Drop segments past the window, then the oldest while over the memory budget."""
        with self._lock:
            now = self.clock() if now is None else now
            cutoff = now - self.window_ns
            keep = [s for s in self.sealed if s.t_end >= cutoff]
            while keep and sum(s.nbytes for s in keep) > self.memory_budget_bytes:
                keep.pop(0)
            self.evicted_segments += len(self.sealed) - len(keep)
            if len(keep) != len(self.sealed):
                self.sealed = keep
                if keep and len(self.superseded):
                    self.superseded.remove_range(0, keep[0].base_uid)
                    self._superseded_array = np.asarray(self.superseded.to_array(), dtype=np.int64)

    # --- reading --------------------------------------------------------------------------------------

    def segments(self, window: TimeWindow | None = None) -> list[TokenSegment]:
        """Sealed segments, then the one being sealed and the active one as read-only views (built outside
        the lock from a snapshot of what they held, and cached until they change)."""
        with self._lock:
            sealed = list(self.sealed)
            pending = []
            if self._sealing is not None:
                pending.append(("sealing", self._sealing[0], self._sealing[1]))
            if self._active.num_rows:
                pending.append(("active", self._active, self._active_view))
            snapshots = [(kind, seg.snapshot(), view) for kind, seg, view in pending]
        views = []
        for kind, snapshot, view in snapshots:
            if view is None or view.num_rows != snapshot.num_rows:
                view = snapshot.seal()
                with self._lock:
                    if kind == "active" and self._active.num_rows == snapshot.num_rows:
                        self._active_view = view
                    elif kind == "sealing" and self._sealing is not None and self._sealing[0].base_uid == view.base_uid:
                        self._sealing = (self._sealing[0], view)
            views.append(view)
        return [s for s in sealed + views if window is None or window.overlaps(s)]

    @property
    def oldest_time(self) -> int | None:
        """Start of the oldest segment, read from the segments' bounds: building the active segment's view just
        for its start time sorted every code since the last seal, under the core lock, on every maintenance tick."""
        with self._lock:
            if self.sealed:
                return self.sealed[0].t_start
            if self._sealing is not None:
                return self._sealing[0].t_start
            return self._active.t_start if self._active.num_rows else None

    def stats(self) -> dict[str, int]:
        segments = self.segments()
        return {
            "segments": len(segments),
            "rows": sum(s.num_rows for s in segments),
            "postings": sum(s.num_postings for s in segments),
            "bytes": sum(s.nbytes for s in segments),
            "evicted_segments": self.evicted_segments,
        }

    def _keeps_every_row(self, segment: TokenSegment, window: TimeWindow | None, phase: int | None) -> bool:
        """Whether _row_mask would keep every row of the segment (then the mask is not built)."""
        return (window is None or window.covers(segment)) and phase is None and not len(self._superseded_array)

    def _row_mask(self, segment: TokenSegment, rows: np.ndarray, window: TimeWindow | None, phase: int | None):
        mask = np.ones(len(rows), dtype=bool)
        if window is not None and not window.covers(segment):
            times = segment.row_time[rows]
            mask &= (times >= window.start) & (times <= window.end)
        if phase is not None:
            mask &= segment.row_phase[rows] == phase
        superseded = self._superseded_array
        if len(superseded):
            mask &= ~np.isin(segment.row_uid[rows], superseded)
        return mask

    def term_keys(
        self, gslots: list[int], feature: int, min_activation: float, window: TimeWindow | None, phase: int | None
    ) -> np.ndarray:
        """Sorted unique keys of tokens where `feature` fired with activation >= min_activation."""
        parts = []
        for segment in self.segments(window):
            for gslot in gslots:
                code = term_code(gslot, feature)
                i = int(np.searchsorted(segment.term_codes, code))
                if i == len(segment.term_codes) or segment.term_codes[i] != code:
                    continue
                a, b = segment.term_offsets[i], segment.term_offsets[i + 1]
                rows = segment.post_rows[a:b]
                keep = segment.post_acts[a:b] >= np.float16(min_activation) if min_activation > 0 else None
                if keep is not None:
                    rows = rows[keep]
                if not self._keeps_every_row(segment, window, phase):
                    rows = rows[self._row_mask(segment, rows, window, phase)]
                parts.append(segment.row_keys[rows])
        return sorted_unique(np.concatenate(parts)) if parts else np.empty(0, KEY_DTYPE)

    def universe(self, window: TimeWindow | None, phase: int | None) -> np.ndarray:
        """Sorted unique keys of every token in the window (for `not` and windowed co-occurrence).

        Segments wholly inside the window with no superseded row contribute their cached key lists; the merged
        result is cached until the segments or the superseded rows change, so repeated queries between seals pay
        for it once.
        """
        segments = self.segments(window)
        superseded = self._superseded_array
        whole = all(window is None or window.covers(s) for s in segments)
        cache_key = (tuple(id(s) for s in segments), phase, len(superseded))
        cached = self._universe_cache
        if whole and cached is not None and cached[0] == cache_key:
            return cached[1]
        parts = []
        for segment in segments:
            if (window is None or window.covers(segment)) and not _has_uid_in(superseded, segment):
                parts.append(segment.unique_keys(phase))
            else:
                rows = np.arange(segment.num_rows, dtype=np.uint32)
                parts.append(segment.row_keys[self._row_mask(segment, rows, window, phase)])
        result = sorted_unique(np.concatenate(parts)) if parts else np.empty(0, KEY_DTYPE)
        if whole:
            self._universe_cache = (cache_key, result)
        return result

    def universe_runs(self, window: TimeWindow | None, phase: int | None) -> KeyRuns:
        """The universe's runs of consecutive keys (what windowed queries cut their answers with), kept while the
        universe itself is cached."""
        universe = self.universe(window, phase)
        cached = self._runs_cache
        if cached is not None and cached[0] is universe:
            return cached[1]
        runs = KeyRuns.of(universe)
        cache = self._universe_cache
        if cache is not None and cache[1] is universe:
            self._runs_cache = (universe, runs)
        return runs

    def request_codes(self, seq: int) -> list[tuple[np.ndarray, ...]]:
        """Per segment, (positions, gslot, phase, token, row_offsets, features, activations, fidelity) of one
        request, rows ordered by (gslot, position), superseded rows left out."""
        lo_key, hi_key = request_key_range(seq)
        out = []
        for segment in self.segments():
            lo, hi = np.searchsorted(segment.row_keys, [lo_key, hi_key])
            if lo == hi:
                continue
            rows = np.arange(lo, hi, dtype=np.uint32)
            rows = rows[self._row_mask(segment, rows, None, None)]
            in_request = (segment.post_rows >= lo) & (segment.post_rows < hi)
            post_rows = segment.post_rows[in_request]
            keep = np.isin(post_rows, rows)
            post_rows = post_rows[keep]
            features = segment.term_codes[segment.posting_terms()[in_request][keep]] & np.uint64(
                (1 << FEATURE_BITS) - 1
            )
            acts = segment.post_acts[in_request][keep]
            # rows by (gslot, key); postings grouped by row
            order = np.lexsort((segment.row_keys[rows], segment.row_gslot[rows]))
            rows = rows[order]
            rank = np.empty(hi - lo, np.int64)
            rank[rows - lo] = np.arange(len(rows))
            by_row = np.argsort(rank[post_rows - lo], kind="stable")
            counts = np.bincount(rank[post_rows - lo], minlength=len(rows))
            offsets = np.concatenate(([0], np.cumsum(counts))).astype(np.uint32)
            positions = key_positions(segment.row_keys[rows])
            out.append(
                (
                    positions,
                    segment.row_gslot[rows],
                    segment.row_phase[rows],
                    segment.row_token[rows],
                    offsets,
                    features[by_row].astype(np.uint32),
                    acts[by_row],
                    segment.row_fidelity[rows],
                )
            )
        return out

    def feature_stats(
        self, gslots: list[int], window: TimeWindow | None, phase: int | None
    ) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
        """(tokens, features, firing token counts, activation sums) for one SAE over the window."""
        tokens = 0
        features_all, counts_all, sums_all = [], [], []
        for segment in self.segments(window):
            rows = np.arange(segment.num_rows, dtype=np.uint32)
            row_ok = self._row_mask(segment, rows, window, phase) & np.isin(segment.row_gslot, np.asarray(gslots))
            tokens += int(row_ok.sum())
            for gslot in gslots:
                lo = int(np.searchsorted(segment.term_codes, term_code(gslot, 0)))
                hi = int(np.searchsorted(segment.term_codes, term_code(gslot + 1, 0)))
                if lo == hi:
                    continue
                a, b = segment.term_offsets[lo], segment.term_offsets[hi]
                keep = row_ok[segment.post_rows[a:b]]
                term_of_posting = segment.posting_terms()[a:b][keep] - lo
                acts = segment.post_acts[a:b][keep].astype(np.float64)
                features = (segment.term_codes[lo:hi] & np.uint64((1 << FEATURE_BITS) - 1)).astype(np.int64)
                features_all.append(features)
                counts_all.append(np.bincount(term_of_posting, minlength=hi - lo))
                sums_all.append(np.bincount(term_of_posting, weights=acts, minlength=hi - lo))
        if not features_all:
            return tokens, np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0)
        features = np.concatenate(features_all)
        unique, inverse = np.unique(features, return_inverse=True)
        counts = np.bincount(inverse, weights=np.concatenate(counts_all)).astype(np.int64)
        sums = np.bincount(inverse, weights=np.concatenate(sums_all))
        fired = counts > 0
        return tokens, unique[fired], counts[fired], sums[fired]


def _counts(offsets: np.ndarray) -> np.ndarray:
    """Codes per row from [rows + 1] offsets (np.diff costs several times this on a decode step's few rows)."""
    return offsets[1:] - offsets[:-1]


def _has_uid_in(sorted_uids: np.ndarray, segment: TokenSegment) -> bool:
    """Whether any of the sorted uids belongs to a row of the segment (its uids are one contiguous range)."""
    lo, hi = np.searchsorted(sorted_uids, [segment.base_uid, segment.base_uid + segment.num_rows])
    return bool(hi > lo)
