"""A real sidecar process with its Prometheus endpoint on, real traffic through its gRPC Ingest API, and what
its /metrics says afterwards: shared by the naming test (tests/sidecar/test_telemetry.py) and the
dashboard test (tests/deploy/test_observability_examples.py), so a renamed metric breaks both.

The traffic exercises every metric the sidecar declares: flags, a gap (prefix cache), fidelity (per-token
reconstruction errors), producer stats relayed in code batches, reports finalised (latency, ingest lag) and
the per-SAE health gauges."""

from __future__ import annotations

import importlib.util
import re
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from circuitwatch.proto import circuitwatch_pb2 as pb
from circuitwatch.proto import circuitwatch_pb2_grpc as pb_grpc

from .processes import free_port, start_sidecar, stop
from .sidecar_harness import SyntheticRequest, manifest

# The sidecar process runs from this interpreter's venv: the fleet store needs the [fleet] extra there (`make test`
# runs the tests that check the fleet metrics with it: CIRCUITWATCH_REQUIRE_FLEET, see support/fleet.py).
FLEET_INSTALLED = importlib.util.find_spec("chdb") is not None

CIRCUIT = "circuits:\n  - {name: scrape-f3, severity: high, when: {layer: 1, feature: 3}}\n"
GAP_POSITIONS = 3  # the first request's first positions: read from the prefix cache, never encoded
TYPE_LINE = re.compile(r"^# TYPE (\S+) (\S+)$", re.MULTILINE)


@dataclass
class Scrape:
    text: str  # the /metrics body
    types: dict[str, str]  # exposed family name (as in `# TYPE`) -> Prometheus type
    samples: list = field(default_factory=list)  # prometheus_client Samples: name, labels, value
    request_ids: list[str] = field(default_factory=list)  # what the traffic used: no label may carry these
    reports: list[pb.Report] = field(default_factory=list)
    fleet: bool = False  # the sidecar exported to a fleet store (its metrics are on the scrape)

    def circuitwatch_types(self) -> dict[str, str]:
        return {name: kind for name, kind in self.types.items() if name.startswith("circuitwatch")}

    def values(self, sample_name: str, **labels: str) -> list[float]:
        return [
            s.value
            for s in self.samples
            if s.name == sample_name and all(s.labels.get(k) == v for k, v in labels.items())
        ]


def _with_fidelity(request: SyntheticRequest, slot: int, start: int, end: int, rng: np.random.Generator):
    """A slice with per-token reconstruction errors and input norms, so the fidelity metric moves."""
    return request.slice(slot, start, end, errors=rng.uniform(0.05, 0.3, end - start), norms=np.full(end - start, 10.0))


def traffic(rng: np.random.Generator, count: int = 6) -> tuple[list[pb.IngestMessage], list[SyntheticRequest]]:
    """A manifest, then per request: start, its codes in prompt/generated chunks (with producer stats), finish.
    The first request's first GAP_POSITIONS positions are a declared prefix-cache gap."""
    run = uuid.uuid4().hex[:12]
    requests = [SyntheticRequest.random(rng, f"scrape-{run}-{i}", d_sae=8) for i in range(count)]
    messages = [pb.IngestMessage(manifest=manifest())]
    for i, request in enumerate(requests):
        gap_end = GAP_POSITIONS if i == 0 else 0
        messages.append(pb.IngestMessage(start=pb.RequestStart(request_id=request.request_id)))
        slices = [
            _with_fidelity(request, slot, max(a, gap_end), b, rng)
            for a, b in request.chunks(6)
            if b > gap_end
            for slot in (0, 1)
        ]
        stats = pb.ProducerStats(
            queue_depth=i,
            batches_dropped=1,
            rows_dropped=10,
            steps_encoded=10 * (i + 1),
            encode_ns=2_000_000,
            engine_step_wait_timeouts=i,
            steps_coalesced=3 * i,
        )
        messages.append(pb.IngestMessage(codes=pb.CodeBatch(step=i + 1, slices=slices, stats=stats)))
        gaps = [pb.Gap(slot=s, start=0, end=gap_end, reason=pb.GAP_REASON_PREFIX_CACHE) for s in (0, 1) if gap_end]
        messages.append(pb.IngestMessage(finish=request.finish(finish_unix_nanos=time.time_ns(), gaps=gaps)))
    return messages, requests


def scrape_sidecar_after_traffic(tmp_path: Path, seed: int = 0) -> Scrape:
    """Start `circuitwatch sidecar` (its own process) with `telemetry: {prometheus_port}`, send the traffic over
    gRPC, wait for every report, scrape /metrics over HTTP, stop the sidecar."""
    (tmp_path / "circuits.yaml").write_text(CIRCUIT)
    grpc_port, metrics_port = free_port(), free_port()
    config = f"circuits: [{tmp_path / 'circuits.yaml'}]\ntelemetry: {{prometheus_port: {metrics_port}}}\n"
    if FLEET_INSTALLED:  # the fleet exporter's metrics too (embedded store); `make test` runs this with the extra
        config += "fleet: {enabled: true, instance: scrape}\n"
    process = start_sidecar(tmp_path, grpc_port, config, log_name="sidecar.log")
    try:
        messages, requests = traffic(np.random.default_rng(seed))
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            stub = pb_grpc.MonitorStub(channel)
            stub.Ingest(iter(messages), timeout=60)
            reports = [
                stub.GetReport(pb.GetReportRequest(request_id=r.request_id, wait_ms=5000), timeout=30) for r in requests
            ]
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as response:
            text = response.read().decode()
    finally:
        stop(process)
    samples = [s for family in text_string_to_metric_families(text) for s in family.samples]
    types = {m.group(1): m.group(2) for m in TYPE_LINE.finditer(text)}
    return Scrape(text, types, samples, [r.request_id for r in requests], reports, fleet=FLEET_INSTALLED)
