"""Spans and metrics reach a real OTLP receiver (gRPC and HTTP) with the caller's trace context and the GenAI
semantic conventions' names; the Prometheus endpoint follows Prometheus naming (names, base units, bounded
labels) and exposes exactly the documented metrics; a dead collector never blocks ingest."""

from __future__ import annotations

import re
import time
from pathlib import Path

import numpy as np
import pytest

from circuitwatch.proto import circuitwatch_pb2 as pb
from circuitwatch.sidecar.telemetry import METRICS

from support.metrics_scrape import GAP_POSITIONS, scrape_sidecar_after_traffic
from support.otlp_receiver import attributes, grpc_receiver, http_receiver
from support.processes import free_port
from support.sidecar_harness import SyntheticRequest, brute_force_matches, manifest, running_sidecar

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_SPAN = "00f067aa0ba902b7"
CIRCUIT = "circuits:\n  - {name: f3, severity: high, when: {layer: 1, feature: 3}}\n"


def traffic(rng: np.random.Generator) -> tuple[list[pb.IngestMessage], list[SyntheticRequest]]:
    requests = [SyntheticRequest.random(rng, f"t{i}", d_sae=8) for i in range(6)]
    messages = [pb.IngestMessage(manifest=manifest())]
    for i, request in enumerate(requests):
        trace = pb.TraceContext(traceparent=f"00-{TRACE_ID}-{PARENT_SPAN}-01", tracestate="vendor=1") if i < 4 else None
        messages.append(pb.IngestMessage(start=pb.RequestStart(request_id=request.request_id, trace=trace)))
        slices = [request.slice(s, a, b) for a, b in request.chunks(6) for s in (0, 1)]
        stats = pb.ProducerStats(
            queue_depth=i, batches_dropped=2, rows_dropped=30, steps_encoded=10 * (i + 1), encode_ns=5_000_000
        )
        messages.append(pb.IngestMessage(codes=pb.CodeBatch(step=i + 1, slices=slices, stats=stats)))
        messages.append(pb.IngestMessage(finish=request.finish(finish_unix_nanos=time.time_ns())))
    return messages, requests


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_spans_and_metrics_reach_the_collector(tmp_path: Path, monkeypatch, protocol: str) -> None:
    server, port, collected = grpc_receiver() if protocol == "grpc" else http_receiver()
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", protocol)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_INSECURE", "true")
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")
    monkeypatch.setenv("OTEL_METRIC_EXPORT_INTERVAL", "200")
    (tmp_path / "c.yaml").write_text(CIRCUIT)
    messages, requests = traffic(np.random.default_rng(5))
    try:
        with running_sidecar(tmp_path, circuits=[tmp_path / "c.yaml"]) as (_, client):
            client.ingest(messages)
            reports = [client.report(r.request_id) for r in requests]
            collected.wait_for(lambda: len(collected.spans()) >= len(requests))
            collected.wait_for(lambda: collected.metric_points("circuitwatch.requests.monitored"))
        spans = {attributes(s)["circuitwatch.request.id"]: s for s in collected.spans()}
        assert set(spans) == {r.request_id for r in requests}
        for i, request in enumerate(requests):
            span, attrs = spans[request.request_id], attributes(spans[request.request_id])
            assert span.name == "circuitwatch.monitor"
            if i < 4:  # in the caller's trace, child of the caller's span
                assert span.trace_id.hex() == TRACE_ID and span.parent_span_id.hex() == PARENT_SPAN
            else:  # no traceparent: a new trace
                assert span.trace_id.hex() != TRACE_ID and not span.parent_span_id
            assert attrs["circuitwatch.tokens.total"] == request.num_positions
            assert attrs["circuitwatch.tokens.monitored"] == request.num_positions
            assert attrs["circuitwatch.coverage.status"] == "complete"
            expected_saes = ["sae-l1@L1.resid_post:blake2b:h01", "sae-l2@L2.resid_post:blake2b:h02"]
            assert attrs["circuitwatch.saes"] == expected_saes
            matches = brute_force_matches({"layer": 1, "feature": 3}, request)
            assert attrs["circuitwatch.circuits.matched"] == (["f3"] if matches else [])
            assert attrs["circuitwatch.severity.max"] == ("high" if matches else "none")
            assert attrs["gen_ai.request.model"] == "tiny"
            assert "gen_ai.request.id" not in attrs  # not a registered GenAI attribute: circuitwatch.request.id
            events = [e for e in span.events if e.name == "gen_ai.evaluation.result"]  # GenAI semconv event
            assert len(events) == (1 if matches else 0)
            if matches:
                event = {kv.key: kv.value for kv in events[0].attributes}
                assert event["gen_ai.evaluation.name"].string_value == "f3"
                assert event["gen_ai.evaluation.score.label"].string_value == "high"
                assert event["circuitwatch.matching_tokens"].int_value == len(matches)
                assert [v.int_value for v in event["circuitwatch.positions"].array_value.values] == matches[:16]
        flagged = sum(1 for r in requests if brute_force_matches({"layer": 1, "feature": 3}, r))
        assert flagged
        collected.wait_for(lambda: sum(p.as_int for p in collected.metric_points("circuitwatch.flags")[-1:]) == flagged)
        postings = sum(len(row) for r in requests for rows in r.codes.values() for row in rows)
        collected.wait_for(lambda: collected.metric_points("circuitwatch.codes.ingested")[-1].as_int == postings)
        # plugin-side metrics, relayed by the producer in its code batches (the latest batch: i = 5)
        collected.wait_for(lambda: collected.metric_points("circuitwatch.producer.steps_encoded"))
        assert collected.metric_points("circuitwatch.producer.queue_depth")[-1].as_int == 5
        assert collected.metric_points("circuitwatch.producer.steps_encoded")[-1].as_int == 60
        assert collected.metric_points("circuitwatch.producer.rows_dropped")[-1].as_int == 30
        assert collected.metric_points("circuitwatch.producer.encode.time")[-1].as_double == pytest.approx(0.005)
        producer = {
            kv.key: kv.value.string_value
            for kv in collected.metric_points("circuitwatch.producer.queue_depth")[-1].attributes
        }
        assert producer == {"producer_host": "test-producer"}  # the host, never the pid
        latency = collected.metric_points("circuitwatch.report.latency")[-1]  # seconds
        # from the last input each report waited for (here its finish, after its codes) to the report, as the
        # reports themselves say
        waited = [(r.finalized_unix_nanos - r.inputs_received_unix_nanos) / 1e9 for r in reports]
        assert all(r.inputs_received_unix_nanos for r in reports)
        assert latency.count == len(requests) and latency.sum == pytest.approx(sum(waited), rel=1e-6)
    finally:
        server.stop(0) if protocol == "grpc" else server.shutdown()


