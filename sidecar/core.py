"""The sidecar's core: ingest producer streams, keep each open request's state, finalise its report, and answer
reads (reports, queries) over the same data. Periodic maintenance (maintenance.py) and the reviewer's calls,
Contrast and Label (review.py), work over this core's state under its lock.

Everything here is callable in process, so every rule is testable without a network; the gRPC servicer
(service.py) is a thin shell, and errors carry the gRPC status they map to (errors.py). One lock guards request
state, the request table and index writes; reads of sealed index segments need no lock.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from typing import TYPE_CHECKING

import grpc
import numpy as np

from circuitwatch.proto import circuitwatch_pb2 as pb
from circuitwatch.proto.codec import BatchArrays

from .circuits import CircuitSet, check_circuits, load_circuit_files
from .config import ConfigError, SidecarConfig
from .drift import DriftMonitor
from .errors import MonitorError, check_enum
from .fidelity import FidelityPolicy
from .final_reports import FinalReports, one_request
from .index import RollingIndex
from .keys import token_keys
from .maintenance import Maintenance
from .maintenance_worker import MaintenanceWorker
from .queries import IndexQueries
from .registry import SaeRegistry
from .reports import ReportBuilder, error_report, is_covered, merge_gaps
from .request_index import RequestIndex, RequestMeta, counts_as_complete
from .request_sets import FeatureSet, Reduction, SlotCodes
from .request_state import Chunk, RequestState, TermPlan, row_table
from .request_table import RequestRecord, RequestTable
from .review import Review
from .store import EvidenceStore
from .streams import (
    Stream,
    check_finish,
    check_gaps,
    check_start,
    check_wiring,
    decode_batch,
    keep_slices,
    open_stream,
    request_id_ok,
    shown,
)
from .telemetry import Telemetry
from .watchers import ReportWatcher, Watchers

if TYPE_CHECKING:
    from .fleet.exporter import FleetExporter

log = logging.getLogger(__name__)


class IndexedBatch:
    """A code batch in the token index, its slices not yet all added to their requests: what adding them needs,
    built once per batch however many lock sections the adding takes."""

    def __init__(
        self,
        arrays: BatchArrays,
        states: list[RequestState],
        gslots: np.ndarray,
        row_slice: np.ndarray,
        table: np.ndarray,
        fidelity: np.ndarray | None,
        now: int,
        received_ns: int,
    ) -> None:
        self.arrays = arrays
        self.states = states  # per slice
        self.gslots = gslots  # int64 per slice
        self.row_slice = row_slice  # the slice of every row
        self.table = table  # row_table of every row
        self.fidelity = fidelity  # float32 [rows, 2] or None
        self.now = now
        self.received_ns = received_ns  # when the batch came off its stream
        self.row_start, self.post_start = arrays.row_start.tolist(), arrays.post_start.tolist()
        self.slice_gslots, self.slice_phases = gslots.tolist(), arrays.phases.tolist()
        self.candidates: np.ndarray | None = None  # per code: does a term of circuits_version name its feature?
        self.has_candidates: list[bool] = []  # per slice
        self.circuits_version = -1

    def match_terms(self, candidates: np.ndarray, circuits_version: int) -> None:
        """The codes some circuit term (of this circuit set version) names."""
        counted = np.concatenate(([0], np.cumsum(candidates, dtype=np.int64)))
        post_start = self.arrays.post_start
        self.has_candidates = (counted[post_start[1:]] > counted[post_start[:-1]]).tolist()
        self.candidates, self.circuits_version = candidates, circuits_version

    def finishing_first(self) -> tuple[list[int], list[int]]:
        """(slices of requests whose finish came already, the other slices), each in batch order."""
        first, rest = [], []
        for i, state in enumerate(self.states):
            (first if state.pending_finish is not None else rest).append(i)
        return first, rest


class SidecarCore:
    """The monitor behind the `Monitor` service: open requests, the rolling token index, the request-level
    index, circuits, and the evidence store of final reports."""

    def __init__(self, config: SidecarConfig, store: EvidenceStore, clock=time.time_ns) -> None:
        self.config = config
        self.store = store
        self.clock = clock
        idx = config.index
        self.index = RollingIndex(
            idx.window_s, idx.segment_s, idx.segment_max_postings, idx.memory_budget_mb * 2**20, clock=clock
        )
        self.request_index = RequestIndex(int(idx.window_s * 1e9), int(idx.request_index_budget_mb * 2**20))
        self.limits = config.limits
        self.counters: Counter[str] = Counter()
        self.registry = SaeRegistry(max_total_features=self.limits.max_total_features)
        self._reload_lock = threading.Lock()
        self.circuits = self._load_circuits(version=1)
        self.lock = threading.RLock()
        self.requests = RequestTable()
        self.queries = IndexQueries(self.index, self.registry, self.requests, clock)
        self.watchers = Watchers(self.counters)
        self.fidelity = FidelityPolicy(config.fidelity)
        self.drift = DriftMonitor(config.drift, clock)
        self.wiring: dict[int, dict[str, pb.WiringCheck]] = {}  # gslot -> producer instance -> latest check
        self.reports = ReportBuilder(self.registry, config.max_evidence_tokens, self.fidelity)
        self.producer_stats: dict[str, pb.ProducerStats] = {}  # latest per producer instance
        self.instruments = Telemetry(None, None).instruments()  # no-op until the server starts telemetry
        self._open: dict[str, RequestState] = {}
        self.finals = FinalReports(store)
        self._plans: dict[tuple[int, tuple[int, ...]], TermPlan] = {}
        self.maintenance = Maintenance(self)
        self.maintenance_worker = MaintenanceWorker(config.maintenance, self.counters)
        self.review = Review(self)
        self.fleet: FleetExporter | None = None  # set by server.start when fleet.enabled

    # --- ingest ---------------------------------------------------------------------------------------

    def open_stream(self, manifest: pb.Manifest) -> Stream:
        stream = open_stream(manifest, self.registry, self.limits)
        with self.lock:
            for slot, gslot in stream.slots.items():
                baseline = stream.baselines.get(slot)
                self.fidelity.set_baseline(gslot, self.registry.identities[gslot], baseline)
                self.drift.register(gslot, stream.d_sae[slot], baseline)
        self.counters["streams"] += 1
        kind = f"a stream with {len(stream.slots)} slots" if stream.slots else "a control stream"
        log.info("producer %r (%r) opened %s", manifest.instance_id, manifest.producer, kind)
        return stream

    def ingest(self, stream: Stream, message: pb.IngestMessage, received_ns: int | None = None) -> None:
        """`received_ns`: when the message came off its stream (default: now); a report's latency counts from the
        last input it waited for."""
        received_ns = received_ns or self.clock()
        kind = message.WhichOneof("kind")
        if not stream.active and kind != "manifest":
            stream.active = True
            self.registry.mark_used(stream.slots.values())  # from now on its SAEs may be referenced anywhere
        if kind == "codes":
            wall_start = time.perf_counter_ns()
            cpu_start = time.thread_time_ns()  # read inside the wall interval, so the CPU time is within it
            self._ingest_codes(stream, message.codes, received_ns)
            cpu_ns = time.thread_time_ns() - cpu_start
            self.instruments.code_batch(time.perf_counter_ns() - wall_start, cpu_ns)
        elif kind == "start":
            self._start(stream, message.start)
        elif kind == "finish":
            self._finish(stream, message.finish, received_ns)
        elif kind == "gaps":
            self._gaps(stream, message.gaps, received_ns)
        elif kind == "manifest":
            raise MonitorError(grpc.StatusCode.INVALID_ARGUMENT, "a stream carries one manifest, as its first message")
        else:
            raise MonitorError(grpc.StatusCode.INVALID_ARGUMENT, "empty ingest message")

    def _ingest_codes(self, stream: Stream, batch: pb.CodeBatch, received_ns: int) -> None:
        """One code batch (one engine step: many requests, small slices) in whole-batch array operations; per
        slice only the request's bookkeeping runs in Python.

        The batch is decoded and indexed once. Then the slices of requests whose finish came already are added
        to their requests first, and those requests finalised as soon as their own slices are in; the readers
        those reports woke get to send them (Watchers.hand_off) before the step's other slices are added. A
        report waits for its request's last codes, not for the rest of the engine step. Finish markers the batch
        carries (CodeBatch.finishes: the requests the step finished) count as having come first."""
        arrays = decode_batch(stream, batch, self.limits)
        for i, finish in enumerate(batch.finishes):
            check_finish(finish, self.limits, f"codes.finishes[{i}]")
        stream.last_step = batch.step
        stream.batches += 1
        if batch.HasField("stats"):
            self.producer_stats[stream.producer] = batch.stats
            if batch.stats.wiring:
                self._wiring_checks(stream, check_wiring(stream, batch.stats))
        with self.lock:
            self.counters["batches"] += 1
            # finishes carried by the batch are pending before its slices go in, so theirs go first; a request with
            # no slices in the batch is final already if its codes are all in (e.g. the batch of the next step)
            finishing = [self._register_finish(stream, finish, received_ns) for finish in batch.finishes]
            if finishing:
                in_batch = set(arrays.request_ids)
                for state in finishing:
                    if state is not None and state.request_id not in in_batch:
                        self._finalize_if_finished(state)
            indexed = self._index_slices(stream, arrays, received_ns)
            if indexed is not None:
                first, rest = indexed.finishing_first()
                self._add_to_requests(indexed, first)
        if indexed is not None:
            if rest:
                self.watchers.hand_off()
            with self.lock:
                self._add_to_requests(indexed, rest)
                self._observe_drift(indexed)
        if finishing:  # as if they had come right after the batch: those still open are judged now
            with self.lock:
                for state in finishing:
                    if state is not None and self._open.get(state.request_id) is state:
                        self._finalize_if_finished(state)

    def _index_slices(self, stream: Stream, arrays: BatchArrays, received_ns: int) -> IndexedBatch | None:
        """Put the batch's slices in the token index and prepare what adding them to their requests needs; slices
        of requests already final are dropped (late_postings). None if nothing is left (under the lock)."""
        now = self.clock()
        states: dict[str, RequestState | None] = {}
        for request_id in arrays.request_ids:
            if request_id not in states:
                states[request_id] = self._state(request_id, stream, now)
        per_slice = [states[request_id] for request_id in arrays.request_ids]
        live = np.array([state is not None for state in per_slice], bool)
        if not live.all():
            dead = np.flatnonzero(~live)
            self.counters["late_postings"] += int(arrays.posts_per_slice[dead].sum())
            if not live.any():
                return None
            arrays = keep_slices(arrays, np.flatnonzero(live))
            per_slice = [s for s in per_slice if s is not None]
        gslots = np.array([stream.slots[int(slot)] for slot in arrays.slots], np.int64)
        row_slice = arrays.row_slices()
        positions = arrays.positions()
        seqs = np.array([state.seq for state in per_slice], np.int64)
        # one [rows, 2] table of errors and norms for the index and the requests' chunks alike
        fidelity = None if arrays.errors is None else np.stack((arrays.errors, arrays.norms), axis=1)
        uids = self.index.append(
            token_keys(seqs[row_slice], positions),
            gslots[row_slice],
            arrays.phases[row_slice],
            arrays.token_ids,
            arrays.row_offsets,
            arrays.feature_ids,
            arrays.activations,
            fidelity,
        )
        postings = len(arrays.feature_ids)
        stream.postings += postings
        self.counters["postings"] += postings
        self.counters["rows"] += arrays.num_rows
        self.instruments.postings.add(postings)
        return IndexedBatch(
            arrays,
            per_slice,
            gslots,
            row_slice,
            row_table(positions, uids, arrays.token_ids, arrays.codes_per_row),
            fidelity,
            now,
            received_ns,
        )

    def _add_to_requests(self, batch: IndexedBatch, which: list[int]) -> None:
        """Add these slices of an indexed batch to their requests, then judge each request they belong to:
        codes arrived, actions, final if covered (under the lock). A request made final by another thread since
        the batch was indexed gets nothing more (late_postings); after a circuit reload since then, the codes are
        matched against the new terms."""
        if not which:
            return
        arrays = batch.arrays
        if batch.candidates is None or batch.circuits_version != self.circuits.version:
            batch.match_terms(self._candidates(batch.gslots, arrays), self.circuits.version)
        row_start, post_start, states, now = batch.row_start, batch.post_start, batch.states, batch.now
        features, acts, fidelity, table = arrays.feature_ids, arrays.activations, batch.fidelity, batch.table
        candidates, has_candidates = batch.candidates, batch.has_candidates
        slice_gslots, slice_phases, open_ = batch.slice_gslots, batch.slice_phases, self._open
        judged: dict[str, RequestState] = {}
        replaced = []
        for i in which:
            state = states[i]
            r0, r1, p0, p1 = row_start[i], row_start[i + 1], post_start[i], post_start[i + 1]
            if state.request_id not in judged:
                if open_.get(state.request_id) is not state:
                    self.counters["late_postings"] += p1 - p0
                    continue
                judged[state.request_id] = state
                state.ensure_plan(self._plan_for, self.circuits.version)
            chunk = Chunk(
                table[r0:r1], features[p0:p1], acts[p0:p1], 0, fidelity[r0:r1] if fidelity is not None else None
            )
            matching = candidates[p0:p1] if has_candidates[i] else None
            gone = state.add_chunk(slice_gslots[i], chunk, slice_phases[i], now, matching)
            if gone is not None:
                replaced.append(gone)
        for state in judged.values():
            state.input_received(batch.received_ns)
            self.requests.codes_arrived(state.request_id, state.seq, now, state.model, state.arrival_ns)
            self._check_actions(state)
            if state.pending_finish is not None:
                self._finalize_if_covered(state)
        if replaced:
            self.index.supersede(np.concatenate(replaced))

    def _observe_drift(self, batch: IndexedBatch) -> None:
        """Fold the batch's codes, errors and norms into each SAE's drift sums (under the lock)."""
        arrays, gslots = batch.arrays, batch.gslots
        row_gslots = gslots[batch.row_slice]
        posting_gslots = np.repeat(gslots, arrays.posts_per_slice)
        present = np.unique(gslots).tolist()
        for gslot in present:
            rows = row_gslots == gslot
            errors = norms = None
            if arrays.errors is not None:
                measured = rows & ~np.isnan(arrays.errors) & ~np.isnan(arrays.norms)
                errors, norms = arrays.errors[measured], arrays.norms[measured]
            features = arrays.feature_ids[posting_gslots == gslot] if len(present) > 1 else arrays.feature_ids
            self.drift.observe(gslot, features, int(rows.sum()), errors, norms)

    def _wiring_checks(self, stream: Stream, checks: list[pb.WiringCheck]) -> None:
        """A producer's latest wiring verdicts (relayed with its stats): shown by GetHealth; a mis-wired slot's
        reports are low fidelity while the verdict stands. Logged and counted when a verdict changes."""
        with self.lock:
            for check in checks:
                gslot = stream.slots[check.slot]
                by_producer = self.wiring.setdefault(gslot, {})
                previous = by_producer.get(stream.producer)
                by_producer[stream.producer] = check
                self.fidelity.wiring(gslot, stream.producer, check)
                if previous is not None and previous.verdict == check.verdict:
                    continue
                self.counters[
                    f"wiring_{pb.WiringVerdict.Name(check.verdict).removeprefix('WIRING_VERDICT_').lower()}"
                ] += 1
                if check.verdict == pb.WIRING_VERDICT_MISWIRED:
                    log.error("producer %r reports a MIS-WIRED SAE: %s", stream.producer, check.detail)
                elif check.verdict == pb.WIRING_VERDICT_SUSPECT:
                    log.warning("producer %r reports suspect SAE wiring: %s", stream.producer, check.detail)
                else:
                    log.info("producer %r: SAE wiring as expected: %s", stream.producer, check.detail)

    def _candidates(self, gslots: np.ndarray, arrays) -> np.ndarray:
        """bool per code of the batch: does some circuit term name its feature (in its SAE)?"""
        candidates = np.zeros(len(arrays.feature_ids), bool)
        counts = arrays.posts_per_slice
        for gslot in np.unique(gslots).tolist():
            wanted = self._plan_for([gslot]).wanted.get(gslot)
            if wanted is None or not wanted.any():
                continue
            mine = np.repeat(gslots == gslot, counts)
            candidates[mine] = wanted[arrays.feature_ids[mine]]
        return candidates

    def _plan_for(self, gslots: list[int]) -> TermPlan:
        """The term plan of the current circuit set for these SAEs (shared by every request that has them)."""
        key = (self.circuits.version, tuple(gslots))
        plan = self._plans.get(key)
        if plan is None:
            if len(self._plans) > 1024 or any(k[0] != self.circuits.version for k in self._plans):
                self._plans.clear()
            plan = self._plans[key] = TermPlan.build(self.circuits, self.registry, gslots)
        return plan

    def _check_actions(self, state: RequestState) -> None:
        """Circuits with an action (abort) are evaluated as codes arrive; a match is announced once."""
        circuits = [c for c in self.circuits.circuits if c.action and c.name not in state.actions_sent]
        if not circuits or not self.watchers.anyone_acts:
            return
        seen = np.unique(np.concatenate(list(state.seen_positions().values()) or [np.empty(0, np.int64)]))
        num_prompt = state.num_prompt_tokens or state.first_generated_position(
            default=int(seen[-1]) + 1 if len(seen) else 0
        )
        evaluator = state.evaluator(num_prompt, seen)
        for circuit in circuits:
            positions = evaluator.matches(circuit)
            if len(positions) >= circuit.min_tokens:
                state.actions_sent.add(circuit.name)
                self.counters["actions"] += 1
                log.warning("circuit %s asks to %s request %r", circuit.name, circuit.action, state.request_id)
                self.watchers.action(
                    pb.ActionNotice(
                        request_id=state.request_id,
                        circuit=circuit.name,
                        action=circuit.action,
                        severity=circuit.severity,
                        matching_tokens=len(positions),
                        unix_nanos=self.clock(),
                    )
                )

    def _finalize_if_covered(self, state: RequestState) -> None:
        """A finished request whose announced positions all have codes or declared gaps is final now."""
        if state.pending_finish is not None and is_covered(state, state.pending_finish):
            self.finalize(state, state.pending_finish)

    def _state(self, request_id: str, stream: Stream, now: int) -> RequestState | None:
        """Open state for a request, created on first sight; None if it is already final."""
        state = self._open.get(request_id)
        if state is None:
            if self.finals.get(request_id) is not None:
                return None
            if len(self._open) >= self.limits.max_open_requests:
                self.end_least_active(len(self._open) - self.limits.max_open_requests + 1, "max_open_requests")
            state = RequestState(request_id, self.requests.new_seq(), now)
            self._open[request_id] = state
            state.model = stream.manifest.model
        if stream.slots and not stream.slots.items() <= state.slots.items():
            state.bind(stream.slots)
        state.ensure_plan(self._plan_for, self.circuits.version)
        return state

    def _start(self, stream: Stream, start: pb.RequestStart) -> None:
        check_start(start, self.limits)
        with self.lock:
            state = self._state(start.request_id, stream, self.clock())
            if start.resumed and (state is None or state.started):
                self.counters["resumed_starts_known"] += 1  # this sidecar never lost the request
                return
            if state is None:
                return
            state.started = True
            if start.resumed:
                self.counters["resumed_starts"] += 1
            state.model = start.model or state.model
            state.labels = list(start.labels)
            state.trace.CopyFrom(start.trace)
            self._add_gaps(state, start.gaps)
            state.num_prompt_tokens = start.num_prompt_tokens
            state.notes = list(start.notes)
            if start.response_id:
                state.response_id = start.response_id
                self.finals.opened(start.request_id, start.response_id)
            if start.arrival_unix_nanos:
                state.arrival_ns = start.arrival_unix_nanos
            self._finalize_if_covered(state)  # a finish (resent after an outage) may already wait for it

    def _finish(self, stream: Stream, finish: pb.RequestFinish, received_ns: int) -> None:
        check_finish(finish, self.limits)
        with self.lock:
            state = self._register_finish(stream, finish, received_ns)
            if state is not None:
                self._finalize_if_finished(state)

    def _register_finish(self, stream: Stream, finish: pb.RequestFinish, received_ns: int) -> RequestState | None:
        """The request's finish is pending from now on; None if the request is already final (under the lock)."""
        state = self._state(finish.request_id, stream, self.clock())
        if state is None:
            self.counters["duplicate_finishes"] += 1
            return None
        stream.finished += 1
        state.finish_received_ns = received_ns
        state.input_received(received_ns)
        state.pending_finish = finish
        state.finish_deadline_ns = self.clock() + int(self.config.finish_grace_ms * 1e6)
        return state

    def _finalize_if_finished(self, state: RequestState) -> None:
        """Final now if its finish announced no positions, or its announced positions are all covered."""
        if state.pending_finish is not None and state.pending_finish.num_positions == 0:
            self.finalize(state, state.pending_finish)
        else:
            self._finalize_if_covered(state)

    def _gaps(self, stream: Stream, message: pb.RequestGaps, received_ns: int) -> None:
        request_id_ok(message.request_id, "gaps.request_id", self.limits)
        check_gaps(message.request_id, message.gaps, "gaps.gaps", self.limits)
        with self.lock:
            state = self._state(message.request_id, stream, self.clock())
            if state is None:
                return
            self._add_gaps(state, message.gaps)
            state.input_received(received_ns)
            self._finalize_if_covered(state)

    def _add_gaps(self, state: RequestState, gaps) -> None:
        """Declared gaps, merged with the request's earlier ones; more distinct ranges than the bound is an error
        (a producer declares ranges, not positions)."""
        if not gaps:
            return
        merged = merge_gaps([*state.producer_gaps, *gaps])
        if len(merged) > self.limits.max_gaps_per_request:
            raise MonitorError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"request {shown(state.request_id)}: {len(merged)} distinct gap ranges, more than "
                f"limits.max_gaps_per_request ({self.limits.max_gaps_per_request})",
            )
        state.producer_gaps = merged

    def close_stream(self, stream: Stream | None, error: str | None = None) -> None:
        """A producer stream ended; its open requests stay open (the producer may reconnect and go on). SAEs
        only its manifest ever named are retired. Its wiring verdicts go with it: a producer that reconnects
        relays them again with its stats, and one restarted with a fixed configuration is judged afresh."""
        if stream is not None:
            with self.lock:
                for gslot in stream.slots.values():
                    self.wiring.get(gslot, {}).pop(stream.producer, None)
                    self.fidelity.forget_producer(gslot, stream.producer)
            retired = self.registry.release(stream.slots.values())
            if retired:
                self.counters["saes_retired"] += retired
            log.info(
                "producer %r stream closed%s: %d batches, %d postings",
                stream.manifest.instance_id,
                f" ({error})" if error else "",
                stream.batches,
                stream.postings,
            )

    # --- finalisation ---------------------------------------------------------------------------------

    def finalize(
        self, state: RequestState, finish: pb.RequestFinish | None, ended: int = pb.GAP_REASON_STREAM_ENDED
    ) -> pb.Report:
        """Make the request's report final. Never raises for a bad request: a report that cannot be built
        becomes one that claims nothing and says why (the request is reported either way)."""
        started = time.perf_counter_ns()
        try:
            state.ensure_plan(self._plan_for, self.circuits.version)
            report = self.reports.build(state, finish, self.circuits, self.clock(), ended)
        except Exception as exc:
            log.exception("report of %s could not be built; reported as a SIDECAR_ERROR gap", shown(state.request_id))
            self.counters["report_errors"] += 1
            report = error_report(state, finish, f"{type(exc).__name__}: {exc}", self.clock())
        woken = self.finals.add(report)  # durable before anyone sees it as final
        if woken is not None:
            self.watchers.woken(woken)
        record = self.requests.get(state.request_id)
        if record is not None:
            record.finalized(report)
        del self._open[state.request_id]
        self.counters["reports"] += 1
        self.counters["flags"] += len(report.flags)
        self.counters["finalize_ns"] += time.perf_counter_ns() - started
        self.instruments.report(report, state.finish_received_ns)
        self.watchers.report_final(report)
        if record is not None and state.slots:
            self._index_request(state, record, report)
        elif self.fleet is not None:
            self.fleet.report_final(report)
        return report

    def end_least_active(self, count: int, setting: str) -> None:
        """Finalise the `count` least recently active open requests now: incomplete, with SIDECAR_LIMIT gaps
        over what had not arrived (under the lock)."""
        for state in sorted(self._open.values(), key=lambda s: s.last_activity_ns)[:count]:
            state.notes.append(f"finalised early: the sidecar's open requests were over limits.{setting}")
            self.counters["requests_ended_by_limits"] += 1
            self.finalize(state, state.pending_finish, ended=pb.GAP_REASON_SIDECAR_LIMIT)
        if count:
            log.warning("open requests over limits.%s: %d finalised early", setting, count)

    def open_states(self) -> list[RequestState]:
        """The open requests (under the lock)."""
        return list(self._open.values())

    def open_state(self, request_id: str) -> RequestState | None:
        return self._open.get(request_id)

    def is_open(self, request_id: str) -> bool:
        return request_id in self._open

    def _index_request(self, state: RequestState, record: RequestRecord, report: pb.Report) -> None:
        """Number the final request in the request-level index; its feature sets are computed later, off the
        ingest path (the state is final: nothing changes it any more)."""
        bases = self.registry.term_bases  # append-only: a gslot's base never changes
        meta = RequestMeta(
            request_id=state.request_id,
            arrival_ns=report.arrival_unix_nanos,
            finalized_ns=report.finalized_unix_nanos,
            complete=counts_as_complete(report),
            model=report.model,
        )
        reduced = None
        if self.fleet is not None:  # the fleet store gets the same reduction as the local index
            fleet, registry = self.fleet, self.registry

            def reduced(sets: dict[int, FeatureSet], codes: dict[int, SlotCodes]) -> None:
                fleet.request_reduced(report, sets, codes, registry)

        record.ridx = self.request_index.add(
            meta,
            Reduction(state.latest_codes, report.num_prompt_tokens, bases, reduced),
            tuple(report.labels),
            [f.circuit for f in report.flags],
        )

    # --- maintenance (maintenance.py) ------------------------------------------------------------------

    def tick(self) -> None:
        self.maintenance.tick()

    def maintain_request_index(self, now: int | None = None) -> None:
        self.maintenance.maintain_request_index(now)

    def shutdown(self) -> None:
        """Finalise every open request as incomplete (the stream ended) so nothing is left unreported."""
        with self.lock:
            for state in list(self._open.values()):
                self.finalize(state, state.pending_finish)  # never raises: a bad one gets an error report
        if self.fleet is not None:
            self.request_index.reduce(self.lock)  # every final request reaches the exporter before it stops
        self.maintenance_worker.close()

    # --- reads ----------------------------------------------------------------------------------------

    def resolve(self, request_id: str) -> list[str]:
        """The requests an id names: itself when it is a request's key, else every request whose response id
        (the id the API client knows) it is. Clients may reuse response ids; keys are unique."""
        with self.lock:
            is_open = request_id in self._open
        return self.finals.resolve(request_id, is_open)

    def get_report(self, request_id: str, wait_ms: int) -> pb.Report:
        request_id_ok(request_id, "request_id", self.limits)
        request_id = one_request(request_id, self.resolve(request_id))
        wait_ms = min(wait_ms, self.config.max_report_wait_ms)
        with self.lock:
            report = self.finals.get(request_id)
            if report is None:
                event = self.finals.waiter(request_id)
        if report is not None:
            return self.finals.with_feedback(report)
        if wait_ms:
            event.wait(wait_ms / 1000)
        try:
            return self._report_after_wait(request_id, event)
        finally:
            self.watchers.answered(event)

    def _report_after_wait(self, request_id: str, event: threading.Event) -> pb.Report:
        with self.lock:
            report = self.finals.get(request_id)
            state = self._open.get(request_id)
            if report is None and state is None:
                self.finals.drop_waiter(request_id, event)
                raise MonitorError(grpc.StatusCode.NOT_FOUND, f"request {request_id!r} is unknown to this sidecar")
            if report is None:
                return pb.Report(
                    request_id=request_id,
                    response_id=state.response_id,
                    status=pb.REPORT_STATUS_PENDING,
                    model=state.model,
                    labels=state.labels,
                    trace=state.trace,
                    arrival_unix_nanos=state.arrival_ns,
                    notes=state.notes,
                )
        return self.finals.with_feedback(report)  # outside the lock: it may read the evidence store

    def watch(self, flagged_only: bool) -> ReportWatcher:
        return self.watchers.watch_reports(flagged_only)

    def list_reports(self, request: pb.ListReportsRequest) -> list[pb.Report]:
        return self.finals.list(request)

    def query_requests(self, request: pb.QueryRequestsRequest) -> pb.QueryRequestsResponse:
        check_enum(request.scope, pb.Scope, "scope")
        return self.queries.query_requests(request, self.circuits)

    def contrast(self, request: pb.ContrastRequest) -> pb.ContrastResponse:
        """Which features separate the positive requests from the negative ones (review.py, identify.py)."""
        return self.review.contrast(request)

    def label(self, request: pb.LabelRequest) -> pb.LabelResponse:
        """Attach or remove labels after the fact, audited (review.py)."""
        return self.review.label(request)

    def get_codes(self, request_id: str) -> pb.GetCodesResponse:
        request_id_ok(request_id, "request_id", self.limits)
        return self.queries.get_codes(one_request(request_id, self.resolve(request_id)))

    def feature_stats(self, request: pb.FeatureStatsRequest) -> pb.FeatureStatsResponse:
        check_enum(request.scope, pb.Scope, "scope")
        return self.queries.feature_stats(request)

    # --- health ---------------------------------------------------------------------------------------

    def check_drift(self) -> None:
        """Re-evaluate every SAE's drift state (maintenance tick; GetHealth)."""
        with self.lock:
            self.drift.check()

    def health(self) -> pb.HealthResponse:
        """Every SAE's state with its numbers, evaluated now."""
        with self.lock:
            self.drift.check()
            slots = [self.slot_health(gslot) for gslot in sorted(self.drift.slots)]
        d = self.config.drift
        rule = (
            f"drift: with at least {d.min_tokens:g} effective tokens (half-life {d.half_life_tokens:g}), alarm when "
            f"JS divergence >= {d.js_threshold:g} bits, or error >= {d.error_ratio_threshold:g}x calibration, or "
            f"input norm outside 1/{d.norm_ratio_threshold:g}..{d.norm_ratio_threshold:g}x calibration; it clears "
            f"below {d.clear_fraction:g} of each threshold. A producer's wiring check can mark an SAE mis-wired."
        )
        return pb.HealthResponse(slots=slots, rule=rule)

    def slot_health(self, gslot: int) -> pb.SlotHealth:
        """One SAE's health (under the lock)."""
        drift = self.drift.slots[gslot]
        identity = self.registry.identities[gslot]
        metrics = drift.metrics
        health = pb.SlotHealth(
            sae=identity.name,
            weights_hash=identity.weights_hash,
            layer=identity.layer,
            hook_point=identity.hook_point,
            head=identity.head,
            state=drift.state,
            reasons=drift.reasons,
            since_unix_nanos=drift.since_ns,
            tokens=metrics.get("tokens", 0.0),
            js_divergence=metrics.get("js", 0.0),
            error_mean=metrics.get("error_mean", 0.0),
            error_ratio=metrics.get("error_ratio", 0.0),
            norm_mean=metrics.get("norm_mean", 0.0),
            norm_ratio=metrics.get("norm_ratio", 0.0),
            dead_fraction=metrics.get("dead_fraction", 0.0),
            dense_fraction=metrics.get("dense_fraction", 0.0),
            l0_mean=metrics.get("l0_mean", 0.0),
        )
        if drift.baseline is not None:
            health.baseline.CopyFrom(drift.baseline)
            health.baseline.ClearField("firing_frequencies")
        for producer, check in self.wiring.get(gslot, {}).items():
            health.wiring[producer].CopyFrom(check)
            if check.verdict == pb.WIRING_VERDICT_MISWIRED:
                health.state = pb.SLOT_STATE_MISWIRED
                health.reasons.append(f"{producer}: {check.detail}")
        return health

    # --- circuits -------------------------------------------------------------------------------------

    def reload_circuits(self) -> pb.ReloadCircuitsResponse:
        """Re-read the circuit files (SIGHUP, ReloadCircuits). Never raises: a file that cannot be used leaves
        the current circuits active and the answer says why. Reloads are serialised, so two at once cannot
        share a version."""
        with self._reload_lock:
            try:
                circuits = self._load_circuits(version=self.circuits.version + 1)
            except Exception as exc:  # ConfigError, or anything a broken file provokes: the sidecar stays up
                error = str(exc) if isinstance(exc, ConfigError) else f"{type(exc).__name__}: {exc}"
                log.error("circuit reload refused, keeping %d circuits: %s", len(self.circuits.circuits), error)
                self.counters["reload_failures"] += 1
                return pb.ReloadCircuitsResponse(ok=False, error=error[:2000], circuits=self.circuits.names)
            with self.lock:
                self.circuits = circuits
        log.info("circuits reloaded: %s", ", ".join(circuits.names) or "(none)")
        return pb.ReloadCircuitsResponse(ok=True, circuits=circuits.names)

    def _load_circuits(self, version: int) -> CircuitSet:
        """The configured circuit files, checked against the limits and the SAEs registered so far."""
        circuits = load_circuit_files(self.config.circuits, version=version)
        if self.config.circuits and not circuits.circuits and not self.config.allow_empty_circuits:
            files = ", ".join(str(p) for p in self.config.circuits)
            if version > 1 and self.circuits.circuits:  # a reload would switch every circuit off
                raise ConfigError(
                    f"{files}: no circuit at all: the reload would stop monitoring every circuit "
                    "(set allow_empty_circuits: true if that is meant)"
                )
            log.warning("%s: no circuit at all yet: reports are made, nothing can be flagged", files)
        for warning in check_circuits(circuits, self.registry, self.limits, self.config.unknown_circuit_terms):
            log.warning("%s", warning)
            self.counters["circuit_warnings"] += 1
        return circuits

    def set_circuits(self, circuits: CircuitSet) -> None:
        with self.lock:
            self.circuits = CircuitSet(circuits.circuits, self.circuits.version + 1, circuits.sources)
