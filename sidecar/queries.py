"""Read-only questions over the rolling token index: which requests match a circuit or expression
(QueryRequests), how often each feature fires (FeatureStats), and one request's codes (GetCodes).

Queries read sealed segments and need no lock; the request table is read as a snapshot.
"""

from __future__ import annotations

import grpc
import numpy as np

from circuitwatch.proto import circuitwatch_pb2 as pb
from circuitwatch.proto.codec import pack_slice

from .circuits import MAX_FEATURE, CircuitSet
from .errors import MonitorError
from .expressions import Expr, ExpressionError, Term, evaluate, from_proto, terms_of
from .index import RollingIndex, TimeWindow
from .keys import KeyRuns, key_positions, key_requests, run_starts
from .registry import SaeRegistry
from .request_table import RequestTable

MATCH_POSITIONS = 64  # positions listed per matching request in a query answer
_PHASE_OF_SCOPE = {pb.SCOPE_PROMPT: pb.PHASE_PROMPT, pb.SCOPE_GENERATED: pb.PHASE_GENERATED}


class IndexKeys:
    """Feeds the expression evaluator from the rolling index over a time window and scope."""

    def __init__(self, index: RollingIndex, registry: SaeRegistry, window: TimeWindow, scope: int) -> None:
        self.index, self.registry, self.window = index, registry, window
        self.phase = _PHASE_OF_SCOPE.get(scope)

    def term_keys(self, term: Term) -> np.ndarray:
        gslots = self.registry.resolve(term)
        return self.index.term_keys(gslots, term.feature, term.min_activation, self.window, self.phase)

    def universe(self) -> np.ndarray:
        return self.index.universe(self.window, self.phase)

    def universe_runs(self) -> KeyRuns:
        return self.index.universe_runs(self.window, self.phase)


