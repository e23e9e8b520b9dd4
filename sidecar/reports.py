"""A request's final report, built in one call from its open state and its finish marker (or from what arrived,
when the finish never came): coverage with every gap explained, flags with their evidence, SAE identities.

A report never calls tokens clean that it did not see: every position of every slot below the announced total
has codes or a gap, and only then is the report COMPLETE. Nor does it call tokens clean that its SAEs read
badly: a slot whose tokens were mostly poorly reconstructed makes the report LOW_FIDELITY (fidelity.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from circuitwatch.proto import circuitwatch_pb2 as pb

from .circuits import Circuit, CircuitSet
from .fidelity import FidelityPolicy
from .registry import SaeRegistry
from .request_state import CircuitEvaluator, RequestState

OPEN_ENDED = 0xFFFFFFFF  # Gap.end when the request's length is unknown (it never finished)
ALL_SLOTS = 0xFFFFFFFF  # Gap.slot when a gap covers every slot
_NONE = np.empty(0, np.int64)


def missing_ranges(total: int, seen: np.ndarray, known: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Half-open ranges of [0, total) neither seen nor already explained by a known gap."""
    covered = np.zeros(total, dtype=bool)
    covered[seen[seen < total]] = True
    if known:  # every known range at once: +1 where it starts, -1 where it ends
        bounds = np.clip(np.array(known, dtype=np.int64), 0, total)
        depth = np.zeros(total + 1, np.int64)
        np.add.at(depth, bounds[:, 0], 1)
        np.add.at(depth, bounds[:, 1], -1)
        covered |= np.cumsum(depth[:-1]) > 0
    if covered.all():
        return []
    edges = np.diff(np.concatenate(([1], covered.astype(np.int8), [1])))
    starts = np.flatnonzero(edges == -1)
    ends = np.flatnonzero(edges == 1)
    return list(zip(starts.tolist(), ends.tolist(), strict=True))


def merge_gaps(gaps) -> list[pb.Gap]:
    """Gaps with overlapping or adjacent ranges of the same slot and reason merged into one."""
    by_kind: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for gap in gaps:
        if gap.end > gap.start:
            by_kind.setdefault((gap.slot, gap.reason), []).append((gap.start, gap.end))
    merged = []
    for (slot, reason), ranges in sorted(by_kind.items()):
        ranges.sort()
        start, end = ranges[0]
        for a, b in ranges[1:]:
            if a <= end:
                end = max(end, b)
            else:
                merged.append(pb.Gap(slot=slot, start=start, end=end, reason=reason))
                start, end = a, b
        merged.append(pb.Gap(slot=slot, start=start, end=end, reason=reason))
    return merged


def _gaps_of_slot(gaps: list[pb.Gap], slot: int) -> list[tuple[int, int]]:
    return [(g.start, g.end) for g in gaps if g.slot in (slot, ALL_SLOTS)]


def is_covered(state: RequestState, finish: pb.RequestFinish) -> bool:
    """Whether every position the finish announced has codes or a declared gap in every slot."""
    if not state.slots or not set(finish.slots) <= state.slots.keys():  # a producer has not been heard from
        return False
    if state.seen_prefix() >= finish.num_positions:  # the common case, without looking at positions
        return True
    seen = state.seen_positions()
    gaps = [*finish.gaps, *state.producer_gaps]
    return not any(
        missing_ranges(finish.num_positions, seen.get(gslot, _NONE), _gaps_of_slot(gaps, slot))
        for slot, gslot in state.slots.items()
    )


@dataclass(frozen=True)
class _Coverage:
    total: int
    num_prompt: int
    gaps: list[pb.Gap]
    everywhere: np.ndarray  # positions with codes in every slot
    anywhere: np.ndarray  # positions with codes in some slot


