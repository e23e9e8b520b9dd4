"""One open request inside the sidecar: its codes as they arrive, and the circuit terms matched incrementally,
so that evaluating a circuit at finish (reports.py) or for an action touches only the hits, not every code.

Codes are kept as chunks: views into the decoded batch arrays they arrived in (no copy per slice), concatenated
once when the request is final.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from circuitwatch.proto import circuitwatch_pb2 as pb

from .circuits import Circuit, CircuitSet
from .expressions import All, AnyOf, AtLeast, Expr, Not, Term, evaluate, evaluate_dense
from .keys import KEY_DTYPE, KeyRuns, key_positions, token_keys
from .registry import SaeRegistry
from .request_sets import SlotCodes

GENERATED = pb.PHASE_GENERATED
DENSE_POSITIONS = 1 << 16  # requests up to this many positions evaluate circuits on dense position masks
FLAT_BATCH_CELLS = 1 << 22  # flat circuits are counted together in batches of at most this many (circuit, position)
MERGE_FANOUT = 16  # chunks of one level merge into one of the next: few objects, each row copied log16(n) times
_NONE = np.empty(0, np.int64)


@dataclass(slots=True)  # not frozen (never changed all the same): one is made per slice, and frozen costs 3x
class Chunk:
    """The rows of one slice in one SAE slot, with the uids the index gave them (arrays are views). The per-row
    fields are the columns of one table, so a slice is three or four views and merging chunks is one
    concatenation per table: this runs per request and slot every engine step, so it is the ingest path."""

    rows: np.ndarray  # int64 [rows, 4]: position, uid, token id, codes in the row (in order in features / acts)
    features: np.ndarray  # uint32 [nnz]
    acts: np.ndarray  # float16 [nnz]
    level: int = 0  # how many times chunks were merged into it
    fidelity: np.ndarray | None = None  # float32 [rows, 2]: reconstruction error, input norm (NaN: not measured)

    @classmethod
    def of(
        cls,
        positions: np.ndarray,
        uids: np.ndarray,
        tokens: np.ndarray,
        counts: np.ndarray,
        features: np.ndarray,
        acts: np.ndarray,
        errors: np.ndarray | None = None,
        norms: np.ndarray | None = None,
    ) -> Chunk:
        fidelity = None if errors is None else np.stack((errors, norms), axis=1, dtype=np.float32)
        return cls(row_table(positions, uids, tokens, counts), features, acts, fidelity=fidelity)

    @property
    def positions(self) -> np.ndarray:
        return self.rows[:, 0]

    @property
    def uids(self) -> np.ndarray:
        return self.rows[:, 1]

    @property
    def tokens(self) -> np.ndarray:
        return self.rows[:, 2]

    @property
    def counts(self) -> np.ndarray:
        return self.rows[:, 3]

    @property
    def errors(self) -> np.ndarray | None:
        return None if self.fidelity is None else self.fidelity[:, 0]

    @property
    def norms(self) -> np.ndarray | None:
        return None if self.fidelity is None else self.fidelity[:, 1]


def row_table(positions: np.ndarray, uids: np.ndarray, tokens: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """The per-row table chunks slice: one per code batch, built once for all its slices."""
    table = np.empty((len(positions), 4), np.int64)
    table[:, 0], table[:, 1], table[:, 2], table[:, 3] = positions, uids, tokens, counts
    return table


def merge_chunks(chunks: list[Chunk], level: int) -> Chunk:
    """One chunk holding the rows of several, in order: one concatenation per table."""
    fidelity = None
    if any(c.fidelity is not None for c in chunks):
        fidelity = np.concatenate([_or_nan(c.fidelity, len(c.rows)) for c in chunks])
    return Chunk(
        np.concatenate([c.rows for c in chunks]),
        np.concatenate([c.features for c in chunks]),
        np.concatenate([c.acts for c in chunks]),
        level,
        fidelity,
    )


def _or_nan(values: np.ndarray | None, rows: int) -> np.ndarray:
    return values if values is not None else np.full((rows, 2), np.nan, np.float32)


@dataclass(frozen=True)
class Hits:
    """Circuit-term hits in flat arrays, one entry per (term, code) that satisfied it."""

    term_ids: np.ndarray  # int64
    gslots: np.ndarray  # int64
    positions: np.ndarray  # int64
    uids: np.ndarray  # int64: the row each hit came from (a re-encoded position supersedes it)
    acts: np.ndarray  # float32
    level: int = 0  # how many times parts were merged into it


class HitLog:
    """A request's term hits, one part per slice that had any. Parts merge MERGE_FANOUT at a time, as chunks do,
    so reading every hit at finish joins a few arrays instead of one per engine step (a 512-token request
    decoded one token a step leaves ~800 parts: joining them was a fifth of evaluating 2,000 circuits)."""

    def __init__(self) -> None:
        self.parts: list[Hits] = []

    def append(self, hits: Hits) -> None:
        parts = self.parts
        parts.append(hits)
        while len(parts) >= MERGE_FANOUT and parts[-MERGE_FANOUT].level == parts[-1].level:
            merged = _join_hits(parts[-MERGE_FANOUT:], parts[-1].level + 1)
            del parts[-MERGE_FANOUT:]
            parts.append(merged)

    def joined(self) -> Hits | None:
        """Every hit in arrival order (kept joined: the report and an action may both read them)."""
        if len(self.parts) > 1:
            self.parts = [_join_hits(self.parts, self.parts[0].level)]  # levels never increase along the list
        return self.parts[0] if self.parts else None


def _join_hits(parts: list[Hits], level: int) -> Hits:
    fields = ("term_ids", "gslots", "positions", "uids", "acts")
    return Hits(*(np.concatenate([getattr(p, name) for p in parts]) for name in fields), level=level)


@dataclass(frozen=True)
class TermPlan:
    """For one circuit-set version and one set of SAE slots: which terms each (gslot, feature) can satisfy.
    Shared by every request with those slots (the core caches them)."""

    version: int
    terms: dict[int, dict[int, tuple[tuple[int, float], ...]]]  # gslot -> feature -> (term id, min activation)
    wanted: dict[int, np.ndarray]  # gslot -> bool [d_sae]: is the feature in some term
    term_ids: dict[Term, int]  # every term of the circuit set, numbered
    flat: FlatCircuits

    @classmethod
    def build(cls, circuits: CircuitSet, registry: SaeRegistry, gslots: list[int]) -> TermPlan:
        term_ids = {t: i for i, t in enumerate(dict.fromkeys(t for c in circuits.circuits for t in c.terms))}
        terms: dict[int, dict[int, dict[tuple[int, float], None]]] = {g: {} for g in gslots}
        for term, term_id in term_ids.items():
            for gslot in registry.resolve(term, among=gslots):
                if term.feature < registry.identities[gslot].d_sae:
                    terms[gslot].setdefault(term.feature, {})[(term_id, term.min_activation)] = None
        wanted = {}
        for gslot, by_feature in terms.items():
            mask = np.zeros(registry.identities[gslot].d_sae, bool)
            mask[list(by_feature)] = True
            wanted[gslot] = mask
        frozen = {g: {f: tuple(ts) for f, ts in by_feature.items()} for g, by_feature in terms.items()}
        return cls(circuits.version, frozen, wanted, term_ids, FlatCircuits.of(circuits.circuits, term_ids))


@dataclass(frozen=True)
class FlatCircuits:
    """The circuits that are one term, any / at_least of terms, or all of terms and negated terms, with or
    without a token window: nearly every circuit operators write. They are evaluated together, as counts over
    their terms' (spread) mask rows against a need, instead of one by one, so a report's cost grows with the
    circuits' terms, not with a Python step per circuit. Deeper expressions take the general path."""

    index: np.ndarray  # int64 [F]: position of each flat circuit in the circuit set
    terms: np.ndarray  # int64 [F, most terms]: term ids, padded with -1
    negated: np.ndarray  # bool [F, most terms]: the term is under `not` (must not fire)
    need: np.ndarray  # int64 [F]: how many of its positive terms must fire at a position
    window: np.ndarray  # int64 [F]: a term counts at p when it fired in [p - window + 1, p]
    scope: np.ndarray  # int64 [F]: 0 both, 1 prompt, 2 generated

    @classmethod
    def of(cls, circuits: tuple[Circuit, ...], term_ids: dict[Term, int]) -> FlatCircuits:
        index, rows, negated, need, window, scope = [], [], [], [], [], []
        for i, circuit in enumerate(circuits):
            shape = _flat_shape(circuit.expression)
            if shape is None:
                continue
            items, signs, required = shape
            index.append(i)
            rows.append([term_ids[item] for item in items])
            negated.append(signs)
            need.append(required)
            window.append(circuit.window)
            scope.append(_SCOPE_ROW.get(circuit.scope, 0))
        width = max((len(r) for r in rows), default=1)
        terms = np.full((len(rows), width), -1, np.int64)
        signs = np.zeros((len(rows), width), bool)
        for i, (r, n) in enumerate(zip(rows, negated, strict=True)):
            terms[i, : len(r)], signs[i, : len(n)] = r, n
        as_array = lambda values: np.asarray(values, np.int64)  # noqa: E731
        return cls(as_array(index), terms, signs, as_array(need), as_array(window), as_array(scope))


