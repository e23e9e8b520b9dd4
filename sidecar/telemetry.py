"""OpenTelemetry for the sidecar: a `circuitwatch.monitor` span per finished report in the caller's trace, and
metrics over OTLP and/or a Prometheus scrape endpoint.

Exporters are the official OTLP ones (gRPC or HTTP, chosen with OTEL_EXPORTER_OTLP_[TRACES_|METRICS_]PROTOCOL),
configured by the standard OTEL_* variables. Spans go through a batch processor with a bounded queue, so a
slow or dead collector drops spans (the SDK counts and logs them) and never blocks ingest or finalisation.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from circuitwatch import __version__
from circuitwatch.proto import circuitwatch_pb2 as pb
from circuitwatch.proto.names import message_tap_label, severity_name, status_name

from .config import TelemetryConfig

log = logging.getLogger(__name__)

SPAN_NAME = "circuitwatch.monitor"
EVENT_NAME = "circuitwatch.circuit_match"
DRIFT_SPAN_NAME = "circuitwatch.sae_health"
DRIFT_EVENT_NAME = "circuitwatch.drift_alarm"
EVIDENCE_POSITIONS = 16  # positions listed per match event


def _protocol(signal: str) -> str:
    return os.environ.get(f"OTEL_EXPORTER_OTLP_{signal}_PROTOCOL") or os.environ.get(
        "OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"
    )


def _endpoint_set(signal: str) -> bool:
    return bool(
        os.environ.get(f"OTEL_EXPORTER_OTLP_{signal}_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    )


def _span_exporter():
    if _protocol("TRACES") == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    return OTLPSpanExporter()


def _metric_exporter():
    if _protocol("METRICS") == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
    else:
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
    return OTLPMetricExporter()


@dataclass
class Telemetry:
    """Owns the providers; `report_finished` is a Monitor report listener."""

    tracer_provider: TracerProvider | None
    meter_provider: MeterProvider | None

    @classmethod
    def start(cls, config: TelemetryConfig) -> Telemetry:
        resource = Resource.create({"service.name": config.service_name, "service.version": __version__})
        tracer_provider = None
        if config.traces and _endpoint_set("TRACES"):
            tracer_provider = TracerProvider(resource=resource)
            tracer_provider.add_span_processor(BatchSpanProcessor(_span_exporter()))
            log.info("exporting spans over OTLP/%s", _protocol("TRACES"))
        readers: list[MetricReader] = []
        if config.metrics and _endpoint_set("METRICS"):
            readers.append(PeriodicExportingMetricReader(_metric_exporter()))
            log.info("exporting metrics over OTLP/%s", _protocol("METRICS"))
        if config.prometheus_port:
            from opentelemetry.exporter.prometheus import PrometheusMetricReader
            from prometheus_client import start_http_server

            start_http_server(config.prometheus_port, addr=config.prometheus_host)
            readers.append(PrometheusMetricReader())
            log.info("Prometheus metrics on http://%s:%d/metrics", config.prometheus_host, config.prometheus_port)
        meter_provider = MeterProvider(resource=resource, metric_readers=readers) if readers else None
        return cls(tracer_provider, meter_provider)

    def instruments(self, producer_stats: dict[str, pb.ProducerStats] | None = None, health=None):
        """Metric instruments for the Monitor (no-ops when metrics are off). `producer_stats` (the Monitor's
        latest stats per producer) feeds the plugin-side metrics: queue depth, drops, encoder time; `health`
        (a callable returning the HealthResponse) feeds the per-SAE drift gauges."""
        from opentelemetry.metrics import CallbackOptions, NoOpMeterProvider, Observation

        meter = (self.meter_provider or NoOpMeterProvider()).get_meter("circuitwatch.sidecar", __version__)
        stats = producer_stats if producer_stats is not None else {}

        def observe(field: str, scale: float = 1.0):
            def callback(_options: CallbackOptions):
                values = ((p, getattr(s, field)) for p, s in list(stats.items()))
                return [Observation(v * scale if scale != 1.0 else v, {"producer": p}) for p, v in values]

            return [callback]

        meter.create_observable_gauge(
            "circuitwatch.producer.queue_depth", observe("queue_depth"), unit="{batch}", description="Emitter queue"
        )
        meter.create_observable_counter(
            "circuitwatch.producer.batches_dropped", observe("batches_dropped"), unit="{batch}", description="Dropped"
        )
        meter.create_observable_counter(
            "circuitwatch.producer.rows_dropped", observe("rows_dropped"), unit="{row}", description="Rows dropped"
        )
        meter.create_observable_counter(
            "circuitwatch.producer.encode_time", observe("encode_ns", 1e-6), unit="ms", description="Encoder time"
        )
        meter.create_observable_counter(
            "circuitwatch.producer.steps_encoded", observe("steps_encoded"), unit="{step}", description="Steps encoded"
        )

        def health_gauge(field: str):
            def callback(_options: CallbackOptions):
                if health is None:
                    return []
                observations = []
                for slot in health().slots:
                    value = getattr(slot, field) if field != "alarm" else int(slot.state in ALARM_STATES)
                    observations.append(
                        Observation(value, {"sae": slot.sae, "layer": slot.layer, "tap": message_tap_label(slot)})
                    )
                return observations

            return [callback]

        for field, description in (
            ("js_divergence", "Jensen-Shannon divergence of feature firings from calibration (bits)"),
            ("error_ratio", "Mean reconstruction error / calibration's"),
            ("norm_ratio", "Mean input norm / calibration's"),
            ("dead_fraction", "Calibration-alive features now (almost) silent"),
            ("alarm", "1 while the SAE drifts or is mis-wired"),
        ):
            meter.create_observable_gauge(f"circuitwatch.sae.{field}", health_gauge(field), description=description)
        return SidecarInstruments(
            fidelity_error=meter.create_histogram(
                "circuitwatch.fidelity.error", unit="1", description="Mean reconstruction error per request and slot"
            ),
            flags=meter.create_counter("circuitwatch.flags", unit="{flag}", description="Circuit matches"),
            requests=meter.create_counter(
                "circuitwatch.requests.monitored", unit="{request}", description="Finished reports"
            ),
            postings=meter.create_counter("circuitwatch.codes.ingested", unit="{code}", description="Codes ingested"),
            report_latency=meter.create_histogram(
                "circuitwatch.report.latency", unit="ms", description="Finish marker received to report final"
            ),
            ingest_lag=meter.create_histogram(
                "circuitwatch.ingest.lag", unit="ms", description="Producer finish time to finish marker received"
            ),
        )

    def report_finished(self, report: pb.Report) -> None:
        if self.tracer_provider is None:
            return
        tracer = self.tracer_provider.get_tracer("circuitwatch.sidecar", __version__)
        carrier = {"traceparent": report.trace.traceparent, "tracestate": report.trace.tracestate}
        parent = TraceContextTextMapPropagator().extract(carrier) if report.trace.traceparent else None
        coverage = report.coverage
        attributes = {
            "gen_ai.request.id": report.request_id,
            "gen_ai.response.id": report.response_id,
            "gen_ai.request.model": report.model,
            "circuitwatch.tokens.monitored": coverage.positions_seen,
            "circuitwatch.tokens.total": coverage.positions_total,
            "circuitwatch.coverage.status": status_name(report.status),
            "circuitwatch.coverage.gaps": len(coverage.gaps),
            "circuitwatch.circuits.matched": [f.circuit for f in report.flags],
            "circuitwatch.severity.max": severity_name(report.max_severity) if report.flags else "none",
            "circuitwatch.saes": [f"{s.name}@{message_tap_label(s)}:{s.weights_hash}" for s in report.saes],
        }
        if report.fidelity:
            attributes |= {
                "circuitwatch.fidelity.low": any(f.low_fidelity for f in report.fidelity),
                "circuitwatch.fidelity.slots": [f.slot for f in report.fidelity],
                "circuitwatch.fidelity.error_mean": [f.error_mean for f in report.fidelity],
                "circuitwatch.fidelity.fraction_above_threshold": [f.fraction_above_threshold for f in report.fidelity],
            }
        if report.labels:
            attributes["circuitwatch.labels"] = list(report.labels)
        span = tracer.start_span(
            SPAN_NAME,
            context=parent,
            kind=SpanKind.INTERNAL,
            attributes=attributes,
            start_time=report.arrival_unix_nanos or report.finalized_unix_nanos,
        )
        for flag in report.flags:
            features = sorted({f"{h.slot}:{h.feature}" for e in flag.evidence for h in e.hits})
            span.add_event(
                EVENT_NAME,
                {
                    "circuitwatch.circuit": flag.circuit,
                    "circuitwatch.severity": severity_name(flag.severity),
                    "circuitwatch.matching_tokens": flag.matching_tokens,
                    "circuitwatch.positions": [e.position for e in flag.evidence][:EVIDENCE_POSITIONS],
                    "circuitwatch.features": features,
                    "circuitwatch.action": flag.action or "none",
                },
                timestamp=report.finalized_unix_nanos,
            )
        if report.status == pb.REPORT_STATUS_INCOMPLETE:
            span.set_status(Status(StatusCode.UNSET))
        span.end(end_time=max(report.finalized_unix_nanos, report.arrival_unix_nanos))

    def health_changed(self, slot: pb.SlotHealth, previous: int) -> None:
        """An SAE's alarm was raised or cleared: a span with one event, outside any trace. Other changes (warming
        up, no baseline) are not events."""
        if self.tracer_provider is None or (slot.state not in ALARM_STATES and previous not in ALARM_STATES):
            return
        tracer = self.tracer_provider.get_tracer("circuitwatch.sidecar", __version__)
        state = pb.SlotState.Name(slot.state).removeprefix("SLOT_STATE_").lower()
        attributes = {
            "circuitwatch.sae": slot.sae,
            "circuitwatch.sae.layer": slot.layer,
            "circuitwatch.sae.hook_point": slot.hook_point,
            "circuitwatch.sae.tap": message_tap_label(slot),
            "circuitwatch.sae.weights_hash": slot.weights_hash,
            "circuitwatch.sae.state": state,
            "circuitwatch.sae.previous_state": pb.SlotState.Name(previous).removeprefix("SLOT_STATE_").lower(),
            "circuitwatch.sae.js_divergence": slot.js_divergence,
            "circuitwatch.sae.error_ratio": slot.error_ratio,
            "circuitwatch.sae.norm_ratio": slot.norm_ratio,
            "circuitwatch.sae.tokens": slot.tokens,
            "circuitwatch.sae.reasons": list(slot.reasons),
        }
        with tracer.start_as_current_span(DRIFT_SPAN_NAME, kind=SpanKind.INTERNAL, attributes=attributes) as span:
            span.add_event(DRIFT_EVENT_NAME if slot.state in ALARM_STATES else "circuitwatch.drift_cleared", attributes)

    def shutdown(self) -> None:
        for provider in (self.tracer_provider, self.meter_provider):
            if provider is not None:
                try:
                    provider.shutdown()
                except Exception:
                    log.exception("telemetry shutdown failed")


ALARM_STATES = (pb.SLOT_STATE_DRIFT, pb.SLOT_STATE_MISWIRED)


@dataclass
class SidecarInstruments:
    fidelity_error: object
    flags: object
    requests: object
    postings: object
    report_latency: object
    ingest_lag: object

    def report(self, report: pb.Report, finish_received_ns: int) -> None:
        for flag in report.flags:
            self.flags.add(1, {"circuit": flag.circuit, "severity": severity_name(flag.severity)})
        status = status_name(report.status)
        self.requests.add(1, {"status": status, "model": report.model})
        names = {s.slot: s.name for s in report.saes}
        for slot in report.fidelity:
            if slot.tokens:
                attributes = {"sae": names.get(slot.slot, str(slot.slot)), "low_fidelity": slot.low_fidelity}
                self.fidelity_error.record(slot.error_mean, attributes)
        if finish_received_ns:
            self.report_latency.record((report.finalized_unix_nanos - finish_received_ns) / 1e6)
            if report.finish_unix_nanos:
                self.ingest_lag.record(max(0.0, (finish_received_ns - report.finish_unix_nanos) / 1e6))