def _coverage(state: RequestState, finish: pb.RequestFinish | None, ended: int) -> _Coverage:
    unheard = sorted(set(finish.slots) - state.slots.keys()) if finish is not None else []
    if finish is not None and state.slots and not unheard and state.seen_prefix() >= finish.num_positions:
        # every announced position has codes in every slot: nothing is missing, nothing to look up
        total = finish.num_positions
        gaps = [g for g in (*finish.gaps, *state.producer_gaps) if g.end > g.start]
        everything = np.arange(total, dtype=np.int64)
        return _Coverage(total, finish.num_prompt_tokens, gaps, everything, everything)
    seen = state.seen_positions()
    if finish is not None:
        total, num_prompt = finish.num_positions, finish.num_prompt_tokens
        gaps = [*finish.gaps, *state.producer_gaps]
        missing_reason = pb.GAP_REASON_MISSING
    else:  # no finish: the request ends where its codes end, and the rest is unknown
        total = max((int(p[-1]) + 1 for p in seen.values() if len(p)), default=0)
        num_prompt = state.first_generated_position(default=total)
        gaps = [*state.producer_gaps]
        gaps += [pb.Gap(slot=s, start=total, end=OPEN_ENDED, reason=ended) for s in state.slots]
        missing_reason = ended
    gaps = [g for g in gaps if g.end > g.start]  # an empty range says nothing: never report it
    if not state.slots and total:
        # no codes ever arrived: no SAE is known for this request, so the gap covers every slot
        gaps.append(pb.Gap(slot=ALL_SLOTS, start=0, end=total, reason=missing_reason))
    if state.slots:  # announced slots no producer ever sent codes for: missing everywhere
        gaps += [pb.Gap(slot=slot, start=0, end=total, reason=missing_reason) for slot in unheard if total]
    for slot, gslot in sorted(state.slots.items()):
        for start, end in missing_ranges(total, seen.get(gslot, _NONE), _gaps_of_slot(gaps, slot)):
            gaps.append(pb.Gap(slot=slot, start=start, end=end, reason=missing_reason))
    everywhere = None
    for gslot in sorted(set(state.slots.values())):
        positions = seen.get(gslot, _NONE)
        everywhere = positions if everywhere is None else np.intersect1d(everywhere, positions)
    everywhere = _NONE if everywhere is None else everywhere[everywhere < total]
    anywhere = np.unique(np.concatenate(list(seen.values()) or [_NONE]))
    return _Coverage(total, num_prompt, gaps, everywhere, anywhere[anywhere < total])


