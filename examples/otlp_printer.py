"""A minimal OTLP/HTTP receiver for the demo: collects the sidecar's spans and describes them in one line."""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from opentelemetry.proto.collector.trace.v1 import trace_service_pb2


class SpanPrinter:
    def __init__(self) -> None:
        self._spans: dict[str, str] = {}
        self._lock = threading.Lock()
        printer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if self.path == "/v1/traces":
                    printer._collect(trace_service_pb2.ExportTraceServiceRequest.FromString(body))
                reply = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"

    def _collect(self, request: trace_service_pb2.ExportTraceServiceRequest) -> None:
        for resource_spans in request.resource_spans:
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    if span.name != "circuitwatch.monitor":  # e.g. circuitwatch.sae_health (drift alarms)
                        continue
                    attrs = {kv.key: kv.value for kv in span.attributes}
                    request_id = attrs["circuitwatch.request.id"].string_value
                    matched = [v.string_value for v in attrs["circuitwatch.circuits.matched"].array_value.values]
                    line = (
                        f"{span.name} trace {span.trace_id.hex()} parent {span.parent_span_id.hex()} "
                        f"coverage={attrs['circuitwatch.coverage.status'].string_value} "
                        f"matched={matched or 'none'} events={len(span.events)}"
                    )
                    with self._lock:
                        self._spans[request_id] = line

    def wait_for(self, request_id: str, timeout_s: float = 5.0) -> str | None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self._lock:
                if request_id in self._spans:
                    return self._spans[request_id]
            time.sleep(0.05)
        return None

    def close(self) -> None:
        self._server.shutdown()
