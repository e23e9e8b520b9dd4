"""A test-local OTLP receiver speaking the collector's wire protocol (opentelemetry-proto): gRPC TraceService and
MetricsService, and OTLP/HTTP (protobuf) on /v1/traces and /v1/metrics."""

from __future__ import annotations

import threading
import time
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc


class Collected:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.traces: list[trace_service_pb2.ExportTraceServiceRequest] = []
        self.metrics: list[metrics_service_pb2.ExportMetricsServiceRequest] = []

    def spans(self) -> list:
        with self.lock:
            return [s for r in self.traces for rs in r.resource_spans for ss in rs.scope_spans for s in ss.spans]

    def metric_points(self, name: str) -> list:
        """Every data point of a metric across exports (cumulative: the last is the total)."""
        with self.lock:
            found = []
            for request in self.metrics:
                for rm in request.resource_metrics:
                    for sm in rm.scope_metrics:
                        for metric in sm.metrics:
                            if metric.name == name:
                                data = getattr(metric, metric.WhichOneof("data"))
                                found.extend(data.data_points)
            return found

    def wait_for(self, predicate, timeout_s: float = 15.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not predicate():
            if time.monotonic() > deadline:
                raise TimeoutError("the OTLP receiver did not get what the test waited for")
            time.sleep(0.05)


class _Traces(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, collected: Collected) -> None:
        self.collected = collected

    def Export(self, request, context):  # noqa: N802 - the proto's name
        with self.collected.lock:
            self.collected.traces.append(request)
        return trace_service_pb2.ExportTraceServiceResponse()


class _Metrics(metrics_service_pb2_grpc.MetricsServiceServicer):
    def __init__(self, collected: Collected) -> None:
        self.collected = collected

    def Export(self, request, context):  # noqa: N802 - the proto's name
        with self.collected.lock:
            self.collected.metrics.append(request)
        return metrics_service_pb2.ExportMetricsServiceResponse()


def grpc_receiver() -> tuple[grpc.Server, int, Collected]:
    collected = Collected()
    server = grpc.server(futures.ThreadPoolExecutor(4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_Traces(collected), server)
    metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(_Metrics(collected), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port, collected


def http_receiver() -> tuple[ThreadingHTTPServer, int, Collected]:
    collected = Collected()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers["Content-Length"]))
            if self.path == "/v1/traces":
                message = trace_service_pb2.ExportTraceServiceRequest.FromString(body)
                with collected.lock:
                    collected.traces.append(message)
                reply = trace_service_pb2.ExportTraceServiceResponse()
            elif self.path == "/v1/metrics":
                message = metrics_service_pb2.ExportMetricsServiceRequest.FromString(body)
                with collected.lock:
                    collected.metrics.append(message)
                reply = metrics_service_pb2.ExportMetricsServiceResponse()
            else:
                self.send_response(404)
                self.end_headers()
                return
            payload = reply.SerializeToString()
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, server.server_address[1], collected


def attributes(span) -> dict:
    out = {}
    for kv in span.attributes:
        value = kv.value
        kind = value.WhichOneof("value")
        out[kv.key] = (
            [getattr(v, v.WhichOneof("value")) for v in value.array_value.values]
            if kind == "array_value"
            else getattr(value, kind)
        )
    return out