class IndexQueries:
    def __init__(self, index: RollingIndex, registry: SaeRegistry, requests: RequestTable, clock) -> None:
        self.index = index
        self.registry = registry
        self.requests = requests
        self.clock = clock

    def window(self, window: pb.TimeRange) -> TimeWindow:
        """A request's time range; an open end means now."""
        return TimeWindow(window.start_unix_nanos, window.end_unix_nanos or self.clock())

    def query_requests(self, request: pb.QueryRequestsRequest, circuits: CircuitSet) -> pb.QueryRequestsResponse:
        what = request.WhichOneof("what")
        if what == "circuit":
            circuit = circuits.by_name(request.circuit)
            if circuit is None:
                raise MonitorError(grpc.StatusCode.NOT_FOUND, f"circuit {request.circuit!r} is not loaded")
            expr, scope, window, min_tokens = circuit.expression, circuit.scope, circuit.window, circuit.min_tokens
        elif what == "expression":
            expr = self.expression(request.expression, "expression")
            scope, window, min_tokens = pb.SCOPE_BOTH, 1, 1
        else:
            raise MonitorError(grpc.StatusCode.INVALID_ARGUMENT, "give a circuit name or an expression")
        scope = request.scope or scope
        min_tokens = request.min_tokens or min_tokens
        time_window = self.window(request.window)
        keys = evaluate(expr, IndexKeys(self.index, self.registry, time_window, scope), window)
        response = pb.QueryRequestsResponse()
        seqs = key_requests(keys)  # keys are sorted, so each request's keys are one run
        starts = run_starts(seqs)
        counts = np.diff(np.append(starts, len(seqs)))
        keep = counts >= min_tokens
        starts, counts = starts[keep], counts[keep]
        limit = request.limit or 1000
        known = self.requests.by_seq  # a request forgotten while its codes are still indexed is not a match
        run_seqs = seqs[starts].tolist()
        matching = [i for i, seq in enumerate(run_seqs) if seq in known]
        response.total_matches = len(matching)
        positions = key_positions(keys)  # only the shown matches' first positions become Python ints
        shown = matching[:limit]
        for i, start, count in zip(shown, starts[shown].tolist(), counts[shown].tolist(), strict=True):
            record = known.get(run_seqs[i])
            if record is None:  # forgotten meanwhile: queries read the table without the core's lock
                continue
            response.matches.add(
                request_id=record.request_id,
                matching_tokens=count,
                positions=positions[start : start + min(count, MATCH_POSITIONS)].tolist(),
            )
        oldest = self.index.oldest_time
        if oldest is not None and time_window.start <= oldest and time_window.end >= self.clock():
            response.requests_scanned = len(self.requests)
        else:
            response.requests_scanned = self.requests.count_in(time_window)
        return response

    def expression_seqs(self, name: str, expression: pb.Expr, scope: int, window: pb.TimeRange) -> np.ndarray:
        """Sequence numbers of the requests whose codes match an expression anywhere in the window."""
        expr = self.expression(expression, f"{name}.expression")
        keys = evaluate(expr, IndexKeys(self.index, self.registry, self.window(window), scope), 1)
        return np.unique(key_requests(keys))

    def expression(self, message: pb.Expr, field: str) -> Expr:
        """An expression from a caller, every term's feature within the d_sae of the SAEs it names."""
        try:
            expr = from_proto(message, field)
        except ExpressionError as exc:
            raise MonitorError(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
        for term in terms_of(expr):
            gslots = self.registry.resolve(term)
            largest = max((self.registry.identities[g].d_sae for g in gslots), default=MAX_FEATURE + 1)
            if term.feature >= largest:
                raise MonitorError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"{field}: {term.describe()}: feature {term.feature} >= d_sae {largest} of every SAE it names",
                )
        return expr

    def feature_stats(self, request: pb.FeatureStatsRequest) -> pb.FeatureStatsResponse:
        gslots = self.registry.resolve(Term(feature=0, slot=request.slot, sae=request.sae or None))
        if not gslots:
            raise MonitorError(
                grpc.StatusCode.NOT_FOUND,
                f"no SAE registered as slot {request.slot}{' ' + request.sae if request.sae else ''}",
            )
        hashes = {self.registry.identities[g].weights_hash for g in gslots}
        if len(hashes) > 1:
            raise MonitorError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"slot {request.slot} maps to {len(hashes)} SAEs ({', '.join(sorted(hashes))}): set sae to one of them",
            )
        phase = _PHASE_OF_SCOPE.get(request.scope)
        tokens, features, counts, sums = self.index.feature_stats(gslots, self.window(request.window), phase)
        order = np.lexsort((features, -counts))
        if request.top:
            order = order[: request.top]
        return pb.FeatureStatsResponse(
            tokens=tokens,
            features=[
                pb.FeatureStat(
                    feature=int(features[i]),
                    tokens=int(counts[i]),
                    rate=counts[i] / tokens if tokens else 0.0,
                    mean_activation=sums[i] / counts[i],
                )
                for i in order.tolist()
            ],
        )

    def get_codes(self, request_id: str) -> pb.GetCodesResponse:
        seq = self.requests.seq_of(request_id)
        parts = self.index.request_codes(seq) if seq is not None else []
        if not parts:
            raise MonitorError(grpc.StatusCode.NOT_FOUND, f"request {request_id!r} has no codes in the index window")
        positions, gslots, phases, tokens = (np.concatenate([p[i] for p in parts]) for i in range(4))
        counts = np.concatenate([np.diff(p[4].astype(np.int64)) for p in parts])
        features = np.concatenate([p[5] for p in parts])
        acts = np.concatenate([p[6] for p in parts])
        fidelity = np.concatenate([p[7] for p in parts])
        starts = np.concatenate(([0], np.cumsum(counts)))
        order = np.lexsort((positions, gslots))
        slot_of = {gslot: self.registry.producer_slot[gslot] for gslot in np.unique(gslots).tolist()}
        response = pb.GetCodesResponse(
            request_id=request_id,
            saes=[self.registry.identities[g].to_proto(slot) for g, slot in slot_of.items()],
        )
        # one slice per run of (gslot, phase) with consecutive positions
        ordered = order.tolist()
        run: list[int] = []
        for i in [*ordered, None]:
            if run and (
                i is None
                or gslots[i] != gslots[run[-1]]
                or phases[i] != phases[run[-1]]
                or positions[i] != positions[run[-1]] + 1
            ):
                rows = np.array(run)
                ids = np.concatenate([features[starts[r] : starts[r + 1]] for r in run])
                values = np.concatenate([acts[starts[r] : starts[r + 1]] for r in run])
                offsets = np.concatenate(([0], np.cumsum(counts[rows])))
                response.slices.append(
                    pack_slice(
                        request_id,
                        slot_of[int(gslots[run[0]])],
                        int(positions[run[0]]),
                        int(phases[run[0]]),
                        tokens[rows],
                        offsets,
                        ids,
                        values,
                        *_measured(fidelity[rows]),
                    )
                )
                run = []
            if i is not None:
                run.append(i)
        return response


def _measured(fidelity: np.ndarray) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(errors, norms) of rows when every one of them was measured, else (None, None): a slice carries fidelity
    for all its rows or none."""
    if not len(fidelity) or np.isnan(fidelity).any():
        return None, None
    return fidelity[:, 0], fidelity[:, 1]
