"""The sidecar's core: ingest producer streams, keep request state and the rolling index, finalise reports.

Transport-free (the gRPC servicer in service.py is a thin shell over it), so every rule here is testable in
process and the same object serves ingest, waits, watches and queries. One lock guards request state and
index writes; reads of sealed index segments need no lock.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass, field

import grpc
import numpy as np

from circuitwatch.proto import circuitwatch_pb2 as pb
from circuitwatch.proto.codec import WireFormatError, pack_slice, unpack_slice

from .circuits import Circuit, CircuitSet, load_circuit_files
from .config import ConfigError, SidecarConfig
from .errors import MonitorError
from .expressions import Expr, ExpressionError, Term, evaluate, from_proto, key_positions, key_requests
from .identify import Resolved, contrast
from .index import RollingIndex, TimeWindow
from .registry import SaeIdentity, SaeRegistry
from .request_index import RequestIndex, RequestMeta, request_feature_sets
from .requests import RequestState, missing_ranges
from .store import EvidenceStore
from .telemetry import Telemetry

log = logging.getLogger(__name__)

OPEN_ENDED = 0xFFFFFFFF  # Gap.end when the request's length is unknown (it never finished)
ALL_SLOTS = 0xFFFFFFFF  # Gap.slot when a gap covers every slot
RECENT_REPORTS = 10_000
WATCH_QUEUE = 1_000
MATCH_POSITIONS = 64  # positions listed per matching request in a query answer


@dataclass
class Stream:
    manifest: pb.Manifest
    slots: dict[int, int]  # producer slot -> gslot
    d_sae: dict[int, int]
    last_step: int = -1
    batches: int = 0
    postings: int = 0
    finished: int = 0


@dataclass
class RequestRecord:
    """The index's request table entry: a request's token keys are (seq << 32 | position)."""

    request_id: str
    seq: int
    last_seen_ns: int
    model: str = ""
    labels: tuple[str, ...] = ()
    trace: pb.TraceContext | None = None
    arrival_ns: int = 0
    num_positions: int = 0
    status: int = pb.REPORT_STATUS_PENDING
    ridx: int | None = None  # its number in the request-level index, once final


@dataclass
class _Watcher:
    flagged_only: bool
    queue: queue.Queue = field(default_factory=lambda: queue.Queue(WATCH_QUEUE))
    dropped: int = 0


class Monitor:
    def __init__(self, config: SidecarConfig, store: EvidenceStore, clock=time.time_ns) -> None:
        self.config = config
        self.store = store
        self.clock = clock
        idx = config.index
        self.index = RollingIndex(
            idx.window_s, idx.segment_s, idx.segment_max_postings, idx.memory_budget_mb * 2**20, clock=clock
        )
        self.request_index = RequestIndex(int(idx.window_s * 1e9), int(idx.request_index_budget_mb * 2**20))
        self.registry = SaeRegistry()
        self.circuits = load_circuit_files(config.circuits, version=1)
        self.counters: Counter[str] = Counter()
        self._lock = threading.RLock()
        self._open: dict[str, RequestState] = {}
        self._recent: OrderedDict[str, pb.Report] = OrderedDict()
        self.requests: dict[int, RequestRecord] = {}  # seq -> record, for requests with codes in the index
        self._seq_by_id: dict[str, int] = {}
        self._next_seq = 1
        self._waiters: dict[str, threading.Event] = {}
        self._watchers: list[_Watcher] = []
        self._action_watchers: list[queue.Queue] = []
        self.report_listeners: list = []  # callables(report), e.g. the span exporter
        self.producer_stats: dict[str, pb.ProducerStats] = {}  # latest per producer instance
        self.instruments = Telemetry(None, None).instruments()  # no-op until the server starts telemetry

    # --- ingest ---------------------------------------------------------------------------------------

    def open_stream(self, manifest: pb.Manifest) -> Stream:
        if manifest.contract_version < 1:
            raise MonitorError(grpc.StatusCode.INVALID_ARGUMENT, "manifest: contract_version must be >= 1")
        slots: dict[int, int] = {}
        d_sae: dict[int, int] = {}
        for i, slot in enumerate(manifest.slots):
            where = f"manifest.slots[{i}] (slot {slot.slot})"
            if slot.slot in slots:
                raise MonitorError(grpc.StatusCode.INVALID_ARGUMENT, f"{where}: slot number used twice")
            for name in ("name", "architecture", "weights_hash", "hook_point"):
                if not getattr(slot, name):
                    raise MonitorError(grpc.StatusCode.INVALID_ARGUMENT, f"{where}: {name} is required")
            if slot.d_in == 0 or slot.d_sae == 0:
                raise MonitorError(grpc.StatusCode.INVALID_ARGUMENT, f"{where}: d_in and d_sae must be > 0")
            if slot.d_sae > 1 << 28:
                raise MonitorError(grpc.StatusCode.INVALID_ARGUMENT, f"{where}: d_sae {slot.d_sae} exceeds 2^28")
            try:
                slots[slot.slot] = self.registry.register(SaeIdentity.from_proto(slot), slot.slot)
            except ValueError as exc:
                raise MonitorError(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{where}: {exc}") from None
            d_sae[slot.slot] = slot.d_sae
        self.counters["streams"] += 1
        if not slots:
            log.info("producer %s (%s) opened a control stream", manifest.instance_id, manifest.producer)
            return Stream(manifest, slots, d_sae)
        log.info("producer %s (%s) opened a stream with %d slots", manifest.instance_id, manifest.producer, len(slots))
        return Stream(manifest, slots, d_sae)

    def ingest(self, stream: Stream, message: pb.IngestMessage) -> None:
        kind = message.WhichOneof("kind")
        if kind == "codes":
            self._ingest_codes(stream, message.codes)
        elif kind == "start":
            self._start(stream, message.start)
        elif kind == "finish":
            self._finish(stream, message.finish)
        elif kind == "gaps":
            self._gaps(stream, message.gaps)
        elif kind == "manifest":
            raise MonitorError(grpc.StatusCode.INVALID_ARGUMENT, "a stream carries one manifest, as its first message")
        else:
            raise MonitorError(grpc.StatusCode.INVALID_ARGUMENT, "empty ingest message")

    def _ingest_codes(self, stream: Stream, batch: pb.CodeBatch) -> None:
        if batch.step <= stream.last_step:
            raise MonitorError(
                grpc.StatusCode.INVALID_ARGUMENT, f"code batch step {batch.step} after step {stream.last_step}"
            )
        decoded = []
        for i, message in enumerate(batch.slices):  # validate the whole batch before applying any of it
            if message.slot not in stream.slots:
                raise MonitorError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"slices[{i}] request {message.request_id!r}: slot {message.slot} is not in the manifest",
                )
            try:
                decoded.append(unpack_slice(message, d_sae=stream.d_sae[message.slot]))
            except WireFormatError as exc:
                raise MonitorError(grpc.StatusCode.INVALID_ARGUMENT, f"slices[{i}]: {exc}") from None
        stream.last_step = batch.step
        stream.batches += 1
        if batch.HasField("stats"):
            self.producer_stats[stream.manifest.instance_id or "unknown"] = batch.stats
        touched: dict[str, RequestState] = {}
        with self._lock:
            now = self.clock()
            for arrays in decoded:
                state = self._state(arrays.request_id, stream, now)
                if state is None:
                    self.counters["late_postings"] += len(arrays.feature_ids)
                    continue
                gslot = stream.slots[arrays.slot]
                keys = (np.uint64(state.seq) << np.uint64(32)) | arrays.positions.astype(np.uint64)
                uids = self.index.append(
                    keys,
                    gslot,
                    arrays.phase,
                    arrays.token_ids,
                    arrays.row_offsets,
                    arrays.feature_ids,
                    arrays.activations,
                )
                replaced = state.add_slice(gslot, arrays, uids, now)
                self.index.supersede(replaced)
                touched[state.request_id] = state
                record = self.requests.get(state.seq)
                if record is None:
                    self._seq_by_id[state.request_id] = state.seq
                    self.requests[state.seq] = RequestRecord(
                        state.request_id, state.seq, now, state.model, arrival_ns=state.arrival_ns
                    )
                else:
                    record.last_seen_ns = now
                stream.postings += len(arrays.feature_ids)
                self.counters["postings"] += len(arrays.feature_ids)
                self.counters["rows"] += arrays.num_rows
            self.counters["batches"] += 1
            self.instruments.postings.add(sum(len(a.feature_ids) for a in decoded))
            for state in touched.values():
                self._check_actions(state)
                if state.pending_finish is not None:
                    self._finalize_if_covered(state)

    def _check_actions(self, state: RequestState) -> None:
        """Circuits with an action (abort) are evaluated as codes arrive; a match is announced once."""
        circuits = [c for c in self.circuits.circuits if c.action and c.name not in state.actions_sent]
        if not circuits or not self._action_watchers:
            return
        seen = np.unique(np.concatenate(list(state.seen_positions().values()) or [np.empty(0, np.int64)]))
        num_prompt = state.num_prompt_tokens or state.first_generated_position(
            default=int(seen[-1]) + 1 if len(seen) else 0
        )
        for circuit in circuits:
            positions = state.evaluate(circuit, num_prompt, seen)
            if len(positions) >= circuit.min_tokens:
                state.actions_sent.add(circuit.name)
                notice = pb.ActionNotice(
                    request_id=state.request_id,
                    circuit=circuit.name,
                    action=circuit.action,
                    severity=circuit.severity,
                    matching_tokens=len(positions),
                    unix_nanos=self.clock(),
                )
                self.counters["actions"] += 1
                log.warning("circuit %s asks to %s request %s", circuit.name, circuit.action, state.request_id)
                for watcher in list(self._action_watchers):
                    try:
                        watcher.put_nowait(notice)
                    except queue.Full:
                        self.counters["actions_dropped"] += 1

    def watch_actions(self) -> queue.Queue:
        watcher: queue.Queue = queue.Queue(WATCH_QUEUE)
        with self._lock:
            self._action_watchers.append(watcher)
        return watcher

    def unwatch_actions(self, watcher: queue.Queue) -> None:
        with self._lock:
            if watcher in self._action_watchers:
                self._action_watchers.remove(watcher)

    def _finalize_if_covered(self, state: RequestState) -> None:
        """A finished request whose announced positions all have codes or declared gaps is final now."""
        finish = state.pending_finish
        if finish is None or not state.slots:
            return
        seen = state.seen_positions()
        gaps = [*finish.gaps, *state.producer_gaps]
        for slot, gslot in state.slots.items():
            known = [(g.start, g.end) for g in gaps if g.slot in (slot, ALL_SLOTS)]
            if missing_ranges(finish.num_positions, seen.get(gslot, np.empty(0, np.int64)), known):
                return
        self._finalize(state, finish)

    def _state(self, request_id: str, stream: Stream, now: int) -> RequestState | None:
        """Open state for a request, created on first sight; None if it is already final."""
        state = self._open.get(request_id)
        if state is None:
            if request_id in self._recent or self.store.get(request_id) is not None:
                return None
            state = RequestState(request_id, self._next_seq, now)
            self._next_seq += 1
            self._open[request_id] = state
            state.model = stream.manifest.model
        if stream.slots and state.slots != stream.slots:
            state.bind(stream.slots)
        state.ensure_plan(self.circuits, self.registry)
        return state

    def _start(self, stream: Stream, start: pb.RequestStart) -> None:
        if not start.request_id:
            raise MonitorError(grpc.StatusCode.INVALID_ARGUMENT, "request start without request_id")
        with self._lock:
            state = self._state(start.request_id, stream, self.clock())
            if state is None:
                return
            state.model = start.model or state.model
            state.labels = list(start.labels)
            state.trace.CopyFrom(start.trace)
            state.producer_gaps.extend(start.gaps)
            state.num_prompt_tokens = start.num_prompt_tokens
            if start.arrival_unix_nanos:
                state.arrival_ns = start.arrival_unix_nanos

    def _finish(self, stream: Stream, finish: pb.RequestFinish) -> None:
        if not finish.request_id:
            raise MonitorError(grpc.StatusCode.INVALID_ARGUMENT, "request finish without request_id")
        with self._lock:
            state = self._state(finish.request_id, stream, self.clock())
            if state is None:
                self.counters["duplicate_finishes"] += 1
                return
            stream.finished += 1
            state.finish_received_ns = self.clock()
            state.pending_finish = finish
            state.finish_deadline_ns = self.clock() + int(self.config.finish_grace_ms * 1e6)
            if finish.num_positions == 0 or state.slots:
                if finish.num_positions == 0:
                    self._finalize(state, finish)
                else:
                    self._finalize_if_covered(state)

    def _gaps(self, stream: Stream, message: pb.RequestGaps) -> None:
        if not message.request_id:
            raise MonitorError(grpc.StatusCode.INVALID_ARGUMENT, "request gaps without request_id")
        with self._lock:
            state = self._state(message.request_id, stream, self.clock())
            if state is None:
                return
            state.producer_gaps.extend(message.gaps)
            self._finalize_if_covered(state)

    def close_stream(self, stream: Stream | None, error: str | None = None) -> None:
        """A producer stream ended; its open requests stay open (the producer may reconnect and go on)."""
        if stream is not None:
            log.info(
                "producer %s stream closed%s: %d batches, %d postings",
                stream.manifest.instance_id,
                f" ({error})" if error else "",
                stream.batches,
                stream.postings,
            )

    # --- finalisation ---------------------------------------------------------------------------------

    def _finalize(self, state: RequestState, finish: pb.RequestFinish | None) -> pb.Report:
        started = time.perf_counter_ns()
        now = self.clock()
        state.ensure_plan(self.circuits, self.registry)
        seen = state.seen_positions()
        gslot_to_slot = {g: s for s, g in state.slots.items()}
        if finish is not None:
            total = finish.num_positions
            num_prompt = finish.num_prompt_tokens
            gaps = [*finish.gaps, *state.producer_gaps]
            missing_reason = pb.GAP_REASON_MISSING
        else:
            known = [int(p[-1]) + 1 for p in seen.values() if len(p)]
            total = max(known, default=0)
            num_prompt = state.first_generated_position(default=total)
            gaps = [*state.producer_gaps]
            gaps += [
                pb.Gap(slot=s, start=total, end=OPEN_ENDED, reason=pb.GAP_REASON_STREAM_ENDED) for s in state.slots
            ]
            missing_reason = pb.GAP_REASON_STREAM_ENDED
        gaps = [g for g in gaps if g.end > g.start]  # an empty range says nothing: never report it
        if not state.slots and total:
            # no codes ever arrived: no SAE is known for this request, so the gap covers every slot
            gaps.append(pb.Gap(slot=ALL_SLOTS, start=0, end=total, reason=missing_reason))
        for slot, gslot in sorted(state.slots.items()):
            known_gaps = [(g.start, g.end) for g in gaps if g.slot in (slot, ALL_SLOTS)]
            for start, end in missing_ranges(total, seen.get(gslot, np.empty(0, np.int64)), known_gaps):
                gaps.append(pb.Gap(slot=slot, start=start, end=end, reason=missing_reason))
        gslots = sorted(set(state.slots.values()))
        everywhere = None
        for gslot in gslots:
            positions = seen.get(gslot, np.empty(0, np.int64))
            everywhere = positions if everywhere is None else np.intersect1d(everywhere, positions)
        everywhere = np.empty(0, np.int64) if everywhere is None else everywhere[everywhere < total]
        anywhere = np.unique(np.concatenate(list(seen.values()) or [np.empty(0, np.int64)]))
        anywhere = anywhere[anywhere < total]

        flags = [
            flag
            for circuit in self.circuits.circuits
            if (flag := self._flag(state, circuit, num_prompt, anywhere, gslot_to_slot)) is not None
        ]
        complete = finish is not None and not gaps and (len(everywhere) == total or total == 0)
        report = pb.Report(
            request_id=state.request_id,
            status=pb.REPORT_STATUS_COMPLETE if complete else pb.REPORT_STATUS_INCOMPLETE,
            model=(finish.model if finish is not None and finish.model else state.model),
            flags=flags,
            max_severity=max((f.severity for f in flags), default=pb.SEVERITY_UNSPECIFIED),
            coverage=pb.Coverage(positions_total=total, positions_seen=len(everywhere), gaps=gaps),
            saes=[self.registry.identities[g].to_proto(gslot_to_slot[g]) for g in gslots],
            labels=list(finish.labels) if finish is not None and finish.labels else state.labels,
            arrival_unix_nanos=(
                finish.arrival_unix_nanos if finish is not None and finish.arrival_unix_nanos else state.arrival_ns
            ),
            finish_unix_nanos=finish.finish_unix_nanos if finish is not None else 0,
            finalized_unix_nanos=now,
            num_prompt_tokens=num_prompt,
            num_generated_tokens=finish.num_generated_tokens if finish is not None else max(0, total - num_prompt),
        )
        trace = finish.trace if finish is not None and finish.trace.traceparent else state.trace
        report.trace.CopyFrom(trace)
        self.store.put(report)  # durable before anyone sees it as final
        record = self.requests.get(state.seq)
        if record is not None:
            record.model, record.labels, record.trace = report.model, tuple(report.labels), report.trace
            record.arrival_ns, record.num_positions, record.status = report.arrival_unix_nanos, total, report.status
        del self._open[state.request_id]
        self._recent[state.request_id] = report
        while len(self._recent) > RECENT_REPORTS:
            self._recent.popitem(last=False)
        self.counters["reports"] += 1
        self.counters["flags"] += len(flags)
        self.counters["finalize_ns"] += time.perf_counter_ns() - started
        self.instruments.report(report, state.finish_received_ns)
        event = self._waiters.pop(state.request_id, None)
        if event is not None:
            event.set()
        self._publish(report)
        if record is not None and state.slots:
            self._index_request(state, record, report, num_prompt)
        return report

    def _index_request(self, state: RequestState, record: RequestRecord, report: pb.Report, num_prompt: int) -> None:
        """Number the final request in the request-level index; its feature sets are computed later, off the
        ingest path (the state is final: nothing changes it any more)."""
        bases = self.registry.term_bases  # append-only: a gslot's base never changes
        meta = RequestMeta(
            request_id=state.request_id,
            arrival_ns=report.arrival_unix_nanos,
            finalized_ns=report.finalized_unix_nanos,
            complete=report.status == pb.REPORT_STATUS_COMPLETE,
        )
        record.ridx = self.request_index.add(
            meta,
            lambda: request_feature_sets(state.latest_codes(), num_prompt, bases),
            tuple(report.labels),
            [f.circuit for f in report.flags],
        )

    def _flag(
        self, state: RequestState, circuit: Circuit, num_prompt: int, seen: np.ndarray, gslot_to_slot: dict[int, int]
    ) -> pb.Flag | None:
        positions = state.evaluate(circuit, num_prompt, seen)
        if len(positions) < circuit.min_tokens:
            return None
        flag = pb.Flag(
            circuit=circuit.name,
            severity=circuit.severity,
            labels=list(circuit.labels),
            action=circuit.action,
            matching_tokens=len(positions),
        )
        flag.evidence.extend(
            self._evidence(state, circuit, positions[: self.config.max_evidence_tokens], num_prompt, gslot_to_slot)
        )
        return flag

    def _evidence(
        self,
        state: RequestState,
        circuit: Circuit,
        matched: np.ndarray,
        num_prompt: int,
        gslot_to_slot: dict[int, int],
    ) -> list[pb.EvidenceToken]:
        """The circuit's feature hits inside each matched position's window, grouped by the token they hit."""
        by_position: dict[int, list[pb.FeatureHit]] = {}
        for term in circuit.terms:
            for gslot in self.registry.resolve(term, among=sorted(gslot_to_slot)):
                positions, acts = state.term_hits_in(gslot, term)
                if not len(positions):
                    continue
                after = np.searchsorted(matched, positions, side="left")
                inside = after < len(matched)
                inside[inside] &= matched[after[inside]] - circuit.window + 1 <= positions[inside]
                for position, act in zip(positions[inside].tolist(), acts[inside].tolist(), strict=True):
                    by_position.setdefault(position, []).append(
                        pb.FeatureHit(slot=gslot_to_slot[gslot], feature=term.feature, activation=act)
                    )
        ordered = sorted(by_position)
        token_ids = state.token_ids_at(np.asarray(ordered, dtype=np.int64)) if ordered else []
        return [
            pb.EvidenceToken(
                position=p,
                token_id=int(t),
                phase=pb.PHASE_PROMPT if p < num_prompt else pb.PHASE_GENERATED,
                hits=by_position[p],
            )
            for p, t in zip(ordered, token_ids, strict=True)
        ]

    def _publish(self, report: pb.Report) -> None:
        for watcher in list(self._watchers):
            if watcher.flagged_only and not report.flags:
                continue
            try:
                watcher.queue.put_nowait(report)
            except queue.Full:
                watcher.dropped += 1
                self.counters["watch_dropped"] += 1
        for listener in list(self.report_listeners):
            try:
                listener(report)
            except Exception:  # a listener (e.g. an exporter) must never break finalisation
                log.exception("report listener failed for %s", report.request_id)

    # --- maintenance ----------------------------------------------------------------------------------

    def tick(self) -> None:
        """Periodic: evict the index, finalise requests idle past the timeout, forget evicted request ids."""
        now = self.clock()
        self.index.evict(now)
        timeout_ns = int(self.config.request_timeout_s * 1e9)
        with self._lock:
            for state in [
                s for s in self._open.values() if s.pending_finish is not None and now >= s.finish_deadline_ns
            ]:
                log.warning(
                    "request %s: codes announced by its finish did not all arrive; finalised incomplete",
                    state.request_id,
                )
                self._finalize(state, state.pending_finish)
            for state in [s for s in self._open.values() if now - s.last_activity_ns > timeout_ns]:
                log.warning(
                    "request %s saw no finish within %.0fs: finalised incomplete", state.request_id, timeout_ns / 1e9
                )
                self._finalize(state, None)
            oldest = self.index.oldest_time
            horizon = now - self.index.window_ns if oldest is None else min(oldest, now - self.index.window_ns)
            for seq in [s for s, record in self.requests.items() if record.last_seen_ns < horizon]:
                self._seq_by_id.pop(self.requests.pop(seq).request_id, None)
        self.request_index.seal(self._lock)  # reduces and builds outside the lock
        with self._lock:
            early = self.request_index.evict(now)
            if early:
                self.counters["requests_evicted_for_budget"] += early
                log.warning(
                    "request index over index.request_index_budget_mb: %d requests left contrast queries before the "
                    "end of the window",
                    early,
                )

    def shutdown(self) -> None:
        """Finalise every open request as incomplete (the stream ended) so nothing is left unreported."""
        with self._lock:
            for state in list(self._open.values()):
                self._finalize(state, state.pending_finish)

    # --- reads ----------------------------------------------------------------------------------------

    def get_report(self, request_id: str, wait_ms: int) -> pb.Report:
        if not request_id:
            raise MonitorError(grpc.StatusCode.INVALID_ARGUMENT, "request_id is required")
        wait_ms = min(wait_ms, self.config.max_report_wait_ms)
        with self._lock:
            report = self._final(request_id)
            if report is None:
                event = self._waiters.setdefault(request_id, threading.Event())
        if report is not None:
            return self._with_feedback(report)
        if wait_ms:
            event.wait(wait_ms / 1000)
        with self._lock:
            report = self._final(request_id)
            state = self._open.get(request_id)
            if report is None and state is None:
                if not event.is_set() and self._waiters.get(request_id) is event:
                    del self._waiters[request_id]
                raise MonitorError(grpc.StatusCode.NOT_FOUND, f"request {request_id!r} is unknown to this sidecar")
            if report is None:
                return pb.Report(
                    request_id=request_id,
                    status=pb.REPORT_STATUS_PENDING,
                    model=state.model,
                    labels=state.labels,
                    trace=state.trace,
                    arrival_unix_nanos=state.arrival_ns,
                )
        return self._with_feedback(report)  # outside the lock: it may read the evidence store

    def _final(self, request_id: str) -> pb.Report | None:
        report = self._recent.get(request_id)
        return report if report is not None else self.store.get(request_id)

    def _with_feedback(self, report: pb.Report) -> pb.Report:
        """The report as read by clients: with the label changes made after it was final (the store answers
        from memory for the many requests that have none)."""
        changes = self.store.feedback(report.request_id)
        if not changes:
            return report
        answer = pb.Report()
        answer.CopyFrom(report)  # the cached report stays as it was finalised
        for unix_nanos, operation, label, author, note in changes:
            answer.feedback.add(unix_nanos=unix_nanos, operation=operation, label=label, author=author, note=note)
        return answer

    def watch(self, flagged_only: bool) -> _Watcher:
        watcher = _Watcher(flagged_only)
        with self._lock:
            self._watchers.append(watcher)
        return watcher

    def unwatch(self, watcher: _Watcher) -> None:
        with self._lock:
            if watcher in self._watchers:
                self._watchers.remove(watcher)

    def list_reports(self, request: pb.ListReportsRequest) -> list[pb.Report]:
        reports = self.store.list(
            request.window.start_unix_nanos,
            request.window.end_unix_nanos,
            list(request.request_ids),
            request.flagged_only,
            request.limit or 100,
        )
        return [self._with_feedback(r) for r in reports]

    def query_requests(self, request: pb.QueryRequestsRequest) -> pb.QueryRequestsResponse:
        what = request.WhichOneof("what")
        if what == "circuit":
            circuit = self.circuits.by_name(request.circuit)
            if circuit is None:
                raise MonitorError(grpc.StatusCode.NOT_FOUND, f"circuit {request.circuit!r} is not loaded")
            expr, scope, window, min_tokens = circuit.expression, circuit.scope, circuit.window, circuit.min_tokens
        elif what == "expression":
            try:
                expr = from_proto(request.expression)
            except ExpressionError as exc:
                raise MonitorError(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
            scope, window, min_tokens = pb.SCOPE_BOTH, 1, 1
        else:
            raise MonitorError(grpc.StatusCode.INVALID_ARGUMENT, "give a circuit name or an expression")
        scope = request.scope or scope
        min_tokens = request.min_tokens or min_tokens
        time_window = self._window(request.window)
        keys = evaluate(expr, _IndexKeys(self, time_window, scope), window)
        response = pb.QueryRequestsResponse()
        seqs = key_requests(keys)  # keys are sorted, so each request's keys are one run
        starts = np.flatnonzero(np.concatenate(([True], seqs[1:] != seqs[:-1]))) if len(seqs) else np.empty(0, int)
        counts = np.diff(np.append(starts, len(seqs)))
        keep = counts >= min_tokens
        starts, counts = starts[keep], counts[keep]
        limit = request.limit or 1000
        known = self.requests
        runs = zip(seqs[starts].tolist(), starts.tolist(), counts.tolist(), strict=True)
        matching = [(seq, start, count) for seq, start, count in runs if seq in known]
        response.total_matches = len(matching)
        positions = key_positions(keys).tolist()
        for seq, start, count in matching[:limit]:
            response.matches.add(
                request_id=known[seq].request_id,
                matching_tokens=count,
                positions=positions[start : start + min(count, MATCH_POSITIONS)],
            )
        oldest = self.index.oldest_time
        if oldest is not None and time_window.start <= oldest and time_window.end >= self.clock():
            response.requests_scanned = len(known)
        else:
            response.requests_scanned = sum(
                1
                for r in list(known.values())
                if r.arrival_ns <= time_window.end and r.last_seen_ns >= time_window.start
            )
        return response

    def contrast(self, request: pb.ContrastRequest) -> pb.ContrastResponse:
        """Which features separate the positive requests from the negative ones (see identify.py)."""
        started = time.perf_counter()
        scope = request.scope or pb.SCOPE_BOTH
        selectors = {"positives": request.positives, "negatives": request.negatives}
        if request.HasField("truth"):
            selectors["truth.requests"] = request.truth.requests
        matching_seqs = {
            name: self._expression_seqs(name, selector.expression, scope, request.window)
            for name, selector in selectors.items()
            if selector.HasField("expression")
        }
        self.request_index.reduce(self._lock)  # requests final before this query are all counted
        with self._lock:
            view = self.request_index.view()
            indexed = view.ridx_by_id
            why_not = {
                rid: self._not_indexed_reason(rid)
                for selector in selectors.values()
                for rid in selector.request_ids
                if rid not in indexed
            }
            expressions = {
                name: np.unique(
                    np.array(
                        [r.ridx for s in seqs.tolist() if (r := self.requests.get(s)) and r.ridx is not None], np.int64
                    )
                )
                for name, seqs in matching_seqs.items()
            }
            loaded = frozenset(self.circuits.names)
        response = contrast(request, view, self.registry, Resolved(why_not, expressions, loaded), self.clock())
        response.elapsed_ms = (time.perf_counter() - started) * 1e3
        self.counters["contrasts"] += 1
        return response

    def _record(self, request_id: str) -> RequestRecord | None:
        """The request table entry of a request with codes in the window (None: unknown or evicted)."""
        seq = self._seq_by_id.get(request_id)
        return None if seq is None else self.requests.get(seq)

    def _not_indexed_reason(self, request_id: str) -> str:
        """Why a request id named in a contrast is not in the request-level index."""
        if request_id in self._open:
            return "not finished yet"
        record = self._record(request_id)
        if record is not None:
            if record.ridx is not None:
                return "evicted from the request index (older than the window, or over index.request_index_budget_mb)"
            return "has no codes"
        if self._final(request_id) is not None:
            return "its codes have left the index window"
        return "unknown to this sidecar"

    def _expression_seqs(self, name: str, expression: pb.Expr, scope: int, window: pb.TimeRange) -> np.ndarray:
        try:
            expr = from_proto(expression)
        except ExpressionError as exc:
            raise MonitorError(grpc.StatusCode.INVALID_ARGUMENT, f"{name}.expression: {exc}") from None
        keys = evaluate(expr, _IndexKeys(self, self._window(window), scope), 1)
        return np.unique(key_requests(keys))

    def label(self, request: pb.LabelRequest) -> pb.LabelResponse:
        """Attach or remove labels after the fact; the change is audited in the evidence store."""
        if not request.request_ids:
            raise MonitorError(grpc.StatusCode.INVALID_ARGUMENT, "request_ids: at least one request id is required")
        if not request.add and not request.remove:
            raise MonitorError(grpc.StatusCode.INVALID_ARGUMENT, "add / remove: give at least one label")
        for field_name in ("add", "remove"):
            for i, label in enumerate(getattr(request, field_name)):
                if not label.strip():
                    raise MonitorError(grpc.StatusCode.INVALID_ARGUMENT, f"{field_name}[{i}]: empty label")
        clash = set(request.add) & set(request.remove)
        if clash:
            raise MonitorError(grpc.StatusCode.INVALID_ARGUMENT, f"labels {sorted(clash)} are both added and removed")
        response = pb.LabelResponse()
        audit = []
        now = self.clock()
        with self._lock:
            for request_id in dict.fromkeys(request.request_ids):
                state = self._open.get(request_id)
                record = self._record(request_id)
                if state is None and record is None and self._final(request_id) is None:
                    response.unresolved.add(request_id=request_id, reason="unknown to this sidecar")
                    continue
                if state is not None:  # its report, when final, carries the labels
                    state.labels = _relabel(state.labels, request.add, request.remove)
                if record is not None:
                    record.labels = tuple(_relabel(list(record.labels), request.add, request.remove))
                    if record.ridx is not None:
                        self.request_index.relabel(record.ridx, list(request.add), list(request.remove))
                audit += [(request_id, now, "add", label, request.author, request.note) for label in request.add]
                audit += [(request_id, now, "remove", label, request.author, request.note) for label in request.remove]
                response.updated += 1
        self.store.add_feedback(audit)
        return response

    def get_codes(self, request_id: str) -> pb.GetCodesResponse:
        seq = self._seq_by_id.get(request_id)
        if seq is None:
            raise MonitorError(grpc.StatusCode.NOT_FOUND, f"request {request_id!r} has no codes in the index window")
        parts = self.index.request_codes(seq)
        if not parts:
            raise MonitorError(grpc.StatusCode.NOT_FOUND, f"request {request_id!r} has no codes in the index window")
        positions, gslots, phases, tokens = (np.concatenate([p[i] for p in parts]) for i in range(4))
        counts = np.concatenate([np.diff(p[4].astype(np.int64)) for p in parts])
        features = np.concatenate([p[5] for p in parts])
        acts = np.concatenate([p[6] for p in parts])
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
                    )
                )
                run = []
            if i is not None:
                run.append(i)
        return response

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
        phase = {pb.SCOPE_PROMPT: pb.PHASE_PROMPT, pb.SCOPE_GENERATED: pb.PHASE_GENERATED}.get(request.scope)
        tokens, features, counts, sums = self.index.feature_stats(gslots, self._window(request.window), phase)
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

    def _window(self, window: pb.TimeRange) -> TimeWindow:
        return TimeWindow(window.start_unix_nanos, window.end_unix_nanos or self.clock())

    def reload_circuits(self) -> pb.ReloadCircuitsResponse:
        try:
            circuits = load_circuit_files(self.config.circuits, version=self.circuits.version + 1)
        except ConfigError as exc:
            log.error("circuit reload refused, keeping %d circuits: %s", len(self.circuits.circuits), exc)
            self.counters["reload_failures"] += 1
            return pb.ReloadCircuitsResponse(ok=False, error=str(exc), circuits=self.circuits.names)
        with self._lock:
            self.circuits = circuits
        log.info("circuits reloaded: %s", ", ".join(circuits.names) or "(none)")
        return pb.ReloadCircuitsResponse(ok=True, circuits=circuits.names)

    def set_circuits(self, circuits: CircuitSet) -> None:
        with self._lock:
            self.circuits = CircuitSet(circuits.circuits, self.circuits.version + 1, circuits.sources)


def _relabel(labels: list[str], add, remove) -> list[str]:
    removed = set(remove)
    kept = [label for label in labels if label not in removed]
    return kept + [label for label in add if label not in kept]


class _IndexKeys:
    """Feeds the expression evaluator from the rolling index over a time window."""

    def __init__(self, monitor: Monitor, window: TimeWindow, scope: int) -> None:
        self.monitor, self.window = monitor, window
        self.phase = {pb.SCOPE_PROMPT: pb.PHASE_PROMPT, pb.SCOPE_GENERATED: pb.PHASE_GENERATED}.get(scope)

    def term_keys(self, term: Term) -> np.ndarray:
        gslots = self.monitor.registry.resolve(term)
        return self.monitor.index.term_keys(gslots, term.feature, term.min_activation, self.window, self.phase)

    def universe(self) -> np.ndarray:
        return self.monitor.index.universe(self.window, self.phase)


__all__ = ["Expr", "Monitor", "MonitorError", "Stream"]