def _flat_shape(expr: Expr) -> tuple[list[Term], list[bool], int] | None:
    """(terms, negated per term, how many positive terms must fire), or None for a deeper expression."""
    if isinstance(expr, Term):
        return [expr], [False], 1
    if isinstance(expr, AnyOf | AtLeast) and all(isinstance(item, Term) for item in expr.items):
        return list(expr.items), [False] * len(expr.items), 1 if isinstance(expr, AnyOf) else expr.n
    if isinstance(expr, All) and all(
        isinstance(item, Term) or (isinstance(item, Not) and isinstance(item.item, Term)) for item in expr.items
    ):
        items = [item if isinstance(item, Term) else item.item for item in expr.items]
        signs = [isinstance(item, Not) for item in expr.items]
        return items, signs, signs.count(False)
    return None


_SCOPE_ROW = {pb.SCOPE_PROMPT: 1, pb.SCOPE_GENERATED: 2}


class RequestState:
    """Everything the sidecar holds for a request until its report is final: the codes per SAE slot (with
    which rows a re-encoding superseded), term hits of the current circuit set, the producer's start and gap
    messages, and the finish marker once it arrives. Changed only under the core's lock."""

    def __init__(self, request_id: str, seq: int, now: int) -> None:
        self.request_id = request_id
        self.seq = seq
        self.slots: dict[int, int] = {}  # producer slot -> gslot, from the producer's manifest
        self.model = ""
        self.response_id = ""  # the id the API client knows it by (several requests may share one)
        self.started = False  # a start arrived (a request may also begin with its codes or its finish)
        self.notes: list[str] = []  # what admission refused or cut, carried into the report
        self.labels: list[str] = []
        self.trace = pb.TraceContext()
        self.arrival_ns = now
        self.last_activity_ns = now
        self.chunks: dict[int, list[Chunk]] = {}
        self.superseded: set[int] = set()
        # gslot -> uid of each position's latest row (-1: none); only once a slice came out of order (add_chunk)
        self._latest_uid: dict[int, np.ndarray] = {}
        self._seen: dict[int, np.ndarray] | None = None
        self._prefix: dict[int, int] = {}  # gslot -> every position below it has codes (in-order arrival)
        self.plan: TermPlan | None = None
        self.hits = HitLog()  # hits of the current term plan's terms
        self.postings = 0
        self.nbytes = 0  # what its codes and position map hold (the open-request memory budget counts it)
        self._first_generated: int | None = None
        self.producer_gaps: list[pb.Gap] = []
        self.pending_finish: pb.RequestFinish | None = None
        self.finish_deadline_ns = 0
        self.finish_received_ns = 0
        self.inputs_received_ns = 0  # see input_received
        self.num_prompt_tokens = 0
        self.actions_sent: set[str] = set()

    def input_received(self, received_ns: int) -> None:
        """An input its report waits for (codes, its finish, declared gaps) came off its stream at received_ns: the
        report's inputs_received_unix_nanos is the latest such time, whichever input came last."""
        self.inputs_received_ns = max(self.inputs_received_ns, received_ns)

    def bind(self, slots: dict[int, int]) -> None:
        """Attach a producer stream's slot map. Several producers may serve one request (under tensor
        parallelism each rank encodes its own heads' slots, numbered from one config), so maps are merged; a
        reconnecting producer brings the same SAEs under the same numbers."""
        self.slots = {**self.slots, **slots}
        self.plan = None

    def add_chunk(
        self, gslot: int, chunk: Chunk, phase: int, now: int, candidates: np.ndarray | None
    ) -> np.ndarray | None:
        """Record one slice's rows; returns uids of rows it replaced (same position encoded again), or None.
        `candidates` marks codes whose feature some circuit term names (None: there are none)."""
        self.last_activity_ns = now
        replaced = None
        n = len(chunk.rows)
        if n:
            first = int(chunk.rows[0, 0])
            in_order = self._prefix.get(gslot, 0) == first
            # In-order codes (the common case) cover exactly [0, prefix) so far, so new positions replace nothing
            # and need no uid map; one is built from the chunks at the first slice that arrives otherwise.
            if not in_order or gslot in self._latest_uid:
                replaced = self._replace_rows(gslot, chunk, first, first + n)
            if in_order:
                self._prefix[gslot] = first + n
            if phase == GENERATED and (self._first_generated is None or first < self._first_generated):
                self._first_generated = first
        chunks = self.chunks.setdefault(gslot, [])
        chunks.append(chunk)
        # Levels never increase along the list (a counter in base MERGE_FANOUT), so the last MERGE_FANOUT share a
        # level exactly when the first of them has the last one's.
        while len(chunks) >= MERGE_FANOUT and chunks[-MERGE_FANOUT].level == chunks[-1].level:
            merged = merge_chunks(chunks[-MERGE_FANOUT:], chunks[-1].level + 1)
            del chunks[-MERGE_FANOUT:]
            chunks.append(merged)
        self._seen = None
        self.postings += len(chunk.features)
        self.nbytes += (40 if chunk.fidelity is not None else 32) * n + 6 * len(chunk.features) + 200
        if self.plan is not None and candidates is not None:
            self._match_terms(gslot, chunk, candidates)
        return replaced

    def _replace_rows(self, gslot: int, chunk: Chunk, first: int, end: int) -> np.ndarray | None:
        """Record the chunk's rows as their positions' latest; returns the uids of rows they replace, or None."""
        latest = self._latest_uid.get(gslot)
        if latest is None:  # every chunk so far came in order: the map starts from them
            known = self.chunks.get(gslot, [])
            latest = np.full(max([end] + [int(c.positions[-1]) + 1 for c in known if len(c.positions)]), -1, np.int64)
            for c in known:
                latest[c.positions] = c.uids
            self.nbytes += latest.nbytes
            self._latest_uid[gslot] = latest
        elif len(latest) < end:
            old = latest
            latest = np.full(max(end, 2 * len(old)), -1, np.int64)
            latest[: len(old)] = old
            self.nbytes += latest.nbytes - old.nbytes
            self._latest_uid[gslot] = latest
        positions = chunk.positions
        if len(positions) == 1:
            previous = int(latest[first])
            latest[first] = chunk.uids[0]
            if previous < 0:
                return None
            self.superseded.add(previous)
            return np.array([previous], np.int64)
        previous = latest[positions]
        latest[positions] = chunk.uids
        if not (previous >= 0).any():
            return None
        replaced = previous[previous >= 0]
        self.superseded.update(replaced.tolist())
        return replaced

    def ensure_plan(self, plan_for: Callable[[list[int]], TermPlan], version: int) -> None:
        """Match terms of the current circuit set; after a reload, re-match everything received so far."""
        if self.plan is not None and self.plan.version == version:
            return
        self.plan = plan_for(sorted(set(self.slots.values())))
        self.hits = HitLog()
        for gslot, chunks in self.chunks.items():
            for chunk in chunks:
                self._match_terms(gslot, chunk, None)

    def _match_terms(self, gslot: int, chunk: Chunk, candidates: np.ndarray | None) -> None:
        assert self.plan is not None
        by_feature = self.plan.terms.get(gslot)
        if not by_feature or not len(chunk.features):
            return
        if candidates is None:
            candidates = self.plan.wanted[gslot][chunk.features]
        at = np.flatnonzero(candidates)
        if not len(at):
            return
        features = chunk.features[at]
        acts = chunk.acts[at].astype(np.float32)
        ids, picked = [], []
        for feature in np.unique(features).tolist():
            on_feature = np.flatnonzero(features == feature)
            for term_id, minimum in by_feature[feature]:
                select = on_feature[acts[on_feature] >= minimum] if minimum > 0 else on_feature
                if len(select):
                    ids.append(np.full(len(select), term_id, np.int64))
                    picked.append(select)
        if not picked:
            return
        picked_at = np.concatenate(picked)
        rows = np.searchsorted(np.cumsum(chunk.counts), at[picked_at], side="right")  # the row each code is in
        term_ids = np.concatenate(ids)
        gslots = np.full(len(term_ids), gslot, np.int64)
        self.hits.append(Hits(term_ids, gslots, chunk.positions[rows], chunk.uids[rows], acts[picked_at]))

    # --- reading, at finish ---------------------------------------------------------------------------

    def first_generated_position(self, default: int) -> int:
        return default if self._first_generated is None else self._first_generated

    def _superseded_array(self) -> np.ndarray:
        return np.fromiter(self.superseded, np.int64, len(self.superseded))

    def latest_codes(self) -> dict[int, SlotCodes]:
        """Per gslot, every row's codes with superseded rows (re-encoded positions) left out."""
        out = {}
        superseded = self._superseded_array()
        for gslot, chunks in self.chunks.items():
            positions = np.concatenate([c.positions for c in chunks])
            counts = np.concatenate([c.counts for c in chunks])
            features = np.concatenate([c.features for c in chunks])
            acts = np.concatenate([c.acts for c in chunks]).astype(np.float32)
            if len(superseded):
                keep = ~np.isin(np.concatenate([c.uids for c in chunks]), superseded)
                posting_keep = np.repeat(keep, counts)
                positions, counts = positions[keep], counts[keep]
                features, acts = features[posting_keep], acts[posting_keep]
            offsets = np.zeros(len(counts) + 1, np.int64)
            np.cumsum(counts, out=offsets[1:])
            out[gslot] = SlotCodes(positions, offsets, features, acts)
        return out

    def fidelity_rows(self) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        """Per gslot, (errors, norms) of the latest row of each measured position (superseded rows left out)."""
        out = {}
        superseded = self._superseded_array() if self.superseded else None
        for gslot, chunks in self.chunks.items():
            measured = [c for c in chunks if c.fidelity is not None]
            if not measured:
                continue
            fidelity = np.concatenate([c.fidelity for c in measured])
            errors, norms = fidelity[:, 0], fidelity[:, 1]
            keep = ~np.isnan(errors)
            if superseded is not None:
                keep &= ~np.isin(np.concatenate([c.uids for c in measured]), superseded)
            out[gslot] = (errors[keep], norms[keep])
        return out

    def seen_prefix(self) -> int:
        """Every position below this has codes in every slot (0 when some slot has none, or codes arrived out
        of order: then ask seen_positions)."""
        if not self.slots or set(self._prefix) != set(self.slots.values()):
            return 0
        return min(self._prefix.values())

    def seen_positions(self) -> dict[int, np.ndarray]:
        """Per gslot, sorted unique positions that have codes (cached until the next chunk)."""
        if self._seen is None:
            self._seen = {
                gslot: np.unique(np.concatenate([c.positions for c in chunks])) if chunks else _NONE
                for gslot, chunks in self.chunks.items()
            }
        return self._seen

    def token_table(self) -> tuple[np.ndarray, np.ndarray]:
        """(positions sorted, their token ids) over every slot's rows."""
        chunks = [c for cs in self.chunks.values() for c in cs]
        if not chunks:
            return _NONE, _NONE
        positions = np.concatenate([c.positions for c in chunks])
        tokens = np.concatenate([c.tokens for c in chunks])
        order = np.argsort(positions, kind="stable")
        return positions[order], tokens[order].astype(np.int64)

    def evaluator(self, num_prompt_tokens: int, seen: np.ndarray) -> CircuitEvaluator:
        """Evaluates circuits over this request's tokens, sharing each term's positions across circuits."""
        return CircuitEvaluator(self, num_prompt_tokens, seen)


