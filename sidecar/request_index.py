"""The request-level index behind circuit identification: which finished requests carry which feature.

A contrast query counts, for every feature, the requests of one set and of another that carry it. Token
postings are far too many to count per query (tens of millions in a 10-minute window), so each request is
reduced to its feature sets (request_sets.py), per code mode and scope, once final: by the maintenance
thread, or by the next query, never on the ingest path. Requests are sealed 256 at a time into segments that
hold, per feature, four uint64 words: bit j of word b says request first + 64 * b + j carries it. Counting
every feature over any request set is then AND + popcount over contiguous arrays and one scatter-add per
segment; one feature's requests are one column. Requests finalised since the last seal wait in a short
pending tail that queries read request by request.

Request numbers ("ridx") are dense, in finalisation order.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from pyroaring import BitMap

from circuitwatch.proto import circuitwatch_pb2 as pb

from .request_sets import (
    BOTH_BIT,
    BOTH_IS_UNION,
    GENERATED_BIT,
    MODES,
    PROMPT_BIT,
    FeatureSet,
    FeatureSetsOf,
    Reduction,
    feature_sets_here,
    scope_bits,
)

BLOCK = 64
SEGMENT_REQUESTS = 256  # requests per sealed segment, a multiple of BLOCK
WORDS = SEGMENT_REQUESTS // BLOCK
BUILD_YIELD_EVERY = 16  # requests between the segment build's yields to ingest
REDUCE_CHUNK = 16  # requests reduced together (one message to the maintenance worker)


def segment_words(sets: list[FeatureSet], both_is_union: bool) -> tuple[np.ndarray, np.ndarray]:
    """A run of requests' unique terms (int64, sorted) and their words [columns, WORDS, terms]: a pure function of
    the sets, so the maintenance worker can compute it.

    In process it runs on the maintenance thread beside ingest: request by request, each step a short numpy call,
    with a yield every BUILD_YIELD_EVERY requests (without the yields a Python loop holds the interpreter for whole
    switch intervals). One dense [terms x requests] matrix and its packbits took 1.5-1.7x as long, and a thread
    beside it was late by p99 1.5-1.9 ms against 0.3 ms now."""
    columns = (PROMPT_BIT, GENERATED_BIT) if both_is_union else (PROMPT_BIT, GENERATED_BIT, BOTH_BIT)
    terms = np.concatenate([s.terms for s in sets] or [np.empty(0, np.uint32)])
    seen = np.zeros(int(terms.max()) + 1 if len(terms) else 0, dtype=bool)
    seen[terms] = True
    unique = np.flatnonzero(seen)
    rank = np.cumsum(seen, dtype=np.int64) - 1  # a term id's column among the unique ones
    words = np.zeros((len(columns), WORDS, len(unique)), dtype=np.uint64)
    for local, feature_set in enumerate(sets):
        if len(feature_set.terms):
            at = rank[feature_set.terms]
            bit = np.uint64(1 << (local % BLOCK))
            block = words[:, local // BLOCK]
            for c, scope_bit in enumerate(columns):  # a request's terms are unique: |= sets distinct bits
                block[c, at[(feature_set.scopes & scope_bit) != 0]] |= bit
        if local % BUILD_YIELD_EVERY == BUILD_YIELD_EVERY - 1:
            time.sleep(0)
    return unique.astype(np.int64), words


SegmentWordsOf = Callable[[list[FeatureSet], bool], tuple[np.ndarray, np.ndarray]]


@dataclass(frozen=True)
class RequestSegment:
    """Sealed and immutable: SEGMENT_REQUESTS consecutive requests of one code mode, feature-major.

    words[column, block, i] has bit j set when request first_ridx + 64 * block + j carries feature terms[i];
    columns are the scopes (prompt, generated[, both]). One row of words per feature keeps every count a
    few contiguous AND + popcount passes, with no gather and no segmented sum.
    """

    first_ridx: int
    num_requests: int
    newest_ns: int
    terms: np.ndarray  # int64 unique, sorted (int64: numpy scatters fastest with native indices)
    words: np.ndarray  # uint64 [columns, WORDS, terms]

    @property
    def nbytes(self) -> int:
        return self.terms.nbytes + self.words.nbytes

    def scope_words(self, scope: int) -> np.ndarray:
        """[WORDS, terms] for one scope."""
        if scope == pb.SCOPE_PROMPT:
            return self.words[0]
        if scope == pb.SCOPE_GENERATED:
            return self.words[1]
        return self.words[2] if len(self.words) == 3 else self.words[0] | self.words[1]

    @classmethod
    def build(
        cls,
        first_ridx: int,
        sets: list[FeatureSet],
        newest_ns: int,
        both_is_union: bool,
        words_of: SegmentWordsOf = segment_words,
    ) -> RequestSegment:
        """`words_of`: where the words are computed (in process by default; the maintenance worker passes its
        own)."""
        terms, words = words_of(sets, both_is_union)
        return cls(first_ridx, len(sets), newest_ns, terms, words)


@dataclass
class _Channel:
    """One code mode: sealed segments plus the pending tail (ridx -> feature set) not sealed yet."""

    segments: list[RequestSegment] = field(default_factory=list)
    pending: dict[int, FeatureSet] = field(default_factory=dict)


def counts_as_complete(report: pb.Report) -> bool:
    """A contrast's "incomplete" counts exclude these: every position seen (a low-fidelity read is complete)."""
    return report.status == pb.REPORT_STATUS_COMPLETE or (
        report.status == pb.REPORT_STATUS_LOW_FIDELITY and not report.coverage.gaps
    )


