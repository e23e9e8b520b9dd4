"""One open request inside the sidecar: its codes as they arrive, and the circuit terms matched incrementally,
so that evaluating a circuit at finish (reports.py) or for an action touches only the hits, not every code."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from circuitwatch.proto import circuitwatch_pb2 as pb
from circuitwatch.proto.codec import SliceArrays

from .circuits import Circuit, CircuitSet
from .expressions import Term, evaluate
from .keys import KEY_DTYPE, key_positions, token_keys
from .registry import SaeRegistry
from .request_sets import SlotCodes


@dataclass
class _Rows:
    """Rows of one slice of one SAE slot, with the uids the index gave them."""

    positions: np.ndarray  # int64
    uids: np.ndarray  # int64
    token_ids: np.ndarray  # uint32


@dataclass
class _Hits:
    """Where one term fired in this request so far (appended per slice)."""

    positions: list[np.ndarray] = field(default_factory=list)
    uids: list[np.ndarray] = field(default_factory=list)
    activations: list[np.ndarray] = field(default_factory=list)


@dataclass
class TermPlan:
    """For one circuit-set version and one request's slots: which terms each gslot can satisfy."""

    version: int
    by_gslot: dict[int, list[Term]]
    features: dict[int, np.ndarray]  # gslot -> sorted feature ids of interest

    @classmethod
    def build(cls, circuits: CircuitSet, registry: SaeRegistry, gslots: list[int]) -> TermPlan:
        by_gslot: dict[int, list[Term]] = {g: [] for g in gslots}
        for circuit in circuits.circuits:
            for term in circuit.terms:
                for gslot in registry.resolve(term, among=gslots):
                    if term not in by_gslot[gslot]:
                        by_gslot[gslot].append(term)
        features = {
            g: np.unique(np.array([t.feature for t in terms], dtype=np.uint32)) for g, terms in by_gslot.items()
        }
        return cls(circuits.version, by_gslot, features)


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
        self.rows: dict[int, list[_Rows]] = {}
        self.slices: dict[int, list[SliceArrays]] = {}
        self.superseded: set[int] = set()
        self._latest_uid: dict[int, np.ndarray] = {}  # gslot -> uid of each position's latest row (-1: none)
        self.plan: TermPlan | None = None
        self.hits: dict[tuple[int, Term], _Hits] = {}
        self.postings = 0
        self._first_generated: int | None = None
        self.producer_gaps: list[pb.Gap] = []
        self.pending_finish: pb.RequestFinish | None = None
        self.finish_deadline_ns = 0
        self.finish_received_ns = 0
        self.num_prompt_tokens = 0
        self.actions_sent: set[str] = set()

    def bind(self, slots: dict[int, int]) -> None:
        """(Re)attach to a producer stream's slot map; a reconnecting producer brings the same SAEs."""
        self.slots = dict(slots)
        self.plan = None

    def add_slice(self, gslot: int, arrays: SliceArrays, uids: np.ndarray, now: int) -> np.ndarray:
        """Record a slice; returns uids of rows it replaced (same position encoded again)."""
        self.last_activity_ns = now
        positions = arrays.positions.astype(np.int64)
        replaced = np.empty(0, np.int64)
        if len(positions):
            latest = self._latest_uid.get(gslot, np.empty(0, np.int64))
            if len(latest) <= positions[-1]:
                grown = np.full(max(int(positions[-1]) + 1, 2 * len(latest)), -1, np.int64)
                grown[: len(latest)] = latest
                latest = self._latest_uid[gslot] = grown
            previous = latest[positions]
            replaced = previous[previous >= 0]
            latest[positions] = uids
            self.superseded.update(replaced.tolist())
        self.rows.setdefault(gslot, []).append(_Rows(positions, uids, arrays.token_ids))
        self.slices.setdefault(gslot, []).append(arrays)
        self.postings += len(arrays.feature_ids)
        if arrays.phase == pb.PHASE_GENERATED and arrays.num_rows:
            first = arrays.first_position
            self._first_generated = first if self._first_generated is None else min(self._first_generated, first)
        if self.plan is not None:
            self._match_terms(gslot, arrays, uids)
        return replaced

    def ensure_plan(self, circuits: CircuitSet, registry: SaeRegistry) -> None:
        """Match terms of the current circuit set; after a reload, re-match everything received so far."""
        if self.plan is not None and self.plan.version == circuits.version:
            return
        self.plan = TermPlan.build(circuits, registry, sorted(set(self.slots.values())))
        self.hits = {}
        for gslot, slices in self.slices.items():
            for arrays, rows in zip(slices, self.rows[gslot], strict=True):
                self._match_terms(gslot, arrays, rows.uids)

    def _match_terms(self, gslot: int, arrays: SliceArrays, uids: np.ndarray) -> None:
        assert self.plan is not None
        wanted = self.plan.features.get(gslot)
        if wanted is None or not len(wanted) or not len(arrays.feature_ids):
            return
        candidate = np.isin(arrays.feature_ids, wanted)
        if not candidate.any():
            return
        row_of = np.repeat(np.arange(arrays.num_rows), np.diff(arrays.row_offsets.astype(np.int64)))[candidate]
        features = arrays.feature_ids[candidate]
        acts = arrays.activations[candidate].astype(np.float32)
        present = set(np.unique(features).tolist())
        for term in self.plan.by_gslot[gslot]:
            if term.feature not in present:
                continue
            select = (features == term.feature) & (acts >= term.min_activation)
            if select.any():
                rows = row_of[select]
                hits = self.hits.setdefault((gslot, term), _Hits())
                hits.positions.append(arrays.first_position + rows.astype(np.int64))
                hits.uids.append(uids[rows])
                hits.activations.append(acts[select])

    # --- finalisation ---------------------------------------------------------------------------------

    def first_generated_position(self, default: int) -> int:
        return default if self._first_generated is None else self._first_generated

    def term_hits_in(self, gslot: int, term: Term) -> tuple[np.ndarray, np.ndarray]:
        """(positions, activations) where a term fired in one slot, superseded rows left out."""
        hits = self.hits.get((gslot, term))
        if hits is None or not hits.positions:
            return np.empty(0, np.int64), np.empty(0, np.float32)
        positions, uids, acts = (np.concatenate(x) for x in (hits.positions, hits.uids, hits.activations))
        if self.superseded:
            keep = ~np.isin(uids, np.fromiter(self.superseded, np.int64))
            positions, acts = positions[keep], acts[keep]
        return positions, acts

    def _term_hits(self, term: Term) -> tuple[np.ndarray, np.ndarray]:
        """(positions, activations) of a term's hits over all of the request's slots."""
        found = [self.term_hits_in(gslot, t) for gslot, t in self.hits if t == term]
        if not found:
            return np.empty(0, np.int64), np.empty(0, np.float32)
        return np.concatenate([p for p, _ in found]), np.concatenate([a for _, a in found])

    def latest_codes(self) -> dict[int, SlotCodes]:
        """Per gslot, every row's codes with superseded rows (re-encoded positions) left out."""
        superseded = np.fromiter(self.superseded, np.int64, len(self.superseded))
        out = {}
        for gslot, slices in self.slices.items():
            positions, offsets, features, acts = [], [np.zeros(1, np.int64)], [], []
            total = 0
            for arrays, rows in zip(slices, self.rows[gslot], strict=True):
                keep = ~np.isin(rows.uids, superseded) if len(superseded) else np.ones(len(rows.uids), bool)
                counts = np.diff(arrays.row_offsets.astype(np.int64))
                posting_keep = np.repeat(keep, counts)
                positions.append(rows.positions[keep])
                offsets.append(total + np.cumsum(counts[keep]))
                total += int(counts[keep].sum())
                features.append(arrays.feature_ids[posting_keep])
                acts.append(arrays.activations[posting_keep].astype(np.float32))
            out[gslot] = SlotCodes(
                np.concatenate(positions), np.concatenate(offsets), np.concatenate(features), np.concatenate(acts)
            )
        return out

    def seen_positions(self) -> dict[int, np.ndarray]:
        """Per gslot, sorted unique positions that have codes."""
        return {
            gslot: np.unique(np.concatenate([r.positions for r in rows])) if rows else np.empty(0, np.int64)
            for gslot, rows in self.rows.items()
        }

    def token_ids_at(self, positions: np.ndarray) -> np.ndarray:
        """Token id at each position (0 where no slot has a row for it)."""
        all_positions = np.concatenate([r.positions for rows in self.rows.values() for r in rows] or [np.empty(0)])
        all_tokens = np.concatenate([r.token_ids for rows in self.rows.values() for r in rows] or [np.empty(0)])
        order = np.argsort(all_positions, kind="stable")
        all_positions, all_tokens = all_positions[order], all_tokens[order]
        found = np.searchsorted(all_positions, positions)
        found = np.minimum(found, max(0, len(all_positions) - 1))
        ok = (
            (len(all_positions) > 0) & (all_positions[found] == positions)
            if len(all_positions)
            else np.zeros(len(positions), bool)
        )
        return np.where(ok, all_tokens[found] if len(all_tokens) else 0, 0).astype(np.int64)

    def evaluate(self, circuit: Circuit, num_prompt_tokens: int, seen: np.ndarray) -> np.ndarray:
        """Positions where the circuit matches (scope applied)."""
        source = _RequestKeys(self, circuit.scope, num_prompt_tokens, seen)
        return key_positions(evaluate(circuit.expression, source, circuit.window))


def _in_scope(positions: np.ndarray, scope: int, num_prompt_tokens: int) -> np.ndarray:
    if scope == pb.SCOPE_PROMPT:
        return positions[positions < num_prompt_tokens]
    if scope == pb.SCOPE_GENERATED:
        return positions[positions >= num_prompt_tokens]
    return positions


class _RequestKeys:
    def __init__(self, state: RequestState, scope: int, num_prompt_tokens: int, seen: np.ndarray) -> None:
        self.state, self.scope, self.num_prompt = state, scope, num_prompt_tokens
        self.seen = seen

    def term_keys(self, term: Term) -> np.ndarray:
        positions, _ = self.state._term_hits(term)
        positions = _in_scope(np.unique(positions), self.scope, self.num_prompt)
        return token_keys(self.state.seq, positions)

    def universe(self) -> np.ndarray:
        return token_keys(self.state.seq, _in_scope(self.seen, self.scope, self.num_prompt)).astype(KEY_DTYPE)
