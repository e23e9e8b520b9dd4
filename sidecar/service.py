"""The gRPC servicer of the `Monitor` service: a thin shell mapping SidecarCore calls and errors onto RPCs and
status codes, and bounding how many long-lived calls of each kind may run at once.

Ingest streams, watches and waiting GetReport calls hold a server thread for as long as they last; each kind
has its own bound (limits.*), past which a new call gets RESOURCE_EXHAUSTED at once. The server's thread pool
is sized to every bound plus `limits.read_workers`, so held streams never starve health checks and reads.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
from collections.abc import Iterator

import grpc

from circuitwatch.proto import CONTRACT_VERSION, CONTRACT_VERSION_METADATA
from circuitwatch.proto import circuitwatch_pb2 as pb
from circuitwatch.proto import circuitwatch_pb2_grpc as pb_grpc

from .config import LimitsConfig
from .core import SidecarCore
from .errors import MonitorError

log = logging.getLogger(__name__)


class CallSlots:
    """At most `limit` calls of one kind at once; `enter` fails fast instead of queueing."""

    def __init__(self, kind: str, setting: str, limit: int) -> None:
        self.kind, self.setting, self.limit = kind, setting, limit
        self._free = threading.BoundedSemaphore(limit)

    @contextlib.contextmanager
    def enter(self, context: grpc.ServicerContext):
        if not self._free.acquire(blocking=False):
            context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{self.limit} {self.kind} already open (limits.{self.setting}); try again later",
            )
        try:
            yield
        finally:
            self._free.release()


class MonitorServicer(pb_grpc.MonitorServicer):
    def __init__(self, core: SidecarCore, stopping=None, limits: LimitsConfig | None = None) -> None:
        self.core = core
        self._stopping = stopping  # threading.Event set at shutdown: watch streams end
        limits = limits or LimitsConfig()
        self._ingest = CallSlots("Ingest streams", "ingest_streams", limits.ingest_streams)
        self._watches = CallSlots("watch streams", "watch_streams", limits.watch_streams)
        self._waits = CallSlots("waiting GetReport calls", "report_waits", limits.report_waits)

    def Ingest(self, request_iterator: Iterator[pb.IngestMessage], context: grpc.ServicerContext) -> pb.IngestAck:
        stream = None
        error = None
        with self._ingest.enter(context):
            # what this sidecar reads (e.g. finish markers inside code batches), before the producer sends anything
            context.send_initial_metadata(((CONTRACT_VERSION_METADATA, str(CONTRACT_VERSION)),))
            try:
                for message in request_iterator:
                    received_ns = self.core.clock()  # before this thread may wait for the interpreter
                    if stream is None:
                        if message.WhichOneof("kind") != "manifest":
                            raise MonitorError(
                                grpc.StatusCode.INVALID_ARGUMENT, "the first ingest message must be a manifest"
                            )
                        stream = self.core.open_stream(message.manifest)
                        continue
                    self.core.ingest(stream, message, received_ns)
            except MonitorError as exc:
                error = str(exc)
                self.core.counters["ingest_rejected"] += 1
                log.warning("ingest rejected: %s", error.encode("unicode_escape").decode())
                context.abort(exc.code, error)
            finally:
                self.core.close_stream(stream, error)
        return pb.IngestAck(
            contract_version=CONTRACT_VERSION,
            batches=stream.batches if stream else 0,
            postings=stream.postings if stream else 0,
            requests_finished=stream.finished if stream else 0,
        )

    def GetReport(self, request: pb.GetReportRequest, context: grpc.ServicerContext) -> pb.Report:
        remaining = context.time_remaining()
        wait_ms = request.wait_ms if remaining is None else min(request.wait_ms, max(0, int(remaining * 1000) - 5))
        if not wait_ms:
            return self._call(context, self.core.get_report, request.request_id, 0)
        with self._waits.enter(context):
            return self._call(context, self.core.get_report, request.request_id, wait_ms)

    def ListReports(self, request: pb.ListReportsRequest, context: grpc.ServicerContext) -> pb.ListReportsResponse:
        return pb.ListReportsResponse(reports=self._call(context, self.core.list_reports, request))

    def WatchReports(self, request: pb.WatchReportsRequest, context: grpc.ServicerContext) -> Iterator[pb.Report]:
        with self._watches.enter(context):
            watcher = self.core.watchers.watch_reports(request.flagged_only)
            try:
                for report in self._drain(watcher.queue, context):
                    yield report
                    self.core.watchers.answered(watcher)  # gRPC asks for the next one once this one is sent
            finally:
                self.core.watchers.unwatch_reports(watcher)

    def WatchActions(self, request: pb.WatchActionsRequest, context: grpc.ServicerContext) -> Iterator[pb.ActionNotice]:
        with self._watches.enter(context):
            watcher = self.core.watchers.watch_actions()
            try:
                yield from self._drain(watcher, context)
            finally:
                self.core.watchers.unwatch_actions(watcher)

    def _drain(self, source: queue.Queue, context: grpc.ServicerContext):
        while context.is_active() and not (self._stopping and self._stopping.is_set()):
            try:
                yield source.get(timeout=0.2)
            except queue.Empty:
                continue

    def QueryRequests(
        self, request: pb.QueryRequestsRequest, context: grpc.ServicerContext
    ) -> pb.QueryRequestsResponse:
        return self._call(context, self.core.query_requests, request)

    def FeatureStats(self, request: pb.FeatureStatsRequest, context: grpc.ServicerContext) -> pb.FeatureStatsResponse:
        return self._call(context, self.core.feature_stats, request)

    def ReloadCircuits(
        self, request: pb.ReloadCircuitsRequest, context: grpc.ServicerContext
    ) -> pb.ReloadCircuitsResponse:
        return self.core.reload_circuits()

    def GetCodes(self, request: pb.GetCodesRequest, context: grpc.ServicerContext) -> pb.GetCodesResponse:
        return self._call(context, self.core.get_codes, request.request_id)

    def Contrast(self, request: pb.ContrastRequest, context: grpc.ServicerContext) -> pb.ContrastResponse:
        return self._call(context, self.core.contrast, request)

    def Label(self, request: pb.LabelRequest, context: grpc.ServicerContext) -> pb.LabelResponse:
        return self._call(context, self.core.label, request)

    def GetHealth(self, request: pb.GetHealthRequest, context: grpc.ServicerContext) -> pb.HealthResponse:
        return self._call(context, self.core.health)

    @staticmethod
    def _call(context: grpc.ServicerContext, fn, *args):
        try:
            return fn(*args)
        except MonitorError as exc:
            context.abort(exc.code, str(exc))