@dataclass(frozen=True)
class RequestMeta:
    request_id: str
    arrival_ns: int
    finalized_ns: int
    complete: bool
    model: str = ""


class RequestIndex:
    """Feature sets of finished requests over the window, with labels and flags for selecting them.

    Writes (add, relabel, seal, evict) run under the caller's lock; seal() builds segments outside it from
    immutable feature sets, so queries keep seeing every request while a segment is being built.
    """

    def __init__(self, window_ns: int, budget_bytes: int = 1 << 30) -> None:
        self.window_ns = window_ns
        self.budget_bytes = budget_bytes
        self.evicted_for_budget = 0  # requests that left before the window ended
        self.channels = {mode: _Channel() for mode in MODES}
        self.labels: dict[str, BitMap] = {}
        self.flags: dict[str, BitMap] = {}
        self.models: dict[str, BitMap] = {}
        self.next_ridx = 0
        self.first_ridx = 0  # every ridx below it is evicted
        self.first_sealable_ridx = 0  # every ridx below it is in a segment (or evicted)
        # per-request columns, indexed by ridx - first_ridx
        self._ids: list[str] = []
        self._ridx_by_id: dict[str, int] = {}
        self._arrival: list[int] = []
        self._finalized: list[int] = []
        self._complete: list[bool] = []
        self.reduced_until = 0  # every ridx below it has its feature sets
        self._unreduced: list[tuple[int, Reduction]] = []
        self._seal_lock = threading.Lock()
        self._reduce_lock = threading.Lock()

    # --- writes ---------------------------------------------------------------------------------------

    def add(
        self,
        meta: RequestMeta,
        reduction: Reduction,
        labels: tuple[str, ...],
        flags: list[str],
    ) -> int:
        """Number a final request; its feature sets are computed later (reduce()), off the ingest path."""
        ridx = self.next_ridx
        self.next_ridx += 1
        self._ids.append(meta.request_id)
        self._ridx_by_id[meta.request_id] = ridx
        self._arrival.append(meta.arrival_ns)
        self._finalized.append(meta.finalized_ns)
        self._complete.append(meta.complete)
        self._unreduced.append((ridx, reduction))
        for label in labels:
            self.labels.setdefault(label, BitMap()).add(ridx)
        for circuit in flags:
            self.flags.setdefault(circuit, BitMap()).add(ridx)
        self.models.setdefault(meta.model, BitMap()).add(ridx)
        return ridx

    def relabel(self, ridx: int, add: list[str], remove: list[str]) -> None:
        for label in add:
            self.labels.setdefault(label, BitMap()).add(ridx)
        for label in remove:
            if label in self.labels:
                self.labels[label].discard(ridx)

    def reduce(self, lock: threading.Lock | threading.RLock, compute: FeatureSetsOf = feature_sets_here) -> int:
        """Compute the feature sets of every request numbered so far (outside `lock`, installed under it), by
        `compute`, REDUCE_CHUNK requests at a time; returns how many. Queries call it first, so they never miss a
        request that was final before them."""
        with self._reduce_lock:
            with lock:
                batch = list(self._unreduced)
            if not batch:
                return 0
            reduced = []
            for start in range(0, len(batch), REDUCE_CHUNK):
                part = batch[start : start + REDUCE_CHUNK]
                inputs = []
                for _, reduction in part:
                    inputs.append((reduction.codes(), reduction.num_prompt, reduction.bases))
                    time.sleep(0)  # let ingest in between: this runs beside the GIL's owner
                for (ridx, reduction), (codes, _, _), sets in zip(part, inputs, compute(inputs), strict=True):
                    if reduction.reduced is not None:
                        reduction.reduced(sets, codes)
                    reduced.append((ridx, sets))
            with lock:
                for ridx, sets in reduced:
                    for mode, channel in self.channels.items():
                        channel.pending[ridx] = sets.get(mode, FeatureSet.empty())
                del self._unreduced[: len(batch)]
                self.reduced_until = batch[-1][0] + 1
            return len(batch)

    def seal(
        self,
        lock: threading.Lock | threading.RLock,
        compute: FeatureSetsOf = feature_sets_here,
        words_of: SegmentWordsOf = segment_words,
    ) -> int:
        """Reduce (by `compute`), then seal full runs of SEGMENT_REQUESTS pending requests into segments (their
        words by `words_of`); returns how many were sealed.

        Builds outside `lock` (the core's) and swaps the segment in under it. Segments always start at a
        multiple of SEGMENT_REQUESTS, which keeps every request's block and bit fixed."""
        self.reduce(lock, compute)
        sealed = 0
        with self._seal_lock:
            while True:
                with lock:
                    start = self.first_sealable_ridx
                    end = start + SEGMENT_REQUESTS
                    if self.reduced_until < end:
                        return sealed
                    batch = {mode: [c.pending[r] for r in range(start, end)] for mode, c in self.channels.items()}
                    newest = max(self._finalized[start - self.first_ridx : end - self.first_ridx])
                built = {
                    mode: RequestSegment.build(start, sets, newest, BOTH_IS_UNION[mode], words_of)
                    for mode, sets in batch.items()
                }
                with lock:
                    for mode, channel in self.channels.items():
                        channel.segments.append(built[mode])
                        for r in range(start, end):
                            del channel.pending[r]
                    self.first_sealable_ridx = end
                sealed += end - start

    def evict(self, now_ns: int) -> int:
        """Drop segments whose requests all finished before the window, and the oldest ones past the memory
        budget; forget their columns and labels. Returns how many requests left for the budget."""
        horizon = now_ns - self.window_ns
        segments = self.channels[pb.CODE_MODE_CODES].segments
        expired = 0  # segments are in finalisation order: the expired ones are a prefix
        while expired < len(segments) and segments[expired].newest_ns < horizon:
            expired += 1
        over_budget = 0
        nbytes = sum(s.nbytes for c in self.channels.values() for s in c.segments[expired:])
        while expired + over_budget < len(segments) - 1 and nbytes > self.budget_bytes:  # the newest stays
            nbytes -= sum(c.segments[expired + over_budget].nbytes for c in self.channels.values())
            over_budget += 1
        for channel in self.channels.values():
            del channel.segments[: expired + over_budget]
        early = over_budget * SEGMENT_REQUESTS
        self.evicted_for_budget += early
        first = segments[0].first_ridx if segments else self.first_sealable_ridx
        if first <= self.first_ridx:
            return early
        drop = first - self.first_ridx
        for request_id in self._ids[:drop]:
            self._ridx_by_id.pop(request_id, None)
        for column in (self._ids, self._arrival, self._finalized, self._complete):
            del column[:drop]
        for bitmaps in (self.labels, self.flags, self.models):
            for name in list(bitmaps):
                bitmaps[name].remove_range(0, first)
                if not bitmaps[name]:
                    del bitmaps[name]
        self.first_ridx = first
        return early

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for c in self.channels.values() for s in c.segments)

    def view(self) -> IndexView:
        """A consistent read-only copy for one query (call under the writers' lock; it is cheap: sealed
        segments are shared, only the pending tail, columns and bitmaps are copied)."""
        return IndexView(
            window_ns=self.window_ns,
            first_ridx=self.first_ridx,
            next_ridx=self.next_ridx,
            first_sealable_ridx=self.first_sealable_ridx,
            reduced_until=self.reduced_until,
            segments={mode: tuple(c.segments) for mode, c in self.channels.items()},
            pending={mode: dict(c.pending) for mode, c in self.channels.items()},
            ids=list(self._ids),
            ridx_by_id=dict(self._ridx_by_id),
            arrival=np.array(self._arrival, dtype=np.int64),
            finalized=np.array(self._finalized, dtype=np.int64),
            complete=np.array(self._complete, dtype=bool),
            labels={k: BitMap(v) for k, v in self.labels.items()},
            flags={k: BitMap(v) for k, v in self.flags.items()},
            models={k: BitMap(v) for k, v in self.models.items()},
        )