class CircuitEvaluator:
    """Positions where circuits match in one request. Every hit of every term is gathered once, into one
    [terms, positions] mask when the request is short enough, so each circuit costs a few operations on its
    terms' rows; a circuit without `not` whose terms never fired is skipped without evaluating it."""

    def __init__(self, state: RequestState, num_prompt_tokens: int, seen: np.ndarray) -> None:
        self.state, self.num_prompt, self.seen = state, num_prompt_tokens, seen
        self.size = int(seen[-1]) + 1 if len(seen) else 0
        self._masks: dict[tuple, np.ndarray] = {}
        self._tokens: dict[int, int] | None = None  # position -> token id, built on first use
        self._gather()

    def _gather(self) -> None:
        """Every hit in flat arrays ordered by term (superseded rows left out), and one mask row per term, plus a
        zero row at the end that a circuit's padding reads."""
        plan = self.state.plan
        self._term_ids = plan.term_ids if plan is not None else {}
        hits = self.state.hits.joined()
        width = self.size if self.size <= DENSE_POSITIONS else 0
        if hits is None:
            owner = gslots = positions = _NONE
            acts = np.empty(0, np.float32)
        else:
            owner, gslots, positions, acts = hits.term_ids, hits.gslots, hits.positions, hits.acts
            if self.state.superseded:
                keep = ~np.isin(hits.uids, self.state._superseded_array())
                owner, gslots, positions, acts = owner[keep], gslots[keep], positions[keep], acts[keep]
        # term ids are few: as 16-bit keys, numpy's stable sort is a radix sort
        order = np.argsort(owner.astype(np.uint16) if len(self._term_ids) <= 1 << 16 else owner, kind="stable")
        owner, self._gslots, self._positions, self._acts = owner[order], gslots[order], positions[order], acts[order]
        starts = np.flatnonzero(np.diff(owner, prepend=-1))  # where each term's run begins
        present = owner[starts]
        self._row = dict(zip(present.tolist(), range(len(present)), strict=True))  # term id -> row
        self._bounds = np.append(starts, len(owner))
        self._padded = np.zeros((len(present) + 1, width), bool)
        self._matrix = self._padded[:-1]
        if width:
            rows = np.repeat(np.arange(len(present)), np.diff(self._bounds))
            inside = self._positions < width
            self._padded.reshape(-1)[rows[inside] * width + self._positions[inside]] = True

    def _row_of(self, term: Term) -> int | None:
        term_id = self._term_ids.get(term)
        return None if term_id is None else self._row.get(term_id)

    def term_hits(self, term: Term) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(gslots, positions, activations) of a term's hits."""
        row = self._row_of(term)
        if row is None:
            return _NONE, _NONE, np.empty(0, np.float32)
        a, b = self._bounds[row], self._bounds[row + 1]
        return self._gslots[a:b], self._positions[a:b], self._acts[a:b]

    def token_id_at(self, position: int) -> int:
        """Token id at a position (0 where no slot has a row for it)."""
        if self._tokens is None:
            known, tokens = self.state.token_table()
            self._tokens = dict(zip(known.tolist(), tokens.tolist(), strict=True))
        return self._tokens.get(position, 0)

    def match_all(self, circuits: CircuitSet) -> list[np.ndarray]:
        """Sorted positions where each circuit matches (scope applied), in order: the flat circuits of the
        current term plan together, the others one by one."""
        plan = self.state.plan
        found: list[np.ndarray | None] = [None] * len(circuits.circuits)
        if plan is not None and plan.version == circuits.version and self._matrix.shape[1]:
            for i, positions in self._flat_matches(plan.flat):
                found[i] = positions
        return [self.matches(c) if f is None else f for c, f in zip(circuits.circuits, found, strict=True)]

    def _flat_matches(self, flat: FlatCircuits) -> Iterator[tuple[int, np.ndarray]]:
        """(circuit index, positions) for every flat circuit: where the count of its positive terms firing (in
        its window) reaches its need and none of its negated terms fires, among the positions in its scope.

        Mask rows are packed 64 positions to a word and each circuit's count is kept bit-sliced (one word array
        per bit of the count), so a circuit costs a few word operations per term instead of one per position. In
        batches of at most FLAT_BATCH_CELLS circuit-positions, so long requests stay bounded."""
        absent = len(self._row)  # the zero row of the padded matrix
        lookup = np.full(len(self._term_ids) + 1, absent, np.int64)  # the last entry serves the -1 padding
        lookup[np.fromiter(self._row, np.int64, absent)] = np.fromiter(self._row.values(), np.int64, absent)
        rows = lookup[flat.terms]
        fired_somewhere = (rows != absent) & ~flat.negated
        live = fired_somewhere.any(axis=1) | flat.negated.any(axis=1)  # without `not`, a silent circuit is done
        for i in flat.index[~live].tolist():
            yield i, _NONE
        index = flat.index[live]
        if not len(index):
            return
        rows, negated = rows[live], flat.negated[live]
        need, window, scope = flat.need[live], flat.window[live], flat.scope[live]
        universes = np.stack([self._universe_mask(s) for s in (pb.SCOPE_BOTH, pb.SCOPE_PROMPT, pb.SCOPE_GENERATED)])
        source = _pack_bits(self._padded)
        windowed = window > 1
        if windowed.any():  # windowed circuits read their terms spread over the window, as extra source rows
            spread, rows[windowed] = self._spread(rows[windowed], window[windowed], scope[windowed], universes)
            source = np.concatenate([source, _pack_bits(spread)])
        scope_bits = _pack_bits(universes)
        counter_bits = max(1, int(need.max()).bit_length())  # counts above every need only need to say so
        batch = max(1, FLAT_BATCH_CELLS // self.size)
        for start in range(0, len(index), batch):
            part = slice(start, start + batch)
            count = [np.zeros((len(index[part]), source.shape[1]), np.uint64) for _ in range(counter_bits)]
            beyond = np.zeros_like(count[0])  # the count overflowed its bits: above any need
            vetoed = np.zeros_like(count[0])
            for column in range(rows.shape[1]):
                fired = source[rows[part, column]]
                negated_here = negated[part, column]
                if negated_here.any():
                    vetoed |= fired & _word_mask(negated_here)
                    fired &= _word_mask(~negated_here)
                for bit in count:  # add one where the term fired, carrying through the count's bits
                    fired, bit[:] = bit & fired, bit ^ fired
                beyond |= fired
            hit = (beyond | _at_least(count, need[part])) & ~vetoed & scope_bits[scope[part]]
            yield from self._positions_of(index[part], hit)

    def _spread(
        self, rows: np.ndarray, window: np.ndarray, scope: np.ndarray, universes: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Each distinct (row, window, scope) of windowed circuits as a mask that holds at p when the term fired in
        [p - window + 1, p] within the scope (a window does not reach across it), and the circuits' rows
        renumbered into them, after the padded matrix's rows (-> source rows; the zero row stays)."""
        absent = len(self._row)
        used = rows != absent
        keys = (window[:, None] * 3 + scope[:, None]) * (absent + 1) + rows
        combos, inverse = np.unique(keys[used], return_inverse=True)
        window_scope, combo_rows = np.divmod(combos, absent + 1)
        combo_window, combo_scope = np.divmod(window_scope, 3)
        # firings in [0, j) at column lead + j, after `lead` zeros: the count before a window that starts before
        # position 0 is read from the zeros, so every window is one shifted slice of its row
        size, back = self.size, np.minimum(combo_window, self.size + 1)  # a longer window reaches as far
        lead = int(back.max())
        running = np.zeros((len(combos), lead + size + 1), np.int32)
        np.cumsum(self._padded[combo_rows] & universes[combo_scope], axis=1, out=running[:, lead + 1 :])
        before = sliding_window_view(running, size, axis=1)[np.arange(len(combos)), lead + 1 - back]
        spread = running[:, lead + 1 :] > before
        renumbered = np.full(rows.shape, absent, np.int64)
        renumbered[used] = absent + 1 + inverse
        return spread, renumbered

    def _positions_of(self, index: np.ndarray, hit: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
        """(circuit index, positions) from one packed hit row per circuit."""
        some = hit.any(axis=1)
        for i in index[~some].tolist():
            yield i, _NONE
        bits = np.unpackbits(hit[some].view(np.uint8), axis=1, count=self.size, bitorder="little")
        at = np.flatnonzero(bits.view(bool))
        bounds = np.searchsorted(at, np.arange(int(some.sum()) + 1) * self.size)
        positions = at - np.repeat(np.arange(len(bounds) - 1) * self.size, np.diff(bounds))
        for k, i in enumerate(index[some].tolist()):
            yield i, positions[bounds[k] : bounds[k + 1]]

    def matches(self, circuit: Circuit) -> np.ndarray:
        """Sorted positions where the circuit matches (scope applied)."""
        if circuit.monotone and not any(self._row_of(t) is not None for t in circuit.terms):
            return _NONE
        if self.size <= DENSE_POSITIONS:
            expr, scope = circuit.expression, circuit.scope
            if circuit.window == 1 and isinstance(expr, Term):  # the common shapes, without the general walk
                return np.flatnonzero(self._term_mask(expr, scope))
            if circuit.window == 1 and isinstance(expr, All | AnyOf) and all(isinstance(i, Term) for i in expr.items):
                combine = np.logical_and if isinstance(expr, All) else np.logical_or
                return np.flatnonzero(combine.reduce([self._term_mask(t, scope) for t in expr.items]))
            universe = self._universe_mask(scope)
            mask = evaluate_dense(expr, lambda t: self._term_mask(t, scope), universe, circuit.window)
            return np.flatnonzero(mask)
        source = _RequestKeys(self, circuit.scope)
        return key_positions(evaluate(circuit.expression, source, circuit.window))

    def term_positions(self, term: Term) -> np.ndarray:
        return np.unique(self.term_hits(term)[1])

    def scoped(self, positions: np.ndarray, scope: int) -> np.ndarray:
        if scope == pb.SCOPE_PROMPT:
            return positions[positions < self.num_prompt]
        if scope == pb.SCOPE_GENERATED:
            return positions[positions >= self.num_prompt]
        return positions

    def _universe_mask(self, scope: int) -> np.ndarray:
        key = ("universe", scope)
        if key not in self._masks:
            mask = np.zeros(self.size, bool)
            mask[self.scoped(self.seen, scope)] = True
            self._masks[key] = mask
        return self._masks[key]

    def _term_mask(self, term: Term, scope: int) -> np.ndarray:
        row = self._row_of(term)
        if row is None:  # never fired
            return np.zeros(self.size, bool)
        if scope == pb.SCOPE_BOTH or scope == pb.SCOPE_UNSPECIFIED:
            return self._matrix[row]
        key = (term, scope)
        if key not in self._masks:
            self._masks[key] = self._matrix[row] & self._universe_mask(scope)
        return self._masks[key]


def _pack_bits(masks: np.ndarray) -> np.ndarray:
    """[rows, positions] bool -> [rows, words] uint64, 64 positions a word (the rest of the last word zero)."""
    words = -(-masks.shape[1] // 64)
    packed = np.zeros((len(masks), words * 8), np.uint8)
    packed[:, : -(-masks.shape[1] // 8)] = np.packbits(masks, axis=1, bitorder="little")
    return packed.view(np.uint64)


def _word_mask(flags: np.ndarray) -> np.ndarray:
    """[rows] bool -> [rows, 1] words of all ones or all zeros."""
    return np.where(flags, np.uint64(0xFFFFFFFFFFFFFFFF), np.uint64(0))[:, None]


def _at_least(count: list[np.ndarray], need: np.ndarray) -> np.ndarray:
    """Where a bit-sliced count (least significant bit first) is >= each row's need: compared from the top bit,
    as long as the bits above were equal."""
    greater = np.zeros_like(count[0])
    equal = ~greater
    for bit in reversed(range(len(count))):
        need_bit = _word_mask(((need >> bit) & 1) == 1)
        greater |= equal & count[bit] & ~need_bit
        equal &= ~(count[bit] ^ need_bit)
    return greater | equal


class _RequestKeys:
    """The key-based source for requests too long for dense masks."""

    def __init__(self, evaluator: CircuitEvaluator, scope: int) -> None:
        self.evaluator, self.scope = evaluator, scope
        self._universe: np.ndarray | None = None

    def term_keys(self, term: Term) -> np.ndarray:
        positions = self.evaluator.scoped(self.evaluator.term_positions(term), self.scope)
        return token_keys(self.evaluator.state.seq, positions)

    def universe(self) -> np.ndarray:
        if self._universe is None:  # asked for by `not` and by the windowed cut (as runs): built once
            positions = self.evaluator.scoped(self.evaluator.seen, self.scope)
            self._universe = token_keys(self.evaluator.state.seq, positions).astype(KEY_DTYPE)
        return self._universe

    def universe_runs(self) -> KeyRuns:
        return KeyRuns.of(self.universe())