def test_prometheus_names_units_and_labels(tmp_path: Path) -> None:
    """A real sidecar process with prometheus_port set, real traffic, a scrape over HTTP: every circuitwatch
    metric is named the Prometheus way, in base units, labelled without request ids, and the exposed set is
    exactly the documented one (telemetry.METRICS, which the README's table is written from)."""
    scrape = scrape_sidecar_after_traffic(tmp_path)
    exposed = scrape.circuitwatch_types()
    for name, kind in exposed.items():
        assert re.fullmatch(r"circuitwatch_[a-z0-9_]+", name), name
        assert "__" not in name and "milli" not in name, name
        assert name.endswith("_total") == (kind == "counter"), (name, kind)
    # the documented list, names and types: a renamed or added metric must be documented (and vice versa)
    documented = [m for m in METRICS if scrape.fleet or not m.name.startswith("circuitwatch.fleet.")]
    assert exposed == {m.prometheus: m.kind for m in documented}
    # the OpenTelemetry Collector's Prometheus exporter gives the same names (it also appends `_ratio` to gauges of
    # unit "1" whose name lacks it), so dashboards work on either path
    assert all(m.prometheus.endswith("_ratio") for m in METRICS if m.kind == "gauge" and m.unit == "1")
    # labels: the documented ones (plus the exporter's constant otel_scope_* labels), never a request id
    request_ids = set(scrape.request_ids) | {r.response_id for r in scrape.reports if r.response_id}
    documented = {m.prometheus: set(m.labels) for m in METRICS}
    for sample in scrape.samples:
        if not sample.name.startswith("circuitwatch"):
            continue
        family = next(f for f in documented if sample.name == f or sample.name.startswith(f + "_"))
        keys = {k for k in sample.labels if not k.startswith("otel_scope_") and k != "le"}
        assert keys == documented[family], (sample.name, sample.labels)
        for value in sample.labels.values():
            assert not any(r in value for r in request_ids), (sample.name, sample.labels)
    # the OTel exporter's own series: target_info (resource attributes), otel_scope_* labels of constant value
    assert scrape.types.get("target_info") == "gauge"
    scopes = {s.labels.get("otel_scope_name") for s in scrape.samples if s.name.startswith("circuitwatch")}
    assert scopes == {"circuitwatch.sidecar"}
    # base units: latencies in seconds (the traffic's reports were final within a few seconds, not 0); one report
    # per request, and one code batch per request (its ingest's wall time and its thread's CPU time apart)
    for histogram in (
        "circuitwatch_report_latency_seconds",
        "circuitwatch_ingest_lag_seconds",
        "circuitwatch_ingest_batch_duration_seconds",
        "circuitwatch_ingest_batch_cpu_time_seconds",
    ):
        (count,), (total,) = scrape.values(f"{histogram}_count"), scrape.values(f"{histogram}_sum")
        assert count == len(scrape.request_ids) and 0 < total / count < 5, (histogram, count, total)
        assert scrape.values(f"{histogram}_bucket", le="0.005"), "buckets sized for seconds"
    # a batch's CPU time within its wall time (1% for the two clocks' accounting: the CPU interval is read inside the
    # wall one), and the batches all together well under 5 s
    (wall_s,) = scrape.values("circuitwatch_ingest_batch_duration_seconds_sum")
    (cpu_s,) = scrape.values("circuitwatch_ingest_batch_cpu_time_seconds_sum")
    assert 0 < cpu_s <= 1.01 * wall_s < 5, (wall_s, cpu_s)
    assert scrape.values("circuitwatch_producer_encode_time_seconds_total") == [pytest.approx(0.002)]
    # what the traffic did, counted (see support/metrics_scrape.traffic)
    statuses = {
        s.labels["status"]: s.value for s in scrape.samples if s.name == "circuitwatch_requests_monitored_total"
    }
    assert sum(statuses.values()) == len(scrape.request_ids) and statuses.get("incomplete") == 1, statuses
    assert scrape.values("circuitwatch_requests_monitored_total", model="tiny", status="complete") == [5]
    assert scrape.values("circuitwatch_gap_positions_total", reason="prefix_cache") == [2 * GAP_POSITIONS]
    seen = sum(r.coverage.positions_seen for r in scrape.reports)
    assert scrape.values("circuitwatch_positions_total", coverage="seen") == [seen]
    assert scrape.values("circuitwatch_positions_total", coverage="missing") == [GAP_POSITIONS]
    flagged = sum(1 for r in scrape.reports if r.flags)
    assert flagged and scrape.values("circuitwatch_flags_total", circuit="scrape-f3", severity="high") == [flagged]
    assert scrape.values("circuitwatch_fidelity_error_ratio_count", sae="sae-l1", low_fidelity="false") == [6]
    assert scrape.values("circuitwatch_producer_queue_depth") == [5]  # the latest stats (producer_host label)
    assert scrape.values("circuitwatch_producer_engine_step_wait_timeouts_total") == [5]
    assert scrape.values("circuitwatch_producer_steps_coalesced_total") == [15]
    assert scrape.values("circuitwatch_report_handoff_timeouts_total") == [0]
    assert scrape.values("circuitwatch_maintenance_worker_failures_total") == [0]  # the core's counter, exported


def test_a_dead_collector_never_blocks_ingest(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{free_port()}")  # nobody listens
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")
    messages, requests = traffic(np.random.default_rng(7))
    with running_sidecar(tmp_path) as (_, client):
        client.ingest(messages)
        assert all(client.report(r.request_id, wait_ms=5000).status == pb.REPORT_STATUS_COMPLETE for r in requests)
