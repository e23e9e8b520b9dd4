"""The gRPC servicer of the `Monitor` service: a thin shell mapping SidecarCore calls and errors onto RPCs and
status codes."""

from __future__ import annotations

import logging
import queue
from collections.abc import Iterator

import grpc

from circuitwatch.proto import CONTRACT_VERSION
from circuitwatch.proto import circuitwatch_pb2 as pb
from circuitwatch.proto import circuitwatch_pb2_grpc as pb_grpc

from .core import SidecarCore
from .errors import MonitorError

log = logging.getLogger(__name__)


class MonitorServicer(pb_grpc.MonitorServicer):
    def __init__(self, core: SidecarCore, stopping=None) -> None:
        self.core = core
        self._stopping = stopping  # threading.Event set at shutdown: watch streams end

    def Ingest(self, request_iterator: Iterator[pb.IngestMessage], context: grpc.ServicerContext) -> pb.IngestAck:
        stream = None
        limit = self.core.config.max_message_bytes
        error = None
        try:
            for message in request_iterator:
                size = message.ByteSize()
                if size > limit:
                    raise MonitorError(
                        grpc.StatusCode.INVALID_ARGUMENT,
                        f"ingest message of {size} bytes exceeds max_message_bytes {limit}",
                    )
                if stream is None:
                    if message.WhichOneof("kind") != "manifest":
                        raise MonitorError(
                            grpc.StatusCode.INVALID_ARGUMENT, "the first ingest message must be a manifest"
                        )
                    stream = self.core.open_stream(message.manifest)
                    continue
                self.core.ingest(stream, message)
        except MonitorError as exc:
            error = str(exc)
            self.core.counters["ingest_rejected"] += 1
            log.warning("ingest rejected: %s", exc)
            context.abort(exc.code, str(exc))
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
        return self._call(context, self.core.get_report, request.request_id, wait_ms)

    def ListReports(self, request: pb.ListReportsRequest, context: grpc.ServicerContext) -> pb.ListReportsResponse:
        return pb.ListReportsResponse(reports=self._call(context, self.core.list_reports, request))

    def WatchReports(self, request: pb.WatchReportsRequest, context: grpc.ServicerContext) -> Iterator[pb.Report]:
        watcher = self.core.watchers.watch_reports(request.flagged_only)
        try:
            while context.is_active() and not (self._stopping and self._stopping.is_set()):
                try:
                    yield watcher.queue.get(timeout=0.2)
                except queue.Empty:
                    continue
        finally:
            self.core.watchers.unwatch_reports(watcher)

    def WatchActions(self, request: pb.WatchActionsRequest, context: grpc.ServicerContext) -> Iterator[pb.ActionNotice]:
        watcher = self.core.watchers.watch_actions()
        try:
            while context.is_active() and not (self._stopping and self._stopping.is_set()):
                try:
                    yield watcher.get(timeout=0.2)
                except queue.Empty:
                    continue
        finally:
            self.core.watchers.unwatch_actions(watcher)

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

    @staticmethod
    def _call(context: grpc.ServicerContext, fn, *args):
        try:
            return fn(*args)
        except MonitorError as exc:
            context.abort(exc.code, str(exc))
