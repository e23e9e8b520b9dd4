"""OpenTelemetry for the sidecar: a `circuitwatch.monitor` span per finished report in the caller's trace, and
metrics over OTLP and/or a Prometheus scrape endpoint.

Exporters are the official OTLP ones (gRPC or HTTP, chosen with OTEL_EXPORTER_OTLP_[TRACES_|METRICS_]PROTOCOL),
configured by the standard OTEL_* variables. Spans go through a batch processor with a bounded queue, so a
slow or dead collector drops spans (the SDK counts and logs them) and never blocks ingest or finalisation.

Spans use the OpenTelemetry GenAI semantic conventions where they cover the case (`gen_ai.response.id`,
`gen_ai.request.model`, a `gen_ai.evaluation.result` event per circuit match) and `circuitwatch.*` for the rest.
Metrics are declared once, in METRICS, with the name each one has on the Prometheus endpoint: the OTel
Prometheus exporter turns dots into underscores and appends the unit (`s` -> `_seconds`) and `_total` on
counters, so OTel names carry no unit and durations are recorded in seconds. No label carries a request id,
a feature id or any other value without a bound.
"""

from __future__ import annotations

import logging
import os
import time
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
from circuitwatch.proto.names import gap_reason_name, message_tap_label, severity_name, slot_state_name, status_name

from .config import TelemetryConfig

log = logging.getLogger(__name__)

SPAN_NAME = "circuitwatch.monitor"
# One event per circuit match: the GenAI conventions' evaluation result (the circuit is the evaluation, its
# severity the label), with circuitwatch.* details beside the gen_ai.evaluation.* attributes.
EVENT_NAME = "gen_ai.evaluation.result"
DRIFT_SPAN_NAME = "circuitwatch.sae_health"
DRIFT_EVENT_NAME = "circuitwatch.drift_alarm"
EVIDENCE_POSITIONS = 16  # positions listed per match event
PRODUCER_IDLE_S = 60.0  # a producer that sent no stats for this long counts no queue depth (idle or gone)

LATENCY_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
ERROR_BUCKETS = (0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.0)


@dataclass(frozen=True)
class MetricSpec:
    """One exported metric: its OTel instrument and the name it has on the Prometheus endpoint."""

    name: str  # OTel instrument name
    kind: str  # counter, histogram, gauge (as Prometheus types them; observable counters are counters)
    unit: str
    labels: tuple[str, ...]
    description: str
    prometheus: str  # its name on /metrics (a histogram's samples add _bucket, _sum and _count)