class ReportBuilder:
    """Turns a request's open state into its final report; holds what every report needs to name SAEs."""

    def __init__(self, registry: SaeRegistry, max_evidence_tokens: int, fidelity: FidelityPolicy) -> None:
        self.registry = registry
        self.max_evidence_tokens = max_evidence_tokens
        self.fidelity = fidelity

    def build(
        self,
        state: RequestState,
        finish: pb.RequestFinish | None,
        circuits: CircuitSet,
        now: int,
        ended: int = pb.GAP_REASON_STREAM_ENDED,
    ) -> pb.Report:
        """The final report (the state's term plan must be current: the core ensures it). Without a finish, what
        did not arrive is a gap of reason `ended`."""
        coverage = _coverage(state, finish, ended)
        gslot_to_slot = {g: s for s, g in state.slots.items()}
        evaluator = state.evaluator(coverage.num_prompt, coverage.anywhere)
        matched = evaluator.match_all(circuits)
        flags = [
            flag
            for circuit, positions in zip(circuits.circuits, matched, strict=True)
            if (flag := self._flag(evaluator, circuit, positions, coverage, gslot_to_slot)) is not None
        ]
        total = coverage.total
        complete = finish is not None and not coverage.gaps and (len(coverage.everywhere) == total or total == 0)
        fidelity = [
            self.fidelity.summarize(gslot_to_slot[gslot], gslot, errors, norms)
            for gslot, (errors, norms) in sorted(state.fidelity_rows().items())
            if gslot in gslot_to_slot
        ]
        status = pb.REPORT_STATUS_COMPLETE if complete else pb.REPORT_STATUS_INCOMPLETE
        if any(f.low_fidelity for f in fidelity):
            status = pb.REPORT_STATUS_LOW_FIDELITY
        report = pb.Report(
            request_id=state.request_id,
            response_id=state.response_id,
            notes=state.notes,
            status=status,
            fidelity=fidelity,
            model=(finish.model if finish is not None and finish.model else state.model),
            flags=flags,
            max_severity=max((f.severity for f in flags), default=pb.SEVERITY_UNSPECIFIED),
            coverage=pb.Coverage(positions_total=total, positions_seen=len(coverage.everywhere), gaps=coverage.gaps),
            saes=[self.registry.identities[g].to_proto(gslot_to_slot[g]) for g in sorted(gslot_to_slot)],
            labels=list(finish.labels) if finish is not None and finish.labels else state.labels,
            arrival_unix_nanos=(
                finish.arrival_unix_nanos if finish is not None and finish.arrival_unix_nanos else state.arrival_ns
            ),
            finish_unix_nanos=finish.finish_unix_nanos if finish is not None else 0,
            finalized_unix_nanos=now,
            inputs_received_unix_nanos=state.inputs_received_ns,
            num_prompt_tokens=coverage.num_prompt,
            num_generated_tokens=(
                finish.num_generated_tokens if finish is not None else max(0, total - coverage.num_prompt)
            ),
        )
        report.trace.CopyFrom(finish.trace if finish is not None and finish.trace.traceparent else state.trace)
        return report

    def _flag(
        self,
        evaluator: CircuitEvaluator,
        circuit: Circuit,
        positions: np.ndarray,
        coverage: _Coverage,
        gslot_to_slot: dict[int, int],
    ) -> pb.Flag | None:
        if len(positions) < circuit.min_tokens:
            return None
        flag = pb.Flag(
            circuit=circuit.name,
            severity=circuit.severity,
            labels=list(circuit.labels),
            action=circuit.action,
            matching_tokens=len(positions),
        )
        self._add_evidence(
            flag, evaluator, circuit, positions[: self.max_evidence_tokens], coverage.num_prompt, gslot_to_slot
        )
        return flag

    def _add_evidence(
        self,
        flag: pb.Flag,
        evaluator: CircuitEvaluator,
        circuit: Circuit,
        matched: np.ndarray,
        num_prompt: int,
        gslot_to_slot: dict[int, int],
    ) -> None:
        """The circuit's feature hits inside each matched position's window, grouped by the token they hit. Built
        in place in the flag (`add`): a message built apart is copied again by every parent it is put in, and a
        report under many circuits holds tens of thousands of them."""
        by_position: dict[int, list[tuple[int, int, float]]] = {}
        for term in circuit.terms:
            gslots, positions, acts = evaluator.term_hits(term)
            if not len(positions):
                continue
            after = np.searchsorted(matched, positions, side="left")
            inside = after < len(matched)
            inside[inside] &= matched[after[inside]] - circuit.window + 1 <= positions[inside]
            for gslot, position, act in zip(
                gslots[inside].tolist(), positions[inside].tolist(), acts[inside].tolist(), strict=True
            ):
                by_position.setdefault(position, []).append((gslot_to_slot[gslot], term.feature, act))
        for position in sorted(by_position):
            phase = pb.PHASE_PROMPT if position < num_prompt else pb.PHASE_GENERATED
            token = flag.evidence.add(position=position, token_id=evaluator.token_id_at(position), phase=phase)
            for slot, feature, activation in by_position[position]:
                token.hits.add(slot=slot, feature=feature, activation=activation)


def error_report(state: RequestState, finish: pb.RequestFinish | None, error: str, now: int) -> pb.Report:
    """The report of a request whose report could not be built: it claims nothing (every position of every
    slot is a SIDECAR_ERROR gap) and says why, so the request is still reported, never left open."""
    total = finish.num_positions if finish is not None else 0
    return pb.Report(
        request_id=state.request_id,
        response_id=state.response_id,
        status=pb.REPORT_STATUS_INCOMPLETE,
        model=state.model,
        coverage=pb.Coverage(
            positions_total=total,
            gaps=[pb.Gap(slot=ALL_SLOTS, start=0, end=OPEN_ENDED, reason=pb.GAP_REASON_SIDECAR_ERROR)],
        ),
        labels=state.labels,
        trace=state.trace,
        arrival_unix_nanos=state.arrival_ns,
        finalized_unix_nanos=now,
        inputs_received_unix_nanos=state.inputs_received_ns,
        notes=[*state.notes, f"the sidecar could not build this report: {error}"[:500]],
    )