@dataclass(frozen=True)
class IndexView:
    """What one query reads: immutable segments plus copies of everything writers change. Per-request
    columns are indexed by ridx - first_ridx."""

    window_ns: int
    first_ridx: int
    next_ridx: int
    first_sealable_ridx: int
    reduced_until: int
    segments: dict[int, tuple[RequestSegment, ...]]
    pending: dict[int, dict[int, FeatureSet]]
    ids: list[str]
    ridx_by_id: dict[str, int]
    arrival: np.ndarray
    finalized: np.ndarray
    complete: np.ndarray
    labels: dict[str, BitMap]
    flags: dict[str, BitMap]
    models: dict[str, BitMap]

    def request_id(self, ridx: int) -> str:
        return self.ids[ridx - self.first_ridx]

    def live(self, now_ns: int, start_ns: int = 0, end_ns: int = 0) -> np.ndarray:
        """Sorted ridx of requests inside the window (finalised within window_ns) that arrived in
        [start_ns, end_ns] (end 0: now)."""
        inside = (self.finalized >= now_ns - self.window_ns) & (self.arrival >= start_ns)
        inside &= self.arrival <= (end_ns or now_ns)
        inside[max(0, self.reduced_until - self.first_ridx) :] = False  # final after the query began: not counted
        return np.flatnonzero(inside) + self.first_ridx

    def support(self, mode: int, scope: int, sides: list[np.ndarray], num_terms: int) -> list[np.ndarray]:
        """For each side (sorted unique ridx), how many of its requests carry each term: int64 [num_terms]."""
        counts = [np.zeros(num_terms, np.int64) for _ in sides]
        lo = self.word_base
        side_words = [self.side_words(side) for side in sides]
        for segment in self.segments[mode]:
            first_word = (segment.first_ridx - lo) // BLOCK
            masks = [w[first_word : first_word + WORDS] for w in side_words]
            if not len(segment.terms) or not any(m.any() for m in masks):
                continue
            words = segment.scope_words(scope)
            for count, mask in zip(counts, masks, strict=True):
                hits = None
                for block in np.flatnonzero(mask).tolist():
                    carried = np.bitwise_count(words[block] & mask[block])
                    hits = carried.astype(np.uint16) if hits is None else hits + carried
                if hits is not None:
                    count[segment.terms] += hits
        bit = scope_bits(scope, mode)
        pending = self.pending[mode]
        for count, side in zip(counts, sides, strict=True):
            found = [pending.get(r) for r in side[side >= self.first_sealable_ridx].tolist()]
            terms = [f.terms[f.scopes & bit != 0] for f in found if f is not None]
            if terms:
                count += np.bincount(np.concatenate(terms), minlength=num_terms)
        return counts

    @property
    def word_base(self) -> int:
        """ridx of bit 0 of word 0 in side_words / term_words (segments start at multiples of it)."""
        return self.first_ridx // SEGMENT_REQUESTS * SEGMENT_REQUESTS

    def side_words(self, ridx: np.ndarray) -> np.ndarray:
        """A request set as uint64 words over [word_base, next_ridx)."""
        return _bit_words(ridx - self.word_base, max(self.next_ridx - self.word_base, 1))

    def term_words(self, mode: int, scope: int, terms: np.ndarray) -> np.ndarray:
        """uint64 [len(terms), words]: which requests carry each term, as words over [word_base, next_ridx)."""
        base = self.word_base
        span_words = -(-max(self.next_ridx - base, 1) // BLOCK)
        out = np.zeros((len(terms), span_words), dtype=np.uint64)
        terms = np.asarray(terms, dtype=np.int64)
        if not len(terms):
            return out
        for segment in self.segments[mode]:
            known = segment.terms
            if not len(known):
                continue
            at = np.minimum(np.searchsorted(known, terms), len(known) - 1)
            found = np.flatnonzero(known[at] == terms)
            first_word = (segment.first_ridx - base) // BLOCK
            out[found, first_word : first_word + WORDS] = segment.scope_words(scope)[:, at[found]].T
        bit = scope_bits(scope, mode)
        flags = np.zeros((len(terms), span_words * BLOCK), dtype=bool)
        for ridx, found in self.pending[mode].items():
            if len(found.terms):
                at = np.minimum(np.searchsorted(found.terms, terms), len(found.terms) - 1)
                flags[:, ridx - base] = (found.terms[at] == terms) & (found.scopes[at] & bit != 0)
        pending_words = np.packbits(flags, axis=1, bitorder="little").view("<u8").astype(np.uint64)
        return out | pending_words

    def presence(self, mode: int, scope: int, terms: np.ndarray, ridx: np.ndarray) -> np.ndarray:
        """bool [len(terms), len(ridx)]: does request ridx[j] carry term terms[i]?"""
        words = self.term_words(mode, scope, terms)
        bits = np.unpackbits(words.view(np.uint8), axis=1, bitorder="little").astype(bool)
        return bits[:, ridx - self.word_base]


def _bit_words(offsets: np.ndarray, span: int) -> np.ndarray:
    """uint64 words with bit (offset % 64) of word (offset // 64) set for each offset."""
    flags = np.zeros(-(-span // BLOCK) * BLOCK, dtype=bool)
    flags[offsets] = True
    return np.packbits(flags, bitorder="little").view("<u8").astype(np.uint64)