METRICS: tuple[MetricSpec, ...] = (
    MetricSpec(
        "circuitwatch.flags", "counter", "{flag}", ("circuit", "severity"), "Circuit matches",
        "circuitwatch_flags_total",
    ),
    MetricSpec(
        "circuitwatch.requests.monitored", "counter", "{request}", ("status", "model"),
        "Finished reports, by report status", "circuitwatch_requests_monitored_total",
    ),
    MetricSpec(
        "circuitwatch.positions", "counter", "{position}", ("coverage",),
        "Token positions of finished reports: seen (codes in every slot) or missing", "circuitwatch_positions_total",
    ),
    MetricSpec(
        "circuitwatch.gap.positions", "counter", "{position}", ("reason",),
        "Slot positions without codes in finished reports, by gap reason", "circuitwatch_gap_positions_total",
    ),
    MetricSpec(
        "circuitwatch.codes.ingested", "counter", "{code}", (), "Codes (postings) ingested",
        "circuitwatch_codes_ingested_total",
    ),
    MetricSpec(
        "circuitwatch.report.latency", "histogram", "s", (),
        "Last input a report waited for (its last codes or its finish marker) received to report final",
        "circuitwatch_report_latency_seconds",
    ),
    MetricSpec(
        "circuitwatch.report.handoff.timeouts", "counter", "{wait}", (),
        "Waits for a woken report reader that gave up (2 ms) before ingest went on",
        "circuitwatch_report_handoff_timeouts_total",
    ),
    MetricSpec(
        "circuitwatch.maintenance.worker.failures", "counter", "{failure}", (),
        "Maintenance worker process failures (died, stalled, failed a piece of work): that work ran in process",
        "circuitwatch_maintenance_worker_failures_total",
    ),
    MetricSpec(
        "circuitwatch.ingest.lag", "histogram", "s", (), "Producer finish time to finish marker received",
        "circuitwatch_ingest_lag_seconds",
    ),
    MetricSpec(
        "circuitwatch.ingest.batch.duration", "histogram", "s", (),
        "Wall time to take in one code batch (decode, index, the requests it adds to, the reports it completes)",
        "circuitwatch_ingest_batch_duration_seconds",
    ),
    MetricSpec(
        "circuitwatch.ingest.batch.cpu_time", "histogram", "s", (),
        "CPU time of the thread that took in one code batch: well below its wall time, the sidecar waited (for its "
        "interpreter or a starved host), not worked",
        "circuitwatch_ingest_batch_cpu_time_seconds",
    ),
    MetricSpec(
        "circuitwatch.fidelity.error_ratio", "histogram", "1", ("sae", "low_fidelity"),
        "Mean relative reconstruction error per request and SAE slot", "circuitwatch_fidelity_error_ratio",
    ),
    MetricSpec(
        "circuitwatch.producer.queue_depth", "gauge", "{batch}", ("producer_host",),
        "Code batches in the producers' emitter queues", "circuitwatch_producer_queue_depth",
    ),
    MetricSpec(
        "circuitwatch.producer.batches_dropped", "counter", "{batch}", ("producer_host",),
        "Code batches producers dropped under back-pressure", "circuitwatch_producer_batches_dropped_total",
    ),
    MetricSpec(
        "circuitwatch.producer.rows_dropped", "counter", "{row}", ("producer_host",),
        "Token rows producers dropped under back-pressure", "circuitwatch_producer_rows_dropped_total",
    ),
    MetricSpec(
        "circuitwatch.producer.encode.time", "counter", "s", ("producer_host",),
        "Time producers spent in the SAE encoders", "circuitwatch_producer_encode_time_seconds_total",
    ),
    MetricSpec(
        "circuitwatch.producer.steps_encoded", "counter", "{step}", ("producer_host",),
        "Engine steps producers encoded", "circuitwatch_producer_steps_encoded_total",
    ),
    MetricSpec(
        "circuitwatch.producer.engine_step.wait_timeouts", "counter", "{batch}", ("producer_host",),
        "Code batches sent without their step's finish markers (the step did not end within the wait)",
        "circuitwatch_producer_engine_step_wait_timeouts_total",
    ),
    MetricSpec(
        "circuitwatch.producer.steps_coalesced", "counter", "{step}", ("producer_host",),
        "Engine steps producers sent joined to an earlier step's message (queued behind it: the sidecar or the "
        "stream was slower than the engine)",
        "circuitwatch_producer_steps_coalesced_total",
    ),
    # Gauges of unit "1" get `_ratio` appended by the Collector's Prometheus exporter unless their name ends in
    # ratio: the two below have no unit, so both paths (this endpoint, the Collector) expose the same names.
    MetricSpec(
        "circuitwatch.sae.js_divergence", "gauge", "", ("sae", "layer", "tap"),
        "Jensen-Shannon divergence of feature firings from calibration (bits, 0..1)", "circuitwatch_sae_js_divergence",
    ),
    MetricSpec(
        "circuitwatch.sae.error_ratio", "gauge", "1", ("sae", "layer", "tap"),
        "Mean reconstruction error / calibration's", "circuitwatch_sae_error_ratio",
    ),
    MetricSpec(
        "circuitwatch.sae.norm_ratio", "gauge", "1", ("sae", "layer", "tap"),
        "Mean input norm / calibration's", "circuitwatch_sae_norm_ratio",
    ),
    MetricSpec(
        "circuitwatch.sae.dead_feature_ratio", "gauge", "1", ("sae", "layer", "tap"),
        "Share of calibration-alive features now (almost) silent", "circuitwatch_sae_dead_feature_ratio",
    ),
    MetricSpec(
        "circuitwatch.sae.alarm", "gauge", "", ("sae", "layer", "tap"),
        "1 while the SAE drifts or is mis-wired", "circuitwatch_sae_alarm",
    ),
    # Fleet export (sidecar/fleet/exporter.py); present when fleet.enabled.
    MetricSpec(
        "circuitwatch.fleet.rows.exported", "counter", "{row}", ("table",),
        "Rows the fleet store accepted, per table", "circuitwatch_fleet_rows_exported_total",
    ),
    MetricSpec(
        "circuitwatch.fleet.rows.dropped", "counter", "{row}", ("table", "reason"),
        "Rows dropped before the fleet store (queue_full, spool_full, unreadable)",
        "circuitwatch_fleet_rows_dropped_total",
    ),
    MetricSpec(
        "circuitwatch.fleet.insert.errors", "counter", "{error}", (),
        "Failed inserts into the fleet store (each retried from the spool)", "circuitwatch_fleet_insert_errors_total",
    ),
    MetricSpec(
        "circuitwatch.fleet.spool.files", "gauge", "{file}", (),
        "Batch files waiting in the fleet spool", "circuitwatch_fleet_spool_files",
    ),
    MetricSpec(
        "circuitwatch.fleet.export.lag", "gauge", "s", (),
        "Age of the oldest batch not yet in the fleet store (0: none waiting)", "circuitwatch_fleet_export_lag_seconds",
    ),
)  # fmt: skip
SPECS = {m.name: m for m in METRICS}


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
    prometheus_server: object | None = None  # the scrape endpoint's HTTP server, closed by shutdown()

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
        server = None
        if config.prometheus_port:
            from opentelemetry.exporter.prometheus import PrometheusMetricReader
            from prometheus_client import (
                CollectorRegistry,
                GCCollector,
                PlatformCollector,
                ProcessCollector,
                start_http_server,
            )

            # A registry of our own (not prometheus_client's global one): two sidecars in one process (tests)
            # never serve each other's metrics; the process, platform and GC metrics are added to it.
            registry = CollectorRegistry()
            for collector in (ProcessCollector, PlatformCollector, GCCollector):
                collector(registry=registry)
            server, _thread = start_http_server(config.prometheus_port, addr=config.prometheus_host, registry=registry)
            readers.append(PrometheusMetricReader(registry=registry))
            log.info("Prometheus metrics on http://%s:%d/metrics", config.prometheus_host, config.prometheus_port)
        meter_provider = MeterProvider(resource=resource, metric_readers=readers) if readers else None
        return cls(tracer_provider, meter_provider, server)

    def instruments(
        self, producer_stats: dict[str, pb.ProducerStats] | None = None, health=None, fleet=None, counters=None
    ):
        """Metric instruments for the Monitor (no-ops when metrics are off). `producer_stats` (the Monitor's
        latest stats per producer) feeds the plugin-side metrics: queue depth, drops, encoder time; `health`
        (a callable returning the HealthResponse) feeds the per-SAE drift gauges; `counters` (the core's) the
        hand-off timeouts."""
        from opentelemetry.metrics import CallbackOptions, NoOpMeterProvider, Observation

        meter = (self.meter_provider or NoOpMeterProvider()).get_meter("circuitwatch.sidecar", __version__)
        producers = _Producers(producer_stats if producer_stats is not None else {})

        def observe(field: str, scale: float = 1.0, live_only: bool = False):
            def callback(_options: CallbackOptions):
                return [
                    Observation(value * scale if scale != 1.0 else value, {"producer_host": host})
                    for host, value in producers.by_host(field, live_only).items()
                ]

            return [callback]

        def observable(name: str, callbacks):
            spec = SPECS[name]
            create = meter.create_observable_gauge if spec.kind == "gauge" else meter.create_observable_counter
            create(name, callbacks, unit=spec.unit, description=spec.description)

        # a gauge: only producers heard from lately (an idle or vanished producer has no queue worth counting)
        observable("circuitwatch.producer.queue_depth", observe("queue_depth", live_only=True))
        observable("circuitwatch.producer.batches_dropped", observe("batches_dropped"))
        observable("circuitwatch.producer.rows_dropped", observe("rows_dropped"))
        observable("circuitwatch.producer.encode.time", observe("encode_ns", 1e-9))
        observable("circuitwatch.producer.steps_encoded", observe("steps_encoded"))
        observable("circuitwatch.producer.engine_step.wait_timeouts", observe("engine_step_wait_timeouts"))
        observable("circuitwatch.producer.steps_coalesced", observe("steps_coalesced"))
        if counters is not None:
            observable(
                "circuitwatch.report.handoff.timeouts",
                [lambda _options: [Observation(counters["handoff_timeouts"])]],
            )
            observable(
                "circuitwatch.maintenance.worker.failures",
                [lambda _options: [Observation(counters["maintenance_worker_failures"])]],
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

        for name, field in (
            ("circuitwatch.sae.js_divergence", "js_divergence"),
            ("circuitwatch.sae.error_ratio", "error_ratio"),
            ("circuitwatch.sae.norm_ratio", "norm_ratio"),
            ("circuitwatch.sae.dead_feature_ratio", "dead_fraction"),
            ("circuitwatch.sae.alarm", "alarm"),
        ):
            observable(name, health_gauge(field))

        if fleet is not None:  # fleet: the exporter's snapshot() (a dict of counters and gauges)

            def fleet_metric(read):
                return [lambda _options: read(fleet())]

            observable(
                "circuitwatch.fleet.rows.exported",
                fleet_metric(lambda f: [Observation(n, {"table": t}) for t, n in f["exported"].items()]),
            )
            observable(
                "circuitwatch.fleet.rows.dropped",
                fleet_metric(
                    lambda f: [Observation(n, {"table": t, "reason": r}) for (r, t), n in f["dropped"].items()]
                ),
            )
            observable("circuitwatch.fleet.insert.errors", fleet_metric(lambda f: [Observation(f["insert_errors"])]))
            observable("circuitwatch.fleet.spool.files", fleet_metric(lambda f: [Observation(f["spool_files"])]))
            observable("circuitwatch.fleet.export.lag", fleet_metric(lambda f: [Observation(f["lag_s"])]))

        def counter(name: str):
            spec = SPECS[name]
            return meter.create_counter(name, unit=spec.unit, description=spec.description)

        def histogram(name: str, buckets: tuple[float, ...]):
            spec = SPECS[name]
            return meter.create_histogram(
                name, unit=spec.unit, description=spec.description, explicit_bucket_boundaries_advisory=buckets
            )

        return SidecarInstruments(
            fidelity_error=histogram("circuitwatch.fidelity.error_ratio", ERROR_BUCKETS),
            flags=counter("circuitwatch.flags"),
            requests=counter("circuitwatch.requests.monitored"),
            positions=counter("circuitwatch.positions"),
            gap_positions=counter("circuitwatch.gap.positions"),
            postings=counter("circuitwatch.codes.ingested"),
            report_latency=histogram("circuitwatch.report.latency", LATENCY_BUCKETS_S),
            ingest_lag=histogram("circuitwatch.ingest.lag", LATENCY_BUCKETS_S),
            batch_duration=histogram("circuitwatch.ingest.batch.duration", LATENCY_BUCKETS_S),
            batch_cpu_time=histogram("circuitwatch.ingest.batch.cpu_time", LATENCY_BUCKETS_S),
        )

    def report_finished(self, report: pb.Report) -> None:
        if self.tracer_provider is None:
            return
        tracer = self.tracer_provider.get_tracer("circuitwatch.sidecar", __version__)
        carrier = {"traceparent": report.trace.traceparent, "tracestate": report.trace.tracestate}
        parent = TraceContextTextMapPropagator().extract(carrier) if report.trace.traceparent else None
        coverage = report.coverage
        attributes = {
            # GenAI semantic conventions (registered attributes)
            "gen_ai.response.id": report.response_id,
            "gen_ai.request.model": report.model,
            # circuitwatch's own: the request's key in the sidecar (unique even when clients reuse ids)
            "circuitwatch.request.id": report.request_id,
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
            severity = severity_name(flag.severity)
            event = {
                "gen_ai.evaluation.name": flag.circuit,
                "gen_ai.evaluation.score.label": severity,
                "gen_ai.evaluation.explanation": f"circuit {flag.circuit} matched on {flag.matching_tokens} tokens",
                "gen_ai.response.id": report.response_id,
                "circuitwatch.circuit": flag.circuit,
                "circuitwatch.severity": severity,
                "circuitwatch.matching_tokens": flag.matching_tokens,
                "circuitwatch.positions": [e.position for e in flag.evidence][:EVIDENCE_POSITIONS],
                "circuitwatch.features": features,
                "circuitwatch.action": flag.action or "none",
            }
            span.add_event(EVENT_NAME, event, timestamp=report.finalized_unix_nanos)
        if report.status == pb.REPORT_STATUS_INCOMPLETE:
            span.set_status(Status(StatusCode.UNSET))
        span.end(end_time=max(report.finalized_unix_nanos, report.arrival_unix_nanos))

    def health_changed(self, slot: pb.SlotHealth, previous: int) -> None:
        """An SAE's alarm was raised or cleared: a span with one event, outside any trace. Other changes (warming
        up, no baseline) are not events."""
        if self.tracer_provider is None or (slot.state not in ALARM_STATES and previous not in ALARM_STATES):
            return
        tracer = self.tracer_provider.get_tracer("circuitwatch.sidecar", __version__)
        state = slot_state_name(slot.state)
        attributes = {
            "circuitwatch.sae": slot.sae,
            "circuitwatch.sae.layer": slot.layer,
            "circuitwatch.sae.hook_point": slot.hook_point,
            "circuitwatch.sae.tap": message_tap_label(slot),
            "circuitwatch.sae.weights_hash": slot.weights_hash,
            "circuitwatch.sae.state": state,
            "circuitwatch.sae.previous_state": slot_state_name(previous),
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
        if self.prometheus_server is not None:
            self.prometheus_server.shutdown()
            self.prometheus_server.server_close()


ALARM_STATES = (pb.SLOT_STATE_DRIFT, pb.SLOT_STATE_MISWIRED)


class _Producers:
    """The Monitor's latest stats per producer instance (`host:pid[:engine-core]`), as metric values per host.
    The pid changes with every restart, so it is no label: producers on one host are summed (their totals stay
    monotonic across restarts, since a restarted producer is a new instance beside the old one's last totals),
    and gauges count only producers whose stats changed in the last PRODUCER_IDLE_S seconds (as seen at
    collection time)."""

    def __init__(self, stats: dict[str, pb.ProducerStats], clock=time.monotonic) -> None:
        self.stats = stats
        self.clock = clock
        self.seen: dict[str, tuple[bytes, float]] = {}  # producer -> (its latest stats, when they were new)

    def by_host(self, field: str, live_only: bool) -> dict[str, float]:
        now = self.clock()
        out: dict[str, float] = {}
        for producer, stats in list(self.stats.items()):
            previous, content = self.seen.get(producer), stats.SerializeToString(deterministic=True)
            if previous is None or previous[0] != content:  # a busy producer's totals move with every batch
                self.seen[producer] = previous = (content, now)
            if live_only and now - previous[1] > PRODUCER_IDLE_S:
                continue
            host = producer.split(":", 1)[0] or "unknown"
            out[host] = out.get(host, 0) + getattr(stats, field)
        return out


@dataclass
class SidecarInstruments:
    fidelity_error: object
    flags: object
    requests: object
    positions: object
    gap_positions: object
    postings: object
    report_latency: object
    ingest_lag: object
    batch_duration: object
    batch_cpu_time: object

    def code_batch(self, wall_ns: int, cpu_ns: int) -> None:
        """One code batch's ingest: its wall time and its thread's CPU time, apart (a host that starves the
        sidecar shows as wall time far above CPU time; the sidecar's own cost, as CPU time)."""
        self.batch_duration.record(wall_ns / 1e9)
        self.batch_cpu_time.record(cpu_ns / 1e9)

    def report(self, report: pb.Report, finish_received_ns: int) -> None:
        for flag in report.flags:
            self.flags.add(1, {"circuit": flag.circuit, "severity": severity_name(flag.severity)})
        status = status_name(report.status)
        self.requests.add(1, {"status": status, "model": report.model})
        coverage = report.coverage
        self.positions.add(coverage.positions_seen, {"coverage": "seen"})
        self.positions.add(max(0, coverage.positions_total - coverage.positions_seen), {"coverage": "missing"})
        by_reason: dict[str, int] = {}
        for gap in coverage.gaps:
            reason = gap_reason_name(gap.reason)
            by_reason[reason] = by_reason.get(reason, 0) + max(0, gap.end - gap.start)
        for reason, positions in by_reason.items():
            self.gap_positions.add(positions, {"reason": reason})
        names = {s.slot: s.name for s in report.saes}
        for slot in report.fidelity:
            if slot.tokens:
                attributes = {"sae": names.get(slot.slot, str(slot.slot)), "low_fidelity": slot.low_fidelity}
                self.fidelity_error.record(slot.error_mean, attributes)
        if finish_received_ns:  # made by its finish (not a timeout or a shutdown); seconds: the Prometheus unit
            latency_ns = report.finalized_unix_nanos - report.inputs_received_unix_nanos
            self.report_latency.record(max(0.0, latency_ns / 1e9))
            if report.finish_unix_nanos:
                self.ingest_lag.record(max(0.0, (finish_received_ns - report.finish_unix_nanos) / 1e9))
